"""Language model: official checkpoint formats v4-v7 against the `rwkv` pip package 0.8.32, plus our own
invariants (chunked prefill, sequence vs token-by-token, batching, long prompts, bf16) and loader errors.

The package runs in subprocesses (it picks its model class from environment variables at import): one
for RWKV-7 (RWKV_V7_ON=1), one for every older version. Checkpoints are random but conditioned like a
trained net (`synthetic_state_dict`, specs §5), so fp32 implementations agree to ~1e-6.
"""

import copy
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from rwkv_mm.core.state import RWKVState
from rwkv_mm.lm.checkpoint import (
    RWKVConfig,
    expected_shapes,
    load_checkpoint,
    load_state_file,
    synthetic_state_dict,
)
from rwkv_mm.lm.checkpoint import (
    main as checkpoint_main,
)
from rwkv_mm.lm.compat import state_from_package
from rwkv_mm.lm.model import RWKVLM
from tests import rwkv_package

torch.set_num_threads(1)

C, V, T = 128, 256, 24  # width, vocab, tokens per parity sequence
CONFIGS = {
    "v4": RWKVConfig("v4", 2, C, V, 4 * C, head_size=0),
    "x050": RWKVConfig("v5", 2, C, V, 448, variant="5.0", bonus_key="time_first"),
    "x051": RWKVConfig("v5", 2, C, V, 448, variant="5.1", bonus_key="time_first"),
    "x052": RWKVConfig("v5", 2, C, V, 448, variant="5.2"),
    "x060": RWKVConfig("v6", 2, C, V, 448, d_mix=32, d_decay=64),
    "x070": RWKVConfig("v7", 2, C, V, 4 * C, d_decay=32, d_aaa=32, d_mv=32, d_gate=32),
}
# state-tuned cases: time_state inside the model file (the package loads it, v5/v6), or in a separate
# state file loaded the way ChatRWKV's RWKV-7 demos do (`time_state.transpose(1, 2)`)
STATE_TUNED = {"x052-state": "x052", "x060-state": "x060", "x070-state": "x070"}
LOGIT_TOL = 1e-4  # max |Δ logits| / std(logits), fp32
STATE_TOL = 1e-4  # max |Δ| / max |ref| per state tensor


PIP_RUNNER = r"""
import copy, sys, torch
torch.set_num_threads(1)
from rwkv.model import RWKV
jobs = torch.load(sys.argv[1])
out = {}
for name, job in jobs.items():
    model = RWKV(job["model"], "cpu fp32")
    init = None
    if job.get("state_file"):  # ChatRWKV demo convention for RWKV-7 state files
        raw = torch.load(job["state_file"])
        C = job["n_embd"]
        init = []
        for i in range(job["n_layer"]):
            s = raw[f"blocks.{i}.att.time_state"].transpose(1, 2).float().contiguous()
            init += [torch.zeros(C), s, torch.zeros(C)]
    toks = job["tokens"]
    logits, st = model.forward(toks, copy.deepcopy(init), full_output=True)
    res = {"seq_logits": logits.float().clone(), "seq_state": [t.clone() for t in st]}
    st = copy.deepcopy(init)
    outs = []
    for t in toks:
        o, st = model.forward([t], st)
        outs.append(o.float().clone())
    res["tok_logits"] = torch.stack(outs)
    res["tok_state"] = [t.clone() for t in st]
    out[name] = res
torch.save(out, sys.argv[2])
"""


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def logit_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |Δ logits| / std(ref)."""
    return ((ours - ref).abs().max() / ref.std()).item()


def state_err(ours: RWKVState, ref: RWKVState) -> float:
    return max(rel(a[n], b[n]) for a, b in zip(ours.layers, ref.layers) for n in a)


def run_ours(model: RWKVLM, tokens: list[int], state: RWKVState | None = None):
    """Whole sequence (all logits) and token by token, from `state`."""
    x = torch.tensor([tokens])
    seq_logits, seq_state = model(x, state, full_output=True)
    tok_logits, st = [], state
    for t in range(x.shape[1]):
        out, st = model(x[:, t : t + 1], st)
        tok_logits.append(out)
    return seq_logits[0], seq_state, torch.cat(tok_logits), st


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Synthetic checkpoints of every format (and state-tuned ones), saved with torch.save."""
    d = tmp_path_factory.mktemp("lm")
    out = {}
    for name, cfg in CONFIGS.items():
        torch.save(synthetic_state_dict(cfg, seed=1), d / f"{name}.pth")
        out[name] = d / f"{name}.pth"
    for name, base in STATE_TUNED.items():
        sd = synthetic_state_dict(CONFIGS[base], seed=2, time_state=True)
        if base == "x070":  # a separate state file next to the plain model
            torch.save({k: v for k, v in sd.items() if "time_state" in k}, d / f"{name}.state.pth")
            sd = {k: v for k, v in sd.items() if "time_state" not in k}
        torch.save(sd, d / f"{name}.pth")
        out[name] = d / f"{name}.pth"
    return out


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def pip_results(files, tokens, tmp_path_factory):
    """The package's logits and states for every checkpoint: two subprocesses run side by side."""
    jobs: dict[str, dict] = {"v7": {}, "old": {}}
    for name, path in files.items():
        base = STATE_TUNED.get(name, name)
        job = {"model": str(path.with_suffix("")), "tokens": tokens}
        if name == "x070-state":
            cfg = CONFIGS[base]
            job.update(state_file=str(path.with_suffix(".state.pth")), n_embd=cfg.n_embd, n_layer=cfg.n_layer)
        jobs["v7" if base == "x070" else "old"][name] = job
    procs = [
        rwkv_package.start(PIP_RUNNER, group_jobs, tmp_path_factory.mktemp(f"pip-{group}"), v7=group == "v7")
        for group, group_jobs in jobs.items()
    ]
    results = {}
    for proc, out in procs:
        results.update(rwkv_package.finish(proc, out, timeout=300))
    return results


def load(files, name: str) -> tuple[RWKVLM, RWKVState | None]:
    model = RWKVLM.from_file(files[name])
    state = None
    if name == "x070-state":
        state = load_state_file(files[name].with_suffix(".state.pth"), model.config)
    return model, state


@pytest.mark.parametrize("name", list(CONFIGS) + list(STATE_TUNED))
def test_parity_with_rwkv_package(name, files, tokens, pip_results):
    model, state = load(files, name)
    version = model.config.version
    ref = pip_results[name]
    seq_logits, seq_state, tok_logits, tok_state = run_ours(model, tokens, state)
    errs = {
        "seq logits": logit_err(seq_logits, ref["seq_logits"]),
        "tok logits": logit_err(tok_logits, ref["tok_logits"]),
        "seq state": state_err(seq_state, state_from_package(ref["seq_state"], version)),
        "tok state": state_err(tok_state, state_from_package(ref["tok_state"], version)),
        "ours seq vs tok": logit_err(seq_logits, tok_logits),
    }
    print(name, {k: f"{v:.1e}" for k, v in errs.items()})
    for k in ("seq logits", "tok logits", "ours seq vs tok"):
        assert errs[k] <= LOGIT_TOL, (k, errs[k])
    for k in ("seq state", "tok state"):
        assert errs[k] <= STATE_TOL, (k, errs[k])
    if version in ("v5", "v6"):  # the package's CPU layout really is [key, value]: untransposed it differs
        raw = state_from_package(ref["seq_state"], "v7")
        assert rel(seq_state.layers[0]["wkv"], raw.layers[0]["wkv"]) > 0.1


def test_state_tuned_initial_state(files):
    """A time_state in the model file becomes the initial state (the package's behaviour); v7 files are
    [H, key, value] and are transposed to the canonical [H, value, key]."""
    model = RWKVLM.from_file(files["x060-state"])
    raw = torch.load(files["x060-state"], weights_only=True)
    s0 = model.init_state(batch_size=3)
    assert s0.batch_size == 3
    assert torch.equal(s0.layers[1]["wkv"][2], raw["blocks.1.att.time_state"].float())
    cfg = CONFIGS["x070"]
    s7 = load_state_file(files["x070-state"].with_suffix(".state.pth"), cfg)
    raw7 = torch.load(files["x070-state"].with_suffix(".state.pth"), weights_only=True)
    assert torch.equal(s7.layers[0]["wkv"][0], raw7["blocks.0.att.time_state"].transpose(1, 2))
    with pytest.raises(ValueError, match="holds 2 layers of time_state, the model has 3"):
        load_state_file(files["x070-state"].with_suffix(".state.pth"), dataclasses.replace(cfg, n_layer=3))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunked_prefill_equals_one_shot(name, files):
    model = RWKVLM.from_file(files[name])
    x = torch.randint(0, V, (1, 45), generator=torch.Generator().manual_seed(3))
    one, s_one = model(x, full_output=True)
    parts, st = [], None
    for a, b in ((0, 7), (7, 20), (20, 21), (21, 45)):
        out, st = model(x[:, a:b], st, full_output=True)
        parts.append(out)
    assert logit_err(torch.cat(parts, 1), one) <= 1e-5
    assert state_err(st, s_one) <= 1e-5


@pytest.mark.parametrize("name", ["v4", "x052", "x060", "x070"])
def test_batch_equals_each_alone(name, files):
    """Two different sequences with their own states, run as a batch, give what each gives alone."""
    model = RWKVLM.from_file(files[name])
    g = torch.Generator().manual_seed(4)
    prefixes = [torch.randint(0, V, (1, n), generator=g) for n in (5, 11)]
    states = [model(p)[1] for p in prefixes]
    x = torch.randint(0, V, (2, 9), generator=g)
    batch_state = RWKVState.concat(states)
    before = batch_state.clone()
    for steps in (x, x[:, :1]):  # prefill, then one decode step
        logits, new = model(steps, batch_state, full_output=True)
        assert batch_state.equal(before), "the caller's state was modified"
        for i in range(2):
            alone, alone_state = model(steps[i : i + 1], states[i], full_output=True)
            assert logit_err(logits[i : i + 1], alone) <= 1e-5
            assert state_err(new.select([i]), alone_state) <= 1e-5


def test_long_prompt_in_chunks(tmp_path):
    """100,000 tokens fed in chunks: constant-size state, finite logits."""
    cfg = RWKVConfig("v7", 1, 64, V, 256, d_decay=16, d_aaa=16, d_mv=16, d_gate=16)
    torch.save(synthetic_state_dict(cfg), tmp_path / "tiny.pth")
    model = RWKVLM.from_file(tmp_path / "tiny.pth")
    x = torch.randint(0, V, (1, 100_000), generator=torch.Generator().manual_seed(5))
    state, sizes = None, set()
    for i in range(0, x.shape[1], 4096):
        logits, state = model(x[:, i : i + 4096], state)
        sizes.add(tuple((n, tuple(t.shape)) for layer in state.layers for n, t in layer.items()))
    assert len(sizes) == 1
    assert torch.isfinite(logits).all() and all(torch.isfinite(t).all() for t in state.layers[0].values())


@pytest.mark.parametrize("name", ["x060", "x070"])
def test_bf16(name, files, tmp_path):
    """A bf16 checkpoint loads as stored (no float32 copy) and runs in bf16 with float32 WKV states."""
    sd = synthetic_state_dict(CONFIGS[name], seed=1, dtype=torch.bfloat16)
    torch.save(sd, tmp_path / "bf16.pth")
    assert all(t.dtype == torch.bfloat16 for t in load_checkpoint(tmp_path / "bf16.pth").tensors.values())
    model = RWKVLM.from_file(tmp_path / "bf16.pth", dtype=torch.bfloat16)
    assert model.blocks[1].att.key.weight.dtype == torch.bfloat16
    ref = RWKVLM.from_file(tmp_path / "bf16.pth")  # the same weights in float32
    x = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(6))
    logits, state = model(x)
    assert logits.dtype == torch.float32 and state.layers[0]["wkv"].dtype == torch.float32
    assert state.layers[0]["att_shift"].dtype == torch.bfloat16
    assert logit_err(logits, ref(x)[0]) <= 0.05  # measured ~2e-2 (the package's 'cpu bf16': 3e-2)
    logits, state = model(x[:, :1], state)  # decode step
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameters_match_checkpoint_keys(name):
    cfg = CONFIGS[name]
    with torch.device("meta"):
        model = RWKVLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected_shapes(cfg)


def test_version_detection_ignores_key_order(tmp_path):
    """The package needs 2+ layers to detect 5.2 (it reads keys in order); we do not."""
    cfg = RWKVConfig("v5", 1, C, V, 448, variant="5.2")
    sd = synthetic_state_dict(cfg)
    torch.save(dict(reversed(sd.items())), tmp_path / "one.pth")
    assert load_checkpoint(tmp_path / "one.pth").config == cfg


def test_convert_cli_and_folder(files, tmp_path, capsys):
    src = files["x070"]
    assert checkpoint_main(["info", str(src)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["name"], info["n_layer"], info["head_size"], info["d_mv"]) == ("x070", 2, 64, 32)
    folder = tmp_path / "asset"
    folder.mkdir()
    assert checkpoint_main(["convert", str(src), str(folder / "model.safetensors")]) == 0
    x = torch.randint(0, V, (1, 10), generator=torch.Generator().manual_seed(7))
    ref = RWKVLM.from_file(src)(x)[0]
    assert torch.equal(RWKVLM.from_file(folder / "model.safetensors")(x)[0], ref)
    (folder / "config.json").write_text(json.dumps({"architecture": "rwkv7", "tokenizer": "world"}))
    model = RWKVLM.from_file(folder)
    assert torch.equal(model(x)[0], ref)
    assert model.default_tokenizer().name == "world"
    assert checkpoint_main(["info", str(tmp_path / "missing.pth")]) == 1


@pytest.mark.parametrize(
    "vocab, name", [(65536, "world"), (50277, "20b"), (50304, "20b"), (256, "bytes"), (257, "bytes")]
)
def test_default_tokenizer_follows_the_vocabulary_size(vocab, name):
    tok = RWKVLM(RWKVConfig("v7", 1, 64, vocab, 256)).default_tokenizer()
    assert tok.name == name and tok.vocab_size >= min(vocab, 257)


def test_no_default_tokenizer_for_an_unknown_vocabulary():
    with pytest.raises(ValueError, match="no known tokenizer has a vocabulary of 1000 ids"):
        RWKVLM(RWKVConfig("v7", 1, 64, 1000, 256)).default_tokenizer()


class Evil:
    """Pickles into a call of os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bad_file(kind: str, tmp_path: Path) -> Path:
    sd = synthetic_state_dict(CONFIGS["x060"])
    path = tmp_path / f"{kind}.pth"
    if kind == "truncated":
        torch.save(sd, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "missing key":
        del sd["blocks.1.att.key.weight"]
        torch.save(sd, path)
    elif kind == "wrong shape":
        sd["blocks.1.ffn.value.weight"] = torch.zeros(C, 100)
        torch.save(sd, path)
    elif kind == "unexpected key":
        sd["blocks.0.att.mystery"] = torch.zeros(3)
        torch.save(sd, path)
    elif kind == "unknown layout":
        torch.save({"emb.weight": torch.zeros(V, C), "blocks.0.foo": torch.zeros(3)}, path)
    elif kind == "not a state dict":
        torch.save([torch.zeros(3)], path)
    elif kind == "malicious pickle":
        torch.save({"emb.weight": Evil(tmp_path / "PWNED")}, path)
    elif kind == "corrupt safetensors":
        path = tmp_path / "bad.safetensors"
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("truncated", r"truncated\.pth: not a readable PyTorch checkpoint \(truncated or corrupt\?\)"),
        ("missing key", r"missing key 'blocks\.1\.att\.key\.weight' \(expected shape \[128, 128\]"),
        ("wrong shape", r"key 'blocks\.1\.ffn\.value\.weight' has shape \[128, 100\], expected \[128, 448\]"),
        ("unexpected key", r"unexpected keys for a x060 checkpoint: \['blocks\.0\.att\.mystery'\]"),
        ("unknown layout", r"unknown layout"),
        ("not a state dict", r"expected a flat dict of tensors"),
        ("malicious pickle", r"refused: its pickle needs code to run to load .* not executed"),
        ("corrupt safetensors", r"bad\.safetensors: not a readable safetensors file"),
    ],
)
def test_bad_files(kind, message, tmp_path):
    path = bad_file(kind, tmp_path)
    with pytest.raises(ValueError, match=message) as info:
        RWKVLM.from_file(path)
    assert path.name in str(info.value)
    assert not (tmp_path / "PWNED").exists(), "the pickle's code ran"


def test_forward_rejects_mismatched_state(files):
    model = RWKVLM.from_file(files["x070"])
    x = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="state has batch size 1, tokens have 2"):
        model(x, model.init_state(1))
    with pytest.raises(ValueError, match="2-layer v6 state, the model needs a 2-layer v7 state"):
        model(x, RWKVState.zeros("v6", 2, 2, C))
    with pytest.raises(ValueError, match=r"tokens must be \[B, T\]"):
        model(torch.zeros(3, dtype=torch.long))
    # a state is reusable: the same call twice gives the same result
    _, s = model(x)
    assert torch.equal(model(x[:, :1], s)[0], model(x[:, :1], copy.deepcopy(s))[0])
