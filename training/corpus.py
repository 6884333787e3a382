"""Offline training corpus for the embedded ``tiny`` model, fetched from Debian's archive.

Three domains, split by *file* so the evaluation texts are truly held out:

- prose:   the Python 3.11 documentation's reST sources (``python3.11-doc``)
- code:    the Python 3.11 standard library source (``libpython3.11-stdlib``)
- shifted: the free-software licence texts of ``base-files`` (legal English; never trained on)

``apt-get download`` needs no root; ``dpkg -x`` unpacks without installing.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGES = ("python3.11-doc", "libpython3.11-stdlib", "base-files")
_DOC_SOURCES = "usr/share/doc/python3.11/html/_sources"
_STDLIB = "usr/lib/python3.11"
_LICENSES = "usr/share/common-licenses"
# Pages that are themselves licence texts: left out of prose so the shifted domain stays unseen.
_PROSE_EXCLUDED = {"license.rst.txt", "copyright.rst.txt"}
HELD_OUT_PERCENT = 5  # of files per domain, chosen by a stable hash of the path


@dataclass(frozen=True, kw_only=True)
class Corpus:
    """Texts per domain, each a list of whole files."""

    train_prose: list[str]
    train_code: list[str]
    eval_prose: list[str]
    eval_code: list[str]
    eval_shifted: list[str]


def fetch(work: Path) -> Path:
    """Download and unpack the Debian packages into ``work/root``; returns that root.

    Raises ``RuntimeError`` with the apt error when the archive cannot be reached.
    """
    root = work / "root"
    if (root / _DOC_SOURCES).is_dir() and (root / _STDLIB).is_dir() and (root / _LICENSES).is_dir():
        return root
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: the corpus comes from the Debian archive (run on Debian/Ubuntu)")
    debs = work / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            "could not download the corpus packages from the Debian archive "
            f"({', '.join(PACKAGES)}); is the package registry reachable? Try `apt-get update`.\n{done.stderr}"
        )
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def _held_out(path: Path) -> bool:
    return zlib.crc32(path.as_posix().encode()) % 100 < HELD_OUT_PERCENT


def _read(paths: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def build(root: Path) -> Corpus:
    """Split the unpacked packages into training and held-out texts."""
    sources = root / _DOC_SOURCES
    prose = sorted(p for p in sources.rglob("*.rst.txt") if p.name not in _PROSE_EXCLUDED)
    code = sorted(p for p in (root / _STDLIB).rglob("*.py") if p.is_file() and not p.is_symlink())
    # GPL → GPL-3 and friends are symlinks: keep each text once
    licenses = sorted({p.resolve(): p for p in (root / _LICENSES).iterdir() if p.is_file()}.values())
    if not prose or not code or not licenses:
        raise RuntimeError(f"unpacked corpus under {root} is incomplete: {len(prose)} prose, {len(code)} code files")
    rel = lambda p: p.relative_to(root)  # noqa: E731 - hash the archive path, not the machine's
    return Corpus(
        train_prose=_read([p for p in prose if not _held_out(rel(p))]),
        train_code=_read([p for p in code if not _held_out(rel(p))]),
        eval_prose=_read([p for p in prose if _held_out(rel(p))]),
        eval_code=_read([p for p in code if _held_out(rel(p))]),
        eval_shifted=_read(licenses),
    )


def excerpt(texts: list[str], n_chars: int) -> str:
    """About ``n_chars`` of text, taken as whole paragraphs from the start of each file in turn,
    so a small shipped sample still covers several files."""
    per_file = max(n_chars // max(len(texts), 1), 400)
    parts: list[str] = []
    total = 0
    for text in texts:
        piece = _cut_at_paragraph(text.strip(), per_file)
        if piece:
            parts.append(piece)
            total += len(piece)
        if total >= n_chars:
            break
    return "\n\n".join(parts)[:n_chars].rsplit("\n", 1)[0] + "\n"


def _cut_at_paragraph(text: str, n_chars: int) -> str:
    if len(text) <= n_chars:
        return text
    cut = text.rfind("\n\n", 0, n_chars)
    return text[: cut if cut > n_chars // 2 else n_chars]
