"""A drop-in for the `rwkv` pip package (0.8.32): `RWKV`, `PIPELINE`, `PIPELINE_ARGS`, strategy strings.

Code written for the package keeps working with rwkv_mm's model underneath::

    from rwkv_mm.lm.compat import RWKV, PIPELINE, PIPELINE_ARGS

    model = RWKV(model="rwkv7-g1-0.1b", strategy="cpu fp32")      # ".pth" appended when missing
    out, state = model.forward([510, 444], None)                   # logits [V], the package's state list
    pipeline = PIPELINE(model, "rwkv_vocab_v20230424")
    text = pipeline.generate("User: hi\\n\\nAssistant:", token_count=50, args=PIPELINE_ARGS(top_p=0.5))

Source of the behaviour: `rwkv/model.py` and `rwkv/utils.py` of the package (BlinkDL/ChatRWKV
`rwkv_pip_package`). What is the same: the calls and their defaults, the per-layer state lists (below), the
strategy syntax and its layer plan, `PIPELINE.generate`'s penalties, stop tokens, chunked prefill and
callback, and `sample_logits`' filtering, drawing from numpy's global generator on the CPU as the package
does (so `np.random.seed(n)` reproduces its samples). What differs, on purpose:

- when rounding keeps the cumulative probability below top_p (e.g. top_p = 1.0) every token stays a
  candidate (`rwkv_mm.lm.sampling.filtered_probs`), where the package keeps only the most likely one;

- one class for every version (v4 to v7, detected from the keys: no ``RWKV_V7_ON``); a path that exists
  is used as given (``.pth``, ``.safetensors`` or an rwkv_mm asset folder), else ".pth" is appended;
- a state passed in is never modified (the package's v4-v6 and CUDA paths modify it in place);
- "cpu int8" is accepted for "cpu fp32i8"; i8 on any version (the package's RWKV-7 has none);
- a strategy must run the whole model on one device and dtype (splits parse but are refused when run);
- logging instead of prints; ``convert_and_save_and_exit`` is refused (use
  ``python -m rwkv_mm.lm.checkpoint convert``).

State lists (no batch dimension), per layer in order:

| version    | tensors                                                                                  |
|------------|------------------------------------------------------------------------------------------|
| v7         | att_x [C] (activation dtype), S [H, N, N] float32 **[value, key]**, ffn_x [C]            |
| v5, v6     | att_x [C], S [H, N, N] float32 **[key, value]** (the package's CPU layout), ffn_x [C]    |
| v4         | att_x [C], aa [C], bb [C], pp [C] (float32; pp starts at -1e30), ffn_x [C]               |

rwkv_mm's `RWKVState` keeps every matrix state as [value, key] (ARCHITECTURE.md); `state_from_package` and
`state_to_package` convert.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..core.state import LAYOUTS, RWKVState
from .checkpoint import load_checkpoint
from .model import RWKVLM
from .sampling import filtered_probs
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "PIPELINE",
    "PIPELINE_ARGS",
    "RWKV",
    "Placement",
    "check_devices",
    "parse_strategy",
    "state_from_package",
    "state_to_package",
]

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANTS = ("i8", "i4", "i3")
DEVICE_RE = re.compile(r"cuda(?::\d+)?|cpu|mps|dml")
DTYPE_RE = re.compile(r"(fp32|fp16|bf16)(i8|i4|i3)?")
COUNT_RE = re.compile(r"\*(\d+)(\+?)")
WORLD_NAME = "rwkv_vocab_v20230424"
NEOX_NAME = "20B_tokenizer.json"
NO_PENALTY_TEXT = " \t0123456789"  # a token whose text is a substring of this adds no penalty weight


# ----------------------------------------------------------------------------------------------------------
# strategies


class Placement(NamedTuple):
    """Where and how one layer runs, as a strategy string says.

    Args:
        device: "cpu", "cuda", "cuda:1", "mps" or "dml".
        dtype: activation (and weight) dtype: torch.float32, float16 or bfloat16.
        quant: weight quantisation: "" (none), "i8", "i4" or "i3".
        stream: the layer's weights are kept on the CPU and streamed to the device (a trailing `+`).
    """

    device: str
    dtype: torch.dtype
    quant: str = ""
    stream: bool = False


class _Stage(NamedTuple):
    placement: Placement
    count: int | None  # the `*N`; None: share the layers nobody claimed


def _parse_stages(strategy: str) -> list[_Stage]:
    """Syntax only: 'device dtype[quant] [*N[+]]' stages joined by '->'."""
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a string such as 'cpu fp32', got {type(strategy).__name__}")
    stages = []
    for part in strategy.split("->"):
        words = part.split()
        if len(words) not in (2, 3):
            raise ValueError(
                f"invalid strategy {strategy!r}: stage {part.strip()!r} must be 'device dtype [*N]' "
                "(e.g. 'cpu fp32', 'cuda fp16i8 *10', 'cuda fp16 *0+')"
            )
        device, spec = words[0], words[1]
        if not DEVICE_RE.fullmatch(device):
            raise ValueError(
                f"invalid strategy {strategy!r}: unknown device {device!r} "
                "(expected cpu, cuda, cuda:N, mps or dml)"
            )
        if spec == "int8":  # rwkv_mm's alias: int8 weights, fp32 activations (what rwkv_mm.lm.quant runs)
            spec = "fp32i8"
        m = DTYPE_RE.fullmatch(spec)
        if not m:
            raise ValueError(
                f"invalid strategy {strategy!r}: unknown dtype {spec!r} (expected fp32, fp16 or bf16, "
                "optionally followed by i8 / i4 / i3, or int8)"
            )
        count, stream = None, False
        if len(words) == 3:
            c = COUNT_RE.fullmatch(words[2])
            if not c:
                raise ValueError(
                    f"invalid strategy {strategy!r}: layer count {words[2]!r} must be '*N' or '*N+'"
                )
            count, stream = int(c.group(1)), c.group(2) == "+"
        stages.append(_Stage(Placement(device, DTYPES[m.group(1)], m.group(2) or "", stream), count))
    if sum(s.placement.stream for s in stages) > 1:
        raise ValueError(f"invalid strategy {strategy!r}: at most one stage can stream ('*N+')")
    return stages


def _plan(stages: list[_Stage], n_slots: int) -> list[int]:
    """How many of `n_slots` layers each stage gets, as the package plans them: stages with `*N` take N
    in order until all are placed; the rest are shared evenly by stages without a count (the last
    one takes the remainder); a streaming stage takes every layer left over."""
    plan = [0] * len(stages)
    placed = 0
    uncounted = 0
    stream_at = next((i for i, s in enumerate(stages) if s.placement.stream), None)
    for i, s in enumerate(stages):
        if s.count is None:
            uncounted += 1
            continue
        plan[i] = s.count
        placed += s.count
        if placed >= n_slots:  # this stage fills the model; the later ones get nothing
            plan[i] -= placed - n_slots
            placed = n_slots
            break
    if stream_at is not None:
        plan[stream_at] += n_slots - placed
        return plan
    if uncounted and placed < n_slots:
        for i in range(len(stages)):
            if stages[i].count is None:  # (the package also hands layers to '*0' stages, or divides by 0)
                plan[i] = (n_slots - placed) // uncounted
                placed += plan[i]
                uncounted -= 1
    plan[-1] += n_slots - placed
    return plan


def parse_strategy(strategy: str, n_layer: int) -> list[Placement]:
    """The placement of every layer under a strategy string, with the package's syntax and layer plan.

    Syntax: stages joined by "->", each "device dtype[quant] [*N[+]]": device cpu | cuda | cuda:N | mps |
    dml; dtype fp32 | fp16 | bf16, optionally followed by quant i8 | i4 | i3 ("int8" = "fp32i8"); "*N"
    gives the stage N layers, "*N+" also streams the layers left over.
    Examples: "cpu fp32", "cpu fp32i8", "cuda fp16 *10 -> cpu fp32", "cuda fp16i8 *10 -> cuda fp16".

    Args:
        strategy: the strategy string.
        n_layer: L, the model's number of blocks.

    Returns:
        L + 1 placements: one per block, then one for ln_out + head (the package counts them as a layer).

    Raises:
        ValueError: a malformed strategy, naming the stage or word at fault.
    """
    if n_layer < 1:
        raise ValueError(f"n_layer must be >= 1, got {n_layer}")
    stages = _parse_stages(strategy)
    plan = _plan(stages, n_layer + 1)
    placements = []
    for stage, n in zip(stages, plan, strict=True):
        streamed = n - stage.count if stage.placement.stream else 0  # the layers beyond *N
        for j in range(n):
            placements.append(stage.placement._replace(stream=stage.placement.stream and j >= n - streamed))
    return placements


def check_devices(strategy: str) -> None:
    """Raise RuntimeError when a device the strategy names is not on this machine."""
    for stage in _parse_stages(strategy):
        device = stage.placement.device
        if device.startswith("cuda"):
            index = int(device.partition(":")[2] or 0)
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if index >= count:
                found = f"{count} CUDA device(s)" if count else "no CUDA device"
                raise RuntimeError(f"strategy {strategy!r} needs device {device!r}, but torch sees {found}")
        elif device == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError(f"strategy {strategy!r} needs device 'mps', which is not available here")
        elif device == "dml":
            raise RuntimeError(
                f"strategy {strategy!r} needs DirectML ('dml'), which rwkv_mm does not support"
            )


# ----------------------------------------------------------------------------------------------------------
# states


def state_from_package(state: Sequence[Tensor], version: str) -> RWKVState:
    """The package's per-layer state list (module docstring) -> an `RWKVState` of batch 1.

    The tensors are views where the layout allows (no copy); v5 / v6 matrix states are transposed from
    [H, key, value] to [H, value, key].

    Args:
        state: 3 tensors per layer (v5-v7) or 5 (v4), without a batch dimension.
        version: "v4", "v5", "v6" or "v7".
    """
    if version not in LAYOUTS:
        raise ValueError(f"version must be one of {sorted(LAYOUTS)}, got {version!r}")
    names = LAYOUTS[version]
    per = len(names)
    if not isinstance(state, Sequence) or len(state) == 0 or len(state) % per:
        n = len(state) if isinstance(state, Sequence) else type(state).__name__
        raise ValueError(f"a {version} state must be a list of {per} tensors per layer, got {n}")
    layers = []
    for i in range(0, len(state), per):
        layer = {}
        for name, t in zip(names, state[i : i + per]):
            if not isinstance(t, Tensor):
                raise ValueError(f"state[{i + names.index(name)}] must be a tensor, got {type(t).__name__}")
            if name == "wkv" and version in ("v5", "v6"):
                t = t.transpose(-1, -2)
            layer[name] = t[None]
        layers.append(layer)
    return RWKVState(version, layers)


def state_to_package(state: RWKVState, row: int = 0) -> list[Tensor]:
    """Batch row `row` of an `RWKVState` -> the package's per-layer list (module docstring); v5 / v6 matrix
    states are transposed to [H, key, value] (contiguous, as the package keeps them)."""
    out = []
    for layer in state.layers:
        for name in LAYOUTS[state.version]:
            t = layer[name][row]
            if name == "wkv" and state.version in ("v5", "v6"):
                t = t.transpose(-1, -2).contiguous()
            out.append(t)
    return out


# ----------------------------------------------------------------------------------------------------------
# model


def _resolve_model_path(model: str | os.PathLike) -> Path:
    """The package's rule (append ".pth" when missing), after trying the path as given."""
    text = os.fspath(model).strip()
    given = Path(text).expanduser()
    if given.exists():
        return given
    if not text.endswith(".pth"):
        with_pth = Path(text + ".pth").expanduser()
        if with_pth.exists():
            return with_pth
        raise FileNotFoundError(f"no model at {text!r} nor at {text + '.pth'!r}")
    raise FileNotFoundError(f"no model at {text!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def _package_version(lm: RWKVLM) -> float:
    """The package's version number of a model: 4, 5, 5.1, 5.2, 6 or 7."""
    c = lm.config
    if c.version == "v5":
        return {"5.0": 5, "5.1": 5.1, "5.2": 5.2}[c.variant]
    return int(c.version[1])


class RWKV:
    """The package's `RWKV` (v4-v6) / `RWKV_x070` class over an `RWKVLM`.

    Args:
        model: checkpoint path; used as given if it exists, else with ".pth" appended (the package's
            rule). An `.safetensors` file or an rwkv_mm asset folder works too.
        strategy: device and dtype, the package's syntax (`parse_strategy`). Defaults to "cpu fp32".
        verbose: log the loading at INFO level (the package prints). Defaults to True.
        convert_and_save_and_exit: not supported (raises); use `python -m rwkv_mm.lm.checkpoint convert`.

    Attributes:
        lm: the `RWKVLM` doing the work (batching, `RWKVState`s).
        args: n_layer, n_embd, vocab_size, head_size, MODEL_NAME, strategy_string (as the package).
        version: 4, 5, 5.1, 5.2, 6 or 7 (the package's numbering).
        strategy: the per-layer `Placement`s (L + 1 entries).

    Raises:
        ValueError: a malformed strategy. RuntimeError: a device that is not here. FileNotFoundError: no
        model file. NotImplementedError: a strategy that splits the model over devices or dtypes, streams
        layers, or asks for i4 / i3 weights.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        strategy: str = "cpu fp32",
        verbose: bool = True,
        convert_and_save_and_exit: str | None = None,
    ):
        if convert_and_save_and_exit is not None:
            raise NotImplementedError(
                "convert_and_save_and_exit is not supported; use `python -m rwkv_mm.lm.checkpoint convert`"
            )
        _parse_stages(strategy)  # syntax errors first, then devices, before reading any weights
        check_devices(strategy)
        path = _resolve_model_path(model)
        placements = parse_strategy(strategy, load_checkpoint(path).config.n_layer)
        kinds = sorted({(p.device, _dtype_name(p.dtype), p.quant, p.stream) for p in placements})
        if len(kinds) > 1:
            raise NotImplementedError(
                f"strategy {strategy!r} splits the model over {len(kinds)} settings {kinds}; rwkv_mm runs a "
                "model on one device and dtype: use a single stage such as 'cuda fp16' or 'cpu fp32'"
            )
        first = placements[0]
        if first.stream:
            raise NotImplementedError(f"strategy {strategy!r}: streaming layers ('*N+') is not supported")
        if first.quant and (first.quant != "i8" or first.dtype != torch.float32):
            raise NotImplementedError(
                f"strategy {strategy!r}: rwkv_mm quantizes weights to i8 with fp32 activations only; "
                f"use '{first.device} fp32i8'"
            )
        lm = RWKVLM.from_file(path, dtype=first.dtype, device=first.device)
        if first.quant:
            try:
                from .quant import quantize_
            except ImportError as e:
                raise NotImplementedError(
                    f"strategy {strategy!r}: int8 weights need rwkv_mm.lm.quant, which is not available ({e})"
                ) from e
            quantize_(lm, "int8")
        self._setup(lm, str(path), strategy, placements)
        if verbose:
            logger.info("RWKV %s (%s): %s, %s", path, strategy, lm.config.name, kinds[0])

    @classmethod
    def from_lm(cls, lm: RWKVLM) -> RWKV:
        """Wraps a loaded `RWKVLM` (no copy); its device and dtype make the strategy."""
        device = lm.emb.weight.device
        strategy = f"{device} {_dtype_name(lm.dtype)}"
        self = cls.__new__(cls)
        self._setup(lm, "", strategy, [Placement(str(device), lm.dtype)] * (lm.config.n_layer + 1))
        return self

    def _setup(self, lm: RWKVLM, path: str, strategy: str, placements: list[Placement]) -> None:
        self.lm = lm
        self.strategy = placements
        self.device = lm.emb.weight.device
        self.dtype = lm.dtype
        self.version = _package_version(lm)
        c = lm.config
        self.args = SimpleNamespace(
            MODEL_NAME=path,
            strategy_string=strategy,
            n_layer=c.n_layer,
            n_embd=c.n_embd,
            vocab_size=c.vocab_size,
            head_size=c.head_size,
        )
        self._state_shapes = [t.shape for t in self.generate_zero_state()]

    def generate_zero_state(self) -> list[Tensor]:
        """The state before any token, as the package's list (a state-tuned file's state if it has one)."""
        return state_to_package(self.lm.init_state(1))

    def _check_package_state(self, state: Sequence[Tensor]) -> None:
        shapes = self._state_shapes
        if not isinstance(state, Sequence) or len(state) != len(shapes):
            n = len(state) if isinstance(state, Sequence) else type(state).__name__
            raise ValueError(
                f"state must be a list of {len(shapes)} tensors for this {self.lm.config.name} model "
                f"({len(shapes) // self.args.n_layer} per layer), got {n}"
            )
        for i, (t, shape) in enumerate(zip(state, shapes)):
            if not isinstance(t, Tensor) or t.shape != shape:
                got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"state[{i}] must have shape {list(shape)}, got {got}")

    def forward(
        self, tokens: int | Sequence[int] | Tensor, state: list[Tensor] | None, full_output: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        """Run tokens from `state`, as the package's `model.forward`.

        Args:
            tokens: token ids (a list, a bare int or a 1-D tensor), at least one.
            state: the package's state list (module docstring), or None for the initial state. Not modified.
            full_output: return every position's logits.

        Returns:
            logits [V] (last token) or [T, V] with full_output (float32 for v4-v6, the strategy dtype for v7,
            as the package), and a new state list.
        """
        if isinstance(tokens, Tensor):
            tokens = tokens.reshape(-1).tolist()
        elif isinstance(tokens, (int, np.integer)):
            tokens = [tokens]
        ids = list(tokens)
        if not ids:
            raise ValueError("tokens must hold at least one token id, got an empty list")
        V = self.args.vocab_size
        bad = [t for t in ids if not isinstance(t, (int, np.integer)) or not 0 <= t < V]
        if bad:
            raise ValueError(f"token ids must be ints in [0, {V}), got {bad[0]!r}")
        ours = None
        if state is not None:
            self._check_package_state(state)
            ours = state_from_package(state, self.lm.config.version)
        with torch.no_grad():
            x = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T)
            logits, new = self.lm(x, ours, full_output=full_output)  # (1, V) or (1, T, V)
        out = logits[0]
        if self.version == 7:
            out = out.to(self.dtype)
        return out, state_to_package(new)

    __call__ = forward


# ----------------------------------------------------------------------------------------------------------
# pipeline


class PIPELINE_ARGS:  # noqa: N801 - the package's name
    """Sampling settings of `PIPELINE.generate`, with the package's names and defaults.

    Args:
        temperature: applied after the top-p / top-k filtering; 0 = greedy. Defaults to 1.0.
        top_p: nucleus cutoff; 0 = greedy. Defaults to 0.85.
        top_k: keep the k most likely tokens; 0 = off. Defaults to 0.
        alpha_frequency: penalty per (decayed) occurrence. Defaults to 0.2.
        alpha_presence: penalty once a token occurred. Defaults to 0.2.
        alpha_decay: occurrences are multiplied by this after each token. Defaults to 0.996.
        token_ban: ids never sampled. Defaults to [] (a new list per instance, unlike the package).
        token_stop: ids that end the generation (not emitted). Defaults to [].
        chunk_len: the prompt is fed in pieces of this many tokens. Defaults to 256.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        top_p: float = 0.85,
        top_k: int = 0,
        alpha_frequency: float = 0.2,
        alpha_presence: float = 0.2,
        alpha_decay: float = 0.996,
        token_ban: Sequence[int] | None = None,
        token_stop: Sequence[int] | None = None,
        chunk_len: int = 256,
    ):
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.alpha_frequency = alpha_frequency
        self.alpha_presence = alpha_presence
        self.alpha_decay = alpha_decay
        self.token_ban = list(token_ban or [])
        self.token_stop = list(token_stop or [])
        self.chunk_len = chunk_len

    def __repr__(self) -> str:
        return f"PIPELINE_ARGS({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def _pipeline_tokenizer(word_name: str | os.PathLike) -> Tokenizer:
    text = os.fspath(word_name)
    if text == WORLD_NAME:
        return load_tokenizer("world")
    if Path(text).expanduser().is_file():
        return load_tokenizer(Path(text).expanduser())
    if Path(text).name == NEOX_NAME:  # the package reads it from the working directory; we ship a copy
        return load_tokenizer("20b")
    raise ValueError(
        f"unknown tokenizer {text!r}: expected {WORLD_NAME!r}, {NEOX_NAME!r} or the path of a "
        "World vocabulary (.txt) or HF tokenizer (.json)"
    )


class PIPELINE:
    """The package's `PIPELINE`: tokenizer + sampling + a generation loop over a model.

    Args:
        model: a model with the package's `forward(tokens, state)`: this module's `RWKV` (an `RWKVLM` is
            wrapped), or the package's own.
        WORD_NAME: "rwkv_vocab_v20230424" (World), "20B_tokenizer.json" (a file of that name if it exists,
            else rwkv_mm's bundled copy) or a tokenizer file path. The package's "cl100k_base" is not
            supported.
    """

    def __init__(self, model, WORD_NAME: str | os.PathLike):  # noqa: N803 - the package's name
        self.model = RWKV.from_lm(model) if isinstance(model, RWKVLM) else model
        self.tokenizer = _pipeline_tokenizer(WORD_NAME)

    def refine_context(self, context: str) -> str:
        """Strips every line (spaces, U+3000, CR), drops empty lines, and prefixes one newline."""
        lines = [line.strip().strip("\u3000").strip("\r") for line in context.strip().split("\n")]
        return "\n" + "\n".join(line for line in lines if line).strip()

    def encode(self, x: str) -> list[int]:
        """Token ids of a text."""
        return self.tokenizer.encode(x)

    def decode(self, x: Sequence[int]) -> str:
        """The text of ids, or "\\ufffd" alone when they are not complete UTF-8 (the package's signal to
        wait for more tokens). As the package's World tokenizer, ids without text (0, padding) give it too."""
        tok = self.tokenizer
        data = tok.decode_bytes(x)
        if tok.name == "world" and any(not tok.token_bytes(i) for i in x):
            return "\ufffd"
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "\ufffd"

    def sample_logits(
        self, logits: Tensor, temperature: float = 1.0, top_p: float = 0.85, top_k: int = 0
    ) -> int:
        """One token from logits [V] with the package's rules: softmax, keep the tokens at least as likely
        as the one where the sorted cumulative probability reaches top_p (ties kept), then the top_k most
        likely (0: all), then probs ** (1 / temperature); temperature 0 means top_p 0 (the most likely).
        CPU logits draw from numpy's global generator, one draw per call even when greedy, as the package
        (`np.random.seed(n)` reproduces its samples); others from torch's."""
        if temperature == 0:
            temperature, top_p = 1.0, 0.0
        probs = filtered_probs(logits, top_p, int(top_k))  # (V,) float32, dropped tokens zeroed
        if temperature != 1.0:
            probs = (probs / probs.max()) ** (1.0 / temperature)  # / max: no underflow at small temperatures
        if probs.device.type == "cpu":
            p = probs.double().numpy()
            return int(np.random.choice(a=len(p), p=p / p.sum()))
        return int(torch.multinomial(probs, num_samples=1)[0])

    def generate(
        self,
        ctx: str,
        token_count: int = 100,
        args: PIPELINE_ARGS | None = None,
        callback: Callable[[str], object] | None = None,
        state: list[Tensor] | None = None,
    ) -> str:
        """Continue `ctx` by up to `token_count` tokens, as the package does.

        Per step: banned ids get -inf; each id seen gets -(alpha_presence + weight * alpha_frequency), where
        weight counts its occurrences decayed by alpha_decay per step (ids whose text is a space, tab or
        digit count 0); a token in token_stop ends the text (not emitted). `callback(text)` receives each
        piece of complete UTF-8 text.

        Args:
            ctx: the prompt.
            token_count: most tokens to generate. Defaults to 100.
            args: sampling settings. Defaults to PIPELINE_ARGS().
            callback: called with every new piece of text.
            state: the state to continue from (the package's list), not modified. Defaults to the initial
                state.

        Returns:
            The generated text (the state is not returned, as in the package).
        """
        args = PIPELINE_ARGS() if args is None else args
        if args.chunk_len < 1:
            raise ValueError(f"args.chunk_len must be >= 1, got {args.chunk_len}")
        generated: list[int] = []
        emitted = 0  # generated[:emitted] has been passed to the callback
        text = ""
        occurrence: dict[int, float] = {}
        token = 0
        for i in range(token_count):
            tokens = self.encode(ctx) if i == 0 else [token]
            if not tokens:
                raise ValueError("ctx encodes to no tokens; give a non-empty prompt")
            for start in range(0, len(tokens), args.chunk_len):
                out, state = self.model.forward(tokens[start : start + args.chunk_len], state)
            out = out.clone()
            for n in args.token_ban:
                out[n] = -float("inf")
            for n, count in occurrence.items():
                out[n] -= args.alpha_presence + count * args.alpha_frequency
            token = self.sample_logits(out, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
            if token in args.token_stop:
                break
            generated.append(token)
            for n in occurrence:
                occurrence[n] *= args.alpha_decay
            weight = 0 if self.decode([token]) in NO_PENALTY_TEXT else 1
            occurrence[token] = occurrence.get(token, 0) + weight
            piece = self.decode(generated[emitted:])
            if "\ufffd" not in piece:
                if callback:
                    callback(piece)
                text += piece
                emitted = len(generated)
        return text
