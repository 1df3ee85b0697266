"""Search tab: index a folder with `rwkv_mm.embed.Index` and query it.

One index per folder, kept under the app's index directory (`--index-dir`, default
$RWKV_MM_DEMO_INDEX_DIR or ~/.cache/rwkv_mm/demo-index) in a sub-folder named after a hash of the folder's
path and the embedder, so the demo never writes into the folder it searches. Paths are stored relative to
the folder (the index's root). Indexes are shared by all sessions (they
describe files on disk); building one is a queued event, one build at a time.
"""

from __future__ import annotations

import contextvars
import hashlib
import importlib.util
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["path", "lines", "score", "snippet"]
SNIPPET_CHARS = 240
T = TypeVar("T")


class UserInputError(ValueError):
    """Bad input from the page (shown to the user as a message, never a traceback)."""


def default_folder() -> Path:
    """The repository's docs/ when the demo runs from a checkout, else the current directory."""
    docs = REPO_ROOT / "docs"
    if docs.is_dir() and (REPO_ROOT / "pyproject.toml").is_file():
        return docs
    return Path.cwd()


def default_index_dir() -> Path:
    """$RWKV_MM_DEMO_INDEX_DIR, else $XDG_CACHE_HOME/rwkv_mm/demo-index (~/.cache when unset)."""
    if os.environ.get("RWKV_MM_DEMO_INDEX_DIR"):
        return Path(os.environ["RWKV_MM_DEMO_INDEX_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "rwkv_mm" / "demo-index"


def hit_row(hit: Any) -> list[Any]:
    """One table row [path, lines, score, snippet] of an `rwkv_mm.embed.store.Hit` (path relative to the
    indexed folder, the index's root)."""
    lines = f"{hit.start_line}-{hit.end_line}" if hit.end_line != hit.start_line else str(hit.start_line)
    text = re.sub(r"\s+", " ", hit.text).strip()
    if len(text) > SNIPPET_CHARS:
        text = text[: SNIPPET_CHARS - 1].rstrip() + "…"
    return [hit.path, lines, round(float(hit.score), 3), text]


def summary(stats: Any) -> str:
    """One line for an `UpdateStats`: files added / updated / removed / unchanged / skipped, chunks, time."""
    skipped = sum(stats.skipped.values())
    return (
        f"{stats.added} added, {stats.updated} updated, {stats.removed} removed, {stats.unchanged} unchanged"
        + (f", {skipped} skipped" if skipped else "")
        + f"; {stats.chunks_added} chunks added ({stats.chunks_embedded} embedded) in {stats.seconds:.1f} s"
    )


def embedder_problem() -> str | None:
    """Why the bundled embedder cannot be used here (None when it can)."""
    if importlib.util.find_spec("faiss") is None:  # looked up, not imported: the page stays quick
        return "faiss is not installed (install the embed extra: pip install -e '.[embed]')"
    from rwkv_mm import assets

    folder = assets.ROOT / "embedder"
    if not (folder / "model.safetensors").is_file():
        return f"the bundled embedder is not installed (no {folder / 'model.safetensors'})"
    return None


class SearchBackend:
    """One `rwkv_mm.embed.Index` per searched folder, opened for writing on first use and kept open.

    Args:
        index_dir: where the indexes live (one sub-folder per folder and embedder). Defaults to
            `default_index_dir()`.
        embedder: an embedder object (anything `Index` accepts: `encode`, `dim`, `model_id`, `pooling`);
            None loads the bundled default on first use. Defaults to None.
    """

    def __init__(self, index_dir: str | Path | None = None, embedder: Any = None) -> None:
        self.index_dir = Path(index_dir).expanduser() if index_dir else default_index_dir()
        self._embedder = embedder
        self._lock = threading.Lock()
        self._indexes: dict[Path, Any] = {}
        # an Index's SQLite connection belongs to the thread that opened it, and Gradio runs each event in
        # any of its worker threads: every index operation runs on this one thread instead
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search-index")

    def _on_worker(self, fn: Callable[..., T], *args: Any) -> T:
        # the caller's context goes along: gr.Progress finds its event through a context variable
        return self._worker.submit(contextvars.copy_context().run, fn, *args).result()

    def problem(self) -> str | None:
        """Why searching cannot work (None when it can)."""
        return None if self._embedder is not None else embedder_problem()

    def embedder(self) -> Any:
        problem = self.problem()
        if problem:
            raise UserInputError(f"embedder not available: {problem}")
        if self._embedder is None:
            from rwkv_mm.embed.store import load_embedder

            try:
                self._embedder = load_embedder(None)
            except Exception as e:
                logger.exception("could not load the bundled embedder")
                raise UserInputError(f"embedder not available: {type(e).__name__}: {e}") from None
        return self._embedder

    def warm_up(self) -> None:
        """Load the embedder now (the first search then only indexes); raises when it is not available."""
        problem = self.problem()
        if problem:
            raise RuntimeError(problem)
        self._on_worker(self.embedder)

    def location(self, folder: Path) -> Path:
        """The index folder for `folder` (named after the folder, its path and the embedder's model id, so
        that a new embedder starts a new index)."""
        key = f"{folder.resolve()}\n{self.embedder().model_id}"
        return self.index_dir / f"{folder.name or 'root'}-{hashlib.sha1(key.encode()).hexdigest()[:16]}"

    def folder(self, text: str) -> Path:
        """The folder named on the page, checked."""
        text = (text or "").strip()
        if not text:
            raise UserInputError("choose a folder to search")
        path = Path(text).expanduser().resolve()
        if not path.is_dir():
            raise UserInputError(f"no folder at {path}")
        return path

    def index(self, folder: Path) -> Any:
        """The (writable) index of `folder`, created empty when missing."""
        from rwkv_mm.embed.store import Index, StoreError

        with self._lock:
            if folder not in self._indexes:
                location = self.location(folder)
                try:
                    self._indexes[folder] = Index.open_or_create(
                        location, embedder=self.embedder(), root=folder
                    )
                except StoreError as e:
                    raise UserInputError(str(e)) from None
            return self._indexes[folder]

    def has_index(self, folder: Path) -> bool:
        """Whether `folder` was indexed before (by this process or an earlier run)."""
        if folder in self._indexes:
            return True
        from rwkv_mm.embed.store import CONFIG

        return (self.location(folder) / CONFIG).is_file()

    def update(self, folder: str, progress: Callable[[list], Iterable] | None = None) -> str:
        """Index the new and changed files of `folder` and drop deleted ones; returns a summary line.

        Args:
            folder: the folder, as typed on the page.
            progress: wraps the list of files to read (e.g. `tqdm`, `gr.Progress().tqdm`). Defaults to None.
        """
        path = self.folder(folder)
        return self._on_worker(self._update, path, progress)

    def _update(self, path: Path, progress: Callable[[list], Iterable] | None) -> str:
        index = self.index(path)
        try:
            stats = index.update(path, progress=progress)
        except Exception as e:
            logger.exception("indexing %s failed", path)
            raise UserInputError(f"indexing {path} failed: {type(e).__name__}: {e}") from None
        return f"Indexed `{path}`: {summary(stats)}."

    def search(
        self, folder: str, query: str, k: int = 5, progress: Callable[[list], Iterable] | None = None
    ) -> tuple[list[list[Any]], str | None]:
        """The top-`k` hits for `query` in `folder` as table rows, and the summary of the index build when
        the folder had none yet (it is built first), else None."""
        if not (query or "").strip():
            raise UserInputError("type a query first")
        path = self.folder(folder)
        return self._on_worker(self._search, path, query.strip(), int(k), progress)

    def _search(
        self, path: Path, query: str, k: int, progress: Callable[[list], Iterable] | None
    ) -> tuple[list[list[Any]], str | None]:
        built = None if self.has_index(path) else self._update(path, progress)
        try:
            hits = self.index(path).search(query, k=k)
        except Exception as e:
            logger.exception("search in %s failed", path)
            raise UserInputError(f"search failed: {type(e).__name__}: {e}") from None
        return [hit_row(h) for h in hits], built

    def close(self) -> None:
        """Close every index (releasing the writer locks) and stop the worker thread."""

        def close_all() -> None:
            with self._lock:
                for index in self._indexes.values():
                    index.close()
                self._indexes.clear()

        self._on_worker(close_all)
        self._worker.shutdown()


# event functions take this as a default: Gradio injects the tracker of the running event
PROGRESS = gr.Progress()


def build(backend: SearchBackend) -> SearchBackend:
    """Lay out the Search tab inside the current gr.Blocks / gr.Tab context."""
    problem = backend.problem()
    status = gr.Markdown(f"⚠️ embedder not available: {problem}" if problem else "", elem_id="search-status")
    with gr.Row():
        folder = gr.Textbox(value=str(default_folder()), label="Folder", scale=4, elem_id="search-folder")
        build_btn = gr.Button("Build / update index", scale=1, elem_id="search-build")
    with gr.Row():
        query = gr.Textbox(
            label="Query", placeholder="What are you looking for?", scale=4, elem_id="search-q"
        )
        k = gr.Slider(1, 20, value=5, step=1, label="Results", scale=1)
        search_btn = gr.Button("Search", variant="primary", scale=1, elem_id="search-btn")
    table = gr.Dataframe(
        headers=COLUMNS,
        datatype=["str", "str", "number", "str"],
        wrap=True,
        interactive=False,
        elem_id="search-results",
    )

    def tracker(progress: gr.Progress) -> Callable[[list], Iterable]:
        return lambda files: progress.tqdm(files, desc="indexing", unit="files")

    def run_update(path, progress=PROGRESS):
        progress(0, desc="loading the embedder")
        try:
            return backend.update(path, tracker(progress))
        except UserInputError as e:
            raise gr.Error(str(e), print_exception=False) from None

    def run_search(path, text, n, progress=PROGRESS):
        try:
            rows, built = backend.search(path, text, int(n), tracker(progress))
        except UserInputError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return rows, built if built is not None else gr.skip()

    queue = dict(concurrency_id="search", concurrency_limit=1)
    build_btn.click(run_update, [folder], [status], api_name="search_index", **queue)
    search_btn.click(run_search, [folder, query, k], [table, status], api_name="search", **queue)
    query.submit(run_search, [folder, query, k], [table, status], api_visibility="private", **queue)
    return backend
