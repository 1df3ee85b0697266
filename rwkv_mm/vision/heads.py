"""Semantic segmentation on a Vision-RWKV backbone: simple feature pyramid + UperNet-style head.

Sources:
- UperNet: "Unified Perceptual Parsing for Scene Understanding", Xiao et al., ECCV 2018,
  https://arxiv.org/abs/1807.10221 (as mmsegmentation's UPerHead: PPM on the top level, FPN fusion).
- Simple feature pyramid from one plain backbone: "Exploring Plain Vision Transformer Backbones for
  Object Detection" (ViTDet), Li et al., ECCV 2022, https://arxiv.org/abs/2203.16527.
- Vision-RWKV's segmentation (https://github.com/OpenGVLab/Vision-RWKV, segmentation/) uses UperNet
  on a VRWKV_Adapter backbone (deformable-attention adapter, a CUDA op). This module instead takes
  four intermediate blocks of a plain VRWKV / VRWKV6 (stride 16) and resamples them to strides
  4 / 8 / 16 / 32, so it runs anywhere; it does not load the official segmentation checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

__all__ = ["VRWKVSegmenter", "SimpleFeaturePyramid", "UperHead"]


class ConvNormAct(nn.Sequential):
    """Conv (no bias) -> norm -> ReLU: mmcv's ConvModule as UPerHead uses it."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        device=None,
        dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=False, **dd),
            norm_layer(out_chs, **dd),
            nn.ReLU(inplace=True),
        )


class SimpleFeaturePyramid(nn.Module):
    """Four stride-16 maps -> maps at strides 4, 8, 16, 32 (ViTDet's simple pyramid, one map per level).

    Level 0: two 2x transposed convs (with LayerNorm2d + GELU between); level 1: one 2x transposed conv;
    level 2: identity; level 3: 2x2 max pool. Channels stay `dim`.
    """

    def __init__(self, dim: int, device=None, dtype=None):
        """
        Args:
            dim: channels of the backbone maps.
            device: parameter device.
            dtype: parameter dtype.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2, **dd),
            LayerNorm2d(dim, **dd),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2, **dd),
        )
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, stride=2, **dd)
        self.down2 = nn.MaxPool2d(2)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """
        Args:
            maps: four [B, C, h, w] maps at stride 16 (shallow to deep).

        Returns:
            [B, C, 4h, 4w], [B, C, 2h, 2w], [B, C, h, w], [B, C, h // 2, w // 2].
        """
        if len(maps) != 4:
            raise ValueError(f"expected 4 maps, got {len(maps)}")
        return [self.up4(maps[0]), self.up2(maps[1]), maps[2], self.down2(maps[3])]


class UperHead(nn.Module):
    """UperNet decoder: pyramid pooling on the deepest level, top-down FPN, fusion of all levels.

    As mmsegmentation's UPerHead (pool scales 1, 2, 3, 6; ConvModules; bilinear resizing,
    align_corners=False), ending in dropout and a 1x1 classifier at the finest level's resolution.
    """

    def __init__(
        self,
        in_chs: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        drop_rate: float = 0.1,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        device=None,
        dtype=None,
    ):
        """
        Args:
            in_chs: channels of each level, finest first.
            num_classes: output classes.
            channels: width of the decoder.
            pool_scales: output sizes of the pyramid pooling.
            drop_rate: dropout before the classifier.
            norm_layer: norm of the conv modules.
            device: parameter device.
            dtype: parameter dtype.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        cna = dict(norm_layer=norm_layer, **dd)
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList(ConvNormAct(in_chs[-1], channels, 1, **cna) for _ in self.pool_scales)
        self.bottleneck = ConvNormAct(in_chs[-1] + len(self.pool_scales) * channels, channels, 3, **cna)
        self.lateral_convs = nn.ModuleList(ConvNormAct(c, channels, 1, **cna) for c in in_chs[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3, **cna) for _ in in_chs[:-1])
        self.fpn_bottleneck = ConvNormAct(len(in_chs) * channels, channels, 3, **cna)
        self.dropout = nn.Dropout2d(drop_rate)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1, **dd)

    def _psp(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(conv(F.adaptive_avg_pool2d(x, s)), size, mode="bilinear", align_corners=False)
            for s, conv in zip(self.pool_scales, self.ppm)
        ]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            feats: [B, C_i, h_i, w_i] maps, finest first.

        Returns:
            [B, num_classes, h_0, w_0] logits at the finest level's resolution.
        """
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats[:-1])]
        laterals.append(self._psp(feats[-1]))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [F.interpolate(o, size, mode="bilinear", align_corners=False) for o in outs[1:]]
        x = self.fpn_bottleneck(torch.cat(outs, dim=1))
        return self.conv_seg(self.dropout(x))


def default_indices(depth: int) -> list[int]:
    """The last block of each quarter of the backbone (Vision-RWKV's interaction_indexes ends):
    [2, 5, 8, 11] for 12 blocks, [5, 11, 17, 23] for 24."""
    return [(i + 1) * depth // 4 - 1 for i in range(4)]


class VRWKVSegmenter(nn.Module):
    """Per-pixel classifier: VRWKV backbone -> four intermediate maps -> simple pyramid -> UperHead.

    Works at any input size: the backbone pads right/bottom to a multiple of its patch size, and the
    logits are upsampled to the padded size and cropped back to the input.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        indices: Sequence[int] | None = None,
        channels: int = 512,
        drop_rate: float = 0.1,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        device=None,
        dtype=None,
    ):
        """
        Args:
            backbone: a VRWKV / VRWKV6 (anything with timm's `forward_intermediates` and
                `prune_intermediate_layers`, `blocks`, `embed_dim` and a `patch_embed`); pruned in place
                of the blocks after the last index, its final norm and its classifier.
            num_classes: segmentation classes.
            indices: the four blocks to take, shallow to deep; default `default_indices(depth)`.
            channels: width of the decoder (UPerHead: 512).
            drop_rate: dropout before the classifier.
            norm_layer: norm of the decoder's conv modules.
            device: parameter device.
            dtype: parameter dtype.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.indices = list(indices) if indices is not None else default_indices(len(backbone.blocks))
        if len(self.indices) != 4:
            raise ValueError(f"expected 4 block indices, got {self.indices}")
        # blocks after the last index, the final norm and the classifier are never used: drop them
        # (no unused parameters under DDP)
        backbone.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        self.backbone = backbone
        self.patch_size = backbone.patch_embed.feat_ratio()
        dim = backbone.embed_dim
        self.neck = SimpleFeaturePyramid(dim, **dd)
        self.decode_head = UperHead(
            [dim] * 4, num_classes, channels=channels, drop_rate=drop_rate, norm_layer=norm_layer, **dd
        )

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[B, 3, H, W] -> four maps [B, C, 4h, 4w] ... [B, C, h // 2, w // 2] (h = ceil(H / patch))."""
        maps = self.backbone.forward_intermediates(
            x, indices=self.indices, norm=False, stop_early=True, output_fmt="NCHW", intermediates_only=True
        )
        return self.neck(maps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] images -> [B, num_classes, H, W] logits."""
        H, W = x.shape[-2:]
        logits = self.decode_head(self.features(x))
        padded = (logits.shape[-2] * self.patch_size // 4, logits.shape[-1] * self.patch_size // 4)
        logits = F.interpolate(logits, padded, mode="bilinear", align_corners=False)
        return logits[..., :H, :W]
