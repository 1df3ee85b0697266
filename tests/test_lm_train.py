"""Training the tiny LM: RWKV-7 init, optimisation, held-out evaluation, resume, export; corpus readers."""

from __future__ import annotations

import json
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rwkv_mm.lm import RWKVLM, ByteTokenizer, corpus
from rwkv_mm.lm.train import (
    TokenData,
    evaluate,
    export,
    generate,
    init_rwkv7_,
    lr_at,
    main,
    make_optimizer,
    tiny_config,
    token_byte_lengths,
)

TEXT = (
    'User: What does "dog" mean?\n\nAssistant: "dog" (noun) means a member of the genus Canis.\n\n'
    "In the beginning God created the heavens and the earth. The earth was formless and empty.\n"
    "json.dumps (function): Serialize obj to a JSON formatted str.\n"
)


def _tiny_model(seed: int = 0, n_layer: int = 2) -> RWKVLM:
    torch.manual_seed(seed)
    return init_rwkv7_(RWKVLM(tiny_config(n_layer=n_layer, n_embd=64, head_size=32)))


def _batch(n: int = 2, t: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(ByteTokenizer().encode(TEXT * 4))
    rows = torch.stack([ids[i * 7 : i * 7 + t + 1] for i in range(n)])
    return rows[:, :-1], rows[:, 1:]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A corpus folder as `corpus build` writes it, from a few lines of text."""
    rng = random.Random(0)
    docs = [
        corpus.Document("test", f"k{i}", TEXT.split("\n")[i % 4] + f" {rng.random():.3f}\n")
        for i in range(400)
    ]
    out = tmp_path / "data"
    out.mkdir()
    np.save(out / "train.npy", corpus.encode_documents(docs[:360]))
    np.save(out / "val.npy", corpus.encode_documents(docs[360:]))
    meta = {
        "tokenizer": "bytes",
        "train_tokens": 1,
        "held_out_fraction": 0.1,
        "command": "test",
        "sources": {},
    }
    (out / "meta.json").write_text(json.dumps(meta))
    return out


# --------------------------------------------------------------------------------------------- model


def test_tiny_config_lora_widths():
    c = tiny_config(n_layer=6, n_embd=256)
    assert (c.d_decay, c.d_aaa, c.d_mv, c.d_gate, c.dim_ffn) == (32, 32, 32, 64, 1024)
    c = tiny_config(n_layer=12, n_embd=768)  # the official 0.1B widths
    assert (c.d_decay, c.d_aaa, c.d_mv, c.d_gate) == (64, 64, 32, 128)


def test_init_rwkv7_values():
    m = _tiny_model(n_layer=3)
    att0, att2 = m.blocks[0].att, m.blocks[2].att
    assert torch.all(m.emb.weight.abs() <= 1e-4)
    assert torch.equal(att0.output.weight, torch.zeros_like(att0.output.weight))
    assert torch.equal(m.blocks[1].ffn.value.weight, torch.zeros_like(m.blocks[1].ffn.value.weight))
    assert torch.equal(att0.w1, torch.zeros_like(att0.w1)) and att0.w2.abs().sum() > 0
    assert att0.x_r[0, 0, 0] == 1.0  # 1 - 0^p at channel 0
    assert torch.allclose(att2.ln_x.weight, torch.full_like(att2.ln_x.weight, 1.0))  # ((2 + 1) / 3)^0.7
    assert torch.allclose(att0.k_a, torch.full_like(att0.k_a, 1.02))
    # decay in the trained range: log decay -0.606531 * sigmoid(w0) within (-0.61, 0)
    w = -0.606531 * torch.sigmoid(att0.w0)
    assert w.min() > -0.61 and w.max() < 0


def test_forward_is_differentiable_end_to_end():
    m = _tiny_model()
    opt = make_optimizer(m, lr=3e-3, weight_decay=0.1)
    x, y = _batch()
    for _ in range(3):  # the zero output projections let the gradient reach every block after one step
        logits, _ = m(x, full_output=True)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def test_training_steps_reduce_loss_on_fixed_batch():
    m = _tiny_model()
    opt = make_optimizer(m, lr=3e-3, weight_decay=0.0)
    x, y = _batch()
    losses = []
    for _ in range(40):
        logits, _ = m(x, full_output=True)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(np.log(256), abs=0.2)  # close to a uniform guess at init
    assert losses[-1] < 0.5 * losses[0], losses


def test_optimizer_groups():
    m = _tiny_model()
    opt = make_optimizer(m, lr=1e-3, weight_decay=0.1)
    decay, w0, plain = (set(map(id, g["params"])) for g in opt.param_groups)
    assert id(m.blocks[0].att.key.weight) in decay and id(m.emb.weight) in decay
    assert id(m.blocks[0].att.w0) in w0 and opt.param_groups[1]["lr_scale"] == 2.0
    assert id(m.blocks[0].ln1.weight) in plain and id(m.blocks[0].att.w1) in plain


def test_lr_schedule():
    assert lr_at(0, 0.0, 1e-3, 1e-5, 10) == pytest.approx(1e-4)
    assert lr_at(9, 0.0, 1e-3, 1e-5, 10) == pytest.approx(1e-3)
    assert lr_at(10, 0.0, 1e-3, 1e-5, 10) == pytest.approx(1e-3)
    assert lr_at(50, 0.5, 1e-3, 1e-5, 10) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(99, 1.0, 1e-3, 1e-5, 10) == pytest.approx(1e-5)
    assert lr_at(99, 3.0, 1e-3, 1e-5, 10) == pytest.approx(1e-5)


# ------------------------------------------------------------------------------------ data + eval


def test_token_data_batches_are_seeded_windows():
    ids = np.arange(100, dtype=np.uint8)
    d = TokenData(ids)
    x, y = d.batch(3, 10, seed=5)
    x2, _ = d.batch(3, 10, seed=5)
    assert x.shape == (3, 10) and x.dtype == torch.long and torch.equal(x, x2)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, 0], x[:, 0] + 1)


def test_evaluate_carries_the_state_across_windows():
    m = _tiny_model()
    x, y = _batch()
    opt = make_optimizer(m, 3e-3, 0.0)
    for _ in range(5):  # away from the init, where the output projections are zero
        logits, _ = m(x, full_output=True)
        opt.zero_grad()
        F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)).backward()
        opt.step()
    stream = np.array(ByteTokenizer().encode(TEXT), dtype=np.uint8)
    data = TokenData(stream)
    nbytes = token_byte_lengths(ByteTokenizer(), 256)
    whole = evaluate(m, data, nbytes, ctx_len=1024, n_streams=1)
    windows = evaluate(m, data, nbytes, ctx_len=7, n_streams=1)
    assert whole["tokens"] == windows["tokens"] == len(stream) - 1
    assert windows["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    # direct: one forward over the stream
    ids = torch.from_numpy(stream.astype(np.int64))[None]
    with torch.no_grad():
        logits, _ = m(ids[:, :-1], full_output=True)
    direct = F.cross_entropy(logits.reshape(-1, 256), ids[0, 1:]).item()
    assert whole["loss"] == pytest.approx(direct, rel=1e-5)
    assert whole["bpb"] == pytest.approx(whole["loss"] / np.log(2), rel=1e-6)  # no end-of-text ids here
    assert m.training


def test_generate_stops_at_turn_end():
    m = _tiny_model()
    text = generate(m, ByteTokenizer(), "User: hi\n\nAssistant:", max_new_tokens=20, seed=1)
    assert isinstance(text, str) and "\n\n" not in text
    assert m.training


# ------------------------------------------------------------------------------------ CLI, resume, export

ARGS = [
    "--n-layer", "2", "--n-embd", "64", "--head-size", "32", "--batch-size", "2", "--ctx-len", "32",
    "--max-steps", "6", "--warmup-steps", "2", "--log-every", "1", "--eval-every", "3",
    "--eval-batch", "2", "--eval-tokens", "256", "--final-eval-tokens", "512", "--sample-tokens", "8",
]  # fmt: skip


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_resume_continues_identically(data_dir: Path, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*ARGS, "--data", str(data_dir), "--out", str(a), "--ckpt-every", "0"]) == 0
    assert (
        main([*ARGS, "--data", str(data_dir), "--out", str(b), "--ckpt-every", "3", "--stop-after", "3"]) == 0
    )
    assert json.loads((b / "summary.json").read_text())["steps"] == 3
    assert main([*ARGS, "--data", str(data_dir), "--out", str(b), "--ckpt-every", "3", "--resume"]) == 0
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    rows = (b / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and sum(r.startswith("6,") for r in rows) >= 1
    summary = json.loads((a / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["held_out"]["tokens"] > 0 and len(summary["samples"]) == 3


def test_export_gives_the_trained_module(data_dir: Path, tmp_path: Path):
    run, asset = tmp_path / "run", tmp_path / "tiny-lm"
    assert main([*ARGS, "--data", str(data_dir), "--out", str(run), "--ckpt-every", "6"]) == 0
    trained = RWKVLM(tiny_config(n_layer=2, n_embd=64, head_size=32))
    trained.load_state_dict(torch.load(run / "last.pt", weights_only=True)["model"])
    trained.eval()
    res = export(run, data_dir, asset, sample_tokens=8, command="python -m rwkv_mm.lm.train export ...")
    assert {p.name for p in asset.iterdir()} == {"model.safetensors", "config.json", "PROVENANCE.md"}
    assert json.loads((asset / "config.json").read_text())["tokenizer"] == "bytes"
    loaded = RWKVLM.from_file(asset)
    x, _ = _batch()
    with torch.no_grad():
        want, _ = trained(x, full_output=True)
        got, _ = loaded(x, full_output=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    tok = loaded.default_tokenizer()
    assert isinstance(tok, ByteTokenizer) and tok.decode(tok.encode(TEXT + "é✓")) == TEXT + "é✓"
    prov = (asset / "PROVENANCE.md").read_text()
    assert "demo model" in prov and f"{res['held_out']['ppl']:.3f}" in prov and prov.count("**Sample ") == 3
    assert res["size_mb"] < 30


# --------------------------------------------------------------------------------------------- corpus


def test_held_out_split_is_stable_and_sized():
    keys = [f"doc{i}" for i in range(20000)]
    held = [k for k in keys if corpus.is_held_out(k, 0.02)]
    assert 0.015 < len(held) / len(keys) < 0.025
    assert held == [k for k in keys if corpus.is_held_out(k, 0.02)]


def test_chat_format():
    text = corpus.chat([("What is\n\n\nX?", " X is a letter. \n"), ("And Y?", "A letter too.")])
    assert (
        text
        == "User: What is\nX?\n\nAssistant: X is a letter.\n\nUser: And Y?\n\nAssistant: A letter too.\n\n"
    )


def test_encode_documents_bytes_and_end_of_text():
    ids = corpus.encode_documents([corpus.Document("s", "k", "hé"), corpus.Document("s", "k2", "a")])
    assert ids.dtype == np.uint8
    assert ids.tolist() == [ord("h") + 1, 0xC3 + 1, 0xA9 + 1, 0, ord("a") + 1, 0]
    assert ByteTokenizer().decode(ids.tolist()) == "héa"


def test_wordnet_line_and_documents():
    line = (
        "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 002 @ 02083346 n 0000 ~ 01322604 n 0000 "
        '| a member of the genus Canis; "the dog barked all night"  '
    )
    s = corpus._parse_wordnet_line(line)
    assert s.lemmas == ["dog", "domestic dog", "Canis familiaris"]
    assert s.definition == "a member of the genus Canis" and s.examples == ["the dog barked all night"]
    assert s.hypernyms == ["02083346"]
    parent = corpus._parse_wordnet_line("02083346 05 n 01 canine 0 000 | a mammal")
    synsets = {("n", "02084071"): s, ("n", "02083346"): parent}
    docs = list(corpus.wordnet_documents(synsets, random.Random(0), chat_share=1.0))
    assert all(d.kind == "chat" and d.text.startswith("User: ") for d in docs)
    assert "means a member of the genus Canis. It is a kind of canine." in "".join(d.text for d in docs)


def test_read_sword_ztext(tmp_path: Path):
    entries = [
        "",  # testament heading
        '<div type="book" osisID="Gen" sID="b1"/><title>Genesis</title>',
        '<chapter n="1" osisID="Gen.1" sID="Gen.1"/>',
        '<w lemma="x">In</w> the beginning<note placement="foot">a note</note>.',
        "",  # a verse missing in this translation
        'God <w>said</w>. <chapter eID="Gen.1"/>',
        '<chapter n="2" osisID="Gen.2" sID="Gen.2"/>',
        "Thus.",
    ]
    block = "".join(entries).encode()
    comp = zlib.compress(block)
    folder = tmp_path / "mod"
    folder.mkdir()
    off, index = 0, b""
    for e in entries:
        n = len(e.encode())
        index += struct.pack("<IIH", 0, off, n)
        off += n
    for t, (bzs, bzv, bzz) in {
        "ot": (struct.pack("<III", 0, len(comp), len(block)), index, comp),
        "nt": (b"", b"", b""),
    }.items():
        (folder / f"{t}.bzs").write_bytes(bzs)
        (folder / f"{t}.bzv").write_bytes(bzv)
        (folder / f"{t}.bzz").write_bytes(bzz)
    verses = corpus.read_sword_ztext(folder)
    got = [(v.book, v.chapter, v.verse, v.text) for v in verses]
    assert got == [("Gen", 1, 1, "In the beginning."), ("Gen", 1, 3, "God said."), ("Gen", 2, 1, "Thus.")]


def test_rst_to_text_and_python_qa():
    src = "\n".join(
        [
            ":mod:`json` --- JSON",
            "====================",
            "",
            ".. module:: json",
            "   :synopsis: Encode and decode the JSON format.",
            "",
            ".. index:: single: JSON",
            "",
            "Use :func:`dumps` and ``loads``, see `JSON <https://json.org>`_::",
            "",
            "    >>> json.dumps('\\\\')",
            "",
            ".. function:: dumps(obj, \\",
            "                    indent=None)",
            "",
            "   Serialize *obj* to a JSON formatted :class:`str`.",
            "",
            "Usage",
            "-----",
            "",
            ".. note::",
            "   Be careful.",
        ]
    )
    sections = corpus.rst_to_text(src)
    assert [t for t, _ in sections] == ["json --- JSON", "Usage"]
    body = sections[0][1]
    assert "Use dumps and loads, see JSON:" in body and "    >>> json.dumps('\\\\')" in body
    assert "index" not in body and "dumps(obj, indent=None)" in body and "Serialize obj to a JSON" in body
    assert sections[1][1] == "Note:\n   Be careful."
    qa = corpus._python_qa(src)
    assert ("What is the Python module json for?", "json: Encode and decode the JSON format.") in qa
    assert ("What does the Python function json.dumps do?",
            "json.dumps (function): Serialize obj to a JSON formatted str.") in qa  # fmt: skip
