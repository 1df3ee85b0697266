"""`rwkv_mm.lm.compat` against the `rwkv` pip package 0.8.32 it imitates.

The package's README snippet (`RWKV(model=..., strategy="cpu fp32")`, `PIPELINE(model,
"rwkv_vocab_v20230424")`, `pipeline.generate(...)`) runs in a subprocess on a synthetic RWKV-7 checkpoint
with the World vocabulary (2 layers x 64 wide), and the same calls through rwkv_mm must give the same
logits, states, tokens and text. A second subprocess (no RWKV_V7_ON) checks the state lists of RWKV-6 and
RWKV-4 and the package's layer plan for strategy strings.
"""

import copy
import re

import numpy as np
import pytest
import torch

from rwkv_mm.lm.checkpoint import RWKVConfig, synthetic_state_dict
from rwkv_mm.lm.compat import (
    PIPELINE,
    PIPELINE_ARGS,
    RWKV,
    Placement,
    check_devices,
    parse_strategy,
    state_from_package,
    state_to_package,
)
from rwkv_mm.lm.model import RWKVLM
from tests import rwkv_package

torch.set_num_threads(1)

X070 = RWKVConfig("v7", 2, 64, 65536, 256, d_decay=16, d_aaa=16, d_mv=16, d_gate=16)
OLD = {
    "x060": RWKVConfig("v6", 2, 64, 256, 224, d_mix=16, d_decay=16),
    "v4": RWKVConfig("v4", 2, 64, 256, 256, head_size=0),
}
PLAN_LAYERS = 4  # layers of the model the package plans strategies for
PLAN_STRATEGIES = [
    "cpu fp32",
    "cpu bf16",
    "cpu fp32i8",
    "cpu fp32 *2 -> cpu bf16",
    "cpu fp32 -> cpu bf16",
    "cpu fp32 -> cpu bf16 -> cpu fp32i8",
    "cpu fp32 *1 -> cpu bf16 *1 -> cpu fp32i8",
    "cpu fp32 *1 -> cpu bf16 -> cpu fp32i8 *1",
    "cpu fp32 *9 -> cpu bf16",
    "cpu fp32i8 *3 -> cpu fp32",
]
CTX = "User: Tell me about the sea.\n\nAssistant:"
GEN_TOKENS = 24
SEED = 1234
LOGIT_TOL = 1e-4  # max |Δ logits| / std(logits), fp32 (test_lm_parity.py)
STATE_TOL = 1e-4  # max |Δ| / max |ref| per state tensor


# what users run (the package README), plus forward calls with states; results saved for the test
V7_RUNNER = r"""
import copy, sys, numpy as np, torch
torch.set_num_threads(1)
from rwkv.model import RWKV
from rwkv.utils import PIPELINE, PIPELINE_ARGS
job = torch.load(sys.argv[1])
out = {}
model = RWKV(model=job["model"], strategy="cpu fp32")
pipeline = PIPELINE(model, "rwkv_vocab_v20230424")
tokens = pipeline.encode(job["ctx"])
out["tokens"] = tokens
logits, state = model.forward(tokens, None, full_output=True)
out["seq_logits"], out["seq_state"] = logits.clone(), [t.clone() for t in state]
logits, state = model.forward([tokens[-1]], copy.deepcopy(out["seq_state"]))  # one-token path
out["one_logits"], out["one_state"] = logits.clone(), [t.clone() for t in state]
for name, kw in job["generate"].items():
    np.random.seed(job["seed"])
    pieces = []
    text = pipeline.generate(job["ctx"], token_count=job["count"], args=PIPELINE_ARGS(**kw),
                             callback=pieces.append)
    out["gen_" + name] = (text, pieces)
bf16 = RWKV(model=job["model"], strategy="cpu bf16")
out["bf16_logits"] = bf16.forward(tokens, None)[0].clone()
torch.save(out, sys.argv[2])
"""

OLD_RUNNER = r"""
import copy, sys, torch
torch.set_num_threads(1)
from rwkv.model import RWKV
job = torch.load(sys.argv[1])
out = {}
for name, path in job["models"].items():
    model = RWKV(path, "cpu fp32", verbose=False)
    logits, state = model.forward(job["tokens"], None)
    res = {"logits": logits.clone(), "state": [t.clone() for t in state]}
    logits, state = model.forward([job["tokens"][0]], copy.deepcopy(res["state"]))
    res["one_logits"], res["one_state"] = logits.clone(), [t.clone() for t in state]
    out[name] = res
plans = {}
for s in job["strategies"]:
    model = RWKV(job["plan_model"], s, verbose=False)
    plans[s] = [(str(d.device), d.atype, d.wtype == torch.uint8, d.stream) for d in model.strategy]
out["plans"] = plans
torch.save(out, sys.argv[2])
"""

GENERATE = {  # PIPELINE_ARGS of the generate calls compared with the package
    "greedy": dict(temperature=0, alpha_frequency=0.0, alpha_presence=0.0),
    "greedy_penalties": dict(
        top_p=0.0, alpha_frequency=0.5, alpha_presence=0.7, alpha_decay=0.9, token_ban=[0, 33]
    ),
    "sampled": dict(temperature=0.8, top_p=0.85, top_k=300, chunk_len=5),
}


def logit_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |Δ logits| / std(ref)."""
    ours, ref = ours.float(), ref.float()
    return ((ours - ref).abs().max() / ref.std()).item()


def list_err(ours: list, ref: list) -> float:
    """max over the state tensors of max |Δ| / max |ref|."""
    assert len(ours) == len(ref)
    errs = []
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        errs.append(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item())
    return max(errs)


@pytest.fixture(scope="module")
def x070_path(tmp_path_factory):
    """A synthetic RWKV-7 checkpoint with the World vocabulary, saved as model.pth."""
    path = tmp_path_factory.mktemp("x070") / "model.pth"
    torch.save(synthetic_state_dict(X070, seed=1), path)
    return path


@pytest.fixture(scope="module")
def old_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("old")
    out = {}
    for name, cfg in OLD.items():
        torch.save(synthetic_state_dict(cfg, seed=2), d / f"{name}.pth")
        out[name] = d / f"{name}.pth"
    cfg = RWKVConfig("v4", PLAN_LAYERS, 32, 64, 128, head_size=0)
    torch.save(synthetic_state_dict(cfg, seed=3), d / "plan.pth")
    out["plan"] = d / "plan.pth"
    return out


@pytest.fixture(scope="module")
def pkg_v7(x070_path, tmp_path_factory):
    """The package's results for the README calls (RWKV_V7_ON=1)."""
    job = {
        "model": str(x070_path.with_suffix("")),
        "ctx": CTX,
        "generate": GENERATE,
        "count": GEN_TOKENS,
        "seed": SEED,
    }
    return rwkv_package.run(V7_RUNNER, job, tmp_path_factory.mktemp("pkg7"), v7=True)


@pytest.fixture(scope="module")
def pkg_old(old_paths, tmp_path_factory):
    """The package's RWKV-6 / RWKV-4 forward results and its layer plans (RWKV_V7_ON unset)."""
    job = {
        "models": {name: str(old_paths[name]) for name in OLD},
        "tokens": torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(5)).tolist(),
        "plan_model": str(old_paths["plan"].with_suffix("")),
        "strategies": PLAN_STRATEGIES,
    }
    out = rwkv_package.run(OLD_RUNNER, job, tmp_path_factory.mktemp("pkgold"), v7=False)
    out["tokens"] = job["tokens"]
    return out


@pytest.fixture(scope="module")
def model(x070_path):
    return RWKV(model=str(x070_path.with_suffix("")), strategy="cpu fp32")


# ----------------------------------------------------------------------------------------------------------
# RWKV-7 through the README calls


def test_forward_matches_package(model, pkg_v7):
    tokens = pkg_v7["tokens"]
    assert PIPELINE(model, "rwkv_vocab_v20230424").encode(CTX) == tokens
    logits, state = model.forward(tokens, None, full_output=True)
    assert logits.shape == pkg_v7["seq_logits"].shape == (len(tokens), X070.vocab_size)
    assert logit_err(logits, pkg_v7["seq_logits"]) <= LOGIT_TOL
    assert list_err(state, pkg_v7["seq_state"]) <= STATE_TOL
    # continue from the package's own state: the state lists are interchangeable
    logits, state = model.forward([tokens[-1]], pkg_v7["seq_state"])
    assert logits.shape == (X070.vocab_size,)
    assert logit_err(logits, pkg_v7["one_logits"]) <= LOGIT_TOL
    assert list_err(state, pkg_v7["one_state"]) <= STATE_TOL


def test_forward_accepts_a_bare_int_and_a_tensor(model, pkg_v7):
    _, state = model.forward(pkg_v7["tokens"], None)
    last = pkg_v7["tokens"][-1]
    ref = model.forward([last], state)[0]
    assert torch.equal(model.forward(last, state)[0], ref)
    assert torch.equal(model.forward(torch.tensor([last]), state)[0], ref)


def test_callers_state_is_not_modified(model, pkg_v7):
    state = [t.clone() for t in pkg_v7["seq_state"]]
    before = copy.deepcopy(state)
    _, new = model.forward(pkg_v7["tokens"][:3], state)
    _, new = model.forward([5], state)
    assert all(torch.equal(a, b) for a, b in zip(state, before)), "forward modified the caller's state"
    assert not all(torch.equal(a, b) for a, b in zip(new, before))
    pipeline = PIPELINE(model, "rwkv_vocab_v20230424")
    pipeline.generate("Hi", token_count=3, args=PIPELINE_ARGS(temperature=0), state=state)
    assert all(torch.equal(a, b) for a, b in zip(state, before)), "generate modified the caller's state"


@pytest.mark.parametrize("name", list(GENERATE))
def test_generate_matches_package(name, model, pkg_v7):
    """Greedy (temperature 0 / top_p 0, with penalties and bans) and seeded sampling give the package's
    text and callback pieces: the sampler draws from numpy's global generator as the package does."""
    pipeline = PIPELINE(model, "rwkv_vocab_v20230424")
    np.random.seed(SEED)
    pieces = []
    text = pipeline.generate(
        CTX, token_count=GEN_TOKENS, args=PIPELINE_ARGS(**GENERATE[name]), callback=pieces.append
    )
    ref_text, ref_pieces = pkg_v7["gen_" + name]
    assert len(ref_text) > 0
    assert text == ref_text
    assert pieces == ref_pieces


def test_generate_stops_and_bans(model):
    """token_stop ends the text before the stop token; banned tokens never appear."""
    pipeline = PIPELINE(model, "rwkv_vocab_v20230424")
    greedy = PIPELINE_ARGS(temperature=0, alpha_frequency=0, alpha_presence=0)
    full = pipeline.generate(CTX, token_count=12, args=greedy)
    ids = pipeline.encode(full)
    k = len(ids) // 2
    stop = copy.copy(greedy)
    stop.token_stop = [ids[k]]
    assert pipeline.encode(pipeline.generate(CTX, token_count=12, args=stop)) == ids[: ids.index(ids[k])]
    banned = copy.copy(greedy)
    banned.token_ban = list(set(ids))
    out = pipeline.encode(pipeline.generate(CTX, token_count=12, args=banned))
    assert out and not set(out) & set(ids)


def test_bf16_strategy(x070_path, model, pkg_v7):
    """'cpu bf16' runs in bf16 and returns bf16 logits (v7, as the package) close to the package's."""
    bf16 = RWKV(model=str(x070_path), strategy="cpu bf16")
    logits, state = bf16.forward(pkg_v7["tokens"], None)
    assert logits.dtype == pkg_v7["bf16_logits"].dtype == torch.bfloat16
    assert state[0].dtype == torch.bfloat16 and state[1].dtype == torch.float32
    fp32 = model.forward(pkg_v7["tokens"], None)[0]
    ours, theirs = logit_err(logits, fp32), logit_err(pkg_v7["bf16_logits"], fp32)
    assert ours <= max(2 * theirs, 0.02), (ours, theirs)


def test_int8_strategy(x070_path, model, pkg_v7):
    """'cpu fp32i8' and its alias 'cpu int8': int8 weights (rwkv_mm.lm.quant), logits close to fp32 in
    the sequence and the one-token paths; i8 with other activation dtypes and i4 are refused."""
    from rwkv_mm.lm.quant import QuantLinear

    tokens = pkg_v7["tokens"]
    fp32, state = model.forward(tokens, None)
    fp32_one = model.forward([tokens[0]], state)[0]
    for s in ("cpu fp32i8", "cpu int8"):
        q = RWKV(model=str(x070_path), strategy=s)
        assert isinstance(q.lm.blocks[1].att.key, QuantLinear) and isinstance(q.lm.head, QuantLinear)
        logits, q_state = q.forward(tokens, None)
        assert logits.dtype == torch.float32
        assert 0 < logit_err(logits, fp32) <= 0.1
        assert 0 < logit_err(q.forward([tokens[0]], q_state)[0], fp32_one) <= 0.1
    for s in ("cpu bf16i8", "cpu fp32i4"):
        with pytest.raises(NotImplementedError, match=f"'{s}': rwkv_mm quantizes weights to i8 with fp32"):
            RWKV(model=str(x070_path), strategy=s)


def test_model_path_handling(x070_path, tmp_path):
    """As the package: '.pth' is appended when missing; unlike RWKV-7's loader, a '.pth' path works too."""
    a = RWKV(model=str(x070_path.with_suffix("")), verbose=False)
    b = RWKV(model=f"  {x070_path}  ")
    assert a.args.MODEL_NAME == b.args.MODEL_NAME == str(x070_path)
    assert (a.version, a.args.n_layer, a.args.n_embd, a.args.vocab_size) == (7, 2, 64, 65536)
    with pytest.raises(FileNotFoundError, match=r"no model at '.*nothere' nor at '.*nothere\.pth'"):
        RWKV(model=str(tmp_path / "nothere"))


def test_pipeline_accepts_an_rwkvlm_and_20b(x070_path):
    lm = RWKVLM.from_file(x070_path)
    pipeline = PIPELINE(lm, "20B_tokenizer.json")
    assert pipeline.tokenizer.name == "20b"
    assert pipeline.decode(pipeline.encode("Hello world")) == "Hello world"
    assert isinstance(pipeline.model, RWKV) and pipeline.model.lm is lm
    with pytest.raises(ValueError, match="unknown tokenizer 'cl100k_base'"):
        PIPELINE(lm, "cl100k_base")


def test_decode_signals_incomplete_utf8(model):
    pipeline = PIPELINE(model, "rwkv_vocab_v20230424")
    ids = pipeline.encode("你好")
    first = pipeline.tokenizer.encode_bytes("你".encode()[:1])
    assert pipeline.decode(ids) == "你好"
    assert pipeline.decode(first) == "\ufffd"
    assert pipeline.decode([0]) == "\ufffd"  # the package's World decoder has no text for id 0
    assert pipeline.refine_context("  a \r\n\n\u3000b\u3000 \n\n") == "\na\nb"


def test_forward_errors(model):
    with pytest.raises(ValueError, match="at least one token"):
        model.forward([], None)
    with pytest.raises(ValueError, match=r"token ids must be ints in \[0, 65536\), got 65536"):
        model.forward([1, 65536], None)
    state = model.generate_zero_state()
    with pytest.raises(
        ValueError, match=r"state must be a list of 6 tensors for this x070 model \(3 per layer\), got 5"
    ):
        model.forward([1], state[:5])
    state[1] = torch.zeros(2, 64, 64)
    with pytest.raises(ValueError, match=r"state\[1\] must have shape \[1, 64, 64\], got \[2, 64, 64\]"):
        model.forward([1], state)


# ----------------------------------------------------------------------------------------------------------
# older versions: state lists


@pytest.mark.parametrize("name", list(OLD))
def test_old_versions_state_lists(name, old_paths, pkg_old):
    """RWKV-6 keeps S as [H, key, value] in the package's lists, RWKV-4 five vectors per layer: ours match,
    and a state from the package continues correctly in ours."""
    ref = pkg_old[name]
    model = RWKV(model=str(old_paths[name]))
    logits, state = model.forward(pkg_old["tokens"], None)
    assert logit_err(logits, ref["logits"]) <= LOGIT_TOL
    assert list_err(state, ref["state"]) <= STATE_TOL
    logits, state = model.forward([pkg_old["tokens"][0]], ref["state"])
    assert logit_err(logits, ref["one_logits"]) <= LOGIT_TOL
    assert list_err(state, ref["one_state"]) <= STATE_TOL


@pytest.mark.parametrize("version", ["v5", "v6", "v7"])
def test_state_list_round_trip(version):
    """state_to_package inverts state_from_package; v5 / v6 transpose the matrix state, v7 does not."""
    g = torch.Generator().manual_seed(0)
    lst = [
        torch.randn(64, generator=g),
        torch.randn(1, 64, 64, generator=g),
        torch.randn(64, generator=g),
    ] * 2
    ours = state_from_package(lst, version)
    wkv = ours.layers[0]["wkv"][0]
    assert torch.equal(wkv, lst[1].transpose(1, 2) if version != "v7" else lst[1])
    assert all(torch.equal(a, b) for a, b in zip(state_to_package(ours), lst))
    with pytest.raises(ValueError, match=f"a {version} state must be a list of 3 tensors per layer, got 4"):
        state_from_package(lst[:4], version)


# ----------------------------------------------------------------------------------------------------------
# strategies


def test_strategy_plan_matches_package(pkg_old):
    """The per-layer placement of CPU strategies (dtypes and i8 tell the stages apart) is the package's."""
    for s, ref in pkg_old["plans"].items():
        ours = [(p.device, p.dtype, p.quant == "i8", p.stream) for p in parse_strategy(s, PLAN_LAYERS)]
        assert ours == ref, s


def test_strategy_syntax():
    split = parse_strategy("cuda fp16 *10 -> cpu fp32", 12)
    assert len(split) == 13  # 12 blocks + ln_out / head
    assert split[:10] == [Placement("cuda", torch.float16)] * 10
    assert split[10:] == [Placement("cpu", torch.float32)] * 3
    assert (
        parse_strategy("cpu int8", 2)
        == parse_strategy("cpu fp32i8", 2)
        == [Placement("cpu", torch.float32, "i8")] * 3
    )
    assert parse_strategy("cuda:1 int8", 1)[0] == Placement("cuda:1", torch.float32, "i8")
    streamed = parse_strategy("cuda fp16i8 *2+", 4)
    assert [p.stream for p in streamed] == [False, False, True, True, True]
    assert parse_strategy("  cpu   bf16 ->cpu fp32  ", 3) == parse_strategy("cpu bf16 -> cpu fp32", 3)


@pytest.mark.parametrize(
    "strategy, message",
    [
        ("cpu fp64", r"unknown dtype 'fp64'"),
        ("gpu fp16", r"unknown device 'gpu'"),
        ("cpu fp32 *x", r"layer count '\*x' must be '\*N' or '\*N\+'"),
        ("cpu", r"stage 'cpu' must be 'device dtype \[\*N\]'"),
        ("cpu fp32 -> ", r"stage '' must be"),
        ("cuda fp16 *1+ -> cpu fp32 *1+", r"at most one stage can stream"),
    ],
)
def test_strategy_errors(strategy, message):
    with pytest.raises(ValueError, match=re.escape(f"invalid strategy {strategy!r}: ") + message):
        parse_strategy(strategy, 4)


def test_missing_device_is_named(x070_path):
    absent = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    strategy = f"{absent} fp16"
    with pytest.raises(RuntimeError, match=f"strategy '{strategy}' needs device '{absent}', but torch sees"):
        RWKV(model=str(x070_path), strategy=strategy)
    with pytest.raises(RuntimeError, match=f"needs device '{absent}'"):
        check_devices(f"cpu fp32 *1 -> {absent} fp16")


def test_split_strategies_run_only_on_one_setting(x070_path, model, pkg_v7):
    with pytest.raises(
        NotImplementedError, match=r"'cpu fp32 \*1 -> cpu bf16' splits the model over 2 settings"
    ):
        RWKV(model=str(x070_path), strategy="cpu fp32 *1 -> cpu bf16")
    whole = RWKV(model=str(x070_path), strategy="cpu fp32 *5 -> cpu bf16")  # 3 slots: all fp32
    assert torch.equal(whole.forward(pkg_v7["tokens"], None)[0], model.forward(pkg_v7["tokens"], None)[0])
