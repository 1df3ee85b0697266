"""Vision-RWKV (VRWKV): a bidirectional RWKV backbone for images, as a timm model family.

Paper: "Vision-RWKV: Efficient and Scalable Visual Perception with RWKV-Like Architectures",
Yuchen Duan et al., ICLR 2025 - https://arxiv.org/abs/2403.02308
Official code (Apache-2.0): https://github.com/OpenGVLab/Vision-RWKV
 - classification/mmcls_custom/models/backbones/vrwkv.py (T/S/B, mmcls checkpoints)
 - classification_internimage/models/vrwkv.py (L, InternImage-style checkpoints)
Laid out after timm's model families (https://github.com/huggingface/pytorch-image-models,
timm/models/vision_transformer.py).

The Bi-WKV runs through `rwkv_mm.core.ops.biwkv` in pure PyTorch (or a compiled kernel when one is
available), so the models run on the CPU and at any input size: images are zero-padded right/bottom
to a multiple of the patch size and the position embedding is resized bicubically to the patch grid.

Two Bi-WKV modes (see `rwkv_mm.core.ops.biwkv`): "paper" (the formula of the paper; what models
trained here use) and "official" (the arithmetic of the released CUDA kernel, which the official
checkpoints were trained with). The pretrained cfgs of the official weights select "official".
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, PatchEmbed, get_device_dtype, trunc_normal_
from timm.models import (
    build_model_with_cfg,
    checkpoint,
    generate_default_cfgs,
    named_apply,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models._features import feature_take_indices
from torch import nn

from .. import assets
from ..core import layers
from ..core.ops import biwkv
from .data import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD

__all__ = ["VRWKV", "Block", "SpatialMix", "ChannelMix"]

BI_WKV_MODES = ("paper", "official")
# marks the pretrained cfgs whose weights need the kernel-faithful Bi-WKV (see `_create_vrwkv`)
OFFICIAL_BI_WKV_NOTE = "bi_wkv_mode=official"
# about how many tokens the mixes take at a time without autograd (whole patch rows): bounds the
# [band, 4C] hidden of the channel mix and the other per-band temporaries (see `q_shift_bands`)
INFERENCE_BAND_TOKENS = 512
# channels per Bi-WKV call of the lean spatial mix (a multiple of the C++ kernel's 16-channel jobs)
INFERENCE_CHANNEL_GROUP = 64


def resize_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """Bicubic resize of an absolute position embedding with no prefix tokens.

    As mmcls' `resize_pos_embed` (what Vision-RWKV calls every forward): align_corners=False and no
    antialias. Computes in float32 (float64 stays float64) and returns pos_embed's dtype.

    Args:
        pos_embed: [1, h * w, C], tokens in row-major order.
        old_grid: (h, w) of pos_embed.
        new_grid: (H, W) wanted.

    Returns:
        [1, H * W, C].
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos_embed
    C = pos_embed.shape[-1]
    compute = torch.float64 if pos_embed.dtype == torch.float64 else torch.float32
    p = pos_embed.to(compute).reshape(1, *old_grid, C).permute(0, 3, 1, 2)  # (1, C, h, w)
    p = F.interpolate(p, size=new_grid, mode="bicubic", align_corners=False, antialias=False)
    return p.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], C).to(pos_embed.dtype)


def q_shift_bands(
    x: torch.Tensor,
    grid: tuple[int, int],
    shift_pixel: int = 1,
    heads: int = 1,
    band_tokens: int = INFERENCE_BAND_TOKENS,
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """Q-Shift by bands of whole patch rows, for the mixes' token-chunked inference.

    Each band is shifted together with the `shift_pixel` rows above and below it (all that Q-Shift
    reads), so the bands put together equal `layers.q_shift(x, grid, shift_pixel, heads)` exactly.
    One band (no slicing) when `band_tokens` covers the grid.

    Args:
        x: [B, T, C] tokens, row-major over the patch grid.
        grid: (H, W) patch grid, H * W = T.
        shift_pixel: Q-Shift distance in patches.
        heads: Q-Shift heads (see `layers.q_shift`).
        band_tokens: tokens per band, rounded down to whole rows (at least one row).

    Yields:
        (tokens, xx, xb): the band's slice of the T tokens, then q_shift(x) and x over it, [B, t, C].
    """
    H, W = grid
    rows = max(1, band_tokens // W)
    if rows >= H:
        yield slice(0, H * W), layers.q_shift(x, grid, shift_pixel, heads), x
        return
    for r0 in range(0, H, rows):
        r1 = min(H, r0 + rows)
        h0, h1 = max(0, r0 - shift_pixel), min(H, r1 + shift_pixel)  # the band and its neighbour rows
        xx = layers.q_shift(x[:, h0 * W : h1 * W], (h1 - h0, W), shift_pixel, heads)
        yield slice(r0 * W, r1 * W), xx[:, (r0 - h0) * W : (r1 - h0) * W], x[:, r0 * W : r1 * W]


def _ratios(layer_idx: int, depth: int) -> tuple[float, float]:
    """The fancy init's (0 -> 1, 1 -> almost 0) layer ratios: l / (L - 1) and 1 - l / L."""
    return layer_idx / max(depth - 1, 1), 1.0 - layer_idx / depth


class SpatialMix(nn.Module):
    """VRWKV spatial mix ("att"): Q-Shift, per-channel Bi-WKV, receptance gate.

    `out = output(sigmoid(receptance(x_r)) ⊙ BiWKV(spatial_decay / T, spatial_first / T, key(x_k),
    value(x_v)))`, with x_? = lerp(qshift(x), x, spatial_mix_?) and an optional LayerNorm (key_norm,
    VRWKV-L) on the Bi-WKV output. Parameter names are the official checkpoint's.
    """

    def __init__(
        self,
        dim: int,
        layer_idx: int = 0,
        depth: int = 12,
        key_norm: bool = False,
        shift_pixel: int = 1,
        bi_wkv_mode: str = "paper",
        device=None,
        dtype=None,
    ):
        """
        Args:
            dim: channels C.
            layer_idx: index of the block (for the init).
            depth: number of blocks (for the init).
            key_norm: LayerNorm(C) on the Bi-WKV output.
            shift_pixel: Q-Shift distance in patches.
            bi_wkv_mode: "paper" or "official" (see `rwkv_mm.core.ops.biwkv`).
            device: parameter device.
            dtype: parameter dtype.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if bi_wkv_mode not in BI_WKV_MODES:
            raise ValueError(f"bi_wkv_mode must be one of {BI_WKV_MODES}, got {bi_wkv_mode!r}")
        self.layer_idx, self.depth = layer_idx, depth
        self.shift_pixel = shift_pixel
        self.bi_wkv_mode = bi_wkv_mode
        self.spatial_decay = nn.Parameter(torch.empty(dim, **dd))
        self.spatial_first = nn.Parameter(torch.empty(dim, **dd))
        self.spatial_mix_k = nn.Parameter(torch.empty(1, 1, dim, **dd))
        self.spatial_mix_v = nn.Parameter(torch.empty(1, 1, dim, **dd))
        self.spatial_mix_r = nn.Parameter(torch.empty(1, 1, dim, **dd))
        self.key = nn.Linear(dim, dim, bias=False, **dd)
        self.value = nn.Linear(dim, dim, bias=False, **dd)
        self.receptance = nn.Linear(dim, dim, bias=False, **dd)
        self.key_norm = nn.LayerNorm(dim, **dd) if key_norm else None
        self.output = nn.Linear(dim, dim, bias=False, **dd)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Vision-RWKV's "fancy" init of the decay, bonus and mixing coefficients (Linears: the model)."""
        C = self.spatial_decay.shape[0]
        to_1, to_0 = _ratios(self.layer_idx, self.depth)
        h = torch.arange(C, device=self.spatial_decay.device, dtype=torch.float32)
        self.spatial_decay.copy_(-5 + 8 * (h / max(C - 1, 1)) ** (0.7 + 1.3 * to_1))
        self.spatial_first.copy_(math.log(0.3) + 0.5 * (((h + 1) % 3) - 1))
        frac = (h / C).view(1, 1, C)
        self.spatial_mix_k.copy_(frac**to_0)
        self.spatial_mix_v.copy_(frac**to_0 + 0.3 * to_1)
        self.spatial_mix_r.copy_(frac ** (0.5 * to_0))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """
        Args:
            x: [B, T, C] tokens, row-major over the patch grid.
            grid: (H, W) patch grid, H * W = T.

        Returns:
            [B, T, C].
        """
        if not torch.is_grad_enabled():
            return self._forward_lean(x, grid)
        T = x.shape[1]
        xx = layers.q_shift(x, grid, self.shift_pixel)
        k = self.key(torch.lerp(xx, x, self.spatial_mix_k))
        v = self.value(torch.lerp(xx, x, self.spatial_mix_v))
        sr = torch.sigmoid(self.receptance(torch.lerp(xx, x, self.spatial_mix_r)))
        y = biwkv(self.spatial_decay / T, self.spatial_first / T, k, v, mode=self.bi_wkv_mode)
        if self.key_norm is not None:
            y = self.key_norm(y)
        return self.output(sr * y)

    def _forward_lean(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """`forward` without autograd, in less memory (the same values). The Bi-WKV is per channel, so
        it runs by groups of `INFERENCE_CHANNEL_GROUP` channels, their k and v projected by row bands
        (`q_shift_bands`: no [B, T, C] shifted or mixed copies); then the gated output, by row bands
        written over y. At full size only x and y are alive, plus [B, T, group] k and v."""
        B, T, C = x.shape
        w, u = self.spatial_decay / T, self.spatial_first / T
        y = torch.empty_like(x)
        for c0 in range(0, C, INFERENCE_CHANNEL_GROUP):
            ch = slice(c0, min(C, c0 + INFERENCE_CHANNEL_GROUP))
            k, v = x.new_empty(B, T, ch.stop - c0), x.new_empty(B, T, ch.stop - c0)
            for tokens, xx, xb in q_shift_bands(x, grid, self.shift_pixel):
                k[:, tokens] = F.linear(torch.lerp(xx, xb, self.spatial_mix_k), self.key.weight[ch])
                v[:, tokens] = F.linear(torch.lerp(xx, xb, self.spatial_mix_v), self.value.weight[ch])
            y[..., ch] = biwkv(w[ch], u[ch], k, v, mode=self.bi_wkv_mode)
            del k, v
        if self.key_norm is not None:
            y = self.key_norm(y)
        for tokens, xx, xb in q_shift_bands(x, grid, self.shift_pixel):
            sr = torch.sigmoid_(self.receptance(torch.lerp(xx, xb, self.spatial_mix_r)))
            y[:, tokens] = self.output(sr.mul_(y[:, tokens]))
        return y


class ChannelMix(layers.ChannelMix):
    """VRWKV (and VRWKV6) channel mix ("ffn"): Q-Shift, squared-ReLU MLP, receptance gate.

    `out = sigmoid(receptance(x_r)) ⊙ value(relu(key(x_k))²)` with x_? = lerp(qshift(x), x,
    spatial_mix_?) (VRWKV's order, kept by VRWKV6's channel mix) and an optional LayerNorm on the
    hidden activations (key_norm). The MLP is `rwkv_mm.core.layers.ChannelMix`.
    """

    def __init__(
        self,
        dim: int,
        layer_idx: int = 0,
        depth: int = 12,
        mlp_ratio: float = 4.0,
        key_norm: bool = False,
        shift_pixel: int = 1,
        head_size: int | None = None,
        device=None,
        dtype=None,
    ):
        """
        Args:
            dim: channels C.
            layer_idx: index of the block (for the init).
            depth: number of blocks (for the init).
            mlp_ratio: hidden width / C (4 in every released model).
            key_norm: LayerNorm on the hidden activations.
            shift_pixel: Q-Shift distance in patches.
            head_size: channels per Q-Shift head (VRWKV6: 64); None for one group over all C (VRWKV).
            device: parameter device.
            dtype: parameter dtype.
        """
        dd = {"device": device, "dtype": dtype}
        super().__init__(dim, int(dim * mlp_ratio), gate=True, key_norm=key_norm, **dd)
        self.layer_idx, self.depth = layer_idx, depth
        self.shift_pixel = shift_pixel
        self.shift_heads = 1 if head_size is None else dim // head_size
        self.spatial_mix_k = nn.Parameter(torch.empty(1, 1, dim, **dd))
        self.spatial_mix_r = nn.Parameter(torch.empty(1, 1, dim, **dd))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fancy init of the mixing coefficients: (h / C)^(1 - l / L)."""
        C = self.spatial_mix_k.shape[-1]
        _, to_0 = _ratios(self.layer_idx, self.depth)
        frac = (torch.arange(C, device=self.spatial_mix_k.device, dtype=torch.float32) / C).view(1, 1, C)
        self.spatial_mix_k.copy_(frac**to_0)
        self.spatial_mix_r.copy_(frac**to_0)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:  # type: ignore[override]
        """
        Args:
            x: [B, T, C] tokens, row-major over the patch grid.
            grid: (H, W) patch grid, H * W = T.

        Returns:
            [B, T, C].
        """
        if torch.is_grad_enabled():
            return self._mix(layers.q_shift(x, grid, self.shift_pixel, heads=self.shift_heads), x)
        out = torch.empty_like(x)  # without autograd, by row bands: the hidden is [B, band, 4C]
        for tokens, xx, xb in q_shift_bands(x, grid, self.shift_pixel, self.shift_heads):
            out[:, tokens] = self._mix(xx, xb)
        return out

    def _mix(self, xx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[B, t, C] shifted and plain tokens -> [B, t, C]."""
        return super().forward(torch.lerp(xx, x, self.spatial_mix_k), torch.lerp(xx, x, self.spatial_mix_r))


class Block(nn.Module):
    """One VRWKV block: spatial mix then channel mix, each residual.

    pre-norm (Tiny):         x = x + dp(g1 ⊙ att(ln1(x)));  x = x + dp(g2 ⊙ ffn(ln2(x)))
    res-post-norm (S/B/L):   x = x + dp(g1 ⊙ ln1(att(x)));  x = x + dp(g2 ⊙ ln2(ffn(x)))
    The first block applies `ln0` to its input first; g1/g2 (gamma1/gamma2, layer scale) exist only
    with init_values.
    """

    def __init__(
        self,
        dim: int,
        layer_idx: int = 0,
        depth: int = 12,
        mlp_ratio: float = 4.0,
        post_norm: bool = False,
        init_values: float | None = None,
        key_norm: bool = False,
        shift_pixel: int = 1,
        drop_path: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        att_layer: Callable[..., nn.Module] = SpatialMix,
        ffn_layer: Callable[..., nn.Module] = ChannelMix,
        device=None,
        dtype=None,
    ):
        """
        Args:
            dim: channels C.
            layer_idx: index of this block; block 0 gets `ln0`.
            depth: number of blocks.
            mlp_ratio: channel-mix hidden width / C.
            post_norm: normalise the branch outputs (res-post-norm) instead of the inputs.
            init_values: layer-scale init (gamma1/gamma2); None for no layer scale.
            key_norm: the extra norms of VRWKV-L inside the spatial and channel mixes.
            shift_pixel: Q-Shift distance in patches.
            drop_path: stochastic-depth rate.
            norm_layer: norm for ln0/ln1/ln2.
            att_layer: spatial-mix type.
            ffn_layer: channel-mix type.
            device: parameter device.
            dtype: parameter dtype.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        mix = dict(layer_idx=layer_idx, depth=depth, key_norm=key_norm, shift_pixel=shift_pixel)
        self.post_norm = post_norm
        self.ln0 = norm_layer(dim, **dd) if layer_idx == 0 else None
        self.ln1 = norm_layer(dim, **dd)
        self.ln2 = norm_layer(dim, **dd)
        self.att = att_layer(dim, **mix, **dd)
        self.ffn = ffn_layer(dim, mlp_ratio=mlp_ratio, **mix, **dd)
        if init_values is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(init_values), **dd))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(init_values), **dd))
        else:
            self.gamma1 = self.gamma2 = None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """
        Args:
            x: [B, T, C] tokens, row-major over the patch grid.
            grid: (H, W) patch grid, H * W = T.

        Returns:
            [B, T, C].
        """
        if self.ln0 is not None:
            x = self.ln0(x)
        if self.post_norm:
            x = _residual(x, self.drop_path(_scale(self.ln1(self.att(x, grid)), self.gamma1)))
            x = _residual(x, self.drop_path(_scale(self.ln2(self.ffn(x, grid)), self.gamma2)))
        else:
            x = _residual(x, self.drop_path(_scale(self.att(self.ln1(x), grid), self.gamma1)))
            x = _residual(x, self.drop_path(_scale(self.ffn(self.ln2(x), grid), self.gamma2)))
        return x


def _residual(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x + branch; without autograd, into the memory of branch (a block's fresh output, the same values)."""
    if torch.is_grad_enabled() or branch.dtype != x.dtype:
        return x + branch
    return branch.add_(x)


def _scale(x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    return x if gamma is None else gamma * x


class VRWKV(nn.Module):
    """Vision-RWKV: patch embedding, absolute position embedding, RWKV blocks, average-pooled head.

    No class token. Inputs of any size are zero-padded right/bottom to a multiple of the patch size
    (mmcv's "corner" padding) and the position embedding (learnt for `img_size`) is resized to the
    patch grid every forward. Classifier: final norm -> token average -> [Linear + Tanh
    (`pre_logits`, VRWKV-L)] -> dropout -> Linear.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 192,
        depth: int = 12,
        mlp_ratio: float = 4.0,
        post_norm: bool = False,
        init_values: float | None = None,
        key_norm: bool = False,
        head_hidden_size: int | None = None,
        shift_pixel: int = 1,
        bi_wkv_mode: str = "paper",
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        weight_init: str = "",
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        block_fn: Callable[..., nn.Module] = Block,
        att_layer: Callable[..., nn.Module] | None = None,
        ffn_layer: Callable[..., nn.Module] = ChannelMix,
        device=None,
        dtype=None,
    ):
        """
        Args:
            img_size: input size the position embedding is learnt for (VRWKV-L: 192).
            patch_size: patch size.
            in_chans: input channels.
            num_classes: classes of the head; 0 for no head.
            global_pool: "avg" (token mean) or "" (no pooling).
            embed_dim: channels C.
            depth: number of blocks.
            mlp_ratio: channel-mix hidden width / C.
            post_norm: res-post-norm blocks (S/B/L) instead of pre-norm (T).
            init_values: layer-scale init; None for none.
            key_norm: the extra norms of VRWKV-L.
            head_hidden_size: width of a Linear + Tanh before the classifier (VRWKV-L: 3072); None for none.
            shift_pixel: Q-Shift distance in patches.
            bi_wkv_mode: "paper" or "official" Bi-WKV (see `rwkv_mm.core.ops.biwkv`).
            drop_rate: dropout before the classifier.
            pos_drop_rate: dropout after the position embedding.
            drop_path_rate: stochastic depth, linear from 0 to this over the blocks.
            weight_init: "" (Vision-RWKV's init) or "skip" (leave parameters uninitialised).
            norm_layer: norm of the blocks and the final norm.
            block_fn: block type.
            att_layer: spatial-mix type; None for `SpatialMix` with `bi_wkv_mode`.
            ffn_layer: channel-mix type.
            device: parameter device.
            dtype: parameter dtype.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if global_pool not in ("", "avg"):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if weight_init not in ("", "skip"):
            raise ValueError(f"weight_init must be '' or 'skip', got {weight_init!r}")
        if att_layer is None:
            att_layer = partial(SpatialMix, bi_wkv_mode=bi_wkv_mode)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.head_hidden_size = head_hidden_size or embed_dim
        self.num_prefix_tokens = 0
        self.has_class_token = False
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            output_fmt="NHWC",
            strict_img_size=False,
            **dd,
        )
        self.pos_embed_grid: tuple[int, int] = tuple(self.patch_embed.grid_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.pos_embed_grid), embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(
            block_fn(
                embed_dim,
                layer_idx=i,
                depth=depth,
                mlp_ratio=mlp_ratio,
                post_norm=post_norm,
                init_values=init_values,
                key_norm=key_norm,
                shift_pixel=shift_pixel,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                att_layer=att_layer,
                ffn_layer=ffn_layer,
                **dd,
            )
            for i in range(depth)
        )
        reduction = self.patch_embed.feat_ratio()
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)
        ]
        self.norm = norm_layer(embed_dim, **dd)

        if head_hidden_size:
            self.pre_logits = nn.Sequential(
                OrderedDict(fc=nn.Linear(embed_dim, head_hidden_size, **dd), act=nn.Tanh())
            )
        else:
            self.pre_logits = nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()

        if weight_init != "skip":
            self.init_weights()

    def init_weights(self) -> None:
        """Vision-RWKV's init: Linear trunc-normal(0.02) with zero bias, norms (1, 0), pos_embed 0, the
        fancy init of the mixes; the patch conv keeps torch's default."""
        nn.init.zeros_(self.pos_embed)
        named_apply(_init_weights, self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names (fnmatch patterns) kept out of weight decay (1-D ones are excluded anyway)."""
        return {"pos_embed", "*.spatial_mix_*", "*.time_maa_*"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_bi_wkv_mode(self, mode: str) -> None:
        """Switch every spatial mix to the "paper" or the "official" Bi-WKV."""
        if mode not in BI_WKV_MODES:
            raise ValueError(f"bi_wkv_mode must be one of {BI_WKV_MODES}, got {mode!r}")
        for m in self.modules():
            if isinstance(m, SpatialMix):
                m.bi_wkv_mode = mode

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier (Identity for num_classes 0); `pre_logits` (VRWKV-L's Linear + Tanh) is kept."""
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("", "avg"):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, C_in, H, W] image -> ([B, T, C] tokens with position embedding, (h, w) patch grid)."""
        ph, pw = self.patch_embed.patch_size
        pad_h, pad_w = -x.shape[-2] % ph, -x.shape[-1] % pw
        if pad_h or pad_w:  # mmcv's "corner" padding (timm's dynamic_img_pad copies x even when it adds none)
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.patch_embed(x) if torch.is_grad_enabled() else self._patch_embed_bands(x)  # (B, h, w, C)
        grid = (x.shape[1], x.shape[2])
        x = _residual(resize_pos_embed(self.pos_embed, self.pos_embed_grid, grid), x.flatten(1, 2))
        return self.pos_drop(x), grid

    def _patch_embed_bands(self, x: torch.Tensor) -> torch.Tensor:
        """`patch_embed` without autograd, by bands of patch rows written into one [B, h, w, C] tensor
        (the same values; at 1024 x 1024 it spares a ~10 MB temporary of the whole-image convolution)."""
        ph, pw = self.patch_embed.patch_size
        B, _, H, W = x.shape
        h, w = H // ph, W // pw
        out = x.new_empty(B, h, w, self.embed_dim)
        rows = max(1, INFERENCE_BAND_TOKENS // w)
        for r0 in range(0, h, rows):
            band = self.patch_embed.proj(x[:, :, r0 * ph : (r0 + rows) * ph])  # [B, C, rows, w]
            out[:, r0 : r0 + rows] = self.patch_embed.norm(band.permute(0, 2, 3, 1))
        return out

    def _run_block(self, blk: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(blk, x, grid)
        return blk(x, grid)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> [B, T, C] normalised tokens, T = ceil(H / patch) * ceil(W / patch)."""
        x, grid = self._embed(x)
        for blk in self.blocks:
            x = self._run_block(blk, x, grid)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """[B, T, C] tokens -> [B, num_classes] logits ([B, head_hidden_size] with pre_logits)."""
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.pre_logits(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> [B, num_classes]."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward that also returns the outputs of chosen blocks.

        Args:
            x: [B, C_in, H, W] images.
            indices: the last n blocks if int, all if None, these blocks if a list (negative from the end).
            norm: apply the final norm to every intermediate.
            stop_early: stop after the last block needed.
            output_fmt: "NCHW" ([B, C, h, w] maps) or "NLC" ([B, T, C] tokens).
            intermediates_only: return only the intermediates.

        Returns:
            The list of intermediates, or (final normalised tokens [B, T, C], intermediates).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x, grid = self._embed(x)
        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            blocks = self.blocks
        else:
            blocks = self.blocks[: max_index + 1]
        intermediates = []
        for i, blk in enumerate(blocks):
            x = self._run_block(blk, x, grid)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        if output_fmt == "NCHW":
            intermediates = [y.reshape(B, *grid, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the blocks after the last wanted intermediate (and the norm / head if asked).

        Returns:
            The absolute indices of the kept intermediates.
        """
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.pre_logits = nn.Identity()
            self.head_hidden_size = self.embed_dim
            self.reset_classifier(0, "")
        return take_indices


def _init_weights(module: nn.Module, name: str = "") -> None:
    """Per-module part of `VRWKV.init_weights` (applied children first, so a mix's own init wins)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        if module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    elif hasattr(module, "init_weights") and not isinstance(module, VRWKV):
        module.init_weights()


def _unwrap_checkpoint(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The weights inside an official container (mmcls `{meta, state_dict}`, InternImage
    `{model | state_dict, model_ema, optimizer, config, ...}`) or a bare state dict; EMA weights first,
    as timm's loader."""
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        inner = state_dict.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return state_dict


def checkpoint_filter_fn(state_dict: dict[str, Any], model: VRWKV) -> dict[str, torch.Tensor]:
    """Official Vision-RWKV checkpoints (mmcls and InternImage layouts) -> this model's keys.

    Telltale: `backbone.patch_embed.projection.weight` (mmcv's PatchEmbed under mmcls'
    ImageClassifier). Renames: drop `backbone.`; `patch_embed.projection` -> `patch_embed.proj`;
    `layers.N` -> `blocks.N`; the final `ln1` -> `norm`; mmcls `head.fc` -> `head`; InternImage's
    VRWKV-L MLP head `head.0` / `head.2` -> `pre_logits.fc` / `head`. Keys of neither the backbone nor
    the head (optimizer state, necks without parameters, ...) are dropped. Checkpoints in this
    model's own layout pass through. Either way the position embedding is resized (bicubic, no
    antialias) to the model's grid.

    Args:
        state_dict: the checkpoint as loaded (containers are unwrapped here too, EMA weights first).
        model: the model being loaded.

    Returns:
        The state dict in this model's layout.
    """
    state_dict = _unwrap_checkpoint(state_dict)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    official = any(k.endswith("patch_embed.projection.weight") for k in state_dict)
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if official and k.startswith("head."):
            k = k.replace("head.fc.", "head.").replace("head.0.", "pre_logits.fc.")
            k = k.replace("head.2.", "head.")
        elif official:
            k = k.removeprefix("backbone.")
            if not k.startswith(("patch_embed.", "pos_embed", "layers.", "ln1.")):
                continue
            if k.startswith("ln1."):  # the final norm; the blocks' ln1 sit under layers.N.
                k = "norm." + k.removeprefix("ln1.")
            k = k.replace("patch_embed.projection.", "patch_embed.proj.").replace("layers.", "blocks.")
        if k == "pos_embed" and v.shape != model.pos_embed.shape:
            side = math.isqrt(v.shape[1])
            if side * side != v.shape[1]:
                raise ValueError(f"pos_embed of {v.shape[1]} tokens is not a square grid")
            v = resize_pos_embed(v, (side, side), model.pos_embed_grid)
        out[k] = v
    return out


def _checkpoint_safe_globals() -> list:
    """What official checkpoints' metadata needs under `torch.load(weights_only=True)`, and only that.

    mmcv's `meta` may hold numpy scalars (numpy 1 pickles name `numpy.core.multiarray.scalar`,
    numpy 2 `numpy._core.multiarray.scalar`); InternImage checkpoints hold their yacs config
    (`yacs.config.CfgNode`, a dict subclass with attributes), which is read as an OrderedDict (a dict
    with an attribute dict, already allowed by torch) without importing or running yacs.
    """
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    dtypes = [type(np.dtype(c)) for c in "?bBhHiIlLqQefdg"]
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *dtypes,
        (OrderedDict, "yacs.config.CfgNode"),
    ]


def _checkpoint_loading_context() -> AbstractContextManager:
    """`torch.serialization.safe_globals` with those of `_checkpoint_safe_globals` not yet allowed
    (leaving the entries that were allowed before in place on exit)."""
    present = torch.serialization.get_safe_globals()
    return torch.serialization.safe_globals([g for g in _checkpoint_safe_globals() if g not in present])


def _bi_wkv_mode_of(cfg: Any) -> str:
    notes = getattr(cfg, "notes", None) or ()
    return "official" if OFFICIAL_BI_WKV_NOTE in notes else "paper"


def _create_vrwkv(
    variant: str, pretrained: bool = False, model_cls: type[VRWKV] | None = None, **kwargs
) -> VRWKV:
    """Build a VRWKV (or `model_cls`, e.g. VRWKV6) through timm (pretrained loading, features_only).

    Unless `bi_wkv_mode` is given, a pretrained model takes the mode its pretrained cfg names (the
    official weights: "official"); a model built without weights uses "paper". Official
    checkpoints are read with `torch.load(weights_only=True)` plus exactly the globals of
    `_checkpoint_safe_globals`.
    """
    model_cls = model_cls or VRWKV
    out_indices = kwargs.pop("out_indices", 3)
    if kwargs.get("bi_wkv_mode") is None:
        kwargs.pop("bi_wkv_mode", None)
        if pretrained and model_cls is VRWKV:
            cfg = resolve_pretrained_cfg(
                variant,
                pretrained_cfg=kwargs.get("pretrained_cfg"),
                pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
            )
            kwargs["bi_wkv_mode"] = _bi_wkv_mode_of(cfg)
    with _checkpoint_loading_context() if pretrained else nullcontext():
        return build_model_with_cfg(
            model_cls,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
            **kwargs,
        )


def _cfg(url: str = "", **kwargs) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2403.02308",
        "paper_name": "Vision-RWKV: Efficient and Scalable Visual Perception with RWKV-Like Architectures",
        "origin_url": "https://github.com/OpenGVLab/Vision-RWKV",
        **kwargs,
    }


def _official_cfg(filename: str, notes: tuple[str, ...] = (), **kwargs) -> dict[str, Any]:
    """An official checkpoint on the Hugging Face Hub (or a local copy via pretrained_cfg_overlay)."""
    return _cfg(
        hf_hub_id="OpenGVLab/Vision-RWKV",
        hf_hub_filename=filename,
        notes=(
            OFFICIAL_BI_WKV_NOTE,
            "official checkpoint, converted on load by checkpoint_filter_fn",
            *notes,
        ),
        **kwargs,
    )


# VRWKV-L was trained with the InternImage copy of the kernel, which cuts the tokens into 16 chunks
# (TOKEN_SPLIT = 256 / 16) instead of the mmcls kernel's 32; "official" mode emulates 32 chunks, so
# it is exact for these weights only up to 16 tokens (one chunk: the "no -1" formula in both kernels).
_LARGE_NOTE = "trained with a 16-chunk Bi-WKV kernel; bi_wkv_mode=official emulates the 32-chunk one"

# the bundled Fashion-MNIST classifier (rwkv_mm/assets/vrwkv-fmnist, made by `rwkv_mm.vision.train`)
FMNIST_ASSET = "vrwkv-fmnist"


def _bundled_cfg(asset: str, **kwargs) -> dict[str, Any]:
    """Weights shipped in `rwkv_mm.assets` (loads offline; see the folder's PROVENANCE.md)."""
    return _cfg(
        file=str(assets.ROOT / asset / "model.safetensors"),
        origin_url="https://github.com/OpenGVLab/Vision-RWKV (architecture); weights trained by rwkv_mm",
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "vrwkv_tiny.in1k": _official_cfg("vrwkv_t_in1k_224.pth"),
        "vrwkv_small.in1k": _official_cfg("vrwkv_s_in1k_224.pth"),
        "vrwkv_base.in1k": _official_cfg("vrwkv_b_in1k_224.pth"),
        "vrwkv_large.in22k_ft_in1k": _official_cfg(
            "vrwkv_l_22kto1k_384.pth", input_size=(3, 384, 384), crop_pct=1.0, notes=(_LARGE_NOTE,)
        ),
        "vrwkv_large.in22k": _official_cfg(
            "vrwkv_l_in22k_192.pth", input_size=(3, 192, 192), num_classes=21841, notes=(_LARGE_NOTE,)
        ),
        "vrwkv_fmnist.fmnist": _bundled_cfg(
            FMNIST_ASSET,
            num_classes=10,
            input_size=(1, 28, 28),
            crop_pct=1.0,
            interpolation="bilinear",
            mean=FASHION_MNIST_MEAN,
            std=FASHION_MNIST_STD,
            label_names=FASHION_MNIST_CLASSES,
            notes=(
                "trained on Fashion-MNIST (MIT, Zalando SE; Debian package dataset-fashion-mnist)",
                "expects a light item on a dark background, greyscale, scaled to 28x28",
            ),
        ),
    }
)


@register_model
def vrwkv_tiny(pretrained: bool = False, **kwargs) -> VRWKV:
    """VRWKV-T (6.2M): C 192, 12 pre-norm blocks."""
    model_args = dict(embed_dim=192, depth=12)
    return _create_vrwkv("vrwkv_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vrwkv_small(pretrained: bool = False, **kwargs) -> VRWKV:
    """VRWKV-S (23.8M): C 384, 12 res-post-norm blocks, layer scale 1.0."""
    model_args = dict(embed_dim=384, depth=12, post_norm=True, init_values=1.0)
    return _create_vrwkv("vrwkv_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vrwkv_base(pretrained: bool = False, **kwargs) -> VRWKV:
    """VRWKV-B (93.7M): C 768, 12 res-post-norm blocks, layer scale 1e-5."""
    model_args = dict(embed_dim=768, depth=12, post_norm=True, init_values=1e-5)
    return _create_vrwkv("vrwkv_base", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vrwkv_large(pretrained: bool = False, **kwargs) -> VRWKV:
    """VRWKV-L (334.9M): C 1024, 24 res-post-norm blocks, layer scale 1e-5, key_norm, MLP head; pos
    embedding learnt at 192 px (resized to the input, 384 px for the fine-tuned weights)."""
    model_args = dict(
        img_size=192,
        embed_dim=1024,
        depth=24,
        post_norm=True,
        init_values=1e-5,
        key_norm=True,
        head_hidden_size=3072,
    )
    return _create_vrwkv("vrwkv_large", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vrwkv_fmnist(pretrained: bool = False, **kwargs) -> VRWKV:
    """VRWKV for 1x28x28 Fashion-MNIST (0.73M): patch 4 (7x7 tokens), C 96, 6 pre-norm blocks; the bundled
    default classifier (pretrained weights ship in `rwkv_mm.assets`)."""
    model_args = dict(img_size=28, patch_size=4, embed_dim=96, depth=6)
    return _create_vrwkv("vrwkv_fmnist", pretrained=pretrained, **dict(model_args, **kwargs))
