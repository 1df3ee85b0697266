"""Fast WKV forms in plain torch: chunked matmuls and two-level scans, differentiable by autograd.

Each function takes the signature and layout of its ``naive_<op>`` twin in ``reference.py`` and gives
the same result to floating-point rounding, for any finite input. Shapes are documented and
validated once, in ``ops.py``. All work is done in chunk-major contiguous tensors: slicing a chunk
out of a head-major layout made every slice strided and spent ~40 % of the time in copies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import (
    BIWKV_EPS,
    BIWKV_TOKEN_SPLIT,
    WKV4_EMPTY_MAX,
    compute_dtype,
    naive_biwkv,
    naive_wkv6,
    naive_wkv7,
)

__all__ = ["biwkv", "wkv4", "wkv6", "wkv7"]

# Largest cumulative log decay a factorised chunk may hold: its factors e^{±G} stay within e^{±60} in
# fp32 (far from overflow and from denormals) and e^{±700} in fp64. Measured wkv7 fp32 error (max|Δy| /
# max|y| vs fp64, T=1024, N=64) with every w at the RWKV-7 bound -0.6065: L=16 2.4e-7, 32 3.7e-7,
# 64 1.1e-6, 128 1.0e-6, 160 NaN (e^{97} overflows) -- the guard allows L <= 98 at the bound.
_FACTORISED_SPREAD = {torch.float32: 60.0, torch.float64: 1400.0}
# wkv7 chunks processed together: enough work per torch call, intermediates still in cache. Measured
# at B=1, T=1024, H=12, N=64, fp32, 1 thread (the per-token loop ~98 ms): L=16 and 4 chunks per
# group 19 ms; L=16 one chunk 21 ms; L=32 21 ms; the variant that folds the state pass into one
# [N, N] matrix per chunk (Z <- M Z + Zv, fewer calls, more FLOPs) 23-24 ms.
_CHUNKS_PER_GROUP = 4


def _chunk_major(x: Tensor, L: int) -> Tensor:
    """[B, T, H, N] -> [NC, B, H, L, N], contiguous."""
    B, T, H, N = x.shape
    return x.reshape(B, T // L, L, H, N).permute(1, 0, 3, 2, 4).contiguous()


def _factorised_chunk_len(w: Tensor, chunk_len: int, dtype: torch.dtype) -> int:
    """The longest chunk (<= chunk_len) whose cumulative decay the factorised form can carry.

    The RWKV-7 bound |w| < 0.6065 allows chunks up to ~98 in fp32; stronger decays get shorter chunks.
    """
    w_max = w.abs().max().item() if w.numel() else 0.0
    if w_max == 0.0:
        return chunk_len
    return min(chunk_len, int(_FACTORISED_SPREAD[dtype] // w_max))


def wkv7(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Tensor | None = None,
    chunk_len: int = 16,
) -> tuple[Tensor, Tensor]:
    """Chunked RWKV-7: intra-chunk matmuls for a group of chunks at once, then a short pass per chunk.

    Works in the transposed state Z = S^T ([key, value]) of kernels.md §3.2. Within a chunk of L
    tokens, with G the inclusive and E the exclusive cumulative log decay per key channel, and
    U the low-rank read-outs a_t^T Z_{t-1}:
        U = Uv + W Z_0,  [Uv | W] = (I - A_ab)^{-1} [A_ak V | A ⊙ e^E]
        Y = A_qk V + A_qb U + (R ⊙ e^G) Z_0
        Z_L = e^{G_L} ⊙ (Z_0 + (K ⊙ e^{-G})^T V + (B ⊙ e^{-G})^T U)
    with A_xy[t, s] = Σ_κ x_t[κ] y_s[κ] e^{G_t[κ] - G_s[κ]} (E_t for x = a), masked to s <= t (s < t
    for x = a). Everything but U and Z_L's U term is independent of Z_0 and computed for
    ``_CHUNKS_PER_GROUP`` chunks at once; the pass over the chunks needs two matmuls each, and Y is
    completed for the group afterwards. The pairwise decays are factorised as e^{G_t} e^{-G_s};
    chunks are shortened when decays are too strong for that (see ``_factorised_chunk_len``), and
    inputs no chunk of two or more tokens can carry take the per-token loop.
    """
    B, T, H, N = r.shape
    if T < 2:  # a decode step: the per-token update is the lean path
        return naive_wkv7(r, w, k, v, a, b, state)
    out_dtype, dt = r.dtype, compute_dtype(r)
    L = _factorised_chunk_len(w, chunk_len, dt)
    if L < 2:
        return naive_wkv7(r, w, k, v, a, b, state)
    L = min(L, T)
    NC = -(-T // L)
    pad = NC * L - T  # padded tokens have w = 0 and k = v = a = b = 0: the state passes unchanged
    r, w, k, v, a, b = (F.pad(x.to(dt), (0, 0, 0, 0, 0, pad)) for x in (r, w, k, v, a, b))
    ones = torch.ones(L, L, dtype=dt, device=r.device)
    cumsum = torch.cat([ones.tril(), ones.tril(-1)])  # [2L, L]: rows give G (inclusive) then E (exclusive)
    mask = torch.cat([ones.tril(), ones.tril()], dim=1), torch.cat([ones.tril(-1), ones.tril(-1)], dim=1)
    eye = torch.eye(L, dtype=dt, device=r.device)

    Z = r.new_zeros(B * H, N, N) if state is None else state.to(dt).mT.reshape(B * H, N, N)
    y = []
    for c0 in range(0, NC, _CHUNKS_PER_GROUP):
        c1 = min(NC, c0 + _CHUNKS_PER_GROUP)
        group = (_chunk_major(x[:, c0 * L : c1 * L], L).view(-1, L, N) for x in (r, w, k, v, a, b))
        rc, wc, kc, vc, ac, bc = group  # [chunks * B * H, L, N], chunk-major
        e_G, e_E = (cumsum @ wc).exp().split(L, dim=-2)  # e^G, e^E: [NB, L, N]
        k_c, b_c = kc / e_G, bc / e_G  # k ⊙ e^{-G}, b ⊙ e^{-G}
        r_c, a_c = rc * e_G, ac * e_E
        kb_c = torch.cat([k_c, b_c], dim=-2)  # [NB, 2L, N(key)]
        A_qk, A_qb = (r_c @ kb_c.mT * mask[0]).split(L, dim=-1)  # [NB, L, L]
        A_ak, A_ab = (a_c @ kb_c.mT * mask[1]).split(L, dim=-1)
        P = torch.linalg.solve_triangular(eye - A_ab, eye.expand_as(A_ab), upper=False, unitriangular=True)
        Uv, W = (P @ torch.cat([A_ak @ vc, a_c], dim=-1)).split(N, dim=-1)  # U = Uv + W Z_0
        Yv = A_qk @ vc  # [NB, L, N(value)]
        Zv = k_c.mT @ vc  # [NB, N(key), N(value)]
        b_cT = b_c.mT  # [NB, N(key), L]
        decay = e_G[..., -1, :, None]  # e^{G_L}: [NB, N(key), 1]

        n = B * H
        Z_in, U = [], []
        for i in range(c1 - c0):
            part = slice(i * n, (i + 1) * n)
            Z_in.append(Z)
            U.append(torch.baddbmm(Uv[part], W[part], Z))
            Z = decay[part] * torch.baddbmm(Z + Zv[part], b_cT[part], U[-1])
        yc = torch.baddbmm(torch.baddbmm(Yv, A_qb, torch.cat(U)), r_c, torch.cat(Z_in))  # [NB, L, N(value)]
        y.append(yc.view(c1 - c0, B, H, L, N).permute(1, 0, 3, 2, 4).reshape(B, (c1 - c0) * L, H, N))
    y = torch.cat(y, dim=1)[:, :T]
    return y.to(out_dtype), Z.view(B, H, N, N).mT


# RWKV-5/6 (wkv6): batched matmuls and one short pass over chunks.
#
# Per chunk of L tokens (kernels.md §3.3), with the chunk-local cumulative log decays
# G_t = sum_{m<=t} w_m (inclusive) and E_t = G_t - w_t (exclusive), per key channel:
#
#     y_t = S_0 (r_t e^{E_t}) + sum_{s<t} (r_t . k_s e^{E_t - G_s}) v_s + (r_t . u k_t) v_t
#     S_L = S_0 diag(e^{G_L}) + sum_s v_s (k_s e^{G_L - G_s})^T
#
# RWKV-6 decays are unbounded below, so the intra-chunk weights e^{E_t - G_s} cannot use the plain
# factorisation e^{E_t} e^{-G_s} (it overflows). Blocks of tokens are handled from the whole chunk down:
# - a block whose decay spread (sum of -w over the block) is at most ``_MILD_SPREAD`` in every channel
#   is factorised around the middle c of its spread, e^{E_t - c} e^{c - G_s}, factors within e^{±40};
# - otherwise its pairs across the middle are factorised around the split point b,
#   e^{E_t - G_b} e^{G_b - G_s}, both exponents <= 0 (exact for any decay), and its halves recurse.
# Typical decays need one factorised matmul per chunk; w = -30 per step recurses to blocks of 2.
# Cumulative sums and their differences are kept in float64 (cheap: [T, H, N] sized) so that
# differences of large sums stay exact; per-step log decays and all exponents are clamped at
# ``_EXP_FLOOR`` (e^-60 ~ 1e-26, far below float32 resolution; exp is also slow in the denormal range).
# Decode steps (T <= 2) and positive log decays (which the models never produce) take the per-token
# loop.
#
# Candidates against the per-token loop (B=1, T=1024, H=12, N=64, float32, 1 thread on the shared
# 2-core box, best of 4-5, ±15 % run to run): forward / forward+backward in ms, and max |y - y_fp64| /
# max |y_fp64|, for w = -exp(N(-1, 1)) (typical) and w uniform in [-30, 0] (extreme):
#
#     candidate                                       typical                extreme
#     per-token loop (naive_wkv6)                     70 / 362   2.2e-7      70 / 368   2.2e-7
#     pairwise (L, L, N) weights, L=8                 33 / 117   3.7e-7      43 / 138   1.2e-6
#     pairwise, L=16                                  43 / 148   3.1e-7      61 / 157   1.2e-6
#     fla-style sub-chunks, L=16 in 4s                27 / 103   3.1e-7      28 / 107   1.2e-6
#     fla-style sub-chunks, L=32 in 8s                33 / 116   3.7e-7      33 / 122   2.2e-6
#     factorised + gathered pairwise channels, L=16   17 / 56    3.9e-7      54 / 166   3.3e-7
#     factorised + gathered pairwise channels, L=32   15 / 48    9.5e-7      77 / 626   3.3e-7
#     kept: factorised blocks with halving, L=16      18 / 63    2.8e-7      33 / 113   3.9e-7
#     kept: factorised blocks with halving, L=32      17 / 54    3.1e-7      34 / 115   3.9e-7
#     kept: factorised blocks with halving, L=64      18 / 62    3.1e-7      35 / 121   3.9e-7
#
# The pairwise and sub-chunk candidates lose precision on differences of large float32 cumulative sums;
# the gathered per-channel fallback builds (channels, L, L) temporaries, slow once many channels need it.
# RWKV-5 ([H, N] decays, w = -exp(N(0, 1))) keeps its decay tensors broadcast over chunks: 17 / 67.

# Largest per-channel decay spread of a block factorised around its middle (factors within e^{±40}).
_MILD_SPREAD = 80.0
# Log decays and exponents are clamped here: e^-60 ~ 1e-26 is far below float32 resolution.
_EXP_FLOOR = -60.0


def _exp(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype).clamp_min(_EXP_FLOOR).exp()


def _add_intra_chunk(y: Tensor, r: Tensor, k: Tensor, v: Tensor, G: Tensor, E: Tensor) -> Tensor:
    """y + sum_{s<t} (r_t . k_s e^{E_t - G_s}) v_s within each chunk.

    y, r, k, v: [NC, B, H, L, N]; G, E: float64, broadcastable to them (size 1 in NC and B for RWKV-5).
    """
    *lead, L, N = r.shape
    glead = G.shape[:-2]
    b = L
    while b > 1:
        nb = L // b
        Gb, Eb = G.view(*glead, nb, b, N), E.view(*glead, nb, b, N)
        start, end = Eb[..., :1, :], Gb[..., -1:, :]  # cumulative decay before / after each block
        if bool((start - end <= _MILD_SPREAD).all()):
            c = (start + end) / 2
            rt = r.view(*lead, nb, b, N) * _exp(Eb - c, r.dtype)
            kt = k.view(*lead, nb, b, N) * _exp(c - Gb, r.dtype)
            A = (rt @ kt.transpose(-1, -2)).tril(-1)  # tril, not a mask product: the upper part may be inf
            return y + (A @ v.view(*lead, nb, b, N)).view_as(y)
        h = b // 2
        G2, E2 = Gb.view(*glead, nb, 2, h, N), Eb.view(*glead, nb, 2, h, N)
        split = G2[..., 0, -1:, :]
        rt = r.view(*lead, nb, 2, h, N)[..., 1, :, :] * _exp(E2[..., 1, :, :] - split, r.dtype)
        kt = k.view(*lead, nb, 2, h, N)[..., 0, :, :] * _exp(split - G2[..., 0, :, :], r.dtype)
        cross = (rt @ kt.transpose(-1, -2)) @ v.view(*lead, nb, 2, h, N)[..., 0, :, :]  # 2nd half <- 1st half
        y = y + F.pad(cross.unsqueeze(-3), (0, 0, 0, 0, 1, 0)).view_as(y)
        b = h
    return y


def _wkv6_chunks(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, u: Tensor, S: Tensor, L: int
) -> tuple[Tensor, Tensor]:
    """r, k, v: [B, T, H, N], T a multiple of L, L a power of two; w: [B or 1, T, H, N] or [H, N]."""
    B, T, H, N = r.shape
    rc, kc, vc = (_chunk_major(x, L) for x in (r, k, v))
    NC = rc.shape[0]
    wc = w[:, None, :].expand(H, L, N)[None, None] if w.dim() == 2 else _chunk_major(w, L)
    w64 = wc.to(torch.float64).clamp_min(_EXP_FLOOR)  # a step decays by e^-60 at most: keeps G exact in fp64
    G = w64.cumsum(-2)  # [NC or 1, B or 1, H, L, N]
    E = G - w64
    GL = G[..., -1:, :]
    y = (rc * u[:, None, :] * kc).sum(-1, keepdim=True) * vc  # bonus term
    y = _add_intra_chunk(y, rc, kc, vc, G, E)
    # state entering each chunk: S_c = S_{c-1} diag(e^{G_L}) + V^T (K e^{G_L - G})
    dS = (vc.transpose(-1, -2) @ (kc * _exp(GL - G, r.dtype))).unbind(0)
    decay = _exp(GL, r.dtype).expand(NC, B, H, 1, N).unbind(0)
    states = []
    for c in range(NC):
        states.append(S)
        S = torch.addcmul(dS[c], S, decay[c])
    S_in = torch.stack(states).view(-1, N, N)
    y = torch.baddbmm(y.view(-1, L, N), (rc * _exp(E, r.dtype)).view(-1, L, N), S_in.transpose(-1, -2))
    return y.view(NC, B, H, L, N).permute(1, 0, 3, 2, 4).reshape(B, T, H, N), S


def wkv6(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    u: Tensor,
    state: Tensor | None = None,
    chunk_len: int = 32,
) -> tuple[Tensor, Tensor]:
    """RWKV-5/6 WKV in chunks of ``chunk_len`` tokens (a power of two); see the comment block above."""
    B, T, H, N = r.shape
    if T <= 2 or bool((w > 0).any()):
        return naive_wkv6(r, w, k, v, u, state)
    out_dtype, dt = r.dtype, compute_dtype(r)
    r, w, k, v, u = (x.to(dt) for x in (r, w, k, v, u))
    S = r.new_zeros(B, H, N, N) if state is None else state.to(dt)
    main = T - T % chunk_len
    ys = []
    if main:
        w_main = w if w.dim() == 2 else w[:, :main]
        y, S = _wkv6_chunks(r[:, :main], w_main, k[:, :main], v[:, :main], u, S, chunk_len)
        ys.append(y)
    if main < T:
        # a last chunk zero-padded to a power of two: padded tokens (w = 0, k = v = 0) keep the state
        tail = T - main
        L = 1 << (tail - 1).bit_length()
        pad = (0, 0, 0, 0, 0, L - tail)
        r_t, k_t, v_t = (F.pad(x[:, main:], pad) for x in (r, k, v))
        w_t = F.pad(w.expand(1, tail, H, N) if w.dim() == 2 else w[:, main:], pad)
        y, S = _wkv6_chunks(r_t, w_t, k_t, v_t, u, S, L)
        ys.append(y[:, :tail])
    return torch.cat(ys, dim=1).to(out_dtype), S


def wkv4(
    w: Tensor,
    u: Tensor,
    k: Tensor,
    v: Tensor,
    state: tuple[Tensor, Tensor, Tensor] | None = None,
    chunk_len: int | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """RWKV-4 WKV as a two-level running-max scan: O(sqrt T) Python steps instead of O(T).

    1. All chunks are scanned at once, each from an empty state, giving every token's in-chunk part
       and every chunk's summary; 2. a scan over chunks gives the state entering each chunk; 3. each
       output combines its in-chunk part with the entering state decayed by its offset in the chunk.
    Every sum is kept as (numerator, denominator) scaled by e^{-max}, as in ``naive_wkv4``.
    ``chunk_len`` defaults to sqrt(T); a ragged tail is run as one shorter chunk.
    """
    B, T, C = k.shape
    out_dtype, dt = k.dtype, compute_dtype(k)
    w, u, k, v = (x.to(dt) for x in (w, u, k, v))
    if state is None:
        state = (k.new_zeros(B, C), k.new_zeros(B, C), k.new_full((B, C), WKV4_EMPTY_MAX))
    else:
        state = tuple(s.to(dt) for s in state)
    L = chunk_len or max(1, math.isqrt(T))
    n_full = T // L * L
    ys = []
    for start, stop, length in ((0, n_full, L), (n_full, T, T - n_full)):
        if stop > start:
            k_c, v_c = k[:, start:stop].reshape(B, -1, length, C), v[:, start:stop].reshape(B, -1, length, C)
            y, state = _wkv4_chunks(w, u, k_c, v_c, state)
            ys.append(y.view(B, stop - start, C))
    y = torch.cat(ys, dim=1) if ys else k.new_zeros(B, 0, C)
    return y.to(out_dtype), state


def _wkv4_add(
    num: Tensor, den: Tensor, mx: Tensor, num2: Tensor, den2: Tensor, mx2: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Sum of two (numerator, denominator) pairs scaled by e^{-mx} and e^{-mx2}."""
    m = torch.maximum(mx, mx2)
    e1, e2 = (mx - m).exp(), (mx2 - m).exp()
    return e1 * num + e2 * num2, e1 * den + e2 * den2, m


def _wkv4_chunks(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: tuple[Tensor, Tensor, Tensor]
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """k, v: [B, NC, L, C]; state: entering the first chunk. Returns y [B, NC, L, C] and the final state."""
    B, NC, L, C = k.shape
    ones = k.new_ones(())
    # 1. in-chunk scan, all chunks at once
    num, den, mx = k.new_zeros(B, NC, C), k.new_zeros(B, NC, C), k.new_full((B, NC, C), WKV4_EMPTY_MAX)
    parts = []
    for t in range(L):
        kt, vt = k[:, :, t], v[:, :, t]
        parts.append(_wkv4_add(num, den, mx, vt, ones, u + kt))  # the past plus the bonus term of token t
        num, den, mx = _wkv4_add(num, den, mx + w, vt, ones, kt)
    # 2. state entering each chunk
    entering = []
    for i in range(NC):
        entering.append(state)
        state = _wkv4_add(*state[:2], state[2] + L * w, num[:, i], den[:, i], mx[:, i])
    # 3. outputs
    p_num, p_den, p_max = (torch.stack(x, dim=2) for x in zip(*parts))  # [B, NC, L, C]
    e_num, e_den, e_max = (torch.stack(x, dim=1)[:, :, None] for x in zip(*entering))  # [B, NC, 1, C]
    offset = torch.arange(L, dtype=k.dtype, device=k.device)[:, None] * w  # [L, C]
    y_num, y_den, _ = _wkv4_add(p_num, p_den, p_max, e_num, e_den, e_max + offset)
    return y_num / y_den, state


# Bi-WKV measured (B=1, C=192, float32, 1 thread, shared 2-core VM; min of 10-40 runs; ms fwd / fwd+bwd):
#                                                T=1024          T=4096
#   biwkv "paper" (default chunks: 32, 64)      1.7 / 7.3       9.4 / 32
#   biwkv "official"                            5.0 / 12.6     20.2 / 56
#   biwkv "paper", chunk_len=128                5.1 / 19.1     12.4 / 40
#   channel-last chunked cumsums, "paper"       4.5 / 14.8     19.8 / 57
#   channel-last chunked cumsums, "official"   12.2 / 34       55 / 140
#   global factorised cumsums, "paper"          2.6 / 7.7      13.7 / 42   (overflows in fp32 past |w T| ~ 40)
#   torch.logcumsumexp, "paper"                  31 / 122       126 / 505
#   Python loop over T (two scans), "paper"     9.6 / 159        61 / -
#   naive_biwkv                                  72 / -         310-350 / -
#   dense T x T in 4-channel blocks             720 / 2950     7200-21700 / -
# float32 error against the float64 reference with |spatial_decay|, |spatial_first| and |k| up to 10:
# at most 8.3e-7 max|y| (T = 196, 1024, 4096; both modes).

# How far from 1 the factors of the shared-shift form may get, as |log|, per compute dtype: sums
# and their terms then stay within e^{±60} (fp32) of e^{kmax}, far from overflow and from
# denormals. Inputs beyond it (see ``_biwkv_fits``) take the running-max reference loop.
_BIWKV_EXPONENT_BUDGET = {torch.float32: 60.0, torch.float64: 600.0}


def biwkv(
    w: Tensor, u: Tensor, k: Tensor, v: Tensor, mode: str = "paper", chunk_len: int | None = None
) -> Tensor:
    """Bidirectional WKV as chunked Toeplitz matmuls.

    Same arguments and result as ``naive_biwkv`` (w, u: [C]; k, v: [B, T, C] -> y: [B, T, C]), in
    chunks of at most ``chunk_len`` tokens (default max(32, sqrt(T))). With k shifted by its maximum
    over the tokens of each (b, c), X = e^{k - kmax} (v, 1), and the weight of token j on token t
    e^{-w (|t-j| - g)} (g = 1 in "paper" mode, 0 in "official" mode) or e^u for j = t:
      1. an [L, L] Toeplitz matrix per channel, applied to all chunks at once, gives each token's
         in-chunk sum; an [L, 2] one gives each chunk's summaries towards its left and right;
      2. an [NC, NC] matrix per channel carries the summaries across chunks;
      3. each token adds the two carries decayed by its offset in its chunk.
    "official" mode then adds the kernel's in-chunk deviation (``_biwkv_kernel_deviation``) and its
    EPS term (``_biwkv_kernel_max``). Inputs whose exponents float32 (float64) cannot hold after one
    shared shift (``_biwkv_fits``) take ``naive_biwkv``. Time and memory: O(T C (L + NC)), nothing T x T.
    """
    B, T, C = k.shape
    out_dtype, dt = k.dtype, compute_dtype(k)
    if T == 0:
        return k.new_zeros(k.shape)
    w, u, k, v = (x.to(dt) for x in (w, u, k, v))
    kernel_len = -(-T // BIWKV_TOKEN_SPLIT) if mode == "official" else 1
    if not _biwkv_fits(w, u, k, kernel_len):
        return naive_biwkv(w, u, k, v, mode).to(out_dtype)
    NC = -(-T // (chunk_len or max(32, math.isqrt(T))))
    L = -(-T // NC)  # the same number of chunks, as little padding as possible
    k, v = (x.reshape(B * T, C).t().contiguous().view(C, B, T) for x in (k, v))  # channel-major
    k = k - k.detach().amax(dim=-1, keepdim=True)  # the shared shift leaves y unchanged
    e = k.exp()
    x = torch.stack((e * v, e), dim=2)  # [C, B, 2 (num, den), T]: X = e^k (v, 1)
    if NC * L > T:
        x = F.pad(x, (0, NC * L - T))  # zero X: padding adds nothing
    chunks = x.view(C, B * 2 * NC, L)
    M, S, M2, F2 = _biwkv_weights(w, u, L, NC, gap=1 if mode == "paper" else 0)
    # summaries of each chunk, decayed to the start of the next chunk and to the token before it; the
    # right ones in reversed chunk order, so that one lower-triangular M2 carries both directions
    summaries = (chunks @ S).view(C, B * 2, NC, 2)
    summaries = torch.stack((summaries[..., 0], summaries[..., 1].flip(-1)), dim=1)  # [C, 2, B * 2, NC]
    carried = (summaries.view(C, 2 * B * 2, NC) @ M2).view(C, 2, B * 2, NC)
    carried = torch.stack((carried[:, 0], carried[:, 1].flip(-1)), dim=-1)  # [C, B * 2, NC, 2 (left, right)]
    nd = (chunks @ M).baddbmm_(carried.view(C, B * 2 * NC, 2), F2)  # in-chunk sums plus the decayed carries
    nd = nd.view(C, B, 2, NC * L)[..., :T]  # [C, B, 2 (num, den), T]
    if mode == "official":
        nd = nd + _biwkv_kernel_deviation(w, x[..., :T], kernel_len)
    num, den = nd.unbind(2)
    if mode == "official":
        den = den + BIWKV_EPS * _biwkv_kernel_max(w, u, k, kernel_len).exp()
    y = num / den  # [C, B, T]
    return y.view(C, B * T).t().contiguous().view(B, T, C).to(out_dtype)


def _biwkv_fits(w: Tensor, u: Tensor, k: Tensor, kernel_len: int) -> bool:
    """Whether the largest and the smallest factors of ``biwkv`` stay within ``_BIWKV_EXPONENT_BUDGET``.

    Largest: the growth over the whole sequence when w < 0, and e^u. Smallest: e^{k - kmax} over the
    spread of k in one (b, c), times e^{-|w| kernel_len} (the chunk-boundary decays and the
    official kernel's in-chunk factors), times e^u when u < 0.
    """
    largest = (-w).clamp(min=0).max() * k.shape[1] + u.clamp(min=0).max()
    spread = (k.amax(dim=1) - k.amin(dim=1)).max()
    smallest = spread + w.abs().max() * kernel_len + (-u).clamp(min=0).max()
    return bool(torch.maximum(largest, smallest) <= _BIWKV_EXPONENT_BUDGET[k.dtype])


def _biwkv_weights(w: Tensor, u: Tensor, L: int, NC: int, gap: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The per-channel matrices of ``biwkv``, gathered from short tables of per-distance weights.

    M [C, L, L]: M[c, j, t] = e^{-w (|t-j| - gap)}, or e^u for j = t, is the weight of token j on
    token t of the same chunk.
    S [C, L, 2]: decays each token to the start of the next chunk (e^{-w (L - j)}) and to the
    token before the chunk (e^{-w (j + 1)}).
    M2 [C, NC, NC]: M2[c, q, p] = e^{-w L (p - 1 - q)} for q < p, else 0.
    F2 [C, 2, L]: the carries' decays to token t: e^{-w (t - gap)} from the left,
    e^{-w (L - 1 - t - gap)} from the right.
    """
    C, dev = w.shape[0], w.device
    w_ = w[:, None]
    d = torch.arange(L + 1, device=dev)
    table = torch.cat(((-w_ * d).exp(), u[:, None].exp()), dim=1)  # [C, L + 2]: e^{-w d}, d = 0..L; e^u
    j, t = d[:L, None], d[None, :L]
    inside = torch.where(j == t, L + 1, (t - j).abs() - gap)
    M = table.index_select(1, inside.flatten()).view(C, L, L)
    S = torch.stack((-w_ * (L - d[:L]), -w_ * (d[:L] + 1)), dim=-1).exp()
    q = torch.arange(NC, device=dev)
    table2 = torch.cat(((-w_ * L * q).exp(), w.new_zeros(C, 1)), dim=1)  # [C, NC + 1]: e^{-w L n}; 0
    steps = q[None, :] - 1 - q[:, None]  # p - 1 - q
    M2 = table2.index_select(1, torch.where(steps >= 0, steps, NC).flatten()).view(C, NC, NC)
    F2 = torch.stack((-w_ * (d[:L] - gap), -w_ * (L - 1 - d[:L] - gap)), dim=1).exp()
    return M, S, M2, F2


def _biwkv_kernel_deviation(w: Tensor, x: Tensor, kernel_len: int) -> Tensor:
    """The official kernel's weights minus e^{-w |t-j|} (e^u for j = t), applied to x [C, B, 2, T].

    Only tokens of the same kernel chunk [s, s + kernel_len) differ (specs/vision.md §5.3):
    the deviation is (e^w - 1) (P_t - R_t) with P_t = sum_{s<=j<t} e^{-w (t-j)} x_j and
    R_t = sum_{s<j<=t} e^{w (t-j)} x_j, two cumulative sums inside each kernel chunk whose factors
    stay within e^{±w kernel_len} = e^{±spatial_decay / 32}.
    """
    C, B, _, T = x.shape
    n = -(-T // kernel_len)
    xk = F.pad(x, (0, n * kernel_len - T)).view(C, B, 2, n, kernel_len)
    w_ = w[:, None, None, None, None]
    offset = torch.arange(kernel_len, dtype=w.dtype, device=w.device)
    up, down = (w_ * offset).exp(), (-w_ * offset).exp()
    P = down * (xk * up).cumsum(-1) - xk  # the rounding this subtraction leaves is scaled by e^w - 1
    R = up * (xk * (down * (offset > 0))).cumsum(-1)
    return (torch.expm1(w_) * (P - R)).view(C, B, 2, n * kernel_len)[..., :T]


def _biwkv_kernel_max(w: Tensor, u: Tensor, k: Tensor, kernel_len: int) -> Tensor:
    """The official kernel's normaliser m_t = max(o1, o2, u + k_t) under its EPS, k: [C, B, T] -> [C, B, T].

    The kernel's running maxima are the largest exponents in its two states (``naive_biwkv``):
    for t in the kernel chunk starting at s,
      o2_t = max(max_{i<s} k_i - w (t-i),  max_{s<=i<t} k_i - w (t-1-i)),
      o1_t = max(max_{i>=s} k_i - w (i-t),  max_{s<i<=t} k_i + w (t+1-i)),
    i.e. prefix, suffix and in-chunk cumulative maxima of g_i = k_i + w i and h_i = k_i - w i.
    """
    C, B, T = k.shape
    n = -(-T // kernel_len)
    ninf = float("-inf")
    w_ = w[:, None, None, None]
    pos = torch.arange(n * kernel_len, dtype=k.dtype, device=k.device).view(n, kernel_len)
    kp = F.pad(k, (0, n * kernel_len - T), value=ninf).view(C, B, n, kernel_len)
    g, h = kp + w_ * pos, kp - w_ * pos
    g_before = F.pad(g.amax(-1).cummax(-1).values[..., :-1], (1, 0), value=ninf)[..., None]
    g_inside = F.pad(g.cummax(-1).values[..., :-1], (1, 0), value=ninf)
    h_after = h.amax(-1).flip(-1).cummax(-1).values.flip(-1)[..., None]
    h_inside = F.pad(h[..., 1:], (1, 0), value=ninf).cummax(-1).values
    o2 = torch.maximum(g_before, g_inside + w_) - w_ * pos
    o1 = torch.maximum(h_after, h_inside + w_) + w_ * pos
    m = torch.maximum(o1, o2).view(C, B, n * kernel_len)[..., :T]
    return torch.maximum(m, u[:, None, None] + k)
