"""Autograd glue of the compiled RWKV-5/6 kernels: ``csrc/wkv6.cpp`` (CPU) and ``cuda/wkv6.cu`` (CUDA).

``make(module, backend)`` returns a function with the signature and result conventions of
``rwkv_mm.core.reference.naive_wkv6``: ``(r, w, k, v, u, state=None) -> (y, state)``, y in r's dtype,
the state in float32 (float64 for float64 inputs), differentiable in every input and in the initial
state. Inputs are validated by ``rwkv_mm.core.ops``.

- Math in float32, or float64 when r is float64 (both kernels compile a float64 variant).
- ``w`` is a log decay, [B, T, H, N] (RWKV-6) or [H, N] (RWKV-5): the kernels read an [H, N] decay
  with zero batch and token strides (no [B, T, H, N] copy); its gradient is summed over B and T here.
- CPU: inputs are converted to the compute dtype (a copy for bf16 / fp16 inputs).
- CUDA: r, k, v are read as they are when they share one dtype (fp32, bf16, fp16, fp64), else
  converted to the compute dtype; w, u and the state are passed in the compute dtype. Head sizes above
  ``CUDA_MAX_HEAD_SIZE`` (64 in float64) take the chunked torch form (``rwkv_mm.core.chunked.wkv6``).
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
from .wkv7 import CUDA_DTYPES, CUDA_MAX_HEAD_SIZE

__all__ = ["make"]


class _WKV6(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        module: ModuleType,
        backend: str,
        r: Tensor,
        w: Tensor,
        k: Tensor,
        v: Tensor,
        u: Tensor,
        state: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        dt = compute_dtype(r)
        B, T, H, N = r.shape
        io = dt
        if backend == "cuda" and r.dtype in CUDA_DTYPES and k.dtype == v.dtype == r.dtype:
            io = r.dtype
        r_, k_, v_ = (x.to(io).contiguous() for x in (r, k, v))
        w_, u_ = (x.to(dt).contiguous() for x in (w, u))
        s0 = r.new_zeros(B, H, N, N, dtype=dt) if state is None else state.to(dt).contiguous()
        save = any(ctx.needs_input_grad[2:])
        y, s, ckpt = module.forward(r_, w_, k_, v_, u_, s0, save)
        if save:
            ctx.save_for_backward(r_, w_, k_, v_, u_, ckpt)
            ctx.module = module
            ctx.dtypes = [x.dtype if x is not None else None for x in (r, w, k, v, u, state)]
        return y.to(r.dtype), s

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor | None, ds: Tensor | None) -> tuple[Tensor | None, ...]:
        r_, w_, k_, v_, u_, ckpt = ctx.saved_tensors
        dt = u_.dtype
        B, T, H, N = r_.shape
        dy = torch.zeros(B, T, H, N, dtype=dt, device=r_.device) if dy is None else dy.to(dt).contiguous()
        ds = torch.zeros(B, H, N, N, dtype=dt, device=r_.device) if ds is None else ds.to(dt).contiguous()
        dr, dw, dk, dv, du, ds0 = ctx.module.backward(r_, w_, k_, v_, u_, ckpt, dy, ds)
        if w_.dim() == 2:  # RWKV-5: one decay for every batch and token
            dw = dw.sum((0, 1))
        du = du.sum(0)
        out = [
            g.to(dtype) if dtype is not None and need else None
            for g, dtype, need in zip((dr, dw, dk, dv, du, ds0), ctx.dtypes, ctx.needs_input_grad[2:])
        ]
        return (None, None, *out)


def make(module: ModuleType, backend: str) -> Callable[..., tuple[Tensor, Tensor]]:
    """The differentiable wkv6 of a built kernel extension (``backend`` "cpp" or "cuda")."""

    def wkv6(
        r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        limit = CUDA_MAX_HEAD_SIZE if r.dtype != torch.float64 else CUDA_MAX_HEAD_SIZE // 2
        if backend == "cuda" and r.shape[-1] > limit:
            from rwkv_mm.core import chunked  # lazy: core imports this package

            return chunked.wkv6(r, w, k, v, u, state)
        return _WKV6.apply(module, backend, r, w, k, v, u, state)

    wkv6.__doc__ = f"RWKV-5/6 WKV through the compiled {backend} kernel (see rwkv_mm.core.ops.wkv6)."
    return wkv6
