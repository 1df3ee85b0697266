"""Files shipped with the package: tokenizer vocabularies and the bundled default models.

Each folder holds a PROVENANCE.md naming its sources and licences.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ROOT", "names", "path"]

ROOT = Path(__file__).resolve().parent


def names() -> list[str]:
    """The bundled asset folders, sorted."""
    return sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def path(name: str) -> Path:
    """The folder of the bundled asset ``name`` (e.g. "tokenizers").

    Raises:
        FileNotFoundError: no such asset; the message lists the ones that exist.
    """
    folder = ROOT / name
    if not folder.is_dir():
        raise FileNotFoundError(f"no bundled asset named {name!r}; available: {', '.join(names())}")
    return folder
