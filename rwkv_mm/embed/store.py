"""Index: FAISS vectors + SQLite metadata for semantic search over folders, incremental and crash-safe.

An index folder (``.rwkv-embed/`` by default) holds::

    config.json     embedder (model_id, dim, pooling, how to load it), chunker settings, index kind, root
    meta.sqlite     files(path, mtime_ns, size, sha256, n_chunks, status), chunks(id = FAISS id, path,
                    chunk_no, start_line, end_line, text, text_sha256, vector), folders, meta
    vectors.faiss   IndexIDMap2(IndexFlatIP) over L2-normalised vectors, or an IndexIVFFlat (inner product)
                    above ``ivf_threshold`` vectors or on request; after a shard merge its inverted lists live
                    in ``vectors.<generation>.ivfdata`` (FAISS on-disk lists)
    ivf.trained     the trained, empty IVF index (IVF indexes only), reused when the lists are rebuilt
    lock            held (flock) by the one process allowed to write

Consistency model. SQLite (WAL mode) is the source of truth: it holds every chunk with its normalised float32
vector, and each group of files is committed in one transaction, so a killed run loses at most the group in
flight and never half a file. ``vectors.faiss`` is derived from it: at the end of a run (and after a crash, at
the end of the next one) the writer loads it, removes the ids SQLite no longer has, adds the ones it lacks,
writes it to a temporary name and renames it over the old file. Readers never take the lock: they read the
last renamed FAISS file, drop hits whose chunk SQLite no longer has, and scan the vectors committed since that
file was written (ids above the ``synced_id`` watermark) by brute force, so a search during a run is correct
and already sees the files committed so far. Chunk ids only grow; a shard ``I`` of ``N`` allocates ids
``I, I+N, I+2N, ...`` so that shards merge without renumbering.

Paths are stored relative to the index's root (the folder holding ``.rwkv-embed/``; for a shard, its parent
index's root) when they lie under it, absolute otherwise, so one index can hold several folders and can move
with its project.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import math
import os
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rwkv_mm.embed.ingest import ChunkConfig, SkipFile, chunk_lines, read_bytes, read_file, walk

__all__ = ["Hit", "Index", "UpdateStats", "merge_shards"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CONFIG, META, VECTORS, TRAINED, LOCK = "config.json", "meta.sqlite", "vectors.faiss", "ivf.trained", "lock"
IVF_THRESHOLD = 200_000  # vectors above which an "auto" index switches from exact Flat to IVF
SKIP_REMEMBERED = frozenset({"binary", "invalid UTF-8", "too large"})  # depend on the content only
_SQL_VARS = 900  # stay under SQLite's bound-parameter limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS folders(path TEXT PRIMARY KEY, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS files(path TEXT PRIMARY KEY, mtime_ns INTEGER NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT, n_chunks INTEGER NOT NULL, status TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks(id INTEGER PRIMARY KEY, path TEXT NOT NULL, chunk_no INTEGER NOT NULL,
    start_line INTEGER NOT NULL, end_line INTEGER NOT NULL, text TEXT NOT NULL, text_sha256 TEXT NOT NULL,
    vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_path ON chunks(path);
CREATE INDEX IF NOT EXISTS chunks_text ON chunks(text_sha256);
"""


class StoreError(Exception):
    """Base class of the index errors; the message is one line meant for users."""


class IndexNotFoundError(StoreError, FileNotFoundError):
    """No index at the given folder."""


class IndexLockedError(StoreError):
    """Another process is writing to the index."""


class EmbedderMismatchError(StoreError, ValueError):
    """The embedder differs from the one the index was built with."""


class ChunkerMismatchError(StoreError, ValueError):
    """A chunker was given for an index that was built with another one."""


class EmbedderLike(Protocol):
    """What the index needs from an embedder (``rwkv_mm.embed.Embedder`` and the tests' fake both fit)."""

    dim: int
    model_id: str
    pooling: str

    def encode(
        self,
        sentences: list[str],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        normalize_embeddings: bool = False,
        convert_to_numpy: bool = True,
    ) -> np.ndarray: ...


@dataclass
class Hit:
    """One search result: a chunk of ``path`` (relative to the index root, or absolute) and its cosine."""

    path: str
    start_line: int
    end_line: int
    score: float
    text: str
    id: int


@dataclass
class UpdateStats:
    """What one :meth:`Index.update` did; files are counted once each."""

    added: int = 0  # files new to the index
    updated: int = 0  # files whose content changed
    removed: int = 0  # files gone from the folder (or now excluded)
    unchanged: int = 0
    skipped: Counter = field(
        default_factory=Counter
    )  # reason -> files (binary, invalid UTF-8, unreadable, ...)
    chunks_added: int = 0
    chunks_removed: int = 0
    chunks_embedded: int = 0  # encoded by the embedder
    chunks_reused: int = 0  # same text already in the index: vector copied, not re-encoded
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped"] = dict(self.skipped)
        return d


# ---------------------------------------------------------------------------------------------------------
# helpers


def load_embedder(spec: str | None = None) -> EmbedderLike:
    """Load an embedder from a spec: None (the bundled default), a model folder, or ``module:attribute``.

    ``module:attribute`` names a class or a factory called with no arguments (or an embedder object); it lets
    any object with ``encode``, ``dim``, ``model_id`` and ``pooling`` back an index.
    """
    if spec and not os.path.exists(spec) and ":" in spec and not spec.startswith(":"):
        module, _, attr = spec.partition(":")
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj() if callable(obj) else obj
    from rwkv_mm.embed.encoder import Embedder  # torch is imported here, only when encoding is needed

    return Embedder.load(spec)


def _spec(embedder: Any) -> str | None:
    """How config.json records an embedder source: a spec string (folders made absolute), else None."""
    if not isinstance(embedder, str):
        return None
    return str(Path(embedder).resolve()) if os.path.exists(embedder) else embedder


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_name)`` then rename over ``path``, so readers see the old or the new file."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


@contextlib.contextmanager
def _quiet_faiss() -> Iterator[None]:
    """Silence FAISS's C++ notes on stdout (on-disk list resizing, renaming): stdout is for results."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real stdout (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _faiss_ids(index) -> np.ndarray:
    """All ids stored in an IDMap2 or IVF index, as int64."""
    import faiss

    if isinstance(index, faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    parts = [np.zeros(0, np.int64)]
    for lst in range(ivf.nlist):
        n = invlists.list_size(lst)
        if n:
            parts.append(faiss.rev_swig_ptr(invlists.get_ids(lst), n).astype(np.int64))
    return np.concatenate(parts)


def _read_index(path: Path, mmap: bool = False):
    """Read a FAISS file, or None when missing. A flat index can be memory-mapped; IVF lists written by a
    shard merge are found beside the file (``IO_FLAG_ONDISK_SAME_DIR``) and are mmapped by FAISS anyway."""
    import faiss

    try:
        with open(path, "rb") as f:
            fourcc = f.read(4)
    except FileNotFoundError:
        return None
    if fourcc == b"IxM2":
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        return faiss.read_index(str(path), flags)
    with _quiet_faiss():
        return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)


def _auto_nlist(n: int) -> int:
    # FAISS's guideline is 4·sqrt(N) to 16·sqrt(N) cells, and k-means wants ~39 training points per cell
    return max(1, min(int(4 * math.sqrt(max(n, 1))), n // 39))


def _train_ivf(sample: np.ndarray, nlist: int):
    import faiss

    index = faiss.index_factory(sample.shape[1], f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(sample)
    return index


def _shard_of(key: str, count: int) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % count


class _WriterLock:
    """An exclusive, non-blocking flock on ``<index>/lock`` (released by the kernel if the process dies)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "a+")  # held for the index's lifetime
        try:
            _lock_file(self.file)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise IndexLockedError(
                f"Index {path.parent} is being updated by another process (pid {holder}); "
                "wait for it to finish"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            self.file.close()


def _lock_file(f) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _connect(path: Path, read_only: bool) -> sqlite3.Connection:
    if read_only:
        # readers may be shared by threads (a web demo); Index serialises their use with a lock
        con = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        con = sqlite3.connect(str(path), isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(
            "PRAGMA synchronous=NORMAL"
        )  # a kill -9 loses nothing committed; power loss may lose the last
    con.execute("PRAGMA busy_timeout=10000")
    return con


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _rows_by_ids(con: sqlite3.Connection, columns: str, ids: Sequence[int]) -> list[tuple]:
    rows: list[tuple] = []
    ids = [int(i) for i in ids]
    for start in range(0, len(ids), _SQL_VARS):
        part = ids[start : start + _SQL_VARS]
        marks = ",".join("?" * len(part))
        rows += con.execute(f"SELECT {columns} FROM chunks WHERE id IN ({marks})", part).fetchall()
    return rows


@dataclass
class _FileWork:
    """One file read during an update, waiting to be committed."""

    key: str
    stat: os.stat_result
    sha: str | None
    status: str  # "ok" or a remembered skip reason
    chunks: list  # the new chunks (used when ``replace``)
    new: bool  # not in the index before
    replace: bool  # drop the file's chunks and insert ``chunks``; False: only refresh mtime and size


# ---------------------------------------------------------------------------------------------------------
# the index


class Index:
    """A folder-backed semantic index: FAISS vectors + SQLite metadata (see the module docstring).

    Use :meth:`open` to search (read-only, no lock, works while another process indexes) and
    :meth:`open_or_create` to index (takes the writer lock until :meth:`close`).

    Example:
        >>> idx = Index.open_or_create(".rwkv-embed", embedder=emb)
        >>> idx.update("docs/")
        >>> idx.search("how do I resume a chat", k=5)[0].path
    """

    def __init__(self, path: Path, config: dict, read_only: bool, embedder: Any, lock: _WriterLock | None):
        self.path = path
        self.config = config
        self.read_only = read_only
        self.root = (
            (path / config["root"]).resolve() if not os.path.isabs(config["root"]) else Path(config["root"])
        )
        self.chunker = ChunkConfig(**config["chunker"])
        self._embedder_source = embedder  # an embedder, a spec string, a zero-argument factory or None
        self._embedder: EmbedderLike | None = None
        self._lock = lock
        self._con = _connect(path / META, read_only)
        self._search_cache: tuple[tuple, Any] | None = None
        self._mutex = threading.RLock()

    # --- opening

    @classmethod
    def open(cls, path: str | os.PathLike, embedder: EmbedderLike | str | Callable | None = None) -> Index:
        """Open an existing index read-only (for searching; no lock, so an index run may be going on).

        Args:
            path (path): the index folder.
            embedder (embedder, str or callable, optional): the embedder for queries, a spec for
                :func:`load_embedder`, or a zero-argument factory; loaded on the first text query. Defaults to
                None: the model recorded in config.json.

        Raises:
            IndexNotFoundError: ``path`` holds no index.
        """
        path = Path(path)
        return cls(path, cls._read_config(path), True, embedder, None)

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike,
        embedder: EmbedderLike | str | Callable | None = None,
        *,
        kind: str = "auto",
        shard: tuple[int, int] | None = None,
        root: str | os.PathLike | None = None,
        chunker: ChunkConfig | None = None,
        nlist: int | None = None,
        nprobe: int | None = None,
    ) -> Index:
        """Open an index for writing, creating it when missing; holds the writer lock until :meth:`close`.

        Args:
            path (path): the index folder (created with its parents when missing).
            embedder (embedder, str or callable, optional): as for :meth:`open`; a new index loads it at
                once (its ``model_id``, ``dim`` and ``pooling`` go to config.json), an existing one only when
                a file needs encoding, and refuses a different embedder with :class:`EmbedderMismatchError`.
                A string spec is recorded so that later runs load the same model. Defaults to None (the
                recorded model, or the bundled default for a new index).
            kind (str, optional): "auto" (exact Flat, IVF above 200k vectors), "flat" or "ivf".
                Defaults to "auto".
            shard (tuple of int, optional): ``(I, N)``: this index holds shard I of N of the files (a stable
                hash of each path picks its shard) and allocates ids ``I + N·k``. Defaults to None.
            root (path, optional): the folder paths are stored relative to; new indexes only. Defaults to None
                (the index folder's parent).
            chunker (ChunkConfig, optional): chunk size and overlap of a new index; an existing index
                built with another one raises :class:`ChunkerMismatchError`. Defaults to None (a new index:
                ``ChunkConfig()``, with the embedder's ``chunk_chars`` as the size where it has one).
            nlist (int, optional): IVF cells. Defaults to None (4·sqrt(N)).
            nprobe (int, optional): IVF cells visited per query. Defaults to None (max(16, nlist/32)).

        Raises:
            IndexLockedError: another process is writing to this index.
            EmbedderMismatchError: the embedder (loaded now for a new index) differs from the recorded one.
            ChunkerMismatchError: `chunker` differs from the recorded one.
        """
        if kind not in ("auto", "flat", "ivf"):
            raise ValueError(f"kind must be one of 'auto', 'flat', 'ivf', got {kind!r}")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lock = _WriterLock(path / LOCK)
        try:
            if (path / CONFIG).exists():
                index = cls._reopen(path, embedder, lock, kind, shard, chunker, nlist, nprobe)
            else:
                index = cls._create(path, embedder, lock, kind, shard, root, chunker, nlist, nprobe)
        except BaseException:
            lock.release()
            raise
        if index._meta("dirty", "0") == "1":
            log.info("index %s: finishing an interrupted run", path)
        return index

    @classmethod
    def _reopen(cls, path, embedder, lock, kind, shard, chunker, nlist, nprobe) -> Index:
        config = cls._read_config(path)
        if config.get("shard") != (list(shard) if shard else None):
            raise StoreError(
                f"Index {path} holds shard {config.get('shard')}, not {list(shard) if shard else None}"
            )
        if chunker is not None and chunker != ChunkConfig(**config["chunker"]):
            raise ChunkerMismatchError(
                f"Index {path} cuts files into chunks of {config['chunker']['max_chars']} characters; a "
                "chunk size applies to a new index only (delete the index folder to rebuild it)"
            )
        before = json.dumps(config)
        settings = config["index"]
        if kind != "auto":
            settings["requested"] = kind
        settings.update({k: v for k, v in (("nlist", nlist), ("nprobe", nprobe)) if v is not None})
        index = cls(path, config, False, embedder, lock)
        spec = _spec(embedder)
        if embedder is not None and (spec is None or spec != config["embedder"]["model"]):
            try:
                _ = index.embedder  # another source than the recorded one: check it now, before any work
            except BaseException:
                index._con.close()
                raise
            config["embedder"]["model"] = spec or config["embedder"]["model"]
        if json.dumps(config) != before:
            _write_json(path / CONFIG, config)
            with _transaction(index._con):
                index._set_meta(index._con, dirty=1)  # the next sync applies a new index kind
        return index

    @classmethod
    def _create(cls, path, embedder, lock, kind, shard, root, chunker, nlist, nprobe) -> Index:
        emb = cls._resolve_embedder(embedder)
        root = Path(root).resolve() if root is not None else path.resolve().parent
        spec = _spec(embedder)
        import faiss

        config = {
            "schema_version": SCHEMA_VERSION,
            "embedder": {
                "model_id": emb.model_id,
                "dim": int(emb.dim),
                "pooling": emb.pooling,
                "model": spec,
            },
            "normalize": True,
            "chunker": asdict(chunker or ChunkConfig(getattr(emb, "chunk_chars", ChunkConfig.max_chars))),
            "index": {
                "kind": "flat",
                "requested": kind,
                "ivf_threshold": IVF_THRESHOLD,
                "nlist": nlist,
                "nprobe": nprobe,
            },
            "root": os.path.relpath(root, path.resolve()),
            "shard": list(shard) if shard else None,
            "faiss_version": faiss.__version__,
            "created": time.time(),
        }
        con = _connect(path / META, read_only=False)
        con.executescript(_SCHEMA)
        start, step = (shard[0], shard[1]) if shard else (0, 1)
        with _transaction(con):
            for key, value in (("next_id", start), ("id_step", step), ("synced_id", -1), ("dirty", 0)):
                con.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, str(value)))
        con.close()
        _write_json(path / CONFIG, config)  # written last: an index exists once its config does
        index = cls(path, config, False, emb, lock)
        index._embedder = emb
        return index

    @staticmethod
    def _read_config(path: Path) -> dict:
        try:
            config = json.loads((path / CONFIG).read_text())
        except FileNotFoundError:
            raise IndexNotFoundError(f"No index at {path}") from None
        except (OSError, ValueError) as e:
            raise StoreError(f"Cannot read {path / CONFIG}: {e}") from None
        if config.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"Index {path} has schema version {config.get('schema_version')}, this rwkv_mm reads "
                f"{SCHEMA_VERSION}; re-create it"
            )
        return config

    def close(self) -> None:
        """Close the database and release the writer lock (if held)."""
        self._con.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- embedder

    @staticmethod
    def _resolve_embedder(source: Any) -> EmbedderLike:
        if source is None or isinstance(source, str):
            return load_embedder(source)
        if hasattr(source, "encode") and not isinstance(source, type):
            return source
        return source()  # a class or a factory

    @property
    def embedder(self) -> EmbedderLike:
        """The embedder, loaded on first use and checked against config.json."""
        if self._embedder is None:
            source = self._embedder_source
            if source is None:
                source = self.config["embedder"]["model"]
            emb = self._resolve_embedder(source)
            want = self.config["embedder"]
            got = {"model_id": emb.model_id, "dim": int(emb.dim), "pooling": emb.pooling}
            if any(want[k] != v for k, v in got.items()):
                raise EmbedderMismatchError(
                    f"Index {self.path} was built with embedder {want['model_id']!r} (dim {want['dim']}, "
                    f"pooling {want['pooling']}), not {got['model_id']!r} (dim {got['dim']}, "
                    f"pooling {got['pooling']}); "
                    "use the same --model or another --index"
                )
            self._embedder = emb
        return self._embedder

    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        emb = self.embedder
        vecs = emb.encode(
            texts,
            batch_size=batch_size,
            show_progress_bar=False,
            normalize_embeddings=True,
            convert_to_numpy=True,
        )
        vecs = np.asarray(vecs)
        if vecs.shape != (len(texts), self.dim):
            raise ValueError(f"embedder returned shape {vecs.shape}, expected ({len(texts)}, {self.dim})")
        return _normalise(vecs)

    @property
    def dim(self) -> int:
        return int(self.config["embedder"]["dim"])

    # --- paths

    def key(self, path: str | os.PathLike) -> str:
        """The stored form of a path: relative to the root (POSIX separators) when under it, else absolute."""
        p = os.path.abspath(path)
        root = str(self.root)
        if p.startswith(root + os.sep):
            return p[len(root) + 1 :].replace(os.sep, "/")
        return "." if p == root else Path(p).as_posix()

    def resolve(self, key: str) -> Path:
        """The absolute path of a stored path."""
        return self.root / key if not os.path.isabs(key) else Path(key)

    @staticmethod
    def _under(prefix: str) -> tuple[str, tuple]:
        """SQL condition and arguments selecting the paths at or below ``prefix``."""
        if prefix == ".":
            return "path NOT LIKE '/%'", ()  # everything under the root
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return "(path = ? OR path LIKE ? ESCAPE '\\')", (prefix, escaped.rstrip("/") + "/%")

    # --- meta table

    def _meta(self, key: str, default: str | None = None) -> str | None:
        row = self._con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    @staticmethod
    def _set_meta(con: sqlite3.Connection, **values: Any) -> None:
        con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in values.items()])

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"Index {self.path} was opened read-only; use Index.open_or_create to change it")

    # --- updating

    def update(
        self,
        folder: str | os.PathLike,
        *,
        exclude: Sequence[str] = (),
        gitignore: bool = True,
        batch_size: int = 32,
        progress: Callable[[list], Iterable] | None = None,
    ) -> UpdateStats:
        """Bring the index up to date with ``folder``: add new files, re-embed changed ones, drop gone ones.

        Files whose (mtime, size) match the index are not read; files whose content hash matches are not
        re-chunked; chunks whose text is already in the index reuse its vector. Each group of about
        ``4 * batch_size`` chunks is committed in one transaction, so an interrupted run keeps what it
        finished.

        Args:
            folder (path): the folder (or single file) to index.
            exclude (sequence of str, optional): globs to leave out (see :func:`ingest.walk`). Defaults to ().
            gitignore (bool, optional): honour .gitignore files. Defaults to True.
            batch_size (int, optional): the embedder's batch size. Defaults to 32.
            progress (callable, optional): wraps the list of files to read, e.g. ``tqdm``. Defaults to None.

        Returns:
            UpdateStats: the files added / updated / removed / unchanged / skipped, chunks and seconds.

        Raises:
            FileNotFoundError: ``folder`` does not exist.
        """
        self._check_writable()
        start = time.perf_counter()
        folder = Path(folder).resolve()
        if not folder.exists():
            raise FileNotFoundError(f"No such folder: {folder}")
        stats = UpdateStats()
        prefix = self.key(folder)
        where, args = self._under(prefix)
        known = {
            row[0]: row[1:]
            for row in self._con.execute(
                f"SELECT path, mtime_ns, size, sha256, status FROM files WHERE {where}", args
            )
        }
        shard = self.config.get("shard")
        seen: set[str] = set()
        todo: list[tuple[Path, str, os.stat_result, tuple | None]] = []
        skip = [self.path, self.path.parent.parent] if shard else [self.path]  # never index the index
        for path in walk(folder, exclude=exclude, gitignore=gitignore, skip=skip):
            key = self.key(path)
            if shard and _shard_of(key, shard[1]) != shard[0]:
                continue
            try:
                st = path.stat()
            except OSError as e:
                log.warning("skipping %s: unreadable (%s)", path, e.strerror or e)
                stats.skipped["unreadable"] += 1
                continue
            seen.add(key)
            old = known.get(key)
            if old is not None and old[0] == st.st_mtime_ns and old[1] == st.st_size:
                if old[3] == "ok":
                    stats.unchanged += 1
                else:
                    stats.skipped[old[3]] += 1
                continue
            todo.append((path, key, st, old))

        pending: list[_FileWork] = []
        pending_chunks = 0
        for path, key, st, old in progress(todo) if progress else todo:
            sha = None
            try:
                data = read_bytes(path)
                sha = hashlib.sha256(data).hexdigest()
                if old is not None and old[2] == sha:
                    # touched, not changed: record the new mtime, keep the chunks
                    pending.append(_FileWork(key, st, sha, old[3], [], False, False))
                    if old[3] == "ok":
                        stats.unchanged += 1
                    else:
                        stats.skipped[old[3]] += 1
                    continue
                chunks = chunk_lines(read_file(path, data), self.chunker)
            except SkipFile as e:
                log.warning("skipping %s: %s", path, e)
                stats.skipped[e.reason] += 1
                if e.reason in SKIP_REMEMBERED:
                    pending.append(_FileWork(key, st, sha, e.reason, [], False, True))
                elif old is not None:
                    stats.chunks_removed += self._delete_files([key])
                continue
            new = old is None or old[3] != "ok"  # a file skipped before and readable now is new to searches
            pending.append(_FileWork(key, st, sha, "ok", chunks, new, True))
            pending_chunks += len(chunks)
            if pending_chunks >= 4 * batch_size:
                self._commit(pending, batch_size, stats)
                pending, pending_chunks = [], 0
        self._commit(pending, batch_size, stats)
        # removed last, so that a moved file finds its vectors under the old path
        gone = [key for key in known if key not in seen]
        if gone:
            stats.removed = len(gone)
            stats.chunks_removed += self._delete_files(gone)

        with _transaction(self._con):
            self._con.execute("INSERT OR REPLACE INTO folders VALUES (?, ?)", (prefix, time.time()))
        self._sync()
        stats.seconds = time.perf_counter() - start
        return stats

    def _commit(self, pending: list[_FileWork], batch_size: int, stats: UpdateStats) -> None:
        """Embed a group of files and replace their rows in one transaction."""
        if not pending:
            return
        texts = [c.text for w in pending for c in w.chunks]
        hashes = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
        vectors: dict[str, bytes] = {}
        unique = list(dict.fromkeys(hashes))
        for start in range(0, len(unique), _SQL_VARS):
            part = unique[start : start + _SQL_VARS]
            marks = ",".join("?" * len(part))
            query = (
                f"SELECT text_sha256, vector FROM chunks WHERE text_sha256 IN ({marks}) GROUP BY text_sha256"
            )
            vectors.update(self._con.execute(query, part).fetchall())
        todo = {h: t for h, t in zip(hashes, texts) if h not in vectors}
        if todo:
            encoded = self._encode(list(todo.values()), batch_size)
            vectors.update((h, v.tobytes()) for h, v in zip(todo, encoded))
        stats.chunks_embedded += len(todo)
        stats.chunks_reused += len(texts) - len(todo)

        con = self._con
        hashes_iter = iter(hashes)
        with _transaction(con):
            next_id, step = int(self._meta("next_id")), int(self._meta("id_step"))
            for w in pending:
                if w.replace:
                    stats.chunks_removed += con.execute(
                        "DELETE FROM chunks WHERE path = ?", (w.key,)
                    ).rowcount
                    rows = []
                    for no, chunk in enumerate(w.chunks):
                        h = next(hashes_iter)
                        rows.append(
                            (next_id, w.key, no, chunk.start_line, chunk.end_line, chunk.text, h, vectors[h])
                        )
                        next_id += step
                    con.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                    stats.chunks_added += len(rows)
                    if w.status == "ok":
                        stats.added += w.new
                        stats.updated += not w.new
                con.execute(
                    "INSERT OR REPLACE INTO files VALUES "
                    "(?, ?, ?, ?, (SELECT count(*) FROM chunks WHERE path = ?), ?)",
                    (w.key, w.stat.st_mtime_ns, w.stat.st_size, w.sha, w.key, w.status),
                )
            self._set_meta(con, next_id=next_id, dirty=1)

    def _delete_files(self, keys: Sequence[str]) -> int:
        """Remove files and their chunks in one transaction; returns the number of chunks removed."""
        removed = 0
        with _transaction(self._con):
            for key in keys:
                removed += self._con.execute("DELETE FROM chunks WHERE path = ?", (key,)).rowcount
                self._con.execute("DELETE FROM files WHERE path = ?", (key,))
            self._set_meta(self._con, dirty=1)
        return removed

    def remove(self, paths: Iterable[str | os.PathLike]) -> int:
        """Remove files, or every file under folders, from the index; returns the number of files removed."""
        self._check_writable()
        keys: list[str] = []
        for p in paths:
            prefix = self.key(Path(p).resolve())
            where, args = self._under(prefix)
            keys += [r[0] for r in self._con.execute(f"SELECT path FROM files WHERE {where}", args)]
            with _transaction(self._con):
                self._con.execute(f"DELETE FROM folders WHERE {where}", args)
        if keys:
            self._delete_files(keys)
        self._sync()
        return len(keys)

    # --- the FAISS file

    def _vectors_for(self, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) batches for the given chunk ids."""
        if len(ids) > 50_000:  # many: one sequential scan beats lookups by id
            for got, vecs in self._delta(-(2**62)):
                keep = np.isin(got, ids)
                if keep.any():
                    yield got[keep], vecs[keep]
            return
        for start in range(0, len(ids), 8192):
            rows = _rows_by_ids(self._con, "id, vector", ids[start : start + 8192])
            if rows:
                got = np.array([r[0] for r in rows], dtype=np.int64)
                vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(
                    len(rows), self.dim
                )
                yield got, vecs

    def _empty_index(self, kind: str, n: int):
        """A new empty index: Flat, or IVF from ivf.trained (trained now on a sample when missing)."""
        import faiss

        if kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        cfg = self.config["index"]
        trained = self.path / TRAINED
        if trained.exists():
            return faiss.read_index(str(trained))
        nlist = cfg["nlist"] or _auto_nlist(n)
        ids = np.array([r[0] for r in self._con.execute("SELECT id FROM chunks")], dtype=np.int64)
        rng = np.random.default_rng(0)
        sample_ids = rng.choice(ids, size=min(len(ids), 256 * nlist), replace=False) if len(ids) else ids
        sample = np.concatenate(
            [v for _, v in self._vectors_for(np.sort(sample_ids))] or [np.zeros((0, self.dim), np.float32)]
        )
        nlist = max(1, min(nlist, len(sample)))
        log.info("index %s: training IVF%d on %d vectors", self.path, nlist, len(sample))
        index = _train_ivf(sample, nlist)
        _atomic_write(trained, lambda tmp: faiss.write_index(index, tmp))
        cfg["nlist"] = nlist
        return index

    def _sync(self) -> None:
        """Make vectors.faiss hold exactly the chunks in SQLite (see the module docstring)."""
        if self._meta("dirty") != "1" and (self.path / VECTORS).exists():
            return
        import faiss

        con = self._con
        before = json.dumps(self.config)
        sql_ids = np.array([r[0] for r in con.execute("SELECT id FROM chunks ORDER BY id")], dtype=np.int64)
        cfg = self.config["index"]
        want = cfg["requested"]
        if want == "auto":
            want = "ivf" if cfg["kind"] == "ivf" or len(sql_ids) > cfg["ivf_threshold"] else "flat"
        if want == "ivf" and cfg["kind"] != "ivf" and not len(sql_ids):
            want = "flat"  # IVF needs vectors to train on: switch with the first ones
        index = _read_index(self.path / VECTORS) if want == cfg["kind"] else None
        if index is not None and want == "ivf":
            invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
            if not isinstance(invlists, faiss.ArrayInvertedLists):
                index = None  # on-disk lists of a shard merge: rebuilt in memory rather than changed in place
        if index is None:
            if want == "ivf" and cfg["kind"] != "ivf":
                (self.path / TRAINED).unlink(missing_ok=True)
            index = self._empty_index(want, len(sql_ids))
            faiss_ids = np.zeros(0, np.int64)
        else:
            faiss_ids = _faiss_ids(index)
        orphans = np.setdiff1d(faiss_ids, sql_ids)
        missing = np.setdiff1d(sql_ids, faiss_ids)
        if len(orphans):
            index.remove_ids(orphans)
        for ids, vecs in self._vectors_for(missing):
            index.add_with_ids(vecs, ids)
        log.info("index %s: %d vectors (+%d, -%d)", self.path, index.ntotal, len(missing), len(orphans))
        _atomic_write(self.path / VECTORS, lambda tmp: faiss.write_index(index, tmp))
        cfg["kind"] = want
        if json.dumps(self.config) != before:
            _write_json(self.path / CONFIG, self.config)
        for old in self.path.glob("vectors.*.ivfdata"):
            old.unlink()  # lists of a merged index, now rebuilt in memory; open readers keep their mapping
        with _transaction(con):
            self._set_meta(con, synced_id=int(self._meta("next_id")) - 1, dirty=0)

    # --- searching

    def _search_index(self):
        """The FAISS index as last written, re-read when the file changes (cached for long-lived readers)."""
        import faiss

        path = self.path / VECTORS
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._search_cache is None or self._search_cache[0] != stamp:
            try:
                index = _read_index(path, mmap=True)
            except RuntimeError:  # replaced while being read (its .ivfdata already gone): read the new one
                return self._search_index() if path.stat().st_ino != st.st_ino else None
            if index is not None and not isinstance(index, faiss.IndexIDMap2):
                ivf = faiss.extract_index_ivf(index)
                nprobe = self.config["index"].get("nprobe") or max(16, ivf.nlist // 32)
                ivf.nprobe = min(ivf.nlist, nprobe)
            self._search_cache = (stamp, index)
        return self._search_cache[1]

    def search(self, query: str | np.ndarray, k: int = 5) -> list[Hit]:
        """The ``k`` chunks most similar (cosine) to ``query``, best first.

        Args:
            query (str or np.ndarray): a text (encoded with the index's embedder) or a vector of size ``dim``.
            k (int, optional): number of hits. Defaults to 5.

        Returns:
            list[Hit]: at most ``k`` hits (fewer when the index holds fewer chunks).
        """
        if k <= 0:
            return []
        with self._mutex:
            return self._search(query, k)

    def _search(self, query: str | np.ndarray, k: int) -> list[Hit]:
        if isinstance(query, str):
            q = self._encode([query], batch_size=1)
        else:
            q = _normalise(np.asarray(query, dtype=np.float32).reshape(1, -1))
            if q.shape[1] != self.dim:
                raise ValueError(f"query vector has size {q.shape[1]}, the index holds size {self.dim}")
        # the watermark before the file: a run renames vectors.faiss before it moves the watermark, so every
        # chunk is either in the file read below or above the watermark (or both: scores are kept by id)
        synced = int(self._meta("synced_id", "-1"))
        scores: dict[int, float] = {}
        rows: dict[int, tuple] = {}
        columns = "id, path, start_line, end_line, text"
        index = self._search_index()
        if index is not None and index.ntotal:
            want = k
            while True:
                D, I = index.search(q, min(want, index.ntotal))
                ids = [int(i) for i in I[0] if i >= 0]
                rows.update((r[0], r) for r in _rows_by_ids(self._con, columns, ids))
                scores.update((int(i), float(d)) for d, i in zip(D[0], I[0]) if int(i) in rows)
                if len(scores) >= k or want >= index.ntotal:
                    break
                want *= 4  # some hits were chunks deleted since the file was written
        # chunks committed after vectors.faiss was written: exact scan (empty outside of an index run)
        for ids, vecs in self._delta(synced):
            part = vecs @ q[0]
            top = np.argsort(-part)[:k]
            scores.update((int(ids[j]), float(part[j])) for j in top)
        best = sorted(scores, key=lambda i: -scores[i])[:k]
        missing = [i for i in best if i not in rows]
        rows.update((r[0], r) for r in _rows_by_ids(self._con, columns, missing))
        return [Hit(rows[i][1], rows[i][2], rows[i][3], scores[i], rows[i][4], i) for i in best if i in rows]

    def _delta(self, synced: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        cursor = self._con.execute("SELECT id, vector FROM chunks WHERE id > ? ORDER BY id", (synced,))
        while rows := cursor.fetchmany(8192):
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            yield (
                ids,
                np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dim),
            )

    # --- reporting

    def stats(self) -> dict[str, Any]:
        """Counts and settings: files, chunks, skipped files, folders, embedder, index kind, size on disk."""
        with self._mutex:
            return self._stats()

    def _stats(self) -> dict[str, Any]:
        con = self._con
        files = dict(con.execute("SELECT status, count(*) FROM files GROUP BY status").fetchall())
        synced = int(self._meta("synced_id", "-1"))
        emb, cfg = self.config["embedder"], self.config["index"]
        return {
            "index": str(self.path),
            "root": str(self.root),
            "model_id": emb["model_id"],
            "model": emb["model"],
            "dim": emb["dim"],
            "pooling": emb["pooling"],
            "kind": cfg["kind"],
            "nlist": cfg["nlist"] if cfg["kind"] == "ivf" else None,
            "shard": self.config.get("shard"),
            "files": files.pop("ok", 0),
            "skipped": files,
            "chunks": con.execute("SELECT count(*) FROM chunks").fetchone()[0],
            "pending": con.execute("SELECT count(*) FROM chunks WHERE id > ?", (synced,)).fetchone()[0],
            "folders": [r[0] for r in con.execute("SELECT path FROM folders ORDER BY path")],
            "updated": con.execute("SELECT max(updated) FROM folders").fetchone()[0],
            "bytes": sum(p.stat().st_size for p in self.path.iterdir() if p.is_file()),
        }


# ---------------------------------------------------------------------------------------------------------
# scale-out


def shard_paths(path: str | os.PathLike) -> list[Path]:
    """The shard folders of an index (``<index>/shards/<I>-of-<N>``), sorted by shard number."""
    folders = [p for p in Path(path, "shards").glob("*-of-*") if (p / CONFIG).exists()]
    return sorted(folders, key=lambda p: int(p.name.split("-of-")[0]))


def shard_path(path: str | os.PathLike, shard: tuple[int, int]) -> Path:
    """Where shard ``(I, N)`` of the index at ``path`` lives."""
    return Path(path, "shards", f"{shard[0]}-of-{shard[1]}")


def merge_shards(
    path: str | os.PathLike, nlist: int | None = None, nprobe: int | None = None
) -> dict[str, Any]:
    """Merge the shard indexes under ``<path>/shards/`` into one IVF index at ``path``.

    The IVF quantizer is trained on a sample of all shards' vectors; each shard's vectors are added to a copy
    of the trained index and the FAISS on-disk merge writes one ``vectors.<generation>.ivfdata``; the data of
    all shards replaces ``path``'s in one SQLite transaction. Each shard is opened with its writer lock, so a
    merge refuses to run while a shard is still being indexed. Shard folders are left in place (delete them,
    or keep them to re-run a shard incrementally and merge again).

    Args:
        path (path): the index folder holding ``shards/``.
        nlist (int, optional): IVF cells. Defaults to None (4·sqrt(N)).
        nprobe (int, optional): IVF cells visited per query. Defaults to None (max(16, nlist/32)).

    Returns:
        dict: the merged index's :meth:`Index.stats`.

    Raises:
        IndexNotFoundError: no shards. IndexLockedError: a shard or the index is being written.
        StoreError: a shard is missing, or the shards (or the index) disagree on the embedder or root.
    """
    path = Path(path)
    folders = shard_paths(path)
    if not folders:
        raise IndexNotFoundError(
            f"No shards under {path / 'shards'}; run `rwkv-embed index DIR --shard I/N` first"
        )
    held: list[Index] = []
    try:
        for folder in folders:
            lock = _WriterLock(folder / LOCK)
            held.append(Index(folder, Index._read_config(folder), False, None, lock))
        count = held[0].config["shard"][1]
        numbers = sorted(s.config["shard"][0] for s in held)
        if numbers != list(range(count)) or any(s.config["shard"][1] != count for s in held):
            names = [f.name for f in folders]
            raise StoreError(f"Shards under {path / 'shards'} are {names}; need 0..{count - 1} of {count}")
        first = held[0]
        for s in held[1:]:
            if s.config["embedder"] != first.config["embedder"] or s.root != first.root:
                raise StoreError(f"Shard {s.path} was built with another embedder or root than {first.path}")
        lock = _WriterLock(path / LOCK)
        if (path / CONFIG).exists():
            config = Index._read_config(path)
            if config["embedder"]["model_id"] != first.config["embedder"]["model_id"]:
                lock.release()
                raise EmbedderMismatchError(f"Index {path} was built with another embedder than its shards")
        else:
            config = json.loads(json.dumps(first.config))
        config.update(shard=None, root=os.path.relpath(first.root, path.resolve()))
        config["index"].update(kind="ivf", requested="ivf", nlist=nlist, nprobe=nprobe)
        con = _connect(path / META, read_only=False)
        con.executescript(_SCHEMA)
        con.close()
        index = Index(path, config, False, None, lock)
        held.append(index)
        _merge(index, held[:-1])
        return index.stats()
    finally:
        for s in held:
            s.close()


def _merge(index: Index, shards: list[Index]) -> None:
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    for s in shards:
        s._sync()  # finish an interrupted shard run
    shard_ids = [np.array([r[0] for r in s._con.execute("SELECT id FROM chunks")], np.int64) for s in shards]
    total = sum(len(ids) for ids in shard_ids)
    nlist = index.config["index"]["nlist"] or _auto_nlist(total)
    rng = np.random.default_rng(0)
    sample = [np.zeros((0, index.dim), np.float32)]
    for s, ids in zip(shards, shard_ids):
        take = rng.choice(ids, size=min(len(ids), -(-256 * nlist * len(ids) // max(total, 1))), replace=False)
        sample += [v for _, v in s._vectors_for(np.sort(take))]
    sample = np.concatenate(sample)
    nlist = max(1, min(nlist, len(sample)))
    index.config["index"]["nlist"] = nlist
    trained = _train_ivf(sample, nlist) if total else None

    path, con = index.path, index._con
    work = path / f"merge.tmp-{os.getpid()}"
    work.mkdir(exist_ok=True)
    try:
        names = []
        for s, ids in zip(shards, shard_ids):
            if trained is not None:
                part = faiss.clone_index(trained)
                for got, vecs in s._vectors_for(ids):
                    part.add_with_ids(vecs, got)
                names.append(str(work / f"{s.path.name}.ivf"))
                faiss.write_index(part, names[-1])
        for n, s in enumerate(shards):
            con.execute(f"ATTACH DATABASE ? AS s{n}", (str(s.path / META),))
        with _transaction(con):
            for table in ("chunks", "files", "folders"):
                con.execute(f"DELETE FROM {table}")
            for n in range(len(shards)):
                for table in ("chunks", "files"):
                    con.execute(f"INSERT INTO {table} SELECT * FROM s{n}.{table}")
                con.execute(f"INSERT OR REPLACE INTO folders SELECT * FROM s{n}.folders")
            next_id = con.execute("SELECT coalesce(max(id), -1) + 1 FROM chunks").fetchone()[0]
            Index._set_meta(con, next_id=next_id, id_step=1, dirty=1)
        for n in range(len(shards)):
            con.execute(f"DETACH DATABASE s{n}")
        if trained is None:  # nothing to train on: an empty exact index
            index.config["index"].update(kind="flat", requested="auto", nlist=None)
            (path / VECTORS).unlink(missing_ok=True)
            index._sync()
            _write_json(path / CONFIG, index.config)
            return
        ivfdata = path.resolve() / f"vectors.{time.time_ns()}.ivfdata"
        merged = faiss.clone_index(trained)
        with _quiet_faiss():
            merge_ondisk(merged, names, str(ivfdata))
        _atomic_write(path / TRAINED, lambda tmp: faiss.write_index(trained, tmp))
        _atomic_write(path / VECTORS, lambda tmp: faiss.write_index(merged, tmp))
        _write_json(path / CONFIG, index.config)
        for old in path.glob("vectors.*.ivfdata"):
            if old.name != ivfdata.name:
                old.unlink()
        with _transaction(con):
            Index._set_meta(con, synced_id=next_id - 1, dirty=0)
        log.info("merged %d shards into %s: %d vectors, IVF%d", len(shards), path, merged.ntotal, nlist)
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
