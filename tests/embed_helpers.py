"""Test helpers for the embedding index: a small deterministic embedder, a corpus writer, brute-force search.

The embedders are importable by spec (``tests.embed_helpers:HashEmbedder``) so that the CLI can load them with
``--model`` in a subprocess; none of this imports torch.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
import zlib
from pathlib import Path

import numpy as np

BUCKETS = 1024
WORDS = (
    "river mountain cloud ember lantern quartz violet harbor meadow falcon copper glacier orchard thunder "
    "saffron marble willow compass beacon tundra lagoon cedar prism nectar basalt comet dune fjord geyser "
    "hollow ivory jasper kelp lichen mirage nebula oasis pebble quiver rapids sierra tidal umber vortex "
    "walnut yarrow zephyr anchor bramble cobalt delta estuary fern granite heron inlet juniper"
).split()


class HashEmbedder:
    """Hashed bag of words (crc32 of each lower-cased word into 1024 buckets) times a fixed random projection.

    Deterministic across processes; texts sharing words get similar vectors, so search results are meaningful.
    """

    pooling = "bag-of-words"

    def __init__(self, dim: int = 32, delay: float = 0.0) -> None:
        self.dim = dim
        self.model_id = f"test-hash-bow-{dim}"
        self.delay = delay  # seconds slept per encode call (to make a kill land mid-run)
        self.calls = 0
        self.encoded = 0
        self._proj = np.random.default_rng(1234).standard_normal((BUCKETS, dim)).astype(np.float32)

    def counts(self, text: str) -> np.ndarray:
        v = np.zeros(BUCKETS, np.float32)
        for word in text.lower().split():
            v[zlib.crc32(word.strip(".,;:!?#()[]\"'").encode()) % BUCKETS] += 1.0
        return v

    def encode(
        self,
        sentences: list[str],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        normalize_embeddings: bool = False,
        convert_to_numpy: bool = True,
    ) -> np.ndarray:
        self.calls += 1
        self.encoded += len(sentences)
        if self.delay:
            time.sleep(self.delay)
        out = (
            np.stack([self.counts(s) for s in sentences]) @ self._proj
            if sentences
            else np.zeros((0, self.dim))
        )
        out = out.astype(np.float32)
        if normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


def SlowHashEmbedder() -> HashEmbedder:  # noqa: N802 - a factory named like the class it returns
    """The same embedder (same model_id), sleeping $RWKV_EMBED_TEST_DELAY s (default 0.1) per encode call."""
    return HashEmbedder(delay=float(os.environ.get("RWKV_EMBED_TEST_DELAY", "0.1")))


class OtherEmbedder(HashEmbedder):
    """A different model (another id and size), for the mismatch errors."""

    def __init__(self) -> None:
        super().__init__(dim=16)
        self.model_id = "test-other-16"


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def write_corpus(folder: Path, n_files: int, seed: int = 0, paragraphs: int = 3) -> list[Path]:
    """Write ``n_files`` small Markdown / text files of random words (a few paragraphs each)."""
    rng = random.Random(seed)
    paths = []
    for i in range(n_files):
        sub = folder / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / (f"doc{i:04d}.md" if i % 2 else f"doc{i:04d}.txt")
        body = [f"# Document {i}"] + ["\n".join(sentence(rng) for _ in range(3)) for _ in range(paragraphs)]
        path.write_text("\n\n".join(body) + "\n")
        paths.append(path)
    return paths


def index_rows(index_path: Path) -> list[tuple]:
    """(id, path, chunk_no, start_line, end_line, text) of every chunk, read straight from meta.sqlite."""
    con = sqlite3.connect(index_path / "meta.sqlite")
    try:
        return con.execute(
            "SELECT id, path, chunk_no, start_line, end_line, text FROM chunks ORDER BY id"
        ).fetchall()
    finally:
        con.close()


def brute_force(emb: HashEmbedder, rows: list[tuple], query: str, k: int) -> list[tuple[int, float]]:
    """Exact cosine top-k over ``rows`` (from :func:`index_rows`) in numpy: [(id, score)], best first."""
    vecs = emb.encode([r[5] for r in rows], normalize_embeddings=True)
    q = emb.encode([query], normalize_embeddings=True)[0]
    scores = vecs @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return [(rows[i][0], float(scores[i])) for i in order]
