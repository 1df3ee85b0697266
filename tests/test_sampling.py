"""Sampling: top-p / top-k / temperature against independent numpy computations and seeded draws, penalties
against the `rwkv` pip package's own `PIPELINE.generate` loop, bans, stop strings split across tokens."""

import importlib.util
import random

import numpy as np
import pytest
import torch

from rwkv_mm.lm.sampling import (
    Sampler,
    SamplingParams,
    StopChecker,
    filtered_probs,
    sample_batch,
    sample_logits,
)
from rwkv_mm.lm.tokenizer import load_tokenizer

HAS_RWKV = importlib.util.find_spec("rwkv") is not None
DRAWS = 3000


def _logits(V: int, seed: int, scale: float = 1.5) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * scale


def _reference_kept(logits: torch.Tensor, top_p: float, top_k: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Independent float64 top-p / top-k: (kept ids, their probabilities renormalised)."""
    z = logits.double().numpy()
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    n = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)  # smallest prefix with mass >= top_p
    keep = p >= p[order[n - 1]]
    if top_k:
        keep &= np.isin(np.arange(len(p)), order[:top_k])
    ids = np.flatnonzero(keep)
    return ids, p[ids] / p[ids].sum()


def _draw(logits, n=DRAWS, seed=0, **kw) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return np.array([sample_logits(logits, generator=g, **kw) for _ in range(n)])


def _safe_top_p(logits: torch.Tensor, k: int) -> float:
    """A top_p reached at the k-th most likely token, halfway between the masses of the k-1 and k most
    likely (no rounding ambiguity)."""
    p = np.sort(torch.softmax(logits.double(), -1).numpy())[::-1]
    c = np.concatenate([[0.0], np.cumsum(p)])
    return float((c[k - 1] + c[k]) / 2)


@pytest.mark.parametrize("k", [1, 3, 6], ids=lambda k: f"nucleus{k}")
def test_top_p_keeps_smallest_set_reaching_mass(k):
    logits = _logits(20, seed=k)
    top_p = _safe_top_p(logits, k)
    ids, probs = _reference_kept(logits, top_p)
    assert len(ids) == k
    got = filtered_probs(logits, top_p)
    assert set(torch.nonzero(got).flatten().tolist()) == set(ids.tolist())
    np.testing.assert_allclose((got / got.sum())[ids].double().numpy(), probs, rtol=1e-5)
    draws = _draw(logits, top_p=top_p)
    assert set(np.unique(draws)) == set(ids.tolist())  # every kept token (prob >= ~1%) shows up, no other
    freq = np.array([(draws == i).mean() for i in ids])
    np.testing.assert_allclose(freq, probs, atol=0.035)


def test_top_p_keeps_ties_with_the_cutoff():
    logits = torch.tensor([2.0, 1.0, 1.0, 1.0, -3.0])
    p = torch.softmax(logits.double(), -1)
    top_p = float(p[0] + p[1] / 2)  # reached inside the tie: all three tied tokens stay
    assert set(torch.nonzero(filtered_probs(logits, top_p)).flatten().tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_is_applied_after_filtering(temperature):
    logits = _logits(12, seed=7)
    top_p = _safe_top_p(logits, 4)
    ids, probs = _reference_kept(logits, top_p)
    expected = probs ** (1 / temperature)
    expected /= expected.sum()
    draws = _draw(logits, top_p=top_p, temperature=temperature, seed=1)
    assert set(np.unique(draws)) <= set(ids.tolist())
    freq = np.array([(draws == i).mean() for i in ids])
    np.testing.assert_allclose(freq, expected, atol=0.035)


def test_tiny_temperature_does_not_underflow():
    logits = _logits(65536, seed=3, scale=3.0)
    assert sample_logits(logits, temperature=0.01, top_p=1.0, generator=torch.Generator()) == int(
        logits.argmax()
    )


@pytest.mark.parametrize("seed", range(4))
def test_temperature_zero_and_top_p_zero_are_argmax(seed):
    logits = _logits(300, seed=seed)
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    assert sample_logits(logits, temperature=0.0, generator=g) == int(np.argmax(logits.numpy()))
    assert torch.equal(g.get_state(), before)  # greedy draws nothing
    assert sample_logits(logits, top_p=0.0, generator=g) == int(np.argmax(logits.numpy()))


def test_top_k():
    logits = _logits(40, seed=11, scale=0.3)  # flat: top_p 1 alone would keep everything
    draws = _draw(logits, top_p=1.0, top_k=3)
    assert set(np.unique(draws)) == set(np.argsort(-logits.numpy())[:3].tolist())


def test_top_p_one_keeps_every_token():
    logits = torch.zeros(8)
    assert set(np.unique(_draw(logits, n=600, top_p=1.0))) == set(range(8))


def test_bans_are_never_sampled():
    logits = _logits(10, seed=5, scale=0.5)
    order = np.argsort(-logits.numpy())
    ban = tuple(int(i) for i in order[:2])
    sampler = Sampler(SamplingParams(top_p=1.0, token_ban=ban, seed=0))
    draws = [sampler(logits) for _ in range(1000)]
    assert not set(draws) & set(ban)
    assert len(set(draws)) == 8
    greedy = Sampler(SamplingParams(temperature=0, token_ban=ban))
    assert greedy(logits) == int(order[2])
    everything = Sampler(SamplingParams(token_ban=tuple(range(10))))
    with pytest.raises(ValueError, match="banned"):
        everything(logits)


def _reference_penalty_loop(steps, presence, frequency, decay, text_of, ban=()):
    """The package's generate() loop at temperature 0, re-written: [(token, penalised logits)]."""
    occurrence, out = {}, []
    for logits in steps:
        z = logits.double().numpy().copy()
        z[list(ban)] = -np.inf
        for n, c in occurrence.items():
            z[n] -= presence + c * frequency
        token = int(np.argmax(z))
        out.append((token, z))
        for n in occurrence:
            occurrence[n] *= decay
        www = 0 if text_of(token) in " \t0123456789" else 1
        occurrence[token] = occurrence.get(token, 0) + www
    return out


def test_penalties_match_an_independent_recomputation():
    tok = load_tokenizer("bytes")
    V, n = 257, 60
    favourites = [33, 50, 98, 99, 100, 101, 102]  # " ", "1" (penalty weight 0), "a".."e"
    g = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(n):
        z = torch.full((V,), -20.0)
        z[favourites] = torch.randn(len(favourites), generator=g) * 0.3
        steps.append(z)
    params = SamplingParams(
        temperature=0, alpha_presence=0.3, alpha_frequency=0.4, alpha_decay=0.9, token_ban=(99,)
    )
    sampler = Sampler.for_tokenizer(params, tok)
    ref = _reference_penalty_loop(steps, 0.3, 0.4, 0.9, lambda t: tok.decode([t]), ban=(99,))
    tokens = []
    for z, (ref_token, ref_z) in zip(steps, ref, strict=True):
        penalised = sampler.penalized(z)
        np.testing.assert_allclose(penalised.double().numpy(), ref_z, rtol=1e-6, atol=1e-5)
        tokens.append(sampler(z))
        assert tokens[-1] == ref_token
    assert len(set(tokens)) >= 4  # penalties rotate the greedy choice among the favourites
    assert 33 in tokens and 50 in tokens  # weight-0 tokens get the presence penalty only
    sampler.reset()  # penalties restart: only the ban is left
    expected = steps[0].clone()
    expected[99] = -float("inf")
    assert torch.equal(sampler.penalized(steps[0]), expected)


@pytest.mark.skipif(not HAS_RWKV, reason="the rwkv pip package (0.8.32, a dev dependency) is not installed")
def test_penalties_match_the_rwkv_package_generate():
    """The package's own PIPELINE.generate (temperature 0) on scripted logits picks the same tokens."""
    from rwkv.utils import PIPELINE, PIPELINE_ARGS

    world = load_tokenizer("world")
    candidates = [33, 50, 11, 24281, 5585, 41693, 59, 295]  # " ", "1", "\n", and some words
    g = torch.Generator().manual_seed(1)
    steps = []
    for _ in range(40):
        z = torch.full((65536,), -30.0)
        z[candidates] = torch.randn(len(candidates), generator=g) * 0.4
        steps.append(z)

    class Scripted:  # the package's model interface: forward(tokens, state) -> (logits [V], state)
        def __init__(self):
            self.fed = []

        def forward(self, tokens, state):
            self.fed.append(list(tokens))
            step = 0 if state is None else state + 1
            return steps[step].clone(), step

    model = Scripted()
    args = PIPELINE_ARGS(
        temperature=0,
        alpha_presence=0.25,
        alpha_frequency=0.35,
        alpha_decay=0.95,
        token_ban=[59],
        token_stop=[],
    )
    PIPELINE(model, "rwkv_vocab_v20230424").generate("x", token_count=len(steps), args=args)
    package_tokens = [t[0] for t in model.fed[1:]]  # each sampled token is fed back
    params = SamplingParams(
        temperature=0, alpha_presence=0.25, alpha_frequency=0.35, alpha_decay=0.95, token_ban=(59,)
    )
    sampler = Sampler.for_tokenizer(params, world)
    ours = [sampler(z) for z in steps[: len(package_tokens)]]
    assert ours == package_tokens
    assert len(set(ours)) >= 4


def test_same_seed_same_tokens():
    steps = [_logits(50, seed=s) for s in range(30)]
    a, b, c = (Sampler(SamplingParams(seed=s, top_p=0.95)) for s in (7, 7, 8))
    ta, tb, tc = ([s(z) for z in steps] for s in (a, b, c))
    assert ta == tb
    assert ta != tc


def test_sample_batch_routes_rows_to_their_samplers():
    logits = torch.stack([_logits(30, seed=s) for s in range(3)])
    batch = [Sampler(SamplingParams(seed=s)) for s in range(3)]
    single = [Sampler(SamplingParams(seed=s)) for s in range(3)]
    for _ in range(5):
        assert sample_batch(logits, batch) == [s(row) for s, row in zip(single, logits)]
    with pytest.raises(ValueError, match="one sampler per row"):
        sample_batch(logits, batch[:2])
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        sample_batch(logits[0], batch)


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 2.5),
        ("alpha_decay", 1.2),
        ("max_tokens", -3),
        ("token_ban", (1, -2)),
        ("stop_strings", ("",)),
        ("stop_strings", "\n\n"),
        ("seed", "x"),
        ("temperature", float("nan")),
    ],
)
def test_params_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_params_replace_and_unknown_names():
    p = SamplingParams().replace(top_p=0.3, stop_strings=["\n\n"])
    assert p.top_p == 0.3 and p.stop_strings == ("\n\n",)
    with pytest.raises(ValueError, match="tempreature"):
        SamplingParams.from_dict({"tempreature": 1.0})


def test_nan_logits_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        sample_logits(torch.tensor([0.0, float("nan")]))


# ------------------------------------------------------------------------------------------------
# stop strings


def test_stop_string_split_across_tokens():
    checker = StopChecker(["\n\nUser:"])
    shown = [checker.feed(1, piece) for piece in ["Hel", "lo\n", "\nUs", "er: more"]]
    assert shown == ["Hel", "lo", "", ""]
    assert checker.stopped and checker.reason == "string" and checker.matched == "\n\nUser:"
    assert checker.text == "Hello" and checker.tail == " more"
    assert checker.feed(1, "ignored") == ""


def test_held_text_is_released_when_it_cannot_start_a_stop():
    checker = StopChecker(["\n\n"])
    assert checker.push("a\n") == "a"
    assert checker.held == "\n"
    assert checker.push("b") == "\nb"
    assert checker.push("c\n") == "c"
    assert checker.flush() == "\n" and not checker.stopped


def test_stop_token_releases_held_text():
    checker = StopChecker(["END"], stop_tokens=[0])
    assert checker.feed(5, "xEN") == "x"
    assert checker.feed(0, "") == "EN"
    assert checker.stopped and checker.reason == "token" and checker.matched == 0


@pytest.mark.parametrize("seed", range(25))
def test_stop_checker_against_str_find(seed):
    rng = random.Random(seed)
    alphabet = "ab\n:"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    stops = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
    ]
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    hits = [text.find(s) for s in stops if s in text]
    expected = text[: min(hits)] if hits else text
    checker = StopChecker(stops)
    shown = ""
    fed = ""
    for piece in pieces:
        shown += checker.push(piece)
        fed += piece
        assert expected.startswith(shown)
        if not checker.stopped:
            assert shown + checker.held == fed  # nothing lost, nothing invented
            assert not any(s in shown for s in stops)
    shown += checker.flush()
    assert shown == expected
    assert checker.stopped == bool(hits)
