"""The compiled fp32 matrix-vector kernel (csrc/gemv.cpp) against a float64 `x @ W.T`, and the language
model's decode logits with the kernel against the same model without it. A kernel that does not build
is a failure, not a skip."""

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rwkv_mm import kernels
from rwkv_mm.lm.checkpoint import RWKVConfig, synthetic_state_dict
from rwkv_mm.lm.model import RWKVLM

REL = 1e-5


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
@pytest.mark.parametrize("in_features, out_features", [(1, 1), (7, 5), (37, 129), (130, 17), (771, 2051)])
def test_matches_float64_reference(gemv: Callable, batch: int, in_features: int, out_features: int) -> None:
    w = column_major(out_features, in_features, seed=in_features)
    x = torch.randn(batch, in_features, generator=torch.Generator().manual_seed(batch))
    y = gemv(x, w)
    ref = x.double() @ w.double().T
    assert y.shape == (batch, out_features) and y.dtype == torch.float32
    scale = ref.abs().max().clamp_min(1e-30)
    assert ((y.double() - ref).abs().max() / scale).item() < REL


def test_other_cases_take_torch(gemv: Callable) -> None:
    """Row-major weights, float64, batches over 4 and autograd give torch's own result."""
    w = torch.randn(33, 19)
    x = torch.randn(6, 19)
    torch.testing.assert_close(gemv(x, w), x @ w.T)
    torch.testing.assert_close(gemv(x[:2].double(), w.double()), x[:2].double() @ w.double().T)
    wg = column_major(33, 19, seed=0).requires_grad_(True)
    y = gemv(x[:1], wg)
    y.sum().backward()
    torch.testing.assert_close(wg.grad, x[:1].expand(33, 19))


@pytest.mark.parametrize("batch", [1, 3])
def test_lm_decode_logits_with_and_without_kernel(
    gemv: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    config = RWKVConfig("v7", 2, 128, 256, 512, d_decay=32, d_aaa=32, d_mv=32, d_gate=32)
    path = tmp_path / "x070.pth"
    torch.save(synthetic_state_dict(config, seed=0), path)
    model = RWKVLM.from_file(path)
    prompt = torch.randint(0, config.vocab_size, (batch, 5), generator=torch.Generator().manual_seed(1))

    def decode() -> torch.Tensor:
        with torch.inference_mode():
            _, state = model(prompt[:, :3])
            logits = []
            for t in (3, 4):
                out, state = model(prompt[:, t : t + 1], state)
                logits.append(out)
        return torch.stack(logits)

    calls = []
    real_get = kernels.get

    def counting_get(op: str, *args, **kwargs):
        calls.append(op)
        return real_get(op, *args, **kwargs)

    monkeypatch.setattr(kernels, "get", counting_get)
    with_kernel = decode()
    assert calls.count("gemv") >= 2 * config.n_layer * 6  # every projection of both decode steps
    monkeypatch.setattr(kernels, "get", lambda *args, **kwargs: None)
    without = decode()
    assert (with_kernel - without).abs().max() <= 1e-5 * without.std()
