"""WKV ops: the fast plain-torch forms against their peers, side by side in one run.

Peers: the per-token torch loops of ``rwkv_mm.core.reference`` for the causal ops, and the dense
T×T form (computed in channel blocks that fit in memory) for Bi-WKV; columns for the chunked torch
forms, the C++ kernels and, where a GPU is visible, the CUDA kernels. Times are the minimum over
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

from rwkv_mm import kernels  # noqa: E402
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


def relative_error(fn: Callable, x: dict, backend: str) -> str:
    """max |y_fp32 - y_fp64| / max |y_fp64| of ``backend`` against the float64 per-token reference."""
    y = fn(**x, backend=backend)
    y_ref = fn(**cast_inputs(x, torch.float64), backend="reference")
    y, y_ref = (y[0], y_ref[0]) if isinstance(y, tuple) else (y, y_ref)
    return f"{((y.double() - y_ref).abs().max() / y_ref.abs().max()).item():.1e}"


def best_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Minimum wall time of each function over ``repeats`` interleaved rounds (CUDA work synchronised)."""
    best = dict.fromkeys(fns, float("inf"))
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: t * 1e3 for name, t in best.items()}


def compiled_backends(op: str) -> list[str]:
    """The compiled backends that can run ``op`` here (building them first, outside the timings)."""
    devices = ["cpp"] + (["cuda"] if torch.cuda.is_available() else [])
    return [b for b in devices if kernels.get(op, b) is not None]


def goal(ratio: float, target: float | None) -> str:
    return f"{ratio:.1f}x" + (f" (>= {target:g}x {'met' if ratio >= target else 'MISSED'})" if target else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    f32 = torch.float32
    # op, shape, peer, inputs, target of torch vs peer, target of cpp vs peer, target of cpp vs torch
    cases = [
        (
            "wkv7",
            "B1 T1024 H12 N64",
            "per-token loop",
            wkv7_inputs(1, 1024, 12, 64, f32, state=False),
            4,
            6,
            None,
        ),
        (
            "wkv6",
            "B1 T1024 H12 N64",
            "per-token loop",
            wkv6_inputs(1, 1024, 12, 64, f32, state=False),
            0,
            0,
            0,
        ),
        ("wkv4", "B1 T1024 C768", "per-token loop", wkv4_inputs(1, 1024, 768, f32, state=False), 0, 0, 0),
        ("biwkv", "B1 T1024 C192", "dense TxT", biwkv_inputs(1, 1024, 192, f32), 0, 0, 0),
        ("biwkv", "B1 T4096 C192", "dense TxT", biwkv_inputs(1, 4096, 192, f32), 100, None, 10),
    ]
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, forward, min of {args.repeats}")
    print(
        "| op | shape | peer | peer ms | torch ms | cpp ms | cuda ms | torch/peer | cpp/peer | cpp/torch | "
        "fp32 err torch | fp32 err cpp |"
    )
    print("|" + "---|" * 12)
    with torch.inference_mode():
        for op, shape, peer_name, x, t_torch, t_cpp, t_cpp_torch in cases:
            fn = getattr(ops, op)
            backends = compiled_backends(op)
            fns = {"torch": lambda fn=fn, x=x: fn(**x, backend="torch")}
            if "cpp" in backends:
                fns["cpp"] = lambda fn=fn, x=x: fn(**x, backend="cpp")
            if "cuda" in backends:
                xc = {n: (t.cuda() if torch.is_tensor(t) else t) for n, t in x.items()}
                fns["cuda"] = lambda fn=fn, x=xc: fn(**x, backend="cuda")
            ms = best_ms(fns, args.repeats)
            peer = (
                (lambda x=x: dense_biwkv(**x))
                if op == "biwkv"
                else (lambda fn=fn, x=x: fn(**x, backend="reference"))
            )
            ms["peer"] = best_ms({"peer": peer}, 1 if "4096" in shape else args.repeats)["peer"]
            cpp = ms.get("cpp")
            cells = [
                op, shape, peer_name, f"{ms['peer']:.1f}", f"{ms['torch']:.2f}",
                f"{cpp:.2f}" if cpp else "-", f"{ms['cuda']:.2f}" if "cuda" in ms else "-",
                goal(ms["peer"] / ms["torch"], t_torch or None),
                goal(ms["peer"] / cpp, t_cpp or None) if cpp else "-",
                goal(ms["torch"] / cpp, t_cpp_torch or None) if cpp else "-",
                relative_error(fn, x, "torch"),
                relative_error(fn, x, "cpp") if cpp else "-",
            ]  # fmt: skip
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
