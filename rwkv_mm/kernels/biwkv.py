"""Autograd glue of the compiled Bi-WKV kernels (``csrc/biwkv.cpp``, ``cuda/biwkv.cu``).

``make(module, backend)`` returns a function with ``naive_biwkv``'s signature and result conventions:
``(w, u, k, v, mode="paper") -> y`` in k's dtype, for both modes ("official" reproduces the released
CUDA kernel's arithmetic, EPS term included). Inputs are validated by ``rwkv_mm.core.ops.biwkv``.

- The CPU kernel takes float32 inputs: other dtypes are cast on the way in (a differentiable cast) and
  y is cast back. The CUDA kernel reads float32, float16 and bfloat16 k, v directly and writes y in
  that dtype (dk, dv come back in float32 and are cast here). Both sum in float64, with float32 exps.
- float64 inputs mean float64 math (the op contract), which the float32 kernels do not do: they take
  the chunked torch form, ``rwkv_mm.core.chunked.biwkv``, differentiable by autograd.
- The backward is analytic, in the kernel (recomputing the forward), in both modes, the official EPS
  term included; w and u come back per batch row and are summed over it here (no atomics). It needs
  only the inputs, so training and inference share the forward (on CUDA the token-parallel one).
- Without a gradient to record (no_grad, or no input requiring one) the kernel is called directly:
  for VRWKV's small inference calls the autograd Function's overhead is comparable to the kernel's.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from ..core import chunked

__all__ = ["make"]


def make(module: ModuleType, backend: str) -> Callable[..., Tensor]:
    """The biwkv op over the compiled ``module`` ("cpp" or "cuda" ``backend``)."""

    class BiwkvFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w: Tensor, u: Tensor, k: Tensor, v: Tensor, official: bool) -> Tensor:
            ctx.save_for_backward(w, u, k, v)
            ctx.official = official
            return module.forward(w, u, k, v, official)

        @staticmethod
        def backward(ctx, gy: Tensor):
            w, u, k, v = ctx.saved_tensors
            gw, gu, gk, gv = module.backward(w, u, k, v, gy.contiguous(), ctx.official)
            return gw.sum(0), gu.sum(0), gk.to(k.dtype), gv.to(v.dtype), None

    def biwkv(w: Tensor, u: Tensor, k: Tensor, v: Tensor, mode: str = "paper") -> Tensor:
        if k.dtype == torch.float64:
            return chunked.biwkv(w, u, k, v, mode)
        out_dtype = k.dtype
        if backend == "cpp" or k.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            k, v = k.float(), v.float()
        k, v = k.contiguous(), v.to(k.dtype).contiguous()
        w, u = w.float().contiguous(), u.float().contiguous()
        official = mode == "official"
        if torch.is_grad_enabled() and any(t.requires_grad for t in (w, u, k, v)):
            y = BiwkvFunction.apply(w, u, k, v, official)
        else:
            y = module.forward(w, u, k, v, official)
        return y.to(out_dtype)

    return biwkv
