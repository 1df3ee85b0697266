"""wkv6 on a GPU: the CUDA kernel (backend "cuda") against the float64 per-token reference.

Forward, final state and every gradient (u and the initial state included) for fp32 / bf16 / fp16 /
fp64 inputs, B > 1, odd T, typical and extreme decays and RWKV-5's [H, N] decay, N = 64 (the
fixed-size kernel) and other head sizes (the runtime-size kernel). The reference runs in float64 on
the CPU on the same (rounded) inputs. Skipped without a CUDA device.
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

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())"
    ),
]

# Tolerance x max|ref|: float32 math; bf16 / fp16 outputs and gradients are rounded (two ulps: the
# outputs, and dy, which autograd hands the kernel in y's dtype).
REL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture(scope="module")
def wkv6_cuda() -> Callable:
    fn = kernels.get("wkv6", "cuda")
    assert fn is not None, (
        f"the wkv6 cuda kernel is unavailable: {kernels.unavailable_reason('wkv6', 'cuda')}"
    )
    return fn


def inputs(
    B: int, T: int, H: int, N: int, dtype: torch.dtype, decay: str = "typical", state: bool = True
) -> dict:
    """wkv6_inputs with "typical" (w = -exp(N(-1, 1))), "extreme" (uniform in [-30, 0]) or "rwkv5"
    ([H, N], time-constant) log decays."""
    x = wkv6_inputs(B, T, H, N, torch.float64, w_min=-30.0 if decay == "extreme" else None, state=state)
    if decay == "rwkv5":
        x["w"] = -torch.exp(
            1.5 * torch.randn(H, N, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        )
    return cast_inputs(x, dtype)


def forward_backward(fn: Callable, x: dict, seed: int = 42) -> tuple[Tensor, Tensor, dict]:
    """y, final state and the gradients of sum(y * dy) + sum(state * dstate), all on the CPU."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items() if t is not None}
    y, s = fn(**leaves, **{n: None for n, t in x.items() if t is None})
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device)
    ds = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.device)
    loss = (y.double() * dy).sum() + (s.double() * ds).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return y.detach().cpu(), s.detach().cpu(), {n: gr.cpu() for n, gr in zip(leaves, grads)}


def check(fn: Callable, x: dict) -> None:
    dtype = x["r"].dtype
    y_ref, s_ref, g_ref = forward_backward(naive_wkv6, cast_inputs(x, torch.float64))
    y, s, g = forward_backward(fn, {n: t.cuda() if t is not None else None for n, t in x.items()})
    tol = lambda t: REL[t.dtype]  # noqa: E731
    assert y.dtype == dtype and s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close("y", y_ref, y, tol(y))
    assert_close("state", s_ref, s, tol(s))
    for name in g_ref:
        assert g[name].dtype == x[name].dtype and g[name].shape == x[name].shape
        assert_close(f"d{name}", g_ref[name], g[name], tol(g[name]))


CASES = [
    pytest.param(2, 1, 2, 64, "typical", id="B2-T1-H2-N64-typical"),
    pytest.param(2, 17, 3, 64, "typical", id="B2-T17-H3-N64-typical"),
    pytest.param(2, 1000, 2, 64, "typical", id="B2-T1000-H2-N64-typical"),
    pytest.param(2, 1000, 2, 64, "extreme", id="B2-T1000-H2-N64-extreme"),
    pytest.param(2, 100, 3, 64, "rwkv5", id="B2-T100-H3-N64-rwkv5"),
    pytest.param(3, 17, 2, 32, "typical", id="B3-T17-H2-N32-typical"),
    pytest.param(2, 100, 2, 20, "rwkv5", id="B2-T100-H2-N20-rwkv5"),
    pytest.param(1, 40, 1, 128, "typical", id="B1-T40-H1-N128-typical"),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,H,N,decay", CASES)
def test_matches_reference(
    wkv6_cuda: Callable, B: int, T: int, H: int, N: int, decay: str, dtype: torch.dtype
) -> None:
    check(wkv6_cuda, inputs(B, T, H, N, dtype, decay))


def test_no_initial_state(wkv6_cuda: Callable) -> None:
    check(wkv6_cuda, inputs(2, 33, 2, 64, torch.float32, state=False))


def test_chained_calls_equal_one_call(wkv6_cuda: Callable) -> None:
    x = {n: t.cuda() for n, t in inputs(2, 70, 2, 64, torch.float32).items()}
    y_all, s_all = wkv6_cuda(**x)
    seq = ("r", "w", "k", "v")
    y1, s1 = wkv6_cuda(*(x[n][:, :33] for n in seq), x["u"], x["state"])
    y2, s2 = wkv6_cuda(*(x[n][:, 33:] for n in seq), x["u"], s1)
    assert_close("y", y_all, torch.cat([y1, y2], dim=1), 1e-6)
    assert_close("state", s_all, s2, 1e-6)


@pytest.mark.parametrize("backend", ["cuda", "auto"])
def test_public_op_on_cuda_tensors(backend: str) -> None:
    check(lambda **kw: ops.wkv6(**kw, backend=backend), inputs(2, 50, 2, 64, torch.bfloat16, "rwkv5"))


def test_matches_the_cpu_kernel(wkv6_cuda: Callable) -> None:
    """The same arithmetic (include/rwkv_mm/wkv6.h) on both devices: agreement to float32 rounding."""
    cpu = kernels.get("wkv6", "cpp")
    if cpu is None:
        pytest.skip(f"no cpp kernel here: {kernels.unavailable_reason('wkv6', 'cpp')}")
    x = inputs(2, 300, 2, 64, torch.float32)
    y_c, s_c, g_c = forward_backward(cpu, x)
    y_g, s_g, g_g = forward_backward(wkv6_cuda, {n: t.cuda() for n, t in x.items()})
    assert_close("y", y_c, y_g, 1e-6)
    assert_close("state", s_c, s_g, 1e-6)
    for name in g_c:
        assert_close(f"d{name}", g_c[name], g_g[name], 1e-6)
