"""Chat with an RWKV LM: `ChatSession` (streaming, cached system prompt, retry, session files) and the
`rwkv-chat` CLI.

Prompt format of the World / G1 models (BlinkDL/RWKV-LM ``RWKV-v7/RWKV7-G1x-templates.txt``, ChatRWKV
``API_DEMO_CHAT.py``)::

    System: <system>\\n\\nUser: <message>\\n\\nAssistant: <reply>\\n\\nUser: <message>\\n\\nAssistant:

Each message is cleaned first (\\r\\n -> \\n, runs of newlines -> one \\n, stripped) because "\\n\\n"
separates turns. A reply ends at "\\n\\n", at end of text (token 0) or after `max_tokens`; the state
always ends with the reply followed by "\\n\\n" (fed lazily with the next message), so the next turn
continues the transcript exactly. Sampling defaults are the G1 chat demo's (temperature 1.0, top_p 0.3,
presence / frequency penalty 0.5, decay 0.996), penalties restarting with each reply.

The CLI follows ChatRWKV ``v2/chat.py``: plain lines chat; ``++`` retries the last reply from the saved
state; ``+reset``, ``+gen <text>`` (free generation), ``+save <file>``, ``+load <file>``, ``+help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import weakref
from collections.abc import Iterator
from dataclasses import asdict
from os import PathLike
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..core.state import RWKVState
from .sampling import Sampler, SamplingParams, StopChecker
from .tokenizer import Tokenizer

__all__ = ["ChatSession", "clean_message", "load_model", "main"]

logger = logging.getLogger(__name__)

USER, ASSISTANT, SYSTEM = "User", "Assistant", "System"
TURN_END = "\n\n"
CHAT_DEFAULTS = dict(  # the G1 chat demo (API_DEMO_CHAT.py), stopping at the turn separator
    temperature=1.0,
    top_p=0.3,
    alpha_presence=0.5,
    alpha_frequency=0.5,
    alpha_decay=0.996,
    stop_strings=(TURN_END,),
    max_tokens=500,
)
CHUNK_LEN = 256  # prefill in pieces of this many tokens (bounds the activation memory)
FILE_FORMAT = "rwkv_mm.chat"
FILE_VERSION = 1

# system-prompt states per model, shared by its sessions: {lm: {(tokenizer, system): state}}; states are
# never modified in place (RWKVLM.forward returns new ones), so sharing them cannot leak between sessions
_SYSTEM_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def clean_message(text: str) -> str:
    """A message as it goes into the prompt: \\r\\n -> \\n, runs of newlines -> one \\n, stripped."""
    if not isinstance(text, str):
        raise ValueError(f"a message must be a str, got {type(text).__name__}")
    return re.sub(r"\n+", "\n", text.replace("\r\n", "\n").replace("\r", "\n")).strip()


class _Trim:
    """Streams text without its leading and trailing whitespace: trailing whitespace is held back until
    more text follows, so the pieces always join to ``full_text.strip()``."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""
        self.text = ""

    def push(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        body = (self.held + piece).rstrip()
        if not body:
            self.held += piece
            return ""
        out = (self.held + piece)[: len(body)]
        self.held = (self.held + piece)[len(body) :]
        self.text += out
        return out


class ChatSession:
    """A conversation with an RWKV LM, one recurrent state carried from turn to turn.

    Args:
        lm: the model (`RWKVLM`, or anything with `lm(tokens [1, T], state) -> (logits [1, V], state)` and
            `init_state(1)`).
        tokenizer: its tokenizer; None takes `lm.default_tokenizer()`. Defaults to None.
        system: a system prompt, fed once as "System: ...\\n\\n"; its state is computed once per model and
            reused by `reset` and by every session of the same model. Defaults to None.
        state: the state to start from (e.g. a state-tuned file's); never modified. Defaults to
            `lm.init_state(1)`.
        params: sampling parameters; None takes the G1 chat defaults (`CHAT_DEFAULTS`). Defaults to None.
        generator: the random source; None seeds one from `seed` (when given) or at random.
        **sampling: `SamplingParams` fields overriding `params` (e.g. `temperature=0.7, seed=1`).

    Example:
        >>> chat = ChatSession(lm, tok, system="You are terse.", seed=0)
        >>> for piece in chat.stream("Hello"): print(piece, end="")
        >>> chat.retry()                    # another reply to "Hello"
    """

    def __init__(
        self,
        lm,
        tokenizer: Tokenizer | None = None,
        system: str | None = None,
        state: RWKVState | None = None,
        params: SamplingParams | None = None,
        generator: torch.Generator | None = None,
        **sampling,
    ) -> None:
        base = SamplingParams.from_dict(CHAT_DEFAULTS) if params is None else params
        self._configure(lm, tokenizer, base.replace(**sampling) if sampling else base, generator)
        self.system = clean_message(system) if system else ""
        self._start = state
        self._base = self._system_state(state)
        self.reset()

    def _configure(self, lm, tokenizer, params: SamplingParams, generator) -> None:
        self.lm = lm
        self.tokenizer = tokenizer if tokenizer is not None else lm.default_tokenizer()
        self.params = params
        self.sampler = Sampler.for_tokenizer(params, self.tokenizer, generator)

    # ------------------------------------------------------------------------------------------------
    # state

    def _system_state(self, start: RWKVState | None) -> RWKVState:
        """The state after the system prompt (cached per model when starting from the model's own state)."""
        begin = start if start is not None else self.lm.init_state(1)
        if start is not None and start.batch_size != 1:
            raise ValueError(f"state must have batch size 1, got {start.batch_size}")
        if not self.system:
            return begin
        key = (self.tokenizer.name, self.tokenizer.vocab_size, self.system)
        cache = None
        if start is None:
            try:
                cache = _SYSTEM_CACHE.setdefault(self.lm, {})
            except TypeError:  # not weak-referenceable: no sharing
                cache = None
        if cache is not None and key in cache:
            return cache[key]
        tokens = self.tokenizer.encode(f"{SYSTEM}: {self.system}{TURN_END}")
        _, state = self._prefill(tokens, begin)
        if cache is not None:
            cache[key] = state
        return state

    @torch.no_grad()
    def _prefill(self, tokens: list[int], state: RWKVState) -> tuple[Tensor, RWKVState]:
        """Feed tokens in chunks. Returns (logits [V] after the last one, new state)."""
        if not tokens:
            raise ValueError("nothing to feed: the prompt encodes to no tokens")
        device = state.layers[0]["att_shift"].device
        logits = None
        for i in range(0, len(tokens), CHUNK_LEN):
            chunk = torch.tensor([tokens[i : i + CHUNK_LEN]], dtype=torch.long, device=device)
            logits, state = self.lm(chunk, state)
        return logits[0], state

    def reset(self) -> None:
        """Forget the conversation: back to the state after the system prompt (no prefill needed)."""
        self.history: list[list[str]] = []  # [user message, reply] per turn
        self._state = self._base  # everything fed so far
        self._pending: list[int] = []  # tokens to feed before the next prompt
        self._pre_reply: tuple[RWKVState, Tensor] | None = None  # (state, logits [V]) after the prompt
        self.finish_reason: str | None = None  # of the last reply: "stop", "length" or None (interrupted)

    # ------------------------------------------------------------------------------------------------
    # chat

    def stream(self, message: str) -> Iterator[str]:
        """Send `message` and yield the reply as it is generated (pieces join to `send`'s result).

        Finish (or close) one stream before starting the next call on the same session; a stream closed
        early keeps the reply shown so far.

        Raises:
            ValueError: the message is empty after cleaning.
        """
        msg = clean_message(message)
        if not msg:
            raise ValueError("message is empty (after stripping whitespace and blank lines)")
        return self._turn(msg)

    def _turn(self, msg: str) -> Iterator[str]:
        tokens = self._pending + self.tokenizer.encode(f"{USER}: {msg}{TURN_END}{ASSISTANT}:")
        logits, state = self._prefill(tokens, self._state)
        self._pre_reply = (state, logits)
        self._pending = []
        self.history.append([msg, ""])
        yield from self._reply(state, logits)

    def send(self, message: str) -> str:
        """Send `message`; returns the whole reply (stripped)."""
        return "".join(self.stream(message))

    def retry_stream(self, seed: int | None = None) -> Iterator[str]:
        """Regenerate the last reply from the state saved before it, streaming.

        Args:
            seed: reseed the generator first (the same seed as the original reply reproduces it);
                None continues the generator, giving a new draw. Defaults to None.

        Raises:
            RuntimeError: there is no reply to retry.
        """
        if self._pre_reply is None or not self.history:
            raise RuntimeError("nothing to retry: send a message first")
        if seed is not None:
            self.sampler.generator.manual_seed(seed)
        state, logits = self._pre_reply
        self.history[-1][1] = ""
        return self._reply(state, logits)

    def retry(self, seed: int | None = None) -> str:
        """Regenerate the last reply (see `retry_stream`); returns it."""
        return "".join(self.retry_stream(seed))

    def _reply(self, state: RWKVState, logits: Tensor) -> Iterator[str]:
        """Generate one reply after the prompt (state, logits [V]); updates the session when it ends."""
        pre_state = state
        trim = _Trim()
        run = _Generation(self, state, logits, self.params.stop_strings)
        try:
            for piece in run:
                out = trim.push(piece)
                if out:
                    yield out
        finally:  # also when the caller stops iterating early: keep the session consistent
            self.history[-1][1] = trim.text
            self._state, self._pending = run.after_turn(pre_state)
            self.finish_reason = run.finish_reason

    # ------------------------------------------------------------------------------------------------
    # free generation

    def stream_generate(self, text: str, max_tokens: int | None = None) -> Iterator[str]:
        """Continue `text` from the model's initial state, streaming; the chat is left untouched.

        Stops at a stop token or after `max_tokens` (default: the session's); the text is not cleaned.
        """
        if not isinstance(text, str) or not text:
            raise ValueError(f"text must be a non-empty str, got {text!r}")
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0
        ):
            raise ValueError(f"max_tokens must be an int >= 0, got {max_tokens!r}")
        return self._free(text, max_tokens)

    def _free(self, text: str, max_tokens: int | None) -> Iterator[str]:
        start = self._start if self._start is not None else self.lm.init_state(1)
        logits, state = self._prefill(self.tokenizer.encode(text), start)
        run = _Generation(self, state, logits, (), max_tokens)
        try:
            yield from run
        finally:
            self.finish_reason = run.finish_reason

    def generate(self, text: str, max_tokens: int | None = None) -> str:
        """Continue `text` (see `stream_generate`); returns the continuation."""
        return "".join(self.stream_generate(text, max_tokens))

    # ------------------------------------------------------------------------------------------------
    # session files

    def save(self, path: str | PathLike) -> None:
        """Write the whole session to one safetensors file: the states as tensors, the history, sampling
        parameters, pending tokens and generator state in its metadata (json). A session loaded from it
        continues exactly as this one would."""
        tensors: dict[str, Tensor] = {"rng": self.sampler.generator.get_state()}
        _put_state(tensors, "state", self._state)
        _put_state(tensors, "base", self._base)
        if self._start is not None:
            _put_state(tensors, "start", self._start)
        if self._pre_reply is not None:
            pre_state, pre_logits = self._pre_reply
            _put_state(tensors, "pre_reply", pre_state)
            tensors["pre_reply_logits"] = pre_logits.detach().float().cpu().contiguous()
        session = {
            "version": FILE_VERSION,
            "system": self.system,
            "history": self.history,
            "pending": self._pending,
            "params": asdict(self.params),
            "occurrence": [[t, c] for t, c in self.sampler.occurrence.items()],
            "tokenizer": [self.tokenizer.name, self.tokenizer.vocab_size],
        }
        save_file(tensors, str(path), metadata={"format": FILE_FORMAT, "session": json.dumps(session)})

    @classmethod
    def load(cls, path: str | PathLike, lm, tokenizer: Tokenizer | None = None) -> ChatSession:
        """Read a session written by `save`, for the same model (and tokenizer).

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a session file, or written for a model / tokenizer of other shapes.
        """
        if not Path(path).is_file():
            raise FileNotFoundError(f"no chat session file at {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # noqa: BLE001 -- safetensors raises its own error types
            raise ValueError(f"{path} is not a chat session file ({err})") from None
        if meta.get("format") != FILE_FORMAT:
            raise ValueError(f"{path} is not a chat session file (format {meta.get('format')!r})")
        session = json.loads(meta["session"])
        if session.get("version") != FILE_VERSION:
            raise ValueError(f"{path}: unsupported chat session version {session.get('version')!r}")
        self = cls.__new__(cls)
        self._configure(lm, tokenizer, SamplingParams.from_dict(_tuples(session["params"])), None)
        saved_tok = session["tokenizer"]
        if [self.tokenizer.name, self.tokenizer.vocab_size] != saved_tok:
            raise ValueError(
                f"{path} was saved with tokenizer {saved_tok[0]!r} ({saved_tok[1]} ids), "
                f"got {self.tokenizer.name!r} ({self.tokenizer.vocab_size} ids)"
            )
        like = lm.init_state(1)
        self.system = session["system"]
        self._state = _get_state(tensors, "state", like, path)
        self._base = _get_state(tensors, "base", like, path)
        self._start = _get_state(tensors, "start", like, path) if _has_state(tensors, "start") else None
        self.history = [list(turn) for turn in session["history"]]
        self._pending = list(session["pending"])
        self._pre_reply = None
        if _has_state(tensors, "pre_reply"):
            logits = tensors["pre_reply_logits"].to(like.layers[0]["att_shift"].device)
            self._pre_reply = (_get_state(tensors, "pre_reply", like, path), logits)
        self.sampler.generator.set_state(tensors["rng"])
        self.sampler.occurrence = {int(t): float(c) for t, c in session["occurrence"]}
        self.finish_reason = None
        return self

    def __repr__(self) -> str:
        return f"ChatSession(turns={len(self.history)}, system={self.system[:40]!r}, params={self.params})"


class _Generation:
    """One sampling loop after a prompt: iterate for the shown text pieces (stop strings held back).

    After it ends: `state` has consumed every sampled token except `unfed`; `raw_text` is the decoded
    text of all sampled tokens (stop tokens excluded); `checker` tells how it stopped.
    """

    def __init__(self, session: ChatSession, state: RWKVState, logits: Tensor, stop_strings, max_tokens=None):
        p = session.params
        self.session = session
        self.state, self.logits = state, logits
        self.max_tokens = p.max_tokens if max_tokens is None else max_tokens
        self.checker = StopChecker(stop_strings, p.stop_tokens)
        self.unfed: list[int] = []
        self.raw_text = ""
        self.finish_reason: str | None = None  # "stop" (stop token or string) or "length" (max_tokens)

    @torch.no_grad()
    def __iter__(self) -> Iterator[str]:
        s, checker = self.session, self.checker
        s.sampler.reset()
        decoder = s.tokenizer.stream_decoder()
        logits = self.logits
        device = self.state.layers[0]["att_shift"].device
        for step in range(self.max_tokens):
            token = s.sampler(logits)
            if token in checker.stop_tokens:
                piece = self._text(decoder.flush())
                if not checker.stopped:
                    piece += checker.feed(token, "")  # releases the held-back text
                self.finish_reason = "stop"
                if piece:
                    yield piece
                return
            self.unfed = [token]
            piece = self._text(decoder.feed(token))
            if checker.stopped:
                self.finish_reason = "stop"
            if piece:
                yield piece
            if checker.stopped or step + 1 == self.max_tokens:
                break
            out, self.state = s.lm(torch.tensor([[token]], dtype=torch.long, device=device), self.state)
            logits = out[0]
            self.unfed = []
        if not checker.stopped:  # max_tokens reached
            self.finish_reason = "length"
            piece = self._text(decoder.flush())
            if checker.stopped:  # the flushed bytes completed a stop string
                self.finish_reason = "stop"
            else:
                piece += checker.flush()
            if piece:
                yield piece

    def _text(self, text: str) -> str:
        self.raw_text += text
        return self.checker.push(text)

    def after_turn(self, pre_state: RWKVState) -> tuple[RWKVState, list[int]]:
        """(state, pending tokens) that continue the transcript as "...<reply>\\n\\n" for the next turn.

        Args:
            pre_state: the state before the reply (after the prompt).
        """
        checker, tokenizer = self.checker, self.session.tokenizer
        if checker.reason == "string":
            if not checker.tail and self.raw_text.endswith(TURN_END):
                return self.state, self.unfed  # the state ends right after "\n\n" (but the last token)
            # the stop string ended inside a token or is not the turn separator: re-feed the reply as shown
            return pre_state, tokenizer.encode(checker.text.rstrip("\n") + TURN_END)
        sep = "\n" if self.raw_text.endswith("\n") else TURN_END
        return self.state, self.unfed + tokenizer.encode(sep)


def _tuples(params: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}


def _put_state(tensors: dict[str, Tensor], prefix: str, state: RWKVState) -> None:
    tensors[f"{prefix}.version"] = torch.tensor([int(state.version[1:])])
    for i, layer in enumerate(state.layers):
        for name, t in layer.items():
            tensors[f"{prefix}.{i}.{name}"] = t.detach().cpu().clone()  # states may share storage


def _has_state(tensors: dict[str, Tensor], prefix: str) -> bool:
    return f"{prefix}.version" in tensors


def _get_state(tensors: dict[str, Tensor], prefix: str, like: RWKVState, path) -> RWKVState:
    """The state stored under `prefix`, checked against `like` (the model's) and moved to its device."""
    version = f"v{int(tensors[f'{prefix}.version'][0])}"
    layers = []
    for i, ref in enumerate(like.layers):
        layer = {}
        for name, t in ref.items():
            key = f"{prefix}.{i}.{name}"
            if key not in tensors or tensors[key].shape != t.shape or version != like.version:
                got = list(tensors[key].shape) if key in tensors else "missing"
                raise ValueError(
                    f"{path} was saved for another model: {prefix} state {version} {key} is {got}, "
                    f"the model's {like.version} state needs {list(t.shape)}"
                )
            layer[name] = tensors[key].to(device=t.device, dtype=t.dtype)
        layers.append(layer)
    extra = [k for k in tensors if k.startswith(f"{prefix}.{len(like.layers)}.")]
    if extra:
        raise ValueError(f"{path} was saved for a model with more layers than {len(like.layers)}")
    return RWKVState(version, layers)


# ----------------------------------------------------------------------------------------------------------
# the rwkv-chat CLI

HELP = """Commands:
  <text>          chat (the reply streams back)
  ++              retry: another reply to your last message
  +reset          start the conversation again (the system prompt is kept)
  +gen <text>     free generation: continue <text> (the chat is left as it is)
  +save <file>    save the whole session (state, history, sampling, random state)
  +load <file>    load a saved session
  +help           this help
  +exit           quit (or end of input)"""
DIRECT_STRATEGIES = {"cpu fp32": ("cpu", torch.float32), "cpu bf16": ("cpu", torch.bfloat16)}
NO_MODEL_HINT = "pass --model PATH (an RWKV .pth / .safetensors checkpoint or a model folder)"


class CLIError(Exception):
    """A problem the CLI reports in one line before exiting with status 2."""


def load_model(model: str | None, strategy: str = "cpu fp32"):
    """The LM for the CLI: `model` (a checkpoint path or folder; None = the bundled tiny LM) under a
    strategy. "cpu fp32" and "cpu bf16" load directly; other strategies ("cuda fp16", "cpu fp32i8", ...)
    go through `rwkv_mm.lm.compat.RWKV`.

    Raises:
        CLIError: no model, or a strategy that cannot run here.
    """
    from .model import RWKVLM

    if model is None:
        from rwkv_mm import assets

        try:
            path = assets.path("tiny-lm")
        except FileNotFoundError:
            raise CLIError(
                f"the bundled tiny LM (asset 'tiny-lm') is not installed; {NO_MODEL_HINT}"
            ) from None
        if not (path / "model.safetensors").is_file():
            raise CLIError(f"the bundled tiny LM has no model.safetensors in {path}; {NO_MODEL_HINT}")
    else:
        path = Path(model).expanduser()
    key = " ".join(strategy.split()).lower()
    try:
        if key in DIRECT_STRATEGIES:
            if not path.exists():
                raise FileNotFoundError(f"no model at {path}")
            device, dtype = DIRECT_STRATEGIES[key]
            return RWKVLM.from_file(path, dtype=dtype, device=device)
        try:
            from .compat import RWKV
        except ImportError as err:
            choices = ", ".join(repr(s) for s in DIRECT_STRATEGIES)
            raise CLIError(f"strategy {strategy!r} needs rwkv_mm.lm.compat ({err}); use {choices}") from None
        return RWKV(model=str(path), strategy=strategy, verbose=False).lm
    except (FileNotFoundError, ValueError, RuntimeError, NotImplementedError, OSError) as err:
        raise CLIError(str(err)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rwkv-chat",
        description="Chat with an RWKV language model in the terminal (streaming). Type +help for commands.",
        epilog='examples:\n  rwkv-chat\n  rwkv-chat --model rwkv7-g1-0.1b.pth --strategy "cpu fp32"\n'
        '  rwkv-chat --prompt "Tell me a joke" --seed 0\n  printf "hi\\n++\\n" | rwkv-chat',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", help="checkpoint (.pth / .safetensors) or model folder (default: bundled tiny LM)"
    )
    p.add_argument("--strategy", default="cpu fp32", help='device and dtype, e.g. "cpu fp32", "cpu bf16"')
    p.add_argument("--temperature", type=float, default=CHAT_DEFAULTS["temperature"])
    p.add_argument("--top-p", type=float, default=CHAT_DEFAULTS["top_p"])
    p.add_argument("--max-tokens", type=int, default=CHAT_DEFAULTS["max_tokens"], help="per reply")
    p.add_argument("--seed", type=int, default=None, help="random seed (replies reproducible)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--prompt", default=None, help="send one message, print the reply and exit")
    return p


def _print_stream(pieces: Iterator[str], out) -> None:
    for piece in pieces:
        out.write(piece)
        out.flush()
    out.write("\n\n")
    out.flush()


def _command(session: ChatSession, line: str, out) -> ChatSession | None:
    """Run one REPL line; returns the session to go on with (None = quit)."""
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd in ("+exit", "+quit"):
        return None
    if cmd == "+help":
        out.write(HELP + "\n\n")
    elif cmd == "+reset":
        session.reset()
        out.write("Chat reset.\n\n")
    elif cmd == "++":
        if not session.history:
            out.write("Nothing to retry: send a message first.\n\n")
        else:
            out.write(f"{ASSISTANT}: ")
            _print_stream(session.retry_stream(), out)
    elif cmd == "+gen":
        if not arg:
            out.write("Usage: +gen <text>\n\n")
        else:
            out.write(arg)
            _print_stream(session.stream_generate(arg), out)
    elif cmd in ("+save", "+load"):
        if not arg:
            out.write(f"Usage: {cmd} <file>\n\n")
        elif cmd == "+save":
            try:
                session.save(arg)
                out.write(f"Saved the session to {arg}\n\n")
            except OSError as err:
                out.write(f"Cannot save to {arg}: {err}\n\n")
        else:
            try:
                session = ChatSession.load(arg, session.lm, session.tokenizer)
                out.write(f"Loaded {arg} ({len(session.history)} turns)\n\n")
            except (OSError, ValueError) as err:
                out.write(f"Cannot load {arg}: {err}\n\n")
    elif cmd.startswith("+"):
        out.write(f"Unknown command {cmd}; type +help\n\n")
    else:
        out.write(f"{ASSISTANT}: ")
        _print_stream(session.stream(line), out)
    out.flush()
    return session


def _lines(interactive: bool) -> Iterator[str]:
    if interactive:
        while True:
            try:
                yield input(f"{USER}: ")
            except EOFError:
                print()
                return
    else:
        for line in sys.stdin:
            yield line.rstrip("\r\n")


def main(argv: list[str] | None = None) -> int:
    """`rwkv-chat`: an interactive chat (or one reply with --prompt). Returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")  # model text on a non-UTF-8 terminal
    try:
        params = SamplingParams.from_dict(CHAT_DEFAULTS).replace(
            temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed
        )
        lm = load_model(args.model, args.strategy)
        session = ChatSession(lm, system=args.system, params=params)
    except (CLIError, ValueError) as err:
        print(f"rwkv-chat: error: {err}", file=sys.stderr)
        return 2
    out = sys.stdout
    if args.prompt is not None:
        if not clean_message(args.prompt):
            print("rwkv-chat: error: --prompt is empty", file=sys.stderr)
            return 2
        for piece in session.stream(args.prompt):
            out.write(piece)
            out.flush()
        out.write("\n")
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        out.write("rwkv-chat: type a message, +help for commands, Ctrl-D to quit.\n\n")
    try:
        for line in _lines(interactive):
            if not clean_message(line):
                continue
            session = _command(session, line.strip(), out)
            if session is None:
                break
    except KeyboardInterrupt:
        out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
