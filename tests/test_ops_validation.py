"""Validation and dispatch of the public WKV ops: clear errors on bad input, shapes kept on good input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkv_mm.core import ops
from tests.wkv_inputs import biwkv_inputs, wkv4_inputs, wkv6_inputs, wkv7_inputs

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
fast_settings = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fast_settings
@given(
    B=st.integers(1, 3),
    T=st.integers(0, 40),
    H=st.integers(1, 3),
    N=st.sampled_from([1, 2, 5, 8]),
    dtype=st.sampled_from(FLOATS),
    with_state=st.booleans(),
    op=st.sampled_from(["wkv7", "wkv6"]),
)
def test_matrix_state_ops_keep_shapes_and_dtypes(B, T, H, N, dtype, with_state, op):
    make = wkv7_inputs if op == "wkv7" else wkv6_inputs
    x = make(B, T, H, N, torch.float64, state=with_state)
    x = {n: (t.to(dtype) if t is not None and n != "state" else t) for n, t in x.items()}
    y, s = getattr(ops, op)(**x)
    assert y.shape == (B, T, H, N) and y.dtype == dtype
    assert s.shape == (B, H, N, N)
    assert s.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(y.float()).all()


@fast_settings
@given(B=st.integers(1, 3), T=st.integers(0, 40), C=st.integers(1, 9), dtype=st.sampled_from(FLOATS))
def test_channel_ops_keep_shapes_and_dtypes(B, T, C, dtype):
    x4 = {n: (t.to(dtype) if n != "state" else None) for n, t in wkv4_inputs(B, T, C).items()}
    y, (num, den, mx) = ops.wkv4(**x4)
    assert y.shape == (B, T, C) and y.dtype == dtype
    assert num.shape == den.shape == mx.shape == (B, C)
    for mode in ops.BIWKV_MODES:
        xb = {n: t.to(dtype) for n, t in biwkv_inputs(B, T, C).items()}
        y = ops.biwkv(**xb, mode=mode)
        assert y.shape == (B, T, C) and y.dtype == dtype
        assert torch.isfinite(y.float()).all()


@fast_settings
@given(data=st.data(), op=st.sampled_from(["wkv7", "wkv6", "wkv4", "biwkv"]))
def test_a_mis_shaped_argument_is_named_in_the_error(data, op):
    x = {
        "wkv7": lambda: wkv7_inputs(2, 5, 3, 4),
        "wkv6": lambda: wkv6_inputs(2, 5, 3, 4),
        "wkv4": lambda: wkv4_inputs(2, 5, 6),
        "biwkv": lambda: biwkv_inputs(2, 5, 6),
    }[op]()
    names = [n for n, t in x.items() if torch.is_tensor(t)]
    name = data.draw(st.sampled_from(names))
    good = x[name]
    dim = data.draw(st.integers(0, good.dim() - 1))
    shape = list(good.shape)
    shape[dim] += data.draw(st.integers(1, 3))
    x[name] = torch.zeros(shape, dtype=good.dtype)
    with pytest.raises(ValueError, match=rf"(?s)(?=.*\b{name}\b).*shape"):
        getattr(ops, op)(**x)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda x: ops.wkv7(**dict(x, r=x["r"][0])), r"r must be 4-D \[B, T, H, N\], got shape \[5, 3, 4\]"),
        (
            lambda x: ops.wkv7(**dict(x, k=x["k"].long())),
            r"k must have a floating-point dtype, got torch.int64",
        ),
        (lambda x: ops.wkv7(**dict(x, v=x["v"].numpy())), r"v must be a torch.Tensor"),
        (
            lambda x: ops.wkv7(**dict(x, state=x["state"][:, :, :3])),
            r"state has shape \[2, 3, 3, 4\], expected \[B, H, N, N\] = \[2, 3, 4, 4\]",
        ),
        (lambda x: ops.wkv7(**x, backend="triton"), r"backend must be one of"),
        (lambda x: ops.wkv7(**x, backend="cuda"), r"backend 'cuda' cannot run wkv7 on cpu tensors"),
    ],
    ids=["rank", "dtype", "type", "state", "unknown-backend", "cuda-on-cpu"],
)
def test_wkv7_errors_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call(wkv7_inputs(2, 5, 3, 4))


def test_wkv6_accepts_rwkv5_constant_decay_and_names_a_wrong_one():
    x = wkv6_inputs(2, 5, 3, 4)
    w5 = x["w"][0, 0]  # [H, N]
    y, _ = ops.wkv6(**dict(x, w=w5))
    y_ref, _ = ops.wkv6(**dict(x, w=w5.expand_as(x["w"])), backend="reference")
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"w has shape \[3, 5\], expected \[H, N\] = \[3, 4\]"):
        ops.wkv6(**dict(x, w=torch.zeros(3, 5, dtype=torch.float64)))


def test_wkv4_state_must_be_a_triple():
    x = wkv4_inputs(2, 5, 6)
    with pytest.raises(ValueError, match=r"state must be a tuple \(num, den, max\)"):
        ops.wkv4(**dict(x, state=x["state"][:2]))
    with pytest.raises(ValueError, match=r"state max has shape \[2, 5\]"):
        ops.wkv4(**dict(x, state=(*x["state"][:2], torch.zeros(2, 5, dtype=torch.float64))))


def test_biwkv_mode_is_checked():
    with pytest.raises(ValueError, match=r"mode must be one of \('paper', 'official'\), got 'kernel'"):
        ops.biwkv(**biwkv_inputs(1, 4, 3), mode="kernel")


def test_a_compiled_backend_asked_for_by_name_says_why_it_cannot_run(monkeypatch):
    from rwkv_mm import kernels

    monkeypatch.setattr(kernels, "get", lambda op, backend, warn_on_fallback=False: None)
    with pytest.raises(RuntimeError, match=r"backend 'cpp' is not available for wkv7: .+"):
        ops.wkv7(**wkv7_inputs(1, 3, 1, 4), backend="cpp")


def test_auto_takes_a_compiled_kernel_when_there_is_one_and_the_torch_form_otherwise(monkeypatch):
    from rwkv_mm import kernels
    from rwkv_mm.core import chunked

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(kernels, "get", lambda op, backend, warn_on_fallback=False: None)
    assert ops._implementation("wkv7", "auto", cpu) is chunked.wkv7
    asked = []

    def compiled(op, backend, warn_on_fallback=False):
        asked.append((backend, warn_on_fallback))
        return print

    monkeypatch.setattr(kernels, "get", compiled)
    assert ops._implementation("biwkv", "auto", cpu) is print
    assert ops._implementation("biwkv", "auto", cuda) is print
    assert asked == [("cpp", True), ("cuda", True)]


@pytest.mark.parametrize("op", ["wkv7", "wkv6", "wkv4", "biwkv"])
def test_ops_compute_in_float32_under_bf16_autocast(op):
    make = {
        "wkv7": lambda: wkv7_inputs(1, 20, 2, 4, torch.float32),
        "wkv6": lambda: wkv6_inputs(1, 20, 2, 4, torch.float32),
        "wkv4": lambda: wkv4_inputs(1, 20, 6, torch.float32),
        "biwkv": lambda: biwkv_inputs(1, 20, 6, torch.float32),
    }[op]
    x = make()
    out = getattr(ops, op)(**x, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_autocast = getattr(ops, op)(**x, backend="torch")
    y, y_autocast = (out[0], out_autocast[0]) if isinstance(out, tuple) else (out, out_autocast)
    assert y_autocast.dtype == torch.float32
    torch.testing.assert_close(y_autocast, y, rtol=0, atol=0)
