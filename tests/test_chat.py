"""ChatSession and the rwkv-chat CLI on a small random RWKV-7 checkpoint with the byte tokenizer.

References are computed independently: a plain prompt -> sample -> feed loop over `RWKVLM.forward`, and a
one-shot run of the whole transcript that the session claims its state holds.
"""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from rwkv_mm.lm import chat as chat_module
from rwkv_mm.lm.chat import CHAT_DEFAULTS, HELP, ChatSession, clean_message, main
from rwkv_mm.lm.checkpoint import RWKVConfig, synthetic_state_dict
from rwkv_mm.lm.model import RWKVLM
from rwkv_mm.lm.sampling import SamplingParams, sample_logits
from rwkv_mm.lm.tokenizer import load_tokenizer

NO_PENALTY = dict(alpha_presence=0.0, alpha_frequency=0.0)


def _config(n_embd=64) -> RWKVConfig:
    return RWKVConfig(
        version="v7", n_layer=2, n_embd=n_embd, vocab_size=257, dim_ffn=4 * n_embd, head_size=32,
        d_decay=16, d_aaa=16, d_mv=16, d_gate=16,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "tiny.safetensors"
    save_file(synthetic_state_dict(_config(), seed=0), str(path))
    return path


@pytest.fixture(scope="module")
def lm(ckpt):
    return RWKVLM.from_file(ckpt)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("bytes")


class Spy:
    """The LM interface ChatSession uses, recording every call; `bias` is added to the logits."""

    def __init__(self, lm, bias=None):
        self.lm, self.bias, self.calls = lm, bias, []

    def __call__(self, tokens, state):
        logits, new = self.lm(tokens, state)
        if self.bias is not None:
            logits = logits + self.bias
        self.calls.append((tokens[0].tolist(), state, new, logits[0]))
        return logits, new

    def init_state(self, batch_size=1):
        return self.lm.init_state(batch_size)

    def default_tokenizer(self):
        return self.lm.default_tokenizer()

    def fed(self):
        return [t for call in self.calls for t in call[0]]


def _reference_reply(lm, tok, prompt, generator, params, state=None):
    """Prompt, then sample / feed until token 0, "\\n\\n" or max_tokens; returns (shown reply, raw text)."""
    with torch.no_grad():
        logits, state = lm(torch.tensor([tok.encode(prompt)]), state)
        data = b""
        for _ in range(params.max_tokens):
            t = sample_logits(logits[0], params.temperature, params.top_p, generator=generator)
            if t == 0:
                break
            data += tok.token_bytes(t)
            text = data.decode("utf-8", errors="replace")
            if any(s in text for s in params.stop_strings):
                break
            logits, state = lm(torch.tensor([[t]]), state)
    text = data.decode("utf-8", errors="replace")
    cut = min([text.find(s) for s in params.stop_strings if s in text], default=len(text))
    return text[:cut].strip(), text


def _session(lm, tok, seed, **kw):
    return ChatSession(lm, tok, seed=seed, **{**NO_PENALTY, "top_p": 0.9, "max_tokens": 24, **kw})


def test_clean_message():
    assert clean_message("  a\r\n\r\n b \n\n\nc \r\r") == "a\n b \nc"
    with pytest.raises(ValueError, match="str"):
        clean_message(None)


def test_send_matches_an_independent_loop_and_stream_joins_to_send(lm, tok):
    params = SamplingParams.from_dict(CHAT_DEFAULTS).replace(top_p=0.9, max_tokens=24, **NO_PENALTY)
    g = torch.Generator().manual_seed(3)
    expected, _ = _reference_reply(lm, tok, "User: hello\nthere\n\nAssistant:", g, params)
    pieces = list(_session(lm, tok, 3).stream("  hello\r\n\n\nthere "))  # cleaned to "hello\nthere"
    assert len(pieces) > 1
    assert "".join(pieces) == expected
    session = _session(lm, tok, 3)
    assert session.send("hello\nthere") == expected
    assert session.history == [["hello\nthere", expected]]
    assert session.finish_reason in ("stop", "length")


def test_retry_continues_the_generator_and_reseeding_reproduces(lm, tok):
    params = SamplingParams.from_dict(CHAT_DEFAULTS).replace(top_p=0.9, max_tokens=24, **NO_PENALTY)
    g = torch.Generator().manual_seed(5)
    first, _ = _reference_reply(lm, tok, "User: hi\n\nAssistant:", g, params)
    second, _ = _reference_reply(lm, tok, "User: hi\n\nAssistant:", g, params)  # the next draws of g
    assert first != second
    session = _session(lm, tok, 5)
    assert session.send("hi") == first
    assert session.retry() == second
    assert session.retry(seed=5) == first
    assert session.history == [["hi", first]]
    with pytest.raises(RuntimeError, match="nothing to retry"):
        _session(lm, tok, 5).retry()


def _chain(spy, end):
    """Tokens along the chain of forward calls that produced the state `end` (each call's input state is
    the previous call's output), the chain's start state and the logits of its last call."""
    tokens, state, logits = [], end, None
    for fed, inp, out, out_logits in reversed(spy.calls):
        if out is state:
            tokens[:0] = fed
            state = inp
            logits = out_logits if logits is None else logits
    return tokens, state, logits


@pytest.mark.parametrize("seed", range(4))
def test_state_holds_exactly_the_transcript(lm, tok, seed):
    """The state before the second reply equals a one-shot run of
    "User: m1\\n\\nAssistant:<reply>\\n\\nUser: m2\\n\\nAssistant:"."""
    bias = torch.zeros(257)
    bias[11] = 4.0  # "\n" likely: replies end at "\n\n" as often as at max_tokens
    spy = Spy(lm, bias)
    session = ChatSession(spy, tok, seed=seed, max_tokens=40)
    session.send("first\n\nmessage")
    reasons = [session.finish_reason]
    session.send("second")
    tokens, start, logits = _chain(spy, session._pre_reply[0])
    assert start.equal(lm.init_state(1))
    text = tok.decode(tokens)
    head, tail = "User: first\nmessage\n\nAssistant:", "User: second\n\nAssistant:"
    assert text.startswith(head) and text.endswith(tail)
    middle = text[len(head) : -len(tail)]
    assert middle.endswith("\n\n") and "\n\n" not in middle[:-2]
    assert middle.strip() == session.history[0][1]
    with torch.no_grad():
        one_shot, _ = lm(torch.tensor([tokens]))
    torch.testing.assert_close(logits - bias, one_shot[0], rtol=1e-4, atol=1e-4)
    assert reasons[0] in ("stop", "length")


def test_both_reply_endings_are_exercised(lm, tok):
    bias = torch.zeros(257)
    bias[11] = 4.0
    reasons = set()
    for seed in range(4):
        session = ChatSession(Spy(lm, bias), tok, seed=seed, max_tokens=40)
        session.send("first\n\nmessage")
        reasons.add(session.finish_reason)
    assert reasons == {"stop", "length"}


def test_stop_string_inside_the_reply(lm, tok):
    params = SamplingParams.from_dict(CHAT_DEFAULTS).replace(top_p=0.9, max_tokens=30, **NO_PENALTY)
    _, raw = _reference_reply(lm, tok, "User: go\n\nAssistant:", torch.Generator().manual_seed(9), params)
    stop = raw[6:9]  # three bytes the model will produce: one stop string over three tokens
    expected = raw[: raw.find(stop)].strip()
    spy = Spy(lm)
    session = _session(spy, tok, 9, max_tokens=30, stop_strings=(stop,))
    pieces = list(session.stream("go"))
    assert "".join(pieces) == expected and stop not in "".join(pieces)
    assert session.finish_reason == "stop"
    session.send("next")  # the state holds the reply as shown, then "\n\n"
    tokens, _, _ = _chain(spy, session._pre_reply[0])
    assert tok.decode(tokens).endswith(raw[: raw.find(stop)].rstrip("\n") + "\n\nUser: next\n\nAssistant:")


def test_system_prompt_is_prefilled_once(lm, tok):
    spy = Spy(lm)
    session = ChatSession(spy, tok, system="Be\n\n brief.", seed=0, max_tokens=5)
    assert tok.decode(spy.fed()) == "System: Be\n brief.\n\n"
    n = len(spy.calls)
    session.reset()
    other = ChatSession(spy, tok, system="Be\n\n brief.", seed=0, max_tokens=5)
    assert len(spy.calls) == n  # cached per model: neither reset nor a new session prefills again
    session.send("hi")
    first_prompt = spy.calls[n][0]
    assert tok.decode(first_prompt) == "User: hi\n\nAssistant:"  # the system prompt is not fed again
    assert spy.calls[n][1] is session._base is other._base
    ChatSession(spy, tok, system="Other.", seed=0)
    assert tok.decode(spy.calls[-1][0]) == "System: Other.\n\n"


def test_reset_and_no_leak_between_sessions(lm, tok):
    fresh = _session(lm, tok, 11).send("hello")
    busy = _session(lm, tok, 11)
    busy.send("something else")
    busy.send("and more")
    other = _session(lm, tok, 11)
    assert other.send("hello") == fresh  # a new session after another one's chat starts clean
    busy.reset()
    assert busy.history == []
    busy.sampler.generator.manual_seed(11)
    assert busy.send("hello") == fresh


def test_caller_state_is_not_modified(lm, tok):
    with torch.no_grad():
        _, start = lm(torch.tensor([tok.encode("some context")]))
    copy = start.clone()
    session = ChatSession(lm, tok, system="sys", state=start, seed=2, max_tokens=10)
    session.send("hi")
    session.retry()
    session.generate("abc", max_tokens=5)
    assert start.equal(copy)
    params = SamplingParams.from_dict(CHAT_DEFAULTS).replace(max_tokens=10)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        _, after_system = lm(torch.tensor([tok.encode("System: sys\n\n")]), start)
    # the reference has penalties off, so compare with a session that has them off too
    ref, _ = _reference_reply(
        lm, tok, "User: hi\n\nAssistant:", g, params.replace(**NO_PENALTY), after_system
    )
    s2 = ChatSession(lm, tok, system="sys", state=start, seed=2, max_tokens=10, **NO_PENALTY)
    assert s2.send("hi") == ref


def test_generate_is_free_and_leaves_the_chat_alone(lm, tok):
    session = _session(lm, tok, 4)
    session.send("hi")
    history, state, pending = [list(t) for t in session.history], session._state, list(session._pending)
    gen = session.generate("Once upon", max_tokens=12)
    assert session.history == history and session._state is state and session._pending == pending
    g = torch.Generator().manual_seed(0)
    probe = _session(lm, tok, 0)
    assert probe.generate("Once upon", max_tokens=12) == _free_reference(lm, tok, "Once upon", g, 12)
    assert isinstance(gen, str)


def _free_reference(lm, tok, text, g, n):
    data = b""
    with torch.no_grad():
        logits, state = lm(torch.tensor([tok.encode(text)]))
        for _ in range(n):
            t = sample_logits(logits[0], 1.0, 0.9, generator=g)
            if t == 0:
                break
            data += tok.token_bytes(t)
            logits, state = lm(torch.tensor([[t]]), state)
    return data.decode("utf-8", errors="replace")


def test_save_load_continues_identically(lm, tok, tmp_path):
    a = ChatSession(lm, tok, system="sys", seed=8, max_tokens=16)  # penalties on: their state is saved too
    a.send("one")
    a.save(tmp_path / "s.chat")
    r2 = a.send("two")
    rr = a.retry()
    b = ChatSession.load(tmp_path / "s.chat", lm, tok)
    assert b.system == "sys" and b.params == a.params
    assert b.send("two") == r2
    assert b.retry() == rr
    assert b.history == a.history
    c = ChatSession.load(tmp_path / "s.chat", lm)  # tokenizer from the model
    c_retry = c.retry()
    a2 = ChatSession(lm, tok, system="sys", seed=8, max_tokens=16)
    a2.send("one")
    assert c_retry == a2.retry()


def test_save_a_fresh_session(lm, tok, tmp_path):
    """Right after construction the current state is the system state itself (shared tensors)."""
    a = ChatSession(lm, tok, system="sys", seed=4, max_tokens=8)
    a.save(tmp_path / "fresh.chat")
    b = ChatSession.load(tmp_path / "fresh.chat", lm, tok)
    assert b.history == [] and b.finish_reason is None
    with pytest.raises(RuntimeError, match="nothing to retry"):
        b.retry()
    assert b.send("hi") == a.send("hi")


def test_load_errors(lm, tok, tmp_path):
    with pytest.raises(FileNotFoundError):
        ChatSession.load(tmp_path / "missing.chat", lm, tok)
    (tmp_path / "junk.chat").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a chat session"):
        ChatSession.load(tmp_path / "junk.chat", lm, tok)
    s = _session(lm, tok, 0, max_tokens=3)
    s.send("x")
    s.save(tmp_path / "s.chat")
    wide = RWKVLM.from_file(_wide_checkpoint(tmp_path))
    with pytest.raises(ValueError, match="another model"):
        ChatSession.load(tmp_path / "s.chat", wide, tok)


def _wide_checkpoint(tmp_path):
    path = tmp_path / "wide.safetensors"
    save_file(synthetic_state_dict(_config(n_embd=96), seed=1), str(path))
    return path


def test_bad_input(lm, tok):
    s = _session(lm, tok, 0)
    with pytest.raises(ValueError, match="empty"):
        s.stream(" \n\n ")
    with pytest.raises(ValueError, match="tempreature"):
        ChatSession(lm, tok, tempreature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        ChatSession(lm, tok, top_p=2.0)


def test_interrupted_stream_keeps_the_session_consistent(lm, tok):
    spy = Spy(lm)
    s = _session(spy, tok, 6, max_tokens=30)
    it = s.stream("hi")
    shown = next(it) + next(it)
    it.close()
    assert s.history[0][1] == shown
    s.send("again")
    tokens, _, _ = _chain(spy, s._pre_reply[0])
    text = tok.decode(tokens)
    assert text.startswith("User: hi\n\nAssistant:") and text.endswith("\n\nUser: again\n\nAssistant:")


# ------------------------------------------------------------------------------------------------
# CLI


def _cli_env():
    return {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "RWKV_MM_TEST_THREADS": "1"}


CLI_FLAGS = ["--seed", "13", "--max-tokens", "12", "--top-p", "0.9", "--temperature", "1.0"]


def _cli_session(lm, system=None):
    params = SamplingParams.from_dict(CHAT_DEFAULTS).replace(
        temperature=1.0, top_p=0.9, max_tokens=12, seed=13
    )
    return ChatSession(lm, system=system, params=params)


def test_cli_piped_stdin(ckpt, lm, tmp_path):
    save_to = tmp_path / "session.chat"
    script = f"hello\n+help\n++\n\n+reset\nhello\n+save {save_to}\n+load {save_to}\n++\n+gen abc\n+bogus\n"
    proc = subprocess.run(
        [sys.executable, "-c", "import torch, sys; torch.set_num_threads(1); "
         "from rwkv_mm.lm.chat import main; sys.exit(main())",
         "--model", str(ckpt), *CLI_FLAGS],
        input=script.encode(), capture_output=True, env=_cli_env(), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    s = _cli_session(lm)
    r1 = s.send("hello")
    r2 = s.retry()
    s.reset()
    r3 = s.send("hello")
    s.save(tmp_path / "in_process.chat")
    loaded = ChatSession.load(tmp_path / "in_process.chat", lm)
    r4 = loaded.retry()
    gen = loaded.generate("abc")
    expected = (
        f"Assistant: {r1}\n\n{HELP}\n\nAssistant: {r2}\n\nChat reset.\n\nAssistant: {r3}\n\n"
        f"Saved the session to {save_to}\n\nLoaded {save_to} (1 turns)\n\nAssistant: {r4}\n\n"
        f"abc{gen}\n\nUnknown command +bogus; type +help\n\n"
    )
    assert proc.stdout.decode("utf-8") == expected


def test_cli_prompt_mode(ckpt, lm, capsys):
    assert main(["--model", str(ckpt), *CLI_FLAGS, "--system", "sys", "--prompt", "hi\n\nthere"]) == 0
    assert capsys.readouterr().out == _cli_session(lm, system="sys").send("hi\nthere") + "\n"


def test_cli_missing_model_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rwkv_mm.lm.chat", "--model", str(tmp_path / "nope.pth"), "--prompt", "hi"],
        capture_output=True, env=_cli_env(), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    err = proc.stderr.decode().strip().splitlines()
    assert err[-1].startswith("rwkv-chat: error:") and "nope.pth" in err[-1]
    assert proc.stdout == b""


def test_cli_missing_bundled_model_hint(monkeypatch, capsys):
    from rwkv_mm import assets

    def missing(name):
        raise FileNotFoundError(f"no bundled asset named {name!r}")

    monkeypatch.setattr(assets, "path", missing)
    assert main(["--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tiny-lm" in err[0] and "--model" in err[0]


def test_cli_bad_strategy_exits_2(ckpt, capsys):
    assert main(["--model", str(ckpt), "--strategy", "cpu fp99", "--prompt", "hi"]) == 2
    assert "fp99" in capsys.readouterr().err


def test_load_model_direct_strategies(ckpt):
    assert chat_module.load_model(str(ckpt), "cpu bf16").dtype == torch.bfloat16
    assert chat_module.load_model(str(ckpt), " CPU  fp32 ").dtype == torch.float32
