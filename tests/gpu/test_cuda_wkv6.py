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

from rwkv_mm import kernels
from rwkv_mm.core import ops
from rwkv_mm.core.reference import naive_wkv6
from tests.wkv_inputs import assert_close, check_against_reference, forward_backward, wkv6_decay_inputs

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


def check(fn: Callable, x: dict) -> None:
    """fn on CUDA vs the float64 reference on the CPU, within REL[dtype] x max|ref|."""
    rel = REL[torch.float64 if x["r"].dtype == torch.float64 else torch.float32]
    check_against_reference(fn, naive_wkv6, x, rel, REL.get(x["r"].dtype, 0.0), device="cuda")


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
    check(wkv6_cuda, wkv6_decay_inputs(B, T, H, N, dtype, decay))


def test_no_initial_state(wkv6_cuda: Callable) -> None:
    check(wkv6_cuda, wkv6_decay_inputs(2, 33, 2, 64, torch.float32, state=False))


def test_chained_calls_equal_one_call(wkv6_cuda: Callable) -> None:
    x = {n: t.cuda() for n, t in wkv6_decay_inputs(2, 70, 2, 64, torch.float32).items()}
    y_all, s_all = wkv6_cuda(**x)
    seq = ("r", "w", "k", "v")
    y1, s1 = wkv6_cuda(*(x[n][:, :33] for n in seq), x["u"], x["state"])
    y2, s2 = wkv6_cuda(*(x[n][:, 33:] for n in seq), x["u"], s1)
    assert_close("y", y_all, torch.cat([y1, y2], dim=1), 1e-6)
    assert_close("state", s_all, s2, 1e-6)


@pytest.mark.parametrize("backend", ["cuda", "auto"])
def test_public_op_on_cuda_tensors(backend: str) -> None:
    check(
        lambda **kw: ops.wkv6(**kw, backend=backend), wkv6_decay_inputs(2, 50, 2, 64, torch.bfloat16, "rwkv5")
    )


def test_matches_the_cpu_kernel(wkv6_cuda: Callable) -> None:
    """The same arithmetic (include/rwkv_mm/wkv6.h) on both devices: agreement to float32 rounding."""
    cpu = kernels.get("wkv6", "cpp")
    if cpu is None:
        pytest.skip(f"no cpp kernel here: {kernels.unavailable_reason('wkv6', 'cpp')}")
    x = wkv6_decay_inputs(2, 300, 2, 64, torch.float32)
    y_c, s_c, g_c = forward_backward(cpu, x)
    y_g, s_g, g_g = forward_backward(wkv6_cuda, {n: t.cuda() for n, t in x.items()})
    assert_close("y", y_c, y_g, 1e-6)
    assert_close("state", s_c, s_g, 1e-6)
    for name in g_c:
        assert_close(f"d{name}", g_c[name], g_g[name], 1e-6)
