"""rwkv_mm.embed.store.Index: incremental updates, search against brute force, crash safety, shards.

Every search is checked against an exact numpy cosine search over the chunks in meta.sqlite (embed_helpers).
The reliability tests run `rwkv-embed index` in a subprocess with a slow embedder: one is killed with SIGKILL
mid-run, one is searched while it runs.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss", reason="faiss-cpu (the embed extra) is not installed")

from rwkv_mm.embed import store  # noqa: E402
from rwkv_mm.embed.ingest import ChunkConfig, chunk_lines, read_file  # noqa: E402
from rwkv_mm.embed.store import (  # noqa: E402
    EmbedderMismatchError,
    Index,
    IndexLockedError,
    IndexNotFoundError,
    StoreError,
    merge_shards,
    shard_path,
)
from tests.embed_helpers import HashEmbedder, OtherEmbedder, brute_force, index_rows, write_corpus  # noqa: E402

faiss.omp_set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["river mountain cloud", "ember lantern quartz violet", "kumquat", "falcon copper glacier orchard"]


@pytest.fixture
def emb() -> HashEmbedder:
    return HashEmbedder()


def assert_matches_brute_force(index_path: Path, emb: HashEmbedder, k: int = 5, index: Index | None = None):
    """Search results equal an exact numpy cosine search over every chunk in SQLite (ids and scores)."""
    rows = index_rows(index_path)
    reader = index or Index.open(index_path, emb)
    try:
        for query in QUERIES:
            hits = reader.search(query, k=k)
            expected = brute_force(emb, rows, query, k)
            assert len(hits) == min(k, len(rows))
            np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-5)
            # ids agree except where scores tie
            for hit, (i, s) in zip(hits, expected):
                assert hit.id == i or abs(hit.score - s) < 1e-6
            by_id = {r[0]: r for r in rows}
            for hit in hits:
                _, path, _, start, end, text = by_id[hit.id]
                assert (hit.path, hit.start_line, hit.end_line, hit.text) == (path, start, end, text)
    finally:
        if index is None:
            reader.close()


def assert_consistent(index_path: Path, folders: list[Path], root: Path, chunker: ChunkConfig | None = None):
    """No lost, no duplicated chunks: SQLite holds exactly the chunks of every file, FAISS exactly its ids."""
    chunker = chunker or ChunkConfig()
    rows = index_rows(index_path)
    expected = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                key = path.relative_to(root).as_posix()
                for no, c in enumerate(chunk_lines(read_file(path), chunker)):
                    expected[(key, no)] = (c.start_line, c.end_line, c.text)
    got = {(r[1], r[2]): (r[3], r[4], r[5]) for r in rows}
    assert len(got) == len(rows), "duplicated chunks"
    assert got == expected
    index = faiss.read_index(str(index_path / "vectors.faiss"))
    assert sorted(store._faiss_ids(index).tolist()) == sorted(r[0] for r in rows)
    con = sqlite3.connect(index_path / "meta.sqlite")
    assert con.execute("SELECT value FROM meta WHERE key = 'dirty'").fetchone()[0] == "0"
    con.close()


# --- basics


def test_index_update_search_and_status(tmp_path, emb):
    docs = tmp_path / "docs"
    write_corpus(docs, 24, paragraphs=8)
    with Index.open_or_create(tmp_path / ".rwkv-embed", emb) as index:
        stats = index.update(docs)
        assert (stats.added, stats.updated, stats.removed, stats.unchanged) == (24, 0, 0, 0)
        assert stats.chunks_added == stats.chunks_embedded == len(index_rows(index.path)) > 24
        s = index.stats()
    assert (s["files"], s["chunks"], s["pending"], s["kind"], s["folders"]) == (
        24,
        stats.chunks_added,
        0,
        "flat",
        ["docs"],
    )
    assert s["model_id"] == emb.model_id and s["dim"] == emb.dim
    assert_consistent(tmp_path / ".rwkv-embed", [docs], tmp_path)
    assert_matches_brute_force(tmp_path / ".rwkv-embed", emb, k=7)


def test_new_index_chunks_at_the_embedders_size(tmp_path, emb):
    """An embedder's ``chunk_chars`` sets a new index's chunk size; an explicit chunker wins; without the
    attribute the ChunkConfig default holds, and the size is kept in config.json for later runs."""
    docs = tmp_path / "docs"
    write_corpus(docs, 6, paragraphs=8)
    short = HashEmbedder()
    short.chunk_chars = 120
    cases = [(short, None, 120), (short, ChunkConfig(max_chars=300), 300), (emb, None, ChunkConfig.max_chars)]
    for n, (embedder, chunker, size) in enumerate(cases):
        path = tmp_path / f"index{n}"
        with Index.open_or_create(path, embedder, root=tmp_path, chunker=chunker) as index:
            index.update(docs)
        assert json.loads((path / "config.json").read_text())["chunker"]["max_chars"] == size
        assert_consistent(path, [docs], tmp_path, ChunkConfig(max_chars=size))
    Index.open_or_create(tmp_path / "index1", short, chunker=ChunkConfig(max_chars=300)).close()  # the same
    with pytest.raises(store.ChunkerMismatchError, match="chunks of 300 characters"):
        Index.open_or_create(tmp_path / "index1", short, chunker=ChunkConfig(max_chars=200))


def test_incremental_update_skips_unchanged_and_reuses_vectors(tmp_path, emb):
    docs = tmp_path / "docs"
    paths = write_corpus(docs, 12, paragraphs=8)
    path = tmp_path / ".rwkv-embed"
    with Index.open_or_create(path, emb) as index:
        index.update(docs)
        emb.encoded = 0
        again = index.update(docs)
        assert (again.unchanged, again.chunks_added, emb.encoded) == (12, 0, 0)

        # touched only: the hash matches, nothing is re-read into chunks
        os.utime(paths[0], ns=(time.time_ns(), time.time_ns() + 10**9))
        # changed: one paragraph appended -> only the new chunk is encoded
        paths[1].write_text(paths[1].read_text() + "\nkumquat kumquat river\n")
        paths[2].unlink()
        paths[3].rename(docs / "moved.md")  # a move: removed + added, vectors reused
        stats = index.update(docs)
        assert (stats.added, stats.updated, stats.removed, stats.unchanged) == (1, 1, 2, 9)
        assert stats.chunks_embedded < 3 and stats.chunks_reused > 0
        assert emb.encoded == stats.chunks_embedded
    assert_consistent(path, [docs], tmp_path)
    assert_matches_brute_force(path, emb)


def test_several_folders_and_remove(tmp_path, emb):
    a, b = tmp_path / "a", tmp_path / "b"
    write_corpus(a, 6)
    write_corpus(b, 5, seed=1)
    path = tmp_path / "idx"
    with Index.open_or_create(path, emb) as index:
        index.update(a)
        index.update(b)
        (a / "part0" / "doc0000.txt").unlink()
        stats = index.update(a)  # only a's files are compared with a
        assert (stats.removed, stats.unchanged) == (1, 5)
        assert index.stats()["folders"] == ["a", "b"]
        assert index.remove([b / "part1"]) == 2
        assert index.remove([b]) == 3
        assert index.stats()["folders"] == ["a"]
    assert_consistent(path, [a], tmp_path)
    assert_matches_brute_force(path, emb)


def test_excluded_and_gitignored_files_leave_the_index(tmp_path, emb):
    docs = tmp_path / "docs"
    write_corpus(docs, 6)
    path = tmp_path / ".rwkv-embed"
    with Index.open_or_create(path, emb) as index:
        index.update(docs)
        assert index.update(docs, exclude=["*.md"]).removed == 3
        (docs / ".gitignore").write_text("part0/\n")
        stats = index.update(docs)  # the .md files outside part0 come back, part0's .txt file leaves
        assert (stats.added, stats.removed, stats.unchanged) == (2, 1, 2)
        assert index.update(docs, gitignore=False).added == 2


def test_skipped_files_are_counted_and_remembered(tmp_path, emb, caplog):
    docs = tmp_path / "docs"
    write_corpus(docs, 3)
    (docs / "nul.txt").write_bytes(b"abc\x00def")
    (docs / "latin.md").write_bytes("café crème".encode("latin-1"))
    (docs / "utf16.txt").write_bytes("river".encode("utf-16"))
    (docs / "photo.png").write_bytes(b"\x89PNG")  # a known binary extension: not even a candidate
    path = tmp_path / ".rwkv-embed"
    with Index.open_or_create(path, emb) as index:
        with caplog.at_level("WARNING", logger="rwkv_mm.embed"):
            stats = index.update(docs)
        assert stats.added == 3
        assert dict(stats.skipped) == {"binary": 2, "invalid UTF-8": 1}
        assert sum("skipping" in r.message for r in caplog.records) == 3
        caplog.clear()
        with caplog.at_level("WARNING", logger="rwkv_mm.embed"):
            again = index.update(docs)
        assert dict(again.skipped) == {"binary": 2, "invalid UTF-8": 1} and not caplog.records  # no re-read
        (docs / "latin.md").write_text("now valid river text")  # fixed: indexed
        fixed = index.update(docs)
        assert fixed.added == 1 and dict(fixed.skipped) == {"binary": 2}
        assert index.stats()["skipped"] == {"binary": 2}


def test_unreadable_file_is_skipped_and_counted(tmp_path, emb, monkeypatch):
    docs = tmp_path / "docs"
    write_corpus(docs, 4)
    real = store.read_bytes

    def flaky(path):
        if Path(path).name == "doc0001.md":
            raise store.SkipFile("unreadable", "Permission denied")
        return real(path)

    monkeypatch.setattr(store, "read_bytes", flaky)
    with Index.open_or_create(tmp_path / "idx", emb) as index:
        stats = index.update(docs)
        assert stats.added == 3 and dict(stats.skipped) == {"unreadable": 1}
        monkeypatch.setattr(store, "read_bytes", real)
        assert index.update(docs).added == 1  # not remembered: retried next run


# --- errors


def test_open_errors_lock_and_read_only(tmp_path, emb):
    with pytest.raises(IndexNotFoundError, match="No index at"):
        Index.open(tmp_path / "missing")
    path = tmp_path / "idx"
    write_corpus(tmp_path / "docs", 2)
    with Index.open_or_create(path, emb) as index:
        index.update(tmp_path / "docs")
        with pytest.raises(IndexLockedError, match=f"pid {os.getpid()}"):
            Index.open_or_create(path, emb)
        reader = Index.open(path, emb)  # readers need no lock
        assert len(reader.search("river", k=2)) == 2
        with pytest.raises(StoreError, match="read-only"):
            reader.update(tmp_path / "docs")
        reader.close()
        with pytest.raises(FileNotFoundError):
            index.update(tmp_path / "nope")
    Index.open_or_create(path, emb).close()  # the lock is released on close


def test_a_different_embedder_is_refused(tmp_path, emb):
    path = tmp_path / "idx"
    Index.open_or_create(path, emb).close()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("river")
    with pytest.raises(EmbedderMismatchError, match="test-hash-bow-32.*dim 32.*not 'test-other-16'"):
        Index.open_or_create(path, OtherEmbedder())  # checked when opened, before any work
    with pytest.raises(EmbedderMismatchError, match="not 'test-other-16'"):
        Index.open_or_create(path, "tests.embed_helpers:OtherEmbedder")  # a spec other than the recorded one
    with Index.open_or_create(path, HashEmbedder) as index:  # a factory, the same model: fine
        assert index.update(tmp_path / "docs").added == 1
    with pytest.raises(EmbedderMismatchError):
        Index.open(path, OtherEmbedder()).search("river")
    with pytest.raises(ValueError, match="query vector has size 3"):
        Index.open(path, emb).search(np.ones(3))


# --- crash recovery (in process)


def test_chunks_committed_before_a_crash_are_searchable_and_recovered(tmp_path, emb, monkeypatch):
    docs = tmp_path / "docs"
    write_corpus(docs, 10, paragraphs=8)
    path = tmp_path / "idx"
    with Index.open_or_create(path, emb) as index:
        index.update(docs)
    write_corpus(tmp_path / "more", 6, seed=5, paragraphs=8)

    def crash(self):
        raise KeyboardInterrupt  # dies after committing to SQLite, before rewriting vectors.faiss

    monkeypatch.setattr(Index, "_sync", crash)
    index = Index.open_or_create(path, emb)
    with pytest.raises(KeyboardInterrupt):
        index.update(tmp_path / "more")
    index._lock.release()  # what the kernel does for a dead process
    reader = Index.open(path, emb)
    assert reader.stats()["pending"] > 0  # committed, not yet in vectors.faiss: found by the exact scan
    assert_matches_brute_force(path, emb, k=8, index=reader)
    reader.close()
    monkeypatch.undo()
    with Index.open_or_create(path, emb) as index:
        assert index.update(tmp_path / "more").unchanged == 6  # the next run finishes the job
        index.update(docs)
    assert_consistent(path, [docs, tmp_path / "more"], tmp_path)
    assert_matches_brute_force(path, emb)


def test_stale_vectors_file_is_repaired(tmp_path, emb):
    docs = tmp_path / "docs"
    write_corpus(docs, 8)
    path = tmp_path / "idx"
    with Index.open_or_create(path, emb) as index:
        index.update(docs)
    stale = (path / "vectors.faiss").read_bytes()
    con = sqlite3.connect(path / "meta.sqlite")
    synced = con.execute("SELECT value FROM meta WHERE key = 'synced_id'").fetchone()[0]
    con.close()
    with Index.open_or_create(path, emb) as index:
        (docs / "part0" / "doc0000.txt").unlink()
        write_corpus(tmp_path / "docs" / "new", 2, seed=9)
        index.update(docs)
    # a crash between the SQLite commit and the rename leaves an old file beside a newer database
    (path / "vectors.faiss").write_bytes(stale)
    con = sqlite3.connect(path / "meta.sqlite")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'dirty'")
    con.execute("UPDATE meta SET value = ? WHERE key = 'synced_id'", (synced,))
    con.commit()
    con.close()
    assert_matches_brute_force(path, emb)  # readers drop the removed ids and scan the new ones
    with Index.open_or_create(path, emb) as index:
        index.update(docs)
    assert_consistent(path, [docs], tmp_path)


# --- IVF and shards


def test_ivf_index_on_request_and_above_the_threshold(tmp_path, emb, monkeypatch):
    docs = tmp_path / "docs"
    write_corpus(docs, 60)
    with Index.open_or_create(tmp_path / "ivf", emb, kind="ivf", nlist=4, nprobe=4) as index:
        index.update(docs)
        assert index.stats()["kind"] == "ivf" and index.stats()["nlist"] == 4
        (docs / "part0" / "doc0000.txt").unlink()
        index.update(docs)  # remove_ids / add_with_ids on the IVF lists
    assert_consistent(tmp_path / "ivf", [docs], tmp_path)
    assert_matches_brute_force(tmp_path / "ivf", emb)  # nprobe = nlist: exact

    monkeypatch.setattr(store, "IVF_THRESHOLD", 30)
    with Index.open_or_create(tmp_path / "auto", emb, nprobe=64) as index:
        index.update(docs / "part1")
        assert index.stats()["kind"] == "flat"
        index.update(docs)
        assert index.stats()["kind"] == "ivf"
    assert_matches_brute_force(tmp_path / "auto", emb)


def test_two_shards_merge_into_one_ivf_index(tmp_path, emb):
    docs = tmp_path / "docs"
    write_corpus(docs, 40, paragraphs=6)
    main = tmp_path / ".rwkv-embed"
    for i in range(2):
        with Index.open_or_create(shard_path(main, (i, 2)), emb, shard=(i, 2), root=tmp_path) as shard:
            stats = shard.update(docs)
            assert 5 < stats.added < 35  # a stable hash splits the files
            ids = [r[0] for r in index_rows(shard.path)]
            assert all(x % 2 == i for x in ids)
    with pytest.raises(IndexNotFoundError):
        Index.open(main)
    s = merge_shards(main, nlist=4, nprobe=4)
    assert (s["kind"], s["files"], s["shard"], s["pending"]) == ("ivf", 40, None, 0)
    assert len(list(main.glob("vectors.*.ivfdata"))) == 1
    assert_consistent(main, [docs], tmp_path)
    assert_matches_brute_force(main, emb)
    # the merged index keeps working incrementally (its on-disk lists are rebuilt in memory)
    with Index.open_or_create(main, emb) as index:
        (docs / "part0" / "doc0000.txt").write_text("kumquat river\n")
        assert index.update(docs).updated == 1
    assert not list(main.glob("vectors.*.ivfdata"))
    assert_consistent(main, [docs], tmp_path)
    assert_matches_brute_force(main, emb)


def test_merge_refuses_incomplete_or_running_shards(tmp_path, emb):
    main = tmp_path / "idx"
    with pytest.raises(IndexNotFoundError, match="No shards"):
        merge_shards(main)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("river")
    Index.open_or_create(shard_path(main, (0, 2)), emb, shard=(0, 2)).close()
    with pytest.raises(StoreError, match=r"need 0\.\.1 of 2"):
        merge_shards(main)
    running = Index.open_or_create(shard_path(main, (1, 2)), emb, shard=(1, 2))
    with pytest.raises(IndexLockedError):
        merge_shards(main)
    running.close()
    merge_shards(main, nlist=1)


# --- reliability: a real process, killed or searched mid-run


def _start_index_run(cwd: Path, folder: str, delay: float, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RWKV_EMBED_TEST_DELAY=str(delay), OMP_NUM_THREADS="1")
    env.pop("RWKV_EMBED_INDEX", None)
    cmd = [sys.executable, "-m", "rwkv_mm.embed.cli", "index", folder, "-q", "--batch-size", "2", *extra]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _count_chunks(path: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{path / 'meta.sqlite'}?mode=ro", uri=True)
        try:
            return con.execute("SELECT count(*) FROM chunks").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _wait_for_chunks(proc: subprocess.Popen, path: Path, n: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = _count_chunks(path)
        if got >= n:
            return got
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"no {n} chunks after {timeout} s")


def test_kill_9_mid_run_then_search_works_and_rerun_completes(tmp_path, emb):
    docs = tmp_path / "docs"
    write_corpus(docs, 40, paragraphs=8)
    total = sum(len(chunk_lines(read_file(p))) for p in docs.rglob("*.*"))
    path = tmp_path / ".rwkv-embed"
    proc = _start_index_run(tmp_path, "docs", 0.15, "--model", "tests.embed_helpers:SlowHashEmbedder")
    committed = _wait_for_chunks(proc, path, 20)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert committed < total, "the run finished before the kill"

    # search works on what was committed (vectors.faiss was never written: exact scan of the committed chunks)
    assert_matches_brute_force(path, emb)

    rerun = _start_index_run(tmp_path, "docs", 0)  # the recorded model spec is reused
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert "0 removed, " in out and "skipped" in out
    assert_consistent(path, [docs], tmp_path)
    assert len(index_rows(path)) == total
    assert_matches_brute_force(path, emb)


def test_search_during_an_index_run(tmp_path, emb):
    docs, more = tmp_path / "docs", tmp_path / "more"
    write_corpus(docs, 10)
    path = tmp_path / ".rwkv-embed"
    with Index.open_or_create(path, emb, kind="flat") as index:
        index.update(docs)
    for i in range(60):  # new files, each with a word the first corpus lacks
        (more / f"m{i:02d}.md").parent.mkdir(exist_ok=True)
        (more / f"m{i:02d}.md").write_text(f"# Note {i}\n\nkumquat harvest number {i} near the river\n")
    proc = _start_index_run(tmp_path, "more", 0.15, "--model", "tests.embed_helpers:SlowHashEmbedder")
    reader = Index.open(path, emb)
    seen_new_while_running = False
    searches = 0
    try:
        _wait_for_chunks(proc, path, 13)
        while proc.poll() is None:
            hits = reader.search("kumquat harvest", k=5)
            searches += 1
            assert len(hits) == 5
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
            q = emb.encode(["kumquat harvest"], normalize_embeddings=True)[0]
            for h in hits:  # each hit is a real chunk with its true score
                assert h.score == pytest.approx(
                    float(emb.encode([h.text], normalize_embeddings=True)[0] @ q), abs=1e-5
                )
            running = proc.poll() is None
            seen_new_while_running |= running and hits[0].path.startswith("more/")
            try:
                Index.open_or_create(path, emb).close()
                proc.wait(timeout=10)  # got the lock: the run must have just finished
            except IndexLockedError:
                pass
            time.sleep(0.05)
    finally:
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert searches > 0 and seen_new_while_running
    assert_matches_brute_force(path, emb, index=reader)  # the long-lived reader picks up the new file
    reader.close()
    assert_consistent(path, [docs, more], tmp_path)
