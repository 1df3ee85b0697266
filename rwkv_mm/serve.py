"""rwkv-serve: an OpenAI-compatible HTTP server over `rwkv_mm.lm` (chat, completions) and
`rwkv_mm.embed` (embeddings), with batched decoding and a prefix-state cache.

    rwkv-serve [--model PATH] [--embedder PATH] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
               [--max-batch 16] [--deterministic]

Endpoints (each also without the ``/v1`` prefix): ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (both streaming over SSE or not, ``stream_options.include_usage``),
``POST /v1/embeddings``; ``GET /stats`` reports the batch, the queue and the prefix cache.

How it works. One engine thread owns the model. Requests are queued; between decode steps the engine
admits waiting requests (up to ``--max-batch`` in flight): each prompt is prefilled alone, starting from
the longest cached prefix state, and its state joins the batch; then every step runs one
``lm(tokens [B, 1], state)`` for all requests together, each with its own sampler, stop strings and
token budget. A request leaves the batch when it stops, runs out of tokens or its client disconnects.
A row's logits depend on the rest of the batch only through floating-point batch variance (different
matrix shapes); ``--deterministic`` pads every step to ``--max-batch`` rows, so a request's arithmetic
is the same alone or batched and a seed gives the same text either way.

Prefix cache: chat prompts are encoded message by message (an assistant turn as ``"Assistant:"`` then
``" <reply>\\n\\n"``), so the prompt of a follow-up turn starts with exactly the tokens of the previous
prompt. The state after each prompt (and after a leading system message) is kept in an LRU bounded in
bytes; a follow-up turn prefills only what is new (the last reply and the new message).

Error bodies follow OpenAI's ``{"error": {"message", "type", "param", "code"}}``; unknown request fields
are ignored. The server binds 127.0.0.1 unless told otherwise, caps request size, prompt length and
``max_tokens``, and checks ``Authorization: Bearer <key>`` when started with ``--api-key``.
"""

import argparse
import asyncio
import base64
import json
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .core.state import RWKVState
from .lm.chat import CHAT_DEFAULTS, TURN_END, clean_message
from .lm.sampling import Sampler, SamplingParams, StopChecker
from .lm.tokenizer import Tokenizer

__all__ = ["APIError", "Engine", "Job", "PrefixCache", "build_app", "chat_segments", "main"]

logger = logging.getLogger(__name__)

ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "tool": "User", "function": "User"}
PREFILL_CHUNK = 256  # prompt tokens per forward call


# ---------------------------------------------------------------------------------------------------
# errors and request fields


class APIError(Exception):
    """An error answered as OpenAI does: HTTP `status` with {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _number(body: dict, name: str, default: float | None, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise APIError(
            400, f"'{name}' must be a number in [{lo}, {hi}], got {value!r}", name, "invalid_value"
        )
    return float(value)


def _integer(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise APIError(
            400, f"'{name}' must be an integer in [{lo}, {hi}], got {value!r}", name, "invalid_value"
        )
    return value


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return tuple(stops)


def _message_text(message: Any, index: int) -> tuple[str, str]:
    """(role, text) of one chat message; content may be a string or a list of text parts."""
    if not isinstance(message, dict) or "role" not in message:
        raise APIError(400, f"messages[{index}] must be an object with 'role' and 'content'", "messages")
    role, content = message["role"], message.get("content")
    if role not in ROLE_NAMES and role != "assistant":
        raise APIError(
            400,
            f"messages[{index}].role {role!r} is not one of {sorted([*ROLE_NAMES, 'assistant'])}",
            "messages",
        )
    if content is None:
        content = ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise APIError(400, f"messages[{index}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        content = "\n".join(parts)
    if not isinstance(content, str):
        raise APIError(400, f"messages[{index}].content must be a string or a list of text parts", "messages")
    return role, content


def chat_segments(messages: Sequence[Any]) -> list[str]:
    """The chat prompt as pieces encoded one by one (so a follow-up's tokens extend the previous prompt's):

    ``System: s\\n\\n``, ``User: m\\n\\n``, an assistant turn as ``Assistant:`` and `` reply\\n\\n``, and
    the final ``Assistant:``. Messages are cleaned as ChatSession cleans them (no blank lines inside).
    """
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    segments = []
    for i, message in enumerate(messages):
        role, text = _message_text(message, i)
        text = clean_message(text)
        if role == "assistant":
            segments += ["Assistant:", f" {text}{TURN_END}"] if text else []
        else:
            segments.append(f"{ROLE_NAMES[role]}: {text}{TURN_END}")
    segments.append("Assistant:")
    return segments


# ---------------------------------------------------------------------------------------------------
# prefix cache


class PrefixCache:
    """LRU of (token prefix -> state after it, logits at its last token), bounded in bytes.

    `lookup(ids)` returns the longest cached key that is a prefix of `ids`. States are never modified in
    place (the model returns new ones), so entries are shared without copies.
    """

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], tuple[RWKVState, Tensor, int]] = OrderedDict()
        self.bytes = 0
        self.lookups = self.hits = self.tokens_saved = 0

    @staticmethod
    def _size(state: RWKVState, logits: Tensor) -> int:
        tensors = [t for layer in state.layers for t in layer.values()]
        return sum(t.numel() * t.element_size() for t in tensors) + logits.numel() * logits.element_size()

    def lookup(self, ids: Sequence[int]) -> tuple[int, RWKVState | None, Tensor | None]:
        """(n, state, logits [V]) for the longest cached prefix of `ids` (n = 0, None, None: a miss)."""
        self.lookups += 1
        best: tuple[int, ...] | None = None
        ids = tuple(ids)
        for key in self._entries:
            if len(key) <= len(ids) and (best is None or len(key) > len(best)) and ids[: len(key)] == key:
                best = key
        if best is None:
            return 0, None, None
        self._entries.move_to_end(best)
        self.hits += 1
        self.tokens_saved += len(best)
        state, logits, _ = self._entries[best]
        return len(best), state, logits

    def put(self, ids: Sequence[int], state: RWKVState, logits: Tensor) -> None:
        key = tuple(ids)
        if not key or key in self._entries:
            return
        size = self._size(state, logits)
        if size > self.max_bytes:
            return
        self._entries[key] = (state, logits, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, _, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped

    def stats(self) -> dict[str, Any]:
        return {
            "entries": len(self._entries),
            "bytes": self.bytes,
            "lookups": self.lookups,
            "hits": self.hits,
            "hit_rate": self.hits / self.lookups if self.lookups else 0.0,
            "tokens_saved": self.tokens_saved,
        }


# ---------------------------------------------------------------------------------------------------
# the engine: one thread, batched decoding


@dataclass
class Job:
    """One generation request. `emit(kind, payload)` is called from the engine thread with
    ("text", str) pieces, then once ("done", {"finish_reason", "prompt_tokens", "completion_tokens"})
    or ("error", message)."""

    segments: list[list[int]]  # prompt token ids, piece by piece (cache points between pieces)
    params: SamplingParams
    emit: Callable[[str, Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_ids(self) -> list[int]:
        return [t for seg in self.segments for t in seg]


class _Slot:
    """A job in the batch: its sampler, decoder, stop checker and the logits of its next token."""

    def __init__(self, job: Job, tokenizer: Tokenizer, logits: Tensor) -> None:
        self.job, self.logits = job, logits
        self.sampler = Sampler.for_tokenizer(job.params, tokenizer)
        self.decoder = tokenizer.stream_decoder()
        self.checker = StopChecker.from_params(job.params)
        self.generated = 0
        self.token: int | None = None  # sampled, to be fed at the next step


class Engine:
    """Owns the LM on one thread; `submit` jobs from any thread.

    Args:
        lm: an `RWKVLM`.
        tokenizer: its tokenizer.
        max_batch: requests decoded together at most; more wait in the queue.
        deterministic: pad every decode step to `max_batch` rows (same arithmetic alone or batched).
        cache: the prefix-state cache (None: a 256 MiB one).
        threads: torch CPU threads of the engine thread.
    """

    def __init__(
        self,
        lm,
        tokenizer: Tokenizer,
        max_batch: int = 16,
        deterministic: bool = False,
        cache: PrefixCache | None = None,
        threads: int = 1,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.lm, self.tokenizer = lm, tokenizer
        self.max_batch, self.deterministic, self.threads = max_batch, deterministic, threads
        self.cache = cache if cache is not None else PrefixCache()
        self.device = lm.emb.weight.device
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._slots: list[_Slot | None] = []  # the job of each row of the batch state (None: free)
        self._state: RWKVState | None = None  # the batch's state, [rows, ...]
        self.steps = self.tokens_generated = self.prompt_tokens_prefilled = 0
        self._thread = threading.Thread(target=self._run, name="rwkv-serve-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def stats(self) -> dict[str, Any]:
        return {
            "active": sum(s is not None for s in self._slots),
            "queued": self._queue.qsize(),
            "max_batch": self.max_batch,
            "deterministic": self.deterministic,
            "steps": self.steps,
            "tokens_generated": self.tokens_generated,
            "prompt_tokens_prefilled": self.prompt_tokens_prefilled,
            "prefix_cache": self.cache.stats(),
        }

    # -- the loop -----------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                if not self._admit():
                    return
                if any(s is not None for s in self._slots):
                    try:
                        self._step()
                    except Exception as e:  # a failed step fails its jobs, not the server
                        logger.exception("decode step failed")
                        for s in self._slots:
                            if s is not None:
                                s.job.emit("error", f"decode failed: {e}")
                        self._slots, self._state = [], None

    def _admit(self) -> bool:
        """Move queued jobs into free slots (blocking while nothing runs). False when closing."""
        while sum(s is not None for s in self._slots) < self.max_batch:
            idle = not any(s is not None for s in self._slots)
            try:
                job = self._queue.get(block=idle)
            except queue.Empty:
                return True
            if job is None:
                return False
            if job.cancelled.is_set():
                continue
            try:
                logits, state = self._prefill(job)
            except Exception as e:
                logger.exception("prefill failed")
                job.emit("error", f"prefill failed: {e}")
                continue
            self._place(_Slot(job, self.tokenizer, logits), state)
        return True

    def _place(self, slot: _Slot, state: RWKVState) -> None:
        """Give `slot` a row of the batch state: a free row (deterministic: the batch is always
        `max_batch` rows, free ones holding a blank state) or a new last row."""
        free = [i for i, s in enumerate(self._slots) if s is None]
        if self.deterministic:
            if self._state is None:
                self._state = self.lm.init_state(self.max_batch)
                self._slots = [None] * self.max_batch
                free = list(range(self.max_batch))
            row = free[0]
            for mine, new in zip(self._state.layers, state.layers):
                for name, t in mine.items():
                    t[row] = new[name][0]
            self._slots[row] = slot
        else:
            self._state = state if self._state is None else RWKVState.concat([self._state, state])
            self._slots.append(slot)

    def _prefill(self, job: Job) -> tuple[Tensor, RWKVState]:
        """(logits [V], state [1]) after the prompt, from the longest cached prefix; caches the state
        after the whole prompt and after its first piece."""
        ids = job.prompt_ids
        n, state, logits = self.cache.lookup(ids)
        if state is None:
            state = self.lm.init_state(1)
        done = 0
        for seg in job.segments:
            start = max(n - done, 0)
            for a in range(start, len(seg), PREFILL_CHUNK):
                chunk = torch.tensor([seg[a : a + PREFILL_CHUNK]], dtype=torch.long, device=self.device)
                out, state = self.lm(chunk, state)
                logits = out[0]
                self.prompt_tokens_prefilled += chunk.shape[1]
            done += len(seg)
            if done == len(job.segments[0]) and len(job.segments) > 1 and done > n:
                self.cache.put(ids[:done], state, logits)
        self.cache.put(ids, state, logits)
        return logits, state

    def _step(self) -> None:
        """Sample one token for every job, retire finished ones, and run one batched forward."""
        for i, slot in enumerate(self._slots):
            if slot is not None and (slot.job.cancelled.is_set() or not self._sample(slot)):
                self._slots[i] = None
        if not self.deterministic:  # drop the rows of finished jobs
            keep = [i for i, slot in enumerate(self._slots) if slot is not None]
            if len(keep) < len(self._slots):
                self._slots = [self._slots[i] for i in keep]
                self._state = self._state.select(keep) if keep else None
        if not any(slot is not None for slot in self._slots):
            if not self.deterministic:
                self._state = None
            return
        tokens = torch.tensor(
            [[slot.token if slot is not None else 0] for slot in self._slots],
            dtype=torch.long,
            device=self.device,
        )  # (rows, 1)
        logits, self._state = self.lm(tokens, self._state)
        self.steps += 1
        for row, slot in enumerate(self._slots):
            if slot is not None:
                slot.logits = logits[row]

    def _sample(self, slot: _Slot) -> bool:
        """Draw slot's next token and emit its text. False when the job has finished."""
        job, params = slot.job, slot.job.params
        if slot.generated >= params.max_tokens:
            return self._finish(slot, "length")
        token = slot.sampler(slot.logits)
        slot.generated += 1
        self.tokens_generated += 1
        if token in slot.checker.stop_tokens:
            piece = slot.checker.push(slot.decoder.flush())
            piece += slot.checker.feed(token, "")
            if piece:
                job.emit("text", piece)
            return self._finish(slot, "stop")
        piece = slot.checker.push(slot.decoder.feed(token))
        if piece:
            job.emit("text", piece)
        if slot.checker.stopped:
            return self._finish(slot, "stop")
        slot.token = token
        return True

    def _finish(self, slot: _Slot, reason: str) -> bool:
        if reason == "length":
            piece = slot.checker.push(slot.decoder.flush())
            if not slot.checker.stopped:
                piece += slot.checker.flush()
            else:
                reason = "stop"
            if piece:
                slot.job.emit("text", piece)
        slot.job.emit(
            "done",
            {
                "finish_reason": reason,
                "prompt_tokens": len(slot.job.prompt_ids),
                "completion_tokens": slot.generated,
            },
        )
        return False


# ---------------------------------------------------------------------------------------------------
# the HTTP app


@dataclass
class ServerConfig:
    model_name: str = "rwkv"
    api_key: str | None = None
    max_tokens_cap: int = 4096
    max_prompt_tokens: int = 16384
    max_request_bytes: int = 2**20
    embedder_name: str = "rwkv-embed"


class _Bridge:
    """Carries a job's events from the engine thread into the request's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def emit(self, kind: str, payload: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))


def _sampling(body: dict, cap: int, chat: bool) -> SamplingParams:
    """SamplingParams from OpenAI fields (chat requests default to the G1 chat demo's settings)."""
    defaults = CHAT_DEFAULTS if chat else {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _integer({"max_tokens": max_tokens}, "max_tokens", 16 if not chat else min(cap, 512), 1, cap)
    n = _integer(body, "n", 1, 1, 1)
    del n
    stops = _stop_strings(body)
    try:
        return SamplingParams(
            temperature=_number(body, "temperature", defaults.get("temperature", 1.0), 0.0, 2.0),
            top_p=_number(body, "top_p", defaults.get("top_p", 1.0), 0.0, 1.0),
            alpha_presence=_number(body, "presence_penalty", defaults.get("alpha_presence", 0.0), -2.0, 2.0),
            alpha_frequency=_number(
                body, "frequency_penalty", defaults.get("alpha_frequency", 0.0), -2.0, 2.0
            ),
            alpha_decay=defaults.get("alpha_decay", 0.996),
            stop_strings=(TURN_END, *stops) if chat else stops,
            max_tokens=max_tokens,
            seed=_integer(body, "seed", None, 0, 2**63 - 1),
        )
    except ValueError as e:
        raise APIError(400, str(e)) from None


def build_app(engine: Engine, config: ServerConfig, embedder_loader: Callable[[], Any] | None = None):
    """The FastAPI app serving `engine` (and the embedder `embedder_loader()` returns, loaded lazily)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="rwkv-serve", docs_url=None, redoc_url=None)
    tokenizer = engine.tokenizer
    embedder_box: dict[str, Any] = {}

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        return JSONResponse(APIError(400, f"invalid request: {e.errors()}").body(), status_code=400)

    async def _body(request: Request) -> dict:
        if config.api_key is not None:
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {config.api_key}":
                raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        raw = await request.body()
        if len(raw) > config.max_request_bytes:
            raise APIError(413, f"request body is {len(raw)} bytes; the limit is {config.max_request_bytes}")
        try:
            body = json.loads(raw or b"null")
        except ValueError as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        return body

    def _check_auth(request: Request) -> None:
        if (
            config.api_key is not None
            and request.headers.get("authorization", "") != f"Bearer {config.api_key}"
        ):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _generate(request: Request, body: dict, chat: bool):
        if chat:
            segments = [tokenizer.encode(s) for s in chat_segments(body.get("messages"))]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise APIError(400, "'prompt' must be a non-empty string", "prompt")
            segments = [tokenizer.encode(prompt)]
        n_prompt = sum(map(len, segments))
        if n_prompt == 0:
            raise APIError(400, "the prompt encodes to no tokens", "prompt")
        if n_prompt > config.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {n_prompt} tokens; the limit is {config.max_prompt_tokens}",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
        params = _sampling(body, config.max_tokens_cap, chat)
        stream = bool(body.get("stream", False))
        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage", False)) if isinstance(options, dict) else False
        bridge = _Bridge()
        job = Job(segments, params, bridge.emit)
        engine.submit(job)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage(done: dict) -> dict:
            p, c = done["prompt_tokens"], done["completion_tokens"]
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if first else {}
                if text is not None:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        async def events() -> AsyncIterator[tuple[str, Any]]:
            try:
                while True:
                    kind_, payload = await bridge.queue.get()
                    yield kind_, payload
                    if kind_ in ("done", "error"):
                        return
            finally:
                job.cancelled.set()  # a no-op after "done"; frees the slot of a client that went away

        if not stream:
            text, done = [], None
            async for kind_, payload in events():
                if kind_ == "text":
                    text.append(payload)
                elif kind_ == "error":
                    raise APIError(500, payload)
                else:
                    done = payload
            content = "".join(text)
            if chat:
                first = {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": None,
                    "finish_reason": done["finish_reason"],
                }
            else:
                first = choice(content, done["finish_reason"])
            return JSONResponse(
                {
                    "id": ident,
                    "object": kind,
                    "created": created,
                    "model": config.model_name,
                    "choices": [first],
                    "usage": usage(done),
                }
            )

        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def chunk(choices: list, **extra) -> str:
            obj = "chat.completion.chunk" if chat else "text_completion"
            return sse(
                {
                    "id": ident,
                    "object": obj,
                    "created": created,
                    "model": config.model_name,
                    "choices": choices,
                    **extra,
                }
            )

        async def body_stream() -> AsyncIterator[str]:
            if chat:
                yield chunk([choice("", None, first=True)])
            async for kind_, payload in events():
                if await request.is_disconnected():
                    return
                if kind_ == "text":
                    yield chunk([choice(payload, None)])
                elif kind_ == "error":
                    yield sse(APIError(500, payload).body())
                    break
                else:
                    yield chunk([choice(None if chat else "", payload["finish_reason"])])
                    if include_usage:
                        yield chunk([], usage=usage(payload))
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            body_stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def chat_completions(request: Request):
        return await _generate(request, await _body(request), chat=True)

    async def completions(request: Request):
        return await _generate(request, await _body(request), chat=False)

    async def embeddings(request: Request):
        body = await _body(request)
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(s, str) for s in inputs):
            raise APIError(400, "'input' must be a string or a non-empty list of strings", "input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise APIError(400, "'encoding_format' must be 'float' or 'base64'", "encoding_format")
        if "embedder" not in embedder_box:
            if embedder_loader is None:
                raise APIError(503, "no embedder is configured on this server", code="embedder_unavailable")
            try:
                embedder_box["embedder"] = await asyncio.to_thread(embedder_loader)
            except Exception as e:
                raise APIError(
                    503, f"the embedder could not be loaded: {e}", code="embedder_unavailable"
                ) from e
        emb = embedder_box["embedder"]
        vectors = await asyncio.to_thread(emb.encode, inputs, normalize_embeddings=True)
        count = getattr(emb, "count_tokens", None)
        n_tokens = sum(count(s) for s in inputs) if callable(count) else sum(len(s.split()) for s in inputs)

        def pack(v) -> list[float] | str:  # base64: little-endian float32 bytes, as OpenAI sends them
            if encoding == "base64":
                return base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii")
            return [float(x) for x in v]

        data = [{"object": "embedding", "index": i, "embedding": pack(v)} for i, v in enumerate(vectors)]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": config.embedder_name,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            }
        )

    async def models(request: Request):
        _check_auth(request)
        names = [config.model_name] + ([config.embedder_name] if embedder_loader is not None else [])
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": "rwkv_mm"} for n in names],
        }

    async def stats(request: Request):
        _check_auth(request)
        return engine.stats()

    for prefix in ("/v1", ""):
        app.add_api_route(f"{prefix}/chat/completions", chat_completions, methods=["POST"])
        app.add_api_route(f"{prefix}/completions", completions, methods=["POST"])
        app.add_api_route(f"{prefix}/embeddings", embeddings, methods=["POST"])
        app.add_api_route(f"{prefix}/models", models, methods=["GET"])
    app.add_api_route("/stats", stats, methods=["GET"])
    return app


# ---------------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rwkv-serve", description="OpenAI-compatible server for RWKV models")
    p.add_argument("--model", default=None, help="checkpoint or asset folder (default: the bundled tiny LM)")
    p.add_argument("--strategy", default="cpu fp32", help='"cpu fp32", "cpu bf16", "cuda fp16", ...')
    p.add_argument("--embedder", default=None, help="embedder folder (default: the bundled embedder)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--deterministic", action="store_true", help="pad steps to --max-batch rows")
    p.add_argument("--max-tokens-cap", type=int, default=4096, help="largest max_tokens accepted")
    p.add_argument("--max-prompt-tokens", type=int, default=16384)
    p.add_argument("--prefix-cache-mb", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the engine")
    p.add_argument("--model-name", default=None, help="the model id clients see (default: the file name)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .lm.chat import CLIError, load_model

    try:
        lm = load_model(args.model, args.strategy)
    except CLIError as e:
        print(f"rwkv-serve: {e}", file=sys.stderr)
        return 2
    tokenizer = lm.default_tokenizer()
    engine = Engine(
        lm,
        tokenizer,
        max_batch=args.max_batch,
        deterministic=args.deterministic,
        cache=PrefixCache(args.prefix_cache_mb * 2**20),
        threads=args.threads,
    )

    def load_embedder():
        from .embed import Embedder

        return Embedder.load(args.embedder)

    name = args.model_name or (args.model and args.model.rstrip("/").split("/")[-1]) or "rwkv-tiny"
    config = ServerConfig(
        model_name=name,
        api_key=args.api_key,
        max_tokens_cap=args.max_tokens_cap,
        max_prompt_tokens=args.max_prompt_tokens,
    )
    app = build_app(engine, config, load_embedder)
    import uvicorn

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "binding %s: the server is reachable from other machines%s",
            args.host,
            "" if args.api_key else " without an API key",
        )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
