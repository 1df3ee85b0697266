"""Vision-RWKV 6 (VRWKV6): Vision-RWKV with RWKV-6's data-dependent decay, as a timm model family.

Paper: "Vision-RWKV: Efficient and Scalable Visual Perception with RWKV-Like Architectures",
Yuchen Duan et al., ICLR 2025 - https://arxiv.org/abs/2403.02308
Official code (Apache-2.0): https://github.com/OpenGVLab/Vision-RWKV
 - classification/mmcls_custom/models/backbones/vrwkv6.py and cuda_v6/wkv6_cuda.cu
RWKV-6 ("Finch"): "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence",
https://arxiv.org/abs/2404.05892

The blocks, the model and the checkpoint conversion are `vrwkv.py`'s; this file adds the RWKV-6
spatial mix. Its bidirectional WKV is two causal scans of `rwkv_mm.core.ops.wkv6` per head (as the
official kernel): a left-to-right scan with the bonus u on the current token, plus a right-to-left
scan (over the reversed sequence) of the strictly later tokens without bonus, with the same per-token
decays both ways. There is no denominator and no division by T.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ..core import layers
from ..core.ops import wkv6
from .vrwkv import VRWKV, ChannelMix, _cfg, _create_vrwkv, _ratios

__all__ = ["VRWKV6", "SpatialMix6"]

TIME_MIX_EXTRA_DIM = 32  # rank of the five ddlerp low-rank terms (w, k, v, r, g)
TIME_DECAY_EXTRA_DIM = 64  # rank of the decay's low-rank term


def bi_wkv6(
    r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """VRWKV6's bidirectional WKV, per head (no state in or out):

        y_t = r_t · [ Σ_{j<t} diag(Π_{j<m<t} e^{w_m}) k_j v_jᵀ + diag(u) k_t v_tᵀ
                    + Σ_{j>t} diag(Π_{t<m<j} e^{w_m}) k_j v_jᵀ ]

    computed as `wkv6` over the tokens plus `wkv6` over the reversed tokens with a zero bonus.

    Args:
        r, k, v: [B, T, H, N].
        w: [B, T, H, N] log decay (VRWKV6: -exp(time_decay + lora)).
        u: [H, N] bonus of the current token (`time_faaaa`).

    Returns:
        y: [B, T, H, N] in r's dtype.
    """
    y, _ = wkv6(r, w, k, v, u)
    y_rev, _ = wkv6(r.flip(1), w.flip(1), k.flip(1), v.flip(1), torch.zeros_like(u))
    return y + y_rev.flip(1)


class SpatialMix6(nn.Module):
    """VRWKV6 spatial mix: multi-head Q-Shift, RWKV-6 ddlerp, data-dependent decay, bidirectional WKV-6.

    x_? = lerp(x, qshift(x), time_maa_? + m_?) with the five m_? from one low-rank map of
    lerp(x, qshift(x), time_maa_x); w = time_decay + tanh(x_w W1) W2 (log decay -exp(w));
    out = output(GroupNorm_H(BiWKV6(r, w, k, v, u)) ⊙ silu(gate(x_g))), with an optional LayerNorm
    (key_norm) before the group norm. Parameter names are the official checkpoint's.
    """

    def __init__(
        self,
        dim: int,
        layer_idx: int = 0,
        depth: int = 12,
        key_norm: bool = False,
        shift_pixel: int = 1,
        head_size: int = 64,
        device=None,
        dtype=None,
    ):
        """
        Args:
            dim: channels C, a multiple of head_size.
            layer_idx: index of the block (for the init).
            depth: number of blocks (for the init).
            key_norm: LayerNorm(C) on the WKV output.
            shift_pixel: Q-Shift distance in patches.
            head_size: channels per head N (64 in every released model).
            device: parameter device.
            dtype: parameter dtype.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % head_size != 0:
            raise ValueError(f"dim must be a multiple of head_size={head_size}, got {dim}")
        self.layer_idx, self.depth = layer_idx, depth
        self.shift_pixel = shift_pixel
        self.head_size = head_size
        self.num_heads = dim // head_size
        for name in ("x", "w", "k", "v", "r", "g"):
            setattr(self, f"time_maa_{name}", nn.Parameter(torch.empty(1, 1, dim, **dd)))
        self.time_maa_w1 = nn.Parameter(torch.empty(dim, TIME_MIX_EXTRA_DIM * 5, **dd))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, TIME_MIX_EXTRA_DIM, dim, **dd))
        self.time_decay = nn.Parameter(torch.empty(1, 1, dim, **dd))
        self.time_decay_w1 = nn.Parameter(torch.empty(dim, TIME_DECAY_EXTRA_DIM, **dd))
        self.time_decay_w2 = nn.Parameter(torch.empty(TIME_DECAY_EXTRA_DIM, dim, **dd))
        self.time_faaaa = nn.Parameter(torch.empty(self.num_heads, head_size, **dd))
        self.key = nn.Linear(dim, dim, bias=False, **dd)
        self.value = nn.Linear(dim, dim, bias=False, **dd)
        self.receptance = nn.Linear(dim, dim, bias=False, **dd)
        self.gate = nn.Linear(dim, dim, bias=False, **dd)
        self.key_norm = nn.LayerNorm(dim, **dd) if key_norm else None
        self.output = nn.Linear(dim, dim, bias=False, **dd)
        self.ln_x = nn.GroupNorm(self.num_heads, dim, eps=1e-5, **dd)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """VRWKV6's fancy init of the mixing, decay and bonus parameters (Linears: the model)."""
        C = self.time_decay.shape[-1]
        to_1, to_0 = _ratios(self.layer_idx, self.depth)
        n = torch.arange(C, device=self.time_decay.device, dtype=torch.float32)
        frac = (n / C).view(1, 1, C)
        for name in ("x", "w", "k"):
            getattr(self, f"time_maa_{name}").copy_(1.0 - frac**to_0)
        self.time_maa_v.copy_(1.0 - (frac**to_0 + 0.3 * to_1))
        self.time_maa_r.copy_(1.0 - frac ** (0.5 * to_0))
        self.time_maa_g.copy_(1.0 - frac ** (0.5 * to_0))
        for p in (self.time_maa_w1, self.time_maa_w2, self.time_decay_w1, self.time_decay_w2):
            p.uniform_(-1e-4, 1e-4)
        pos = n / max(C - 1, 1)
        self.time_decay.copy_((-6 + 5 * pos ** (0.7 + 1.3 * to_1)).view(1, 1, C))
        zigzag = 0.1 * (((n + 1) % 3) - 1)
        self.time_faaaa.copy_((to_1 * (1 - pos) + zigzag).view(self.num_heads, self.head_size))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """
        Args:
            x: [B, T, C] tokens, row-major over the patch grid.
            grid: (H, W) patch grid, H * W = T.

        Returns:
            [B, T, C].
        """
        B, T, C = x.shape
        H, N = self.num_heads, self.head_size
        shifted = layers.q_shift(x, grid, self.shift_pixel, heads=H)
        xxx = torch.lerp(x, shifted, self.time_maa_x)
        mw, mk, mv, mr, mg = layers.low_rank_multi(xxx, self.time_maa_w1, self.time_maa_w2).unbind(0)
        xw = torch.lerp(x, shifted, self.time_maa_w + mw)
        r = self.receptance(torch.lerp(x, shifted, self.time_maa_r + mr))
        k = self.key(torch.lerp(x, shifted, self.time_maa_k + mk))
        v = self.value(torch.lerp(x, shifted, self.time_maa_v + mv))
        g = F.silu(self.gate(torch.lerp(x, shifted, self.time_maa_g + mg)))
        w = -torch.exp(
            self.time_decay + layers.low_rank(xw, self.time_decay_w1, self.time_decay_w2, torch.tanh)
        )
        y = bi_wkv6(*(t.view(B, T, H, N) for t in (r, w, k, v)), self.time_faaaa).view(B, T, C)
        if self.key_norm is not None:
            y = self.key_norm(y)
        y = layers.head_group_norm(y, H, self.ln_x.weight, self.ln_x.bias, eps=self.ln_x.eps)
        return self.output(y * g)


class VRWKV6(VRWKV):
    """Vision-RWKV with RWKV-6 spatial mixes (`SpatialMix6`) and per-head Q-Shift in the channel mixes.

    Everything else (patch and position embedding, blocks, head, timm API) is `VRWKV`'s.
    """

    def __init__(self, head_size: int = 64, **kwargs):
        """
        Args:
            head_size: channels per head (64 in every released model).
            **kwargs: `VRWKV` arguments (`bi_wkv_mode` has no effect here).
        """
        super().__init__(
            att_layer=partial(SpatialMix6, head_size=head_size),
            ffn_layer=partial(ChannelMix, head_size=head_size),
            **kwargs,
        )


def _create_vrwkv6(variant: str, pretrained: bool = False, **kwargs) -> VRWKV6:
    return _create_vrwkv(variant, pretrained, model_cls=VRWKV6, **kwargs)


def _official_cfg(filename: str, **kwargs) -> dict:
    """An official checkpoint on the Hugging Face Hub (or a local copy via pretrained_cfg_overlay)."""
    return _cfg(
        hf_hub_id="OpenGVLab/Vision-RWKV",
        hf_hub_filename=filename,
        notes=("official checkpoint, converted on load by checkpoint_filter_fn",),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "vrwkv6_tiny.in1k": _official_cfg("vrwkv6_t_in1k_224.pth"),
        "vrwkv6_small.in1k": _official_cfg("vrwkv6_s_in1k_224.pth"),
        "vrwkv6_base.in1k": _official_cfg("vrwkv6_b_in1k_224.pth"),
    }
)


@register_model
def vrwkv6_tiny(pretrained: bool = False, **kwargs) -> VRWKV6:
    """VRWKV6-T (7.6M): C 192 (3 heads of 64), 12 pre-norm blocks."""
    model_args = dict(embed_dim=192, depth=12)
    return _create_vrwkv6("vrwkv6_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vrwkv6_small(pretrained: bool = False, **kwargs) -> VRWKV6:
    """VRWKV6-S (27.7M): C 384 (6 heads), 12 res-post-norm blocks, layer scale 1e-5."""
    model_args = dict(embed_dim=384, depth=12, post_norm=True, init_values=1e-5)
    return _create_vrwkv6("vrwkv6_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vrwkv6_base(pretrained: bool = False, **kwargs) -> VRWKV6:
    """VRWKV6-B (104.9M): C 768 (12 heads), 12 res-post-norm blocks, layer scale 1e-5."""
    model_args = dict(embed_dim=768, depth=12, post_norm=True, init_values=1e-5)
    return _create_vrwkv6("vrwkv6_base", pretrained=pretrained, **dict(model_args, **kwargs))
