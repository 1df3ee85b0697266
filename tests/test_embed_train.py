"""Embedder training and data: a tiny resumable run on synthetic data, export, metrics, corpus parsers."""

from __future__ import annotations

import csv
import struct
import zlib

import numpy as np
import pytest
import torch

from rwkv_mm.embed import Embedder, corpus
from rwkv_mm.embed.evaluate import retrieval, spearman
from rwkv_mm.embed.train import TrainConfig, choose_pooling, export, fit

WORDS = "cat dog sun rain tree river stone bird fish light dark cold warm red blue green".split()


@pytest.fixture()
def data_dir(tmp_path):
    """sentences.tsv + teacher.npy (random unit vectors) + pairs.tsv + heldout.tsv, 96 sentences."""
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(2, 9))) + f" {i}" for i in range(96)]
    (tmp_path / "sentences.tsv").write_text("".join(f"syn\t{t}\n" for t in texts))
    t = rng.normal(size=(96, 384)).astype(np.float32)
    np.save(tmp_path / "teacher.npy", (t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float16))
    (tmp_path / "pairs.tsv").write_text(
        "".join(f"wordnet\t{texts[i]}\t{texts[i + 1]}\n" for i in range(0, 90, 2))
    )
    (tmp_path / "heldout.tsv").write_text(
        "".join(f"n:{i}\tw{i}\tdef {WORDS[i]}\tex {WORDS[i]}\n" for i in range(16))
    )
    return tmp_path


def _cfg(data_dir, **kw) -> TrainConfig:
    args = dict(data=str(data_dir), tokenizer="bytes", size="tiny", steps=6, batch_size=16, pair_every=3,
                warmup=2, eval_every=3, save_every=2, vocab_size=257)  # fmt: skip
    args.update(kw)
    return TrainConfig(**args)


def test_fit_resume_export(data_dir, tmp_path):
    run = tmp_path / "run"
    torch.manual_seed(0)
    assert fit(run, _cfg(data_dir, steps=4)) is True
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["step"] == 4
    # resuming with more steps continues from the checkpoint (the run's train.json is kept: extend it)
    cfg_file = run / "train.json"
    cfg_file.write_text(cfg_file.read_text().replace('"steps": 4', '"steps": 6'))
    assert fit(run) is True
    assert torch.load(run / "last.pt", weights_only=False)["step"] == 6
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [int(r["step"]) for r in evals] == [3, 4, 6]
    assert all(r["wn_dev_r1_state"] for r in evals)
    emb, scores = export(run, tmp_path / "exported", pooling="mean")
    assert emb.pooling == "mean" and "wn_dev_r1_state" in scores
    loaded = Embedder.load(tmp_path / "exported")
    assert loaded.pooling == "mean" and loaded.encode(["a red cat"]).shape == (1, 384)


def test_fit_stops_on_time_budget(data_dir, tmp_path):
    assert fit(tmp_path / "r", _cfg(data_dir, steps=10_000), max_minutes=0.0) is False
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=False)["step"] == 0


def test_choose_pooling_margin():
    assert choose_pooling({"stsb_dev_state": 0.70, "stsb_dev_mean": 0.709, "stsb_dev_eos": 0.6}) == "state"
    assert choose_pooling({"stsb_dev_state": 0.70, "stsb_dev_mean": 0.72, "stsb_dev_eos": 0.6}) == "mean"


def test_metrics():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        0.9486833
    )
    e = np.eye(4, dtype=np.float32)
    r = retrieval(e, e[[0, 1, 3, 2]])
    assert r["R@1"] == 0.5 and r["MRR"] == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)  # two swapped: rank 2


def test_wordnet_parsing(tmp_path):
    folder = tmp_path / "usr/share/wordnet"
    folder.mkdir(parents=True)
    header = "  1 This software and database is being provided to you, the LICENSEE, by\n"
    line = (
        "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 @ 02083346 n 0000 | a member of the "
        'genus Canis; "the dog barked all night"; "a good dog"  \n'
    )
    (folder / "data.noun").write_text(header + line)
    for pos in ("verb", "adj", "adv"):
        (folder / f"data.{pos}").write_text(header)
    (s,) = corpus.read_wordnet(tmp_path)
    assert s.id == "noun:02084071"
    assert s.lemmas == ["dog", "domestic dog", "Canis familiaris"]
    assert s.definition == "a member of the genus Canis"
    assert s.examples == ["the dog barked all night", "a good dog"]


def _ztext(prefix, entries: list[str]) -> None:
    """Write a one-block SWORD zText testament (.bzs / .bzv / .bzz) holding `entries`."""
    raw = b"".join(e.encode() for e in entries)
    comp = zlib.compress(raw)
    prefix.with_suffix(".bzz").write_bytes(comp)
    prefix.with_suffix(".bzs").write_bytes(struct.pack("<III", 0, len(comp), len(raw)))
    index, offset = b"", 0
    for e in entries:
        index += struct.pack("<IIH", 0, offset, len(e.encode()))
        offset += len(e.encode())
    prefix.with_suffix(".bzv").write_bytes(index)


def test_web_parsing(tmp_path):
    folder = tmp_path / "usr/share/sword/modules/texts/ztext/engweb"
    folder.mkdir(parents=True)
    ot = [
        "",
        "<milestone/>",
        '<div osisID="Gen" sID="g1" type="book"/><title>Genesis</title>',
        '<chapter n="1" osisID="Gen.1" sID="Gen.1"/>',
        '<w lemma="x">In</w> the beginning<note placement="foot">a note</note>, God created.',
        "",
        "Light &amp; dark.",
    ]
    nt = [
        "",
        "",
        '<div osisID="Matt" sID="g2" type="book"/>',
        '<chapter osisID="Matt.1" sID="Matt.1"/>',
        "Book.",
    ]
    _ztext(folder / "ot", ot)
    _ztext(folder / "nt", nt)
    verses = corpus.read_web(tmp_path)
    assert verses == {
        "Gen.1.1": "In the beginning , God created.",
        "Gen.1.3": "Light & dark.",
        "Matt.1.1": "Book.",
    }


def test_sentence_split():
    text = "The first sentence is here. Then a second one follows! X = 1 + 2 * 3 / 4. Short."
    assert corpus.split_sentences(text) == ["The first sentence is here.", "Then a second one follows!"]
