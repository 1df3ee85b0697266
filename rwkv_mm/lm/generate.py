"""Batched generation: several prompts decoded together, each with its own sampling and stopping.

Users asked for it upstream (RWKV-LM #278 "Batch Inference", #324 with isolated per-sequence states;
the `rwkv` pip package runs one sequence at a time). An RNN makes batching simple: every sequence has a
fixed-size state, so prompts of different lengths are prefilled separately (grouped by length), their
states stacked into one batch, and the decode loop runs one `lm(tokens [B, 1], state)` per step. A
sequence that stops leaves the batch: its row is selected out of the state, so the batch shrinks.

Greedy results equal those of each prompt run alone, token for token (batched matrix products agree
with single-row ones to float rounding). The public call is `RWKVLM.generate_batch`, which delegates here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..core.state import RWKVState
from .sampling import Sampler, SamplingParams, StopChecker, sample_batch
from .tokenizer import Tokenizer

__all__ = ["generate_batch"]

logger = logging.getLogger(__name__)

PREFILL_CHUNK = 1024  # prompt tokens per forward call: bounds the [B, T, C] activations of long prompts


def _check_prompts(token_id_lists: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    if isinstance(token_id_lists, Tensor) or not isinstance(token_id_lists, Sequence) or not token_id_lists:
        raise ValueError("token_id_lists must be a non-empty list of prompts (lists of token ids)")
    prompts = []
    for i, ids in enumerate(token_id_lists):
        if isinstance(ids, Tensor):
            ids = ids.reshape(-1).tolist()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise ValueError(f"prompt {i} must be a list of token ids, got {type(ids).__name__}")
        if not ids:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise ValueError(f"prompt {i} holds {t!r}: token ids must be ints in [0, {vocab_size})")
        prompts.append(list(ids))
    return prompts


def _check_params(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if not isinstance(params, Sequence) or len(params) != n:
        got = len(params) if isinstance(params, Sequence) else type(params).__name__
        raise ValueError(f"params must be one SamplingParams or a list of {n} (one per prompt), got {got}")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise ValueError(f"params[{i}] must be a SamplingParams, got {type(p).__name__}")
    return list(params)


def _initial_states(lm, state: RWKVState | None, n: int) -> RWKVState:
    """The state each prompt starts from, as one batch of n rows."""
    if state is None:
        return lm.init_state(n)
    if not isinstance(state, RWKVState):
        raise ValueError(f"state must be an RWKVState, got {type(state).__name__}")
    if state.batch_size == 1:
        return state.select([0] * n)
    if state.batch_size != n:
        raise ValueError(
            f"state has batch size {state.batch_size}; expected 1 (shared) or {n} (one per prompt)"
        )
    return state


def _prefill(lm, prompts: list[list[int]], start: RWKVState) -> tuple[Tensor, RWKVState]:
    """Run every prompt from its row of `start`. Prompts of equal length share forward calls.

    Returns:
        logits: [B, V] at each prompt's last token; state: [B, ...] after each prompt (prompt order).
    """
    device = lm.emb.weight.device
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        groups.setdefault(len(ids), []).append(i)
    order, logits_parts, state_parts = [], [], []
    for length, rows in groups.items():
        tokens = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)  # (g, T)
        st = start.select(rows)
        for a in range(0, length, PREFILL_CHUNK):
            logits, st = lm(tokens[:, a : a + PREFILL_CHUNK], st)  # (g, V)
        order += rows
        logits_parts.append(logits)
        state_parts.append(st)
    logits = torch.cat(logits_parts)  # (B, V) in group order
    state = RWKVState.concat(state_parts)
    back = sorted(range(len(order)), key=order.__getitem__)  # group order -> prompt order
    if back != list(range(len(order))):
        index = torch.tensor(back, dtype=torch.long)
        logits, state = logits[index.to(logits.device)], state.select(index)
    return logits, state


@torch.no_grad()
def generate_batch(
    lm,
    token_id_lists: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    max_tokens: int | None = None,
    state: RWKVState | None = None,
    callback: Callable[[int, int], object] | None = None,
    tokenizer: Tokenizer | None = None,
) -> list[list[int]]:
    """Continue several prompts at once; each has its own sampler, stops and length.

    Args:
        lm (RWKVLM): the model.
        token_id_lists (list[list[int]]): B prompts of any lengths (>= 1 token each).
        params (SamplingParams | list[SamplingParams], optional): one for all prompts or one per prompt.
            A `seed` gives each sequence the same draws it would get alone. Defaults to SamplingParams().
        max_tokens (int, optional): most tokens per sequence; overrides every `params.max_tokens`.
            Defaults to None (each params' own).
        state (RWKVState, optional): where the prompts start: batch 1 (shared, e.g. a system prompt's
            state) or batch B (one per prompt). Not modified. Defaults to `lm.init_state`.
        callback (callable, optional): `callback(index, token_id)` for each token added to sequence
            `index`, as it is sampled; returning True stops that sequence (the token is kept). With stop
            strings, the last tokens reported may be dropped from the result (see Returns).
        tokenizer (Tokenizer, optional): needed for stop strings; with it, tokens whose text is blank or
            a digit add no repetition penalty (the `rwkv` package's rule). Defaults to None.

    Returns:
        B lists of generated ids, in prompt order. A stop token is not included. With a stop string, the
        list ends before the token in which the stop string begins, so its text never contains the stop
        string (text that token carried before the stop string is dropped with it).

    Example:
        >>> outs = generate_batch(lm, [tok.encode("Hi"), tok.encode("Once upon")],
        ...                       SamplingParams(temperature=0, stop_strings=("\\n\\n",)), tokenizer=tok)
    """
    prompts = _check_prompts(token_id_lists, lm.config.vocab_size)
    B = len(prompts)
    all_params = _check_params(SamplingParams() if params is None else params, B)
    bad_max = isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0
    if max_tokens is not None and bad_max:
        raise ValueError(f"max_tokens must be an int >= 0 or None, got {max_tokens!r}")
    for i, p in enumerate(all_params):
        if p.stop_strings and tokenizer is None:
            raise ValueError(
                f"params for prompt {i} have stop_strings {list(p.stop_strings)}: they need tokenizer="
            )
    limits = [p.max_tokens if max_tokens is None else max_tokens for p in all_params]
    if tokenizer is None:
        samplers = [Sampler(p) for p in all_params]
    else:
        samplers = [Sampler.for_tokenizer(p, tokenizer) for p in all_params]
    checkers = [StopChecker(p.stop_strings) if p.stop_strings else None for p in all_params]
    decoders = [tokenizer.stream_decoder() if c is not None else None for c in checkers]
    text_ends: list[list[int]] = [[] for _ in range(B)]  # per token: length of the text decoded up to it
    text_len = [0] * B
    outputs: list[list[int]] = [[] for _ in range(B)]

    active = [i for i in range(B) if limits[i] > 0]  # prompt indices still generating, in batch-row order
    if not active:
        return outputs
    start = _initial_states(lm, state, B).select(active)
    logits, batch_state = _prefill(lm, [prompts[i] for i in active], start)
    device = lm.emb.weight.device
    while True:
        tokens = sample_batch(logits, [samplers[i] for i in active])
        keep = []  # rows that go on
        for row, (i, token) in enumerate(zip(active, tokens)):
            if token in all_params[i].stop_tokens:
                continue
            outputs[i].append(token)
            done = bool(callback(i, token)) if callback is not None else False
            checker = checkers[i]
            if checker is not None:
                piece = decoders[i].feed(token)
                text_len[i] += len(piece)
                text_ends[i].append(text_len[i])
                checker.push(piece)
                if checker.stopped:
                    stop_at = len(checker.text)  # where the stop string begins in the text
                    n = sum(1 for end in text_ends[i] if end <= stop_at)
                    del outputs[i][n:]
                    continue
            if done or len(outputs[i]) >= limits[i]:
                continue
            keep.append(row)
        if not keep:
            return outputs
        if len(keep) < len(active):  # finished sequences leave the batch
            batch_state = batch_state.select(keep)
            active = [active[r] for r in keep]
        x = torch.tensor([[tokens[r]] for r in keep], dtype=torch.long, device=device)  # (b, 1)
        logits, batch_state = lm(x, batch_state)  # (b, V)
