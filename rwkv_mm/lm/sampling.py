"""Sampling for the RWKV LMs: temperature / top-p / top-k, presence and frequency penalties, stops.

Semantics follow the ``rwkv`` pip package 0.8.32 (``rwkv/utils.py``, ``PIPELINE.sample_logits`` and
``PIPELINE.generate``; BlinkDL/ChatRWKV):

- ``sample_logits``: softmax in float32 -> top-p: the cutoff is the probability of the first token (by
  decreasing probability) at which the cumulative mass reaches ``top_p``, and every token below the
  cutoff is dropped (ties with it are kept) -> top-k -> ``probs ** (1 / temperature)`` (temperature is
  applied *after* the filtering) -> one multinomial draw. Temperature 0 is greedy (argmax).
- ``Sampler``: per step, banned tokens get -inf, then each token seen so far gets
  ``alpha_presence + occurrence * alpha_frequency`` subtracted from its logit; after the draw every
  occurrence is multiplied by ``alpha_decay`` and the drawn token's occurrence grows by 1 (by 0 when its
  text is a substring of " \\t0123456789", as the package does, if the sampler knows the tokenizer).

Differences from the package, on purpose: draws come from a ``torch.Generator`` (seedable, savable)
instead of the global numpy RNG; temperature 0 returns the first argmax instead of drawing among tied
maxima; when rounding keeps the cumulative mass below ``top_p`` (e.g. top_p = 1.0) every token is kept
(the package then keeps only the most likely one); the temperature power is taken on ``probs / max``
so that small temperatures cannot underflow every probability to zero. Logits are never modified in place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import Tensor

__all__ = ["SamplingParams", "Sampler", "StopChecker", "sample_logits", "sample_batch"]

NO_PENALTY_TEXT = " \t0123456789"  # the package gives tokens whose text is a substring of this weight 0


@dataclass
class SamplingParams:
    """How to pick the next token and when to stop.

    Args:
        temperature (float): >= 0; 0 is greedy. Defaults to 1.0.
        top_p (float): nucleus mass in [0, 1]; 0 keeps only the most likely token(s). Defaults to 0.85.
        top_k (int): keep the k most likely tokens; 0 turns it off. Defaults to 0.
        alpha_presence (float): subtracted once from the logit of every token already generated.
            Defaults to 0.0.
        alpha_frequency (float): subtracted per (decayed) occurrence. Defaults to 0.0.
        alpha_decay (float): in [0, 1]; occurrences are multiplied by it at every step. Defaults to 0.996.
        token_ban (tuple[int, ...]): ids never sampled. Defaults to ().
        stop_tokens (tuple[int, ...]): ids that end generation (not emitted). Defaults to (0,), end of text.
        stop_strings (tuple[str, ...]): texts that end generation (not emitted, nor anything after them).
            Defaults to ().
        max_tokens (int): at most this many tokens are sampled. Defaults to 256.
        seed (int, optional): seeds a `Sampler`'s generator when none is given. Defaults to None.
    """

    temperature: float = 1.0
    top_p: float = 0.85
    top_k: int = 0
    alpha_presence: float = 0.0
    alpha_frequency: float = 0.0
    alpha_decay: float = 0.996
    token_ban: tuple[int, ...] = ()
    stop_tokens: tuple[int, ...] = (0,)
    stop_strings: tuple[str, ...] = ()
    max_tokens: int = 256
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("token_ban", "stop_tokens", "stop_strings"):  # accept lists, store tuples
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise ValueError(f"{name} must be a sequence, got {value!r}")
            setattr(self, name, tuple(value))
        _check_real("temperature", self.temperature, 0.0, math.inf)
        _check_real("top_p", self.top_p, 0.0, 1.0)
        _check_real("alpha_presence", self.alpha_presence, -math.inf, math.inf)
        _check_real("alpha_frequency", self.alpha_frequency, -math.inf, math.inf)
        _check_real("alpha_decay", self.alpha_decay, 0.0, 1.0)
        _check_int("top_k", self.top_k, 0)
        _check_int("max_tokens", self.max_tokens, 0)
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
        for name in ("token_ban", "stop_tokens"):
            for t in getattr(self, name):
                if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                    raise ValueError(f"{name} must hold token ids (ints >= 0), got {t!r}")
        for s in self.stop_strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop_strings must hold non-empty strings, got {s!r}")

    def replace(self, **changes) -> SamplingParams:
        """A copy with `changes` applied (validated; unknown names raise ValueError)."""
        return self.from_dict({**asdict(self), **changes})

    @classmethod
    def from_dict(cls, values: dict) -> SamplingParams:
        """Build from a dict (e.g. json), rejecting unknown keys with the list of valid ones."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; valid: {names}")
        return cls(**values)


def _check_real(name: str, value, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        bounds = f"[{lo}, {hi}]" if math.isfinite(hi) else (f">= {lo}" if math.isfinite(lo) else "finite")
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"{name} must be a number, got nan")


def _check_int(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


def _check_logits(logits: Tensor, dims: int) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != dims or logits.shape[-1] == 0:
        shape = list(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a {'[V]' if dims == 1 else '[B, V]'} tensor, got {shape}")


def filtered_probs(logits: Tensor, top_p: float, top_k: int = 0) -> Tensor:
    """The distribution `sample_logits` draws from at temperature 1 (unnormalised).

    Args:
        logits: [V] scores (-inf allowed).
        top_p: nucleus mass in [0, 1].
        top_k: keep the k most likely; 0 = off.

    Returns:
        probs: float32 [V], softmax with the dropped tokens zeroed.
    """
    _check_logits(logits, 1)
    if torch.isnan(logits).any():
        raise ValueError("logits contain NaN")
    probs = torch.softmax(logits.float(), dim=-1)
    if torch.isnan(probs).any():  # softmax of all -inf
        raise ValueError("every token has logit -inf (all banned?): nothing to sample")
    if probs.device.type == "cpu":  # numpy's sort is ~40x faster than torch's for a 65536-token vocabulary
        sorted_probs = torch.from_numpy(np.ascontiguousarray(np.sort(probs.numpy())[::-1]))
    else:
        sorted_probs = torch.sort(probs, descending=True).values
    reached = (torch.cumsum(sorted_probs, dim=-1) >= top_p).nonzero()
    if len(reached):  # else rounding kept the total below top_p: keep every token
        cutoff = sorted_probs[reached[0, 0]]
        probs = torch.where(probs < cutoff, torch.zeros_like(probs), probs)
    if 0 < top_k < probs.numel():
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[torch.topk(probs, top_k, sorted=False).indices] = True
        probs = torch.where(keep, probs, torch.zeros_like(probs))
    return probs


def sample_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_p: float = 0.85,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> int:
    """Draw one token id with the `rwkv` package's top-p / top-k / temperature rule (module docstring).

    Args:
        logits: [V] scores of one position (any float dtype, any device; not modified).
        temperature: >= 0; 0 returns the argmax without drawing. Defaults to 1.0.
        top_p: nucleus mass in [0, 1]. Defaults to 0.85.
        top_k: keep the k most likely; 0 = off. Defaults to 0.
        generator: the random source (on the logits' device); None uses torch's global one.

    Returns:
        The sampled id, an int in [0, V).
    """
    _check_real("temperature", temperature, 0.0, math.inf)
    _check_real("top_p", top_p, 0.0, 1.0)
    _check_int("top_k", top_k, 0)
    if temperature == 0:
        _check_logits(logits, 1)
        if torch.isnan(logits).any():
            raise ValueError("logits contain NaN")
        return int(torch.argmax(logits))
    probs = filtered_probs(logits, top_p, top_k)
    if temperature != 1.0:
        probs = (probs / probs.max()) ** (1.0 / temperature)  # / max: no underflow of the survivors
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


class Sampler:
    """Sampling state of one sequence: penalties from the tokens drawn so far and the random generator.

    Args:
        params: the sampling parameters.
        generator: the random source; None makes a CPU generator seeded from `params.seed` (or from
            torch's global RNG when the seed is None).
        token_text: id -> text; with it, tokens whose text is a substring of " \\t0123456789" count 0
            towards their occurrence (the package's rule). Pass `tokenizer.decode(...)`-like callables or
            use `Sampler.for_tokenizer`. Defaults to None (every token counts 1).

    Example:
        >>> sampler = Sampler(SamplingParams(temperature=0.8, seed=1))
        >>> token = sampler(logits)            # logits: [V]
    """

    def __init__(
        self,
        params: SamplingParams | None = None,
        generator: torch.Generator | None = None,
        token_text: Callable[[int], str] | None = None,
    ) -> None:
        self.params = params if params is not None else SamplingParams()
        if generator is None:
            generator = torch.Generator()
            if self.params.seed is not None:
                generator.manual_seed(self.params.seed)
            else:
                generator.manual_seed(int(torch.randint(0, 2**62, (1,))))
        self.generator = generator
        self.token_text = token_text
        self.occurrence: dict[int, float] = {}

    @classmethod
    def for_tokenizer(cls, params: SamplingParams, tokenizer, generator: torch.Generator | None = None):
        """A sampler that knows the text of each token (for the package's whitespace / digit rule)."""
        return cls(params, generator, token_text=lambda t: tokenizer.decode([t]))

    def penalized(self, logits: Tensor) -> Tensor:
        """logits [V] with bans (-inf) and presence / frequency penalties applied (a new tensor)."""
        _check_logits(logits, 1)
        p = self.params
        out = logits.float().clone()
        if p.token_ban:
            ban = [t for t in p.token_ban if t < out.numel()]
            out[ban] = -math.inf
        if self.occurrence:
            ids = torch.tensor(list(self.occurrence), dtype=torch.long, device=out.device)
            counts = torch.tensor(list(self.occurrence.values()), dtype=out.dtype, device=out.device)
            out[ids] -= p.alpha_presence + counts * p.alpha_frequency
        return out

    def __call__(self, logits: Tensor) -> int:
        """Sample the next token from logits [V] and record it (stop tokens are not recorded)."""
        p = self.params
        if logits.device != self.generator.device:  # draw where the generator lives
            logits = logits.to(self.generator.device)
        token = sample_logits(self.penalized(logits), p.temperature, p.top_p, p.top_k, self.generator)
        if token not in p.stop_tokens:
            self.record(token)
        return token

    def record(self, token: int) -> None:
        """Decay every occurrence by alpha_decay, then count `token` (weight 0 for blank / digit text)."""
        decay = self.params.alpha_decay
        for t in self.occurrence:
            self.occurrence[t] *= decay
        weight = 1.0
        if self.token_text is not None and self.token_text(token) in NO_PENALTY_TEXT:
            weight = 0.0
        self.occurrence[token] = self.occurrence.get(token, 0.0) + weight

    def reset(self) -> None:
        """Forget the tokens drawn so far (penalties restart); the generator keeps its position."""
        self.occurrence = {}


def sample_batch(logits: Tensor, samplers: Sequence[Sampler]) -> list[int]:
    """One token per row: row b of logits [B, V] goes to samplers[b]. Returns B ids."""
    _check_logits(logits, 2)
    if len(samplers) != logits.shape[0]:
        raise ValueError(f"need one sampler per row: logits have {logits.shape[0]} rows, got {len(samplers)}")
    return [s(row) for s, row in zip(samplers, logits)]


class StopChecker:
    """Finds stop tokens and stop strings in streamed text and says what is safe to show.

    Feed each token with the text it completed (`StreamDecoder.feed`); `feed` returns the text that can be
    shown now. A suffix that could be the start of a stop string is held back until it is decided; text
    from a stop string on is never returned. After a stop, `stopped` is True, `reason` is "token" or
    "string", `matched` is the stop token (int) or string, and `text` is the whole emitted text.

    Args:
        stop_strings: texts that end generation. Defaults to ().
        stop_tokens: ids that end generation. Defaults to ().
    """

    def __init__(self, stop_strings: Sequence[str] = (), stop_tokens: Sequence[int] = ()) -> None:
        if isinstance(stop_strings, str):
            raise ValueError(f"stop_strings must be a sequence of strings, got the string {stop_strings!r}")
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise ValueError(f"stop_strings must hold non-empty strings, got {list(stop_strings)!r}")
        self.stop_strings = tuple(stop_strings)
        self.stop_tokens = frozenset(stop_tokens)
        self._prefixes = {s[:i] for s in self.stop_strings for i in range(1, len(s))}
        self.reset()

    @classmethod
    def from_params(cls, params: SamplingParams) -> StopChecker:
        return cls(params.stop_strings, params.stop_tokens)

    def reset(self) -> None:
        """Start a new stream."""
        self.held = ""  # text not yet returned (could start a stop string)
        self.text = ""  # text returned so far
        self.tail = ""  # after a string stop: the text that followed the stop string
        self.stopped = False
        self.reason: str | None = None
        self.matched: int | str | None = None

    def feed(self, token: int | None, text: str) -> str:
        """Accept one token (None: text only) and the text it completed. Returns the text safe to show.

        A stop token ends the stream: its own text is dropped and the held-back text is released (no stop
        string can complete any more)."""
        if self.stopped:
            return ""
        if token is not None and token in self.stop_tokens:
            out, self.held = self.held, ""
            self.stopped, self.reason, self.matched = True, "token", token
            return self._emit(out)
        return self.push(text)

    def push(self, text: str) -> str:
        """Accept more text; returns what can be shown now."""
        if self.stopped:
            return ""
        buf = self.held + text
        hits = [(buf.find(s), s) for s in self.stop_strings]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits, key=lambda h: (h[0], -len(h[1])))
            self.stopped, self.reason, self.matched = True, "string", s
            self.tail = buf[i + len(s) :]
            self.held = ""
            return self._emit(buf[:i])
        keep = 0
        for n in range(min(len(buf), max((len(p) for p in self._prefixes), default=0)), 0, -1):
            if buf[-n:] in self._prefixes:
                keep = n
                break
        self.held = buf[len(buf) - keep :] if keep else ""
        return self._emit(buf[: len(buf) - keep])

    def flush(self) -> str:
        """End of the stream without a stop: returns the held-back text."""
        out, self.held = ("" if self.stopped else self.held), ""
        return self._emit(out)

    def _emit(self, text: str) -> str:
        self.text += text
        return text
