"""Glue of the compiled small-batch matrix-vector products (``csrc/gemv.cpp``), for one-token decode,
and the packed weight formats they read (int8 and bfloat16, see ``include/rwkv_mm/gemv.h``).

``make(module, backend)`` returns a `Gemv`: calling it, ``gemv(x, weight) -> x @ weight.T``, takes x
[B, in] float32 with B in 1..64 (a matrix-vector product up to 4 rows, a small GEMM above) and an
nn.Linear weight [out, in] float32 on the CPU, result [B, out].
The kernel reads the weight as ``weight.t()`` row-major, i.e. the column-major weight
`RWKVLM.from_file` stores (no copy); for any other case (another layout, dtype or device, a larger
batch, autograd) it returns the plain ``x @ weight.T``, so the result never depends on whether the
kernel ran, only the speed does. ``gemv.packed(x, packed, scale)`` multiplies by a weight packed with
`pack_int8` / `pack_bf16` (any batch). Inference only: no backward.

Packed layout (both formats): ``packed[t, p, c, j] = Q[64 t + c, 2 p + j]`` of shape
``[ceil(out / 64), ceil(in / 2), 64, 2]`` (64-column tiles, the input dimension in pairs, zero padding),
and a float32 ``scale [out]``: the weight is ``Q * scale[:, None]``. int8 Q has one symmetric scale per
output channel (max |W| / 127); bf16 Q is the weight rounded to bfloat16, with unit scales.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

__all__ = ["Gemv", "make", "pack_bf16", "pack_int8", "unpack"]

MAX_ROWS = 64  # fp32: larger batches (prefill) are torch's GEMMs
TILE = 64  # output columns per packed tile
INT8_MAX = 127


def _tile(q: Tensor) -> Tensor:
    """[out, in] -> [ceil(out / 64), ceil(in / 2), 64, 2], zero padded."""
    N, K = q.shape
    Np, Kp = -(-N // TILE) * TILE, -(-K // 2) * 2
    padded = q.new_zeros(Np, Kp)
    padded[:N, :K] = q
    return padded.view(Np // TILE, TILE, Kp // 2, 2).permute(0, 2, 1, 3).contiguous()


def pack_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """An [out, in] float weight as (packed int8 [ceil(out/64), ceil(in/2), 64, 2], float32 scale [out]),
    one symmetric scale per output channel: q = round(W / scale) in [-127, 127], scale = max|W| / 127."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / INT8_MAX
    q = torch.round(w / torch.where(scale > 0, scale, 1.0)[:, None]).clamp_(-INT8_MAX, INT8_MAX)
    return _tile(q.to(torch.int8)), scale.contiguous()


def pack_bf16(weight: Tensor) -> tuple[Tensor, Tensor]:
    """An [out, in] float weight as (packed bfloat16 [ceil(out/64), ceil(in/2), 64, 2], unit scales [out])."""
    w = weight.detach()
    return _tile(w.to(torch.bfloat16)), torch.ones(w.shape[0], dtype=torch.float32, device=w.device)


def unpack(packed: Tensor, scale: Tensor, in_features: int) -> Tensor:
    """The float32 [out, in] weight a packed one stands for (Q * scale[:, None])."""
    T, Kp, _, _ = packed.shape
    q = packed.permute(0, 2, 1, 3).reshape(T * TILE, Kp * 2)[: scale.numel(), :in_features]
    return q.float() * scale[:, None]


class Gemv:
    """The built kernels: ``gemv(x, weight)`` (fp32) and ``gemv.packed(x, packed, scale)``."""

    def __init__(self, module: ModuleType):
        self.module = module

    def __call__(self, x: Tensor, weight: Tensor) -> Tensor:
        """x [B, in] @ weight[out, in].T -> [B, out], through the kernel whenever it applies."""
        wt = weight.t()
        if (
            x.dim() == 2
            and 1 <= x.shape[0] <= MAX_ROWS
            and x.dtype == torch.float32
            and wt.dtype == torch.float32
            and x.device.type == "cpu"
            and wt.device.type == "cpu"
            and wt.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or wt.requires_grad))
        ):
            return self.module.gemv_t(x, wt)
        return x @ wt

    def packed(self, x: Tensor, packed: Tensor, scale: Tensor) -> Tensor:
        """x [B, in] float32 @ W.T -> [B, out] float32 for W = unpack(packed, scale, in)."""
        return self.module.gemv_packed(x, packed, scale)


def make(module: ModuleType, backend: str) -> Callable[[Tensor, Tensor], Tensor]:
    if backend != "cpp":
        raise ValueError(f"gemv has a cpp kernel only, got backend {backend!r}")
    return Gemv(module)
