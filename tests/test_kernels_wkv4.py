"""wkv4: the C++ CPU kernel (backend "cpp") against the float64 per-token reference.

Outputs, final states (as the sums they represent) and the gradients of every input (the initial
state's included) are checked in float32 within 1e-5 x max|reference|, the reference running in
float64 on the same (rounded) inputs and backpropagating the same random dy and d(num, den, max).
The kernel shares its arithmetic with the CUDA kernel (include/rwkv_mm/wkv4.h); the GPU runs are in
tests/gpu/test_cuda_wkv4.py. A cpp kernel that does not build is a failure, not a skip.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from rwkv_mm import kernels
from rwkv_mm.core import ops
from rwkv_mm.core.reference import naive_wkv4
from tests.wkv_inputs import assert_close, cast_inputs, state_tensors, wkv4_inputs

INPUTS = ("w", "u", "k", "v")
STATE = ("num", "den", "max")


@pytest.fixture(scope="module")
def wkv4_cpp() -> Callable:
    fn = kernels.get("wkv4", "cpp")
    assert fn is not None, f"the wkv4 cpp kernel is unavailable: {kernels.unavailable_reason('wkv4', 'cpp')}"
    return fn


def forward_backward(fn: Callable, x: dict, seed: int = 42) -> tuple[Tensor, tuple, dict]:
    """y, the final state and the gradients of sum(y dy) + sum(state d_state) for random dy, d_state.

    The initial state (when given) is a leaf too: its gradients are keyed "num0", "den0", "max0".
    """
    leaves = {n: x[n].detach().clone().requires_grad_(True) for n in INPUTS}
    state = None
    if x.get("state") is not None:
        state = tuple(s.detach().clone().requires_grad_(True) for s in x["state"])
        leaves.update(zip(("num0", "den0", "max0"), state))
    y, s = fn(*(leaves[n] for n in INPUTS), state=state)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    loss = (y.double() * dy).sum()
    for part in s:  # every entry of the final state gets a gradient: max too, on its own
        loss = loss + (part.double() * torch.randn(part.shape, generator=g, dtype=torch.float64)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, leaves.values())]
    return y.detach(), tuple(p.detach() for p in s), dict(zip(leaves, grads))


def check_against_reference(fn: Callable, x: dict, rel: float, rel_half: float = 0.0) -> None:
    """fn on x vs the float64 reference on the same values: within rel x max|ref| (rel_half for the
    outputs and gradients rounded to bf16 / fp16)."""
    y_ref, s_ref, g_ref = forward_backward(naive_wkv4, cast_inputs(x, torch.float64))
    y, s, g = forward_backward(fn, x)
    tol = lambda t: rel_half if t.dtype in (torch.bfloat16, torch.float16) else rel  # noqa: E731
    assert y.dtype == x["k"].dtype
    state_dtype = torch.float64 if x["k"].dtype == torch.float64 else torch.float32
    assert all(part.dtype == state_dtype for part in s)
    assert_close("y", y_ref, y, tol(y))
    for name, a, b in zip(("num e^max", "den e^max"), state_tensors(s_ref), state_tensors(s)):
        assert_close(f"state {name}", a, b, rel)
    for name in g_ref:
        assert g[name].shape == g_ref[name].shape
        assert_close(f"d{name}", g_ref[name], g[name], tol(g[name]))


CASES = [
    pytest.param(2, 1, 24, 3.0, True, id="B2-T1-C24"),
    pytest.param(3, 17, 37, 3.0, True, id="B3-T17-C37"),
    pytest.param(2, 100, 24, 10.0, True, id="B2-T100-C24-k30"),
    pytest.param(2, 100, 20, 3.0, False, id="B2-T100-C20-nostate"),
    pytest.param(2, 1000, 40, 3.0, True, id="B2-T1000-C40"),
    pytest.param(2, 1000, 16, 10.0, True, id="B2-T1000-C16-k30"),
]


@pytest.mark.parametrize("B,T,C,k_scale,state", CASES)
def test_float32_matches_reference(
    wkv4_cpp: Callable, B: int, T: int, C: int, k_scale: float, state: bool
) -> None:
    """Must show: y, the final state and every gradient within 1e-5 x max|ref| in float32; decays
    -exp(-6 .. 3), |k| up to ~30 (k_scale 10), a non-zero initial state."""
    x = wkv4_inputs(B, T, C, torch.float32, k_scale=k_scale, state=state)
    check_against_reference(wkv4_cpp, x, 1e-5)


def test_bfloat16_inputs(wkv4_cpp: Callable) -> None:
    """bf16 k, v (and w, u, state): y and the input gradients come back in bf16, the state in float32."""
    x = wkv4_inputs(2, 50, 24, torch.bfloat16)
    check_against_reference(wkv4_cpp, x, 1e-5, rel_half=2.0**-7)


def test_float64_takes_the_exact_torch_form(wkv4_cpp: Callable) -> None:
    """float64 in means float64 math: the glue routes it to the chunked form (rounding-level error)."""
    check_against_reference(wkv4_cpp, wkv4_inputs(2, 60, 24, torch.float64), 1e-10)


@pytest.mark.parametrize("split", [1, 37, 99], ids=lambda s: f"split{s}")
def test_two_calls_chain_like_one(wkv4_cpp: Callable, split: int) -> None:
    """A sequence run in two calls, the state handed over, equals one call: outputs and gradients."""
    x = wkv4_inputs(2, 100, 24, torch.float32)

    def two_calls(w, u, k, v, state):
        y1, s1 = wkv4_cpp(w, u, k[:, :split], v[:, :split], state)
        y2, s2 = wkv4_cpp(w, u, k[:, split:], v[:, split:], s1)
        return torch.cat([y1, y2], dim=1), s2

    y1, s1, g1 = forward_backward(wkv4_cpp, x)
    y2, s2, g2 = forward_backward(two_calls, x)
    assert_close("y", y1, y2, 1e-6)
    for name, a, b in zip(STATE, state_tensors(s1), state_tensors(s2)):
        assert_close(f"state {name}", a, b, 1e-6)
    for name in g1:
        assert_close(f"d{name}", g1[name], g2[name], 1e-5)


def test_empty_sequence_returns_the_state(wkv4_cpp: Callable) -> None:
    x = wkv4_inputs(2, 0, 24, torch.float32)
    y, state = wkv4_cpp(**x)
    assert y.shape == (2, 0, 24)
    for a, b in zip(state, x["state"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("T", [1, 100], ids=lambda T: f"T{T}")
def test_public_op_backend_cpp(T: int) -> None:
    """rwkv_mm.core.ops.wkv4(..., backend="cpp"): forward and backward against the reference."""

    def op(w, u, k, v, state=None):
        return ops.wkv4(w, u, k, v, state, backend="cpp")

    check_against_reference(op, wkv4_inputs(3, T, 24, torch.float32), 1e-5)
