"""Autograd glue of the compiled RWKV-4 WKV kernels (``csrc/wkv4.cpp``, ``cuda/wkv4.cu``).

``make(module, backend)`` returns a function with ``naive_wkv4``'s signature and result conventions:
``(w, u, k, v, state=None) -> (y, (num, den, max))``, y in k's dtype, the state in float32. Inputs
are validated by ``rwkv_mm.core.ops.wkv4``, not here.

- The CPU kernel computes in float32 from float32 inputs: other dtypes are cast on the way in (a
  differentiable cast) and y is cast back. The CUDA kernel reads float32, float16 and bfloat16 k, v
  directly (float32 state and arithmetic) and writes y, dk, dv in that dtype.
- float64 inputs mean float64 math (the op contract), which the float32 kernels do not do: they take
  the chunked torch form, ``rwkv_mm.core.chunked.wkv4``, differentiable by autograd.
- The backward is analytic, in the kernel (recomputing the forward states), for w, u, k, v and the
  initial state; w and u come back per batch row and are summed over it here (no atomics).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from ..core import chunked
from ..core.reference import WKV4_EMPTY_MAX

__all__ = ["make"]

State = tuple[Tensor, Tensor, Tensor]


def make(module: ModuleType, backend: str) -> Callable[..., tuple[Tensor, State]]:
    """The wkv4 op over the compiled ``module`` ("cpp" or "cuda" ``backend``)."""

    class Wkv4Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w: Tensor, u: Tensor, k: Tensor, v: Tensor, num: Tensor, den: Tensor, mx: Tensor):
            y, num1, den1, mx1 = module.forward(w, u, k, v, num, den, mx)
            ctx.save_for_backward(w, u, k, v, num, den, mx)
            return y, num1, den1, mx1

        @staticmethod
        def backward(ctx, gy: Tensor, g_num: Tensor, g_den: Tensor, g_mx: Tensor):
            w, u, k, v, num, den, mx = ctx.saved_tensors
            g_state = (g.contiguous() for g in (g_num, g_den, g_mx))
            grads = module.backward(w, u, k, v, num, den, mx, gy.contiguous(), *g_state)
            gw, gu, gk, gv, g_num0, g_den0, g_mx0 = grads
            return gw.sum(0), gu.sum(0), gk, gv, g_num0, g_den0, g_mx0

    def wkv4(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        if k.dtype == torch.float64:
            return chunked.wkv4(w, u, k, v, state)
        B, _, C = k.shape
        out_dtype = k.dtype
        if backend == "cpp" or k.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            k, v = k.float(), v.float()
        k, v = k.contiguous(), v.to(k.dtype).contiguous()
        w, u = w.float().contiguous(), u.float().contiguous()
        if state is None:
            num, den = k.new_zeros(B, C, dtype=torch.float32), k.new_zeros(B, C, dtype=torch.float32)
            mx = k.new_full((B, C), WKV4_EMPTY_MAX, dtype=torch.float32)
        else:
            num, den, mx = (s.float().contiguous() for s in state)
        y, num, den, mx = Wkv4Function.apply(w, u, k, v, num, den, mx)
        return y.to(out_dtype), (num, den, mx)

    return wkv4
