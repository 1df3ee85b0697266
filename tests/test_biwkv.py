"""Tests of the Bi-WKV reference loop (``naive_biwkv``) and its chunked twin (``biwkv``).

Truth is a dense float64 T x T oracle written from the closed forms (specs/vision.md §5.1, §5.3);
the reference loop is checked against it, and the chunked form against the reference loop.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from rwkv_mm.core import chunked as biwkv_chunked
from rwkv_mm.core.chunked import biwkv
from rwkv_mm.core.reference import BIWKV_EPS, BIWKV_TOKEN_SPLIT, naive_biwkv

MODES = ("paper", "official")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(
    B: int, T: int, C: int, decay: str, dtype: torch.dtype = torch.float64, seed: int = 42
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """w, u [C] and k, v [B, T, C]; |spatial_decay| and |spatial_first| up to 10, |k| up to 10.

    decay: "mixed" (spatial_decay in [-10, 10]), "growth" ([-10, -5]: weights grow with distance)
    or "strong" ([5, 10]).
    """
    g = torch.Generator().manual_seed(seed)
    low, high = {"mixed": (-10.0, 10.0), "growth": (-10.0, -5.0), "strong": (5.0, 10.0)}[decay]
    spatial_decay = low + (high - low) * torch.rand(C, generator=g, dtype=torch.float64)
    spatial_first = 20 * torch.rand(C, generator=g, dtype=torch.float64) - 10
    k = 20 * torch.rand(B, T, C, generator=g, dtype=torch.float64) - 10
    v = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    return tuple(x.to(dtype) for x in (spatial_decay / max(T, 1), spatial_first / max(T, 1), k, v))


def _dense_biwkv(w: Tensor, u: Tensor, k: Tensor, v: Tensor, mode: str) -> Tensor:
    """The T x T oracle in float64: y_t = sum_j W[t, j] e^{k_j - kmax} v_j / (same with v -> 1).

    "paper": W[t, j] = e^{-(|t-j| - 1) w}, W[t, t] = e^u. "official" (specs/vision.md §5.3, L =
    ceil(T / 32), s = start of t's chunk): e^{-w |t-j|} unless s <= j <= t, where
    W[t, j] = e^{-w (t-j-1)} + [j > s] e^{w (t-j)} (1 - e^w) for j < t and W[t, t] = e^u + [t > s] (1 - e^w);
    the denominator gains EPS e^m, m = the largest exponent held by the kernel's two running states
    (left: e^{-w (t-j)} before the chunk and e^{-w (t-j-1)} inside it; right: e^{-w (j-t)} from s on,
    and the subtracted e^{w (t-j+1)} for s < j <= t) or of the current token (u + k_t).
    """
    w, u, k, v = (x.double() for x in (w, u, k, v))
    T = k.shape[1]
    t = torch.arange(T, dtype=torch.float64)[:, None, None]  # [T, 1, 1]: output token
    j = torch.arange(T, dtype=torch.float64)[None, :, None]  # [1, T, 1]: input token
    if mode == "paper":
        W = torch.where(t == j, u.exp(), (-w * ((t - j).abs() - 1)).exp())  # [T, T, C]
    else:
        L = -(-T // BIWKV_TOKEN_SPLIT)
        s = torch.div(t, L, rounding_mode="floor") * L
        W = (-w * (t - j).abs()).exp()
        same_chunk_left = (-w * (t - j - 1)).exp() + (j > s) * (w * (t - j)).exp() * -torch.expm1(w)
        W = torch.where((j >= s) & (j < t), same_chunk_left, W)
        W = torch.where(t == j, u.exp() + (t > s) * -torch.expm1(w), W)
    kmax = k.amax(dim=1, keepdim=True)
    e = (k - kmax).exp()
    num, den = torch.einsum("tjc,bjc->btc", W, e * v), torch.einsum("tjc,bjc->btc", W, e)
    if mode == "official":
        kj, none = k[:, None], torch.tensor(float("-inf"), dtype=torch.float64)  # [B, 1, T(j), C]
        left = torch.where(j < s, kj - w * (t - j), torch.where(j < t, kj - w * (t - j - 1), none))
        right = torch.maximum(
            torch.where(j >= s, kj - w * (j - t), none),
            torch.where((j > s) & (j <= t), kj + w * (t - j + 1), none),
        )
        m = torch.maximum(torch.maximum(left.amax(2), right.amax(2)), u + k)
        den = den + BIWKV_EPS * (m - kmax).exp()
    return num / den


def _assert_close(name: str, ref: Tensor, out: Tensor, tol: float) -> None:
    """max |out - ref| <= tol * max |ref|, with the numbers in the message."""
    ref, out = ref.double(), out.double()
    assert not out.isnan().any(), f"{name}: NaN in the output"
    err = ((out - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
    assert err <= tol, f"{name}: max error {err:.3e} x max|ref| > {tol:.1e}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "T, decay",
    [pytest.param(T, d, id=f"T{T}-{d}") for T in (1, 2, 5, 31, 32, 33, 196, 300) for d in ("mixed", "growth")]
    + [pytest.param(197, "strong", id="T197-strong")],
)
def test_reference_matches_dense_oracle(mode: str, T: int, decay: str) -> None:
    w, u, k, v = _inputs(2, T, 5, decay)
    _assert_close("naive_biwkv", _dense_biwkv(w, u, k, v, mode), naive_biwkv(w, u, k, v, mode), 1e-12)


@pytest.mark.parametrize("T", [pytest.param(T, id=f"T{T}") for T in (1, 2, 7, 32)])
def test_official_short_sequences_drop_the_minus_one(T: int) -> None:
    """For T <= 32 (one token per kernel chunk): weight e^{-|t-i| w} for i != t, e^u for t (up to EPS)."""
    w, _, k, v = _inputs(2, T, 5, "mixed")
    u = torch.linspace(-1, 1, 5, dtype=torch.float64)  # EPS weighs e^{-u} relative to the token itself
    dist = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).abs()[..., None]  # [T, T, 1]
    W = torch.where(dist == 0, u.exp(), (-w * dist).exp())  # [T, T, C]
    e = (k - k.amax(dim=1, keepdim=True)).exp()
    clean = torch.einsum("tjc,bjc->btc", W, e * v) / torch.einsum("tjc,bjc->btc", W, e)
    for name, y in (
        ("naive_biwkv", naive_biwkv(w, u, k, v, "official")),
        ("biwkv", biwkv(w, u, k, v, "official")),
    ):
        _assert_close(name, clean, y, 1e-5)


def test_official_differs_from_paper_beyond_32_tokens() -> None:
    w, u, k, v = _inputs(1, 196, 4, "strong")
    paper, official = naive_biwkv(w, u, k, v, "paper"), naive_biwkv(w, u, k, v, "official")
    assert ((paper - official).abs().max() / paper.std()).item() > 1e-2


SHAPES = [
    pytest.param(B, T, C, d, id=f"B{B}-T{T}-C{C}-{d}")
    for B, T, C, d in ((3, 1, 5, "mixed"), (2, 17, 7, "growth"), (2, 100, 5, "mixed"), (2, 1000, 3, "strong"))
] + [pytest.param(2, 1000, 3, "growth", id="B2-T1000-C3-growth")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B, T, C, decay", SHAPES)
def test_chunked_matches_reference_float64(mode: str, B: int, T: int, C: int, decay: str) -> None:
    w, u, k, v = _inputs(B, T, C, decay)
    _assert_close("biwkv", naive_biwkv(w, u, k, v, mode), biwkv(w, u, k, v, mode), 1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "B, T, C, decay", SHAPES + [pytest.param(1, 4096, 6, "mixed", id="B1-T4096-C6-mixed")]
)
def test_chunked_float32_matches_float64_reference(mode: str, B: int, T: int, C: int, decay: str) -> None:
    w, u, k, v = _inputs(B, T, C, decay)
    y = biwkv(*(x.float() for x in (w, u, k, v)), mode)
    assert y.dtype == torch.float32
    _assert_close("biwkv float32", naive_biwkv(w, u, k, v, mode), y, 1e-4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [pytest.param(T, id=f"T{T}") for T in (2, 33, 196)])
def test_chunk_len_does_not_change_the_result(mode: str, T: int) -> None:
    w, u, k, v = _inputs(2, T, 3, "mixed")
    ref = naive_biwkv(w, u, k, v, mode)
    for chunk_len in (1, 5, 32, 64):
        _assert_close(
            f"biwkv chunk_len={chunk_len}", ref, biwkv(w, u, k, v, mode, chunk_len=chunk_len), 1e-10
        )


@pytest.mark.parametrize("mode", MODES)
def test_typical_inputs_take_the_chunked_path(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fallback(*args):
        raise AssertionError("biwkv fell back to the reference loop")

    monkeypatch.setattr(biwkv_chunked, "naive_biwkv", no_fallback)
    for decay in ("mixed", "growth", "strong"):
        biwkv(*(x.float() for x in _inputs(2, 1000, 3, decay)), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "name, spatial_decay, k_scale",
    [
        pytest.param("growth", -150.0, 10.0, id="spatial_decay-150"),
        pytest.param("spread", 5.0, 60.0, id="k-spread-120"),
    ],
)
def test_beyond_the_exponent_budget_stays_exact(
    mode: str, name: str, spatial_decay: float, k_scale: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inputs whose exponents fp32 cannot hold after one shared shift take the running-max loop."""
    calls = []
    monkeypatch.setattr(biwkv_chunked, "naive_biwkv", lambda *args: calls.append(1) or naive_biwkv(*args))
    T, C = 50, 3
    _, u, k, v = _inputs(2, T, C, "mixed")
    w = torch.full((C,), spatial_decay / T, dtype=torch.float64)
    k = k / 10 * k_scale
    y = biwkv(*(x.float() for x in (w, u, k, v)), mode)
    assert calls, "expected the reference loop"
    _assert_close(f"biwkv {name}", naive_biwkv(w, u, k, v, mode), y, 1e-3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [pytest.param(T, id=f"T{T}") for T in (5, 40)])
def test_gradcheck(mode: str, T: int) -> None:
    w, u, k, v = (x.requires_grad_() for x in _inputs(2, T, 3, "mixed"))
    assert torch.autograd.gradcheck(lambda *a: biwkv(*a, mode), (w, u, k, v))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [pytest.param(T, id=f"T{T}") for T in (40, 300)])
def test_chunked_gradients_match_reference(mode: str, T: int) -> None:
    inputs = [x.requires_grad_() for x in _inputs(2, T, 3, "mixed")]
    dy = torch.randn(2, T, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref = torch.autograd.grad(naive_biwkv(*inputs, mode), inputs, dy)
    out = torch.autograd.grad(biwkv(*inputs, mode), inputs, dy)
    for name, r, o in zip(("dw", "du", "dk", "dv"), ref, out, strict=True):
        _assert_close(name, r, o, 1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "dtype, tol",
    [pytest.param(torch.bfloat16, 2e-2, id="bf16"), pytest.param(torch.float16, 2e-3, id="fp16")],
)
@pytest.mark.parametrize("fn", [pytest.param(naive_biwkv, id="naive"), pytest.param(biwkv, id="chunked")])
def test_half_precision_inputs(fn, mode: str, dtype: torch.dtype, tol: float) -> None:
    w, u, k, v = _inputs(2, 45, 5, "mixed", dtype=torch.float32)
    k, v = k.to(dtype), v.to(dtype)
    y = fn(w, u, k, v, mode)
    assert y.dtype == dtype
    # the same rounded inputs in float32: what is left is the rounding of y to the input dtype
    _assert_close(f"{fn.__name__} {dtype}", fn(w, u, k.float(), v.float(), mode), y, tol)


@pytest.mark.parametrize("fn", [pytest.param(naive_biwkv, id="naive"), pytest.param(biwkv, id="chunked")])
def test_empty_sequence(fn) -> None:
    w, u, k, v = _inputs(2, 0, 3, "mixed")
    assert fn(w, u, k, v, "official").shape == (2, 0, 3)
