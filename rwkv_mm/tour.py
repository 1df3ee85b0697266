"""A short tour of the WKV core: each op on random inputs, its fast form checked against the reference.

``python -m rwkv_mm.tour`` (what ``make demo`` runs until the Gradio demo lands).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rwkv_mm.core import ops


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start) * 1e3


def _inputs(op: str, T: int, g: torch.Generator) -> dict:
    H, N, C = 4, 64, 256

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    if op == "wkv7":
        kk = F.normalize(rand(1, T, H, N), dim=-1)
        return dict(
            r=rand(1, T, H, N),
            w=-0.606531 * torch.sigmoid(rand(1, T, H, N)),
            k=rand(1, T, H, N),
            v=rand(1, T, H, N),
            a=-kk,
            b=kk * torch.sigmoid(rand(1, T, H, N)),
        )
    if op == "wkv6":
        return dict(
            r=rand(1, T, H, N),
            w=-torch.exp(rand(1, T, H, N) - 1),
            k=rand(1, T, H, N),
            v=rand(1, T, H, N),
            u=rand(H, N),
        )
    if op == "wkv4":
        return dict(w=-torch.exp(rand(C)), u=rand(C), k=rand(1, T, C), v=rand(1, T, C))
    return dict(w=rand(C) * 5 / T, u=rand(C) * 5 / T, k=rand(1, T, C), v=rand(1, T, C))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="sequence length T")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"rwkv_mm core tour: B = 1, T = {args.tokens}, float32, {args.threads} thread(s)\n")
    columns = ("reference ms", "torch ms", "speed-up", "max |Δy| / max|y|")
    print(f"{'op':6s} {'shape':22s} {columns[0]:>13s} {columns[1]:>9s} {columns[2]:>9s} {columns[3]:>18s}")
    for op in ("wkv7", "wkv6", "wkv4", "biwkv"):
        x = _inputs(op, args.tokens, g)
        fn = getattr(ops, op)
        with torch.no_grad():
            ref, t_ref = _timed(lambda fn=fn, x=x: fn(**x, backend="reference"))
            out, t_fast = _timed(lambda fn=fn, x=x: fn(**x, backend="torch"))
        y_ref, y = (ref[0], out[0]) if isinstance(ref, tuple) else (ref, out)
        err = ((y - y_ref).abs().max() / y_ref.abs().max()).item()
        shape = "x".join(str(s) for s in (x["r"] if "r" in x else x["k"]).shape)
        print(f"{op:6s} {shape:22s} {t_ref:13.1f} {t_fast:9.1f} {t_ref / t_fast:8.1f}x {err:18.1e}")
    print("\nNext: `make test` runs the test suite, `make bench` the side-by-side benchmarks.")


if __name__ == "__main__":
    main()
