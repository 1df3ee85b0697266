"""biwkv: the C++ CPU kernel (backend "cpp") against the float64 per-token reference, both modes.

Outputs and the gradients of w, u, k, v are checked in float32 within 1e-5 x max|reference|, the
reference (``naive_biwkv``, whose "official" mode re-does the released CUDA kernel's arithmetic)
running in float64 on the same (rounded) inputs and backpropagating the same random dy. Decays of
either sign (negative w: weights grow with distance), C not a multiple of the kernel's 16-channel
blocks. The CPU forward has two forms (one shared shift when a channel's exponents fit it, running
maxima otherwise): both are exercised. The kernel shares its arithmetic with the CUDA kernel
(include/rwkv_mm/biwkv.h); the GPU runs are in tests/gpu/test_cuda_biwkv.py. A cpp kernel that does
not build is a failure, not a skip.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from rwkv_mm import kernels
from rwkv_mm.core import ops, reference
from rwkv_mm.core.reference import naive_biwkv
from tests.wkv_inputs import assert_close, biwkv_inputs, cast_inputs

INPUTS = ("w", "u", "k", "v")
MODES = ("paper", "official")


@pytest.fixture(scope="module")
def biwkv_cpp() -> Callable:
    fn = kernels.get("biwkv", "cpp")
    assert fn is not None, (
        f"the biwkv cpp kernel is unavailable: {kernels.unavailable_reason('biwkv', 'cpp')}"
    )
    return fn


def forward_backward(fn: Callable, x: dict, mode: str, seed: int = 42) -> tuple[Tensor, dict]:
    """y and the gradients of sum(y dy) for a random dy."""
    leaves = {n: x[n].detach().clone().requires_grad_(True) for n in INPUTS}
    y = fn(*leaves.values(), mode=mode)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad((y.double() * dy).sum(), list(leaves.values()), allow_unused=True)
    # T = 1: w is unused
    grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, leaves.values())]
    return y.detach(), dict(zip(leaves, grads))


def check_against_reference(fn: Callable, x: dict, mode: str, rel: float, rel_half: float = 0.0) -> None:
    """fn on x vs the float64 reference on the same values: within rel x max|ref| (rel_half for the
    outputs and gradients rounded to bf16 / fp16)."""
    y_ref, g_ref = forward_backward(naive_biwkv, cast_inputs(x, torch.float64), mode)
    y, g = forward_backward(fn, x, mode)
    tol = lambda t: rel_half if t.dtype in (torch.bfloat16, torch.float16) else rel  # noqa: E731
    assert y.dtype == x["k"].dtype
    assert_close(f"{mode} y", y_ref, y, tol(y))
    for name in INPUTS:
        assert g[name].dtype == x[name].dtype and g[name].shape == x[name].shape
        assert_close(f"{mode} d{name}", g_ref[name], g[name], tol(g[name]))


CASES = [
    pytest.param(B, T, C, mode, id=f"B{B}-T{T}-C{C}-{mode}")
    for B, T, C in [(2, 1, 24), (3, 17, 37), (2, 100, 24), (2, 1000, 20)]
    for mode in MODES
]


@pytest.mark.parametrize("B,T,C,mode", CASES)
def test_float32_matches_reference(biwkv_cpp: Callable, B: int, T: int, C: int, mode: str) -> None:
    """Must show: y and every gradient within 1e-5 x max|ref| in float32 (spatial_decay ~ N(0, 5^2),
    so about half the channels have negative w)."""
    x = biwkv_inputs(B, T, C, torch.float32)
    assert (x["w"] < 0).any() and (x["w"] > 0).any()
    check_against_reference(biwkv_cpp, x, mode, 1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_float32_outputs_at_T4096(biwkv_cpp: Callable, mode: str) -> None:
    """Must show: y within 1e-5 x max|ref| at T = 4096 (a 64 x 64 patch grid)."""
    x = biwkv_inputs(2, 4096, 20, torch.float32)
    y_ref = naive_biwkv(**cast_inputs(x, torch.float64), mode=mode)
    with torch.no_grad():
        y = biwkv_cpp(**x, mode=mode)
    assert_close(f"{mode} y", y_ref, y, 1e-5)


RUNNING_MAX_CASES = [
    pytest.param(40.0, 1.0, "paper", id="strong-decay-paper"),
    pytest.param(5.0, 12.0, "paper", id="wide-k-paper"),
    pytest.param(5.0, 12.0, "official", id="wide-k-official"),
]


@pytest.mark.parametrize("decay_scale,k_scale,mode", RUNNING_MAX_CASES)
def test_running_max_form(biwkv_cpp: Callable, decay_scale: float, k_scale: float, mode: str) -> None:
    """Inputs whose exponents one shared shift cannot hold in float32 (the kernel's budget: spread of
    k + |w| T + |u| <= 60 per channel; here |spatial_decay| up to ~100, or a spread of k ~ 200) take
    the running-max forward; everything still matches the reference. (Official mode with |w| ~ 0.3 per
    token is ill-conditioned, its outputs ~30x |v| from cancelling weights: every float32 form,
    the chunked torch one included, is off by >1e-5 there; it is left out.)"""
    x = biwkv_inputs(2, 150, 24, torch.float32, decay_scale=decay_scale)
    x["k"] = x["k"] * k_scale
    spread = (x["k"].amax(dim=1) - x["k"].amin(dim=1)).amax(dim=0)
    assert (spread + x["w"].abs() * 150 + x["u"].abs() > 60).any()
    check_against_reference(biwkv_cpp, x, mode, 1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_inputs(biwkv_cpp: Callable, mode: str) -> None:
    """bf16 inputs: y and the gradients come back in bf16 (float32 math inside)."""
    check_against_reference(biwkv_cpp, biwkv_inputs(2, 50, 24, torch.bfloat16), mode, 1e-5, rel_half=2.0**-7)


@pytest.mark.parametrize("mode", MODES)
def test_float64_takes_the_exact_torch_form(biwkv_cpp: Callable, mode: str) -> None:
    """float64 in means float64 math: the glue routes it to the chunked form (rounding-level error)."""
    check_against_reference(biwkv_cpp, biwkv_inputs(2, 70, 24, torch.float64), mode, 1e-10)


def test_official_eps_term_gradient(biwkv_cpp: Callable, monkeypatch: pytest.MonkeyPatch) -> None:
    """The official kernel's EPS term (EPS e^{m_t}, m_t its running maximum) and its gradient, which
    goes through the maxima to the k (and w, u) that set them. It is ~1e-6 of y for typical inputs;
    positive w of ~0.1-0.3 per token makes it ~1e-3 (the kernel's subtracted terms raise m_t), at the
    price of cancelling weights that cost float32 some accuracy, so the check is: the kernel's error is
    a small fraction of what the EPS term contributes, for y and every gradient."""
    g = torch.Generator().manual_seed(0)
    B, T, C = 2, 100, 16
    x = dict(
        w=0.1 + 0.2 * torch.rand(C, generator=g),
        u=torch.randn(C, generator=g),
        k=3 * torch.randn(B, T, C, generator=g),
        v=torch.randn(B, T, C, generator=g),
    )
    y_ref, g_ref = forward_backward(naive_biwkv, cast_inputs(x, torch.float64), "official")
    y, g = forward_backward(biwkv_cpp, x, "official")
    monkeypatch.setattr(reference, "BIWKV_EPS", 0.0)
    y_plain, g_plain = forward_backward(naive_biwkv, cast_inputs(x, torch.float64), "official")
    cases = [("y", y_ref, y, y_plain)] + [(f"d{n}", g_ref[n], g[n], g_plain[n]) for n in INPUTS]
    for name, ref, out, plain in cases:
        effect = (ref - plain).abs().max().item()
        err = (ref - out.double()).abs().max().item()
        assert effect > 1e-4 * ref.abs().max().item(), f"{name}: the EPS term moves it by only {effect:.2g}"
        assert err < 0.1 * effect, f"{name}: error {err:.2g} is not small against the EPS term's {effect:.2g}"


@pytest.mark.parametrize("mode", MODES)
def test_public_op_backend_cpp(mode: str) -> None:
    """rwkv_mm.core.ops.biwkv(..., backend="cpp"): forward and backward against the reference."""

    def op(w, u, k, v, mode):
        return ops.biwkv(w, u, k, v, mode, backend="cpp")

    check_against_reference(op, biwkv_inputs(3, 33, 24, torch.float32), mode, 1e-5)
