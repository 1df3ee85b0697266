"""Train an RWKV-7 language model from scratch (the bundled tiny LM) and export it as an asset folder.

    python -m rwkv_mm.lm.train --data runs/tinylm-data --out runs/tinylm --max-minutes 8 --device cuda
    python -m rwkv_mm.lm.train ... --resume                  # continue from CKPT_DIR/last.pt
    python -m rwkv_mm.lm.train export --run runs/tinylm --output rwkv_mm/assets/tiny-lm  # asset folder

Data: a folder written by ``python -m rwkv_mm.lm.corpus build`` (``train.npy`` / ``val.npy`` token ids,
``meta.json`` with the tokenizer and the sources). Model: ``rwkv_mm.lm.model.RWKVLM`` (x070) built from an
``RWKVConfig``, initialised as RWKV-LM's RWKV-7 trainer does (``init_rwkv7_``) and trained end to end
through the core WKV ops (the compiled kernels' backward where they build, else the chunked torch form).

Recipe (RWKV-LM's, scaled down): random windows of ``--ctx-len`` tokens from the token stream, zero
initial state, cross-entropy on every position; AdamW with betas (0.9, 0.99), weight decay on the matrices
(``.weight`` tensors with two dimensions) only, twice the learning rate for ``att.w0``; linear warm-up then a
cosine decay that follows ``--max-steps``, or, without it, the ``--max-minutes`` time budget (so a
time-boxed run always finishes its schedule); gradient clipping; bf16 autocast (or TF32) on CUDA.

Outputs in ``--out``: ``metrics.csv`` (a row per ``--log-every`` steps, held-out rows every
``--eval-every``), and at the end ``model.safetensors`` (weights only, ``--save-dtype``), ``config.json``
(the asset config: architecture, dims, tokenizer), ``summary.json`` and ``samples.txt``. Resumable
checkpoints (model, optimizer, step, clocks; fp32) go to ``--ckpt-dir`` (default ``--out``) every
``--ckpt-every`` steps and at the end. Batches are drawn from a generator seeded by (seed, step), so a
resumed run continues exactly as an uninterrupted one.

Held-out metrics: the held-out stream is cut into ``--eval-batch`` contiguous streams read in windows of
``--ctx-len`` with the state carried from window to window, so every token is predicted from all the text
before it in its stream. Reported as loss (nats per token), perplexity per token, and perplexity and
bits per byte of UTF-8 text (end-of-text tokens count as zero bytes).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .checkpoint import RWKVConfig
from .model import RWKVLM
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "TokenData",
    "build_parser",
    "evaluate",
    "export",
    "generate",
    "init_rwkv7_",
    "lr_at",
    "main",
    "make_optimizer",
    "tiny_config",
    "train",
]

logger = logging.getLogger(__name__)

PROCESS_START = time.monotonic()  # --max-minutes counts from here: imports and kernel builds included
CHECKPOINT_VERSION = 1
DEFAULT_PROMPTS = (
    'User: What does "lantern" mean?\n\nAssistant:',
    "User: What does the Python function sorted do?\n\nAssistant:",
    "In the beginning",
)


# ---------------------------------------------------------------------------------------- model + init
def _lora(C: int, k: float) -> int:
    """RWKV-LM's suggested LoRA width for model width C: max(32, round(k * sqrt(C) / 32) * 32)."""
    return max(32, int(round(k * math.sqrt(C) / 32) * 32))


def tiny_config(
    n_layer: int = 6,
    n_embd: int = 256,
    vocab_size: int = 256,
    head_size: int = 64,
    dim_ffn: int | None = None,
    tokenizer: str | None = "bytes",
) -> RWKVConfig:
    """An x070 config with RWKV-LM's suggested LoRA widths (decay / in-context rate 2.5 sqrt(C), value
    residual 1.7 sqrt(C), gate 5 sqrt(C), multiples of 32, at least 32) and a 4C FFN by default."""
    return RWKVConfig(
        version="v7",
        n_layer=n_layer,
        n_embd=n_embd,
        vocab_size=vocab_size,
        dim_ffn=dim_ffn or 4 * n_embd,
        head_size=head_size,
        d_decay=_lora(n_embd, 2.5),
        d_aaa=_lora(n_embd, 2.5),
        d_mv=_lora(n_embd, 1.7) if n_layer > 1 else 0,
        d_gate=_lora(n_embd, 5.0),
        tokenizer=tokenizer,
    )


def _orthogonal_(t: Tensor, gain: float) -> Tensor:
    """nn.init.orthogonal_ with RWKV-LM's extra gain sqrt(rows / cols) for tall matrices."""
    rows, cols = t.shape
    return nn.init.orthogonal_(t, gain=gain * (math.sqrt(rows / cols) if rows > cols else 1.0))


@torch.no_grad()
def init_rwkv7_(model: RWKVLM) -> RWKVLM:
    """Fill an x070 `RWKVLM`'s parameters as RWKV-LM's RWKV-7 trainer initialises a new model
    (RWKV-v7/train_temp/src/model.py: the module inits plus ``generate_init_weight``), in place.

    Per layer l of L (r0 = l / (L - 1), r1 = 1 - l / L, d_i = i / C, C channels, N per head):
    - token-shift mixes x_r, x_g = 1 - d^(0.2 r1); x_w, x_a = 1 - d^(0.9 r1); x_k, x_v = 1 - d^(0.7 r1);
      ffn.x_k = 1 - d^(r1^4);
    - w0 = -6 + 6 (i / (C-1))^(1 + r0^0.3) + 0.5 + 2.5 z (z = a signed squared zigzag over each head);
      a0 = -0.19 + 0.3 z + 0.4 lin; v0 = 0.73 - 0.4 lin (lin = i / (C-1) - 0.5);
      k_k = 0.71 - 0.1 lin; k_a = 1.02; r_k = -0.04;
    - LoRA down matrices (w1, a1, v1, g1) zero, up matrices (w2, a2, v2, g2) orthogonal with gain 0.1;
    - receptance, value, ffn.key orthogonal (gain 1), key orthogonal gain 0.1, att.output and ffn.value
      zero; ln_x weight ((l + 1) / L)^0.7, bias 0; every LayerNorm weight 1, bias 0;
    - emb U(-1e-4, 1e-4) (ln0 normalises it); head orthogonal with gain 0.5 sqrt(V / C) if V > C else 0.5.

    Returns:
        The model.
    """
    c = model.config
    if c.version != "v7":
        raise ValueError(f"init_rwkv7_ initialises x070 models, got a {c.name} config")
    C, N, L = c.n_embd, c.head_size, c.n_layer
    i = torch.arange(C, dtype=torch.float64)
    ddd = (i / C).view(1, 1, C)
    lin = (i / (C - 1) - 0.5).view(1, 1, C)
    zig = ((i % N) - (N - 1) / 2) / ((N - 1) / 2)
    zig = (zig * zig.abs()).view(1, 1, C)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.uniform_(model.emb.weight, -1e-4, 1e-4)
    V = c.vocab_size
    nn.init.orthogonal_(model.head.weight, gain=0.5 * math.sqrt(V / C) if V > C else 0.5)
    for layer, block in enumerate(model.blocks):
        r0 = layer / (L - 1) if L > 1 else 0.0
        r1 = 1.0 - layer / L
        att, ffn = block.att, block.ffn

        def put(p: Tensor, value: Tensor) -> None:
            p.copy_(value.to(p.dtype).expand_as(p))

        for name, power in (
            ("x_r", 0.2),
            ("x_w", 0.9),
            ("x_k", 0.7),
            ("x_v", 0.7),
            ("x_a", 0.9),
            ("x_g", 0.2),
        ):
            put(getattr(att, name), 1.0 - ddd.pow(power * r1))
        put(ffn.x_k, 1.0 - ddd.pow(r1**4))
        www = -6 + 6 * (i / (C - 1)).pow(1 + r0**0.3)
        put(att.w0, www.view(1, 1, C) + 0.5 + zig * 2.5)
        put(att.a0, -0.19 + zig * 0.3 + lin * 0.4)
        if layer > 0:
            put(att.v0, 0.73 - lin * 0.4)
        put(att.k_k, 0.71 - lin * 0.1)
        att.k_a.fill_(1.02)
        att.r_k.fill_(-0.04)
        for down, up in (("w1", "w2"), ("a1", "a2"), ("v1", "v2"), ("g1", "g2")):
            if hasattr(att, down):
                nn.init.zeros_(getattr(att, down))
                _orthogonal_(getattr(att, up), 0.1)
        _orthogonal_(att.receptance.weight, 1.0)
        _orthogonal_(att.key.weight, 0.1)
        _orthogonal_(att.value.weight, 1.0)
        nn.init.zeros_(att.output.weight)
        att.ln_x.weight.fill_(((1 + layer) / L) ** 0.7)
        nn.init.zeros_(att.ln_x.bias)
        _orthogonal_(ffn.key.weight, 1.0)
        nn.init.zeros_(ffn.value.weight)
    return model


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW in RWKV-LM's groups: decay on 2-D ``.weight`` matrices, ``att.w0`` at twice the learning rate
    (group key ``lr_scale``), everything else without decay."""
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "w0": [], "plain": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("att.w0"):
            groups["w0"].append(p)
        elif name.endswith(".weight") and p.squeeze().dim() >= 2 and weight_decay > 0:
            groups["decay"].append(p)
        else:
            groups["plain"].append(p)
    param_groups = [
        {"params": groups["decay"], "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": groups["w0"], "weight_decay": 0.0, "lr_scale": 2.0},
        {"params": groups["plain"], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.99), eps=1e-8, fused=fused)


def lr_at(step: int, progress: float, lr: float, min_lr: float, warmup_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from `lr` to `min_lr` over progress 0 -> 1."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * p))


# ----------------------------------------------------------------------------------------------- data
class TokenData:
    """A token stream (a 1-D ``.npy`` of uint8 / uint16 / int ids) held on `device` as uint8 / int32.

    Args:
        path: the ``.npy`` file (or an array).
        device: where the ids live (the whole stream: the tiny-LM corpus is ~36 MB).
    """

    def __init__(self, path: str | os.PathLike | np.ndarray, device: torch.device | str = "cpu") -> None:
        ids = path if isinstance(path, np.ndarray) else np.load(path, mmap_mode="r")
        ids = np.ascontiguousarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"token data must be 1-D, got shape {list(ids.shape)}")
        self.ids = torch.from_numpy(ids.astype(np.uint8 if ids.dtype == np.uint8 else np.int32)).to(device)

    def __len__(self) -> int:
        return self.ids.numel()

    def batch(self, batch_size: int, ctx_len: int, seed: int) -> tuple[Tensor, Tensor]:
        """`batch_size` random windows: inputs x and next-token targets y, LongTensors [B, T] on the data's
        device. The same seed gives the same windows."""
        n = len(self) - ctx_len - 1
        if n <= 0:
            raise ValueError(
                f"the token stream ({len(self)} ids) is shorter than ctx_len + 2 = {ctx_len + 2}"
            )
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, n + 1, (batch_size,), generator=g).to(self.ids.device)
        idx = start[:, None] + torch.arange(ctx_len + 1, device=self.ids.device)  # (B, T + 1)
        w = self.ids[idx].long()
        return w[:, :-1], w[:, 1:]

    def streams(
        self, n_streams: int, ctx_len: int, max_tokens: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The stream cut into `n_streams` contiguous rows, as (x, y) windows [B, <= T] in order (for
        `evaluate`: pass the state from one window to the next). At most `max_tokens` targets in all."""
        total = len(self) - 1 if max_tokens is None else min(len(self) - 1, max_tokens)
        per = total // n_streams
        if per < 1:
            raise ValueError(f"{total} tokens cannot fill {n_streams} streams")
        rows = self.ids[: n_streams * per + 1]
        x_all = torch.stack([rows[i * per : (i + 1) * per] for i in range(n_streams)])
        y_all = torch.stack([rows[i * per + 1 : (i + 1) * per + 1] for i in range(n_streams)])
        for t in range(0, per, ctx_len):
            yield x_all[:, t : t + ctx_len].long(), y_all[:, t : t + ctx_len].long()


# ------------------------------------------------------------------------------------ eval + sampling
def _autocast(device: torch.device, precision: str):
    enabled = precision == "bf16" and device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def evaluate(
    model: RWKVLM,
    data: TokenData,
    token_bytes: Tensor,
    ctx_len: int = 512,
    n_streams: int = 16,
    max_tokens: int | None = None,
    precision: str = "fp32",
    progress: bool = False,
) -> dict[str, float]:
    """Held-out loss with the state carried across windows (module docstring).

    Args:
        model: the LM (put in eval mode for the call, restored after).
        data: the held-out stream.
        token_bytes: [V] UTF-8 byte count of each token id (0 for end of text), on any device.
        ctx_len: window length T.
        n_streams: rows B the stream is cut into.
        max_tokens: evaluate at most this many targets (None: all).
        precision: "bf16" for autocast on CUDA, else full precision.
        progress: show a tqdm bar.

    Returns:
        {"loss": nats per token, "ppl": per-token perplexity, "ppl_byte": per-byte perplexity,
        "bpb": bits per byte, "tokens": targets scored, "bytes": their UTF-8 bytes}.
    """
    was_training = model.training
    model.eval()
    device = model.emb.weight.device
    token_bytes = token_bytes.to(device)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    n_tok = n_bytes = 0
    state = None
    windows = list(data.streams(n_streams, ctx_len, max_tokens))
    for x, y in tqdm(windows, desc="eval", unit="win", disable=not progress, leave=False):
        x, y = x.to(device), y.to(device)
        with _autocast(device, precision):
            logits, state = model(x, state, full_output=True)
        nll += F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
        ).double()
        n_tok += y.numel()
        n_bytes += int(token_bytes[y].sum())
    model.train(was_training)
    loss = float(nll) / max(n_tok, 1)
    per_byte = float(nll) / max(n_bytes, 1)
    return {
        "loss": loss,
        "ppl": math.exp(loss),
        "ppl_byte": math.exp(per_byte),
        "bpb": per_byte / math.log(2),
        "tokens": n_tok,
        "bytes": n_bytes,
    }


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> Tensor:
    """[vocab_size] int64: the UTF-8 byte count of each id (ids the tokenizer lacks count 0)."""
    n = min(vocab_size, tokenizer.vocab_size)
    lengths = [len(tokenizer.token_bytes(i)) for i in range(n)] + [0] * (vocab_size - n)
    return torch.tensor(lengths, dtype=torch.int64)


@torch.no_grad()
def generate(
    model: RWKVLM,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_p: float = 0.5,
    stop: str | None = "\n\n",
    seed: int = 0,
) -> str:
    """Sample a continuation of `prompt` with nucleus sampling (RNN mode: one token per forward).

    Stops after `max_new_tokens`, at the end-of-text id, or once the continuation contains `stop`
    (for prompts ending in "Assistant:", where "\\n\\n" ends the reply; checked only for chat prompts).

    Returns:
        The continuation text (without the prompt; `stop` and what follows it removed).
    """
    was_training = model.training
    model.eval()
    device = model.emb.weight.device
    g = torch.Generator().manual_seed(seed)
    ids = tokenizer.encode(prompt)
    logits, state = model(torch.tensor([ids], device=device), None)
    out: list[int] = []
    chat_prompt = prompt.rstrip().endswith("Assistant:")
    for _ in range(max_new_tokens):
        probs = torch.softmax(logits[0].float().cpu() / max(temperature, 1e-6), dim=-1)
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < max(top_p, 1e-9)  # the top-p nucleus (first always)
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        token = int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=g)])
        if token == tokenizer.eos_id:
            break
        out.append(token)
        text = tokenizer.decode(out)
        if stop and chat_prompt and stop in text.lstrip("\n"):
            break
        logits, state = model(torch.tensor([[token]], device=device), state)
    model.train(was_training)
    text = tokenizer.decode(out)
    if stop and chat_prompt and stop in text:
        text = text[: text.index(stop)]
    return text


# ------------------------------------------------------------------------------------------ checkpoints
def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def asset_config(config: RWKVConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json of a model folder: what `RWKVLM.from_file(folder)` reads (the "tokenizer" field)
    plus the architecture and dims for people."""
    return {"architecture": "rwkv7", "name": config.name, **asdict(config), **(extra or {})}


def save_weights(model: RWKVLM, folder: Path, dtype: torch.dtype) -> Path:
    """model.safetensors (official key names, `dtype`) + config.json in `folder`: a folder that
    `RWKVLM.from_file` loads. Without the safetensors package, model.pth (a plain state dict, which
    `RWKVLM.from_file` also reads) instead.

    Returns:
        The weights file written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    (folder / "config.json").write_text(json.dumps(asset_config(model.config), indent=2) + "\n")
    try:
        from safetensors.torch import save_file
    except ImportError:
        logger.warning("no safetensors package: writing %s/model.pth instead", folder)
        path = folder / "model.pth"
        torch.save(tensors, path)
        return path
    path = folder / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "rwkv_mm.lm", "version": model.config.name})
    path.chmod(0o644)
    return path


# ------------------------------------------------------------------------------------------- training
def _warm_up(model: RWKVLM, device: torch.device, precision: str, ctx_len: int) -> str:
    """One forward + backward on a [1, ctx_len] batch before the clock of the schedule starts (builds the
    compiled kernels). Returns `precision` ("fp32" off CUDA), or "tf32" when bf16 autocast cannot run
    the model."""
    if device.type != "cuda":
        precision = "fp32"
    x = torch.zeros(1, ctx_len, dtype=torch.long, device=device)
    try:
        with _autocast(device, precision):
            logits, _ = model(x, full_output=True)
        logits.float().sum().backward()
    except RuntimeError as e:
        if precision != "bf16":
            raise
        logger.warning("bf16 autocast fails on this model (%s); training in fp32 with TF32 matmuls", e)
        precision = "tf32"
        model.zero_grad(set_to_none=True)
        return _warm_up(model, device, precision, ctx_len)
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return precision


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _final_report(
    model: RWKVLM,
    val_data: TokenData,
    tokenizer: Tokenizer,
    token_bytes: Tensor,
    args: argparse.Namespace,
    precision: str,
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Held-out metrics (all of --final-eval-tokens) and one sample per --prompts of the saved weights."""
    ev = evaluate(
        model, val_data, token_bytes, args.ctx_len, args.eval_batch, args.final_eval_tokens, precision
    )
    samples = []
    for i, prompt in enumerate(args.prompts):
        text = generate(
            model, tokenizer, prompt, args.sample_tokens, args.temperature, args.top_p, seed=args.seed + i
        )
        samples.append({"prompt": prompt, "completion": text})
    return ev, samples


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) training as the CLI describes; returns the summary also written to summary.json."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    ckpt_dir = Path(args.ckpt_dir or args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data)
    meta = json.loads((data_dir / "meta.json").read_text()) if (data_dir / "meta.json").is_file() else {}
    tokenizer_name = meta.get("tokenizer", "bytes")
    tokenizer = load_tokenizer(tokenizer_name)
    train_data = TokenData(data_dir / "train.npy", device)
    val_data = TokenData(data_dir / "val.npy", device)
    config = tiny_config(
        args.n_layer, args.n_embd, args.vocab_size, args.head_size, args.dim_ffn, tokenizer_name
    )
    torch.manual_seed(args.seed)
    model = init_rwkv7_(RWKVLM(config)).to(device).train()
    n_params = _count(model)
    logger.info("model: %s, %.2fM parameters", asdict(config), n_params / 1e6)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for what runs in float32
    precision = _warm_up(model, device, args.precision, args.ctx_len)
    opt = make_optimizer(model, args.lr, args.weight_decay, fused=device.type == "cuda")
    token_bytes = token_byte_lengths(tokenizer, config.vocab_size)

    step, tokens_seen, train_seconds = 0, 0, 0.0
    planned_seconds, clock_seconds = None, 0.0  # the time schedule: its length and wall time spent so far
    last = ckpt_dir / "last.pt"
    if args.resume:
        if not last.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {last}")
        ck = torch.load(last, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, tokens_seen, train_seconds = ck["step"], ck["tokens"], ck["train_seconds"]
        planned_seconds, clock_seconds = ck.get("planned_seconds"), ck.get("clock_seconds", 0.0)
        logger.info("resumed from %s at step %d", last, step)

    deadline = PROCESS_START + args.max_minutes * 60 if args.max_minutes else math.inf
    loop_start = time.monotonic()
    if args.max_steps is None and planned_seconds is None:
        if not args.max_minutes:
            raise ValueError("give --max-steps or --max-minutes (the LR schedule follows one of them)")
        planned_seconds = max(deadline - loop_start - args.reserve_seconds, 1.0)
    schedule = "steps" if args.max_steps is not None else "time"
    logger.info(
        "schedule by %s (%s), precision %s, batch %d x %d tokens",
        schedule,
        f"{args.max_steps} steps" if schedule == "steps" else f"{planned_seconds:.0f} s",
        precision,
        args.batch_size,
        args.ctx_len,
    )

    metrics_path = out / "metrics.csv"
    fields = [
        "step",
        "tokens",
        "seconds",
        "lr",
        "loss",
        "grad_norm",
        "tok_per_s",
        "val_loss",
        "val_ppl",
        "val_bpb",
    ]
    new_file = not (args.resume and metrics_path.is_file())
    metrics_file = open(metrics_path, "w" if new_file else "a", newline="")
    writer = csv.DictWriter(metrics_file, fieldnames=fields)
    if new_file:
        writer.writeheader()

    def save_ckpt() -> None:
        _save_atomic(
            {
                "version": CHECKPOINT_VERSION,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "tokens": tokens_seen,
                "train_seconds": train_seconds,
                "planned_seconds": planned_seconds,
                "clock_seconds": clock(),
                "config": asdict(config),
            },
            last,
        )

    def clock() -> float:  # wall time in the loop (evaluations and checkpoints included), over all runs
        return clock_seconds + time.monotonic() - loop_start

    def progress() -> float:
        if schedule == "steps":
            return step / max(args.max_steps, 1)
        return clock() / planned_seconds

    window_tokens, window_start = 0, time.monotonic()
    start_step, start_tokens, start_seconds = step, tokens_seen, train_seconds
    t_prev = time.monotonic()
    bar = tqdm(total=args.max_steps, initial=step, desc="train", unit="step", disable=not args.progress)
    stop_reason = "max_steps"
    while True:
        if args.max_steps is not None and step >= args.max_steps:
            break
        if schedule == "time" and clock() >= planned_seconds:
            stop_reason = "schedule"
            break
        if time.monotonic() + args.reserve_seconds >= deadline:
            stop_reason = "max_minutes"
            break
        if args.stop_after and step - start_step >= args.stop_after:
            stop_reason = "stop_after"
            break
        lr = lr_at(step, progress(), args.lr, args.min_lr, args.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        x, y = train_data.batch(args.batch_size, args.ctx_len, seed=args.seed * 1_000_003 + step)
        with _autocast(device, precision):
            logits, _ = model(x, full_output=True)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad or math.inf)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        window_tokens += x.numel()
        now = time.monotonic()
        train_seconds += now - t_prev
        t_prev = now
        bar.update(1)
        if step % args.log_every == 0 or step == 1:
            loss_v = float(loss.detach())  # syncs the device only every log_every steps
            tps = window_tokens / max(time.monotonic() - window_start, 1e-9)
            row = {
                "step": step,
                "tokens": tokens_seen,
                "seconds": round(train_seconds, 2),
                "lr": f"{lr:.3e}",
                "loss": f"{loss_v:.4f}",
                "grad_norm": f"{float(grad_norm):.3f}",
                "tok_per_s": round(tps),
            }
            if args.eval_every and step % args.eval_every == 0:
                ev = evaluate(
                    model, val_data, token_bytes, args.ctx_len, args.eval_batch, args.eval_tokens, precision
                )
                row.update(
                    val_loss=f"{ev['loss']:.4f}", val_ppl=f"{ev['ppl']:.3f}", val_bpb=f"{ev['bpb']:.4f}"
                )
                t_prev = time.monotonic()  # evaluation time is not training time
            writer.writerow(row)
            metrics_file.flush()
            bar.set_postfix(loss=f"{loss_v:.3f}", lr=f"{lr:.1e}", tok_s=f"{tps:.0f}")
            val = f" val {row['val_loss']}" if "val_loss" in row else ""
            logger.info("step %d loss %.4f lr %.2e %.0f tok/s%s", step, loss_v, lr, tps, val)
            window_tokens, window_start = 0, time.monotonic()
        if args.ckpt_every and step % args.ckpt_every == 0:
            save_ckpt()
            t_prev = time.monotonic()
    bar.close()
    train_tok_s = (tokens_seen - start_tokens) / max(train_seconds - start_seconds, 1e-9)

    if args.ckpt_every:
        save_ckpt()
    save_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.save_dtype]
    weights = save_weights(model, out, save_dtype)
    ev, samples = {}, []
    try:  # the weights are on disk: a failure here must not lose the run
        final = RWKVLM.from_file(out if weights.suffix == ".safetensors" else weights, device=device)
        ev, samples = _final_report(final, val_data, tokenizer, token_bytes, args, precision)
        final_row = {"step": step, "tokens": tokens_seen, "seconds": round(train_seconds, 2)}
        final_row.update(val_loss=f"{ev['loss']:.4f}", val_ppl=f"{ev['ppl']:.3f}", val_bpb=f"{ev['bpb']:.4f}")
        writer.writerow(final_row)
    except Exception:
        logger.exception("the final evaluation failed; the weights are in %s", weights)
    metrics_file.close()
    with open(out / "samples.txt", "w", encoding="utf-8") as f:
        for s in samples:
            f.write(f"----- prompt\n{s['prompt']}\n----- completion\n{s['completion']}\n\n")
    summary = {
        "params": n_params,
        "config": asdict(config),
        "steps": step,
        "tokens": tokens_seen,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(train_tok_s),
        "stop_reason": stop_reason,
        "precision": precision,
        "save_dtype": args.save_dtype,
        "held_out": ev,
        "samples": samples,
        "data": str(data_dir),
        "data_meta": {k: meta.get(k) for k in ("train_tokens", "val_tokens", "command")},
        "command": "python -m rwkv_mm.lm.train " + shlex.join(args.argv),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.monotonic() - PROCESS_START, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if ev:
        logger.info(
            "held-out: loss %.4f, ppl %.3f, %.4f bits/byte; %s", ev["loss"], ev["ppl"], ev["bpb"], out
        )
    return summary


# --------------------------------------------------------------------------------------------- export
PROVENANCE = """# tiny-lm: a demo RWKV-7 language model

**This is a demo model.** It has {params_m:.1f} M parameters and was trained for {minutes:.0f} minutes on
{mbytes:.0f} MB of text from Debian packages, so it writes English-looking text, dictionary-style answers and
Bible-like verses, but it knows little and makes things up. It exists so that `rwkv-chat`, the demo app
and the tests run offline out of the box. For real use load an official RWKV-7 checkpoint
(`RWKVLM.from_file("rwkv7-g1-....pth")`).

`RWKVLM.from_file(rwkv_mm.assets.path("tiny-lm"))` loads it; `lm.default_tokenizer()` gives its tokenizer.

- **Architecture**: RWKV-7 x070 (`rwkv_mm/lm/model.py`, "RWKV-7 Goose", arXiv 2503.14456; official code
  BlinkDL/RWKV-LM, Apache-2.0), {n_layer} layers, width {n_embd}, head size {head_size}, FFN {dim_ffn},
  LoRA widths decay {d_decay} / in-context rate {d_aaa} / value residual {d_mv} / gate {d_gate};
  {params:,} parameters, stored as {dtype} ({size_mb:.1f} MB).
- **Tokenizer**: `{tokenizer}` (`rwkv_mm.lm.tokenizer.ByteTokenizer`: UTF-8 bytes, byte b = id b + 1,
  id 0 = end of text); vocabulary {vocab_size}.
- **Chat format**: World / G1, `User: ...\\n\\nAssistant: ...\\n\\n` (as in the training dialogues).
- **Weights**: trained from scratch by rwkv_mm ({device}, torch {torch}, {precision}), {steps:,} steps,
  {tokens:,} tokens ({epochs:.2f} passes over the training text) in {train_seconds:.0f} s
  ({tok_s:,} tokens/s); finished {finished}. Released with rwkv_mm under Apache-2.0; the licences of
  the training data are below.

## Held-out evaluation

{val_tokens:,} held-out tokens ({val_bytes:,} bytes of UTF-8 text, {held_pct:.0f} % of the documents: whole
WordNet groups, Bible chapters and documentation sections never seen in training), scored by this
folder's weights with the state carried across windows of {ctx_len} tokens:

| metric | value |
|---|---|
| loss (nats per token) | {loss:.4f} |
| perplexity per token | {ppl:.3f} |
| perplexity per byte | {ppl_byte:.3f} |
| bits per byte | {bpb:.4f} |

## Training data

Built with `{corpus_command}` from the unpacked packages (`python -m rwkv_mm.lm.corpus fetch` =
`apt-get download` + `dpkg -x`, Debian 12 "bookworm"). Documents are plain text or dialogues in the chat
format made only from what the sources say (a WordNet definition as the answer to "What does X mean?", a
KJV verse and the World English Bible verse with the same reference, a Python docs paragraph as the
answer about the function it documents). {train_tokens:,} training tokens.

| source | Debian package (version) | content | licence |
|---|---|---|---|
{source_rows}

WordNet notice (required by its licence): {wordnet_copyright} WordNet 3.0 is provided "as is" by
Princeton University, which makes no representations or warranties, express or implied; the name of
Princeton University may not be used in advertising or publicity pertaining to this model.
Python documentation: {python_copyright} The World English Bible text was reformatted (verse numbering
and chat turns), so text derived from it is not called the World English Bible.

Training text by source (bytes / documents):

| source / kind | train bytes | train docs | held-out bytes | held-out docs |
|---|---|---|---|---|
{stats_rows}

## Commands

    {corpus_command}
    {train_command}
    {export_command}

## Samples (this folder's weights; nucleus sampling, temperature {temperature}, top-p {top_p}, seed = index)

{samples}
"""


def _provenance(
    summary: dict[str, Any],
    meta: dict[str, Any],
    ev: dict[str, float],
    samples: list[dict[str, str]],
    params: int,
    size_mb: float,
    dtype: str,
    export_command: str,
    temperature: float,
    top_p: float,
    ctx_len: int,
) -> str:
    """PROVENANCE.md from the training summary, the corpus metadata and the export's own evaluation."""
    cfg = summary["config"]
    sources = meta.get("sources", {})
    rows = []
    for key in ("wordnet", "kjv", "kjv-reader", "web", "python"):
        s = sources.get(key)
        if s:
            rows.append(f"| {key} | `{s['package']}` ({s['version']}) | {s['content']} | {s['licence']} |")
    stats = meta.get("stats", {})
    groups = sorted({k.split("/", 1)[1] for k in stats})
    stats_rows = []
    for g in groups:
        tr, va = stats.get(f"train/{g}", {}), stats.get(f"val/{g}", {})
        cells = [tr.get("bytes", 0), tr.get("documents", 0), va.get("bytes", 0), va.get("documents", 0)]
        stats_rows.append(f"| {g} | " + " | ".join(f"{c:,}" for c in cells) + " |")
    sample_text = "\n".join(
        f"**Sample {i + 1}**\n\n```text\n{s['prompt']}{s['completion']}\n```\n" for i, s in enumerate(samples)
    )
    train_tokens = meta.get("train_tokens") or 1
    return PROVENANCE.format(
        params_m=params / 1e6,
        minutes=summary["train_seconds"] / 60,
        mbytes=train_tokens / 1e6,
        params=params,
        size_mb=size_mb,
        dtype=dtype,
        device=summary.get("device", "?"),
        torch=summary.get("torch", "?"),
        precision=summary.get("precision", "?"),
        steps=summary["steps"],
        tokens=summary["tokens"],
        epochs=summary["tokens"] / train_tokens,
        train_seconds=summary["train_seconds"],
        tok_s=summary.get("tokens_per_second") or 0,
        finished=summary.get("finished", "?"),
        val_tokens=ev["tokens"],
        val_bytes=ev["bytes"],
        held_pct=100 * meta.get("held_out_fraction", 0),
        ctx_len=ctx_len,
        loss=ev["loss"],
        ppl=ev["ppl"],
        ppl_byte=ev["ppl_byte"],
        bpb=ev["bpb"],
        corpus_command=meta.get("command", "python -m rwkv_mm.lm.corpus build"),
        train_tokens=meta.get("train_tokens", 0),
        source_rows="\n".join(rows),
        wordnet_copyright=sources.get("wordnet", {}).get("copyright", ""),
        python_copyright=sources.get("python", {}).get("copyright", ""),
        stats_rows="\n".join(stats_rows),
        train_command=summary.get("command", "?"),
        export_command=export_command,
        temperature=temperature,
        top_p=top_p,
        samples=sample_text,
        **{
            k: cfg[k]
            for k in ("n_layer", "n_embd", "head_size", "dim_ffn", "d_decay", "d_aaa", "d_mv", "d_gate")
        },
        tokenizer=cfg.get("tokenizer"),
        vocab_size=cfg["vocab_size"],
    )


def export(
    run: Path,
    data: Path,
    output: Path,
    dtype: str | None = None,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    eval_tokens: int | None = None,
    ctx_len: int = 512,
    sample_tokens: int = 200,
    temperature: float = 1.0,
    top_p: float = 0.5,
    command: str = "",
    max_mb: float = 30.0,
) -> dict[str, Any]:
    """Write the asset folder `output` from a training run folder: model.safetensors (`dtype`, default as
    stored), config.json, PROVENANCE.md with the held-out perplexity and 3 samples of the exported model
    (loaded back with `RWKVLM.from_file(output)`).

    Returns:
        {"held_out": metrics, "samples": [...], "size_mb": folder size}.
    """
    summary = json.loads((run / "summary.json").read_text())
    meta = json.loads((data / "meta.json").read_text())
    src = RWKVLM.from_file(run, dtype=torch.float32)
    stored = str(next(iter(_read_dtypes(run / "model.safetensors"))))
    out_dtype = dtype or ("bf16" if "bfloat16" in stored else "fp32")
    output.mkdir(parents=True, exist_ok=True)
    save_weights(src, output, {"fp32": torch.float32, "bf16": torch.bfloat16}[out_dtype])
    model = RWKVLM.from_file(output)
    tokenizer = model.default_tokenizer()
    token_bytes = token_byte_lengths(tokenizer, model.config.vocab_size)
    ev = evaluate(model, TokenData(data / "val.npy"), token_bytes, ctx_len, 16, eval_tokens, progress=True)
    samples = [
        {"prompt": p, "completion": generate(model, tokenizer, p, sample_tokens, temperature, top_p, seed=i)}
        for i, p in enumerate(prompts)
    ]
    size_mb = sum(f.stat().st_size for f in output.iterdir() if f.is_file()) / 1e6
    params = _count(model)
    text = _provenance(
        summary, meta, ev, samples, params, size_mb, out_dtype, command, temperature, top_p, ctx_len
    )
    (output / "PROVENANCE.md").write_text(text)
    size_mb = sum(f.stat().st_size for f in output.iterdir() if f.is_file()) / 1e6
    if size_mb > max_mb:
        raise ValueError(f"the asset folder {output} is {size_mb:.1f} MB, more than the limit {max_mb} MB")
    logger.info(
        "exported %s: %.1f MB, held-out ppl %.3f (%.4f bits/byte)", output, size_mb, ev["ppl"], ev["bpb"]
    )
    return {"held_out": ev, "samples": samples, "size_mb": size_mb}


def _read_dtypes(path: Path) -> set[torch.dtype]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    """The training CLI (``export`` is a separate subcommand: ``... export --help``)."""
    p = argparse.ArgumentParser(prog="python -m rwkv_mm.lm.train", description=__doc__.split("\n")[0])
    g = p.add_argument_group("data and model")
    g.add_argument(
        "--data", default="runs/tinylm-data", help="folder from `python -m rwkv_mm.lm.corpus build`"
    )
    g.add_argument("--n-layer", type=int, default=6)
    g.add_argument("--n-embd", type=int, default=256)
    g.add_argument("--head-size", type=int, default=64)
    g.add_argument("--dim-ffn", type=int, default=None, help="FFN width (default 4 * n_embd)")
    g.add_argument("--vocab-size", type=int, default=256, help="embedding rows (256 for the byte tokenizer)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", "-b", type=int, default=32)
    g.add_argument("--ctx-len", type=int, default=512)
    g.add_argument("--lr", type=float, default=1.5e-3)
    g.add_argument("--min-lr", type=float, default=1.5e-5)
    g.add_argument("--warmup-steps", type=int, default=200)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm; 0 for none")
    g.add_argument(
        "--max-steps", type=int, default=None, help="steps (the LR schedule follows them if given)"
    )
    g.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of the whole process")
    g.add_argument(
        "--stop-after", type=int, default=None, help="steps to run in this process (then --resume)"
    )
    g.add_argument("--reserve-seconds", type=float, default=60.0, help="kept for the final eval and saving")
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("device")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    g.add_argument(
        "--precision",
        choices=("bf16", "tf32", "fp32"),
        default="bf16",
        help="CUDA: bf16 autocast (falls back to tf32 if the model cannot run it), tf32, fp32",
    )
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    g = p.add_argument_group("outputs")
    g.add_argument("--out", default="runs/tinylm")
    g.add_argument("--ckpt-dir", default=None, help="resumable checkpoints (default: --out)")
    g.add_argument("--ckpt-every", type=int, default=1000, help="steps; 0: no resumable checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from CKPT_DIR/last.pt")
    g.add_argument("--save-dtype", choices=("fp32", "bf16"), default="fp32", help="final model.safetensors")
    g.add_argument("--log-every", type=int, default=50)
    g.add_argument("--eval-every", type=int, default=1000, help="steps (a multiple of --log-every); 0: none")
    g.add_argument("--eval-batch", type=int, default=16, help="held-out streams")
    g.add_argument("--eval-tokens", type=int, default=131072, help="held-out tokens per periodic eval")
    g.add_argument("--final-eval-tokens", type=int, default=None, help="held-out tokens at the end (all)")
    g.add_argument("--prompts", nargs="*", default=list(DEFAULT_PROMPTS))
    g.add_argument("--sample-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=0.5)
    g.add_argument("--progress", action="store_true", help="tqdm bar (off by default: logs go to files)")
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rwkv_mm.lm.train export", description=export.__doc__.split("\n")[0]
    )
    p.add_argument(
        "--run", type=Path, required=True, help="a training --out folder (model.safetensors, summary)"
    )
    p.add_argument("--data", type=Path, default=Path("runs/tinylm-data"))
    p.add_argument("--output", type=Path, default=Path("rwkv_mm/assets/tiny-lm"))
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: as stored in the run")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens scored (default all)")
    p.add_argument("--ctx-len", type=int, default=512)
    p.add_argument("--sample-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m rwkv_mm.lm.train [...]` / `python -m rwkv_mm.lm.train export [...]`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        args = _export_parser().parse_args(argv[1:])
        torch.set_num_threads(args.threads)
        command = "python -m rwkv_mm.lm.train " + shlex.join(argv)
        res = export(
            args.run,
            args.data,
            args.output,
            args.dtype,
            eval_tokens=args.eval_tokens,
            ctx_len=args.ctx_len,
            sample_tokens=args.sample_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            command=command,
        )
        print(json.dumps({"held_out": res["held_out"], "size_mb": round(res["size_mb"], 2)}, indent=2))
        return 0
    args = build_parser().parse_args(argv)
    args.argv = argv
    summary = train(args)
    print(json.dumps({k: summary[k] for k in ("params", "steps", "tokens", "tokens_per_second", "held_out")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
