"""Weight-only quantization of an `RWKVLM` for CPU decode: int8 (per-output-channel scales) or bfloat16.

One-token decode is memory-bound on the weights, so smaller weights decode faster: int8 reads a
quarter of the fp32 bytes, bf16 half. Activations, states and accumulation stay float32; the
kernels (`rwkv_mm.kernels.gemv`, formats in its docstring) quantize the activation row to int16 on the
fly (int8 weights, AVX512-VNNI) or split it into two bfloat16 terms (bf16 weights, AVX512-BF16), so
the weights carry the error. Prefill (many rows) multiplies by the dequantized weights in float32, so
every path of a quantized model computes with the same weights.

What is quantized: every projection (`nn.Linear`: receptance / key / value / output / gate, the
channel mix, the head unless `head` says otherwise) and, in RWKV-7, the LoRA matrices (w1/w2, a1/a2,
v1/v2, g1/g2; their float32 parameters are replaced by the dequantized values, and the decode kernel
reads the packed copies). Embeddings, norms and per-channel vectors stay as they are. Mode "fp32"
keeps the projections and quantizes the head only (`head="bf16"` or `"int8"`): the head is a third of
a 0.1B model's decode bytes.

Usage:
    >>> lm = RWKVLM.from_file("rwkv7-g1-0.1b.pth")
    >>> quantize_(lm, "int8")                    # in place; returns lm
    >>> logits, state = lm(torch.tensor([[33]]))

Accuracy against the float32 model (teacher-forced decode, top-1 agreement and mean KL):
``python -m rwkv_mm.lm.quant eval MODEL TEXTFILE [--mode int8] [--tokens 300]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..kernels.gemv import pack_bf16, pack_int8, unpack
from .model import RWKVLM, DecodeLinear

__all__ = ["QuantLinear", "compare", "quantize_"]

logger = logging.getLogger(__name__)

Mode = Literal["int8", "bf16"]
MODES = ("int8", "bf16")
HEAD_MODES = (*MODES, "fp32")
PACK = {"int8": pack_int8, "bf16": pack_bf16}
LORA = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")  # RWKV-7, each [in, out]
MAX_KERNEL_ROWS = 64  # more rows (prefill) multiply by the dequantized weight in float32


class QuantLinear(nn.Module):
    """A bias-free linear layer with packed int8 or bfloat16 weights (`rwkv_mm.kernels.gemv` format).

    Args:
        weight: the float weight [out, in] to quantize.
        mode: "int8" (symmetric, one scale per output channel) or "bf16".
    """

    def __init__(self, weight: Tensor, mode: Mode):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.out_features, self.in_features = weight.shape
        packed, scale = PACK[mode](weight)
        self.register_buffer("qweight", packed)
        self.register_buffer("scale", scale)

    def dequantize(self) -> Tensor:
        """The float32 weight [out, in] this layer computes with."""
        return unpack(self.qweight, self.scale, self.in_features)

    def decode_weights(self) -> tuple[Tensor, Tensor]:
        """What the fused decode kernel reads: (packed weight, scale)."""
        return self.qweight, self.scale

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] float32 -> [..., out] float32."""
        rows = x.numel() // max(x.shape[-1], 1)
        if 1 <= rows <= MAX_KERNEL_ROWS and x.dtype == torch.float32 and x.device.type == "cpu":
            gemv = kernels.get("gemv", "cpp", warn_on_fallback=True)
            if gemv is not None and not (torch.is_grad_enabled() and x.requires_grad):
                y = gemv.packed(x.reshape(rows, self.in_features), self.qweight, self.scale)
                return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantize().to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def quantize_(lm: RWKVLM, mode: Mode | Literal["fp32"] = "int8", head: str | None = None) -> RWKVLM:
    """Quantize the weights of `lm` in place (see the module docstring for what is quantized).

    Args:
        lm: a float32 model (`RWKVLM.from_file(path)`).
        mode: "int8", "bf16", or "fp32" (projections left as they are). Defaults to "int8".
        head: the head's format: "int8", "bf16" or "fp32" (left as is). Defaults to `mode`.

    Returns:
        lm, whose one-token decode then reads the quantized weights.
    """
    head = mode if head is None else head
    if mode not in HEAD_MODES or head not in HEAD_MODES:
        raise ValueError(f"mode and head must be one of {HEAD_MODES}, got {mode!r}, {head!r}")
    if lm.dtype != torch.float32:
        raise ValueError(f"quantize_ takes a float32 model, got {lm.dtype}")
    targets = [(name, m) for name, m in lm.named_modules() if isinstance(m, DecodeLinear) and m.bias is None]
    done = 0
    for name, module in targets:
        m = head if name == "head" else mode
        if m == "fp32":
            continue
        parent, _, attr = name.rpartition(".")
        setattr(lm.get_submodule(parent), attr, QuantLinear(module.weight.detach(), m))
        done += 1
    if lm.config.version == "v7" and mode != "fp32":
        for block in lm.blocks:
            for name in LORA:
                p = getattr(block.att, name, None)
                if p is None:
                    continue
                packed, scale = PACK[mode](p.detach().t())  # [in, out] -> the [out, in] weight
                p.data.copy_(unpack(packed, scale, p.shape[0]).t())  # the torch path computes with these
                block.att.register_buffer(f"{name}_packed", packed, persistent=False)
                block.att.register_buffer(f"{name}_scale", scale, persistent=False)
    lm.reset_decode_cache()
    logger.info("quantized %d projections (%s; head: %s)", done, mode, head)
    return lm


@torch.inference_mode()
def compare(reference: RWKVLM, model: RWKVLM, tokens: Tensor) -> dict[str, float]:
    """Teacher-forced one-token decode of `tokens` [T] through both models, from the initial state.

    Returns:
        {"tokens": T, "top1": fraction of steps whose argmax agrees, "kl": mean KL(reference || model)
        in nats, "max_abs": largest |Δ logit| / std(reference logits)}.
    """
    s_ref = s_q = None
    agree, kl, worst = 0, 0.0, 0.0
    for t in range(tokens.numel()):
        x = tokens[t].view(1, 1)
        ref, s_ref = reference(x, s_ref)
        out, s_q = model(x, s_q)
        agree += int(ref.argmax(-1).item() == out.argmax(-1).item())
        lp_ref, lp = F.log_softmax(ref.double(), -1), F.log_softmax(out.double(), -1)
        kl += (lp_ref.exp() * (lp_ref - lp)).sum().item()
        worst = max(worst, ((out - ref).abs().max() / ref.std()).item())
    n = tokens.numel()
    return {"tokens": n, "top1": agree / n, "kl": kl / n, "max_abs": worst}


def main(argv: list[str] | None = None) -> int:
    """`python -m rwkv_mm.lm.quant eval MODEL TEXTFILE`: accuracy of a quantized model against float32."""
    parser = argparse.ArgumentParser(prog="python -m rwkv_mm.lm.quant", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_eval = sub.add_parser("eval", help="top-1 agreement and mean KL of the quantized model vs float32")
    p_eval.add_argument("model", help="checkpoint file or assets folder")
    p_eval.add_argument("textfile", help="text to feed, tokenized with the model's tokenizer")
    p_eval.add_argument("--mode", choices=HEAD_MODES, default="int8")
    p_eval.add_argument("--head", choices=HEAD_MODES, default=None, help="default: --mode")
    p_eval.add_argument("--tokens", type=int, default=300, help="decode steps (the first N tokens)")
    p_eval.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reference = RWKVLM.from_file(args.model)
    model = quantize_(RWKVLM.from_file(args.model), args.mode, args.head)
    with open(args.textfile, encoding="utf-8") as f:
        ids = reference.default_tokenizer().encode(f.read())[: args.tokens]
    if not ids:
        print("Error: the text file gives no tokens", file=sys.stderr)
        return 1
    result = compare(reference, model, torch.tensor(ids))
    print(json.dumps({"model": args.model, "mode": args.mode, "head": args.head or args.mode, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
