import pytest
import torch
import torch.nn.functional as F

from rwkv_mm.core.layers import ChannelMix, head_group_norm, low_rank, low_rank_multi, q_shift, token_shift

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(42)


def assert_close(name, ref, out, tol):
    """Relative RMS error of `out` against `ref`, with the max abs diff in the message."""
    diff = out.double() - ref.double()
    err = diff.pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt().clamp_min(1e-30)
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    assert err <= tol, f"{name}: rel RMS err {err:.3g} > {tol}, max abs diff {diff.abs().max():.3g}"


# --- token_shift -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "B, T, C, with_prev",
    [
        pytest.param(*t, id="B{}-T{}-C{}-prev{}".format(*t))
        for t in [(1, 1, 8, False), (1, 1, 8, True), (2, 15, 24, False), (3, 15, 24, True), (2, 2, 5, True)]
    ],
)
def test_token_shift(B, T, C, with_prev):
    x = torch.randn(B, T, C)
    prev = torch.randn(B, C) if with_prev else None
    ref = torch.roll(x, shifts=1, dims=1)
    ref[:, 0] = prev if with_prev else 0.0
    out = token_shift(x, prev)
    assert out.shape == (B, T, C)
    assert torch.equal(out, ref)


def test_token_shift_chains():
    x = torch.randn(2, 20, 16)
    full = token_shift(x)
    for t0 in (1, 7, 19):
        assert torch.equal(token_shift(x[:, t0:], prev=x[:, t0 - 1]), full[:, t0:])


# --- q_shift -----------------------------------------------------------------------------------------------


def q_shift_loop(x, H, W, s, heads):
    """Per pixel and channel: look up the neighbour that the channel's quarter of its head points at."""
    B, _, C = x.shape
    hd = C // heads
    g = hd // 4
    offsets = [(0, -s), (0, s), (-s, 0), (s, 0)]  # left, right, above, below: (dh, dw) of the source pixel
    out = torch.zeros_like(x)
    for b in range(B):
        for h in range(H):
            for w in range(W):
                for c in range(C):
                    dh, dw = offsets[(c % hd) // g]
                    if 0 <= h + dh < H and 0 <= w + dw < W:
                        out[b, h * W + w, c] = x[b, (h + dh) * W + (w + dw), c]
    return out


@pytest.mark.parametrize(
    "B, H, W, C, s, heads",
    [
        pytest.param(*t, id="B{}-H{}-W{}-C{}-s{}-heads{}".format(*t))
        for t in [
            (2, 3, 5, 8, 1, 1),
            (1, 4, 3, 12, 1, 1),
            (2, 3, 5, 16, 1, 2),
            (1, 5, 4, 24, 2, 3),
            (1, 2, 3, 8, 4, 1),
            (1, 1, 1, 4, 1, 1),
            (2, 4, 4, 16, 0, 2),
        ]
    ],
)
def test_q_shift(B, H, W, C, s, heads):
    x = torch.randn(B, H * W, C)
    out = q_shift(x, (H, W), shift_pixel=s, heads=heads)
    assert torch.equal(out, q_shift_loop(x, H, W, s, heads))


def test_q_shift_heads_differ_from_plain():
    """VRWKV6's per-head quarters are not VRWKV's quarters of the whole width."""
    x = torch.randn(1, 12, 16)
    assert not torch.equal(q_shift(x, (3, 4), heads=2), q_shift(x, (3, 4), heads=1))


def test_q_shift_grad():
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: q_shift(t, (2, 3), heads=2), (x,))


@pytest.mark.parametrize(
    "shape, resolution, heads, match",
    [
        pytest.param((1, 12, 8), (3, 5), 1, "resolution", id="bad-resolution"),
        pytest.param((1, 12, 10), (3, 4), 1, "multiple of 4", id="C10-heads1"),
        pytest.param((1, 12, 16), (3, 4), 3, "multiple of 4", id="C16-heads3"),
    ],
)
def test_q_shift_errors(shape, resolution, heads, match):
    with pytest.raises(ValueError, match=match):
        q_shift(torch.randn(shape), resolution, heads=heads)


# --- low-rank projections ----------------------------------------------------------------------------------

ACTS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "none": None}


@pytest.mark.parametrize(
    "shape, C, D, C_out, act",
    [
        pytest.param(*t, id="x{}-C{}-D{}-Cout{}-{}".format(*t))
        for t in [
            ((2, 7), 24, 8, 24, "tanh"),
            ((1, 1), 64, 32, 64, "sigmoid"),
            ((3, 5), 40, 6, 17, "none"),
            ((9,), 16, 4, 16, "tanh"),
        ]
    ],
)
def test_low_rank(shape, C, D, C_out, act):
    x, w1, w2 = torch.randn(*shape, C), torch.randn(C, D) * 0.3, torch.randn(D, C_out) * 0.3
    h = torch.einsum("...c,cd->...d", x.double(), w1.double())
    h = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "none": lambda t: t}[act](h)
    ref = torch.einsum("...d,de->...e", h, w2.double())
    assert_close("low_rank", ref, low_rank(x, w1, w2, ACTS[act]), 1e-6)


@pytest.mark.parametrize(
    "shape, C, K, D, act",
    [
        pytest.param(*t, id="x{}-C{}-K{}-D{}-{}".format(*t))
        for t in [((2, 7), 24, 5, 8, "tanh"), ((1, 1), 64, 5, 32, "tanh"), ((3, 4), 20, 3, 6, "none")]
    ],
)
def test_low_rank_multi(shape, C, K, D, act):
    x, w1, w2 = torch.randn(*shape, C), torch.randn(C, K * D) * 0.3, torch.randn(K, D, C) * 0.3
    out = low_rank_multi(x, w1, w2, ACTS[act])
    assert out.shape == (K, *shape, C)
    for k in range(K):  # chunk k of the shared down projection feeds up projection k
        h = x.double() @ w1[:, k * D : (k + 1) * D].double()
        h = torch.tanh(h) if act == "tanh" else h
        assert_close(f"low_rank_multi[{k}]", h @ w2[k].double(), out[k], 1e-6)


# --- head_group_norm ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, H, eps",
    [
        pytest.param(*t, id="x{}-H{}-eps{}".format(*t))
        for t in [
            ((1, 1, 768), 12, 64e-5),
            ((3, 17, 128), 2, 64e-5),
            ((2, 33, 96), 3, 1e-5),
            ((50, 60), 5, 64e-5),
            ((4, 1, 256), 4, 64e-5),
        ]
    ],
)
def test_head_group_norm(shape, H, eps):
    C = shape[-1]
    x = torch.randn(shape) * 3.0 + torch.randn(C)  # per-channel offsets, so the mean matters
    weight, bias = 1 + 0.1 * torch.randn(C), 0.1 * torch.randn(C)
    out = head_group_norm(x, H, weight, bias, eps)
    assert out.shape == x.shape and out.dtype == x.dtype

    ref = F.group_norm(x.reshape(-1, C), H, weight, bias, eps).view(shape)
    assert_close("vs F.group_norm", ref, out, 1e-6)

    xh = x.double().reshape(-1, H, C // H)
    mean = xh.mean(-1, keepdim=True)
    var = ((xh - mean) ** 2).mean(-1, keepdim=True)
    ref64 = ((xh - mean) / torch.sqrt(var + eps)).reshape(shape) * weight.double() + bias.double()
    assert_close("vs float64", ref64, out, 1e-6)


def test_head_group_norm_bf16():
    x = torch.randn(2, 9, 128)
    weight, bias = 1 + 0.1 * torch.randn(128), 0.1 * torch.randn(128)
    out = head_group_norm(x.bfloat16(), 2, weight.bfloat16(), bias.bfloat16())
    assert out.dtype == torch.bfloat16
    assert_close("bf16", head_group_norm(x, 2, weight, bias), out.float(), 2e-2)


def test_head_group_norm_error():
    with pytest.raises(ValueError, match="divisible"):
        head_group_norm(torch.randn(2, 3, 10), 4, torch.ones(10), torch.zeros(10))


# --- ChannelMix --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dim, hidden, gate, key_norm",
    [
        pytest.param(*t, id="C{}-F{}-gate{}-key_norm{}".format(*t))
        for t in [
            (32, 128, True, False),
            (32, 112, False, False),
            (24, 96, True, True),
            (16, 64, False, True),
        ]
    ],
)
def test_channel_mix(dim, hidden, gate, key_norm):
    m = ChannelMix(dim, hidden, gate=gate, key_norm=key_norm, dtype=torch.float64)
    expected = {"key.weight", "value.weight"} | ({"receptance.weight"} if gate else set())
    expected |= {"key_norm.weight", "key_norm.bias"} if key_norm else set()
    assert set(m.state_dict()) == expected
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    sd = m.state_dict()

    xk, xr = torch.randn(2, 5, dim, dtype=torch.float64), torch.randn(2, 5, dim, dtype=torch.float64)
    k = torch.clamp(xk @ sd["key.weight"].T, min=0) ** 2
    if key_norm:
        mu, var = k.mean(-1, keepdim=True), k.var(-1, unbiased=False, keepdim=True)
        k = (k - mu) / torch.sqrt(var + 1e-5) * sd["key_norm.weight"] + sd["key_norm.bias"]
    ref = k @ sd["value.weight"].T
    if gate:
        ref = ref / (1 + torch.exp(-(xr @ sd["receptance.weight"].T)))
    out = m(xk, xr) if gate else m(xk)
    assert_close("ChannelMix", ref, out, 1e-12)


def test_channel_mix_checks_xr():
    with pytest.raises(ValueError, match="xr"):
        ChannelMix(8, 32, gate=True)(torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="xr"):
        ChannelMix(8, 32, gate=False)(torch.randn(1, 2, 8), torch.randn(1, 2, 8))
