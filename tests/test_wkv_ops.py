"""The four WKV ops through their public entry points: every fast form against the per-token reference.

The reference loops (``backend="reference"``) run in float64 and define the truth; the chunked / scan
forms (``backend="torch"``) must match them in float64 to rounding and in float32 to 1e-4 x max|y|.
"""

from __future__ import annotations

import pytest
import torch

from rwkv_mm.core import ops
from tests.wkv_inputs import (
    assert_close,
    biwkv_inputs,
    cast_inputs,
    state_tensors,
    wkv4_inputs,
    wkv6_inputs,
    wkv7_inputs,
)

CAUSAL = {
    "wkv7": lambda B, T, dtype=torch.float64, **kw: wkv7_inputs(B, T, 3, 16, dtype, **kw),
    "wkv6": lambda B, T, dtype=torch.float64, **kw: wkv6_inputs(B, T, 3, 16, dtype, **kw),
    "wkv4": lambda B, T, dtype=torch.float64, **kw: wkv4_inputs(B, T, 24, dtype, **kw),
}
ALL = dict(CAUSAL, biwkv=lambda B, T, dtype=torch.float64, **kw: biwkv_inputs(B, T, 24, dtype, **kw))


def run(op: str, x: dict, backend: str, **kw):
    """Call ops.<op> with the inputs dict; returns (y, state or None)."""
    out = getattr(ops, op)(**x, backend=backend, **kw)
    return out if isinstance(out, tuple) else (out, None)


@pytest.mark.parametrize("T", [1, 17, 100, 1000], ids=lambda T: f"T{T}")
@pytest.mark.parametrize("op", list(ALL))
def test_torch_form_matches_reference_float64(op, T):
    x = ALL[op](2, T)
    y_ref, s_ref = run(op, x, "reference")
    y, s = run(op, x, "torch")
    assert_close(f"{op} y", y_ref, y, 1e-10)
    if s_ref is not None:
        for i, (a, b) in enumerate(zip(state_tensors(s_ref), state_tensors(s))):
            assert_close(f"{op} state[{i}]", a, b, 1e-10)


FLOAT32_CASES = [
    pytest.param(op, T, backend, id=f"{op}-T{T}-{backend}")
    for op, T in [("wkv7", 1000), ("wkv6", 1000), ("wkv4", 1000), ("biwkv", 4096)]
    for backend in (["torch", "reference"] if op in CAUSAL else ["torch"])
]


@pytest.mark.parametrize("op,T,backend", FLOAT32_CASES)
def test_float32_error_vs_float64_reference(op, T, backend):
    """Must show: float32 error <= 1e-4 x max|y| (wkv4/6/7 at T = 1000, biwkv at T = 4096)."""
    x = ALL[op](2, T)
    y_ref, s_ref = run(op, x, "reference")
    y, s = run(op, cast_inputs(x, torch.float32), backend)
    assert y.dtype == torch.float32
    assert_close(f"{op} y", y_ref, y, 1e-4)
    if s_ref is not None:
        for i, (a, b) in enumerate(zip(state_tensors(s_ref), state_tensors(s))):
            assert b.dtype == torch.float32
            assert_close(f"{op} state[{i}]", a, b, 1e-4)


@pytest.mark.parametrize("split", [1, 16, 33], ids=lambda s: f"split{s}")
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("op", list(CAUSAL))
def test_two_calls_chained_equal_one_call(op, backend, split):
    x = CAUSAL[op](2, 70)
    y_all, s_all = run(op, x, backend)
    first = {
        n: (t[:, :split] if n in ("r", "w", "k", "v", "a", "b") and t.dim() > 1 else t) for n, t in x.items()
    }
    rest = {
        n: (t[:, split:] if n in ("r", "w", "k", "v", "a", "b") and t.dim() > 1 else t) for n, t in x.items()
    }
    y1, s1 = run(op, first, backend)
    y2, s2 = run(op, dict(rest, state=s1), backend)
    assert_close(f"{op} y", y_all, torch.cat([y1, y2], dim=1), 1e-12)
    for i, (a, b) in enumerate(zip(state_tensors(s_all), state_tensors(s2))):
        assert_close(f"{op} state[{i}]", a, b, 1e-12)


@pytest.mark.parametrize("op", list(CAUSAL))
def test_no_initial_state_means_zero_state(op):
    x = CAUSAL[op](2, 9, state=False)
    y, s = run(op, x, "torch")
    y_ref, s_ref = run(op, x, "reference")
    assert_close(f"{op} y", y_ref, y, 1e-10)
    if op != "wkv4":
        zero = torch.zeros_like(s)
        y0, _ = run(op, dict(x, state=zero), "torch")
        assert_close(f"{op} y with explicit zeros", y, y0, 1e-12)


@pytest.mark.parametrize("decay", [1.0, 20.0, 50.0, 2000.0], ids=lambda d: f"decay{d:g}")
def test_wkv7_beyond_the_rwkv7_decay_bound_stays_exact(decay):
    """Log decays far below -0.6065 (down to -1213 per step) take a safe path, never a wrong answer."""
    x = wkv7_inputs(2, 100, 2, 16, decay=decay)
    y_ref, s_ref = run("wkv7", x, "reference")
    y, s = run("wkv7", cast_inputs(x, torch.float32), "torch")
    assert_close("wkv7 y", y_ref, y, 1e-4)
    assert_close("wkv7 state", s_ref, s, 1e-4)


@pytest.mark.parametrize("chunk_len", [2, 5, 16, 64, 128], ids=lambda L: f"L{L}")
def test_wkv7_any_chunk_length(chunk_len):
    from rwkv_mm.core import chunked

    x = wkv7_inputs(1, 150, 2, 8)
    y_ref, s_ref = run("wkv7", x, "reference")
    y, s = chunked.wkv7(**cast_inputs(x, torch.float32), chunk_len=chunk_len)
    assert_close("wkv7 y", y_ref, y, 1e-4)
    assert_close("wkv7 state", s_ref, s, 1e-4)


@pytest.mark.parametrize("chunk_len", [1, 3, 10, 64], ids=lambda L: f"L{L}")
def test_wkv4_any_chunk_length(chunk_len):
    from rwkv_mm.core import chunked

    x = wkv4_inputs(2, 100, 16)
    y_ref, s_ref = run("wkv4", x, "reference")
    y, s = chunked.wkv4(**x, chunk_len=chunk_len)
    assert_close("wkv4 y", y_ref, y, 1e-10)
    for a, b in zip(state_tensors(s_ref), state_tensors(s)):
        assert_close("wkv4 state", a, b, 1e-10)


@pytest.mark.slow
def test_wkv4_hundred_thousand_tokens_large_keys_stay_finite():
    """T = 100,000 with |k| up to 30 in float32: the running max keeps every sum finite."""
    B, T, C = 1, 100_000, 8
    g = torch.Generator().manual_seed(0)
    k = torch.rand(B, T, C, generator=g) * 60 - 30
    v = torch.randn(B, T, C, generator=g)
    w = -torch.exp(torch.linspace(-5, 2, C))
    u = torch.randn(C, generator=g)
    y, (num, den, mx) = ops.wkv4(w, u, k, v, backend="torch")
    assert torch.isfinite(y).all() and torch.isfinite(num).all() and torch.isfinite(den).all()
    # y is a weighted average of v, so it stays within v's range
    assert y.abs().max() <= v.abs().max() + 1e-4
    # the last 300 tokens agree with the reference run from the state 300 tokens earlier
    _, s_mid = ops.wkv4(w, u, k[:, :-300], v[:, :-300], backend="torch")
    y_tail, _ = ops.wkv4(
        w.double(),
        u.double(),
        k[:, -300:].double(),
        v[:, -300:].double(),
        state=tuple(s.double() for s in s_mid),
        backend="reference",
    )
    assert_close("wkv4 tail", y_tail, y[:, -300:], 1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", list(ALL))
def test_half_precision_inputs(op, dtype):
    x = ALL[op](2, 40)
    y32, _ = run(op, cast_inputs(x, torch.float32), "torch")
    y, s = run(op, cast_inputs(x, dtype), "torch")
    assert y.dtype == dtype
    if s is not None:
        assert all(t.dtype == torch.float32 for t in state_tensors(s))
    # inputs rounded to 8 (bf16) or 11 (fp16) bits: the outputs agree to a few percent of max|y|
    assert_close(f"{op} {dtype}", y32, y.float(), 0.05 if dtype == torch.bfloat16 else 0.01)


def _gradcheck(op: str, x: dict, **kw) -> None:
    names = [n for n, t in x.items() if t is not None]
    flat = []
    for n in names:
        t = x[n]
        flat.extend(t if isinstance(t, tuple) else [t])
    leaves = [t.detach().clone().requires_grad_(True) for t in flat]

    def f(*leaves):
        it = iter(leaves)
        args = {n: (tuple(next(it) for _ in x[n]) if isinstance(x[n], tuple) else next(it)) for n in names}
        y, s = run(op, args, "torch", **kw)
        return (y,) + tuple(state_tensors(s)) if s is not None else y

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("T", [5, 40], ids=lambda T: f"T{T}")
@pytest.mark.parametrize("op", list(CAUSAL))
def test_gradcheck_causal_ops_including_initial_state(op, T):
    small = {
        "wkv7": lambda: wkv7_inputs(2, T, 2, 4),
        "wkv6": lambda: wkv6_inputs(2, T, 2, 4),
        "wkv4": lambda: wkv4_inputs(2, T, 3),
    }[op]()
    if op == "wkv7":  # several chunks, so the state pass between chunks is differentiated too
        from rwkv_mm.core import chunked

        assert chunked.wkv7 is ops._PLAIN_TORCH["torch"]["wkv7"]
    _gradcheck(op, small)


@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("T", [5, 40], ids=lambda T: f"T{T}")
def test_gradcheck_biwkv(T, mode):
    _gradcheck("biwkv", biwkv_inputs(2, T, 3), mode=mode)


def test_wkv7_gradients_through_several_chunks():
    """Gradients of the chunked form (chunk 4: several chunks) equal the reference loop's, state included."""
    from rwkv_mm.core import chunked, reference

    x = wkv7_inputs(2, 13, 2, 4)
    ref_leaves = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    fast_leaves = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(2, 13, 2, 4, generator=g, dtype=torch.float64)
    ds = torch.randn(2, 2, 4, 4, generator=g, dtype=torch.float64)
    y, s = reference.naive_wkv7(**ref_leaves)
    ((y * dy).sum() + (s * ds).sum()).backward()
    y, s = chunked.wkv7(**fast_leaves, chunk_len=4)
    ((y * dy).sum() + (s * ds).sum()).backward()
    for n in x:
        assert_close(f"d{n}", ref_leaves[n].grad, fast_leaves[n].grad, 1e-10)
