"""Random inputs for the WKV ops, shaped like what the models feed them, a named closeness check, and the
forward + backward comparison of a matrix-state kernel (wkv6, wkv7; CPU or CUDA) with its float64
reference."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

RWKV7_DECAY_BOUND = 0.606531


def wkv7_inputs(
    B: int, T: int, H: int, N: int, dtype: torch.dtype = torch.float64, decay: float = 1.0, state: bool = True
) -> dict:
    """r, w, k, v, a, b as an RWKV-7 layer makes them; ``decay`` scales the log decay (1 = the bound)."""
    g = torch.Generator().manual_seed(B * 1000003 + T * 1009 + H * 31 + N)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    kk = F.normalize(rand(B, T, H, N), dim=-1)
    iclr = torch.sigmoid(rand(B, T, H, N))
    x = dict(
        r=rand(B, T, H, N),
        w=-RWKV7_DECAY_BOUND * torch.sigmoid(rand(B, T, H, N)) * decay,
        k=rand(B, T, H, N),
        v=rand(B, T, H, N),
        a=-kk,
        b=kk * iclr,
        state=rand(B, H, N, N) if state else None,
    )
    return cast_inputs(x, dtype)


def wkv6_inputs(
    B: int,
    T: int,
    H: int,
    N: int,
    dtype: torch.dtype = torch.float64,
    w_min: float | None = None,
    state: bool = True,
) -> dict:
    """RWKV-6 inputs; log decays w = -exp(N(-1, 1)), or uniform in [w_min, 0] when w_min is given."""
    g = torch.Generator().manual_seed(B * 1000003 + T * 1009 + H * 31 + N + 7)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if w_min is None:
        w = -torch.exp(rand(B, T, H, N) - 1)
    else:
        w = torch.rand(B, T, H, N, generator=g, dtype=torch.float64) * w_min
    x = dict(
        r=rand(B, T, H, N),
        w=w,
        k=rand(B, T, H, N),
        v=rand(B, T, H, N),
        u=rand(H, N),
        state=rand(B, H, N, N) if state else None,
    )
    return cast_inputs(x, dtype)


def wkv6_decay_inputs(
    B: int, T: int, H: int, N: int, dtype: torch.dtype, decay: str = "typical", state: bool = True
) -> dict:
    """wkv6_inputs with the log decays drawn per ``decay``: "typical" (w = -exp(N(-1, 1))), "extreme"
    (uniform in [-30, 0]), "huge" (5 % of the steps decay by e^-1e30) or "rwkv5" ([H, N], time-constant)."""
    x = wkv6_inputs(B, T, H, N, torch.float64, w_min=-30.0 if decay == "extreme" else None, state=state)
    g = torch.Generator().manual_seed(7)
    if decay == "huge":
        x["w"] = torch.where(torch.rand(x["w"].shape, generator=g, dtype=torch.float64) < 0.05, -1e30, x["w"])
    elif decay == "rwkv5":
        x["w"] = -torch.exp(1.5 * torch.randn(H, N, generator=g, dtype=torch.float64))
    return cast_inputs(x, dtype)


def wkv4_inputs(
    B: int, T: int, C: int, dtype: torch.dtype = torch.float64, k_scale: float = 3.0, state: bool = True
) -> dict:
    """RWKV-4 inputs: w = -exp(time_decay) over a wide range of decays, k scaled by ``k_scale``."""
    g = torch.Generator().manual_seed(B * 1000003 + T * 1009 + C + 11)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = dict(
        w=-torch.exp(torch.linspace(-6, 3, C, dtype=torch.float64)),
        u=rand(C),
        k=rand(B, T, C) * k_scale,
        v=rand(B, T, C),
        state=(rand(B, C), rand(B, C).abs() + 0.1, rand(B, C)) if state else None,
    )
    return cast_inputs(x, dtype)


def biwkv_inputs(
    B: int, T: int, C: int, dtype: torch.dtype = torch.float64, decay_scale: float = 5.0
) -> dict:
    """Vision-RWKV inputs: w = spatial_decay / T, u = spatial_first / T, spatial_decay of either sign."""
    g = torch.Generator().manual_seed(B * 1000003 + T * 1009 + C + 13)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = dict(w=rand(C) * decay_scale / T, u=rand(C) * decay_scale / T, k=rand(B, T, C) * 3, v=rand(B, T, C))
    return cast_inputs(x, dtype)


def cast_inputs(x: dict, dtype: torch.dtype) -> dict:
    """The inputs dict with every tensor (and every tensor of a tuple state) cast to ``dtype``."""

    def cast(t: object) -> object:
        if isinstance(t, tuple):
            return tuple(s.to(dtype) for s in t)
        return t.to(dtype) if t is not None else None

    return {n: cast(t) for n, t in x.items()}


def state_tensors(state: object) -> list[Tensor]:
    """The tensors of a state, RWKV-4's (num, den, max) tuple turned into the unscaled sums."""
    if isinstance(state, tuple):
        num, den, mx = state
        return [num * mx.exp(), den * mx.exp()]
    return [state]


def assert_close(name: str, ref: Tensor, out: Tensor, rel: float) -> None:
    """max |out - ref| <= rel * max |ref|, with the numbers in the message."""
    ref64, out64 = ref.detach().double(), out.detach().double()
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out64).all(), f"{name}: non-finite values"
    scale = ref64.abs().max().item() or 1.0
    err = (out64 - ref64).abs().max().item()
    assert err <= rel * scale, f"{name}: max abs err {err:.3g} > {rel:g} x max|ref| {scale:.3g}"


def forward_backward(fn: Callable, x: dict, seed: int = 42) -> tuple[Tensor, Tensor, dict]:
    """y, final state and the gradients of sum(y * dy) + sum(state * dstate) for random dy, dstate, all
    returned on the CPU (``fn`` runs on the device of ``x``)."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items() if t is not None}
    y, s = fn(**leaves, **{n: None for n, t in x.items() if t is None})
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device)
    ds = torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.device)
    loss = (y.double() * dy).sum() + (s.double() * ds).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)  # T = 0: only the state
    grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, leaves.values())]
    return y.detach().cpu(), s.detach().cpu(), {n: gr.cpu() for n, gr in zip(leaves, grads)}


def check_against_reference(
    fn: Callable, reference: Callable, x: dict, rel: float, rel_half: float = 0.0, device: str = "cpu"
) -> None:
    """fn on x (moved to ``device``) vs the float64 ``reference`` on the same values: within rel x max|ref|,
    or rel_half for the outputs and gradients that are rounded to bf16 / fp16."""
    y_ref, s_ref, g_ref = forward_backward(reference, cast_inputs(x, torch.float64))
    y, s, g = forward_backward(fn, {n: t.to(device) if t is not None else None for n, t in x.items()})
    tol = lambda t: rel_half if t.dtype in (torch.bfloat16, torch.float16) else rel  # noqa: E731
    assert y.dtype == x["r"].dtype
    assert s.dtype == (torch.float64 if x["r"].dtype == torch.float64 else torch.float32)
    assert_close("y", y_ref, y, tol(y))
    assert_close("state", s_ref, s, tol(s))
    for name in g_ref:
        assert g[name].dtype == x[name].dtype and g[name].shape == x[name].shape
        assert_close(f"d{name}", g_ref[name], g[name], tol(g[name]))
