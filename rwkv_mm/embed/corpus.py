"""Licence-clean English text for training and evaluating the embedder, from Debian packages.

Sources (specs/embed.md §6; every one allows shipping a model trained on it):

| package          | what is read                                          | licence of the text        |
|------------------|-------------------------------------------------------|----------------------------|
| wordnet-base     | ``usr/share/wordnet/data.{noun,verb,adj,adv}``        | WordNet 3.0 (permissive)   |
| bible-kjv-text   | ``usr/lib/bible.data`` via the package's ``bible``    | public domain (KJV, 1611)  |
| + bible-kjv      |   reader (``bible -l100000 -p usr/lib Gen1:1-Rev22:21``) |                         |
| sword-text-web   | SWORD zText module engWEB2015eb (World English Bible) | public domain              |
| python3.11-doc   | ``usr/share/doc/python3.11-doc/html/**/*.html`` ``<p>`` | PSF License Agreement v2 |

GPL texts (GCIDE, debian-reference) and fortunes (mixed licences) are left out on purpose. Plain
descriptive sentences generated from WordNet's verb frames and "What is a ...?" questions
(`rwkv_mm.embed.frames`) add the registers the sources lack.

``build`` writes, under ``out``:
- ``sentences.tsv``: ``source<TAB>text``, deduplicated, the texts the teacher labels;
- ``pairs.tsv``: ``kind<TAB>a<TAB>b`` positive pairs (WordNet example -> definition, KJV -> WEB verse,
  a verb-frame sentence -> the same with a synonym of the verb, a question -> the definition);
- ``heldout.tsv``: ``synset<TAB>lemma<TAB>definition<TAB>example`` WordNet synsets that never reach training
  (no text of theirs is in sentences.tsv or pairs.tsv): the retrieval evaluation;
- ``stats.json``: counts per source.

CLI::

    python -m rwkv_mm.embed.corpus fetch runs/embed/root     # apt-get download + dpkg -x (no install)
    python -m rwkv_mm.embed.corpus build runs/embed/root runs/embed/data
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import random
import re
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from .frames import frame_sentences, question_pairs

__all__ = ["Synset", "build", "read_kjv", "read_python_docs", "read_web", "read_wordnet"]

logger = logging.getLogger(__name__)

PACKAGES = ("wordnet-base", "bible-kjv-text", "bible-kjv", "sword-text-web", "python3.11-doc")
WORDNET_POS = ("noun", "verb", "adj", "adv")

# KJV book names as the `bible` reader prints them -> OSIS ids (the SWORD module's book ids)
KJV_BOOKS = {
    "Genesis": "Gen", "Exodus": "Exod", "Leviticus": "Lev", "Numbers": "Num", "Deuteronomy": "Deut",
    "Joshua": "Josh", "Judges": "Judg", "Ruth": "Ruth", "1 Samuel": "1Sam", "2 Samuel": "2Sam",
    "1 Kings": "1Kgs", "2 Kings": "2Kgs", "1 Chronicles": "1Chr", "2 Chronicles": "2Chr", "Ezra": "Ezra",
    "Nehemiah": "Neh", "Esther": "Esth", "Job": "Job", "Psalms": "Ps", "Proverbs": "Prov",
    "Ecclesiastes": "Eccl", "Song of Solomon": "Song", "Isaiah": "Isa", "Jeremiah": "Jer",
    "Lamentations": "Lam", "Ezekiel": "Ezek", "Daniel": "Dan", "Hosea": "Hos", "Joel": "Joel", "Amos": "Amos",
    "Obadiah": "Obad", "Jonah": "Jonah", "Micah": "Mic", "Nahum": "Nah", "Habakkuk": "Hab",
    "Zephaniah": "Zeph", "Haggai": "Hag", "Zechariah": "Zech", "Malachi": "Mal", "Matthew": "Matt",
    "Mark": "Mark", "Luke": "Luke", "John": "John", "Acts": "Acts", "Romans": "Rom", "1 Corinthians": "1Cor",
    "2 Corinthians": "2Cor", "Galatians": "Gal", "Ephesians": "Eph", "Philippians": "Phil",
    "Colossians": "Col", "1 Thessalonians": "1Thess", "2 Thessalonians": "2Thess", "1 Timothy": "1Tim",
    "2 Timothy": "2Tim", "Titus": "Titus", "Philemon": "Phlm", "Hebrews": "Heb", "James": "Jas",
    "1 Peter": "1Pet", "2 Peter": "2Pet", "1 John": "1John", "2 John": "2John", "3 John": "3John",
    "Jude": "Jude", "Revelation": "Rev",
}  # fmt: skip


def fetch(root: str | Path, packages: tuple[str, ...] = PACKAGES) -> Path:
    """Download the Debian packages (``apt-get download``) and unpack them into ``root`` (``dpkg -x``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", *packages], cwd=tmp, check=True)
        for deb in sorted(Path(tmp).glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
            logger.info("unpacked %s", deb.name)
    return root


# ----------------------------------------------------------------------------------------------------------
# WordNet


POINTER_POS = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}


@dataclass
class Synset:
    """One WordNet synset: id ``pos:offset``, its lemmas (spaces for underscores), definition, examples,
    pointers ``(symbol, target id)`` (``@`` hypernym, ``~`` hyponym, ...; wninput(5WN)) and, for verbs, the
    numbers of its generic sentence frames ("Somebody ----s something" = 8)."""

    id: str
    lemmas: list[str]
    definition: str
    examples: list[str] = field(default_factory=list)
    pointers: list[tuple[str, str]] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)


def _split_gloss(gloss: str) -> tuple[str, list[str]]:
    """'def; "ex 1"; "ex 2"' -> ('def', ['ex 1', 'ex 2']): the quoted parts are the examples."""
    examples = [m.strip() for m in re.findall(r'"([^"]+)"', gloss)]
    definition = re.sub(r'"[^"]*"', "", gloss)
    parts = [p.strip() for p in definition.split(";")]
    definition = "; ".join(p for p in parts if p)
    return definition.strip(" ;:,"), [e for e in examples if len(e.split()) >= 2]


def read_wordnet(root: str | Path) -> list[Synset]:
    """Every synset of ``root/usr/share/wordnet/data.*`` (the licence header lines, which start with two
    spaces, skipped; ``w_cnt`` is hexadecimal)."""
    out = []
    for pos in WORDNET_POS:
        path = Path(root) / "usr/share/wordnet" / f"data.{pos}"
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue
                head, gloss = line.split("|", 1)
                fields = head.split()
                n = int(fields[3], 16)
                lemmas = [re.sub(r"\(.*\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(n)]
                at = 4 + 2 * n  # p_cnt, then (symbol, offset, pos, source/target) per pointer
                n_ptr = int(fields[at])
                ptrs = [fields[at + 1 + 4 * i : at + 4 + 4 * i] for i in range(n_ptr)]
                pointers = [(sym, f"{POINTER_POS[p]}:{off}") for sym, off, p in ptrs]
                at += 1 + 4 * n_ptr  # verbs: f_cnt, then ("+", frame number, word number) per frame
                n_frames = int(fields[at]) if pos == "verb" else 0
                frames = [int(fields[at + 2 + 3 * i]) for i in range(n_frames)]
                definition, examples = _split_gloss(gloss.strip())
                if definition:
                    out.append(Synset(f"{pos}:{fields[0]}", lemmas, definition, examples, pointers, frames))
    logger.info("wordnet: %d synsets", len(out))
    return out


# ----------------------------------------------------------------------------------------------------------
# Bibles


def read_kjv(root: str | Path) -> dict[str, str]:
    """KJV verses by OSIS reference ("Gen.1.1"), through the package's own ``bible`` reader."""
    root = Path(root)
    cmd = [str(root / "usr/bin/bible"), "-l100000", "-p", str(root / "usr/lib"), "Gen1:1-Rev22:21"]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    verses: dict[str, str] = {}
    chapter = None
    for line in text.splitlines():
        m = re.match(r"^(\d? ?[A-Z][A-Za-z ]+?) (\d+)$", line)
        if m and m.group(1) in KJV_BOOKS:
            chapter = f"{KJV_BOOKS[m.group(1)]}.{m.group(2)}"
            continue
        m = re.match(r"^\s+(\d+) (.+)$", line)
        if m and chapter:
            verses[f"{chapter}.{m.group(1)}"] = m.group(2).strip()
    logger.info("kjv: %d verses", len(verses))
    return verses


def _osis_text(raw: str) -> str:
    """Plain text of an OSIS verse: notes and titles dropped, tags replaced by nothing, spaces squeezed."""
    raw = re.sub(r"<note\b.*?</note>", " ", raw, flags=re.S)
    raw = re.sub(r"<title\b.*?</title>", " ", raw, flags=re.S)
    raw = re.sub(r"<[^>]+>", "", raw)
    return re.sub(r"\s+", " ", html.unescape(raw)).strip()


def _zipped_entries(prefix: Path) -> Iterator[str]:
    """The entries of one SWORD zText testament (``.bzs`` 12-byte block index: offset, size, raw size;
    ``.bzv`` 10-byte entry index: block, offset, size; ``.bzz`` zlib blocks), in index order."""
    bzs = prefix.with_suffix(".bzs").read_bytes()
    bzv = prefix.with_suffix(".bzv").read_bytes()
    bzz = prefix.with_suffix(".bzz").read_bytes()
    blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs), 12)]
    cache: dict[int, bytes] = {}
    for i in range(0, len(bzv), 10):
        block, offset, size = struct.unpack_from("<IIH", bzv, i)
        if size == 0:
            yield ""
            continue
        if block not in cache:
            cache.clear()
            start, csize, _ = blocks[block]
            cache[block] = zlib.decompress(bzz[start : start + csize])
        yield cache[block][offset : offset + size].decode("utf-8", errors="replace")


def read_web(root: str | Path) -> dict[str, str]:
    """World English Bible verses by OSIS reference, from the SWORD module of sword-text-web.

    The index has one slot per book heading, chapter heading and verse in versification order; a
    chapter heading slot holds ``<chapter ... sID="Gen.1"/>``, a book heading slot opens the book's
    ``<div type="book">``. Verses are counted from 1 after each chapter heading.
    """
    folder = next((Path(root) / "usr/share/sword/modules/texts/ztext").iterdir())
    verses: dict[str, str] = {}
    for testament in ("ot", "nt"):
        chapter, verse = None, 0
        for raw in _zipped_entries(folder / testament):
            m = re.search(r'<chapter\b[^>]*\bsID="([^"]+)"', raw)
            if m and not _osis_text(raw):
                chapter, verse = m.group(1), 0
                continue
            if re.search(r'<div\b[^>]*\bsID="[^"]*"[^>]*\btype="book"', raw) or re.search(
                r'<div\b[^>]*\btype="book"[^>]*\bsID="', raw
            ):
                chapter = None  # a book heading: no verse until the next chapter heading
                continue
            if chapter is None:
                continue
            verse += 1
            text = _osis_text(raw)
            if text:
                verses[f"{chapter}.{verse}"] = text
    logger.info("web: %d verses", len(verses))
    return verses


# ----------------------------------------------------------------------------------------------------------
# Python documentation


class _Paragraphs(HTMLParser):
    """Collects the text of ``<p>`` elements outside code/pre blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.paragraphs: list[str] = []
        self._buf: list[str] | None = None
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag == "p":
            self._buf = []
        elif tag in ("pre", "script", "style"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag == "p" and self._buf is not None:
            self.paragraphs.append(" ".join("".join(self._buf).split()))
            self._buf = None
        elif tag in ("pre", "script", "style"):
            self._skip = max(0, self._skip - 1)

    def handle_data(self, data):
        if self._buf is not None and not self._skip:
            self._buf.append(data)


def split_sentences(text: str, min_words: int = 4, max_words: int = 60) -> list[str]:
    """Sentences of a paragraph (split after . ! ? before a capital), kept if ``min_words..max_words`` long
    and mostly letters."""
    out = []
    for s in re.split(r"(?<=[.!?])\s+(?=[A-Z(\"'])", text):
        s = s.strip().replace("\u00b6", "")
        n = len(s.split())
        letters = sum(c.isalpha() or c == " " for c in s)
        if min_words <= n <= max_words and letters >= 0.8 * len(s):
            out.append(s)
    return out


def read_python_docs(root: str | Path) -> list[str]:
    """Prose sentences of the Python 3.11 HTML documentation (changelog pages skipped)."""
    folder = Path(root) / "usr/share/doc/python3.11-doc/html"
    out = []
    for page in sorted(folder.rglob("*.html")):
        if "changelog" in page.name or page.parts[-2] == "_static":
            continue
        parser = _Paragraphs()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        for p in parser.paragraphs:
            out.extend(split_sentences(p))
    logger.info("python docs: %d sentences", len(out))
    return out


# ----------------------------------------------------------------------------------------------------------
# assembling


def _clean(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())


def build(
    root: str | Path,
    out: str | Path,
    n_heldout: int = 2000,
    seed: int = 0,
    shuffle_from: int = 40000,
    frames_per_verb: int = 2,
    rich_frames_per_verb: int = 2,
    questions: bool = True,
) -> dict[str, int]:
    """Extract every source under ``root`` and write the files of the module docstring into ``out``.

    Held-out synsets: ``n_heldout`` synsets drawn with ``random.Random(seed)`` among those with a
    definition and an example; none of their texts (definition, examples) is written for training, and
    any training text equal to one of them is dropped.

    Order of sentences.tsv: the first `shuffle_from` rows in source order (WordNet first), the rest shuffled
    with ``random.Random(1)``, so that any prefix the teacher has labelled mixes every source. (The bundled
    run labelled 40,000 rows before the shuffle was introduced; the default keeps that order.)

    Returns:
        Counts per source and file.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    synsets = read_wordnet(root)
    with_example = [s for s in synsets if s.examples]
    heldout = random.Random(seed).sample(with_example, n_heldout)
    held_ids = {s.id for s in heldout}
    banned = {_clean(t).lower() for s in heldout for t in (s.definition, *s.examples)}

    seen: set[str] = set()
    sentences: list[tuple[str, str]] = []

    def add(source: str, text: str) -> None:
        text = _clean(text)
        key = text.lower()
        if text and key not in seen and key not in banned:
            seen.add(key)
            sentences.append((source, text))

    pairs: list[tuple[str, str, str]] = []
    for s in synsets:
        if s.id in held_ids:
            continue
        add("wordnet-def", s.definition)
        for e in s.examples:
            add("wordnet-ex", e)
            if _clean(e).lower() not in banned and _clean(s.definition).lower() not in banned:
                pairs.append(("wordnet", _clean(e), _clean(s.definition)))
        if len(s.lemmas) >= 2:
            add("wordnet-lemmas", ", ".join(s.lemmas))
    kjv, web = read_kjv(root), read_web(root)
    for ref, text in kjv.items():
        add("kjv", text)
        if ref in web:
            pairs.append(("bible", _clean(text), _clean(web[ref])))
    for text in web.values():
        add("web", text)
    for text in read_python_docs(root):
        add("python-docs", text)

    rest = sentences[shuffle_from:]
    random.Random(1).shuffle(rest)
    sentences = sentences[:shuffle_from] + rest
    # generated text last, each block after the one before, so that earlier rows keep their places (and
    # their teacher vectors) when a block is added
    for source, n, rich in (
        ("wordnet-frames", frames_per_verb, False),
        ("wordnet-frames-rich", rich_frames_per_verb, True),
    ):
        if n:
            framed, framed_pairs = frame_sentences(synsets, root, held_ids, n, seed=seed + rich, rich=rich)
            for text in framed:
                add(source, text)
            pairs += [("frames", a, b) for a, b in framed_pairs]
            for _, b in framed_pairs:
                add(source, b)
    if questions:
        for q, definition in question_pairs(synsets, root, held_ids):
            add("wordnet-questions", q)
            pairs.append(("questions", q, _clean(definition)))
    with open(out / "sentences.tsv", "w", encoding="utf-8") as f:
        for source, text in sentences:
            f.write(f"{source}\t{text}\n")
    with open(out / "pairs.tsv", "w", encoding="utf-8") as f:
        for kind, a, b in pairs:
            f.write(f"{kind}\t{a}\t{b}\n")
    with open(out / "heldout.tsv", "w", encoding="utf-8") as f:
        for s in heldout:
            f.write(f"{s.id}\t{_clean(s.lemmas[0])}\t{_clean(s.definition)}\t{_clean(s.examples[0])}\n")
    stats: dict[str, int] = {}
    for source, _ in sentences:
        stats[source] = stats.get(source, 0) + 1
    stats.update(
        sentences=len(sentences),
        pairs_wordnet=sum(k == "wordnet" for k, _, _ in pairs),
        pairs_bible=sum(k == "bible" for k, _, _ in pairs),
        pairs_frames=sum(k == "frames" for k, _, _ in pairs),
        pairs_questions=sum(k == "questions" for k, _, _ in pairs),
        heldout_synsets=len(heldout),
        kjv_verses=len(kjv),
        web_verses=len(web),
    )
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    logger.info("wrote %s: %s", out, stats)
    return stats


def main(argv: list[str] | None = None) -> int:
    """``python -m rwkv_mm.embed.corpus {fetch,build}``."""
    parser = argparse.ArgumentParser(
        prog="python -m rwkv_mm.embed.corpus", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="apt-get download the packages and unpack them into ROOT")
    p_fetch.add_argument("root")
    p_build = sub.add_parser("build", help="extract sentences, pairs and held-out synsets")
    p_build.add_argument("root")
    p_build.add_argument("out")
    p_build.add_argument("--heldout", type=int, default=2000)
    p_build.add_argument("--seed", type=int, default=0)
    p_build.add_argument("--frames-per-verb", type=int, default=2, help="verb-frame sentences per verb lemma")
    p_build.add_argument("--rich-frames-per-verb", type=int, default=2, help="the same, rich style")
    p_build.add_argument("--no-questions", action="store_true", help="no 'What is a ...?' questions")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "fetch":
        fetch(args.root)
    else:
        stats = build(
            args.root,
            args.out,
            args.heldout,
            args.seed,
            frames_per_verb=args.frames_per_verb,
            rich_frames_per_verb=args.rich_frames_per_verb,
            questions=not args.no_questions,
        )
        print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
