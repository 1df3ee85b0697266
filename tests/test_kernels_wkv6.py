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
from tests.wkv_inputs import (
    assert_close,
    cast_inputs,
    check_against_reference,
    forward_backward,
    wkv6_decay_inputs,
)


@pytest.fixture(scope="module")
def wkv6_cpp() -> Callable:
    fn = kernels.get("wkv6", "cpp")
    assert fn is not None, f"the wkv6 cpp kernel is unavailable: {kernels.unavailable_reason('wkv6', 'cpp')}"
    return fn


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
    check_against_reference(wkv6_cpp, naive_wkv6, wkv6_decay_inputs(B, T, H, N, torch.float32, decay), 1e-5)


@pytest.mark.parametrize("decay", ["typical", "rwkv5"])
def test_float64_matches_reference_to_rounding(wkv6_cpp: Callable, decay: str) -> None:
    check_against_reference(
        wkv6_cpp, naive_wkv6, wkv6_decay_inputs(2, 40, 2, 16, torch.float64, decay), 1e-12
    )


def test_no_initial_state_means_zeros(wkv6_cpp: Callable) -> None:
    x = wkv6_decay_inputs(2, 20, 2, 16, torch.float32, state=False)
    check_against_reference(wkv6_cpp, naive_wkv6, x, 1e-5)
    y0, s0 = wkv6_cpp(**dict(x, state=torch.zeros(2, 2, 16, 16)))
    y, s = wkv6_cpp(**x)
    assert torch.equal(y, y0) and torch.equal(s, s0)


@pytest.mark.parametrize("decay", ["typical", "rwkv5"])
@pytest.mark.parametrize("split", [1, 16, 33], ids=lambda s: f"split{s}")
def test_two_calls_chained_equal_one_call(wkv6_cpp: Callable, split: int, decay: str) -> None:
    x = wkv6_decay_inputs(2, 70, 2, 16, torch.float32, decay)
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
    x = wkv6_decay_inputs(2, 0, 2, 8, torch.float32)
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
    x = wkv6_decay_inputs(2, 100, 2, 64, dtype, decay)
    rounding = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    check_against_reference(wkv6_cpp, naive_wkv6, x, 1e-5, rel_half=rounding)


@pytest.mark.parametrize("decay", ["typical", "rwkv5"])
def test_public_op_uses_the_kernel(wkv6_cpp: Callable, decay: str) -> None:
    """rwkv_mm.core.ops.wkv6(..., backend="cpp") runs this kernel, forward and backward."""
    x = wkv6_decay_inputs(2, 33, 2, 16, torch.float32, decay)
    op = lambda **kw: ops.wkv6(**kw, backend="cpp")  # noqa: E731
    check_against_reference(op, naive_wkv6, x, 1e-5)
    y_op, s_op = op(**x)
    y, s = wkv6_cpp(**x)
    assert torch.equal(y_op, y) and torch.equal(s_op, s)


def test_inputs_without_grad_run_forward_only(wkv6_cpp: Callable) -> None:
    x = wkv6_decay_inputs(1, 40, 2, 16, torch.float32)
    with torch.no_grad():
        y, s = wkv6_cpp(**x)
    y_ref, s_ref = naive_wkv6(**cast_inputs(x, torch.float64))
    assert not y.requires_grad
    assert_close("y", y_ref, y, 1e-5)
    assert_close("state", s_ref, s, 1e-5)


def test_mixed_dtypes_and_strided_inputs(wkv6_cpp: Callable) -> None:
    """Inputs of different dtypes and non-contiguous views are converted, not rejected."""
    x = wkv6_decay_inputs(2, 30, 2, 16, torch.float32)
    x["u"] = x["u"].double()
    x["k"] = x["k"].transpose(0, 1).contiguous().transpose(0, 1)  # a strided view
    check_against_reference(wkv6_cpp, naive_wkv6, x, 1e-5)
