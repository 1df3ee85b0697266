"""wkv6: the chunked form against the per-token reference (outputs, final states, chaining, gradients)."""

from __future__ import annotations

import pytest
import torch

from rwkv_mm.core.chunked import wkv6
from rwkv_mm.core.reference import naive_wkv6
from tests.wkv_inputs import assert_close, cast_inputs


def _inputs(B: int, T: int, H: int, N: int, decay: str, seed: int = 42) -> dict:
    """float64 inputs with a non-zero initial state; ``decay`` picks how the log decays w are drawn."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if decay == "typical":  # what RWKV-6 layers produce: w = -exp(decay + lora)
        w = -torch.exp(rand(B, T, H, N) - 1)
    elif decay == "extreme":
        w = -30 * torch.rand(B, T, H, N, generator=g, dtype=torch.float64)
    elif decay == "rwkv5":  # time-constant [H, N], from mild to e^-90 per step
        w = -torch.exp(1.5 * rand(H, N))
    elif decay == "huge":  # any finite value: a few steps decay by e^-1e30
        w = -torch.exp(rand(B, T, H, N) - 1)
        w = torch.where(torch.rand(B, T, H, N, generator=g, dtype=torch.float64) < 0.05, -1e30, w)
    elif decay == "positive":  # outside what models produce, still computed exactly
        w = 0.1 * rand(B, T, H, N)
    return dict(
        r=rand(B, T, H, N),
        w=w,
        k=rand(B, T, H, N),
        v=rand(B, T, H, N),
        u=rand(H, N),
        state=rand(B, H, N, N),
    )


SHAPES = [
    pytest.param(2, 1, 2, 16, "typical", 32, id="B2-T1-H2-N16-typical-L32"),
    pytest.param(2, 17, 3, 16, "typical", 16, id="B2-T17-H3-N16-typical-L16"),
    pytest.param(2, 100, 2, 64, "typical", 32, id="B2-T100-H2-N64-typical-L32"),
    pytest.param(2, 1000, 2, 64, "typical", 32, id="B2-T1000-H2-N64-typical-L32"),
    pytest.param(2, 100, 3, 16, "extreme", 16, id="B2-T100-H3-N16-extreme-L16"),
    pytest.param(2, 1000, 2, 64, "extreme", 32, id="B2-T1000-H2-N64-extreme-L32"),
    pytest.param(2, 100, 3, 16, "rwkv5", 32, id="B2-T100-H3-N16-rwkv5-L32"),
    pytest.param(2, 1000, 2, 64, "rwkv5", 64, id="B2-T1000-H2-N64-rwkv5-L64"),
    pytest.param(2, 100, 2, 16, "huge", 16, id="B2-T100-H2-N16-huge-L16"),
    pytest.param(2, 50, 2, 16, "positive", 16, id="B2-T50-H2-N16-positive-L16"),
]


@pytest.mark.parametrize("B,T,H,N,decay,chunk_len", SHAPES)
def test_matches_reference_fp64(B: int, T: int, H: int, N: int, decay: str, chunk_len: int) -> None:
    x = _inputs(B, T, H, N, decay)
    y_ref, s_ref = naive_wkv6(**x)
    y, s = wkv6(**x, chunk_len=chunk_len)
    assert y.dtype == s.dtype == torch.float64
    assert_close("y", y_ref, y, 1e-10)
    assert_close("state", s_ref, s, 1e-10)


@pytest.mark.parametrize("B,T,H,N,decay,chunk_len", SHAPES)
def test_matches_reference_fp32(B: int, T: int, H: int, N: int, decay: str, chunk_len: int) -> None:
    x = _inputs(B, T, H, N, decay)
    y_ref, s_ref = naive_wkv6(**x)
    y, s = wkv6(**cast_inputs(x, torch.float32), chunk_len=chunk_len)
    assert y.dtype == s.dtype == torch.float32
    assert_close("y", y_ref, y, 1e-4)
    assert_close("state", s_ref, s, 1e-4)


@pytest.mark.parametrize(
    "T,split,decay",
    [
        pytest.param(100, 37, "typical", id="T100-split37-typical"),
        pytest.param(100, 64, "extreme", id="T100-split64-extreme"),
        pytest.param(40, 1, "rwkv5", id="T40-split1-rwkv5"),
    ],
)
def test_chaining_equals_one_call(T: int, split: int, decay: str) -> None:
    x = _inputs(2, T, 2, 16, decay)
    y_one, s_one = wkv6(**x, chunk_len=16)
    head = {n: (t if n in ("u", "state") or t.dim() == 2 else t[:, :split]) for n, t in x.items()}
    rest = {n: (t if n in ("u", "state") or t.dim() == 2 else t[:, split:]) for n, t in x.items()}
    y1, s1 = wkv6(**head, chunk_len=16)
    y2, s2 = wkv6(**{**rest, "state": s1}, chunk_len=16)
    assert_close("y", y_one, torch.cat([y1, y2], dim=1), 1e-12)
    assert_close("state", s_one, s2, 1e-12)


@pytest.mark.parametrize(
    "T,decay,chunk_len",
    [
        pytest.param(5, "typical", 2, id="T5-typical-L2"),
        pytest.param(20, "typical", 4, id="T20-typical-L4"),
        pytest.param(20, "extreme", 4, id="T20-extreme-L4"),
        pytest.param(20, "rwkv5", 8, id="T20-rwkv5-L8"),
    ],
)
def test_gradcheck(T: int, decay: str, chunk_len: int) -> None:
    x = _inputs(2, T, 2, 4, decay)
    if decay == "extreme":  # w in [-35, -20]: blocks of 4 exceed the factorised spread and are halved
        x["w"] = x["w"] / 2 - 20
    names = list(x)
    args = tuple(x[n].clone().requires_grad_() for n in names)

    def fn(*a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return wkv6(**dict(zip(names, a, strict=True)), chunk_len=chunk_len)

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize(
    "decay", [pytest.param("typical", id="typical"), pytest.param("extreme", id="extreme")]
)
def test_gradients_match_reference(decay: str) -> None:
    x = _inputs(2, 100, 2, 16, decay)
    grads = []
    for f in (naive_wkv6, wkv6):
        leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
        y, s = f(**leaves)
        g = torch.Generator().manual_seed(7)
        loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + (s * s).sum()
        grads.append(torch.autograd.grad(loss, list(leaves.values())))
    for name, g_ref, g in zip(x, *grads, strict=True):
        assert_close(f"d{name}", g_ref, g, 1e-10)


def test_bf16_inputs_give_bf16_output_close_to_fp32() -> None:
    x = cast_inputs(_inputs(2, 100, 2, 64, "typical"), torch.bfloat16)
    y, s = wkv6(**x)
    y32, s32 = wkv6(**cast_inputs(x, torch.float32))
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    assert_close("y", y32, y, 1e-2)
    assert_close("state", s32, s, 1e-6)
