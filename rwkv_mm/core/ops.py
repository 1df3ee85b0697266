"""The public WKV ops: input validation, then dispatch to a backend.

Backends: ``"reference"`` (the per-token loops of ``reference.py``), ``"torch"`` (the chunked / scan
forms of ``chunked.py``), ``"cpp"`` and ``"cuda"`` (compiled kernels from ``rwkv_mm.kernels``), and
``"auto"``, which takes the compiled kernel for the inputs' device when one is available and the
torch form otherwise. A backend asked for by name that cannot run raises a RuntimeError saying why.

Conventions (ARCHITECTURE.md): batch-first inputs of any floating dtype; math in float32, or float64
when the first input is float64; outputs in that input's dtype; recurrent states in float32 (float64).
Matrix states are ``[B, H, N, N]`` with the **value** index first and the **key** index second. The
causal ops take log decays ``w`` (per-step factor e^w); any finite value is computed exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from .. import kernels
from . import chunked, reference

__all__ = ["BACKENDS", "biwkv", "wkv4", "wkv6", "wkv7"]

Backend = Literal["auto", "reference", "torch", "cpp", "cuda"]
BACKENDS: tuple[str, ...] = ("auto", "reference", "torch", "cpp", "cuda")
BIWKV_MODES = ("paper", "official")

_PLAIN_TORCH: dict[str, dict[str, Callable]] = {
    "reference": {
        "wkv4": reference.naive_wkv4,
        "wkv6": reference.naive_wkv6,
        "wkv7": reference.naive_wkv7,
        "biwkv": reference.naive_biwkv,
    },
    "torch": {"wkv4": chunked.wkv4, "wkv6": chunked.wkv6, "wkv7": chunked.wkv7, "biwkv": chunked.biwkv},
}


def _implementation(op: str, backend: str, device: torch.device) -> Callable:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in _PLAIN_TORCH:
        return _PLAIN_TORCH[backend][op]
    if backend == "auto":
        compiled = "cuda" if device.type == "cuda" else "cpp"
        return kernels.get(op, compiled, warn_on_fallback=True) or _PLAIN_TORCH["torch"][op]
    if (backend == "cuda") != (device.type == "cuda"):
        raise ValueError(f"backend {backend!r} cannot run {op} on {device.type} tensors")
    fn = kernels.get(op, backend)
    if fn is None:
        reason = kernels.unavailable_reason(op, backend)
        raise RuntimeError(f"backend {backend!r} is not available for {op}: {reason}")
    return fn


def _run(op: str, backend: str, device: torch.device, *args: object) -> object:
    """Run ``op`` on ``backend`` outside autocast: the ops pick their own precision (fp32 math)."""
    fn = _implementation(op, backend, device)
    if not torch.is_autocast_enabled(device.type):
        return fn(*args)
    with torch.autocast(device.type, enabled=False):
        return fn(*args)


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _check(
    name: str, x: object, expected: Sequence[int], letters: str, device: torch.device, source: str
) -> None:
    """Raise a ValueError naming ``name`` unless x is a floating tensor of the shape ``expected`` (read off
    the argument ``source``) on ``device``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {letters}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"{name} has shape {_shape_str(x.shape)}, expected {letters} = {_shape_str(expected)}"
            + (f" (from the shape of {source})" if source != name else "")
        )
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (the device of {source})")


def _check_rank(name: str, x: object, rank: int, letters: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {letters}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {letters}, got shape {_shape_str(x.shape)}")


def wkv7(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Tensor | None = None,
    *,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV (the generalised delta rule). Per token, per head:

        S = S diag(e^w) + (S a) b^T + v k^T;   y = S r

    Args:
        r, w, k, v, a, b: [B, T, H, N]. ``w`` is the log decay (RWKV-7 models give
            w = -0.606531 * sigmoid(w0 + lora) in (-0.61, 0)); ``a``, ``b`` the low-rank update
            vectors (the model passes a = -kk, b = kk * iclr).
        state: [B, H, N, N] state entering the sequence, value index first; zeros when None.
        backend: "auto", "reference", "torch", "cpp" or "cuda".

    Returns:
        y: [B, T, H, N] in r's dtype, and the final state [B, H, N, N] in float32 (float64).
    """
    _check_rank("r", r, 4, "[B, T, H, N]")
    B, T, H, N = r.shape
    for name, x in (("r", r), ("w", w), ("k", k), ("v", v), ("a", a), ("b", b)):
        _check(name, x, r.shape, "[B, T, H, N]", r.device, "r")
    if state is not None:
        _check("state", state, (B, H, N, N), "[B, H, N, N]", r.device, "r")
    y, s = _run("wkv7", backend, r.device, r, w, k, v, a, b, state)
    return y, s.contiguous()


def wkv6(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    u: Tensor,
    state: Tensor | None = None,
    *,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """RWKV-5/6 WKV. Per token, per head, with the state before the update:

        y = (S + v (u ⊙ k)^T) r;   S = S diag(e^w) + v k^T

    Args:
        r, k, v: [B, T, H, N].
        w: log decay, [B, T, H, N] (RWKV-6: w = -exp(time_decay + lora)) or [H, N] (RWKV-5:
            w = -exp(time_decay), the same for every token); unbounded below.
        u: [H, N] bonus of the current token (``time_faaaa``).
        state: [B, H, N, N] state entering the sequence, value index first; zeros when None.
        backend: "auto", "reference", "torch", "cpp" or "cuda".

    Returns:
        y: [B, T, H, N] in r's dtype, and the final state [B, H, N, N] in float32 (float64).
    """
    _check_rank("r", r, 4, "[B, T, H, N]")
    B, T, H, N = r.shape
    for name, x in (("r", r), ("k", k), ("v", v)):
        _check(name, x, r.shape, "[B, T, H, N]", r.device, "r")
    if isinstance(w, Tensor) and w.dim() == 2:
        _check("w", w, (H, N), "[H, N]", r.device, "r")
    else:
        _check("w", w, r.shape, "[B, T, H, N] (or [H, N] for RWKV-5)", r.device, "r")
    _check("u", u, (H, N), "[H, N]", r.device, "r")
    if state is not None:
        _check("state", state, (B, H, N, N), "[B, H, N, N]", r.device, "r")
    y, s = _run("wkv6", backend, r.device, r, w, k, v, u, state)
    return y, s.contiguous()


def wkv4(
    w: Tensor,
    u: Tensor,
    k: Tensor,
    v: Tensor,
    state: tuple[Tensor, Tensor, Tensor] | None = None,
    *,
    backend: Backend = "auto",
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """RWKV-4 WKV, per channel:

        y_t = (Σ_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (the same with v -> 1)

    Args:
        w: [C] log decay per step (the LM passes -exp(time_decay)).
        u: [C] bonus of the current token (``time_first``).
        k, v: [B, T, C].
        state: ``(num, den, max)``, each [B, C]: the running sums of the numerator and the
            denominator scaled by e^{-max} (the `rwkv` package's aa, bb, pp); empty when None.
        backend: "auto", "reference", "torch", "cpp" or "cuda".

    Returns:
        y: [B, T, C] in k's dtype, and the final ``(num, den, max)`` in float32 (float64).
    """
    _check_rank("k", k, 3, "[B, T, C]")
    B, T, C = k.shape
    _check("k", k, k.shape, "[B, T, C]", k.device, "k")
    _check("v", v, k.shape, "[B, T, C]", k.device, "k")
    _check("w", w, (C,), "[C]", k.device, "k")
    _check("u", u, (C,), "[C]", k.device, "k")
    if state is not None:
        if not isinstance(state, (tuple, list)) or len(state) != 3:
            raise ValueError("state must be a tuple (num, den, max) of three [B, C] tensors")
        for name, s in zip(("state num", "state den", "state max"), state):
            _check(name, s, (B, C), "[B, C]", k.device, "k")
        state = tuple(state)
    y, (num, den, mx) = _run("wkv4", backend, k.device, w, u, k, v, state)
    return y, (num, den, mx)


def biwkv(
    w: Tensor,
    u: Tensor,
    k: Tensor,
    v: Tensor,
    mode: Literal["paper", "official"] = "paper",
    *,
    backend: Backend = "auto",
) -> Tensor:
    """Vision-RWKV's bidirectional WKV, per channel, over all T tokens (stateless):

        paper:    y_t = (Σ_{i≠t} e^{-(|t-i|-1)w + k_i} v_i + e^{u+k_t} v_t) / (the same with v -> 1)
        official: the arithmetic of the released CUDA kernel, which official checkpoints were trained
                  with (for T <= 32 exactly weight e^{-|t-i|w} for i ≠ t and e^u for i = t).

    Args:
        w: [C] decay rate (Vision-RWKV passes spatial_decay / T); may be negative (growth).
        u: [C] bonus (spatial_first / T).
        k, v: [B, T, C].
        mode: "paper" for models trained here, "official" for converted official checkpoints.
        backend: "auto", "reference", "torch", "cpp" or "cuda".

    Returns:
        y: [B, T, C] in k's dtype.
    """
    if mode not in BIWKV_MODES:
        raise ValueError(f"mode must be one of {BIWKV_MODES}, got {mode!r}")
    _check_rank("k", k, 3, "[B, T, C]")
    B, T, C = k.shape
    _check("k", k, k.shape, "[B, T, C]", k.device, "k")
    _check("v", v, k.shape, "[B, T, C]", k.device, "k")
    _check("w", w, (C,), "[C]", k.device, "k")
    _check("u", u, (C,), "[C]", k.device, "k")
    return _run("biwkv", backend, k.device, w, u, k, v, mode)
