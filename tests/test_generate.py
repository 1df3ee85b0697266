"""Batched generation (`rwkv_mm.lm.generate.generate_batch`) against each prompt run alone.

The reference is a plain greedy loop over `RWKVLM.forward` with batch 1 (argmax, one token at a time),
written here independently of generate.py; a synthetic RWKV-7 checkpoint with the World vocabulary
(2 layers x 64 wide) gives text for the stop-string cases.
"""

import pytest
import torch

from rwkv_mm.core.state import RWKVState
from rwkv_mm.lm.checkpoint import RWKVConfig, synthetic_state_dict
from rwkv_mm.lm.generate import generate_batch
from rwkv_mm.lm.model import RWKVLM
from rwkv_mm.lm.sampling import SamplingParams
from rwkv_mm.lm.tokenizer import load_tokenizer

torch.set_num_threads(1)

CFG = RWKVConfig("v7", 2, 64, 65536, 256, d_decay=16, d_aaa=16, d_mv=16, d_gate=16)
LENGTHS = (5, 9, 5, 1, 13)  # prompt lengths: repeated, single-token and odd ones
N = 12  # tokens per reference continuation
GREEDY = SamplingParams(temperature=0, stop_tokens=(), max_tokens=N)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "x070.pth"
    torch.save(synthetic_state_dict(CFG, seed=7), path)
    return RWKVLM.from_file(path)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("world")


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(1, 65530, (n,), generator=g).tolist() for n in LENGTHS]


def greedy_alone(lm, prompt, n, state=None):
    """Independent reference: batch 1, argmax, no penalties."""
    out = []
    logits, st = lm(torch.tensor([prompt]), state)
    for _ in range(n):
        t = int(logits[0].argmax())
        out.append(t)
        logits, st = lm(torch.tensor([[t]]), st)
    return out


@pytest.fixture(scope="module")
def reference(lm, prompts):
    return [greedy_alone(lm, p, N) for p in prompts]


class Spy:
    """Wraps the model and records the batch size of every forward call."""

    def __init__(self, lm):
        self.lm, self.calls = lm, []
        self.config, self.emb, self.init_state = lm.config, lm.emb, lm.init_state

    def __call__(self, tokens, state=None, full_output=False):
        self.calls.append(tuple(tokens.shape))
        return self.lm(tokens, state, full_output)


def test_greedy_batch_equals_each_alone(lm, prompts, reference):
    spy = Spy(lm)
    outs = generate_batch(spy, prompts, GREEDY)
    assert outs == reference
    assert len({tuple(r) for r in reference}) == len(reference)  # the prompts really lead apart
    groups = sorted((LENGTHS.count(n), n) for n in set(LENGTHS))  # one prefill call per prompt length
    assert sorted(spy.calls[: len(groups)]) == groups
    assert spy.calls[len(groups) :] == [(len(prompts), 1)] * (N - 1)  # then one decode call per step


def test_single_prompt_and_params_list(lm, prompts, reference):
    assert generate_batch(lm, [prompts[1]], GREEDY) == [reference[1]]
    assert lm.generate_batch([prompts[1]], GREEDY) == [reference[1]]  # the public call delegates here
    assert generate_batch(lm, prompts[:2], [GREEDY, GREEDY]) == reference[:2]


def test_max_tokens_per_sequence_and_batch_shrinks(lm, prompts, reference):
    limits = [1, 4, 0, 7, 3]
    spy = Spy(lm)
    outs = generate_batch(spy, prompts, [GREEDY.replace(max_tokens=n) for n in limits])
    assert outs == [r[:n] for r, n in zip(reference, limits)]
    prefill_calls = len({n for n, limit in zip(LENGTHS, limits) if limit > 0})  # no prefill for limit 0
    decode = spy.calls[prefill_calls:]
    assert all(t == 1 for _, t in decode)
    assert [b for b, _ in decode] == [sum(n > step for n in limits) for step in range(1, max(limits))]
    assert generate_batch(lm, prompts, GREEDY, max_tokens=2) == [r[:2] for r in reference]


def test_stop_tokens_per_sequence(lm, prompts, reference):
    """Each sequence stops at its own stop token, which is not included."""
    params, expected = [], []
    for i, ref in enumerate(reference):
        k = 2 + i % 5  # a different stopping point per sequence
        params.append(GREEDY.replace(stop_tokens=(ref[k],)))
        expected.append(ref[: ref.index(ref[k])])
    assert generate_batch(lm, prompts, params) == expected


def _text_ends(tok, ids):
    """Length of the streamed text after each token."""
    dec, n, ends = tok.stream_decoder(), 0, []
    for t in ids:
        n += len(dec.feed(t))
        ends.append(n)
    return ends


def test_stop_strings(lm, tok, prompts, reference):
    """A stop string ends its sequence; the result stops before the token in which it begins."""
    params, expected = [], []
    for ref in reference:
        text = tok.decode(ref)
        ends = _text_ends(tok, ref)
        # a stop string starting inside token k (if its text has 2+ characters) or at its start
        for k in range(2, len(ref) - 1):
            begin = ends[k - 1]
            stop = text[begin + 1 : ends[k + 1]] if ends[k] - begin >= 2 else text[begin : ends[k + 1]]
            if stop.strip() and "\ufffd" not in stop and text.find(stop) == text.find(stop, begin):
                break
        else:
            pytest.fail(f"no usable stop string in {text!r}")
        params.append(GREEDY.replace(stop_strings=(stop,)))
        expected.append(ref[:k])
    assert generate_batch(lm, prompts, params, tokenizer=tok) == expected
    with pytest.raises(ValueError, match="stop_strings.*need tokenizer="):
        generate_batch(lm, prompts[:1], params[:1])


def test_callback_sees_tokens_and_can_stop(lm, prompts, reference):
    seen = []

    def callback(i, token):
        seen.append((i, token))
        return i == 0 and len([s for s in seen if s[0] == 0]) == 3

    outs = generate_batch(lm, prompts[:2], GREEDY, callback=callback)
    assert outs == [reference[0][:3], reference[1]]
    assert [t for i, t in seen if i == 1] == reference[1] and [t for i, t in seen if i == 0] == reference[0][
        :3
    ]


def test_from_a_state(lm, prompts):
    """A shared batch-1 state (a common prefix) or one state per prompt; neither is modified."""
    prefix = prompts[4][:6]
    _, shared = lm(torch.tensor([prefix]))
    before = shared.clone()
    outs = generate_batch(lm, prompts[:3], GREEDY, state=shared)
    assert shared.equal(before)
    assert outs == [greedy_alone(lm, prefix + p, N) for p in prompts[:3]]
    states = RWKVState.concat([lm(torch.tensor([p]))[1] for p in prompts[:2]])
    outs = generate_batch(lm, [[7], [9]], GREEDY, state=states)
    assert outs == [greedy_alone(lm, [t], N, states.select([i])) for i, t in enumerate((7, 9))]


def test_seeded_sampling_batch_equals_alone(lm, prompts):
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, seed=s, max_tokens=N, alpha_presence=0.3)
        for s in (1, 2, 3)
    ]
    outs = generate_batch(lm, prompts[:3], params)
    assert outs == [generate_batch(lm, [p], q)[0] for p, q in zip(prompts[:3], params)]
    assert outs[0] != generate_batch(lm, prompts[:1], params[1])[0]  # the seed matters


def test_default_stop_token_zero(lm, prompts):
    """Token 0 (end of text) stops by default: with every other id banned, nothing is generated."""
    only_zero = SamplingParams(temperature=0, token_ban=tuple(range(1, CFG.vocab_size)))
    assert generate_batch(lm, prompts[:2], only_zero) == [[], []]
    assert generate_batch(lm, prompts[:1], only_zero.replace(stop_tokens=(), max_tokens=3)) == [[0, 0, 0]]


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(token_id_lists=[]), "non-empty list of prompts"),
        (dict(token_id_lists=[[1], []]), "prompt 1 is empty"),
        (dict(token_id_lists=[[1, 65536]]), r"prompt 0 holds 65536: token ids must be ints in \[0, 65536\)"),
        (dict(token_id_lists=["hi"]), "prompt 0 must be a list of token ids, got str"),
        (dict(token_id_lists=[[1], [2]], params=[GREEDY]), "one per prompt\\), got 1"),
        (dict(token_id_lists=[[1]], max_tokens=-1), "max_tokens must be an int >= 0"),
    ],
)
def test_bad_input(lm, args, message):
    with pytest.raises(ValueError, match=message):
        generate_batch(lm, **{"params": GREEDY, **args})


def test_state_batch_mismatch(lm):
    with pytest.raises(ValueError, match=r"state has batch size 2; expected 1 \(shared\) or 3"):
        generate_batch(lm, [[1], [2], [3]], GREEDY, state=lm.init_state(2))
