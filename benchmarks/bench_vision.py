"""VRWKV-T against timm's ViT-T / DeiT-T at growing input sizes: time and peak extra memory, same run.

Each (model, size) runs in a fresh subprocess (1 thread, fp32, batch 1, inference mode): it builds the
model, records its resident size, runs warm-up + timed forwards, and reports the best time and the
peak resident size minus the size after building (``ru_maxrss`` is the process peak). Ratios are
printed against ViT-T measured in the same run. Usage:
``python benchmarks/bench_vision.py [--sizes 224 512 1024] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("vrwkv_tiny", "vit_tiny_patch16_224", "deit_tiny_patch16_224")

CHILD = r"""
import json, resource, sys, time
import torch, timm
sys.path.insert(0, sys.argv[4])
import rwkv_mm.vision  # noqa: F401  (registers vrwkv_*)
torch.set_num_threads(1)
name, size, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kwargs = {} if name.startswith("vrwkv") else {"img_size": size, "dynamic_img_size": True}
model = timm.create_model(name, num_classes=1000, **kwargs).eval()
x = torch.randn(1, 3, size, size)
base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
best = float("inf")
with torch.inference_mode():
    model(x)
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        best = min(best, time.perf_counter() - start)
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"ms": best * 1e3, "extra_mb": (peak_kb - base_kb) / 1024}))
"""


def measure(name: str, size: int, repeats: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, name, str(size), str(repeats), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| size | model | ms | peak extra MB | time vs ViT-T | memory vs ViT-T |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        rows = {name: measure(name, size, args.repeats) for name in MODELS}
        vit = rows["vit_tiny_patch16_224"]
        for name, row in rows.items():
            t_ratio = row["ms"] / vit["ms"]
            m_ratio = row["extra_mb"] / vit["extra_mb"] if vit["extra_mb"] > 0 else float("nan")
            cells = (size, name, f"{row['ms']:.1f}", f"{row['extra_mb']:.1f}")
            cells += (f"{t_ratio:.2f}x", f"{m_ratio:.2f}x")
            print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
