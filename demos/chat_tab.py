"""Chat tab: streaming chat with an RWKV LM, one `ChatSession` per browser session.

The model is the bundled tiny LM (rwkv_mm/assets/tiny-lm), the app's `--lm PATH`, or a checkpoint the user
loads by path on the page. Models are loaded once and shared (their weights are read-only); each browser
session keeps its own `ChatSession` (recurrent state, history, sampler) in a `gr.State`, so two users
never share a conversation.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

logger = logging.getLogger(__name__)

BUNDLED_LM = "tiny-lm"
MAX_LOADED = 2  # models kept in memory (the default one + the last one a user loaded)


class UserInputError(ValueError):
    """Bad input from the page (shown to the user as a message, never a traceback)."""


@dataclass
class Sampling:
    """The sliders of the page (names as `rwkv_mm.lm.sampling.SamplingParams`)."""

    temperature: float = 1.0
    top_p: float = 0.3
    max_tokens: int = 200
    alpha_presence: float = 0.5
    alpha_frequency: float = 0.5

    def as_params(self) -> dict[str, Any]:
        return dict(
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            max_tokens=int(self.max_tokens),
            alpha_presence=float(self.alpha_presence),
            alpha_frequency=float(self.alpha_frequency),
        )


@dataclass
class ChatState:
    """What one browser session keeps: which model it talks to and its conversation."""

    model: str  # a key of ChatBackend's models: "" = the default model, else a resolved path
    session: Any = None  # rwkv_mm.lm.ChatSession, made on the first message

    def messages(self) -> list[dict[str, str]]:
        """The conversation in Gradio's messages format."""
        out: list[dict[str, str]] = []
        for user, reply in self.session.history if self.session is not None else []:
            out.append({"role": "user", "content": user})
            out.append({"role": "assistant", "content": reply})
        return out


def describe(lm: Any) -> str:
    """One line about a loaded model: version, layers, width, vocabulary."""
    c = lm.config
    return f"RWKV {c.version} ({c.name}), {c.n_layer} layers, width {c.n_embd}, vocabulary {c.vocab_size}"


class ChatBackend:
    """Loads models on demand (LRU of `MAX_LOADED`) and runs chat turns on per-session `ChatState`s.

    Args:
        default_lm: the model used until a user loads another: a checkpoint path / folder, or None for the
            bundled tiny LM.
        system: an optional system prompt for every session.
        seed: seeds every new session's sampler (reproducible replies); None = random.
    """

    def __init__(
        self, default_lm: str | Path | None = None, system: str | None = None, seed: int | None = None
    ) -> None:
        self.default_lm = str(default_lm) if default_lm else None
        self.system = system
        self.seed = seed
        self._lock = threading.Lock()
        self._models: OrderedDict[str, Any] = OrderedDict()

    def _default_path(self) -> Path:
        if self.default_lm:
            return Path(self.default_lm).expanduser()
        from rwkv_mm import assets

        return assets.ROOT / BUNDLED_LM

    def default_status(self) -> str:
        """What the page says about the default model before anything is loaded."""
        path = self._default_path()
        if not path.exists():
            return (
                f"No language model yet: {path} is missing (the bundled tiny LM is not installed). "
                "Load a checkpoint by path under **Model**."
            )
        name = "the bundled tiny LM" if not self.default_lm else str(path)
        return f"Model: {name}"

    def model(self, key: str) -> Any:
        """The loaded model for `key` ("" = default), loading it on first use."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            path = Path(key) if key else self._default_path()
            if not path.exists():
                if not key and not self.default_lm:
                    raise UserInputError(
                        "the bundled tiny LM is not installed; load a checkpoint by path under Model"
                    )
                raise UserInputError(f"no model at {path}")
            from rwkv_mm.lm import RWKVLM

            try:
                lm = RWKVLM.from_file(path)
                lm.default_tokenizer()  # fail here, not at the first message, when none fits
            except Exception as e:
                logger.exception("could not load %s", path)
                raise UserInputError(f"could not load {path}: {type(e).__name__}: {e}") from None
            self._models[key] = lm
            while len(self._models) > MAX_LOADED:
                old, _ = self._models.popitem(last=False)
                logger.info("unloaded %s", old or "the default model")
            return lm

    def warm_up(self) -> None:
        """Load the default model now when it exists and run it on a few tokens (which builds the compiled
        kernels on their first use), so that the first message answers at once."""
        if not self._default_path().exists():
            raise FileNotFoundError(self.default_status())
        import torch

        lm = self.model("")
        with torch.no_grad():
            _, state = lm(torch.zeros(1, 2, dtype=torch.long))  # prefill path
            lm(torch.zeros(1, 1, dtype=torch.long), state)  # one-token decode path

    def load(self, path: str, state: ChatState | None) -> tuple[ChatState, str]:
        """Switch this session to the checkpoint at `path` ("" = back to the default); a new conversation."""
        path = (path or "").strip()
        key = str(Path(path).expanduser().resolve()) if path else ""
        if path and not Path(key).exists():
            raise UserInputError(f"no checkpoint at {Path(path).expanduser()}")
        lm = self.model(key)
        state = ChatState(model=key)
        return state, f"Model: {key or 'default'} — {describe(lm)}"

    def session(self, state: ChatState | None, sampling: Sampling) -> ChatState:
        """This browser's state with a live ChatSession whose sampling follows the sliders."""
        from rwkv_mm.lm.chat import ChatSession

        state = state if state is not None else ChatState(model="")
        if state.session is None:
            lm = self.model(state.model)
            state.session = ChatSession(lm, system=self.system, seed=self.seed, **sampling.as_params())
        else:  # the sliders may have moved since the last turn
            params = state.session.params.replace(**sampling.as_params())
            state.session.params = params
            state.session.sampler.params = params
        return state

    def stream(self, message: str, state: ChatState | None, sampling: Sampling) -> Iterator[ChatState]:
        """Send `message`; yields the state after each streamed piece (read `messages()` for the page)."""
        if not (message or "").strip():
            raise UserInputError("type a message first")
        state = self.session(state, sampling)
        for _ in state.session.stream(message):
            yield state
        yield state

    def retry(self, state: ChatState | None, sampling: Sampling) -> Iterator[ChatState]:
        """Regenerate the last reply, streaming."""
        if state is None or state.session is None or not state.session.history:
            raise UserInputError("nothing to retry: send a message first")
        state = self.session(state, sampling)
        for _ in state.session.retry_stream():
            yield state
        yield state


# event functions take these as defaults: Gradio injects the tracker of the running event
PROGRESS = gr.Progress()


def build(backend: ChatBackend) -> ChatBackend:
    """Lay out the Chat tab inside the current gr.Blocks / gr.Tab context."""
    state = gr.State(None)
    model_status = gr.Markdown(backend.default_status(), elem_id="chat-model")
    chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chat-log")
    with gr.Row():
        message = gr.Textbox(
            placeholder="Type a message...", show_label=False, scale=6, elem_id="chat-msg", autofocus=True
        )
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
    with gr.Row():
        retry = gr.Button("Retry", size="sm", elem_id="chat-retry")
        reset = gr.Button("Reset", size="sm", elem_id="chat-reset")
    with gr.Accordion("Sampling", open=False):
        defaults = Sampling()
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05, label="Temperature")
            top_p = gr.Slider(0.0, 1.0, value=defaults.top_p, step=0.05, label="Top-p")
            max_tokens = gr.Slider(1, 1024, value=defaults.max_tokens, step=1, label="Max tokens")
        with gr.Row():
            presence = gr.Slider(0.0, 2.0, value=defaults.alpha_presence, step=0.05, label="Presence penalty")
            frequency = gr.Slider(
                0.0, 2.0, value=defaults.alpha_frequency, step=0.05, label="Frequency penalty"
            )
    with gr.Accordion("Model", open=False):
        with gr.Row():
            lm_path = gr.Textbox(
                label="Your RWKV checkpoint (.pth / .safetensors / model folder); empty = default",
                placeholder="e.g. ~/models/rwkv7-g1-0.1b.pth",
                scale=4,
                elem_id="chat-lm-path",
            )
            load = gr.Button("Load", scale=1, elem_id="chat-load")

    sliders = [temperature, top_p, max_tokens, presence, frequency]

    def chat(text, t, p, n, pres, freq, st):
        try:
            for new in backend.stream(text, st, Sampling(t, p, int(n), pres, freq)):
                yield "", new.messages(), new
        except UserInputError as e:
            raise gr.Error(str(e), print_exception=False) from None

    def regenerate(t, p, n, pres, freq, st):
        try:
            for new in backend.retry(st, Sampling(t, p, int(n), pres, freq)):
                yield new.messages(), new
        except UserInputError as e:
            raise gr.Error(str(e), print_exception=False) from None

    def forget(st):
        if st is not None and st.session is not None:
            st.session.reset()
        return [], st

    def load_model(path, st, progress=PROGRESS):
        progress(0, desc=f"loading {path or 'the default model'}")
        try:
            st, text = backend.load(path, st)
        except UserInputError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return [], st, text

    # one CPU model: every event that runs the LM queues in one line, one at a time (which also keeps a
    # session from generating twice at once)
    lm_queue = dict(concurrency_id="chat-lm", concurrency_limit=1)
    chat_io = dict(inputs=[message, *sliders, state], outputs=[message, chatbot, state], **lm_queue)
    send.click(chat, **chat_io, api_name="chat")
    message.submit(chat, **chat_io, api_visibility="private")
    retry.click(regenerate, [*sliders, state], [chatbot, state], api_name="chat_retry", **lm_queue)
    reset.click(forget, [state], [chatbot, state], api_name="chat_reset", **lm_queue)
    load.click(load_model, [lm_path, state], [chatbot, state, model_status], api_name="chat_load", **lm_queue)
    return backend
