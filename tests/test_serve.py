"""rwkv-serve with the official `openai` client against a server on 127.0.0.1 (the bundled tiny LM).

The server runs in this process (uvicorn in a thread, a free port); the clients are `openai.OpenAI`
and raw httpx where the SSE framing itself is checked. Batched vs alone: with --deterministic the
same seed gives the same text alone or among 8 concurrent streams; without it, a request's logits
differ from its logits alone by floating-point batch variance only (checked on the engine directly).
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the openai client is a dev dependency")
import httpx  # noqa: E402
import uvicorn  # noqa: E402

from rwkv_mm import assets  # noqa: E402
from rwkv_mm.lm.model import RWKVLM  # noqa: E402
from rwkv_mm.serve import Engine, Job, PrefixCache, ServerConfig, build_app, chat_segments  # noqa: E402
from tests.embed_helpers import HashEmbedder  # noqa: E402  (the server only relays vectors)

KEY = "test-key"


@pytest.fixture(scope="module")
def lm():
    return RWKVLM.from_file(assets.path("tiny-lm"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, lm, deterministic: bool = False, max_batch: int = 8) -> None:
        self.engine = Engine(lm, lm.default_tokenizer(), max_batch=max_batch, deterministic=deterministic)
        app = build_app(self.engine, ServerConfig(model_name="tiny", api_key=KEY), lambda: HashEmbedder())
        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=120)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.close()


@pytest.fixture(scope="module")
def server(lm):
    s = Server(lm)
    yield s
    s.close()


@pytest.fixture(scope="module")
def det_server(lm):
    s = Server(lm, deterministic=True, max_batch=8)
    yield s
    s.close()


CHAT = [{"role": "user", "content": "What does the word light mean?"}]


def test_models_and_auth(server):
    ids = [m.id for m in server.client.models.list().data]
    assert ids == ["tiny", "rwkv-embed"]
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["code"] == "invalid_api_key"
    # without the /v1 prefix too
    r = httpx.get(f"{server.url}/models", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "tiny"


def test_chat_non_streaming_with_usage(server, lm):
    r = server.client.chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=12, seed=3, temperature=0.0
    )
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    tok = lm.default_tokenizer()
    n_prompt = sum(len(tok.encode(s)) for s in chat_segments(CHAT))
    assert r.usage.prompt_tokens == n_prompt
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert "\n\n" not in choice.message.content


def test_chat_streaming_framing(server):
    body = {
        "model": "tiny",
        "messages": CHAT,
        "stream": True,
        "max_tokens": 10,
        "seed": 1,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=120,
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = []
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event, f"badly framed event {event!r}"
        payloads.append(json.loads(event[len("data: ") :]))
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    finals = [p for p in payloads if p["choices"] and p["choices"][0]["finish_reason"]]
    assert len(finals) == 1
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] >= 1
    # the official client reads the same stream
    stream = server.client.chat.completions.create(
        model="tiny", messages=CHAT, stream=True, max_tokens=10, seed=1
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    streamed = "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads if p["choices"])
    assert text == streamed


def test_stop_strings_and_completions(server):
    free = server.client.completions.create(model="tiny", prompt="The Lord", max_tokens=30, temperature=0.0)
    text = free.choices[0].text
    assert free.choices[0].finish_reason in ("length", "stop") and text
    stop = text.strip().split()[0] if text.strip() else text[:1]
    cut = server.client.completions.create(
        model="tiny", prompt="The Lord", max_tokens=30, temperature=0.0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.find(stop)]


def test_embeddings_shape_and_norm(server):
    r = server.client.embeddings.create(model="rwkv-embed", input=["a cat sat", "the dog ran far"])
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape == (2, HashEmbedder().dim)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    one = server.client.embeddings.create(model="rwkv-embed", input="a cat sat")
    np.testing.assert_allclose(one.data[0].embedding, vecs[0], rtol=1e-6)


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "tiny", "messages": []}, 400, "messages"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
        ({"model": "tiny", "messages": CHAT, "temperature": 7}, 400, "temperature"),
        ({"model": "tiny", "messages": CHAT, "max_tokens": 10**9}, 400, "max_tokens"),
        ({"model": "tiny", "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": "tiny", "messages": CHAT, "n": 2}, 400, "n"),
    ],
)
def test_error_mapping(server, body, status, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_unknown_fields_tolerated_and_bad_json(server):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 3, "logit_bias": {}, "user": "u", "foo": 1}
    r = httpx.post(
        f"{server.url}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )
    assert r.status_code == 200
    r = httpx.post(
        f"{server.url}/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_prefix_cache_serves_the_follow_up_turn(server):
    before = server.engine.cache.stats()
    first = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Who made light?"},
    ]
    r = server.client.chat.completions.create(model="tiny", messages=first, max_tokens=8, seed=5)
    follow = first + [
        {"role": "assistant", "content": r.choices[0].message.content},
        {"role": "user", "content": "And the earth?"},
    ]
    prefilled = server.engine.prompt_tokens_prefilled
    r2 = server.client.chat.completions.create(model="tiny", messages=follow, max_tokens=8, seed=5)
    new_tokens = server.engine.prompt_tokens_prefilled - prefilled
    after = server.engine.cache.stats()
    assert after["hits"] > before["hits"]
    assert new_tokens == r2.usage.prompt_tokens - r.usage.prompt_tokens  # only the new turn


def _chat_text(client, content: str, seed: int) -> str:
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": content}],
        stream=True,
        max_tokens=24,
        seed=seed,
        temperature=1.0,
        top_p=0.9,
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_deterministic_batched_equals_alone(det_server):
    prompts = [(f"Tell me about item {i}.", 100 + i) for i in range(8)]
    alone = [_chat_text(det_server.client, p, s) for p, s in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda ps: _chat_text(det_server.client, *ps), prompts))
    assert together == alone
    assert det_server.engine.stats()["steps"] > 0


def test_batched_logits_match_alone(lm):
    """Without --deterministic, rows of a batch step differ from the same rows alone by rounding only."""
    engine = Engine(lm, lm.default_tokenizer(), max_batch=4)
    try:
        tok = lm.default_tokenizer()
        states, logits = [], []
        for text in ["In the beginning", "Python is", "A word", "light"]:
            out, st = lm(torch.tensor([tok.encode(text)]), None)
            states.append(st)
            logits.append(out)
        from rwkv_mm.core.state import RWKVState

        nxt = torch.tensor([[int(x.argmax())] for x in logits])
        batched, _ = lm(nxt, RWKVState.concat(states))
        for i in range(4):
            alone, _ = lm(nxt[i : i + 1], states[i])
            assert (batched[i] - alone[0]).abs().max().item() <= 1e-3
    finally:
        engine.close()


def test_disconnect_frees_the_slot(server):
    body = {
        "model": "tiny",
        "messages": CHAT,
        "stream": True,
        "max_tokens": 2000,
        "temperature": 1.0,
        "top_p": 1.0,
    }
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as r:
        for _ in r.iter_lines():
            if server.engine.stats()["active"]:
                break
    deadline = time.time() + 30
    while server.engine.stats()["active"]:
        assert time.time() < deadline, "the slot of a disconnected client was not freed"
        time.sleep(0.1)


def test_engine_job_api_and_cache_lru(lm):
    cache = PrefixCache(max_bytes=1)  # too small to keep anything
    engine = Engine(lm, lm.default_tokenizer(), max_batch=2, cache=cache)
    try:
        events: list = []
        done = threading.Event()

        def emit(kind, payload):
            events.append((kind, payload))
            if kind in ("done", "error"):
                done.set()

        from rwkv_mm.lm.sampling import SamplingParams

        engine.submit(
            Job([lm.default_tokenizer().encode("Hello")], SamplingParams(max_tokens=5, seed=0), emit)
        )
        assert done.wait(60)
        assert events[-1][0] == "done" and events[-1][1]["completion_tokens"] <= 5
        assert cache.stats()["entries"] == 0
    finally:
        engine.close()
