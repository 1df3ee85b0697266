"""Autograd glue of the compiled RWKV-7 kernels: ``csrc/wkv7.cpp`` (CPU) and ``cuda/wkv7.cu`` (CUDA).

``make(module, backend)`` returns a function with the signature and result conventions of
``rwkv_mm.core.reference.naive_wkv7``: ``(r, w, k, v, a, b, state=None) -> (y, state)``, y in r's
dtype, the state in float32 (float64 for float64 inputs), differentiable in every input and in the
initial state. Inputs are validated by ``rwkv_mm.core.ops``.

- Math in float32, or float64 when r is float64 (both kernels compile a float64 variant).
- CPU: inputs are converted to the compute dtype (a copy for bf16 / fp16 inputs).
- CUDA: r, k, v, a, b are read as they are when they share one dtype (fp32, bf16, fp16, fp64), else
  converted to the compute dtype; w and the state are passed in the compute dtype. Head sizes above
  ``CUDA_MAX_HEAD_SIZE`` (64 in float64) take the chunked torch form (``rwkv_mm.core.chunked.wkv7``).
- The forward saves the state entering every 16 tokens when a gradient is needed (memory: T / 16
  states per batch and head); the backward recomputes the states in between from these checkpoints.
- Gradients are computed in the compute dtype and returned in each input's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..core.reference import compute_dtype

__all__ = ["CUDA_MAX_HEAD_SIZE", "make"]

# Largest head size of the CUDA kernel (its backward keeps an N x N gradient in shared memory);
# 64 when computing in float64. N = 64 is compiled with a fixed size, other sizes use a runtime loop.
CUDA_MAX_HEAD_SIZE = 128
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _prepare(inputs: tuple[Tensor, ...], backend: str) -> tuple[Tensor, ...]:
    """r, w, k, v, a, b in the dtypes the kernel reads, contiguous."""
    r, w, k, v, a, b = inputs
    dt = compute_dtype(r)
    io = dt
    if backend == "cuda" and r.dtype in CUDA_DTYPES and all(x.dtype == r.dtype for x in (k, v, a, b)):
        io = r.dtype
    return tuple(x.to(io).contiguous() for x in (r, k, v, a, b)) + (w.to(dt).contiguous(),)


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        module: ModuleType,
        backend: str,
        r: Tensor,
        w: Tensor,
        k: Tensor,
        v: Tensor,
        a: Tensor,
        b: Tensor,
        state: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        dt = compute_dtype(r)
        B, T, H, N = r.shape
        r_, k_, v_, a_, b_, w_ = _prepare((r, w, k, v, a, b), backend)
        s0 = r.new_zeros(B, H, N, N, dtype=dt) if state is None else state.to(dt).contiguous()
        save = any(ctx.needs_input_grad[2:])
        y, s, ckpt = module.forward(r_, w_, k_, v_, a_, b_, s0, save)
        if save:
            ctx.save_for_backward(r_, w_, k_, v_, a_, b_, ckpt)
            ctx.module = module
            ctx.dtypes = [x.dtype if x is not None else None for x in (r, w, k, v, a, b, state)]
        return y.to(r.dtype), s

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor | None, ds: Tensor | None) -> tuple[Tensor | None, ...]:
        r_, w_, k_, v_, a_, b_, ckpt = ctx.saved_tensors
        dt = w_.dtype
        B, T, H, N = r_.shape
        dy = torch.zeros(B, T, H, N, dtype=dt, device=r_.device) if dy is None else dy.to(dt).contiguous()
        ds = torch.zeros(B, H, N, N, dtype=dt, device=r_.device) if ds is None else ds.to(dt).contiguous()
        grads = ctx.module.backward(r_, w_, k_, v_, a_, b_, ckpt, dy, ds)  # dr, dw, dk, dv, da, db, ds0
        out = [
            g.to(dtype) if dtype is not None and need else None
            for g, dtype, need in zip(grads, ctx.dtypes, ctx.needs_input_grad[2:])
        ]
        return (None, None, *out)


def make(module: ModuleType, backend: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """The differentiable wkv7 of a built kernel extension (``backend`` "cpp" or "cuda")."""

    def wkv7(
        r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        limit = CUDA_MAX_HEAD_SIZE if r.dtype != torch.float64 else CUDA_MAX_HEAD_SIZE // 2
        if backend == "cuda" and r.shape[-1] > limit:
            from rwkv_mm.core import chunked  # lazy: core imports this package

            return chunked.wkv7(r, w, k, v, a, b, state)
        return _WKV7.apply(module, backend, r, w, k, v, a, b, state)

    wkv7.__doc__ = f"RWKV-7 WKV through the compiled {backend} kernel (see rwkv_mm.core.ops.wkv7)."
    return wkv7
