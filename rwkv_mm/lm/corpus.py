"""English training text for the bundled tiny LM, from Debian packages whose licences allow it.

Every source is read from the unpacked packages (``apt-get download`` + ``dpkg -x``, no root needed):

| package        | text                                                   | licence                        |
|----------------|--------------------------------------------------------|--------------------------------|
| wordnet-base   | WordNet 3.0: lemmas, glosses, examples, hypernyms      | WordNet 3.0 licence            |
| bible-kjv-text | King James Version, read with bible-kjv's ``bible``    | public domain (text of 1611)   |
| sword-text-web | World English Bible + deuterocanon (SWORD zText)       | public domain                  |
| python3.11-doc | Python 3.11 documentation, reStructuredText sources    | PSF licence v2 (examples 0BSD) |

(bible-kjv, GPL-2+, is only the program that decompresses the KJV; none of it is in the corpus.)

Documents are plain text or dialogues in the World / G1 chat shape ("User: ...\\n\\nAssistant: ...\\n\\n"),
made only from what the data says: WordNet definitions ("What does X mean?" -> gloss, examples,
synonyms, hypernym), Bible verses (quotations, King James -> World English Bible rewording of the
same verse) and the Python documentation (glossary entries, module synopses, the first paragraph of a
function or class description). Each document is held out or not by a hash of its key (a synset, a
chapter, a documentation section), so no text of the held-out set is seen in training.

The token stream is the UTF-8 bytes of the documents (``rwkv_mm.lm.tokenizer.ByteTokenizer`` ids,
byte b = id b + 1), each document followed by id 0 (end of text), stored as uint8 ``.npy`` (id 256,
byte 0xFF, never occurs in UTF-8).

    python -m rwkv_mm.lm.corpus fetch --root runs/tinylm-root     # apt-get download + dpkg -x
    python -m rwkv_mm.lm.corpus build --root runs/tinylm-root --out runs/tinylm-data
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import re
import shlex
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

__all__ = [
    "Document",
    "Source",
    "Synset",
    "Verse",
    "SOURCES",
    "bible_documents",
    "build",
    "chat",
    "encode_documents",
    "fetch",
    "is_held_out",
    "python_doc_documents",
    "read_kjv",
    "read_python_docs",
    "read_sword_ztext",
    "read_wordnet",
    "rst_to_text",
    "wordnet_documents",
]

logger = logging.getLogger(__name__)


@dataclass
class Source:
    """A Debian package the corpus reads, with what it holds and under which licence."""

    package: str
    content: str
    licence: str
    copyright: str
    version: str = ""


SOURCES = {
    "wordnet": Source(
        "wordnet-base",
        "WordNet 3.0 lexical database (/usr/share/wordnet/data.{noun,verb,adj,adv})",
        "WordNet 3.0 licence (permission to use, copy, modify and distribute for any purpose, with the "
        "copyright notice and disclaimer kept: see the WordNet notice below)",
        "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.",
    ),
    "kjv": Source(
        "bible-kjv-text",
        "King James Version of the Bible (1611), /usr/lib/bible.data, read with bible-kjv's `bible`",
        "public domain: the package's copyright file says the copyright of the KJV text has expired "
        "(in the United Kingdom the Crown's letters patent still govern printing the text itself)",
        "none (public domain)",
    ),
    "kjv-reader": Source(
        "bible-kjv",
        "the `bible` program that decompresses bible.data (a tool; nothing of it is in the corpus)",
        "GPL-2+ (not part of the corpus)",
        "Chip Chapin, Matthew Vernon and others",
    ),
    "web": Source(
        "sword-text-web",
        "World English Bible with Deuterocanon, SWORD module engWEB2015eb (NRSVA versification)",
        'public domain (dedicated by eBible.org; "World English Bible" is their trademark: the text here '
        "is reformatted, so derived text is not called the World English Bible)",
        "none (public domain)",
    ),
    "python": Source(
        "python3.11-doc",
        "Python 3.11 documentation, reStructuredText sources (html/_sources: tutorial, library, reference, "
        "howto, faq, using, glossary)",
        "PSF License Agreement v2 (documentation); code examples dual-licensed PSF / Zero-Clause BSD",
        "Copyright (c) 2001-2023 Python Software Foundation. All rights reserved.",
    ),
}
PACKAGES = [s.package for s in SOURCES.values()]


@dataclass
class Document:
    """One unit of text and of the held-out split.

    Args:
        source: key of SOURCES ("wordnet", "kjv", "web", "python"; "bible" for KJV / WEB pairs).
        key: what the split is decided on (a synset, a chapter, a documentation section).
        text: the document; documents are joined with end-of-text tokens.
        kind: "text" or "chat" (World / G1 dialogue turns).
    """

    source: str
    key: str
    text: str
    kind: str = "text"


def is_held_out(key: str, fraction: float, seed: int = 0) -> bool:
    """Whether the document group `key` belongs to the held-out set (a stable hash, ~fraction of keys)."""
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def chat(turns: Iterable[tuple[str, str]]) -> str:
    """Dialogue turns in the World / G1 format: "User: q\\n\\nAssistant: a\\n\\n" per turn.

    Messages are cleaned as the chat front end cleans them: runs of newlines collapse to one, so that
    "\\n\\n" only ever separates turns.
    """
    out = []
    for q, a in turns:
        q, a = (re.sub(r"\n+", "\n", s.replace("\r\n", "\n")).strip() for s in (q, a))
        out.append(f"User: {q}\n\nAssistant: {a}\n\n")
    return "".join(out)


def _sentence(text: str) -> str:
    """`text` with a capital first letter and a final full stop (unless it ends in punctuation)."""
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?\"'”)" else text + "."


# ---------------------------------------------------------------------------------------------- WordNet
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


@dataclass
class Synset:
    """A WordNet synset: lemmas (spaces, no markers), definition, quoted examples, and the offsets of its
    hypernyms ("@": a kind of) and of the classes it is an instance of ("@i": a person, a place)."""

    offset: str
    pos: str
    lemmas: list[str]
    definition: str
    examples: list[str]
    hypernyms: list[str] = field(default_factory=list)
    instance_of: list[str] = field(default_factory=list)


def _parse_wordnet_line(line: str) -> Synset:
    head, _, gloss = line.partition(" | ")
    f = head.split()
    offset, pos, w_cnt = f[0], f[2], int(f[3], 16)
    lemmas = [re.sub(r"\((a|p|ip)\)$", "", w).replace("_", " ") for w in f[4 : 4 + 2 * w_cnt : 2]]
    at = 4 + 2 * w_cnt
    p_cnt = int(f[at])
    pointers = [f[at + 1 + 4 * i : at + 5 + 4 * i] for i in range(p_cnt)]
    hypernyms = [p[1] for p in pointers if p[0] == "@"]
    instance_of = [p[1] for p in pointers if p[0] == "@i"]
    examples = re.findall(r'"([^"]+)"', gloss)
    definition = re.split(r';?\s*"', gloss, maxsplit=1)[0].strip().rstrip(";").strip()
    examples = [e.strip() for e in examples if e.strip()]
    return Synset(offset, pos, lemmas, definition, examples, hypernyms, instance_of)


def read_wordnet(root: Path) -> dict[tuple[str, str], Synset]:
    """Every synset of WordNet 3.0 under root/usr/share/wordnet, keyed by (file pos, offset)."""
    synsets = {}
    for pos in ("noun", "verb", "adj", "adv"):
        path = root / "usr/share/wordnet" / f"data.{pos}"
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                s = _parse_wordnet_line(line.rstrip("\n"))
                synsets[(pos[0], s.offset)] = s
    logger.info("WordNet: %d synsets", len(synsets))
    return synsets


def _wordnet_class(s: Synset, pos_key: str, synsets: dict[tuple[str, str], Synset]) -> str:
    """ "It is a kind of X." / "It is an instance of X." for nouns with a hypernym, else ""."""
    if pos_key != "n":
        return ""
    for offsets, phrase in ((s.hypernyms, "a kind of"), (s.instance_of, "an instance of")):
        parent = synsets.get(("n", offsets[0])) if offsets else None
        if parent is not None:
            return f"It is {phrase} {parent.lemmas[0]}."
    return ""


def _wordnet_qa(s: Synset, kind: str, rng: random.Random) -> tuple[str, str]:
    """One question about a synset and the answer that WordNet gives (`kind`: `_wordnet_class`)."""
    word = rng.choice(s.lemmas[:3])
    pos = POS_NAMES[s.pos]
    question = rng.choice(
        [
            f'What does "{word}" mean?',
            f"What does {word} mean?",
            f"Define {word}.",
            f'What is the meaning of the {pos} "{word}"?',
            f"What does the word {word} mean?",
        ]
    )
    answer = [f'"{word}" ({pos}) means {s.definition.rstrip(".")}.']
    if kind:
        answer.append(kind)
    others = [w for w in s.lemmas if w != word]
    if others:
        answer.append(f"Synonyms: {', '.join(others[:4])}.")
    if s.examples:
        answer.append(f'For example: "{rng.choice(s.examples)}"')
    return question, " ".join(answer)


def _wordnet_entry(s: Synset, kind: str) -> str:
    """A dictionary-style plain-text entry."""
    text = f"{', '.join(s.lemmas)} ({POS_NAMES[s.pos]}): {s.definition}"
    if s.examples:
        text += "; " + "; ".join(f'"{e}"' for e in s.examples)
    text = text.rstrip(".") + "."
    return f"{text} {kind}\n" if kind else f"{text}\n"


def wordnet_documents(
    synsets: dict[tuple[str, str], Synset], rng: random.Random, chat_share: float = 0.5
) -> Iterator[Document]:
    """WordNet as documents: runs of 1-4 dictionary entries (as in the data files' order), or dialogues of
    1-4 turns asking what a word means. Each synset appears exactly once; the split key is the first
    synset of the document."""
    items = [(k, s) for k, s in synsets.items() if s.definition]
    i = 0
    while i < len(items):
        n = rng.randint(1, 4)
        group = items[i : i + n]
        i += n
        key = f"wordnet:{group[0][0][0]}{group[0][0][1]}"
        kinds = [_wordnet_class(s, k[0], synsets) for k, s in group]
        if rng.random() < chat_share:
            turns = [_wordnet_qa(s, kind, rng) for (_, s), kind in zip(group, kinds)]
            yield Document("wordnet", key, chat(turns), "chat")
        else:
            text = "".join(_wordnet_entry(s, kind) for (_, s), kind in zip(group, kinds))
            yield Document("wordnet", key, text, "text")


# ----------------------------------------------------------------------------------------------- Bible
@dataclass
class Verse:
    """One verse: OSIS book id (canonical books) or the file's book name, chapter, verse, text."""

    book: str
    name: str
    chapter: int
    verse: int
    text: str


# the 66 books in KJV order, OSIS ids (SWORD) and the names used in the documents
BOOKS = [
    ("Gen", "Genesis"), ("Exod", "Exodus"), ("Lev", "Leviticus"), ("Num", "Numbers"),
    ("Deut", "Deuteronomy"), ("Josh", "Joshua"), ("Judg", "Judges"), ("Ruth", "Ruth"),
    ("1Sam", "1 Samuel"), ("2Sam", "2 Samuel"), ("1Kgs", "1 Kings"), ("2Kgs", "2 Kings"),
    ("1Chr", "1 Chronicles"), ("2Chr", "2 Chronicles"), ("Ezra", "Ezra"), ("Neh", "Nehemiah"),
    ("Esth", "Esther"), ("Job", "Job"), ("Ps", "Psalms"), ("Prov", "Proverbs"),
    ("Eccl", "Ecclesiastes"), ("Song", "Song of Solomon"), ("Isa", "Isaiah"), ("Jer", "Jeremiah"),
    ("Lam", "Lamentations"), ("Ezek", "Ezekiel"), ("Dan", "Daniel"), ("Hos", "Hosea"), ("Joel", "Joel"),
    ("Amos", "Amos"), ("Obad", "Obadiah"), ("Jonah", "Jonah"), ("Mic", "Micah"), ("Nah", "Nahum"),
    ("Hab", "Habakkuk"), ("Zeph", "Zephaniah"), ("Hag", "Haggai"), ("Zech", "Zechariah"),
    ("Mal", "Malachi"), ("Matt", "Matthew"), ("Mark", "Mark"), ("Luke", "Luke"), ("John", "John"),
    ("Acts", "Acts"), ("Rom", "Romans"), ("1Cor", "1 Corinthians"), ("2Cor", "2 Corinthians"),
    ("Gal", "Galatians"), ("Eph", "Ephesians"), ("Phil", "Philippians"), ("Col", "Colossians"),
    ("1Thess", "1 Thessalonians"), ("2Thess", "2 Thessalonians"), ("1Tim", "1 Timothy"),
    ("2Tim", "2 Timothy"), ("Titus", "Titus"), ("Phlm", "Philemon"), ("Heb", "Hebrews"),
    ("Jas", "James"), ("1Pet", "1 Peter"), ("2Pet", "2 Peter"), ("1John", "1 John"),
    ("2John", "2 John"), ("3John", "3 John"), ("Jude", "Jude"), ("Rev", "Revelation"),
]  # fmt: skip
DEUTEROCANON = {
    "DanGr": "Daniel (Greek)", "Tob": "Tobit", "Jdt": "Judith", "EsthGr": "Esther (Greek)",
    "Wis": "Wisdom of Solomon", "Sir": "Sirach", "Bar": "Baruch", "1Macc": "1 Maccabees",
    "2Macc": "2 Maccabees", "1Esd": "1 Esdras", "PrMan": "Prayer of Manasseh", "AddPs": "Psalm 151",
    "3Macc": "3 Maccabees", "2Esd": "2 Esdras", "4Macc": "4 Maccabees",
}  # fmt: skip
BOOK_NAMES = dict(BOOKS) | DEUTEROCANON


def read_kjv(root: Path) -> list[Verse]:
    """The KJV verses, decompressed by the unpacked `bible` program (root/usr/bin/bible)."""
    cmd = [str(root / "usr/bin/bible"), "-l100000", "-p", str(root / "usr/lib"), "Gen1:1-Rev22:21"]
    out = subprocess.run(cmd, check=True, capture_output=True).stdout.decode("utf-8", errors="replace")
    verses, book, chapter, names = [], "", 0, []
    for line in out.splitlines():
        m = re.fullmatch(r"(\S.*?) (\d+)", line.strip()) if line and not line.startswith(" ") else None
        if m:
            if m.group(1) not in names:
                names.append(m.group(1))
            book, chapter = m.group(1), int(m.group(2))
            continue
        m = re.fullmatch(r"\s+(\d+) (.*)", line)
        if m and book:
            osis = BOOKS[len(names) - 1][0]
            verses.append(Verse(osis, BOOK_NAMES[osis], chapter, int(m.group(1)), m.group(2).strip()))
    if len(names) != len(BOOKS):
        raise ValueError(f"expected the {len(BOOKS)} books of the KJV from {cmd[0]}, got {len(names)}")
    logger.info("KJV: %d verses", len(verses))
    return verses


def _osis_to_text(s: str) -> str:
    """Verse text from OSIS markup: footnotes and headings dropped, tags removed, spaces collapsed."""
    s = re.sub(r"<note\b.*?</note>", "", s, flags=re.S)
    s = re.sub(r"<title\b.*?</title>", "", s, flags=re.S)
    s = re.sub(r"<[^>]+>", "", s)
    return re.sub(r"\s+", " ", s).strip()


def read_sword_ztext(module_dir: Path) -> list[Verse]:
    """The verses of a SWORD zText Bible module (ot.* then nt.*).

    Format: ``.bzs`` block index (uint32 offset, compressed size, size; little endian), ``.bzz`` zlib
    blocks, ``.bzv`` verse index (uint32 block, uint32 offset in the block, uint16 size) in versification
    order, with a heading entry before each book and chapter. An entry opening a chapter carries
    ``<chapter osisID="Book.N" sID=...>``; the entries after it are verses 1, 2, ... until the next
    book or chapter heading.
    """
    verses: list[Verse] = []
    for testament in ("ot", "nt"):
        bzs = (module_dir / f"{testament}.bzs").read_bytes()
        bzv = (module_dir / f"{testament}.bzv").read_bytes()
        bzz = (module_dir / f"{testament}.bzz").read_bytes()
        blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs), 12)]
        cache: dict[int, bytes] = {}
        book, chapter, verse = "", 0, 0
        for i in range(0, len(bzv) - 9, 10):
            blk, off, size = struct.unpack_from("<IIH", bzv, i)
            text = ""
            if size:
                if blk not in cache:
                    start, length, _ = blocks[blk]
                    cache = {blk: zlib.decompress(bzz[start : start + length])}  # blocks are read in order
                text = cache[blk][off : off + size].decode("utf-8", errors="replace")
            m = re.search(r'<chapter\b[^>]*osisID="([^".]+)\.(\d+)"[^>]*sID=', text)
            if m:
                book, chapter, verse = m.group(1), int(m.group(2)), 0
                continue
            if 'type="book"' in text and "sID=" in text:
                book, chapter = "", 0  # a book heading: no verses until its first chapter
                continue
            if not book:
                continue
            verse += 1
            clean = _osis_to_text(text)
            if clean:
                verses.append(Verse(book, BOOK_NAMES.get(book, book), chapter, verse, clean))
    logger.info("%s: %d verses", module_dir.name, len(verses))
    return verses


def _chapters(verses: list[Verse]) -> dict[tuple[str, int], list[Verse]]:
    out: dict[tuple[str, int], list[Verse]] = {}
    for v in verses:
        out.setdefault((v.book, v.chapter), []).append(v)
    return out


def bible_documents(
    kjv: list[Verse], web: list[Verse], rng: random.Random, qa_share: float = 0.08
) -> Iterator[Document]:
    """Both Bibles as plain chapters ("Genesis 1 (King James Version)" then numbered verses), and, for
    ~qa_share of the verses, dialogues: quoting a verse of either translation, or rewording a KJV verse
    in modern English (the WEB verse with the same reference). The split key is the chapter, so the
    dialogues made from a held-out chapter are held out with it."""
    versions = (("kjv", "King James Version", kjv), ("web", "World English Bible", web))
    web_by_ref = {(v.book, v.chapter, v.verse): v for v in web}
    for source, title, verses in versions:
        for (book, ch), vs in _chapters(verses).items():
            key = f"bible:{book}.{ch}"
            body = "\n".join(f"{v.verse} {v.text}" for v in vs)
            yield Document(source, key, f"{vs[0].name} {ch} ({title})\n\n{body}\n", "text")
            turns = []
            for v in vs:
                if rng.random() >= qa_share:
                    continue
                ref = f"{v.name} {v.chapter}:{v.verse}"
                modern = web_by_ref.get((v.book, v.chapter, v.verse)) if source == "kjv" else None
                if modern is not None and rng.random() < 0.5:
                    q = rng.choice(["Say this in modern English:", "Reword this in plain modern English:"])
                    turns.append((f'{q} "{v.text}"', modern.text))
                else:
                    q = rng.choice([f"Quote {ref} ({title}).", f"What does {ref} say in the {title}?"])
                    turns.append((q, f"{ref}: {v.text}"))
            if turns:
                yield Document(source, key, chat(turns), "chat")


# ------------------------------------------------------------------------------------- Python docs
PY_DOC_DIRS = ("tutorial", "library", "reference", "howto", "faq", "using")
PY_DOC_FILES = ("glossary.rst.txt",)
SKIP_DIRECTIVES = (
    "moduleauthor", "sectionauthor", "index", "toctree", "highlight", "testsetup", "testcleanup",
    "only", "raw", "image", "figure", "productionlist", "csv-table", "audit-event", "impl-detail",
    "include", "literalinclude", "currentmodule", "_", "tabularcolumns", "rubric", "doctest",
)  # fmt: skip
_DIRECTIVE = re.compile(r"^(\s*)\.\. ([\w:-]+)::\s*(.*)$")


def _inline(s: str) -> str:
    """reST inline markup to plain text: roles, literals, links, emphasis, substitutions, footnotes."""
    s = re.sub(r":(rfc|pep):`(\d+)[^`]*`", lambda m: f"{m.group(1).upper()} {m.group(2)}", s)
    s = re.sub(r":[\w:+-]+:`~?!?([^`<]*?)\s*<[^`>]*>`", r"\1", s)  # :role:`title <target>`
    s = re.sub(r":[\w:+-]+:`~?!?([^`]*)`", r"\1", s)  # :role:`text`
    s = re.sub(r"`([^`<]+?)\s*<[^`>]+>`__?", r"\1", s)  # `text <url>`_
    s = re.sub(r"``([^`]+)``", r"\1", s)
    s = re.sub(r"`([^`]+)`_{0,2}", r"\1", s)
    s = re.sub(r"\*\*([^*]+)\*\*", r"\1", s)
    s = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", s)
    s = re.sub(r"\s*\[#[\w-]*\]_", "", s)
    s = re.sub(r"\|(\w+)\|", r"\1", s)
    s = s.replace("\\ ", "")
    return re.sub(r"\\([^\w\s])", r"\1", s)  # escaped punctuation


def _join_continuations(lines: list[str]) -> list[str]:
    """Directive lines ending in a backslash (long signatures) joined with the next line."""
    out: list[str] = []
    for line in lines:
        if out and out[-1].endswith("\\") and _DIRECTIVE.match(out[-1]):
            out[-1] = out[-1][:-1].rstrip() + " " + line.strip()
        else:
            out.append(line)
    return out


def rst_to_text(src: str) -> list[tuple[str, str]]:
    """reStructuredText (as in Python's docs) to plain text, split at section titles.

    Headings become plain lines, directive headers become their argument ("function:: len(s)" ->
    "len(s)"), admonitions keep their body ("Note: ..."), bookkeeping directives (index, toctree,
    author notes, ...) are dropped with their indented body, literal blocks (after "::") and doctests
    are kept verbatim, inline roles and links elsewhere become their text.

    Returns:
        [(section title, section text)], in order.
    """
    lines = _join_continuations(src.replace("\r\n", "\n").split("\n"))
    sections: list[tuple[str, list[str]]] = [("", [])]
    skip_indent: int | None = None  # dropping a directive's body: lines indented deeper than this
    literal_indent: int | None = None  # inside a literal block: lines indented deeper than this
    literal_next = False  # the previous paragraph ended in "::"
    para_indent = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        body = sections[-1][1]
        if skip_indent is not None:
            if line.strip() and indent <= skip_indent:
                skip_indent = None
            else:
                i += 1
                continue
        if literal_indent is not None:
            if line.strip() and indent <= literal_indent:
                literal_indent = None
            else:
                body.append(line.rstrip())
                i += 1
                continue
        if literal_next and line.strip():
            literal_next = False
            if indent > para_indent:
                literal_indent = para_indent
                body.append(line.rstrip())
                i += 1
                continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if re.fullmatch(r"([=\-~^\"'`#*+])\1{2,}\s*", line):  # over/underline of a heading
            i += 1
            continue
        if line.strip() and re.fullmatch(r"([=\-~^\"'`#*+])\1{2,}\s*", nxt) and indent == 0:
            sections.append((_inline(line.strip()), []))
            i += 2
            continue
        if line.lstrip().startswith(">>>"):  # a doctest block runs to the next blank line
            while i < len(lines) and lines[i].strip():
                body.append(lines[i].rstrip())
                i += 1
            continue
        m = _DIRECTIVE.match(line)
        if m:
            name, arg = m.group(2), m.group(3)
            if name in SKIP_DIRECTIVES or name.startswith(("_", "|")) or name.endswith("author"):
                skip_indent = indent
            elif name in ("note", "warning", "seealso", "versionadded", "versionchanged", "deprecated"):
                label = {"versionadded": "New in version", "versionchanged": "Changed in version"}
                body.append(" " * indent + f"{label.get(name, name.capitalize())}: {_inline(arg)}".rstrip())
            elif name in ("code-block", "sourcecode", "code"):
                body.append(" " * indent + "Example:")
                literal_next, para_indent = True, indent
            elif arg:
                body.append(" " * indent + _inline(arg))
            i += 1
            while i < len(lines) and re.match(r"^\s+:[\w-]+:", lines[i]):  # directive options
                i += 1
            continue
        if re.match(r"^\s*\.\.(\s|$)", line):  # comments, link targets, footnotes
            skip_indent = indent
            i += 1
            continue
        text = _inline(line.rstrip())
        if text.endswith("::"):
            text = text[:-3] + ":" if text.endswith(" ::") else text[:-1]
            text = text.rstrip(" :") + ":" if text.strip() != ":" else ""
            literal_next, para_indent = True, indent
        body.append(text)
        i += 1
    out = []
    for title, body in sections:
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(body)).strip("\n")
        if text.strip():
            out.append((title, text))
    return out


def read_python_docs(root: Path) -> list[Path]:
    """The reST sources of the Python docs used (tutorial, library, reference, howto, faq, using,
    glossary), sorted."""
    base = root / "usr/share/doc/python3.11/html/_sources"
    files = [p for d in PY_DOC_DIRS for p in (base / d).rglob("*.rst.txt")]
    files += [base / f for f in PY_DOC_FILES]
    return sorted(files)


def _python_qa(src: str) -> list[tuple[str, str]]:
    """Questions the docs answer word for word: module synopses, glossary terms, the first paragraph of a
    function or class description."""
    pairs = []
    module = ""
    lines = _join_continuations(src.split("\n"))
    for i, line in enumerate(lines):
        m = re.match(r"^\.\. (?:module|currentmodule):: (\S+)", line)
        if m:
            module = m.group(1)
            syn = re.match(r"^\s+:synopsis: (.+)", lines[i + 1]) if i + 1 < len(lines) else None
            if syn:
                pairs.append(
                    (f"What is the Python module {module} for?", f"{module}: {_inline(syn.group(1))}")
                )
            continue
        m = re.match(r"^(\s*)\.\. (function|class|exception):: ((\w+)\(?.*)$", line)
        if m and not m.group(1):
            body, j = [], i + 1
            while j < len(lines) and (not lines[j].strip() or re.match(r"^\s+:[\w-]+:", lines[j])):
                j += 1
            while j < len(lines) and lines[j].startswith("   ") and lines[j].strip():
                if lines[j].lstrip().startswith(".. "):
                    break
                body.append(lines[j].strip())
                j += 1
            text = _inline(" ".join(body))
            if "::" in text:  # the paragraph leads into a code block: keep the sentences before it
                text = text[: text.index("::")].rpartition(". ")[0] + "."
            if len(text) > 20:
                name = f"{module}.{m.group(4)}" if module and module != "None" else m.group(4)
                what = m.group(2)
                answer = f"{name} ({what}): {text}"
                q = f"What does the Python function {name} do?" if what == "function" else f"What is {name}?"
                pairs.append((q, answer))
    in_glossary = False
    for i, line in enumerate(lines):
        if line.startswith(".. glossary::"):
            in_glossary = True
            continue
        if (
            in_glossary
            and re.match(r"^   \S", line)
            and i + 1 < len(lines)
            and lines[i + 1].startswith("      ")
        ):
            term, body, j = _inline(line.strip()), [], i + 1
            while j < len(lines) and lines[j].startswith("      ") and lines[j].strip():
                body.append(lines[j].strip())
                j += 1
            answer = _inline(" ".join(body))
            if len(answer) > 30 and not answer.endswith(":"):
                pairs.append((f"In Python, what is {term}?", f"{term}: {answer}"))
    return pairs


def python_doc_documents(files: list[Path], base: Path, rng: random.Random) -> Iterator[Document]:
    """Each section of each page as a plain document ("Title\\n\\ntext"), and each page's questions
    (`_python_qa`) as dialogues of 1-3 turns. Split keys: page + section title for the sections, page
    + term for the dialogues (whose answers are text of the same page)."""
    for path in files:
        src = path.read_text(encoding="utf-8", errors="replace")
        page = str(path.relative_to(base)).removesuffix(".rst.txt")
        for n, (title, text) in enumerate(rst_to_text(src)):
            key = f"python:{page}#{n}"
            yield Document("python", key, (f"{title}\n\n{text}\n" if title else f"{text}\n"), "text")
        pairs = _python_qa(src)
        i = 0
        while i < len(pairs):
            k = rng.randint(1, 3)
            group = pairs[i : i + k]
            i += k
            yield Document("python", f"python:{page}?{group[0][0]}", chat(group), "chat")


# --------------------------------------------------------------------------------------------- output
def encode_documents(docs: Iterable[Document]) -> np.ndarray:
    """Byte-tokenizer ids (byte b -> b + 1) of the documents, each followed by 0; uint8 [n_tokens]."""
    parts = []
    for d in docs:
        parts.append(np.frombuffer(d.text.encode("utf-8"), dtype=np.uint8) + np.uint8(1))
        parts.append(np.zeros(1, np.uint8))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def _package_versions(root: Path) -> dict[str, str]:
    path = root / "PACKAGES.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def fetch(root: Path, debs: Path | None = None) -> dict[str, str]:
    """Download the packages with `apt-get download` (into `debs`, default root/../tinylm-debs) and unpack
    them into `root` with `dpkg -x`; records {package: version} in root/PACKAGES.json."""
    debs = debs or root.parent / "tinylm-debs"
    debs.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    if not all(any(debs.glob(f"{p}_*.deb")) for p in PACKAGES):
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, check=True)
    versions = {}
    for p in PACKAGES:
        deb = sorted(debs.glob(f"{p}_*.deb"))[-1]
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True)
        versions[p] = fields.stdout.decode().strip()
    (root / "PACKAGES.json").write_text(json.dumps(versions, indent=2) + "\n")
    logger.info("unpacked %s into %s", versions, root)
    return versions


def build(root: Path, out: Path, held_out: float = 0.02, seed: int = 0, command: str = "") -> dict:
    """Read every source under `root`, split, shuffle and write out/{train,val}.npy, meta.json and
    out/samples.txt (the first documents of each kind, for a look).

    Returns:
        The metadata written to meta.json (sources with versions, counts, bytes).
    """
    rng = random.Random(seed)
    versions = _package_versions(root)
    docs: list[Document] = []
    docs += list(tqdm(wordnet_documents(read_wordnet(root), rng), desc="wordnet", unit="doc"))
    web = read_sword_ztext(root / "usr/share/sword/modules/texts/ztext/engWEB2015eb")
    docs += list(tqdm(bible_documents(read_kjv(root), web, rng), desc="bible", unit="doc"))
    base = root / "usr/share/doc/python3.11/html/_sources"
    docs += list(tqdm(python_doc_documents(read_python_docs(root), base, rng), desc="python", unit="doc"))
    rng.shuffle(docs)
    val = [d for d in docs if is_held_out(d.key, held_out, seed)]
    train = [d for d in docs if not is_held_out(d.key, held_out, seed)]
    out.mkdir(parents=True, exist_ok=True)
    stats: dict[str, dict[str, int]] = {}
    tokens = {}
    for split, part in (("train", train), ("val", val)):
        ids = encode_documents(part)
        tokens[split] = len(ids)
        np.save(out / f"{split}.npy", ids)
        for d in part:
            s = stats.setdefault(f"{split}/{d.source}/{d.kind}", {"documents": 0, "bytes": 0})
            s["documents"] += 1
            s["bytes"] += len(d.text.encode("utf-8"))
        logger.info("%s: %d documents, %d tokens", split, len(part), len(ids))
    with open(out / "samples.txt", "w", encoding="utf-8") as f:
        for source, kind in sorted({(d.source, d.kind) for d in train}):
            d = next(d for d in train if (d.source, d.kind) == (source, kind))
            f.write(f"===== {source} / {kind} ({d.key})\n{d.text[:1500]}\n")
    sources = {k: asdict(s) | {"version": versions.get(s.package, "")} for k, s in SOURCES.items()}
    meta = {
        "tokenizer": "bytes",
        "dtype": "uint8",
        "end_of_text": 0,
        "held_out_fraction": held_out,
        "seed": seed,
        "train_tokens": tokens["train"],
        "val_tokens": tokens["val"],
        "val_bytes": sum(s["bytes"] for k, s in stats.items() if k.startswith("val/")),
        "stats": stats,
        "sources": sources,
        "command": command,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    """`python -m rwkv_mm.lm.corpus {fetch,build}`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m rwkv_mm.lm.corpus", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="apt-get download the packages and dpkg -x them into --root")
    p.add_argument("--root", type=Path, default=Path("runs/tinylm-root"))
    p.add_argument(
        "--debs", type=Path, default=None, help="where the .deb files go (default ROOT/../tinylm-debs)"
    )
    p = sub.add_parser("build", help="extract, split and tokenize the corpus into --out")
    p.add_argument("--root", type=Path, default=Path("runs/tinylm-root"))
    p.add_argument("--out", type=Path, default=Path("runs/tinylm-data"))
    p.add_argument("--held-out", type=float, default=0.02, help="fraction of document groups held out")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "fetch":
        fetch(args.root, args.debs)
    else:
        cmd = "python -m rwkv_mm.lm.corpus " + shlex.join(sys.argv[1:] if argv is None else argv)
        meta = build(args.root, args.out, args.held_out, args.seed, cmd)
        print(json.dumps({k: meta[k] for k in ("train_tokens", "val_tokens")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
