"""Bi-WKV on a GPU: our CUDA kernel (mode "official") against the released Vision-RWKV kernel.

The upstream kernel is not part of rwkv_mm: ``--upstream`` names a copy of OpenGVLab/Vision-RWKV's
``classification/mmcls_custom/models/backbones/cuda/wkv_cuda.cu``; it is built with the binding of
``tests/gpu/test_biwkv_upstream.py``. Shapes are the VRWKV models' (C = 192 / 384 / 768 at 224², 512²
and 1024² inputs, 16-pixel patches). Forward only (inference: no gradient recorded), fp32, CUDA events,
median of repeats; "paper ms" is our mode="paper" on the same inputs.
Usage: ``python benchmarks/bench_biwkv_cuda.py --upstream PATH/wkv_cuda.cu``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv_mm.core import ops  # noqa: E402
from tests.gpu.test_biwkv_upstream import BINDING  # noqa: E402


def build_upstream(source: Path):
    build = Path(tempfile.mkdtemp(prefix="upstream_biwkv_"))
    (build / "binding.cpp").write_text(BINDING)
    (build / "wkv_cuda.cu").write_text(source.read_text())
    return load(
        name="vrwkv_upstream_biwkv_bench",
        sources=[str(build / "binding.cpp"), str(build / "wkv_cuda.cu")],
        extra_cuda_cflags=["-O3", "--use_fast_math", "-DTmax=4096"],
        build_directory=str(build),
    )


def cuda_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upstream", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    upstream = build_upstream(args.upstream)
    torch.set_grad_enabled(False)
    print("| B | T | C | upstream ms | ours ms | ours / upstream | max abs diff | paper ms |")
    print("|---|---|---|---|---|---|---|---|")
    for B, T, C in [(1, 196, 192), (8, 196, 192), (1, 1024, 192), (8, 1024, 384), (1, 4096, 192)]:
        g = torch.Generator().manual_seed(T + C)
        w = (torch.randn(C, generator=g) / T).cuda()
        u = (torch.randn(C, generator=g) / T).cuda()
        k = torch.randn(B, T, C, generator=g).cuda()
        v = torch.randn(B, T, C, generator=g).cuda()
        y_up = upstream.forward(w, u, k, v)
        y_ours = ops.biwkv(w, u, k, v, mode="official", backend="cuda")
        diff = (y_up - y_ours).abs().max().item()
        x = (w, u, k, v)
        t_up = cuda_ms(lambda x=x: upstream.forward(*x), args.repeats)
        t_ours = cuda_ms(lambda x=x: ops.biwkv(*x, mode="official", backend="cuda"), args.repeats)
        t_paper = cuda_ms(lambda x=x: ops.biwkv(*x, mode="paper", backend="cuda"), args.repeats)
        ratio = t_ours / t_up
        print(f"| {B} | {T} | {C} | {t_up:.3f} | {t_ours:.3f} | {ratio:.2f} | {diff:.2e} | {t_paper:.3f} |")


if __name__ == "__main__":
    main()
