"""wkv6: the C++ CPU kernel (backend "cpp") against the float64 per-token reference.

Outputs, final states and the gradients of every input (u and the initial state included) are checked
in float32 within 1e-5 x max|reference|, the reference running in float64 on the same (rounded)
inputs and backpropagating the same random dy and dstate; decays from typical to extreme (w in
[-30, 0], steps of e^-1e30) and RWKV-5's time-constant [H, N] decay. The kernel shares its arithmetic
with the CUDA kernel (include/rwkv_mm/wkv6.h); the GPU runs are in tests/gpu/test_cuda_wkv6.py. A cpp
kernel that does not build is a failure, not a skip.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from rwkv_mm import kernels
from rwkv_mm.core import ops
from rwkv_mm.core.reference import naive_wkv6
from tests.wkv_inputs import assert_close, cast_inputs, wkv6_inputs


@pytest.fixture(scope="module")
def wkv6_cpp() -> Callable:
    fn = kernels.get("wkv6", "cpp")
    assert fn is not None, f"the wkv6 cpp kernel is unavailable: {kernels.unavailable_reason('wkv6', 'cpp')}"
    return fn


def inputs(
    B: int, T: int, H: int, N: int, dtype: torch.dtype, decay: str = "typical", state: bool = True
) -> dict:
    """wkv6_inputs with the log decays drawn per ``decay``: "typical" (w = -exp(N(-1, 1))), "extreme"
    (uniform in [-30, 0]), "huge" (5 % of the steps decay by e^-1e30) or "rwkv5" ([H, N], time-constant)."""
    x = wkv6_inputs(B, T, H, N, torch.float64, w_min=-30.0 if decay == "extreme" else None, state=state)
    g = torch.Generator().manual_seed(7)
    if decay == "huge":
        x["w"] = torch.where(torch.rand(x["w"].shape, generator=g, dtype=torch.float64) < 0.05, -1e30, x["w"])
    elif decay == "rwkv5":
        x["w"] = -torch.exp(1.5 * torch.randn(H, N, generator=g, dtype=torch.float64))
    return cast_inputs(x, dtype)


def forward_backward(fn: Callable, x: dict, seed: int = 42) -> tuple[Tensor, Tensor, dict]:
    """y, final state and the gradients of sum(y * dy) + sum(state * dstate) for random dy, dstate."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items() if t is not None}
    y, s = fn(**leaves, **{n: None for n, t in x.items() if t is None})
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    ds = torch.randn(s.shape, generator=g, dtype=torch.float64)
    loss = (y.double() * dy).sum() + (s.double() * ds).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)  # T = 0: only the state
    grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, leaves.values())]
    return y.detach(), s.detach(), dict(zip(leaves, grads))


def check_against_reference(fn: Callable, x: dict, rel: float, rel_half: float = 0.0) -> None:
    """fn on x vs the float64 reference on the same values: within rel x max|ref|, or rel_half for the
    outputs and gradients that are rounded to bf16 / fp16."""
    y_ref, s_ref, g_ref = forward_backward(naive_wkv6, cast_inputs(x, torch.float64))
    y, s, g = forward_backward(fn, x)
    tol = lambda t: rel_half if t.dtype in (torch.bfloat16, torch.float16) else rel  # noqa: E731
    assert y.dtype == x["r"].dtype
    assert s.dtype == (torch.float64 if x["r"].dtype == torch.float64 else torch.float32)
    assert_close("y", y_ref, y, tol(y))
    assert_close("state", s_ref, s, tol(s))
    for name in g_ref:
        assert g[name].dtype == x[name].dtype and g[name].shape == x[name].shape
        assert_close(f"d{name}", g_ref[name], g[name], tol(g[name]))


CASES = [
    pytest.param(2, 1, 2, 16, "typical", id="B2-T1-H2-N16-typical"),
    pytest.param(2, 17, 3, 16, "typical", id="B2-T17-H3-N16-typical"),
    pytest.param(2, 100, 2, 64, "typical", id="B2-T100-H2-N64-typical"),
    pytest.param(3, 100, 1, 20, "typical", id="B3-T100-H1-N20-typical"),
    pytest.param(2, 1000, 2, 16, "typical", id="B2-T1000-H2-N16-typical"),
    pytest.param(1, 1000, 1, 64, "typical", id="B1-T1000-H1-N64-typical"),
    pytest.param(2, 17, 2, 16, "extreme", id="B2-T17-H2-N16-extreme"),
    pytest.param(2, 1000, 2, 16, "extreme", id="B2-T1000-H2-N16-extreme"),
    pytest.param(2, 100, 2, 16, "huge", id="B2-T100-H2-N16-huge"),
    pytest.param(2, 1, 2, 16, "rwkv5", id="B2-T1-H2-N16-rwkv5"),
    pytest.param(2, 100, 3, 16, "rwkv5", id="B2-T100-H3-N16-rwkv5"),
    pytest.param(2, 1000, 2, 64, "rwkv5", id="B2-T1000-H2-N64-rwkv5"),
]


@pytest.mark.parametrize("B,T,H,N,decay", CASES)
def test_float32_matches_reference(wkv6_cpp: Callable, B: int, T: int, H: int, N: int, decay: str) -> None:
    """Must show: outputs, final state and all gradients within 1e-5 x max|ref| in float32."""
    check_against_reference(wkv6_cpp, inputs(B, T, H, N, torch.float32, decay), 1e-5)


@pytest.mark.parametrize("decay", ["typical", "rwkv5"])
def test_float64_matches_reference_to_rounding(wkv6_cpp: Callable, decay: str) -> None:
    check_against_reference(wkv6_cpp, inputs(2, 40, 2, 16, torch.float64, decay), 1e-12)


def test_no_initial_state_means_zeros(wkv6_cpp: Callable) -> None:
    x = inputs(2, 20, 2, 16, torch.float32, state=False)
    check_against_reference(wkv6_cpp, x, 1e-5)
    y0, s0 = wkv6_cpp(**dict(x, state=torch.zeros(2, 2, 16, 16)))
    y, s = wkv6_cpp(**x)
    assert torch.equal(y, y0) and torch.equal(s, s0)


@pytest.mark.parametrize("decay", ["typical", "rwkv5"])
@pytest.mark.parametrize("split", [1, 16, 33], ids=lambda s: f"split{s}")
def test_two_calls_chained_equal_one_call(wkv6_cpp: Callable, split: int, decay: str) -> None:
    x = inputs(2, 70, 2, 16, torch.float32, decay)
    y_all, s_all, g_all = forward_backward(wkv6_cpp, x)
    part = lambda t, sl: t[:, sl] if t.dim() == 4 else t  # noqa: E731  (an [H, N] decay is shared)

    def chained(r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor):
        first, rest = slice(None, split), slice(split, None)
        y1, s1 = wkv6_cpp(*(part(t, first) for t in (r, w, k, v)), u, state)
        y2, s2 = wkv6_cpp(*(part(t, rest) for t in (r, w, k, v)), u, s1)
        return torch.cat([y1, y2], dim=1), s2

    y, s, g = forward_backward(chained, x)
    assert_close("y", y_all, y, 1e-6)
    assert_close("state", s_all, s, 1e-6)
    for name in g_all:
        assert_close(f"d{name}", g_all[name], g[name], 1e-6)


def test_empty_sequence_returns_the_initial_state(wkv6_cpp: Callable) -> None:
    x = inputs(2, 0, 2, 8, torch.float32)
    y, s, g = forward_backward(wkv6_cpp, x)
    _, _, g_ref = forward_backward(naive_wkv6, x)
    assert y.shape == (2, 0, 2, 8)
    assert torch.equal(s, x["state"])
    assert torch.equal(g["state"], g_ref["state"])


@pytest.mark.parametrize("decay", ["typical", "rwkv5"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_inputs(wkv6_cpp: Callable, dtype: torch.dtype, decay: str) -> None:
    """bf16 / fp16 in: math in float32, y and the gradients rounded to the input dtype, state float32.

    Two ulps of max|.|: the outputs are rounded, and so is dy (autograd hands the kernel dy in y's dtype).
    """
    x = inputs(2, 100, 2, 64, dtype, decay)
    rounding = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    check_against_reference(wkv6_cpp, x, 1e-5, rel_half=rounding)


@pytest.mark.parametrize("decay", ["typical", "rwkv5"])
def test_public_op_uses_the_kernel(wkv6_cpp: Callable, decay: str) -> None:
    """rwkv_mm.core.ops.wkv6(..., backend="cpp") runs this kernel, forward and backward."""
    x = inputs(2, 33, 2, 16, torch.float32, decay)
    op = lambda **kw: ops.wkv6(**kw, backend="cpp")  # noqa: E731
    check_against_reference(op, x, 1e-5)
    y_op, s_op = op(**x)
    y, s = wkv6_cpp(**x)
    assert torch.equal(y_op, y) and torch.equal(s_op, s)


def test_inputs_without_grad_run_forward_only(wkv6_cpp: Callable) -> None:
    x = inputs(1, 40, 2, 16, torch.float32)
    with torch.no_grad():
        y, s = wkv6_cpp(**x)
    y_ref, s_ref = naive_wkv6(**cast_inputs(x, torch.float64))
    assert not y.requires_grad
    assert_close("y", y_ref, y, 1e-5)
    assert_close("state", s_ref, s, 1e-5)


def test_mixed_dtypes_and_strided_inputs(wkv6_cpp: Callable) -> None:
    """Inputs of different dtypes and non-contiguous views are converted, not rejected."""
    x = inputs(2, 30, 2, 16, torch.float32)
    x["u"] = x["u"].double()
    x["k"] = x["k"].transpose(0, 1).contiguous().transpose(0, 1)  # a strided view
    check_against_reference(wkv6_cpp, x, 1e-5)
