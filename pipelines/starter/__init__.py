"""The starter suite: six small raw corpora made from Debian packages, with no downloads.

The starter suite stands in for the paper's corpora on a laptop. Each corpus is written in the
*standard raw layout* of the corpus it imitates, so the demo exercises the very readers that
prepare ImageNet, WMT, COCO, LibriSpeech and the Penn Treebank. One module builds each:

- ``fashion_mnist/``: ``dataset-fashion-mnist`` (IDX files) as ImageNet class folders;
- ``wmt_en_de/``: ``trans-de-en`` (Ding) full-sentence examples as WMT parallel text;
- ``wmt_en_fr/``: French gettext catalogs (msgid -> msgstr) as WMT parallel text;
- ``coco_emoji/``: ``fonts-noto-color-emoji`` drawn by Pillow, named by PyPI ``emoji``, as COCO
  captions json + PNGs;
- ``librispeech/``: ``flite`` voices reading Ding sentences as LibriSpeech folders of FLAC;
- ``ptb/``: ``link-parser`` constituents of Ding sentences as Penn Treebank bracketed trees;
- ``README.md`` (sources, versions, licences, counts) and ``starter.json`` (the summary).

The choices worth knowing about a corpus are in its module's docstring. ``ding`` reads the
sentences three corpora share, ``debian`` installs and describes the packages, ``common`` holds
the sizes and split helpers, and ``build`` puts the suite together.

Everything is deterministic for a seed: the same seed and package versions give byte-identical
files. A build goes to a hidden sibling directory that is renamed into place when complete, so a
killed build never leaves a corpus that looks finished. Call :func:`build_starter`, or run
``mm starter --out data/starter --size small``.
"""

from pipelines.starter.build import build_starter
from pipelines.starter.common import SIZES, SPLITS, StarterError
from pipelines.starter.debian import PACKAGES, apt_install_line, ensure_packages, missing_packages

__all__ = [
    "PACKAGES",
    "SIZES",
    "SPLITS",
    "StarterError",
    "apt_install_line",
    "build_starter",
    "ensure_packages",
    "missing_packages",
]
