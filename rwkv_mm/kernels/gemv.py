"""Glue of the compiled small-batch matrix-vector product (``csrc/gemv.cpp``), for one-token decode.

``make(module, backend)`` returns ``gemv(x, weight) -> x @ weight.T``: x [B, in] float32 with B in 1..4,
weight an nn.Linear weight [out, in] float32 on the CPU, result [B, out]. The kernel reads the weight as
``weight.t()`` row-major, i.e. the column-major weight `RWKVLM.from_file` stores (no copy, no second
fp32 copy of anything); for any other case (another layout, dtype or device, a larger batch, autograd)
it returns the plain ``x @ weight.T``, so the result never depends on whether the kernel ran, only the
speed does. Inference only: no backward.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

MAX_BATCH = 4


def make(module: ModuleType, backend: str) -> Callable[[Tensor, Tensor], Tensor]:
    if backend != "cpp":
        raise ValueError(f"gemv has a cpp kernel only, got backend {backend!r}")

    def gemv(x: Tensor, weight: Tensor) -> Tensor:
        """x [B, in] @ weight[out, in].T -> [B, out], through the kernel whenever it applies."""
        wt = weight.t()
        if (
            x.dim() == 2
            and 1 <= x.shape[0] <= MAX_BATCH
            and x.dtype == torch.float32
            and wt.dtype == torch.float32
            and x.device.type == "cpu"
            and wt.device.type == "cpu"
            and wt.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or wt.requires_grad))
        ):
            return module.gemv_t(x, wt)
        return x @ wt

    return gemv
