"""English-French translation as WMT parallel text, from French gettext catalogs (msgid -> msgstr).

Only the ``.mo`` files owned by :data:`GETTEXT_PACKAGES` are read (found with ``dpkg -L``), not
whatever happens to sit in ``/usr/share/locale/fr``, so the corpus depends on package versions
only. The set is small architecture-independent l10n/data packages (glibc, GnuPG, GTK 2, GLib,
xkeyboard-config, shared-mime-info, GSettings schemas) plus the ``Priority: required`` tools
every Debian has (coreutils, tar, dpkg, apt, bash, diffutils, login): about 8k usable pairs.
``iso-codes`` is left out on purpose: its 9k language names would swamp the sentence-like
messages.
"""

from __future__ import annotations

import gettext
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from pipelines.starter.common import Size, StarterError, seeded, shuffled, take_splits, write_parallel
from pipelines.starter.debian import GETTEXT_PACKAGES, package_files

# Printf/brace/shell formats, escapes, markup and addresses: not plain text on both sides.
NOT_PLAIN_TEXT = re.compile(r"%|\{|\}|\$|\\|<|>|https?://|@|\t")


def strip_accelerator(text: str) -> str | None:
    """Remove the keyboard mnemonic: GTK's "_Open"/"Save _As", Qt's "&Open".

    One marker before a letter is a mnemonic; several underscores are an identifier
    ("max_depth_limit"), which we drop rather than mangle.
    """
    for marker in ("_", "&"):
        if text.count(marker) > 1:
            return None
        text = re.sub(re.escape(marker) + r"(?=\w)", "", text)
    return text


def clean_message(text: str) -> str | None:
    if not text or "\n" in text or NOT_PLAIN_TEXT.search(text):
        return None
    text = strip_accelerator(text)
    # str.split() also splits on the no-break spaces French puts before ':' and '?'.
    return " ".join(text.split()) if text else None


def french_catalogs(packages: Sequence[str] = GETTEXT_PACKAGES) -> list[Path]:
    catalogs = []
    for package in packages:
        files = package_files(package)
        catalogs += sorted(
            Path(f) for f in files if f.startswith("/usr/share/locale/fr/") and f.endswith(".mo")
        )
    existing = [path for path in catalogs if path.exists()]
    if catalogs and not existing:
        raise StarterError(
            "the French .mo catalogs are listed by dpkg but missing on disk: dpkg probably excludes "
            "/usr/share/locale (see /etc/dpkg/dpkg.cfg.d/); remove that path-exclude and reinstall "
            + " ".join(packages)
        )
    return existing


def gettext_pairs(catalog: Path) -> Iterable[tuple[str, str]]:
    """(English, French) from one .mo file, skipping plurals, contexts and the header."""
    try:
        with open(catalog, "rb") as mo:
            messages = gettext.GNUTranslations(mo)._catalog
    except (OSError, UnicodeDecodeError):
        return
    for msgid, msgstr in sorted((k, v) for k, v in messages.items() if isinstance(k, str)):
        if "\x04" in msgid:  # msgctxt
            continue
        english, french = clean_message(msgid), clean_message(msgstr)
        if english and french and english.casefold() != french.casefold() and re.search("[A-Za-z]", english):
            yield english, french


def en_fr_pairs(max_words: int) -> list[tuple[str, str]]:
    pairs: dict[str, str] = {}
    for catalog in french_catalogs():
        for english, french in gettext_pairs(catalog):
            if english.startswith("-") or len(english.split()) > max_words:  # skip option help
                continue
            pairs.setdefault(english, french)  # the first package's translation wins
    return list(pairs.items())


def build_wmt_en_fr(dst: Path, size: Size, seed: int) -> dict[str, int]:
    pairs = shuffled(en_fr_pairs(size.en_fr_words), seeded(seed, "wmt_en_fr"))
    return write_parallel(dst, take_splits(pairs, size.en_fr, "wmt_en_fr"), "en", "fr")
