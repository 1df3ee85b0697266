"""WKV ops: the fast plain-torch forms against their peers, side by side in one run.

Peers: the per-token torch loops of ``rwkv_mm.core.reference`` for the causal ops, and the dense
T×T form (computed in channel blocks that fit in memory) for Bi-WKV. Times are the minimum over
repeats, interleaved so that both sides see the same machine load; only the ratios are meaningful
on a shared box. Usage: ``python benchmarks/bench_wkv.py [--threads 1] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_mm.core import ops  # noqa: E402
from tests.wkv_inputs import (  # noqa: E402
    biwkv_inputs,
    cast_inputs,
    wkv4_inputs,
    wkv6_inputs,
    wkv7_inputs,
)


def dense_biwkv(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = 4
) -> torch.Tensor:
    """Bi-WKV (paper mode) through the full T×T weight matrix, ``block`` channels at a time.

    w, u: [C]; k, v: [B, T, C] -> y [B, T, C].
    """
    B, T, C = k.shape
    dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).abs().to(k.dtype)  # [T, T]
    eye = torch.eye(T, dtype=torch.bool)
    ek = (k - k.amax(dim=1, keepdim=True)).exp()  # [B, T, C], shift-free ratio
    out = torch.empty_like(k)
    for c0 in range(0, C, block):
        wc, uc = w[c0 : c0 + block, None, None], u[c0 : c0 + block, None, None]  # [cb, 1, 1]
        logits = torch.where(eye, uc, -(dist - 1) * wc)  # [cb, T, T]
        logits = logits - logits.amax(dim=-1, keepdim=True)
        weights = logits.exp()
        for bi in range(B):
            e = ek[bi, :, c0 : c0 + block].T[..., None]  # [cb, T, 1]
            num = weights @ (e * v[bi, :, c0 : c0 + block].T[..., None])
            den = weights @ e
            out[bi, :, c0 : c0 + block] = (num / den)[..., 0].T
    return out


def relative_error(fn: Callable, x: dict) -> str:
    """max |y_fp32 - y_fp64| / max |y_fp64| of the torch form against the float64 per-token reference."""
    y = fn(**x, backend="torch")
    y_ref = fn(**cast_inputs(x, torch.float64), backend="reference")
    y, y_ref = (y[0], y_ref[0]) if isinstance(y, tuple) else (y, y_ref)
    return f"{((y.double() - y_ref).abs().max() / y_ref.abs().max()).item():.1e}"


def best_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Minimum wall time of each function over ``repeats`` interleaved rounds."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: t * 1e3 for name, t in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    f32 = torch.float32
    cases = [
        ("wkv7", "B1 T1024 H12 N64", "per-token loop", wkv7_inputs(1, 1024, 12, 64, f32, state=False), 4.0),
        ("wkv6", "B1 T1024 H12 N64", "per-token loop", wkv6_inputs(1, 1024, 12, 64, f32, state=False), None),
        ("wkv4", "B1 T1024 C768", "per-token loop", wkv4_inputs(1, 1024, 768, f32, state=False), None),
        ("biwkv", "B1 T1024 C192", "dense TxT", biwkv_inputs(1, 1024, 192, f32), None),
        ("biwkv", "B1 T4096 C192", "dense TxT", biwkv_inputs(1, 4096, 192, f32), 100.0),
    ]
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, forward, min of {args.repeats}")
    print("| op | shape | peer | peer ms | torch (chunked) ms | ratio | target | fp32 err vs fp64 ref |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for op, shape, peer_name, x, target in cases:
            fn = getattr(ops, op)
            if op == "biwkv":
                peer = lambda x=x: dense_biwkv(**x)  # noqa: E731
            else:
                peer = lambda fn=fn, x=x: fn(**x, backend="reference")  # noqa: E731
            fast = lambda fn=fn, x=x: fn(**x, backend="torch")  # noqa: E731
            repeats = 1 if (op == "biwkv" and "4096" in shape) else args.repeats
            ms = best_ms({"peer": peer, "fast": fast}, repeats)
            ratio = ms["peer"] / ms["fast"]
            goal = f">= {target:g}x {'met' if ratio >= target else 'MISSED'}" if target else "-"
            err = relative_error(fn, x)
            cells = (
                op,
                shape,
                peer_name,
                f"{ms['peer']:.1f}",
                f"{ms['fast']:.2f}",
                f"{ratio:.1f}x",
                goal,
                err,
            )
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
