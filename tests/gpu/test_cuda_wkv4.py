"""wkv4 on a GPU: the CUDA kernel (backend "cuda") against the float64 per-token reference.

Forward, final state and every gradient (the initial state's included, and a gradient on the final
max entry on its own) for fp32 / bf16 / fp16 inputs, B > 1, odd T, C not a multiple of the block.
The reference runs in float64 on the CPU on the same (rounded) inputs. Skipped without a CUDA device.
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

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())"
    ),
]

INPUTS = ("w", "u", "k", "v")
# Tolerance x max|ref|: float32 math; bf16 / fp16 outputs and input gradients are rounded (two ulps:
# the outputs, and dy, which autograd hands the kernel in y's dtype).
REL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture(scope="module")
def wkv4_cuda() -> Callable:
    fn = kernels.get("wkv4", "cuda")
    assert fn is not None, (
        f"the wkv4 cuda kernel is unavailable: {kernels.unavailable_reason('wkv4', 'cuda')}"
    )
    return fn


def forward_backward(fn: Callable, x: dict, device: str, seed: int = 42) -> tuple[Tensor, tuple, dict]:
    """y, final state and the gradients of sum(y dy) + sum(state d_state), all returned on the CPU."""
    leaves = {n: x[n].detach().to(device).requires_grad_(True) for n in INPUTS}
    state = tuple(s.detach().to(device).requires_grad_(True) for s in x["state"])
    leaves.update(zip(("num0", "den0", "max0"), state))
    y, s = fn(*(leaves[n] for n in INPUTS), state=state)
    g = torch.Generator().manual_seed(seed)
    loss = (y.double() * torch.randn(y.shape, generator=g, dtype=torch.float64).to(device)).sum()
    for part in s:
        loss = (
            loss
            + (part.double() * torch.randn(part.shape, generator=g, dtype=torch.float64).to(device)).sum()
        )
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y.detach().cpu(), tuple(p.detach().cpu() for p in s), {n: gr.cpu() for n, gr in zip(leaves, grads)}


def check(fn: Callable, x: dict) -> None:
    dtype = x["k"].dtype
    y_ref, s_ref, g_ref = forward_backward(naive_wkv4, cast_inputs(x, torch.float64), "cpu")
    y, s, g = forward_backward(fn, x, "cuda")
    assert y.dtype == dtype and all(p.dtype == torch.float32 for p in s)
    assert_close("y", y_ref, y, REL[dtype])
    for name, a, b in zip(("num e^max", "den e^max"), state_tensors(s_ref), state_tensors(s)):
        assert_close(f"state {name}", a, b, 1e-5)
    for name in g_ref:  # w, u, k, v and the initial state, all given in dtype
        assert g[name].dtype == dtype
        assert_close(f"d{name}", g_ref[name], g[name], REL[dtype])


CASES = [
    pytest.param(B, T, C, dtype, id=f"B{B}-T{T}-C{C}-{str(dtype)[6:]}")
    for B, T, C in [(2, 1, 24), (3, 17, 37), (2, 301, 40), (2, 1001, 20)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
]


@pytest.mark.parametrize("B,T,C,dtype", CASES)
def test_matches_reference(wkv4_cuda: Callable, B: int, T: int, C: int, dtype: torch.dtype) -> None:
    """Must show: y, the final state and every gradient within REL x max|ref| (1e-5 in float32)."""
    check(wkv4_cuda, wkv4_inputs(B, T, C, dtype, k_scale=10.0 if T > 100 else 3.0))


def test_two_calls_chain_like_one(wkv4_cuda: Callable) -> None:
    x = wkv4_inputs(2, 99, 24, torch.float32)
    x = {n: tuple(s.cuda() for s in t) if n == "state" else t.cuda() for n, t in x.items()}
    y, s = wkv4_cuda(**x)
    y1, s1 = wkv4_cuda(x["w"], x["u"], x["k"][:, :40], x["v"][:, :40], x["state"])
    y2, s2 = wkv4_cuda(x["w"], x["u"], x["k"][:, 40:], x["v"][:, 40:], s1)
    assert_close("y", y, torch.cat([y1, y2], dim=1), 1e-6)
    for a, b in zip(state_tensors(s), state_tensors(s2)):
        assert_close("state", a, b, 1e-6)


def test_public_op_backend_cuda() -> None:
    def op(w, u, k, v, state=None):
        return ops.wkv4(w, u, k, v, state, backend="cuda")

    check(op, wkv4_inputs(3, 33, 24, torch.float32))
