"""The layers of README's layout table hold: arrows point one way (mmcli -> tune -> cluster -> mm,
mmcli -> pipelines -> mm), and mm/ imports neither Ray nor MLflow. Read from the source with
`ast`, so an import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# what each package may import of the project's packages and of the heavy frameworks
ALLOWED = {
    "mm": {"mm"},
    "pipelines": {"mm", "pipelines", "ray"},
    "cluster": {"mm", "cluster", "ray", "mlflow"},
    "tune": {"mm", "cluster", "tune", "ray", "mlflow"},
    "mmcli": {"mm", "pipelines", "cluster", "tune", "mmcli", "ray", "mlflow"},
}
GUARDED = {"mm", "pipelines", "cluster", "tune", "mmcli", "ray", "mlflow"}


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & GUARDED


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_module_imports_a_layer_above_its_own(package):
    wrong = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) - ALLOWED[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {path: names for path, names in wrong.items() if names} == {}


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import ray.train\n    from tune.sweep import sweep\n")
    assert imported_packages(module) == {"ray", "tune"}
