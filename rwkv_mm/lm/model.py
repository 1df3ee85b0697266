"""RWKV language models v4 to v7, assembled from `rwkv_mm.core`, loading the official checkpoints.

Versions: RWKV-7 x070 "Goose" (generalised delta rule), RWKV-6 x060 "Finch" (data-dependent decay),
RWKV-5 x052 "Eagle" (and the 5.0 / 5.1 previews), RWKV-4. Papers: "RWKV: Reinventing RNNs for the
Transformer Era" (arXiv 2305.13048), "Eagle and Finch" (arXiv 2404.05892), "RWKV-7 Goose"
(arXiv 2503.14456). Official code: BlinkDL/RWKV-LM, BlinkDL/ChatRWKV; the numerical anchor is the
`rwkv` pip package 0.8.32 (`rwkv/model.py`), which the parity tests run side by side.

Parameter names are the checkpoint keys (`blocks.{i}.att.x_r`, `blocks.{i}.ffn.key.weight`, ...) with the
official shapes (`rwkv_mm.lm.checkpoint.expected_shapes`), so `from_file` is a key loop. Differences from
the package, all exact rewrites: decays are handed to the WKV ops as log decays; ln0 is applied to the
embedding rows in use (the package folds it into the table at load); every state is new, never mutated.

Mixing with the previous token (`torch.lerp(start, end, mu)`): v7 and v6 `lerp(x, shifted, mu)`;
v5 and v4 `lerp(shifted, x, mu)` (core/layers.py).
"""

from __future__ import annotations

import logging
import weakref
from operator import attrgetter
from os import PathLike

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..core.layers import ChannelMix, head_group_norm, low_rank_multi, token_shift
from ..core.ops import wkv4, wkv6, wkv7
from ..core.state import RWKVState
from .checkpoint import RWKVConfig, load_checkpoint

__all__ = ["RWKVLM"]

logger = logging.getLogger(__name__)

LN_X_EPS = 64e-5  # GroupNorm of v5-v7 = 1e-5 * head_size_divisor(8)^2
V7_DECAY_SCALE = 0.606531  # exp(-0.5), the package's literal: w = -0.606531 * sigmoid(.) in (-0.61, 0)
# small per-channel tensors the package keeps in float32 whatever the activation dtype (v4-v6)
FP32_KEYS = ("att.time_decay", "att.time_first", "att.time_faaaa")
GEMV_MAX_ROWS = 64  # rows of x up to which fp32 projections take the decode kernel


_EMPTY = torch.empty(0)  # "no tensor" in the fused decode kernel's argument lists
# RWKVLM -> its fused decode blocks ([] when it cannot use them), built on first use; kept outside the
# module so that copies and pickles of a model never carry kernel objects
_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _param(*shape: int, device=None, dtype=None) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, device=device, dtype=dtype))


def _last(x: Tensor) -> Tensor:
    """x[:, -1] as a state tensor: [B, T, C] -> [B, C]; copied unless T == 1 (it would pin all of x)."""
    return x[:, -1] if x.shape[1] == 1 else x[:, -1].clone()


def _linear(x: Tensor, weight: Tensor) -> Tensor:
    """`F.linear(x, weight)`: x [..., in] @ weight[out, in].T. Few rows (decode: B * T <= 64) in fp32 on
    the CPU go through the compiled kernel (`rwkv_mm.kernels.gemv`: a matrix-vector product streaming a
    column-major weight (a row-major weight.T) close to the memory bandwidth up to 4 rows, a register-
    tiled GEMM above); anything else (prefill GEMMs, other dtypes or devices, no kernel) is torch's."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows <= GEMV_MAX_ROWS and x.dtype == torch.float32 and x.device.type == "cpu":
        gemv = kernels.get("gemv", "cpp", warn_on_fallback=True)
        if gemv is not None:
            return gemv(x.reshape(rows, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def low_rank(x: Tensor, w1: Tensor, w2: Tensor, act=None) -> Tensor:
    """`core.layers.low_rank` (`act(x @ w1) @ w2`) with both products through `_linear`, so that the
    LoRA matrices take the decode kernel too (torch spent ~4.8 ms per token on them)."""
    h = _linear(x, w1.t())
    return _linear(h if act is None else act(h), w2.t())


class DecodeLinear(nn.Linear):
    """nn.Linear through `_linear`: the column-major weights `from_file` stores stream well in decode."""

    def forward(self, x: Tensor) -> Tensor:
        return _linear(x, self.weight) if self.bias is None else _linear(x, self.weight) + self.bias

    def decode_weights(self) -> tuple[Tensor, Tensor] | None:
        """What the fused decode kernel reads: (weight [out, in] column-major, empty scale), or None when
        the kernel cannot take this layer (a bias, another layout or dtype)."""
        w = self.weight
        if self.bias is not None or w.dtype != torch.float32 or not w.t().is_contiguous():
            return None
        return w, _EMPTY


def _decode_vector(block: nn.Module, name: str) -> Tensor:
    """A per-channel tensor of the fused decode kernel ("ln1.weight", "att.x_r", ...); empty when the
    block lacks it (v0 in layer 0)."""
    try:
        return attrgetter(name)(block)
    except AttributeError:
        return _EMPTY


def _decode_matrix(block: nn.Module, name: str) -> tuple[Tensor, Tensor] | None:
    """The (weight, scale) pair the fused decode kernel reads for `name` ("att.key", "att.w1", ...):
    a projection's `decode_weights()`, a LoRA matrix [in, out] (or its packed form `<name>_packed` /
    `<name>_scale`, set by `rwkv_mm.lm.quant`), empty tensors for a matrix the block lacks (v1, v2 in
    layer 0); None when the kernel cannot read it."""
    parent, attr = name.split(".")
    owner = getattr(block, parent)
    item = getattr(owner, attr, None)
    if item is None:
        return _EMPTY, _EMPTY
    if isinstance(item, nn.Module):
        return item.decode_weights() if hasattr(item, "decode_weights") else None
    packed = getattr(owner, f"{attr}_packed", None)
    if packed is not None:
        return packed, getattr(owner, f"{attr}_scale")
    return (item, _EMPTY) if item.dtype == torch.float32 and item.is_contiguous() else None


class TimeMix7(nn.Module):
    """RWKV-7 time mix: LoRA-gated decay, in-context learning rate, value residual, delta-rule WKV."""

    def __init__(self, config: RWKVConfig, layer_id: int, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.layer_id, self.n_head, self.head_size = layer_id, H, N
        self.x_r, self.x_w, self.x_k = _param(1, 1, C, **dd), _param(1, 1, C, **dd), _param(1, 1, C, **dd)
        self.x_v, self.x_a, self.x_g = _param(1, 1, C, **dd), _param(1, 1, C, **dd), _param(1, 1, C, **dd)
        self.w0, self.w1, self.w2 = (
            _param(1, 1, C, **dd),
            _param(C, config.d_decay, **dd),
            _param(config.d_decay, C, **dd),
        )
        self.a0, self.a1, self.a2 = (
            _param(1, 1, C, **dd),
            _param(C, config.d_aaa, **dd),
            _param(config.d_aaa, C, **dd),
        )
        if layer_id > 0:  # layer 0 sets the value residual instead of reading it
            self.v0, self.v1, self.v2 = (
                _param(1, 1, C, **dd),
                _param(C, config.d_mv, **dd),
                _param(config.d_mv, C, **dd),
            )
        self.g1, self.g2 = _param(C, config.d_gate, **dd), _param(config.d_gate, C, **dd)
        self.k_k, self.k_a, self.r_k = _param(1, 1, C, **dd), _param(1, 1, C, **dd), _param(H, N, **dd)
        self.receptance = nn.Linear(C, C, bias=False, **dd)
        self.key = nn.Linear(C, C, bias=False, **dd)
        self.value = nn.Linear(C, C, bias=False, **dd)
        self.output = nn.Linear(C, C, bias=False, **dd)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS, **dd)  # weights only: applied by head_group_norm

    def forward(
        self, x: Tensor, state: dict[str, Tensor], v_first: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """x: [B, T, C] (ln1 output); state: the layer's att_shift [B, C] and wkv [B, H, N, N];
        v_first: layer 0's values [B, T, C] (None in layer 0). Returns (out, new att state, v_first)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        sx = token_shift(x, state["att_shift"])  # (B, T, C) the previous token
        xr, xw, xk, xv, xa, xg = (
            torch.lerp(x, sx, m) for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g)
        )
        r = self.receptance(xr)
        w = -V7_DECAY_SCALE * torch.sigmoid((self.w0 + low_rank(xw, self.w1, self.w2, torch.tanh)).float())
        k = self.key(xk)
        v = self.value(xv)
        a = torch.sigmoid(self.a0 + low_rank(xa, self.a1, self.a2))  # in-context learning rate
        g = low_rank(xg, self.g1, self.g2, torch.sigmoid)
        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)  # (B, T, H, N) unit key per head
        k = k * (1 + (a - 1) * self.k_a)
        if self.layer_id == 0:
            v_first = v
        else:
            v = torch.lerp(v, v_first, torch.sigmoid(self.v0 + low_rank(xv, self.v1, self.v2)).to(v.dtype))
        r, k, v, a = (t.view(B, T, H, N) for t in (r, k, v, a))  # (B, T, H, N)
        y, wkv = wkv7(r, w.view(B, T, H, N), k, v, -kk, kk * a, state["wkv"])
        y = head_group_norm(y.view(B, T, C), H, self.ln_x.weight, self.ln_x.bias, LN_X_EPS)
        bonus = (r * k * self.r_k).sum(dim=-1, keepdim=True) * v  # (B, T, H, N) current-token term
        out = self.output((y + bonus.view(B, T, C)) * g)
        return out, {"att_shift": _last(x), "wkv": wkv}, v_first


class TimeMix6(nn.Module):
    """RWKV-6 time mix: data-dependent token shift (time_maa LoRA) and decay (time_decay LoRA)."""

    def __init__(self, config: RWKVConfig, layer_id: int, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.n_head, self.head_size = H, N
        self.time_maa_x, self.time_maa_w = _param(1, 1, C, **dd), _param(1, 1, C, **dd)
        self.time_maa_k, self.time_maa_v = _param(1, 1, C, **dd), _param(1, 1, C, **dd)
        self.time_maa_r, self.time_maa_g = _param(1, 1, C, **dd), _param(1, 1, C, **dd)
        self.time_maa_w1 = _param(C, 5 * config.d_mix, **dd)
        self.time_maa_w2 = _param(5, config.d_mix, C, **dd)
        self.time_decay_w1 = _param(C, config.d_decay, **dd)
        self.time_decay_w2 = _param(config.d_decay, C, **dd)
        self.time_decay = _param(1, 1, C, **dd)
        self.time_faaaa = _param(H, N, **dd)
        self.receptance = nn.Linear(C, C, bias=False, **dd)
        self.key = nn.Linear(C, C, bias=False, **dd)
        self.value = nn.Linear(C, C, bias=False, **dd)
        self.output = nn.Linear(C, C, bias=False, **dd)
        self.gate = nn.Linear(C, C, bias=False, **dd)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS, **dd)

    def forward(
        self, x: Tensor, state: dict[str, Tensor], v_first: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """x: [B, T, C]; state: att_shift [B, C], wkv [B, H, N, N]. Returns (out, new att state, v_first)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        sx = token_shift(x, state["att_shift"])  # (B, T, C)
        xxx = torch.lerp(x, sx, self.time_maa_x)
        mw, mk, mv, mr, mg = low_rank_multi(xxx, self.time_maa_w1, self.time_maa_w2).unbind(
            0
        )  # each (B, T, C)
        xw = torch.lerp(x, sx, self.time_maa_w + mw)
        xk = torch.lerp(x, sx, self.time_maa_k + mk)
        xv = torch.lerp(x, sx, self.time_maa_v + mv)
        xr = torch.lerp(x, sx, self.time_maa_r + mr)
        xg = torch.lerp(x, sx, self.time_maa_g + mg)
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        g = F.silu(self.gate(xg))
        lora = low_rank(xw, self.time_decay_w1, self.time_decay_w2, torch.tanh).float()
        w = -torch.exp(self.time_decay.float() + lora)  # (B, T, C) log decay, fp32
        r, w, k, v = (t.view(B, T, H, N) for t in (r, w, k, v))  # (B, T, H, N)
        y, wkv = wkv6(r, w, k, v, self.time_faaaa.float(), state["wkv"])
        y = head_group_norm(y.view(B, T, C), H, self.ln_x.weight, self.ln_x.bias, LN_X_EPS)
        return self.output(y * g), {"att_shift": _last(x), "wkv": wkv}, v_first


class TimeMix5(nn.Module):
    """RWKV-5 time mix: static per-channel (5.2) or per-head (5.0 / 5.1) decay; 5.1 / 5.2 add a SiLU gate."""

    def __init__(self, config: RWKVConfig, layer_id: int, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.n_head, self.head_size = H, N
        self.gated, self.bonus_key = config.variant != "5.0", config.bonus_key
        self.time_mix_k, self.time_mix_v, self.time_mix_r = (
            _param(1, 1, C, **dd),
            _param(1, 1, C, **dd),
            _param(1, 1, C, **dd),
        )
        if self.gated:
            self.time_mix_g = _param(1, 1, C, **dd)
        decay = (H, N) if config.variant == "5.2" else (H,)
        self.time_decay = _param(*decay, **dd)
        setattr(self, config.bonus_key, _param(*decay, **dd))  # time_faaaa (as is) or time_first (exp'd)
        self.receptance = nn.Linear(C, C, bias=False, **dd)
        self.key = nn.Linear(C, C, bias=False, **dd)
        self.value = nn.Linear(C, C, bias=False, **dd)
        self.output = nn.Linear(C, C, bias=False, **dd)
        if self.gated:
            self.gate = nn.Linear(C, C, bias=False, **dd)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS, **dd)

    def forward(
        self, x: Tensor, state: dict[str, Tensor], v_first: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """x: [B, T, C]; state: att_shift [B, C], wkv [B, H, N, N]. Returns (out, new att state, v_first)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        sx = token_shift(x, state["att_shift"])  # (B, T, C)
        r = self.receptance(torch.lerp(sx, x, self.time_mix_r)).view(B, T, H, N)
        k = self.key(torch.lerp(sx, x, self.time_mix_k)).view(B, T, H, N)
        v = self.value(torch.lerp(sx, x, self.time_mix_v)).view(B, T, H, N)
        w = -torch.exp(self.time_decay.float())  # log decay, [H, N] or [H]
        u = getattr(self, self.bonus_key).float()
        if self.bonus_key == "time_first":
            u = u.exp()
        w, u = (t.view(H, -1).expand(H, N).contiguous() for t in (w, u))  # (H, N)
        y, wkv = wkv6(r, w, k, v, u, state["wkv"])
        y = head_group_norm(y.view(B, T, C), H, self.ln_x.weight, self.ln_x.bias, LN_X_EPS)
        if self.gated:
            y = y * F.silu(self.gate(torch.lerp(sx, x, self.time_mix_g)))
        return self.output(y), {"att_shift": _last(x), "wkv": wkv}, v_first


class TimeMix4(nn.Module):
    """RWKV-4 time mix: per-channel WKV with a running maximum, receptance gate."""

    def __init__(self, config: RWKVConfig, layer_id: int, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        C = config.n_embd
        self.time_mix_k, self.time_mix_v, self.time_mix_r = (
            _param(1, 1, C, **dd),
            _param(1, 1, C, **dd),
            _param(1, 1, C, **dd),
        )
        self.time_decay, self.time_first = _param(C, **dd), _param(C, **dd)
        self.receptance = nn.Linear(C, C, bias=False, **dd)
        self.key = nn.Linear(C, C, bias=False, **dd)
        self.value = nn.Linear(C, C, bias=False, **dd)
        self.output = nn.Linear(C, C, bias=False, **dd)

    def forward(
        self, x: Tensor, state: dict[str, Tensor], v_first: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """x: [B, T, C]; state: att_shift, num, den, max, each [B, C].
        Returns (out, new att state, v_first)."""
        sx = token_shift(x, state["att_shift"])  # (B, T, C)
        r = torch.sigmoid(self.receptance(torch.lerp(sx, x, self.time_mix_r)))
        k = self.key(torch.lerp(sx, x, self.time_mix_k))
        v = self.value(torch.lerp(sx, x, self.time_mix_v))
        w = -torch.exp(self.time_decay.float())
        y, (num, den, mx) = wkv4(w, self.time_first.float(), k, v, (state["num"], state["den"], state["max"]))
        new = {"att_shift": _last(x), "num": num, "den": den, "max": mx}
        return self.output(r * y), new, v_first


class ChannelMix7(ChannelMix):
    """RWKV-7 channel mix: relu² MLP, no receptance gate; mixing `lerp(x, shifted, x_k)`."""

    def __init__(self, config: RWKVConfig, device=None, dtype=None):
        super().__init__(config.n_embd, config.dim_ffn, gate=False, device=device, dtype=dtype)
        self.x_k = _param(1, 1, config.n_embd, device=device, dtype=dtype)

    def forward(self, x: Tensor, shift: Tensor) -> Tensor:
        """x: [B, T, C] (ln2 output); shift: [B, C] the token before x[:, 0]. Returns [B, T, C]."""
        return super().forward(torch.lerp(x, token_shift(x, shift), self.x_k))


class ChannelMix6(ChannelMix):
    """RWKV-6 channel mix: relu² MLP with a sigmoid receptance gate; mixing `lerp(x, shifted, maa)`."""

    def __init__(self, config: RWKVConfig, device=None, dtype=None):
        super().__init__(config.n_embd, config.dim_ffn, gate=True, device=device, dtype=dtype)
        self.time_maa_k = _param(1, 1, config.n_embd, device=device, dtype=dtype)
        self.time_maa_r = _param(1, 1, config.n_embd, device=device, dtype=dtype)

    def forward(self, x: Tensor, shift: Tensor) -> Tensor:
        """x: [B, T, C]; shift: [B, C]. Returns [B, T, C]."""
        sx = token_shift(x, shift)
        return super().forward(torch.lerp(x, sx, self.time_maa_k), torch.lerp(x, sx, self.time_maa_r))


class ChannelMix4(ChannelMix):
    """RWKV-4 / RWKV-5 channel mix: relu² MLP with a receptance gate; mixing `lerp(shifted, x, mix)`."""

    def __init__(self, config: RWKVConfig, device=None, dtype=None):
        super().__init__(config.n_embd, config.dim_ffn, gate=True, device=device, dtype=dtype)
        self.time_mix_k = _param(1, 1, config.n_embd, device=device, dtype=dtype)
        self.time_mix_r = _param(1, 1, config.n_embd, device=device, dtype=dtype)

    def forward(self, x: Tensor, shift: Tensor) -> Tensor:
        """x: [B, T, C]; shift: [B, C]. Returns [B, T, C]."""
        sx = token_shift(x, shift)
        return super().forward(torch.lerp(sx, x, self.time_mix_k), torch.lerp(sx, x, self.time_mix_r))


MIXES = {
    "v7": (TimeMix7, ChannelMix7),
    "v6": (TimeMix6, ChannelMix6),
    "v5": (TimeMix5, ChannelMix4),
    "v4": (TimeMix4, ChannelMix4),
}


class Block(nn.Module):
    """Pre-LN residual block: x + att(ln1(x)), then + ffn(ln2(x)). Layer 0 also holds ln0 (embedding norm)."""

    def __init__(self, config: RWKVConfig, layer_id: int, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        C = config.n_embd
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C, eps=1e-5, **dd)
        self.ln1 = nn.LayerNorm(C, eps=1e-5, **dd)
        self.ln2 = nn.LayerNorm(C, eps=1e-5, **dd)
        time_mix, channel_mix = MIXES[config.version]
        self.att = time_mix(config, layer_id, **dd)
        self.ffn = channel_mix(config, **dd)

    def forward(
        self, x: Tensor, state: dict[str, Tensor], v_first: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """x: [B, T, C]; state: this layer's dict (core/state.py). Returns (x, new layer state, v_first)."""
        dx, new, v_first = self.att(self.ln1(x), state, v_first)
        x = x + dx
        xf = self.ln2(x)
        x = x + self.ffn(xf, state["ffn_shift"])
        new["ffn_shift"] = _last(xf)
        return x, new, v_first


def _reset_after_load(module: nn.Module, incompatible_keys) -> None:
    module.reset_decode_cache()


class RWKVLM(nn.Module):
    """An RWKV language model (v4-v7) with recurrent state.

    Build it with `RWKVLM.from_file(path)`; `RWKVLM(config)` gives zero-initialised weights under the
    checkpoint's names (for `load_state_dict` or training code).

    Example:
        >>> lm = RWKVLM.from_file("rwkv7-g1-0.1b.pth")
        >>> logits, state = lm(torch.tensor([[510, 444]]))          # [1, 65536]
        >>> logits, state = lm(torch.tensor([[33]]), state)          # one more token
    """

    def __init__(self, config: RWKVConfig, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd, **dd)
        self.blocks = nn.ModuleList(Block(config, i, **dd) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd, eps=1e-5, **dd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False, **dd)
        self.initial_state: RWKVState | None = None  # a state-tuned checkpoint's state, batch 1
        for module in self.modules():  # every projection, core.layers.ChannelMix's included
            if type(module) is nn.Linear:
                module.__class__ = DecodeLinear
        self.register_load_state_dict_post_hook(_reset_after_load)

    @classmethod
    def from_file(
        cls,
        path: str | PathLike,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> RWKVLM:
        """Load an official checkpoint: .pth, .safetensors, or a folder (model.safetensors + config.json).

        Args:
            path: the checkpoint; its version (v4-v7) and shapes are read from the keys.
            dtype: weights and activations (float32 or bfloat16); WKV states stay float32. Tensors are cast
                one at a time (a bf16 file never exists as a whole in float32); tensors already stored in
                `dtype` other than the Linear weights are used as loaded (memory-mapped .pth: no copy).
                Defaults to float32.
            device: where the weights go. Defaults to "cpu".

        Returns:
            The model in eval mode with requires_grad off.
        """
        ckpt = load_checkpoint(path)
        with torch.device("meta"):
            model = cls(ckpt.config)
        # Linear weights [out, in] are stored column-major (a transposed copy, as the package does):
        # one-token matrix-vector products stream them ~1.4x faster from memory; GEMMs do not care
        linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        weights = {}
        for name, p in model.state_dict(keep_vars=True).items():
            t = ckpt.tensors[name].reshape(p.shape)
            keep_fp32 = ckpt.config.version != "v7" and name.endswith(FP32_KEYS)
            t = t.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
            weights[name] = t.t().contiguous().t() if name in linears else t.contiguous()
        model.load_state_dict(weights, strict=True, assign=True)
        if ckpt.state is not None:
            model.initial_state = ckpt.state.to(device, dtype)
        logger.info(
            "loaded %s: %s, %d layers, width %d, vocab %d, %s",
            path,
            ckpt.config.name,
            ckpt.config.n_layer,
            ckpt.config.n_embd,
            ckpt.config.vocab_size,
            dtype,
        )
        return model.eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (that of the embedding table)."""
        return self.emb.weight.dtype

    def init_state(self, batch_size: int = 1) -> RWKVState:
        """The state before any token: a state-tuned checkpoint's state repeated over the batch, else
        zeros."""
        device = self.emb.weight.device
        if self.initial_state is not None:
            return self.initial_state.select([0] * batch_size).to(device, self.dtype)
        c = self.config
        return RWKVState.zeros(
            c.version, c.n_layer, batch_size, c.n_embd, c.head_size or 64, device, self.dtype
        )

    def forward(
        self, tokens: Tensor, state: RWKVState | None = None, full_output: bool = False
    ) -> tuple[Tensor, RWKVState]:
        """Run tokens through the model, continuing from `state`.

        Prefill (T > 1) runs every projection as one GEMM over the B*T rows and the WKV through the
        chunked (or compiled) ops. Decode (T == 1) of an RWKV-7 float32 model on the CPU runs each
        block as one call of the fused kernel (`rwkv_mm.kernels.decode7`; the same arithmetic, no
        per-op dispatch; int8 / bf16 weights of `rwkv_mm.lm.quant` included); otherwise it is the
        same code as prefill on [B, 1, C], without copies. The head runs only on the positions whose
        logits are returned.

        Args:
            tokens: LongTensor [B, T], T >= 1.
            state: the state after the previous tokens (batch B), or None for `init_state(B)`. Not modified.
            full_output: return the logits of every position instead of the last one only.

        Returns:
            logits: float32 [B, V] (last position) or [B, T, V] with full_output; and the new state.
        """
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be [B, T] with T >= 1, got shape {list(tokens.shape)}")
        B, T = tokens.shape
        state = self._check_state(state, B)
        if T == 1:
            blocks = self._fused_blocks()
            if blocks:
                logits, state = self._decode_fused(blocks, tokens[:, 0], state)
                return (logits.unsqueeze(1) if full_output else logits), state
        x = self.blocks[0].ln0(self.emb(tokens))  # (B, T, C)
        v_first = None
        layers = []
        for block, layer_state in zip(self.blocks, state.layers):
            x, new, v_first = block(x, layer_state, v_first)
            layers.append(new)
        if not full_output:
            x = x[:, -1]  # (B, C): the head only where logits are needed
        logits = self.head(self.ln_out(x)).float()
        return logits, RWKVState(self.config.version, layers)

    def _decode_fused(self, blocks: list, token: Tensor, state: RWKVState) -> tuple[Tensor, RWKVState]:
        """One token per sequence through the fused RWKV-7 block kernel. token: [B]; returns [B, V]."""
        x = self.blocks[0].ln0(self.emb(token))  # (B, C)
        v_first = _EMPTY
        layers = []
        for block, s in zip(blocks, state.layers):
            x, att, wkv, ffn, v_first = block(x, s["att_shift"], s["wkv"], s["ffn_shift"], v_first)
            layers.append({"att_shift": att, "wkv": wkv, "ffn_shift": ffn})
        return self.head(self.ln_out(x)).float(), RWKVState(self.config.version, layers)

    def _fused_blocks(self) -> list:
        """The fused decode kernel's blocks (`rwkv_mm.kernels.decode7`), or an empty list when this model
        cannot use it: not RWKV-7, not float32 on the CPU, gradients wanted, a weight it cannot read,
        or no kernel."""
        if (
            self.config.version != "v7"
            or self.emb.weight.dtype != torch.float32
            or self.emb.weight.device.type != "cpu"
            or (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))
        ):
            return []
        blocks = _FUSED.get(self)
        if blocks is None:
            blocks = _FUSED[self] = self._build_fused()
        return blocks

    def uses_fused_decode(self) -> bool:
        """Whether one-token steps (T == 1) run through the fused RWKV-7 block kernel, under the current
        grad mode (False for other versions, dtypes or devices, or without the compiled kernel)."""
        return bool(self._fused_blocks())

    def _build_fused(self) -> list:
        block_cls = kernels.get("decode7", "cpp", warn_on_fallback=True)
        if block_cls is None:
            return []
        from ..kernels.decode7 import MATS, VECS

        fused = []
        for block in self.blocks:
            vecs = [_decode_vector(block, n) for n in VECS]
            mats = [_decode_matrix(block, n) for n in MATS]
            if any(m is None for m in mats) or any(v.dtype != torch.float32 for v in vecs):
                logger.info("a weight is in a layout the fused decode kernel cannot read: decoding in torch")
                return []
            fused.append(block_cls(vecs, [m[0] for m in mats], [m[1] for m in mats], self.config.head_size))
        return fused

    def reset_decode_cache(self) -> None:
        """Forget the fused decode kernel's view of the weights; the next decode step rebuilds it. Called by
        `load_state_dict`, `.to()` and `rwkv_mm.lm.quant.quantize_`; call it after replacing modules."""
        _FUSED.pop(self, None)

    def _apply(self, fn, recurse=True):
        self.reset_decode_cache()
        return super()._apply(fn, recurse)

    def generate_batch(self, *args, **kwargs):
        """Batched generation: `rwkv_mm.lm.generate.generate_batch(self, *args, **kwargs)`."""
        from .generate import generate_batch

        return generate_batch(self, *args, **kwargs)

    def _check_state(self, state: RWKVState | None, batch_size: int) -> RWKVState:
        if state is None:
            return self.init_state(batch_size)
        c = self.config
        if state.version != c.version or len(state.layers) != c.n_layer:
            raise ValueError(
                f"state is a {len(state.layers)}-layer {state.version} state, the model needs a "
                f"{c.n_layer}-layer {c.version} state"
            )
        if state.batch_size != batch_size:
            raise ValueError(f"state has batch size {state.batch_size}, tokens have {batch_size}")
        shift = state.layers[0]["att_shift"]
        if shift.shape[-1] != c.n_embd:
            raise ValueError(f"state width is {shift.shape[-1]}, the model's is {c.n_embd}")
        if shift.dtype != self.dtype or shift.device != self.emb.weight.device:
            state = state.to(self.emb.weight.device, self.dtype)
        return state

    def default_tokenizer(self):
        """The tokenizer this model was trained with: the asset config's "tokenizer" field, else the one of
        its vocabulary size (`rwkv_mm.lm.tokenizer.tokenizer_for_vocab_size`)."""
        from .tokenizer import load_tokenizer, tokenizer_for_vocab_size

        if self.config.tokenizer:
            return load_tokenizer(self.config.tokenizer)
        return tokenizer_for_vocab_size(self.config.vocab_size)
