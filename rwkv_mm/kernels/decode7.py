"""Glue of the fused RWKV-7 decode block (``csrc/decode7.cpp``): one call per block and token.

``make(module, backend)`` returns the class ``Block7(vecs, mats, scales, head_size)``: a block's
weights (shared with the model, not copied), checked on every call. ``vecs`` are the block's
per-channel tensors and ``mats`` / ``scales`` its projections, in the orders ``VECS`` and ``MATS``
below (`rwkv_mm.lm.model` assembles them): fp32 nn.Linear weights column-major, LoRA matrices as
stored ([in, out] row-major), or packed int8 / bf16 weights (`rwkv_mm.kernels.gemv`) with their
scales (empty tensors for fp32). Layer 0 passes empty tensors for v0, v1 and v2.

``block(x, att_shift, wkv, ffn_shift, v_first) -> [x, att_shift, wkv, ffn_shift, v_first]`` runs B
sequences of one token each, float32 on the CPU: x and the shift states [B, C], the WKV state
[B, H, N, N] (value index first), v_first [B, C] (layer 0's values; an empty tensor in layer 0,
which returns its own). The state passed in is not modified. Inference only: no autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

__all__ = ["MATS", "VECS", "make"]

# the module attributes (relative to a Block) in the kernel's argument order
VECS = (
    "ln1.weight", "ln1.bias", "att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g",
    "att.w0", "att.a0", "att.v0", "att.k_k", "att.k_a", "att.r_k", "att.ln_x.weight", "att.ln_x.bias",
    "ln2.weight", "ln2.bias", "ffn.x_k",
)  # fmt: skip
MATS = (
    "att.receptance", "att.key", "att.value", "att.output", "att.w1", "att.w2", "att.a1", "att.a2",
    "att.v1", "att.v2", "att.g1", "att.g2", "ffn.key", "ffn.value",
)  # fmt: skip


def make(module: ModuleType, backend: str) -> Callable:
    if backend != "cpp":
        raise ValueError(f"decode7 has a cpp kernel only, got backend {backend!r}")
    return module.Block7
