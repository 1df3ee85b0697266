"""World tokenizer: exactness against the rwkv pip package's TRIE_TOKENIZER, and encoding throughput.

Exactness: >= 10,000 strings (random unicode of many scripts and lengths, token-boundary word mixes, and
lines and whole files read from this machine: licence texts, /usr/share/doc, Python's standard library),
each encoded by every backend of ``WorldTokenizer`` and by the reference; a mismatch is any difference in
ids, or a decode that does not give the string back. Throughput: MB of UTF-8 per second on an English,
code, CJK and emoji corpus and on their mix, best of ``--repeats`` interleaved runs (a shared box is noisy;
compare the ratios). ``pyrwkv_tokenizer`` (a Rust package on PyPI) is timed too when it can be imported.
Usage: ``python benchmarks/eval_tokenizer.py [--strings 10000] [--mb 2] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import glob
import random
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_mm.lm.tokenizer import WORLD_VOCAB, WorldTokenizer, _asset  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
RANGES = [  # (lo, hi) code point ranges to draw random characters from
    (0x00, 0x7F),  # ASCII including controls and NUL
    (0x80, 0x24F),  # Latin-1 and Latin extended
    (0x300, 0x36F),  # combining marks
    (0x370, 0x6FF),  # Greek, Cyrillic, Hebrew, Arabic
    (0x3040, 0x30FF),  # kana
    (0x4E00, 0x9FFF),  # CJK ideographs
    (0xAC00, 0xD7A3),  # Hangul
    (0xE000, 0xFFFF),  # private use, specials, U+FFFD, BOM region
    (0x1F300, 0x1FAFF),  # emoji
    (0x10000, 0x10FFFF),  # all astral planes
]
PIECES = [" the", "Hello", " world", "\n\n", "\r\n", "\t", "    ", " " * 16, "-" * 8, "def ",
          "你好", "世界", "🙂", "👍🏽", "é", "e\u0301", "\u200b", "\x00",
          "<|endoftext|>", "User:", " Assistant:", "```python\n"]  # fmt: skip


def random_text(rng: random.Random) -> str:
    """A string of 0..~3000 characters from one to three random scripts."""
    length = int(rng.expovariate(1 / 60)) if rng.random() < 0.9 else rng.randrange(3000)
    ranges = rng.sample(RANGES, rng.randint(1, 3))
    out = []
    for _ in range(length):
        lo, hi = rng.choice(ranges)
        c = rng.randint(lo, hi)
        out.append(chr(c) if not 0xD800 <= c <= 0xDFFF else "\ufffd")
    return "".join(out)


def machine_texts(rng: random.Random, limit: int) -> list[str]:
    """Lines and whole files from licence texts, /usr/share/doc and Python's own sources (read only)."""
    files = sorted(glob.glob("/usr/share/common-licenses/*")) + sorted(
        glob.glob("/usr/share/doc/**/*.txt", recursive=True)
    )
    py_files = sorted(str(p) for p in STDLIB.glob("**/*.py"))
    files += rng.sample(py_files, min(400, len(py_files)))
    texts: list[str] = []
    for name in files:
        try:
            text = Path(name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if len(text) < 200_000:
            texts.append(text)
        lines = [line for line in text.splitlines(keepends=True) if line.strip()]
        texts += rng.sample(lines, min(30, len(lines)))
    rng.shuffle(texts)
    return texts[:limit]


def exactness(tokenizers: dict[str, WorldTokenizer], reference, texts: list[str]) -> dict[str, int]:
    """Mismatches per backend against the reference's ids (and decode(encode(s)) == s)."""
    bad = dict.fromkeys(tokenizers, 0)
    for text in texts:
        expected = reference.encode(text)
        for name, tok in tokenizers.items():
            ids = tok.encode(text)
            if ids != expected or tok.decode(ids) != text:
                bad[name] += 1
                if bad[name] <= 3:
                    print(f"  MISMATCH {name}: {text[:60]!r}")
    return bad


def corpora(rng: random.Random, megabytes: float) -> dict[str, str]:
    """English prose, code, CJK and emoji texts of about ``megabytes`` MB each, and their mix."""

    def fill(parts: list[str]) -> str:
        parts = [p for p in parts if p] or [random_text(rng) for _ in range(100)]
        out, size = [], 0
        while size < megabytes * 1e6:
            piece = rng.choice(parts)
            out.append(piece)
            size += len(piece.encode("utf-8"))
        return "".join(out)

    def read(paths: list[str]) -> list[str]:
        return [Path(p).read_text(encoding="utf-8", errors="replace") for p in paths if Path(p).is_file()]

    english = read(sorted(glob.glob("/usr/share/common-licenses/*")))
    code = read(sorted(str(p) for p in STDLIB.glob("*.py"))[:80])
    cjk = read(sorted(glob.glob(str(STDLIB / "test" / "cjkencodings" / "*-utf8.txt"))))
    cjk = cjk or ["".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(2000))]
    emoji = ["".join(chr(rng.randint(0x1F300, 0x1FAFF)) + rng.choice(["", " ", "\u200d", "\U0001f3fd"])
                     for _ in range(500))]  # fmt: skip
    out = {"english": fill(english), "code": fill(code), "cjk": fill(cjk), "emoji": fill(emoji)}
    out["mixed"] = fill([p[i : i + 4000] for p in out.values() for i in range(0, 400_000, 4000)])
    return out


def throughput(encoders: dict[str, Callable[[str], list]], texts: dict[str, str], repeats: int) -> dict:
    """Best MB/s of each encoder on each text, the encoders interleaved within each repeat."""
    best: dict[tuple[str, str], float] = {}
    for corpus, text in texts.items():
        size = len(text.encode("utf-8"))
        for _ in range(repeats):
            for name, encode in encoders.items():
                start = time.perf_counter()
                encode(text)
                seconds = time.perf_counter() - start
                best[name, corpus] = max(best.get((name, corpus), 0.0), size / seconds / 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strings", type=int, default=10_000, help="strings in the exactness check")
    parser.add_argument("--mb", type=float, default=2.0, help="MB of text per throughput corpus")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)

    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    reference = TRIE_TOKENIZER(str(_asset(WORLD_VOCAB)))
    ours = {f"rwkv_mm {b}": WorldTokenizer(backend=b) for b in ("cpp", "python")}
    for tok in ours.values():
        tok.encode("warm up")

    n_random = args.strings // 2
    n_words = args.strings // 10
    texts = [random_text(rng) for _ in range(n_random)]
    texts += ["".join(rng.choices(PIECES, k=rng.randrange(60))) for _ in range(n_words)]
    from_files = machine_texts(rng, args.strings - len(texts))
    n_random += args.strings - len(texts) - len(from_files)  # fill up when the machine has few files
    texts += from_files + [random_text(rng) for _ in range(args.strings - len(texts) - len(from_files))]
    total_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"exactness: {len(texts)} strings ({n_random} random unicode, {n_words} word mixes, "
          f"{len(from_files)} lines and files from this machine), {total_mb:.1f} MB")  # fmt: skip
    bad = exactness(ours, reference, texts)
    for name, count in bad.items():
        print(f"  {name:16s} mismatches: {count} / {len(texts)}")

    encoders: dict[str, Callable[[str], list]] = {name: tok.encode for name, tok in ours.items()}
    encoders["rwkv pip (ref)"] = reference.encode
    try:
        from pyrwkv_tokenizer import RWKVTokenizer

        rust = RWKVTokenizer()
        encoders["pyrwkv_tokenizer"] = rust.encode
        sample = [t for t in texts[:2000]]
        print(f"  pyrwkv_tokenizer mismatches: {sum(rust.encode(t) != reference.encode(t) for t in sample)} "
              f"/ {len(sample)}")  # fmt: skip
    except ImportError:
        pass

    corpus = corpora(rng, args.mb)
    best = throughput(encoders, corpus, args.repeats)
    print(f"\nencode throughput, MB/s (best of {args.repeats}; ~{args.mb:g} MB per corpus)")
    print(f"{'encoder':18s}" + "".join(f"{c:>10s}" for c in corpus) + f"{'vs ref':>10s}")
    for name in encoders:
        row = "".join(f"{best[name, c]:10.2f}" for c in corpus)
        ratio = best[name, "mixed"] / best["rwkv pip (ref)", "mixed"]
        print(f"{name:18s}{row}{ratio:9.1f}x")


if __name__ == "__main__":
    main()
