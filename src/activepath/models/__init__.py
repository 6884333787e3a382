"""Models shipped inside the package, loadable by name without network access."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent
EMBEDDED: dict[str, Path] = {"tiny": _HERE / "tiny"}


def embedded_path(name: str) -> Path | None:
    """The directory of the embedded model called ``name``, or None if no such name."""
    path = EMBEDDED.get(name)
    if path is not None and not (path / "config.json").is_file():
        raise ValueError(f"embedded model {name!r} is not installed at {path}")
    return path
