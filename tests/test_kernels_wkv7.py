"""wkv7: the C++ CPU kernel (backend "cpp") against the float64 per-token reference.

Outputs, final states and the gradients of every input (initial state included) are checked in
float32 within 1e-5 x max|reference|, the reference running in float64 on the same (rounded) inputs
and backpropagating the same random dy and dstate. The kernel shares its arithmetic with the CUDA
kernel (include/rwkv_mm/wkv7.h), so these tests also cover what the GPU computes; the GPU runs are in
tests/gpu/test_cuda_wkv7.py. A cpp kernel that does not build is a failure, not a skip.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from rwkv_mm import kernels
from rwkv_mm.core import ops
from rwkv_mm.core.reference import naive_wkv7
from tests.wkv_inputs import (
    assert_close,
    cast_inputs,
    check_against_reference,
    forward_backward,
    wkv7_inputs,
)

SEQ = ("r", "w", "k", "v", "a", "b")  # the [B, T, H, N] inputs


@pytest.fixture(scope="module")
def wkv7_cpp() -> Callable:
    fn = kernels.get("wkv7", "cpp")
    assert fn is not None, f"the wkv7 cpp kernel is unavailable: {kernels.unavailable_reason('wkv7', 'cpp')}"
    return fn


SHAPES = [
    pytest.param(2, 1, 2, 16, id="B2-T1-H2-N16"),
    pytest.param(2, 17, 3, 16, id="B2-T17-H3-N16"),
    pytest.param(2, 100, 2, 64, id="B2-T100-H2-N64"),
    pytest.param(3, 100, 1, 20, id="B3-T100-H1-N20"),
    pytest.param(2, 1000, 2, 16, id="B2-T1000-H2-N16"),
    pytest.param(1, 1000, 1, 64, id="B1-T1000-H1-N64"),
]


@pytest.mark.parametrize("B,T,H,N", SHAPES)
def test_float32_matches_reference(wkv7_cpp: Callable, B: int, T: int, H: int, N: int) -> None:
    """Must show: outputs, final state and all gradients within 1e-5 x max|ref| in float32."""
    check_against_reference(wkv7_cpp, naive_wkv7, wkv7_inputs(B, T, H, N, torch.float32), 1e-5)


@pytest.mark.parametrize("T", [1, 40], ids=lambda T: f"T{T}")
def test_float64_matches_reference_to_rounding(wkv7_cpp: Callable, T: int) -> None:
    check_against_reference(wkv7_cpp, naive_wkv7, wkv7_inputs(2, T, 2, 16, torch.float64), 1e-12)


@pytest.mark.parametrize("decay", [20.0, 2000.0], ids=lambda d: f"decay{d:g}")
def test_decays_beyond_the_rwkv7_bound(wkv7_cpp: Callable, decay: float) -> None:
    """Log decays far below -0.6065 per step are computed like any others (no bound assumed)."""
    check_against_reference(wkv7_cpp, naive_wkv7, wkv7_inputs(2, 50, 2, 16, torch.float32, decay=decay), 1e-5)


def test_no_initial_state_means_zeros(wkv7_cpp: Callable) -> None:
    x = wkv7_inputs(2, 20, 2, 16, torch.float32, state=False)
    check_against_reference(wkv7_cpp, naive_wkv7, x, 1e-5)
    y0, s0 = wkv7_cpp(**dict(x, state=torch.zeros(2, 2, 16, 16)))
    y, s = wkv7_cpp(**x)
    assert torch.equal(y, y0) and torch.equal(s, s0)


@pytest.mark.parametrize("split", [1, 16, 33], ids=lambda s: f"split{s}")
def test_two_calls_chained_equal_one_call(wkv7_cpp: Callable, split: int) -> None:
    x = wkv7_inputs(2, 70, 2, 16, torch.float32)
    y_all, s_all, g_all = forward_backward(wkv7_cpp, x)

    def chained(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor):
        y1, s1 = wkv7_cpp(*(t[:, :split] for t in (r, w, k, v, a, b)), state)
        y2, s2 = wkv7_cpp(*(t[:, split:] for t in (r, w, k, v, a, b)), s1)
        return torch.cat([y1, y2], dim=1), s2

    y, s, g = forward_backward(chained, x)
    assert_close("y", y_all, y, 1e-6)
    assert_close("state", s_all, s, 1e-6)
    for name in g_all:
        assert_close(f"d{name}", g_all[name], g[name], 1e-6)


def test_empty_sequence_returns_the_initial_state(wkv7_cpp: Callable) -> None:
    x = wkv7_inputs(2, 0, 2, 8, torch.float32)
    y, s, g = forward_backward(wkv7_cpp, x)
    _, _, g_ref = forward_backward(naive_wkv7, x)
    assert y.shape == (2, 0, 2, 8)
    assert torch.equal(s, x["state"])
    assert torch.equal(g["state"], g_ref["state"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_inputs(wkv7_cpp: Callable, dtype: torch.dtype) -> None:
    """bf16 / fp16 in: math in float32, y and the gradients rounded to the input dtype, state float32.

    Two ulps of max|.|: the outputs are rounded, and so is dy (autograd hands the kernel dy in y's dtype).
    """
    x = wkv7_inputs(2, 100, 2, 64, dtype)
    rounding = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    check_against_reference(wkv7_cpp, naive_wkv7, x, 1e-5, rel_half=rounding)


def test_public_op_uses_the_kernel(wkv7_cpp: Callable) -> None:
    """rwkv_mm.core.ops.wkv7(..., backend="cpp") runs this kernel, forward and backward."""
    x = wkv7_inputs(2, 33, 2, 16, torch.float32)
    op = lambda **kw: ops.wkv7(**kw, backend="cpp")  # noqa: E731
    check_against_reference(op, naive_wkv7, x, 1e-5)
    y_op, s_op = op(**x)
    y, s = wkv7_cpp(**x)
    assert torch.equal(y_op, y) and torch.equal(s_op, s)


def test_inputs_without_grad_run_forward_only(wkv7_cpp: Callable) -> None:
    x = wkv7_inputs(1, 40, 2, 16, torch.float32)
    with torch.no_grad():
        y, s = wkv7_cpp(**x)
    y_ref, s_ref = naive_wkv7(**cast_inputs(x, torch.float64))
    assert not y.requires_grad
    assert_close("y", y_ref, y, 1e-5)
    assert_close("state", s_ref, s, 1e-5)


def test_mixed_dtypes_and_strided_inputs(wkv7_cpp: Callable) -> None:
    """Inputs of different dtypes and non-contiguous views are converted, not rejected."""
    x = wkv7_inputs(2, 30, 2, 16, torch.float32)
    x["w"] = x["w"].double()
    x["k"] = x["k"].transpose(0, 1).contiguous().transpose(0, 1)  # a strided view
    check_against_reference(wkv7_cpp, naive_wkv7, x, 1e-5)
