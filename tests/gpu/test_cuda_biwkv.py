"""biwkv on a GPU: the CUDA kernel (backend "cuda") against the float64 per-token reference.

Forward and the gradients of w, u, k, v in both modes ("paper" and "official", the released kernel's
arithmetic) for fp32 / bf16 / fp16 inputs, B > 1, odd T (and T > 32: the official chunks are more
than one token), decays of either sign, C not a multiple of 32. The reference runs in float64 on the
CPU on the same (rounded) inputs. Skipped without a CUDA device.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from rwkv_mm import kernels
from rwkv_mm.core import ops
from rwkv_mm.core.reference import naive_biwkv
from tests.wkv_inputs import assert_close, biwkv_inputs, cast_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())"
    ),
]

INPUTS = ("w", "u", "k", "v")
MODES = ("paper", "official")
# Tolerance x max|ref|: float32 math (float64 sums); bf16 / fp16 outputs and gradients are rounded
# (two ulps: the outputs, and dy, which autograd hands the kernel in y's dtype).
REL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture(scope="module")
def biwkv_cuda() -> Callable:
    fn = kernels.get("biwkv", "cuda")
    assert fn is not None, (
        f"the biwkv cuda kernel is unavailable: {kernels.unavailable_reason('biwkv', 'cuda')}"
    )
    return fn


def forward_backward(fn: Callable, x: dict, mode: str, device: str, seed: int = 42) -> tuple[Tensor, dict]:
    """y and the gradients of sum(y dy) for a random dy, returned on the CPU."""
    leaves = {n: x[n].detach().to(device).requires_grad_(True) for n in INPUTS}
    y = fn(*leaves.values(), mode=mode)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    grads = torch.autograd.grad((y.double() * dy).sum(), list(leaves.values()), allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, leaves.values())]  # T = 1
    return y.detach().cpu(), {n: gr.cpu() for n, gr in zip(leaves, grads)}


def check(fn: Callable, x: dict, mode: str) -> None:
    dtype = x["k"].dtype
    y_ref, g_ref = forward_backward(naive_biwkv, cast_inputs(x, torch.float64), mode, "cpu")
    y, g = forward_backward(fn, x, mode, "cuda")
    assert y.dtype == dtype
    assert_close(f"{mode} y", y_ref, y, REL[dtype])
    for name in INPUTS:
        assert g[name].dtype == dtype
        assert_close(f"{mode} d{name}", g_ref[name], g[name], REL[dtype])


CASES = [
    pytest.param(B, T, C, dtype, mode, id=f"B{B}-T{T}-C{C}-{str(dtype)[6:]}-{mode}")
    for B, T, C in [(2, 1, 24), (3, 17, 37), (2, 197, 40), (2, 1001, 20)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    for mode in MODES
]


@pytest.mark.parametrize("B,T,C,dtype,mode", CASES)
def test_matches_reference(
    biwkv_cuda: Callable, B: int, T: int, C: int, dtype: torch.dtype, mode: str
) -> None:
    """Must show: y and every gradient within REL x max|ref| (1e-5 in float32)."""
    check(biwkv_cuda, biwkv_inputs(B, T, C, dtype), mode)


@pytest.mark.parametrize("mode", MODES)
def test_float32_outputs_at_T4096(biwkv_cuda: Callable, mode: str) -> None:
    x = biwkv_inputs(2, 4096, 20, torch.float32)
    y_ref = naive_biwkv(**cast_inputs(x, torch.float64), mode=mode)
    with torch.no_grad():
        y = biwkv_cuda(**{n: t.cuda() for n, t in x.items()}, mode=mode).cpu()
    assert_close(f"{mode} y", y_ref, y, 1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_public_op_backend_cuda(mode: str) -> None:
    def op(w, u, k, v, mode):
        return ops.biwkv(w, u, k, v, mode, backend="cuda")

    check(op, biwkv_inputs(3, 65, 24, torch.float32), mode)


# The forward splits each channel's tokens into 32 segments of ceil(T / 32) (the official chunks) and
# tiles of 8 inside them: T below, at and above one token per segment, segments of one partial tile,
# empty trailing segments (T = 33, 1000, 4097); C = 13 fills neither a block's 8 channels nor a warp.
@pytest.mark.parametrize("T", [1, 31, 32, 33, 196, 257, 1000, 4097])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("decay_scale", [5.0, 20.0])
def test_token_parallel_forward(biwkv_cuda: Callable, T: int, mode: str, decay_scale: float) -> None:
    """Must show: the no-grad forward within 1e-5 x max|ref| of float64, strong decays and growths too
    (|w| T up to ~60; far beyond, the official EPS term is ill-conditioned in float32 for any kernel)."""
    x = biwkv_inputs(3, T, 13, torch.float32, decay_scale=decay_scale)
    y_ref = naive_biwkv(**cast_inputs(x, torch.float64), mode=mode)
    with torch.no_grad():
        y = biwkv_cuda(**{n: t.cuda() for n, t in x.items()}, mode=mode).cpu()
    assert_close(f"{mode} y", y_ref, y, REL[torch.float32])


@pytest.mark.parametrize("mode", MODES)
def test_inference_and_training_forward_agree(biwkv_cuda: Callable, mode: str) -> None:
    """Must show: the direct (no-grad) call and the autograd Function give the same y, bit for bit."""
    x = {n: t.cuda() for n, t in biwkv_inputs(2, 300, 40, torch.float32).items()}
    with torch.no_grad():
        y_inference = biwkv_cuda(**x, mode=mode)
    leaves = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    y_training = biwkv_cuda(**leaves, mode=mode)
    assert y_training.requires_grad
    assert torch.equal(y_inference, y_training.detach())
