"""`rwkv-embed` (rwkv_mm.embed.cli): output formats, index location rules, errors and exit codes, shards.

Commands run in process through `main(argv)` with a deterministic embedder loaded by spec
(`--model tests.embed_helpers:HashEmbedder`); the shard and timing tests run real subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

faiss = pytest.importorskip("faiss", reason="faiss-cpu (the embed extra) is not installed")

from rwkv_mm.embed.cli import main  # noqa: E402
from rwkv_mm.embed.store import Index  # noqa: E402
from tests.embed_helpers import HashEmbedder, brute_force, index_rows, write_corpus  # noqa: E402

faiss.omp_set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
MODEL = "tests.embed_helpers:HashEmbedder"


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A fresh current folder holding docs/ (12 files), with no $RWKV_EMBED_INDEX."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RWKV_EMBED_INDEX", raising=False)
    write_corpus(tmp_path / "docs", 12, paragraphs=6)
    return tmp_path


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def summary_pattern(folder: str, added=0, updated=0, removed=0, unchanged=0, skipped="0 skipped") -> str:
    return (
        rf"{re.escape(folder)}: {added} added, {updated} updated, {removed} removed, {unchanged} unchanged, "
        rf"{re.escape(skipped)} files; \d+ chunks added \(\d+ embedded, \d+ reused\), \d+ removed; "
        r"\d+\.\d\d s\n"
    )


def test_index_prints_one_summary_line_and_warns_on_skipped_files(work, capsys):
    (work / "docs" / "blob.dat").write_bytes(b"\x00\x01")
    (work / "docs" / "latin.txt").write_bytes(b"caf\xe9")
    code, out, err = run(capsys, "index", "docs", "--model", MODEL, "-q")
    assert code == 0
    assert re.fullmatch(
        summary_pattern("docs", added=12, skipped="2 skipped (binary 1, invalid UTF-8 1)"), out
    )
    assert sorted(err.splitlines()) == [
        f"rwkv-embed: skipping {work / 'docs' / 'blob.dat'}: binary",
        f"rwkv-embed: skipping {work / 'docs' / 'latin.txt'}: invalid UTF-8: byte 3",
    ]
    assert (work / ".rwkv-embed" / "config.json").exists()  # created in the current folder

    (work / "docs" / "part0" / "doc0000.txt").unlink()
    code, out, err = run(capsys, "index", "docs", "-q", "--json")
    summary = json.loads(out)
    assert (summary["added"], summary["removed"], summary["unchanged"]) == (0, 1, 11)
    assert summary["skipped"] == {"binary": 1, "invalid UTF-8": 1} and err == ""


def test_chunk_chars_sets_a_new_index_chunk_size_only(work, capsys):
    code, _, _ = run(capsys, "index", "docs", "--model", MODEL, "-q", "--chunk-chars", "120")
    assert code == 0
    config = json.loads((work / ".rwkv-embed" / "config.json").read_text())
    assert config["chunker"]["max_chars"] == 120
    assert max(len(row[5]) for row in index_rows(work / ".rwkv-embed")) <= 120
    assert run(capsys, "index", "docs", "-q", "--chunk-chars", "120")[0] == 0  # the same size: fine
    code, _, err = run(capsys, "index", "docs", "-q", "--chunk-chars", "300")
    assert code == 2 and "chunks of 120 characters; a chunk size applies to a new index only" in err
    with pytest.raises(SystemExit):
        main(["index", "docs", "--chunk-chars", "0"])
    assert "must be at least 1" in capsys.readouterr().err


def test_search_prints_grep_like_lines_matching_brute_force(work, capsys):
    assert run(capsys, "index", "docs", "--model", MODEL, "-q")[0] == 0
    code, out, err = run(capsys, "search", "river mountain cloud", "-k", "4")
    assert code == 0 and err == ""
    rows = {r[0]: r for r in index_rows(work / ".rwkv-embed")}
    expected = brute_force(HashEmbedder(), list(rows.values()), "river mountain cloud", 4)
    lines = out.splitlines()
    assert len(lines) == 4
    for line, (i, score) in zip(lines, expected):
        _, path, _, start, end, text = rows[i]
        snippet = " ".join(text.split())
        snippet = snippet if len(snippet) <= 80 else snippet[:79] + "…"
        assert line == f"{path}:{start}-{end}  {score:.3f}  {snippet}"


def test_search_json_lines(work, capsys):
    run(capsys, "index", "docs", "--model", MODEL, "-q")
    code, out, _ = run(capsys, "search", "ember lantern", "--json", "-k", "3")
    records = [json.loads(line) for line in out.splitlines()]
    rows = {r[0]: r for r in index_rows(work / ".rwkv-embed")}
    expected = brute_force(HashEmbedder(), list(rows.values()), "ember lantern", 3)
    assert [r["id"] for r in records] == [i for i, _ in expected]
    for record, (i, score) in zip(records, expected):
        assert set(record) == {"path", "start_line", "end_line", "score", "text", "id"}
        assert record["path"] == str(work / rows[i][1])
        assert (record["start_line"], record["end_line"], record["text"]) == rows[i][3:6]
        assert record["score"] == pytest.approx(score, abs=1e-5)


def test_status(work, capsys):
    run(capsys, "index", "docs", "--model", MODEL, "-q")
    code, out, _ = run(capsys, "status")
    assert code == 0
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert list(lines) == ["index", "model", "vectors", "files", "folders", "updated", "size"]
    assert lines["model"] == f"test-hash-bow-32 (dim 32, pooling bag-of-words, from {MODEL})"
    assert lines["files"] == "12 indexed" and lines["folders"] == "docs"
    assert re.fullmatch(r"\d+ chunks, flat", lines["vectors"])
    code, out, _ = run(capsys, "status", "--json")
    assert json.loads(out)["files"] == 12


def test_index_location_rules(work, capsys, monkeypatch):
    run(capsys, "index", "docs", "--model", MODEL, "-q")
    # from a subfolder: the nearest .rwkv-embed/ upwards, as git finds .git
    monkeypatch.chdir(work / "docs" / "part1")
    code, out, _ = run(capsys, "search", "river", "-k", "12")
    paths = [line.split(":")[0] for line in out.splitlines()]
    assert code == 0 and len(paths) == 12
    # shown relative to the current folder when under it, else absolute
    assert {p for p in paths if not p.startswith("/")} <= {
        "doc0001.md",
        "doc0004.txt",
        "doc0007.md",
        "doc0010.txt",
    }
    assert {p for p in paths if p.startswith("/")} <= {str(p) for p in (work / "docs").rglob("*.*")}
    assert all(Path(p).is_file() for p in paths)
    code, out, _ = run(capsys, "index", str(work / "docs"), "-q")
    assert code == 0 and not (work / "docs" / "part1" / ".rwkv-embed").exists()
    # --index and $RWKV_EMBED_INDEX
    monkeypatch.chdir(work)
    assert run(capsys, "index", "docs/part2", "--index", "other", "--model", MODEL, "-q")[0] == 0
    assert json.loads(run(capsys, "status", "--index", "other", "--json")[1])["files"] == 4
    monkeypatch.setenv("RWKV_EMBED_INDEX", str(work / "other"))
    assert json.loads(run(capsys, "status", "--json")[1])["index"] == str(work / "other")
    assert json.loads(run(capsys, "status", "--json", "--index", ".rwkv-embed")[1])["files"] == 12


def _one_line_error(err: str, pattern: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert re.fullmatch(rf"rwkv-embed: error: {pattern}", lines[0]), lines[0]


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["index", "missing"], r"No such folder: missing; check the path \(rwkv-embed index DIR\)"),
        (["search", "q"], r"No index found \(.*\); run `rwkv-embed index DIR` first"),
        (["status"], r"No index found \(.*\); run `rwkv-embed index DIR` first"),
        (["merge"], r"No index found \(.*\); run `rwkv-embed index DIR` first"),
        (["rm", "docs"], r"No index found \(.*\); run `rwkv-embed index DIR` first"),
        (
            ["search", "q", "--index", "nowhere"],
            r"No index at nowhere; run `rwkv-embed index DIR --index nowhere` first",
        ),
        (["status", "--index", "docs"], r"No index at docs; run `rwkv-embed index DIR --index docs` first"),
        (
            ["merge", "--index", "docs"],
            r"No shards under docs/shards; run `rwkv-embed index DIR --shard I/N` first",
        ),
    ],
    ids=[
        "index-missing-dir",
        "search",
        "status",
        "merge",
        "rm",
        "search-index",
        "status-index",
        "merge-no-shards",
    ],
)
def test_missing_folder_or_index_exits_2_with_a_hint(work, capsys, args, pattern):
    code, out, err = run(capsys, *args)
    assert (code, out) == (2, "")
    _one_line_error(err, pattern)


def test_other_errors_and_exit_codes(work, capsys):
    run(capsys, "index", "docs", "--model", MODEL, "-q")
    code, _, err = run(capsys, "search", "q", "-k", "0")
    assert code == 2
    _one_line_error(err, "-k must be at least 1, got 0")
    (work / "more").mkdir()
    (work / "more" / "a.txt").write_text("river")
    code, _, err = run(capsys, "index", "more", "--model", "tests.embed_helpers:OtherEmbedder", "-q")
    assert code == 2
    _one_line_error(
        err,
        r"Index .* was built with embedder 'test-hash-bow-32' .*; use the same --model or another --index",
    )
    with Index.open_or_create(work / ".rwkv-embed"):
        code, _, err = run(capsys, "index", "docs", "-q")
    assert code == 1
    _one_line_error(
        err, rf"Index .* is being updated by another process \(pid {os.getpid()}\); wait for it to finish"
    )
    for bad in ("2/2", "x", "1/0"):
        with pytest.raises(SystemExit) as e:
            main(["index", "docs", "--shard", bad])
        assert e.value.code == 2
        assert re.search(
            r"argument --shard: (expected I/N|shard I/N needs 0 <= I < N)", capsys.readouterr().err
        )


def test_rm(work, capsys):
    run(capsys, "index", "docs", "--model", MODEL, "-q")
    assert run(capsys, "rm", "docs/part0")[1:] == ("removed 4 files\n", "")
    assert json.loads(run(capsys, "status", "--json")[1])["files"] == 8


def _cli(cwd: Path, *args: str, **env: str) -> subprocess.Popen:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    full_env.pop("RWKV_EMBED_INDEX", None)
    return subprocess.Popen(
        [sys.executable, "-m", "rwkv_mm.embed.cli", *args],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_shards_in_parallel_processes_then_merge(work, capsys):
    write_corpus(work / "docs" / "extra", 28, seed=3)
    # a job array: two processes at once, each with its own shard
    procs = [_cli(work, "index", "docs", "--shard", f"{i}/2", "--model", MODEL, "-q") for i in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    added = [int(re.match(r"docs: (\d+) added", out).group(1)) for out, _ in results]
    assert sum(added) == 40 and min(added) > 5
    code, _, err = run(capsys, "status")
    assert code == 2
    _one_line_error(err, r"No index at .*\.rwkv-embed; run `rwkv-embed merge` to build it from its shards")
    code, out, err = run(capsys, "merge", "--nlist", "4", "--nprobe", "4")
    assert code == 0, err
    assert re.fullmatch(r"merged into .*\.rwkv-embed: \d+ chunks in 40 files, IVF4; \d+\.\d\d s\n", out)
    rows = index_rows(work / ".rwkv-embed")
    assert len({r[0] for r in rows}) == len(rows) == len({(r[1], r[2]) for r in rows})
    code, out, _ = run(capsys, "search", "river mountain", "--json", "-k", "5")
    expected = brute_force(HashEmbedder(), rows, "river mountain", 5)
    assert [json.loads(line)["id"] for line in out.splitlines()] == [i for i, _ in expected]
    status = json.loads(run(capsys, "status", "--json")[1])
    assert (status["kind"], status["nlist"], status["files"]) == ("ivf", 4, 40)
    # re-running a shard is incremental; merging again replaces the index
    (work / "docs" / "extra" / "part0" / "doc0000.txt").write_text("kumquat\n")
    for i in range(2):
        assert run(capsys, "index", "docs", "--shard", f"{i}/2", "-q")[0] == 0
    assert run(capsys, "merge")[0] == 0
    assert run(capsys, "search", "kumquat", "-k", "1")[1].startswith(
        "docs/extra/part0/doc0000.txt:1-1  1.000"
    )


def test_reindex_with_nothing_changed_is_fast_and_never_imports_torch(work, capsys):
    write_corpus(work / "docs" / "many", 500, paragraphs=1)
    assert run(capsys, "index", "docs", "--model", MODEL, "-q")[0] == 0
    code = (
        "import sys; from rwkv_mm.embed.cli import main; rc = main(['index', 'docs', '-q']);"
        "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(summary_pattern("docs", unchanged=512), proc.stdout)
    assert seconds < 3.0, f"a re-index with nothing changed took {seconds:.2f} s (whole command)"
