"""Vision-RWKV models in timm: registry, sizes, forward at any input size, the timm API, conversion of
official checkpoints (both upstream layouts), safe loading, the Bi-WKV modes, VRWKV6 and the segmenter."""

import math
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

import rwkv_mm.vision  # noqa: E402,F401  (registers the models)
from rwkv_mm.core.layers import q_shift  # noqa: E402
from rwkv_mm.core.ops import biwkv  # noqa: E402
from rwkv_mm.vision.heads import VRWKVSegmenter  # noqa: E402
from rwkv_mm.vision.vrwkv import INFERENCE_BAND_TOKENS, q_shift_bands, resize_pos_embed  # noqa: E402
from rwkv_mm.vision.vrwkv6 import bi_wkv6  # noqa: E402

MODELS = sorted(timm.list_models("vrwkv*"))

# small variants of every registered model: the block structure of the size, few and narrow blocks
SMALL = dict(depth=2, embed_dim=128)


def _seed() -> None:
    torch.manual_seed(42)


def _perturb(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every parameter off its init, so that a wrongly mapped key changes the output."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def test_registry():
    sizes = {
        "vrwkv_tiny",
        "vrwkv_small",
        "vrwkv_base",
        "vrwkv_large",
        "vrwkv6_tiny",
        "vrwkv6_small",
        "vrwkv6_base",
    }
    assert sizes <= set(MODELS)
    assert {m for m in sizes if m.startswith("vrwkv_")} <= set(timm.list_models(module="vrwkv"))
    assert {"vrwkv6_tiny", "vrwkv6_small", "vrwkv6_base"} <= set(timm.list_models(module="vrwkv6"))
    assert "vrwkv_large.in22k_ft_in1k" in timm.list_pretrained("vrwkv_large*")


@pytest.mark.parametrize(
    "name, millions, digits",
    [
        pytest.param("vrwkv_tiny", 6.16, 2, id="vrwkv_tiny"),
        pytest.param("vrwkv_small", 23.82, 2, id="vrwkv_small"),
        pytest.param("vrwkv_base", 93.65, 2, id="vrwkv_base"),
        pytest.param("vrwkv_large", 334.9, 1, id="vrwkv_large"),
        pytest.param("vrwkv6_tiny", 7.6, 1, id="vrwkv6_tiny"),
        pytest.param("vrwkv6_small", 27.7, 1, id="vrwkv6_small"),
        pytest.param("vrwkv6_base", 104.9, 1, id="vrwkv6_base"),
    ],
)
def test_parameter_count(name, millions, digits):
    """The official sizes (README / paper), counted on the meta device."""
    model = timm.create_model(name, device="meta")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, digits) == millions


def test_forward_224():
    _seed()
    model = timm.create_model("vrwkv_tiny").eval()
    with torch.inference_mode():
        y = model(torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 1000) and torch.isfinite(y).all()


@pytest.mark.parametrize(
    "name", [pytest.param("vrwkv_tiny", id="vrwkv"), pytest.param("vrwkv6_tiny", id="vrwkv6")]
)
@pytest.mark.parametrize("size", [(100, 150), (17, 40), (64, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_any_input_size_pads_right_bottom(name, size):
    """Non-multiples of 16 are zero-padded right/bottom: the same output as the padded image."""
    _seed()
    model = timm.create_model(name, depth=2).eval()
    H, W = size
    x = torch.randn(2, 3, H, W)
    padded = F.pad(x, (0, -W % 16, 0, -H % 16))
    with torch.no_grad():
        y = model(x)
        feats = model.forward_features(x)
        y_padded = model(padded)
    assert y.shape == (2, 1000)
    assert feats.shape == (2, math.ceil(H / 16) * math.ceil(W / 16), 192)
    torch.testing.assert_close(y, y_padded, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vrwkv_tiny", "vrwkv6_tiny"])
def test_autocast_bfloat16(name):
    _seed()
    model = timm.create_model(name, depth=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(1, 3, 40, 72))
    y.float().sum().backward()
    assert torch.isfinite(y.float()).all()


def test_pos_embed_resize_is_bicubic_without_antialias():
    _seed()
    pos = torch.randn(1, 14 * 14, 8)
    ref = F.interpolate(
        pos.reshape(1, 14, 14, 8).permute(0, 3, 1, 2), (7, 10), mode="bicubic", align_corners=False
    )
    ref = ref.permute(0, 2, 3, 1).reshape(1, 70, 8)
    torch.testing.assert_close(resize_pos_embed(pos, (14, 14), (7, 10)), ref)
    assert resize_pos_embed(pos, (14, 14), (14, 14)) is pos


# ---------------------------------------------------------------- every registered model, small
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_intermediates(name):
    _seed()
    model = timm.create_model(name, num_classes=7, **SMALL)
    x = torch.randn(2, model.pretrained_cfg["input_size"][0], 48, 64)  # a 3x4 patch grid
    y = model(x)
    assert y.shape == (2, 7)
    y.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing

    model.eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        gh, gw = 48 // model.patch_embed.patch_size[0], 64 // model.patch_embed.patch_size[1]
        assert [t.shape for t in inter] == [(2, 128, gh, gw)] * 2
        nlc = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)
        assert [t.shape for t in nlc] == [(2, gh * gw, 128)]
        torch.testing.assert_close(nlc[0], inter[0].flatten(2).transpose(1, 2))


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_leaves_output_unchanged(name):
    _seed()
    model = timm.create_model(name, **SMALL)
    x = torch.randn(1, model.pretrained_cfg["input_size"][0], 32, 48)
    y = model(x)
    model.set_grad_checkpointing(True)
    y_ckpt = model(x)
    torch.testing.assert_close(y_ckpt, y, rtol=0, atol=0)
    y_ckpt.sum().backward()


@pytest.mark.parametrize(
    "name, kwargs",
    [
        pytest.param("vrwkv_tiny", {}, id="vrwkv-pre_norm"),
        pytest.param("vrwkv_tiny", {"bi_wkv_mode": "official", "shift_pixel": 2}, id="vrwkv-official-shift2"),
        pytest.param("vrwkv_small", {}, id="vrwkv-post_norm"),
        pytest.param("vrwkv_large", {}, id="vrwkv-key_norm"),
        pytest.param("vrwkv6_tiny", {}, id="vrwkv6"),
    ],
)
def test_lean_inference_equals_autograd_forward(name, kwargs):
    """Without autograd the mixes run by row bands and channel groups, in place: the same output as the
    autograd forward, on a non-square grid of several bands (37 x 29 patches > INFERENCE_BAND_TOKENS)."""
    _seed()
    model = timm.create_model(name, num_classes=7, **dict(SMALL, **kwargs)).eval()
    _perturb(model)
    x = torch.randn(2, 3, 37 * 16, 29 * 16)
    assert 37 * 29 > INFERENCE_BAND_TOKENS
    ref = model.forward_features(x)
    assert ref.requires_grad
    with torch.no_grad():
        lean = model.forward_features(x)
    with torch.inference_mode():
        lean_inference = model.forward_features(x)
    torch.testing.assert_close(lean, ref.detach())
    torch.testing.assert_close(lean_inference, ref.detach())


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("shift", [1, 2, 5])
@pytest.mark.parametrize("grid, band_tokens", [((7, 5), 10), ((7, 5), 3), ((3, 4), 100), ((6, 1), 2)])
def test_q_shift_bands_equal_q_shift(grid, band_tokens, shift, heads):
    x = torch.randn(2, grid[0] * grid[1], 16)
    ref = q_shift(x, grid, shift, heads)
    covered = torch.zeros(x.shape[1], dtype=torch.bool)
    for tokens, xx, xb in q_shift_bands(x, grid, shift, heads, band_tokens):
        assert tokens.start % grid[1] == 0 and not covered[tokens].any()
        covered[tokens] = True
        torch.testing.assert_close(xx, ref[:, tokens], rtol=0, atol=0)
        torch.testing.assert_close(xb, x[:, tokens], rtol=0, atol=0)
    assert covered.all()


def test_timm_api():
    _seed()
    model = timm.create_model("vrwkv_tiny", depth=4).eval()
    x = torch.randn(2, 3, 64, 80)
    assert model.get_classifier() is model.head
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 192)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, 192)
    model.reset_classifier(0, global_pool="")
    assert model(x).shape == (2, 20, 192)

    with torch.no_grad():
        full = model.forward_intermediates(x, indices=[1, 3], norm=True, intermediates_only=True)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(early[0], model.forward_intermediates(x, indices=[1])[1][0])
    assert [t.shape for t in full] == [(2, 192, 4, 5)] * 2

    kept = model.prune_intermediate_layers(indices=[0, 1], prune_norm=True)
    assert kept == [0, 1] and len(model.blocks) == 2

    assert set(timm.create_model("vrwkv_tiny", depth=2).group_matcher()) == {"stem", "blocks"}
    assert "pos_embed" in model.no_weight_decay()


def test_features_only():
    _seed()
    model = timm.create_model("vrwkv_small", features_only=True, out_indices=(1, 3), depth=4).eval()
    assert model.feature_info.channels() == [384, 384]
    assert model.feature_info.reduction() == [16, 16]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 100, 150))
    assert [f.shape for f in feats] == [(1, 384, 7, 10)] * 2


def test_large_head_and_pre_logits():
    _seed()
    model = timm.create_model("vrwkv_large", depth=2, embed_dim=64, head_hidden_size=96, num_classes=3)
    assert model.pos_embed.shape == (1, 144, 64)  # learnt at 192 px, 12 x 12 patches
    x = torch.randn(1, 3, 48, 48)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, 96)
    assert model(x).shape == (1, 3)
    assert model.pretrained_cfg["input_size"] == (3, 384, 384)


# ---------------------------------------------------------------- official checkpoints
def _to_official(state_dict: dict, layout: str) -> dict:
    """Our keys -> an upstream checkpoint's (the inverse of checkpoint_filter_fn)."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("head."):
            k = {"mmcls": "head.fc.", "internimage": "head.2."}[layout] + k.removeprefix("head.")
        elif k.startswith("pre_logits.fc."):
            k = "head.0." + k.removeprefix("pre_logits.fc.")
        else:
            if k.startswith("norm."):
                k = "ln1." + k.removeprefix("norm.")
            k = k.replace("patch_embed.proj.", "patch_embed.projection.").replace("blocks.", "layers.")
            k = "backbone." + k
        out[k] = v.clone()
    return out


@pytest.fixture
def fake_yacs(monkeypatch):
    """A stand-in `yacs.config.CfgNode` (InternImage saves its yacs config into checkpoints)."""
    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init=None):
            super().__init__(init or {})
            self.__dict__["__immutable__"] = False

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    config.CfgNode, yacs.config = CfgNode, config
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", config)
    return CfgNode


CONVERSION_CASES = [
    pytest.param("vrwkv_tiny", "mmcls", dict(depth=2), id="tiny-mmcls"),
    pytest.param("vrwkv_small", "mmcls", dict(depth=2), id="small-mmcls"),
    pytest.param(
        "vrwkv_large", "internimage", dict(depth=2, embed_dim=64, head_hidden_size=48), id="large-internimage"
    ),
    pytest.param("vrwkv6_small", "mmcls", dict(depth=2), id="vrwkv6-small-mmcls"),
]


@pytest.mark.parametrize("name, layout, args", CONVERSION_CASES)
def test_official_checkpoint_loads_through_timm(name, layout, args, tmp_path, fake_yacs):
    _seed()
    source = timm.create_model(name, num_classes=10, bi_wkv_mode="official", **args).eval()
    _perturb(source)
    weights = _to_official(source.state_dict(), layout)
    if layout == "mmcls":
        checkpoint = {
            "meta": {"mmcv_version": "1.7.0", "seed": np.int64(1234), "best_score": np.float64(0.75)},
            "state_dict": weights,
        }
    else:  # InternImage: timm's loader takes the EMA weights first
        checkpoint = {
            "state_dict": {k: torch.zeros_like(v) for k, v in weights.items()},
            "model_ema": weights,
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 19,
            "max_accuracy": 86.0,
            "config": fake_yacs({"MODEL": fake_yacs({"TYPE": "vrwkv"})}),
        }
    path = tmp_path / f"{layout}.pth"
    torch.save(checkpoint, path)
    del sys.modules["yacs.config"], sys.modules["yacs"]  # loading must not need yacs

    model = timm.create_model(
        name,
        pretrained=True,
        num_classes=10,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
        **args,
    ).eval()
    if name.startswith("vrwkv_"):
        assert model.blocks[0].att.bi_wkv_mode == "official"  # from the official pretrained cfg
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_official_checkpoint_pos_embed_resampled(tmp_path):
    _seed()
    source = timm.create_model("vrwkv_tiny", depth=1)  # 14 x 14 pos_embed
    _perturb(source)
    path = tmp_path / "t.pth"
    torch.save({"meta": {}, "state_dict": _to_official(source.state_dict(), "mmcls")}, path)
    model = timm.create_model(
        "vrwkv_tiny", depth=1, img_size=192, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    )
    assert model.pos_embed.shape == (1, 144, 192)
    torch.testing.assert_close(
        model.pos_embed.data, resize_pos_embed(source.pos_embed.data, (14, 14), (12, 12))
    )


def test_bi_wkv_mode_selection(tmp_path):
    assert timm.create_model("vrwkv_tiny", depth=1).blocks[0].att.bi_wkv_mode == "paper"
    source = timm.create_model("vrwkv_tiny", depth=1)
    path = tmp_path / "t.pth"
    torch.save({"state_dict": _to_official(source.state_dict(), "mmcls")}, path)
    overlay = dict(file=str(path))
    kw = dict(depth=1, pretrained=True, pretrained_cfg_overlay=overlay)
    assert timm.create_model("vrwkv_tiny", **kw).blocks[0].att.bi_wkv_mode == "official"
    paper = timm.create_model("vrwkv_tiny", bi_wkv_mode="paper", **kw)
    assert paper.blocks[0].att.bi_wkv_mode == "paper"
    paper.set_bi_wkv_mode("official")
    assert all(b.att.bi_wkv_mode == "official" for b in paper.blocks)
    with pytest.raises(ValueError, match="bi_wkv_mode"):
        timm.create_model("vrwkv_tiny", depth=1, bi_wkv_mode="cuda")


class _Payload:
    """Unpickling this would create `marker` (a stand-in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"pos_embed": torch.zeros(1)}, "meta": _Payload(marker)}, path)
    with pytest.raises((RuntimeError, pickle.UnpicklingError)):
        timm.create_model("vrwkv_tiny", depth=1, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is live: plain unpickling runs it
    assert marker.exists()


# ---------------------------------------------------------------- Bi-WKV modes
def _dense_biwkv(w, u, k, v, gap):
    """y_t = Σ_j W[t, j] e^{k_j} v_j / Σ_j W[t, j] e^{k_j}, with W = e^{-(|t-j| - gap) w} off the
    diagonal and e^u on it."""
    T = k.shape[1]
    d = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).abs().to(k.dtype)
    logw = -(d[..., None] - gap) * w  # (T, T, C)
    logw = torch.where(d[..., None] == 0, u.expand_as(logw), logw)
    a = torch.exp(logw[None] + k[:, None, :, :])  # (B, T, T, C)
    return (a * v[:, None]).sum(2) / a.sum(2)


@pytest.mark.parametrize("T", [1, 5, 16, 32], ids=lambda t: f"T{t}")
def test_biwkv_official_short_sequences_are_no_minus_one_formula(T):
    """At T <= 32 the official kernel weights e^{-|t-i| w} (i != t) and e^u (i = t);
    the paper e^{-(|t-i|-1) w}."""
    g = torch.Generator().manual_seed(42)
    B, C = 2, 6
    w = (torch.rand(C, generator=g, dtype=torch.float64) - 0.5) * 8 / T
    u = torch.randn(C, generator=g, dtype=torch.float64) / T
    k, v = (torch.randn(B, T, C, generator=g, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(
        biwkv(w, u, k, v, mode="official"), _dense_biwkv(w, u, k, v, gap=0), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(biwkv(w, u, k, v, mode="paper"), _dense_biwkv(w, u, k, v, gap=1))


def test_official_mode_model_equals_paper_mode_with_shifted_bonus():
    """At T <= 32: official(w, u) = paper(w, u + w), i.e. spatial_first += spatial_decay (16 tokens here)."""
    _seed()
    official = timm.create_model("vrwkv_small", depth=2, bi_wkv_mode="official").eval()
    _perturb(official)
    paper = timm.create_model("vrwkv_small", depth=2, bi_wkv_mode="paper").eval()
    state = official.state_dict()
    for i in range(2):
        state[f"blocks.{i}.att.spatial_first"] = (
            state[f"blocks.{i}.att.spatial_first"] + state[f"blocks.{i}.att.spatial_decay"]
        )
    paper.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(paper(x), official(x), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- VRWKV6
def test_bi_wkv6_matches_dense_definition():
    g = torch.Generator().manual_seed(42)
    B, T, H, N = 2, 7, 2, 4
    r, k, v = (torch.randn(B, T, H, N, generator=g, dtype=torch.float64) for _ in range(3))
    w = -2 * torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    u = torch.randn(H, N, generator=g, dtype=torch.float64)
    ref = torch.zeros_like(r)
    for t in range(T):
        for j in range(T):
            lo, hi = min(t, j) + 1, max(t, j)
            d = u if j == t else torch.exp(w[:, lo:hi].sum(1))  # (B, H, N) decays strictly between
            ref[:, t] += (r[:, t] * d * k[:, j]).sum(-1, keepdim=True) * v[:, j]
    torch.testing.assert_close(bi_wkv6(r, w, k, v, u), ref)


# ---------------------------------------------------------------- segmentation
@pytest.mark.parametrize("size", [(64, 64), (100, 150)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_segmenter_shapes(size):
    _seed()
    backbone = timm.create_model("vrwkv_tiny", depth=4, embed_dim=64)
    seg = VRWKVSegmenter(backbone, num_classes=5, channels=32)
    assert seg.indices == [0, 1, 2, 3]
    x = torch.randn(2, 3, *size)
    h, w = math.ceil(size[0] / 16), math.ceil(size[1] / 16)
    feats = seg.features(x)
    assert [f.shape[-2:] for f in feats] == [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), (h // 2, w // 2)]
    y = seg(x)
    assert y.shape == (2, 5, *size)
    y.mean().backward()
    assert all(p.grad is not None for p in seg.parameters())
