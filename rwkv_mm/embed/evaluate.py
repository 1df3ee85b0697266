"""Embedding evaluations: STS-B Spearman and held-out WordNet example -> definition retrieval.

- STS-B (specs/embed.md §5): tab-separated genre, file, year, id, score, sentence1, sentence2 (+ licence
  columns on some lines: only the first 7 are read). Metric: Spearman's rho of cos(s1, s2) vs the score.
- WordNet retrieval: ``heldout.tsv`` of `rwkv_mm.embed.corpus` (synsets never trained on). Rows 0..999
  are the "dev" group (model selection), rows 1000..1999 the "test" group; each group is a 1000-way task:
  the query is a synset's example, the candidates are the 1000 definitions, R@1 / R@10 / MRR.

`embed` arguments are callables ``texts -> float32 [n, D]`` (any model: Embedder.encode, MiniLM).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["read_heldout", "read_stsb", "retrieval", "spearman", "stsb", "wordnet_retrieval"]

EmbedFn = Callable[[Sequence[str]], np.ndarray]


def read_stsb(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """(sentences1, sentences2, scores float64 [n]) of one STS-B csv file."""
    a, b, scores = [], [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 7:
                continue
            scores.append(float(cols[4]))
            a.append(cols[5])
            b.append(cols[6])
    return a, b, np.asarray(scores)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), 1-based."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (Pearson correlation of average ranks)."""
    rx, ry = _ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / np.sqrt((rx * rx).sum() * (ry * ry).sum()))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def stsb(embed: EmbedFn, path: str | Path) -> float:
    """STS-B Spearman of the cosine similarity on one split file."""
    a, b, scores = read_stsb(path)
    ea, eb = _unit(embed(a)), _unit(embed(b))
    return spearman((ea * eb).sum(-1), scores)


def read_heldout(path: str | Path) -> list[tuple[str, str, str, str]]:
    """Rows (synset, lemma, definition, example) of heldout.tsv."""
    with open(path, encoding="utf-8") as f:
        return [tuple(line.rstrip("\n").split("\t")) for line in f if line.strip()]


def retrieval(queries: np.ndarray, candidates: np.ndarray) -> dict[str, float]:
    """Query i's right answer is candidate i: R@1, R@10 and MRR of cosine ranking."""
    sims = _unit(queries) @ _unit(candidates).T
    right = np.diag(sims)[:, None]
    rank = (sims > right).sum(1) + 1  # ties in favour of the right answer
    return {
        "R@1": float((rank == 1).mean()),
        "R@10": float((rank <= 10).mean()),
        "MRR": float((1 / rank).mean()),
    }


def wordnet_retrieval(
    embed: EmbedFn, heldout: str | Path, group: str = "test", size: int = 1000
) -> dict[str, float]:
    """Example -> definition retrieval over `size` held-out synsets ("dev": rows 0..size-1, "test": the
    next `size`)."""
    rows = read_heldout(heldout)
    start = 0 if group == "dev" else size
    rows = rows[start : start + size]
    if len(rows) < size:
        raise ValueError(f"{heldout} has {len(rows)} rows for the {group} group, expected {size}")
    examples = [r[3] for r in rows]
    definitions = [r[2] for r in rows]
    return retrieval(embed(examples), embed(definitions))
