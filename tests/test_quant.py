"""Weight-only quantization (rwkv_mm.lm.quant) on small synthetic checkpoints: logits close to float32
(bounded relative to the logit spread), the fused decode reading the packed weights (it agrees with
the torch path of the same quantized model, and both differ from float32), batched one-token decode
equal to one sequence at a time, the other model versions, and the eval CLI."""

import json
from pathlib import Path

import pytest
import torch

from rwkv_mm import kernels
from rwkv_mm.lm.checkpoint import RWKVConfig, synthetic_state_dict
from rwkv_mm.lm.model import RWKVLM
from rwkv_mm.lm.quant import QuantLinear, compare, main, quantize_

X070 = RWKVConfig("v7", 3, 128, 256, 512, d_decay=32, d_aaa=32, d_mv=32, d_gate=64)
X060 = RWKVConfig("v6", 2, 128, 256, 448, d_mix=32, d_decay=64)
# max |Δ logits| / std(float32 logits) over a teacher-forced decode
LOGIT_TOL = {"int8": 0.1, "bf16": 0.02}
KL_TOL = {"int8": 1e-3, "bf16": 1e-4}


@pytest.fixture(scope="module")
def x070(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quant") / "x070.pth"
    torch.save(synthetic_state_dict(X070, seed=0), path)
    return path


def tokens(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_logits_close_to_float32(x070: Path, mode: str) -> None:
    reference = RWKVLM.from_file(x070)
    model = quantize_(RWKVLM.from_file(x070), mode)
    result = compare(reference, model, tokens(48)[0])
    assert result["max_abs"] <= LOGIT_TOL[mode], result
    assert result["kl"] <= KL_TOL[mode], result
    assert result["top1"] >= 0.9, result
    assert result["max_abs"] > 1e-6  # the weights did change


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_fused_decode_reads_the_packed_weights(
    x070: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused kernel's decode equals the torch path of the same quantized model (which multiplies by
    the dequantized weights) up to the activation rounding, far closer than either is to float32."""
    reference = RWKVLM.from_file(x070)
    model = quantize_(RWKVLM.from_file(x070), mode)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 6 * X070.n_layer + 1
    assert model.blocks[1].att.w1_packed.dtype == (torch.int8 if mode == "int8" else torch.bfloat16)
    prompt = tokens(6)
    with torch.inference_mode():
        _, state = model(prompt[:, :5])
        fused, _ = model(prompt[:, 5:], state)
        assert model.uses_fused_decode(), "the fused decode kernel did not run"
        ref, _ = reference(prompt[:, 5:], reference(prompt[:, :5])[1])
        monkeypatch.setattr(kernels, "get", lambda *args, **kwargs: None)
        model.reset_decode_cache()
        plain, _ = model(prompt[:, 5:], state)
        assert not model.uses_fused_decode()
    std = plain.std()
    assert (fused - plain).abs().max() <= 2e-3 * std
    assert (plain - ref).abs().max() >= 5 * (fused - plain).abs().max()


@pytest.mark.parametrize("mode", [None, "int8", "bf16"])
@pytest.mark.parametrize("batch", [3, 6])
def test_batched_decode_equals_one_sequence_at_a_time(x070: Path, mode: str | None, batch: int) -> None:
    model = RWKVLM.from_file(x070)
    if mode:
        quantize_(model, mode)
    prompt = tokens(4, batch)
    with torch.inference_mode():
        _, state = model(prompt[:, :3])
        together, new = model(prompt[:, 3:], state)
        for b in range(batch):
            alone, new_b = model(prompt[b : b + 1, 3:], state.select([b]))
            torch.testing.assert_close(together[b : b + 1], alone, rtol=0, atol=1e-5 * alone.std().item())
            for got, ref in zip(new.layers, new_b.layers):
                for name in ref:
                    torch.testing.assert_close(got[name][b : b + 1], ref[name], rtol=1e-5, atol=1e-6)


def test_head_modes_and_bad_arguments(x070: Path) -> None:
    model = quantize_(RWKVLM.from_file(x070), "int8", head="fp32")
    assert not isinstance(model.head, QuantLinear) and isinstance(model.blocks[0].att.key, QuantLinear)
    assert quantize_(RWKVLM.from_file(x070), "int8", head="bf16").head.mode == "bf16"
    head_only = quantize_(RWKVLM.from_file(x070), "fp32", head="bf16")
    assert head_only.head.mode == "bf16" and not isinstance(head_only.blocks[0].att.key, QuantLinear)
    assert not hasattr(head_only.blocks[1].att, "w1_packed")
    result = compare(RWKVLM.from_file(x070), head_only, tokens(16)[0])
    assert result["max_abs"] <= LOGIT_TOL["bf16"] and head_only.uses_fused_decode()
    with pytest.raises(ValueError, match="mode and head must be one of"):
        quantize_(RWKVLM.from_file(x070), "int4")
    with pytest.raises(ValueError, match="float32 model"):
        quantize_(RWKVLM.from_file(x070, dtype=torch.bfloat16), "int8")


def test_other_versions_quantize_their_projections(tmp_path: Path) -> None:
    path = tmp_path / "x060.pth"
    torch.save(synthetic_state_dict(X060, seed=0), path)
    result = compare(RWKVLM.from_file(path), quantize_(RWKVLM.from_file(path), "int8"), tokens(24)[0])
    assert result["max_abs"] <= LOGIT_TOL["int8"], result


def test_prefill_uses_the_same_weights(x070: Path) -> None:
    """Prefill (dequantized GEMMs) and token-by-token decode (kernels) of a quantized model agree."""
    model = quantize_(RWKVLM.from_file(x070), "int8")
    prompt = tokens(8)
    with torch.inference_mode():
        at_once, _ = model(prompt)
        state = None
        for t in range(8):
            one, state = model(prompt[:, t : t + 1], state)
    assert (at_once - one).abs().max() <= 2e-3 * at_once.std()


def test_eval_cli(x070: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 2)
    assert main(["eval", str(x070), str(text), "--mode", "bf16", "--tokens", "20"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "bf16" and result["tokens"] == 20 and 0 <= result["top1"] <= 1
    assert result["kl"] <= KL_TOL["bf16"]


def test_generate_batch_method_delegates(x070: Path) -> None:
    """`RWKVLM.generate_batch` is `rwkv_mm.lm.generate.generate_batch(lm, ...)`, here on a quantized model."""
    from rwkv_mm.lm.generate import generate_batch
    from rwkv_mm.lm.sampling import SamplingParams

    model = quantize_(RWKVLM.from_file(x070), "int8")
    greedy = SamplingParams(temperature=0.0, stop_tokens=(), max_tokens=5)
    prompts = [[1, 2, 3], [4], [5, 6]]
    got = model.generate_batch(prompts, greedy)
    assert got == generate_batch(model, prompts, greedy)
    assert [len(ids) for ids in got] == [5, 5, 5]
