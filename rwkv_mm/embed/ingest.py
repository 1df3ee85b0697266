"""File discovery, readers and chunking for the embedding index.

Three steps, each usable on its own:

* :func:`walk` lists the files under a folder, skipping hidden paths, paths ignored by ``.gitignore`` files
  (the folder's own, those below it, and those of its parents up to the enclosing git repository) and paths
  matching ``--exclude`` globs.
* :func:`read_file` turns one file into numbered lines: plain text as is (UTF-8, a BOM allowed), HTML with
  its tags, scripts and styles stripped (line numbers stay those of the source), PDF through the optional
  ``pypdf`` (the "line" number of a PDF line is its page number). Binary, undecodable, unreadable and
  oversized files raise :class:`SkipFile` with a short reason; the caller logs and counts them.
* :func:`chunk_lines` packs numbered lines into chunks of at most ``max_chars`` characters: paragraphs
  (blank-line separated blocks; a Markdown heading starts a new block and a new chunk) are kept whole when
  they fit, long ones are split by lines, and each chunk repeats the last ``overlap_lines`` lines of the
  previous one. Every chunk keeps its first and last line number.
"""

from __future__ import annotations

import fnmatch
import html.parser
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Chunk", "ChunkConfig", "SkipFile", "chunk_lines", "read_file", "walk"]

log = logging.getLogger(__name__)

HTML_EXTENSIONS = frozenset({".html", ".htm", ".xhtml"})
PDF_EXTENSION = ".pdf"
# Never documents: not read, not counted, not warned about. Every other file is read as text (HTML and PDF
# get their own readers) and skipped, with a warning, when it turns out binary or not UTF-8.
BINARY_EXTENSIONS = frozenset(
    ".png .jpg .jpeg .gif .bmp .ico .webp .tif .tiff .psd .mp3 .mp4 .m4a .wav .flac .ogg .avi .mov .mkv "
    ".webm .zip .gz .tgz .bz2 .xz .zst .7z .rar .tar .jar .whl .egg .pyc .pyo .so .o .a .dll .dylib .exe "
    ".bin .class .pt .pth .ckpt .safetensors .onnx .npy .npz .pkl .pickle .h5 .hdf5 .parquet .arrow .faiss "
    ".ivfdata .sqlite .sqlite3 .db .woff .woff2 .ttf .otf .eot .doc .docx .xls .xlsx .ppt .pptx .odt .iso "
    ".dmg".split()
)
MAX_FILE_BYTES = 20 * 1024 * 1024

_HEADING = re.compile(r"#{1,6}\s")


class SkipFile(Exception):
    """A file that cannot be indexed; ``reason`` is short and stable ("binary", "invalid UTF-8", ...)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------------
# discovery


def _gitignore_regex(pattern: str) -> str:
    """Translate one gitignore glob (already stripped of ``!`` and a trailing ``/``) into a regex over a
    '/'-separated path relative to the .gitignore's folder."""
    anchored = "/" in pattern
    pattern = pattern.lstrip("/")
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")  # zero or more folders
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == len(pattern):
            out.append("/.*")  # everything inside
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end + 1
        elif c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    body = "".join(out)
    # a pattern without a slash matches a name at any depth
    return body if anchored else f"(?:.*/)?{body}"


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern
    negate: bool
    dir_only: bool


def _read_gitignore(path: Path) -> list[_Rule]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    rules = []
    for line in lines:
        line = line.rstrip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        if not line:
            continue
        rules.append(_Rule(re.compile(_gitignore_regex(line)), negate, dir_only))
    return rules


class _Ignores:
    """The .gitignore rule sets that apply to a folder: (folder, rules) pairs, outermost first."""

    def __init__(self, levels: tuple[tuple[str, list[_Rule]], ...] = ()) -> None:
        self.levels = levels

    def child(self, folder: str) -> _Ignores:
        rules = _read_gitignore(Path(folder, ".gitignore"))
        return _Ignores(self.levels + ((folder, rules),)) if rules else self

    def ignored(self, path: str, is_dir: bool) -> bool:
        result = False
        for folder, rules in self.levels:
            rel = path[len(folder) + 1 :].replace(os.sep, "/")
            for rule in rules:
                if (not rule.dir_only or is_dir) and rule.regex.fullmatch(rel):
                    result = not rule.negate
        return result


def _parent_ignores(root: str) -> _Ignores:
    """Rules from the .gitignore files above ``root``, up to the folder holding ``.git`` (if any)."""
    parents = []
    for parent in Path(root).parents:
        parents.append(str(parent))
        if (parent / ".git").exists():
            break
    else:
        return _Ignores()
    ignores = _Ignores()
    for parent in reversed(parents):
        ignores = ignores.child(parent)
    return ignores


def _excluded(rel: str, name: str, excludes: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(name, g) for g in excludes)


def walk(
    root: str | os.PathLike,
    exclude: Sequence[str] = (),
    gitignore: bool = True,
    skip: Iterable[str | os.PathLike] = (),
) -> Iterator[Path]:
    """Yield the candidate document files under ``root`` in sorted order.

    Args:
        root (path): folder to walk; a single file is yielded as is.
        exclude (sequence of str, optional): globs matched (fnmatch) against the path relative to ``root`` and
            against the name; a matching folder is skipped whole. Defaults to ().
        gitignore (bool, optional): honour .gitignore files. Defaults to True.
        skip (iterable of paths, optional): folders never entered (e.g. the index itself). Defaults to ().

    Hidden files and folders (name starting with "."), symlinked folders and files with a known binary
    extension (images, archives, compiled files, model weights) are never yielded.
    """
    root = os.path.abspath(root)
    if os.path.isfile(root):
        yield Path(root)
        return
    skip_set = {os.path.abspath(p) for p in skip}
    ignores = _parent_ignores(root) if gitignore else _Ignores()
    yield from _walk_dir(root, root, ignores, tuple(exclude), gitignore, skip_set)


def _walk_dir(
    folder: str, root: str, ignores: _Ignores, exclude: tuple[str, ...], gitignore: bool, skip: set[str]
) -> Iterator[Path]:
    if gitignore:
        ignores = ignores.child(folder)
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        log.warning("cannot list %s: %s", folder, e.strerror or e)
        return
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            continue
        path = entry.path
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            is_file = not is_dir and entry.is_file()
        except OSError:
            continue
        if not (is_dir or is_file) or path in skip:
            continue
        if exclude and _excluded(path[len(root) + 1 :].replace(os.sep, "/"), name, exclude):
            continue
        if gitignore and ignores.ignored(path, is_dir):
            continue
        if is_dir:
            yield from _walk_dir(path, root, ignores, exclude, gitignore, skip)
        elif os.path.splitext(name)[1].lower() not in BINARY_EXTENSIONS:
            yield Path(path)


# ---------------------------------------------------------------------------------------------------------
# readers


class _HTMLText(html.parser.HTMLParser):
    """Collect an HTML page's visible text as (source line, text) pairs; block tags break paragraphs."""

    BLOCK = frozenset(
        "p div br li ul ol h1 h2 h3 h4 h5 h6 tr table section article header footer pre blockquote dt dd hr "
        "title".split()
    )
    HIDDEN = frozenset({"script", "style", "noscript", "template"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[tuple[int, str]] = []
        self._parts: list[str] = []
        self._line = 1
        self._hidden = 0

    def _flush(self, paragraph: bool = False) -> None:
        text = " ".join("".join(self._parts).split())
        if text:
            self.lines.append((self._line, text))
        if paragraph and self.lines and self.lines[-1][1]:
            self.lines.append((self._line, ""))
        self._parts = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.HIDDEN:
            self._hidden += 1
        elif tag in self.BLOCK:
            self._flush(paragraph=tag != "br")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self._hidden = max(0, self._hidden - 1)
        elif tag in self.BLOCK:
            self._flush(paragraph=True)

    def handle_data(self, data: str) -> None:
        if self._hidden:
            return
        line = self.getpos()[0]
        for i, piece in enumerate(data.split("\n")):
            if i:
                self._flush()  # a source line break ends an output line, so line numbers stay exact
            if piece.strip() and not "".join(self._parts).strip():
                self._line = line + i
            self._parts.append(piece)

    def close(self) -> None:
        super().close()
        self._flush()


def _decode(data: bytes) -> str:
    if b"\x00" in data:
        raise SkipFile("binary")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SkipFile("invalid UTF-8", f"byte {e.start}") from None


def _read_pdf(path: Path) -> list[tuple[int, str]]:
    try:
        import pypdf
    except ImportError:
        raise SkipFile("PDF (install pypdf to index PDFs)") from None
    try:
        reader = pypdf.PdfReader(str(path))
        lines = []
        for page_no, page in enumerate(reader.pages, 1):
            lines.extend((page_no, line) for line in (page.extract_text() or "").splitlines())
            lines.append((page_no, ""))
        return lines
    except Exception as e:  # pypdf raises many kinds of errors on damaged files
        raise SkipFile("unreadable PDF", str(e)) from None


def read_file(path: str | os.PathLike, data: bytes | None = None) -> list[tuple[int, str]]:
    """Read one document as (line number, text) pairs (1-based; a PDF line's number is its page).

    Args:
        path (path): the file.
        data (bytes, optional): the file's bytes when the caller has read them already (to hash them).
            Defaults to None (read here).

    Raises:
        SkipFile: binary, not UTF-8, unreadable, over 20 MiB, or a PDF without pypdf.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == PDF_EXTENSION:
        return _read_pdf(path)
    if data is None:
        data = read_bytes(path)
    text = _decode(data)
    if suffix in HTML_EXTENSIONS:
        parser = _HTMLText()
        parser.feed(text)
        parser.close()
        return parser.lines
    return list(enumerate(text.splitlines(), 1))


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes, with the size limit and read errors turned into :class:`SkipFile`."""
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise SkipFile("too large", f"{size} bytes > {MAX_FILE_BYTES}")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SkipFile("unreadable", e.strerror or str(e)) from None


# ---------------------------------------------------------------------------------------------------------
# chunking


@dataclass(frozen=True)
class ChunkConfig:
    """How files are cut into chunks (stored in the index's config.json)."""

    max_chars: int = 1000  # a chunk's text length limit; a paragraph that fits is never split
    overlap_lines: int = 2  # lines of the previous chunk repeated at the start of the next


@dataclass(frozen=True)
class Chunk:
    """One piece of a file: its text and the first and last line (or page) it covers."""

    start_line: int
    end_line: int
    text: str


def _blocks(lines: Sequence[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """Split numbered lines into paragraphs: runs of non-blank lines; a Markdown heading starts a new one."""
    blocks: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    for no, text in lines:
        text = text.rstrip()
        if not text.strip():
            if current:
                blocks.append(current)
            current = []
            continue
        if _HEADING.match(text) and current:
            blocks.append(current)
            current = []
        current.append((no, text))
    if current:
        blocks.append(current)
    return blocks


def _units(block: list[tuple[int, str]], max_chars: int) -> list[list[tuple[int, str]]]:
    """A long block as packable units: groups of lines of at most ``max_chars``, long lines cut up."""
    units: list[list[tuple[int, str]]] = []
    group: list[tuple[int, str]] = []
    size = 0
    for no, text in block:
        pieces = [text[i : i + max_chars] for i in range(0, len(text), max_chars)]
        pieces = [p for p in pieces if p.strip()] or [text]  # a cut can leave a piece of only indentation
        for piece in pieces:
            if group and size + len(piece) + 1 > max_chars:
                units.append(group)
                group, size = [], 0
            group.append((no, piece))
            size += len(piece) + 1
    if group:
        units.append(group)
    return units


def chunk_lines(lines: Sequence[tuple[int, str]], config: ChunkConfig = ChunkConfig()) -> list[Chunk]:
    """Pack numbered lines into chunks (see the module docstring); blank-only input gives no chunks."""
    max_chars = config.max_chars
    chunks: list[Chunk] = []
    current: list[tuple[int, str]] = []
    fresh = False  # whether ``current`` holds anything beyond the overlap carried from the previous chunk

    def flush() -> list[tuple[int, str]]:
        chunks.append(Chunk(current[0][0], max(n for n, _ in current), "\n".join(t for _, t in current)))
        if config.overlap_lines <= 0:
            return []
        carry = current[-config.overlap_lines :]
        # an overlap larger than a quarter of a chunk would crowd out new text
        return carry if sum(len(t) + 1 for _, t in carry) <= max_chars // 4 else []

    # a paragraph cut into pieces leaves room for the overlap beside each piece
    reserve = max_chars // 4 if config.overlap_lines > 0 else 0
    for block in _blocks(lines):
        heading = bool(_HEADING.match(block[0][1]))
        fits = sum(len(t) + 1 for _, t in block) <= max_chars
        for k, unit in enumerate([block] if fits else _units(block, max(1, max_chars - reserve))):
            unit_size = sum(len(t) + 1 for _, t in unit)
            size = sum(len(t) + 1 for _, t in current)
            if fresh and ((heading and k == 0) or size + unit_size > max_chars):
                current, fresh = flush(), False
                if heading and k == 0:
                    current = []  # a section starts clean, without the previous section's tail
                size = sum(len(t) + 1 for _, t in current)
            if current and not fresh and size + unit_size > max_chars:
                current = []  # the carried overlap does not fit beside this unit
            current = current + unit
            fresh = True
    if fresh:
        flush()
    return chunks
