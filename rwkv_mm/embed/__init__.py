"""The embeddings face: sentence vectors from RWKV-7 blocks (`Embedder`), and a searchable `Index`.

Both are imported on first use: `rwkv-embed` re-indexing a folder where nothing changed never loads
torch (encoder.py) and `from rwkv_mm.embed import Embedder` never loads FAISS and SQLite (store.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .encoder import Embedder, EmbedderConfig
    from .store import Index

__all__ = ["Embedder", "EmbedderConfig", "Index"]


def __getattr__(name: str):
    if name in ("Embedder", "EmbedderConfig"):
        from . import encoder

        return getattr(encoder, name)
    if name == "Index":
        from .store import Index

        return Index
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
