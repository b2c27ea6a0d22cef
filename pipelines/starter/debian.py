"""The Debian packages the starter corpora are made from: which ones, installing them, their
versions, the files they own and their licences. Everything goes through dpkg and apt-get."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from pipelines.starter.common import StarterError

# Packages that ship French catalogs; pipelines.starter.wmt_en_fr's docstring says why these.
GETTEXT_PACKAGES = (
    "libc-l10n",
    "gnupg-l10n",
    "libgtk2.0-common",
    "libglib2.0-data",
    "xkb-data",
    "shared-mime-info",
    "gsettings-desktop-schemas",
    "coreutils",
    "tar",
    "dpkg",
    "apt",
    "bash",
    "diffutils",
    "login",
)

CORPUS_PACKAGES = {
    "fashion_mnist": ("dataset-fashion-mnist",),
    "wmt_en_de": ("trans-de-en",),
    "wmt_en_fr": GETTEXT_PACKAGES,
    "coco_emoji": ("fonts-noto-color-emoji",),
    "librispeech": ("flite", "sox", "trans-de-en"),
    "ptb": ("link-grammar", "link-grammar-dictionaries-en", "trans-de-en"),
}
PACKAGES = tuple(dict.fromkeys(p for pkgs in CORPUS_PACKAGES.values() for p in pkgs))

# Licences read from /usr/share/doc/<pkg>/copyright where the file is not machine-readable or
# where its "Files: *" stanza is not the part we use (the emoji font itself is OFL, not Apache).
LICENCE_NOTES = {
    "fonts-noto-color-emoji": "OFL-1.1 (the font; its build tools are Apache-2.0)",
    "flite": "CMU/Edinburgh BSD-style free licence (code and voices)",
    "libc-l10n": "LGPL-2.1+",
    "libglib2.0-data": "LGPL-2.1+",
    "libgtk2.0-common": "LGPL-2+",
    "xkb-data": "MIT/X11-style permissive",
    "shared-mime-info": "GPL-2+",
}


def apt_install_line(packages: Iterable[str]) -> str:
    return "apt-get install -y --no-install-recommends " + " ".join(packages)


def missing_packages(packages: Iterable[str]) -> list[str]:
    """The packages dpkg does not list as installed (one dpkg-query call for all)."""
    packages = list(packages)
    if shutil.which("dpkg-query") is None:
        return packages
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n", *packages],
        capture_output=True,
        text=True,
    )
    installed = {line.split()[0] for line in result.stdout.splitlines() if line.split()[1:2] == ["ii"]}
    return [p for p in packages if p not in installed]


def ensure_packages(
    packages: Sequence[str] = PACKAGES,
    install: bool = True,
    euid: int | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Install what is missing with apt when we are root; otherwise say exactly what to run."""
    missing = missing_packages(packages)
    if not missing:
        return
    line = apt_install_line(missing)
    euid = os.geteuid() if euid is None else euid
    if shutil.which("dpkg-query") is None:
        raise StarterError(f"the starter suite needs Debian packages (Debian or Ubuntu); run: {line}")
    if not install or euid != 0:
        reason = "--no-install was given" if not install else "not running as root"
        raise StarterError(f"missing Debian packages ({reason}); install them with:\n  sudo {line}")
    log(f"[starter] installing {' '.join(missing)}")
    _install(missing, line, log)
    still_missing = missing_packages(missing)
    if still_missing:
        raise StarterError(f"still missing after apt-get: {' '.join(still_missing)}")


def _install(missing: list[str], line: str, log: Callable[[str], None]) -> None:
    if not _apt_get(["install", "-y", "--no-install-recommends", *missing]):
        # The usual cause on a fresh machine: no package lists yet.
        log("[starter] apt-get install failed; running apt-get update and retrying")
        _apt_get(["update"])
        if not _apt_get(["install", "-y", "--no-install-recommends", *missing], echo=log):
            raise StarterError(f"apt-get could not install the packages; try by hand: {line}")


def _apt_get(args: list[str], echo: Callable[[str], None] | None = None) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(["apt-get", *args], capture_output=True, text=True, env=env)
    if result.returncode != 0 and echo is not None:
        echo(result.stdout[-2000:] + result.stderr[-2000:])
    return result.returncode == 0


def package_versions(packages: Iterable[str]) -> dict[str, str]:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${Version}\n", *packages],
        capture_output=True,
        text=True,
    )
    return dict(line.split("\t", 1) for line in result.stdout.splitlines() if "\t" in line)


def package_files(package: str) -> list[str]:
    result = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    return result.stdout.splitlines()


def package_licence(package: str) -> str:
    """The licence of the package's data, from its Debian copyright file."""
    if package in LICENCE_NOTES:
        return LICENCE_NOTES[package]
    copyright_file = Path("/usr/share/doc") / package / "copyright"
    try:
        text = copyright_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown (no copyright file)"
    # Machine-readable copyright files: the licence of the "Files: *" stanza.
    match = re.search(r"^Files:\s*\*\s*$(?:\n(?!License:).*)*\nLicense:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else f"see {copyright_file}"
