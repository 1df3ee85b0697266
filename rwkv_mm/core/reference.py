"""Per-token reference loops for the WKV recurrences: the definition of truth.

Each ``naive_<op>`` takes exactly the signature and the batch-first layout of its fast twin in
``chunked.py`` and of the public op in ``ops.py`` (where the shapes are documented and validated).
They are written for reading, one line per equation, and compute in float64 when given float64
inputs, else in float32. Matrix states use the canonical layout ``S[b, h, i, j]`` with
**i = value index, j = key index**. Decays of the causal ops are log decays (per-step factor e^w).

``naive_biwkv`` has two modes (specs/vision.md §5): ``"paper"`` is the formula of the Vision-RWKV
paper; ``"official"`` re-does the arithmetic of the released CUDA kernel (``cuda/wkv_cuda.cu`` and
``cuda_new/bi_wkv_kernel.cu`` of OpenGVLab/Vision-RWKV), which official checkpoints were trained
with and which differs from the paper formula for T > 32.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["naive_wkv4", "naive_wkv6", "naive_wkv7", "naive_biwkv"]

# Running maximum of an empty RWKV-4 sum (the `rwkv` package's pp = -1e30 start).
WKV4_EMPTY_MAX = -1e38


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (bf16/fp16 are upcast)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def naive_wkv7(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """RWKV-7 generalised delta rule, one token at a time (O(N^2) per token and head)."""
    B, T, H, N = r.shape
    out_dtype, dt = r.dtype, compute_dtype(r)
    r, w, k, v, a, b = (x.to(dt) for x in (r, w, k, v, a, b))
    S = r.new_zeros(B, H, N, N) if state is None else state.to(dt)  # [B, H, N(value), N(key)]
    ys = []
    for r_t, w_t, k_t, v_t, a_t, b_t in zip(*(x.unbind(1) for x in (r, w, k, v, a, b))):  # each [B, H, N]
        sa = S @ a_t[..., None]  # S a: [B, H, N(value), 1]
        S = S * w_t[..., None, :].exp() + sa * b_t[..., None, :] + v_t[..., :, None] * k_t[..., None, :]
        ys.append((S @ r_t[..., None])[..., 0])  # y = S r, after the update
    y = torch.stack(ys, dim=1) if T else r.new_zeros(B, 0, H, N)
    return y.to(out_dtype), S


def naive_wkv6(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """RWKV-5/6 WKV, one token at a time (O(N^2) per token and head); ``w`` [B, T, H, N] or [H, N]."""
    B, T, H, N = r.shape
    out_dtype, dt = r.dtype, compute_dtype(r)
    r, w, k, v, u = (x.to(dt) for x in (r, w.expand(B, T, H, N), k, v, u))
    S = r.new_zeros(B, H, N, N) if state is None else state.to(dt)  # [B, H, N(value), N(key)]
    ys = []
    for r_t, w_t, k_t, v_t in zip(*(x.unbind(1) for x in (r, w, k, v))):  # each [B, H, N]
        kv = v_t[..., :, None] * k_t[..., None, :]  # v_t k_t^T: [B, H, N(value), N(key)]
        ys.append(((S + u[:, None, :] * kv) @ r_t[..., None])[..., 0])  # y = (S + v (u k)^T) r
        S = S * w_t[..., None, :].exp() + kv  # S = S diag(e^w) + v k^T
    y = torch.stack(ys, dim=1) if T else r.new_zeros(B, 0, H, N)
    return y.to(out_dtype), S


def naive_wkv4(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: tuple[Tensor, Tensor, Tensor] | None = None
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """RWKV-4 WKV, one token at a time, with the running-max trick of the `rwkv` package.

    The state ``(num, den, max)`` holds sum_{i<=t} e^{(t-i)w + k_i} v_i (and the same with v -> 1),
    both scaled by e^{-max}.
    """
    B, T, C = k.shape
    out_dtype, dt = k.dtype, compute_dtype(k)
    w, u, k, v = (x.to(dt) for x in (w, u, k, v))
    if state is None:
        num, den, mx = k.new_zeros(B, C), k.new_zeros(B, C), k.new_full((B, C), WKV4_EMPTY_MAX)
    else:
        num, den, mx = (s.to(dt) for s in state)
    ys = []
    for k_t, v_t in zip(k.unbind(1), v.unbind(1)):  # each [B, C]
        # output: the decayed past plus the current token with its bonus u
        m = torch.maximum(mx, u + k_t)
        e_past, e_now = (mx - m).exp(), (u + k_t - m).exp()
        ys.append((e_past * num + e_now * v_t) / (e_past * den + e_now))
        # state: decay the past by one step, add the current token
        m = torch.maximum(mx + w, k_t)
        e_past, e_now = (mx + w - m).exp(), (k_t - m).exp()
        num, den, mx = e_past * num + e_now * v_t, e_past * den + e_now, m
    y = torch.stack(ys, dim=1) if T else k.new_zeros(B, 0, C)
    return y.to(out_dtype), (num, den, mx)


# The official kernel cuts the tokens of each channel into this many chunks (one CUDA thread each)
# and adds EPS to the max-normalised denominator.
BIWKV_TOKEN_SPLIT = 32
BIWKV_EPS = 1e-6


def naive_biwkv(w: Tensor, u: Tensor, k: Tensor, v: Tensor, mode: str = "paper") -> Tensor:
    """Bidirectional WKV, one token at a time, vectorised over batch and channels.

    ``mode="paper"``:
    ``y_t = (sum_{i != t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t) / (the same with v -> 1)``.
    ``mode="official"``: what the released CUDA kernel computes (see ``_biwkv_official``).

    Args:
        w: [C] decay rate per token of distance, spatial_decay / T (may be negative: growth).
        u: [C] bonus of the current token, spatial_first / T.
        k: [B, T, C] keys.
        v: [B, T, C] values.
        mode: "paper" or "official".

    Returns:
        y: [B, T, C] in k's dtype (computed in float64 for float64 inputs, else float32).
    """
    out_dtype, dt = k.dtype, compute_dtype(k)
    if k.shape[1] == 0:
        return k.new_zeros(k.shape)
    w, u, k, v = (x.to(dt) for x in (w, u, k, v))
    y = _biwkv_paper(w, u, k, v) if mode == "paper" else _biwkv_official(w, u, k, v)
    return y.to(out_dtype)


def _biwkv_step(
    state: tuple[Tensor, Tensor, Tensor], log_decay: Tensor, x: Tensor, v: Tensor, sign: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Decay a max-normalised sum and add (or subtract) one term: the kernels' update with a running max.

    ``state = (num, den, o)`` holds ``sum_i s_i e^{x_i} (v_i, 1)`` as ``e^o (num, den)``; the new state
    holds ``e^{log_decay} * old + sign * e^x (v, 1)``. All tensors: [B, C].
    """
    num, den, o = state
    o_new = torch.maximum(o + log_decay, x)
    e_old, e_new = (o + log_decay - o_new).exp(), sign * (x - o_new).exp()
    return e_old * num + e_new * v, e_old * den + e_new, o_new


def _biwkv_empty(k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The empty max-normalised sum, [B, C] each."""
    B, _, C = k.shape
    return k.new_zeros(B, C), k.new_zeros(B, C), k.new_full((B, C), float("-inf"))


def _biwkv_paper(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Two RWKV-4 scans (left to right, right to left), each exclusive of the current token."""
    T = k.shape[1]
    left, right = [None] * T, [None] * T
    state = _biwkv_empty(k)
    for t in range(T):  # left[t] = sum_{i<t} e^{-(t-1-i) w + k_i} (v_i, 1)
        left[t] = state
        state = _biwkv_step(state, -w, k[:, t], v[:, t])
    state = _biwkv_empty(k)
    for t in reversed(range(T)):  # right[t] = sum_{i>t} e^{-(i-1-t) w + k_i} (v_i, 1)
        right[t] = state
        state = _biwkv_step(state, -w, k[:, t], v[:, t])
    ys = []
    for t in range(T):
        (a, b, o_left), (c, d, o_right), x_self = left[t], right[t], u + k[:, t]
        m = torch.maximum(torch.maximum(o_left, o_right), x_self)
        e_left, e_right, e_self = (o_left - m).exp(), (o_right - m).exp(), (x_self - m).exp()
        ys.append((e_left * a + e_right * c + e_self * v[:, t]) / (e_left * b + e_right * d + e_self))
    return torch.stack(ys, dim=1)


def _biwkv_official(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The released CUDA kernel's forward, one kernel thread (token chunk) after another.

    The kernel gives each (b, c) 32 threads, thread p owning the chunk [s, s + L), L = ceil(T / 32),
    s = p L. Phases 1-2 (chunk sums, then merged across chunks) leave thread p with
      left  (a, b, o2) = sum_{i<s}  e^{-w (s-i) + k_i} (v_i, 1)   (distance s - i: no "-1"),
      right (c, d, o1) = sum_{i>=s} e^{-w (i-s) + k_i} (v_i, 1)   (o1 includes token s),
    each scaled by e^{-max exponent}; then ``c -= e^{k_s - o1} v_s`` and ``d -= e^{k_s - o1}``.
    Phase 3 sweeps the chunk: output, then ``a <- e^{-w} a + e^{k_t} v_t`` and
    ``c <- e^{w} c - e^{w + k_{t+1}} v_{t+1}`` (the right state is updated by subtraction).
    """
    T = k.shape[1]
    L = -(-T // BIWKV_TOKEN_SPLIT)
    pos = torch.arange(T, dtype=k.dtype, device=k.device)[None, :, None]  # [1, T, 1]
    ys = []
    for s in range(0, T, L):
        # phases 1-2: the states entering the chunk, each term decayed by its whole distance to s
        x_left, x_right = k[:, :s] - w * (s - pos[:, :s]), k[:, s:] - w * (pos[:, s:] - s)  # [B, s|T-s, C]
        o2 = x_left.amax(dim=1) if s > 0 else _biwkv_empty(k)[2]
        o1 = x_right.amax(dim=1)
        e_left, e_right = (x_left - o2[:, None]).exp(), (x_right - o1[:, None]).exp()
        a, b = (e_left * v[:, :s]).sum(1), e_left.sum(1)
        c, d = (e_right * v[:, s:]).sum(1), e_right.sum(1)
        c, d = c - (k[:, s] - o1).exp() * v[:, s], d - (k[:, s] - o1).exp()
        # phase 3: sweep the chunk
        for t in range(s, min(s + L, T)):
            x_self = u + k[:, t]
            m = torch.maximum(torch.maximum(o1, o2), x_self)
            e1, e2, e3 = (o1 - m).exp(), (o2 - m).exp(), (x_self - m).exp()
            ys.append((c * e1 + a * e2 + e3 * v[:, t]) / (d * e1 + b * e2 + e3 + BIWKV_EPS))
            if t + 1 < min(s + L, T):  # the kernel also updates after its last token; that state is unused
                a, b, o2 = _biwkv_step((a, b, o2), -w, k[:, t], v[:, t])
                c, d, o1 = _biwkv_step((c, d, o1), w, w + k[:, t + 1], v[:, t + 1], sign=-1.0)
    return torch.stack(ys, dim=1)
