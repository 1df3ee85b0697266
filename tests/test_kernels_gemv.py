"""The compiled decode kernels against float64 references: the fp32 matrix-vector product and small GEMM
(csrc/gemv.cpp), the packed int8 / bf16 products (against float64 products with the same quantized
weights), the fused RWKV-7 block (csrc/decode7.cpp, through the language model: decode logits with the
kernels against the same model without them). A kernel that does not build is a failure, not a skip."""

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rwkv_mm import kernels
from rwkv_mm.kernels.gemv import pack_bf16, pack_int8, unpack
from rwkv_mm.lm.checkpoint import RWKVConfig, synthetic_state_dict
from rwkv_mm.lm.model import RWKVLM

REL = 1e-5
SIZES = [(1, 1), (7, 5), (37, 129), (130, 17), (771, 2051)]  # (in, out): odd, not multiples of 16 / 64


@pytest.fixture(scope="module")
def gemv() -> Callable:
    fn = kernels.get("gemv", "cpp")
    assert fn is not None, kernels.unavailable_reason("gemv", "cpp")
    return fn


def column_major(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """A [out, in] weight stored the way `RWKVLM.from_file` stores Linear weights."""
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    return w.t().contiguous().t()


@pytest.mark.parametrize("batch", [1, 2, 3, 4])
@pytest.mark.parametrize("in_features, out_features", SIZES)
def test_matches_float64_reference(gemv: Callable, batch: int, in_features: int, out_features: int) -> None:
    w = column_major(out_features, in_features, seed=in_features)
    x = torch.randn(batch, in_features, generator=torch.Generator().manual_seed(batch))
    y = gemv(x, w)
    ref = x.double() @ w.double().T
    assert y.shape == (batch, out_features) and y.dtype == torch.float32
    scale = ref.abs().max().clamp_min(1e-30)
    assert ((y.double() - ref).abs().max() / scale).item() < REL


@pytest.mark.parametrize("batch", [5, 7, 16, 17, 64])
@pytest.mark.parametrize("in_features, out_features", SIZES)
def test_small_gemm_matches_float64_reference(
    gemv: Callable, batch: int, in_features: int, out_features: int
):
    """More than 4 rows (batched decode): the register-tiled GEMM of the same kernel."""
    w = column_major(out_features, in_features, seed=in_features)
    x = torch.randn(batch, in_features, generator=torch.Generator().manual_seed(batch))
    y = gemv(x, w)
    ref = x.double() @ w.double().T
    scale = ref.abs().max().clamp_min(1e-30)
    assert ((y.double() - ref).abs().max() / scale).item() < REL


def test_other_cases_take_torch(gemv: Callable) -> None:
    """Row-major weights, float64, batches over 64 and autograd give torch's own result."""
    w = torch.randn(33, 19)
    x = torch.randn(6, 19)
    torch.testing.assert_close(gemv(x, w), x @ w.T)
    x65 = torch.randn(65, 19)
    torch.testing.assert_close(gemv(x65, column_major(33, 19, seed=1)), x65 @ column_major(33, 19, seed=1).T)
    torch.testing.assert_close(gemv(x[:2].double(), w.double()), x[:2].double() @ w.double().T)
    wg = column_major(33, 19, seed=0).requires_grad_(True)
    y = gemv(x[:1], wg)
    y.sum().backward()
    torch.testing.assert_close(wg.grad, x[:1].expand(33, 19))


@pytest.mark.parametrize("in_features, out_features", SIZES)
def test_pack_unpack(in_features: int, out_features: int) -> None:
    """Packing keeps each weight within half a quantization step (int8) or a bf16 rounding."""
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0)) * 3
    packed, scale = pack_int8(w)
    assert packed.dtype == torch.int8 and packed.shape == (
        -(-out_features // 64),
        -(-in_features // 2),
        64,
        2,
    )
    assert (unpack(packed, scale, in_features) - w).abs().le(scale[:, None] / 2 + 1e-6 * w.abs()).all()
    assert packed.abs().max() <= 127
    packed, scale = pack_bf16(w)
    assert packed.dtype == torch.bfloat16 and (scale == 1).all()
    torch.testing.assert_close(unpack(packed, scale, in_features), w.bfloat16().float(), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["int8", "bf16"])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("in_features, out_features", SIZES)
def test_packed_matches_float64_reference(
    gemv: Callable, mode: str, batch: int, in_features: int, out_features: int
):
    """The packed products against float64 products with the same (dequantized) weights. What remains is
    the activation's rounding: int8 weights see x quantized to int16 per row (|Δx| <= max|x| / 65534),
    bf16 weights see x as a sum of two bfloat16 terms (|Δx| <= 2^-16 |x|); plus float32 accumulation."""
    g = torch.Generator().manual_seed(in_features + batch)
    w = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(batch, in_features, generator=g) * torch.rand(batch, 1, generator=g) * 10
    x[0, 0] = 50.0  # an outlier sets the int16 step of row 0
    packed, scale = (pack_int8 if mode == "int8" else pack_bf16)(w)
    wq = unpack(packed, scale, in_features).double()
    y = gemv.packed(x, packed, scale)
    ref = x.double() @ wq.T
    assert y.shape == (batch, out_features) and y.dtype == torch.float32
    magnitude = x.double().abs() @ wq.abs().T  # sum_k |x_k w_k|
    if mode == "int8":
        step = x.double().abs().amax(dim=1, keepdim=True) / 65534
        bound = step * wq.abs().sum(dim=1) + 1e-6 * magnitude
    else:
        bound = 2.0**-15 * magnitude + 1e-6 * magnitude
    excess = (y.double() - ref).abs() - bound
    assert excess.max().item() <= 1e-30, f"max |Δ| over the bound by {excess.max().item():.3g}"


def test_packed_rejects_wrong_shapes(gemv: Callable) -> None:
    packed, scale = pack_int8(torch.randn(70, 9))
    with pytest.raises(RuntimeError, match="packed must be"):
        gemv.packed(torch.randn(1, 11), packed, scale)


@pytest.mark.parametrize("batch", [1, 3, 6])
def test_lm_decode_logits_with_and_without_kernels(
    gemv: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    """RWKV-7 decode through the fused block kernel (and the GEMV for the head) against the torch path."""
    config = RWKVConfig("v7", 3, 128, 256, 512, d_decay=32, d_aaa=32, d_mv=32, d_gate=32)
    path = tmp_path / "x070.pth"
    torch.save(synthetic_state_dict(config, seed=0), path)
    model = RWKVLM.from_file(path)
    prompt = torch.randint(0, config.vocab_size, (batch, 5), generator=torch.Generator().manual_seed(1))

    def decode() -> tuple[torch.Tensor, list]:
        with torch.inference_mode():
            _, state = model(prompt[:, :3])
            logits = []
            for t in (3, 4):
                out, state = model(prompt[:, t : t + 1], state)
                logits.append(out)
        return torch.stack(logits), state.layers

    with_kernel, layers = decode()
    assert model.uses_fused_decode()  # the fused block kernel ran
    monkeypatch.setattr(kernels, "get", lambda *args, **kwargs: None)
    model.reset_decode_cache()
    without, layers_ref = decode()
    assert not model.uses_fused_decode()
    assert (with_kernel - without).abs().max() <= 1e-5 * without.std()
    for got, ref in zip(layers, layers_ref):
        for name in ref:
            assert (got[name] - ref[name]).abs().max() <= 1e-5 * ref[name].abs().max(), name


def test_fused_decode_leaves_the_state_alone(tmp_path: Path) -> None:
    """The carried state is never written; a copied model decodes the same (with its own kernel view)."""
    config = RWKVConfig("v7", 2, 64, 256, 256, d_decay=16, d_aaa=16, d_mv=16, d_gate=16)
    path = tmp_path / "x070.pth"
    torch.save(synthetic_state_dict(config, seed=2), path)
    model = RWKVLM.from_file(path)
    with torch.inference_mode():
        _, state = model(torch.tensor([[1, 2, 3]]))
        before = state.clone()
        out, _ = model(torch.tensor([[4]]), state)
        assert model.uses_fused_decode()
        for got, ref in zip(state.layers, before.layers):
            for name in ref:
                assert torch.equal(got[name], ref[name]), name
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin.blocks[0].att.key.weight.mul_(2)  # in place: the twin's kernel view follows
        assert not torch.equal(twin(torch.tensor([[4]]), state)[0], out)
        twin.load_state_dict(model.state_dict())
        torch.testing.assert_close(twin(torch.tensor([[4]]), state)[0], out, rtol=0, atol=0)
