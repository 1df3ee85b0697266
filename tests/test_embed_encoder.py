"""Embedder: encode semantics, normalisation, chunked streaming, batching without padding, save/load,
from_lm on synthetic checkpoints, the three read-outs, and the bundled default when it is present."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rwkv_mm.embed import Embedder
from rwkv_mm.embed.encoder import POOLINGS, EmbedderConfig, RWKVEncoder
from rwkv_mm.embed.train import init_rwkv7_
from rwkv_mm.lm.checkpoint import RWKVConfig, synthetic_state_dict
from rwkv_mm.lm.model import RWKVLM
from rwkv_mm.lm.tokenizer import load_tokenizer

SENTENCES = [
    "A man is playing a guitar.",
    "hi",
    "The quick brown fox jumps over the lazy dog, twice, and then sleeps under the old oak tree.",
    "A woman is slicing an onion.",
    "x",
]


def _tiny_config(**kw) -> EmbedderConfig:
    args = dict(
        n_layer=2, n_embd=64, head_size=32, dim_ffn=128, d_decay=8, d_aaa=8, d_mv=8, d_gate=16,
        vocab_size=257, dim=48, state_layers=2, state_queries=2, head_hidden=32, tokenizer="bytes",
    )  # fmt: skip
    args.update(kw)
    return EmbedderConfig(**args)


def _randomise(model: RWKVEncoder, seed: int = 0) -> RWKVEncoder:
    """The training initialisation plus noise on every parameter, so that no path is trivially zero."""
    init_rwkv7_(model, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.emb.weight.normal_(0, 0.5, generator=g)
    return model


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    torch.manual_seed(42)
    model = _randomise(RWKVEncoder(_tiny_config()))
    return Embedder(model, load_tokenizer("bytes"), model_id="test")


def test_encode_shapes_and_types(embedder):
    one = embedder.encode("a sentence")
    many = embedder.encode(SENTENCES)
    assert one.shape == (embedder.dim,) and one.dtype == np.float32
    assert many.shape == (len(SENTENCES), embedder.dim) and many.dtype == np.float32
    assert embedder.encode([]).shape == (0, embedder.dim)
    t = embedder.encode(SENTENCES, convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and t.shape == many.shape and t.dtype == torch.float32
    as_list = embedder.encode(SENTENCES, convert_to_numpy=False)
    assert (
        isinstance(as_list, list) and len(as_list) == len(SENTENCES) and as_list[0].shape == (embedder.dim,)
    )
    np.testing.assert_allclose(one, embedder.encode(["a sentence"])[0], atol=1e-6)


def test_batching_is_exact(embedder):
    """Sorting, batch size and neighbours do not change a text's vector (no padding enters the state)."""
    together = embedder.encode(SENTENCES, batch_size=32)
    for batch_size in (1, 2, 3):
        np.testing.assert_allclose(embedder.encode(SENTENCES, batch_size=batch_size), together, atol=2e-5)
    alone = np.stack([embedder.encode(s) for s in SENTENCES])
    np.testing.assert_allclose(alone, together, atol=2e-5)


def test_normalize(embedder):
    v = embedder.encode(SENTENCES, normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    raw = embedder.encode(SENTENCES)
    np.testing.assert_allclose(v, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_long_document_streams_in_chunks(embedder, pooling):
    """A 3,000-token document through 37-token chunks equals one pass (fp32 rounding)."""
    doc = " ".join(f"line {i}: the cat sat on mat number {i % 7}." for i in range(100))
    seqs = embedder.tokenize([doc, "short one"])
    assert len(seqs[0]) > 3000
    with torch.no_grad():
        chunked = embedder.model.pool(seqs, [pooling], chunk_len=37)[pooling]
        whole = embedder.model.pool(seqs, [pooling], chunk_len=100_000)[pooling]
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)
    embedder.pooling = pooling
    try:
        np.testing.assert_allclose(embedder.encode(doc), whole[0].numpy(), rtol=1e-4, atol=1e-4)
    finally:
        embedder.pooling = "state"


def test_poolings_differ_and_validate(embedder):
    with torch.no_grad():
        vecs = {p: embedder.model.pool(embedder.tokenize(SENTENCES), [p])[p] for p in POOLINGS}
        both = embedder.model.pool(embedder.tokenize(SENTENCES), list(POOLINGS))
    for p in POOLINGS:
        assert vecs[p].shape == (len(SENTENCES), embedder.dim)
        assert torch.isfinite(vecs[p]).all()
    assert not torch.allclose(vecs["state"], vecs["mean"])
    assert not torch.allclose(vecs["mean"], vecs["eos"])
    for p in POOLINGS:
        torch.testing.assert_close(both[p], vecs[p])
    with pytest.raises(ValueError, match="pooling"):
        Embedder(embedder.model, embedder.tokenizer, pooling="max")


def test_prompt_and_similarity(embedder):
    prompt = "Instruct: find similar\nQuery: "
    np.testing.assert_allclose(
        embedder.encode(SENTENCES, prompt=prompt), embedder.encode([prompt + s for s in SENTENCES]), atol=1e-6
    )
    a, b = embedder.encode(SENTENCES[:3]), embedder.encode(SENTENCES)
    sim = embedder.similarity(a, b)
    assert sim.shape == (3, len(SENTENCES))
    torch.testing.assert_close(torch.diagonal(sim[:, :3]), torch.ones(3), atol=1e-5, rtol=0)
    assert embedder.similarity(a[0], b).shape == (1, len(SENTENCES))


def test_save_load_round_trip(embedder, tmp_path):
    folder = tmp_path / "my-embedder"
    embedder.save(folder)
    loaded = Embedder.load(folder)
    assert loaded.dim == embedder.dim and loaded.pooling == embedder.pooling
    assert re.fullmatch(r"my-embedder@[0-9a-f]{12}", loaded.model_id)
    assert loaded.model_id == embedder.model_id
    np.testing.assert_array_equal(loaded.encode(SENTENCES), embedder.encode(SENTENCES))
    half = embedder.save(tmp_path / "half", dtype=torch.float16)
    np.testing.assert_allclose(Embedder.load(half).encode(SENTENCES), embedder.encode(SENTENCES), atol=0.05)
    other = Embedder.load(folder, pooling="eos")
    assert other.pooling == "eos" and other.encode("x").shape == (embedder.dim,)
    with pytest.raises(FileNotFoundError):
        Embedder.load(tmp_path / "nothing")


@pytest.mark.parametrize("version", ["v7", "v6"])
def test_from_lm_synthetic_checkpoint(tmp_path, version):
    kw = dict(d_decay=8, d_aaa=8, d_mv=8, d_gate=16) if version == "v7" else dict(d_decay=8, d_mix=8)
    lmc = RWKVConfig(version=version, n_layer=2, n_embd=64, vocab_size=257, dim_ffn=128, head_size=32, **kw)
    path = tmp_path / "lm.safetensors"
    save_file(synthetic_state_dict(lmc, seed=3), str(path))
    emb = Embedder.from_lm(path)
    assert emb.pooling == "eos" and emb.dim == 64
    text = "hello world, this is a test"
    vec = torch.from_numpy(emb.encode(text))
    # the LM's logits after the same tokens are its head applied to exactly this hidden state
    lm = RWKVLM.from_file(path)
    tokens = emb.tokenize([text])[0][None]
    logits, _ = lm(tokens)
    torch.testing.assert_close(lm.head.weight @ vec, logits[0], rtol=1e-4, atol=1e-4)
    for pooling in ("mean", "state"):
        other = Embedder.from_lm(path, pooling=pooling)
        v = other.encode(SENTENCES)
        assert v.shape == (len(SENTENCES), 64) and np.isfinite(v).all()
    chunked = Embedder.from_lm(path, pooling="state", chunk_len=5).encode(SENTENCES)
    np.testing.assert_allclose(chunked, Embedder.from_lm(path, pooling="state").encode(SENTENCES), atol=1e-4)


def test_from_lm_saves_and_loads(tmp_path):
    lmc = RWKVConfig(version="v7", n_layer=1, n_embd=64, vocab_size=257, dim_ffn=128, head_size=32,
                     d_decay=8, d_aaa=8, d_gate=16)  # fmt: skip
    path = tmp_path / "lm.safetensors"
    save_file(synthetic_state_dict(lmc, seed=1), str(path))
    emb = Embedder.from_lm(path, pooling="mean")
    loaded = Embedder.load(emb.save(tmp_path / "zs"))
    np.testing.assert_array_equal(loaded.encode(SENTENCES), emb.encode(SENTENCES))


def test_bundled_default_if_present():
    try:
        emb = Embedder.load()
    except FileNotFoundError:
        pytest.skip("no bundled embedder in rwkv_mm/assets/embedder")
    assert emb.dim == 384 and "@" in emb.model_id
    v = emb.encode(["a cat", "a kitten", "stock prices fell sharply"], normalize_embeddings=True)
    assert v[0] @ v[1] > v[0] @ v[2]
