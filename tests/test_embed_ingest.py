"""rwkv_mm.embed.ingest: file discovery (hidden, .gitignore, --exclude), readers and chunking."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rwkv_mm.embed import ingest
from rwkv_mm.embed.ingest import Chunk, ChunkConfig, SkipFile, chunk_lines, read_file, walk


def _names(root, **kw) -> list[str]:
    return [p.relative_to(root).as_posix() for p in walk(root, **kw)]


def _touch(root, *names: str, text: str = "x\n") -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


# --- discovery


def test_walk_skips_hidden_binary_extensions_and_the_index(tmp_path):
    _touch(tmp_path, "a.md", "sub/b.py", ".hidden.txt", ".git/config", "sub/.cache/c.txt", "img.png", "w.pth")
    _touch(tmp_path, "idx/config.json", "README")
    assert _names(tmp_path, skip=[tmp_path / "idx"]) == ["README", "a.md", "sub/b.py"]


@pytest.mark.parametrize(
    "pattern, path, expected",
    [
        ("*.log", "a.log", True),
        ("*.log", "deep/er/a.log", True),
        ("*.log", "a.log.txt", False),
        ("/top.txt", "top.txt", True),
        ("/top.txt", "sub/top.txt", False),
        ("doc/*.txt", "doc/a.txt", True),
        ("doc/*.txt", "doc/x/a.txt", False),
        ("**/tmp", "a/b/tmp", True),
        ("**/tmp", "tmp", True),
        ("out/**", "out/a/b.txt", True),
        ("a/**/z", "a/z", True),
        ("a/**/z", "a/b/c/z", True),
        ("file?.txt", "file1.txt", True),
        ("file?.txt", "file12.txt", False),
        ("[ab].txt", "b.txt", True),
        ("[!ab].txt", "b.txt", False),
        (r"\#hash", "#hash", True),
    ],
    ids=lambda v: str(v),
)
def test_gitignore_patterns(pattern, path, expected):
    import re

    assert bool(re.fullmatch(ingest._gitignore_regex(pattern.lstrip("!")), path)) is expected


def test_walk_honours_nested_gitignore_files_and_negation(tmp_path):
    (tmp_path / ".gitignore").write_text("# comment\n*.log\n!keep.log\nbuild/\n/top.txt\n")
    _touch(tmp_path, "a.log", "keep.log", "top.txt", "sub/top.txt", "build/out.txt", "sub/build/x.txt")
    (tmp_path / "sub" / ".gitignore").write_text("*.tmp\n!important.tmp\n")
    _touch(tmp_path, "sub/a.tmp", "sub/important.tmp", "other.tmp")
    assert _names(tmp_path) == ["keep.log", "other.tmp", "sub/important.tmp", "sub/top.txt"]
    assert len(_names(tmp_path, gitignore=False)) == 9


def test_walk_reads_gitignore_of_parents_up_to_the_repository(tmp_path):
    (tmp_path / ".git").mkdir()
    (tmp_path / ".gitignore").write_text("generated/\n*.bak\n")
    _touch(tmp_path, "docs/a.md", "docs/a.bak", "docs/generated/g.md")
    assert _names(tmp_path / "docs") == ["a.md"]


def test_walk_exclude_globs_match_names_paths_and_folders(tmp_path):
    _touch(tmp_path, "a.md", "b.txt", "drafts/c.md", "keep/d.md", "keep/e.csv")
    assert _names(tmp_path, exclude=["*.txt"]) == ["a.md", "drafts/c.md", "keep/d.md", "keep/e.csv"]
    assert _names(tmp_path, exclude=["drafts", "keep/*.csv"]) == ["a.md", "b.txt", "keep/d.md"]


def test_walk_of_a_single_file(tmp_path):
    _touch(tmp_path, "one.txt")
    assert list(walk(tmp_path / "one.txt")) == [tmp_path / "one.txt"]


# --- readers


def test_read_text_keeps_line_numbers_and_drops_a_bom(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufefffirst\n\nthird é\n".encode())
    assert read_file(path) == [(1, "first"), (2, ""), (3, "third é")]


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("nul.txt", b"text\x00more", "binary"),
        ("blob.dat", bytes(range(256)), "binary"),
        ("latin1.md", "café".encode("latin-1"), "invalid UTF-8"),
        ("utf16.txt", "hello".encode("utf-16"), "binary"),
    ],
    ids=["nul", "binary-data", "latin-1", "utf-16"],
)
def test_read_rejects_binary_and_undecodable_files(tmp_path, name, data, reason):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(SkipFile) as e:
        read_file(path)
    assert e.value.reason == reason


def test_read_rejects_missing_and_oversized_files(tmp_path, monkeypatch):
    with pytest.raises(SkipFile) as e:
        read_file(tmp_path / "gone.txt")
    assert e.value.reason == "unreadable"
    (tmp_path / "big.txt").write_text("x" * 100)
    monkeypatch.setattr(ingest, "MAX_FILE_BYTES", 50)
    with pytest.raises(SkipFile) as e:
        read_file(tmp_path / "big.txt")
    assert e.value.reason == "too large"


def test_read_html_strips_markup_scripts_and_styles_keeping_source_lines(tmp_path):
    page = (
        "<html><head><title>Guide</title>\n"
        "<style>body { color: red }</style></head>\n"
        "<body><h1>Install</h1>\n"
        "<p>Run the <b>installer</b>\n"
        "then reboot &amp; enjoy.</p>\n"
        "<script>var secret = 1;</script>\n"
        "<p>Done</p></body></html>\n"
    )
    (tmp_path / "a.html").write_text(page)
    lines = [(n, t) for n, t in read_file(tmp_path / "a.html") if t]
    assert lines == [
        (1, "Guide"),
        (3, "Install"),
        (4, "Run the installer"),
        (5, "then reboot & enjoy."),
        (7, "Done"),
    ]


def _tiny_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF with one line of Helvetica text per page."""
    n = len(pages)
    objs = ["<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(n))
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {n} >>")
    objs.append("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, text in enumerate(pages):
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            f"/Contents {5 + 2 * i} 0 R >>"
        )
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{obj}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def test_read_pdf_numbers_lines_by_page(tmp_path):
    pytest.importorskip("pypdf", reason="pypdf (optional) is not installed")
    (tmp_path / "a.pdf").write_bytes(_tiny_pdf(["river crossing", "mountain pass"]))
    lines = [(n, t.strip()) for n, t in read_file(tmp_path / "a.pdf") if t.strip()]
    assert lines == [(1, "river crossing"), (2, "mountain pass")]
    (tmp_path / "bad.pdf").write_bytes(b"%PDF-1.4 garbage")
    with pytest.raises(SkipFile) as e:
        read_file(tmp_path / "bad.pdf")
    assert e.value.reason == "unreadable PDF"


def test_read_pdf_without_pypdf_is_skipped_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pypdf", None)
    (tmp_path / "a.pdf").write_bytes(_tiny_pdf(["x"]))
    with pytest.raises(SkipFile, match="install pypdf"):
        read_file(tmp_path / "a.pdf")


# --- chunking


def _numbered(text: str) -> list[tuple[int, str]]:
    return list(enumerate(text.split("\n"), 1))


def test_chunks_keep_paragraphs_and_line_ranges():
    text = "alpha one\nalpha two\n\nbeta one\n\n\ngamma one\ngamma two"
    assert chunk_lines(_numbered(text), ChunkConfig(max_chars=25, overlap_lines=0)) == [
        Chunk(1, 2, "alpha one\nalpha two"),
        Chunk(4, 4, "beta one"),
        Chunk(7, 8, "gamma one\ngamma two"),
    ]
    assert chunk_lines(_numbered(text), ChunkConfig(max_chars=1000)) == [
        Chunk(1, 8, "alpha one\nalpha two\nbeta one\ngamma one\ngamma two")
    ]


def test_chunks_overlap_and_headings_start_sections():
    text = "\n".join(f"l{i} aaaaaa" for i in range(1, 9)) + "\n# Head\nunder it"
    chunks = chunk_lines(_numbered(text), ChunkConfig(max_chars=40, overlap_lines=1))
    assert [(c.start_line, c.end_line) for c in chunks] == [(1, 3), (3, 6), (6, 8), (9, 10)]
    assert chunks[1].text.split("\n")[0] == chunks[0].text.split("\n")[-1] == "l3 aaaaaa"  # repeated line
    assert chunks[3].text == "# Head\nunder it"  # a heading starts clean, without the overlap


def test_long_lines_are_cut_and_blank_input_gives_nothing():
    chunks = chunk_lines([(7, "x" * 25)], ChunkConfig(max_chars=10, overlap_lines=0))
    assert [(c.start_line, c.end_line, len(c.text)) for c in chunks] == [(7, 7, 10), (7, 7, 10), (7, 7, 5)]
    assert chunk_lines([(1, ""), (2, "   ")]) == []


@settings(max_examples=150, deadline=None)
@given(
    lines=st.lists(st.text(alphabet="ab #\n", max_size=40).map(lambda s: s.replace("\n", "")), max_size=40),
    max_chars=st.integers(5, 120),
    overlap=st.integers(0, 3),
)
def test_chunk_invariants(lines, max_chars, overlap):
    numbered = list(enumerate(lines, 1))
    chunks = chunk_lines(numbered, ChunkConfig(max_chars=max_chars, overlap_lines=overlap))
    for c in chunks:
        assert len(c.text) <= max_chars
        assert 1 <= c.start_line <= c.end_line <= len(lines)
        assert c.text.strip()
    # every non-blank line's text is in a chunk, in order
    covered = "\n".join(c.text for c in chunks).replace("\n", "")
    for no, text in numbered:
        if text.strip():
            assert any(c.start_line <= no <= c.end_line for c in chunks)
    assert covered.count("a") >= sum(t.rstrip().count("a") for t in lines)
    # chunks advance through the file
    assert [c.start_line for c in chunks] == sorted(c.start_line for c in chunks)
