"""Train the RWKV-7 embedder: distillation from all-MiniLM-L6-v2 plus contrastive pairs (the bundled default).

Recipe (specs/embed.md §1, §6): the student is a small RWKV-7 encoder (`rwkv_mm.embed.encoder.RWKVEncoder`,
blocks from `rwkv_mm.lm.model`) with three read-out heads ("state", "mean", "eos") trained together on one
backbone. Two kinds of batches, alternating (`--pair-every`):

- distillation batches of sentences from `sentences.tsv`: per head, with s = the normalised student
  vectors [B, D] and t the teacher's (normalised, D = 384): ``(1 - cos(s_i, t_i)).mean()`` plus
  ``w_rel * mse(s s^T, t t^T)`` (the in-batch similarity structure, which is what STS measures);
- pair batches from `pairs.tsv`, one source per batch (WordNet example -> definition, or KJV -> WEB
  verse): per head, symmetric InfoNCE over in-batch negatives at temperature `tau`, weighted `w_pair`, plus
  the distillation loss on both sides.

Batches are length-bucketed (sorted by token count with jitter, then shuffled), so a batch runs as one or
two segments of `RWKVEncoder.pool`. Runs are resumable: ``RUN/last.pt`` (model, optimiser, data position,
RNG) is written every `--save-every` steps and when `--max-minutes` is spent; ``RUN/metrics.csv`` gets the
losses and every evaluation (STS-B dev per head, WordNet dev R@1 per head).

CLI (CPU; ``--budget-minutes`` anneals the schedule over a fixed training time, ``--max-minutes`` stops a
call early, and rerunning with only ``--run`` resumes)::

    python -m rwkv_mm.embed.train fit --run runs/embed/cpu-l2c256 --data runs/embed/data \
        --tokenizer runs/embed/tok/tokenizer.json --size l2c256 --steps 100000 --budget-minutes 60 \
        --stsb /path/to/stsb --threads 1 --max-minutes 25
    python -m rwkv_mm.embed.train export runs/embed/cpu-l2c256 rwkv_mm/assets/embedder [--pooling auto] \
        [--eval-json eval.json --speed bench.txt --notes notes.md]

GPU: the same commands with ``--device cuda --batch-size 512 --lr 2e-3``; the teacher vectors of all
sentences take about a minute there (``python -m rwkv_mm.embed.teacher DATA --device cuda --batch-size 1024
[--packed TEACHER]``, where TEACHER is the int8 copy written by ``--pack`` when the package is missing).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import random
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoder import BUILTIN_TOKENIZERS, POOLINGS, Embedder, EmbedderConfig, RWKVEncoder
from .evaluate import read_heldout, read_stsb, retrieval, spearman
from .provenance import write_provenance

__all__ = ["SIZES", "TrainConfig", "choose_pooling", "export", "fit", "init_rwkv7_"]

logger = logging.getLogger(__name__)

# student sizes: name -> EmbedderConfig fields (LoRA ranks scaled down from the 0.1B model's 64/64/32/128)
SIZES: dict[str, dict] = {
    "l2c256": dict(n_layer=2, n_embd=256, dim_ffn=1024),
    "l4c256": dict(n_layer=4, n_embd=256, dim_ffn=1024),
    "l6c256": dict(n_layer=6, n_embd=256, dim_ffn=1024),
    "l6c384": dict(n_layer=6, n_embd=384, dim_ffn=1536, d_decay=48, d_aaa=48, d_mv=24, d_gate=96),
    "tiny": dict(n_layer=2, n_embd=64, dim_ffn=128, d_decay=8, d_aaa=8, d_mv=8, d_gate=16, head_hidden=32),
}
POOLING_MARGIN = 0.01  # "state" stays the default unless another read-out beats it by more than this


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (stored in RUN/train.json; a resumed run keeps its own)."""

    data: str
    tokenizer: str
    size: str = "l4c256"
    steps: int = 6000
    batch_size: int = 128
    pair_every: int = 4
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.01
    w_rel: float = 1.0
    w_pair: float = 0.3
    tau: float = 0.05
    seed: int = 0
    budget_minutes: float | None = None  # whole run's training time: anneal over it, end when spent
    eval_every: int = 500
    save_every: int = 200
    stsb: str | None = None
    vocab_size: int | None = None


# ----------------------------------------------------------------------------------------------------------
# initialisation


def _orthogonal_(w: Tensor, gain: float) -> None:
    nn.init.orthogonal_(w, gain=gain)


@torch.no_grad()
def init_rwkv7_(model: RWKVEncoder, seed: int = 0) -> None:
    """RWKV-7 training initialisation (RWKV-7 paper, appendix on initialisation), in place.

    Token-shift mixes fall from 1 towards 0 across channels, more steeply in deeper layers; decay biases
    w0 spread from slow to fast channels; LoRA down-projections start at zero and up-projections small and
    orthogonal; output and channel-mix value matrices start at zero (each block starts as the identity);
    ln_x gains grow with depth; the embedding starts tiny (ln0 rescales it).
    """
    torch.manual_seed(seed)
    lm = model.lm
    L, C = lm.n_layer, lm.n_embd
    ddd = torch.arange(C, dtype=torch.float32) / C
    nn.init.uniform_(model.emb.weight, -1e-4, 1e-4)
    for i, block in enumerate(model.blocks):
        r01 = i / max(L - 1, 1)
        r10 = 1.0 - i / L
        att, ffn = block.att, block.ffn
        for name, p in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            getattr(att, name).copy_((1.0 - ddd.pow(p * r10)).view(1, 1, C))
        n = torch.arange(C, dtype=torch.float32)
        decay = -7 + 5 * (n / (C - 1)) ** (0.85 + 1.0 * r01**0.5)
        att.w0.copy_((decay + 0.5).view(1, 1, C))
        att.a0.zero_()
        att.k_k.fill_(0.85)
        att.k_a.fill_(1.0)
        att.r_k.zero_()
        for down, up in (("w1", "w2"), ("a1", "a2"), ("g1", "g2")) + ((("v1", "v2"),) if i > 0 else ()):
            getattr(att, down).zero_()
            _orthogonal_(getattr(att, up), 0.1)
        if i > 0:
            att.v0.fill_(1.0)
        bound = C**-0.5
        nn.init.uniform_(att.receptance.weight, -0.5 * bound, 0.5 * bound)
        nn.init.uniform_(att.key.weight, -0.05 * bound, 0.05 * bound)
        nn.init.uniform_(att.value.weight, -0.5 * bound, 0.5 * bound)
        att.output.weight.zero_()
        att.ln_x.weight.copy_(torch.full((C,), ((1 + i) / L) ** 0.7))
        att.ln_x.bias.zero_()
        ffn.x_k.copy_((1.0 - ddd.pow(r10**4)).view(1, 1, C))
        _orthogonal_(ffn.key.weight, 1.0)
        ffn.value.weight.zero_()


# ----------------------------------------------------------------------------------------------------------
# data


class TrainData:
    """Tokenised sentences with teacher vectors, and positive pairs mapped to sentence rows.

    Attributes:
        tokens: per sentence, int32 ids with the end-of-text id appended (every sentence).
        teacher: float32 [N, 384] normalised teacher vectors of the first N sentences (the labelled rows;
            distillation batches come from them).
        pairs: {source: int64 [P, 2] rows (a, b)}; pair rows need no teacher vector (their distillation
            term covers the labelled ones only).
    """

    def __init__(self, data: str | Path, embedder: Embedder):
        data = Path(data)
        with open(data / "sentences.tsv", encoding="utf-8") as f:
            texts = [line.rstrip("\n").split("\t", 1)[1] for line in f]
        full = data / "teacher.npy"
        if full.exists():
            teacher = np.load(full)
        else:
            shards = sorted(data.glob("teacher-*.npy"))
            shards = [p for i, p in enumerate(shards) if p.name == f"teacher-{i:04d}.npy"]
            if not shards:
                raise FileNotFoundError(f"no teacher vectors in {data}: run python -m rwkv_mm.embed.teacher")
            teacher = np.concatenate([np.load(p) for p in shards])
        n = len(teacher)
        self.teacher = torch.from_numpy(teacher.astype(np.float32))
        self.labelled = n
        self.tokens = [t.numpy().astype(np.int32) for t in embedder.tokenize(texts)]
        self.lengths = np.array([len(t) for t in self.tokens[:n]])
        row: dict[str, int] = {}
        for i, t in enumerate(texts):
            row.setdefault(t, i)
        pairs: dict[str, list[tuple[int, int]]] = {}
        with open(data / "pairs.tsv", encoding="utf-8") as f:
            for line in f:
                kind, a, b = line.rstrip("\n").split("\t")
                if a in row and b in row:
                    pairs.setdefault(kind, []).append((row[a], row[b]))
        self.pairs = {k: np.array(v, dtype=np.int64) for k, v in pairs.items()}
        logger.info(
            "data: %d labelled sentences of %d, pairs %s, mean labelled length %.1f tokens",
            n,
            len(texts),
            {k: len(v) for k, v in self.pairs.items()},
            self.lengths.mean(),
        )

    def epoch_batches(self, epoch: int, batch_size: int, seed: int) -> list[np.ndarray]:
        """The distillation batches of one epoch: length-bucketed with jitter, in shuffled order."""
        rng = np.random.default_rng([seed, epoch])
        key = self.lengths + rng.uniform(0, 3, len(self.lengths))
        order = np.argsort(key, kind="stable")
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        rng.shuffle(batches)
        return batches

    def pair_batch(self, step: int, batch_size: int, seed: int) -> tuple[str, np.ndarray]:
        """A pair batch of one source (sources in proportion to their sizes), rows [b, 2]."""
        rng = np.random.default_rng([seed, 1, step])
        kinds = sorted(self.pairs)
        sizes = np.array([len(self.pairs[k]) for k in kinds], dtype=np.float64)
        kind = kinds[rng.choice(len(kinds), p=sizes / sizes.sum())]
        rows = self.pairs[kind][rng.choice(len(self.pairs[kind]), batch_size, replace=False)]
        return kind, rows


# ----------------------------------------------------------------------------------------------------------
# losses


def distill_loss(s: Tensor, t: Tensor, w_rel: float) -> Tensor:
    """s: student [B, D], t: normalised teacher [B, D] -> cosine + relational MSE."""
    s = F.normalize(s, dim=-1)
    cos = (1 - (s * t).sum(-1)).mean()
    rel = F.mse_loss(s @ s.T, t @ t.T)
    return cos + w_rel * rel


def info_nce(a: Tensor, b: Tensor, tau: float) -> Tensor:
    """Symmetric InfoNCE over in-batch negatives: a, b [B, D], positives on the diagonal."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / tau
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# ----------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def _embed_all(
    model: RWKVEncoder, embedder: Embedder, texts: list[str], batch: int = 128
) -> dict[str, np.ndarray]:
    seqs = embedder.tokenize(texts)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    heads = list(model.config.heads)
    out = {p: np.zeros((len(seqs), model.config.dim), dtype=np.float32) for p in heads}
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        res = model.pool([seqs[i] for i in idx], heads)
        for p in heads:
            out[p][idx] = res[p].float().cpu().numpy()
    return out


def evaluate(
    model: RWKVEncoder, embedder: Embedder, stsb_dir: str | None, heldout: Path, split: str = "dev"
) -> dict:
    """STS-B Spearman (split "dev" or "test") and WordNet retrieval R@1 / MRR of every head."""
    was_training = model.training
    model.eval()
    res: dict[str, float] = {}
    if stsb_dir:
        a, b, scores = read_stsb(Path(stsb_dir) / f"sts-{split}.csv")
        emb = _embed_all(model, embedder, a + b)
        for p, e in emb.items():
            e = e / np.linalg.norm(e, axis=1, keepdims=True)
            res[f"stsb_{split}_{p}"] = spearman((e[: len(a)] * e[len(a) :]).sum(1), scores)
    if heldout.exists():
        rows = read_heldout(heldout)
        rows = rows[:1000] if split == "dev" else rows[1000:2000]
        ex, de = [r[3] for r in rows], [r[2] for r in rows]
        emb = _embed_all(model, embedder, ex + de)
        for p, e in emb.items():
            r = retrieval(e[: len(ex)], e[len(ex) :])
            res[f"wn_{split}_r1_{p}"] = r["R@1"]
            res[f"wn_{split}_mrr_{p}"] = r["MRR"]
    model.train(was_training)
    return res


def choose_pooling(scores: dict[str, float], split: str = "dev") -> str:
    """ "state" unless another read-out's STS-B Spearman beats it by more than POOLING_MARGIN."""
    key = f"stsb_{split}_" + "{}"
    best = max(POOLINGS, key=lambda p: scores.get(key.format(p), -1.0))
    if scores.get(key.format(best), -1.0) > scores.get(key.format("state"), -1.0) + POOLING_MARGIN:
        return best
    return "state"


# ----------------------------------------------------------------------------------------------------------
# training loop


def _progress(step: int, seconds: float, cfg: TrainConfig) -> float:
    """Fraction of the run done: by steps, or by training time when `budget_minutes` is set (whichever is
    further), so that a fixed time window still ends with the learning rate annealed."""
    p = step / cfg.steps
    if cfg.budget_minutes:
        p = max(p, seconds / (60 * cfg.budget_minutes))
    return min(1.0, p)


def _lr_at(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup` steps, then cosine from lr to lr * min_lr_ratio over the progress."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _build(cfg: TrainConfig, device: str) -> tuple[RWKVEncoder, Embedder]:
    from ..lm.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer)
    tok_name = cfg.tokenizer if cfg.tokenizer in BUILTIN_TOKENIZERS else "tokenizer.json"
    ecfg = EmbedderConfig(
        **SIZES[cfg.size], vocab_size=cfg.vocab_size or tok.vocab_size, tokenizer=tok_name, eos_id=tok.eos_id
    )
    model = RWKVEncoder(ecfg)
    init_rwkv7_(model, cfg.seed)
    model.to(device)
    return model, Embedder(model, tok, model_id=f"train-{cfg.size}", device=device)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "emb" not in name and "query" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8)


def fit(
    run: str | Path, cfg: TrainConfig | None = None, device: str = "cpu", max_minutes: float | None = None
) -> bool:
    """Train (or resume) the run in folder `run`.

    Args:
        run: the run folder; holds train.json, last.pt, metrics.csv.
        cfg: the run's config (required for a new run; a resumed run reads train.json).
        device: "cpu" or "cuda".
        max_minutes: stop (after saving) when this much wall time is spent.

    Returns:
        True when the run has reached cfg.steps.
    """
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    cfg_file = run / "train.json"
    if cfg_file.exists():
        cfg = TrainConfig(**json.loads(cfg_file.read_text()))
    elif cfg is None:
        raise ValueError(f"{run} is a new run: a TrainConfig is needed")
    else:
        cfg_file.write_text(json.dumps(asdict(cfg), indent=2))
    start_time = time.monotonic()
    if str(device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    model, embedder = _build(cfg, device)
    opt = _optimizer(model, cfg)
    step, epoch, pos, seconds = 0, 0, 0, 0.0
    ckpt = run / "last.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, epoch, pos, seconds = state["step"], state["epoch"], state["pos"], state.get("seconds", 0.0)
        logger.info("resumed %s at step %d (epoch %d, batch %d)", run, step, epoch, pos)
    if _progress(step, seconds, cfg) >= 1.0:
        return True
    data = TrainData(cfg.data, embedder)
    heldout = Path(cfg.data) / "heldout.tsv"
    batches = data.epoch_batches(epoch, cfg.batch_size, cfg.seed)
    heads = list(model.config.heads)
    metrics = run / "metrics.csv"
    fields = ["step", "epoch", "minutes", "lr", "loss", "kind"]
    fields += [f"{m}_dev_{p}" for m in ("stsb", "wn_r1", "wn_mrr") for p in POOLINGS]
    fields = [f.replace("wn_r1_dev", "wn_dev_r1").replace("wn_mrr_dev", "wn_dev_mrr") for f in fields]
    from tqdm.auto import tqdm

    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.size}", mininterval=10)
    ema = None

    def save() -> None:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "epoch": epoch,
                 "pos": pos, "seconds": seconds, "labelled": len(data.teacher)}  # fmt: skip
        torch.save(state, run / "last.tmp")
        (run / "last.tmp").replace(ckpt)

    def log(row: dict) -> None:
        new = not metrics.exists()
        with open(metrics, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)

    tick = time.monotonic()
    while _progress(step, seconds, cfg) < 1.0:
        now = time.monotonic()
        seconds, tick = seconds + now - tick, now
        if max_minutes is not None and time.monotonic() - start_time > 60 * max_minutes:
            save()
            logger.info("time budget spent at step %d; rerun the same command to resume", step)
            bar.close()
            return False
        lr = _lr_at(step, _progress(step, seconds, cfg), cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        if cfg.pair_every and step % cfg.pair_every == cfg.pair_every - 1 and data.pairs:
            kind, rows = data.pair_batch(step, cfg.batch_size // 2, cfg.seed)
            idx = np.concatenate([rows[:, 0], rows[:, 1]])
        else:
            if pos >= len(batches):
                epoch, pos = epoch + 1, 0
                batches = data.epoch_batches(epoch, cfg.batch_size, cfg.seed)
            kind, idx, rows = "distill", batches[pos], None
            pos += 1
        seqs = [torch.from_numpy(data.tokens[i]) for i in idx]  # pool() moves one padded batch
        lab = torch.from_numpy(idx < data.labelled).to(device)  # rows with a teacher vector
        teacher = data.teacher[np.minimum(idx, data.labelled - 1)].to(device)
        out = model.pool(seqs, heads)
        loss = torch.zeros((), device=device)
        for p in heads:
            if lab.sum() > 1:
                loss = loss + distill_loss(out[p][lab], teacher[lab], cfg.w_rel)
            if rows is not None:
                n = len(rows)
                loss = loss + cfg.w_pair * info_nce(out[p][:n], out[p][n:], cfg.tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{ema:.4f}", lr=f"{lr:.2e}", epoch=epoch)
            log({"step": step, "epoch": epoch, "minutes": round((time.monotonic() - start_time) / 60, 2),
                 "lr": lr, "loss": round(ema, 5), "kind": kind})  # fmt: skip
        if step % cfg.save_every == 0:
            save()
        if step % cfg.eval_every == 0 or _progress(step, seconds, cfg) >= 1.0:
            eval_start = time.monotonic()
            res = evaluate(model, embedder, cfg.stsb, heldout, "dev")
            logger.info("step %d: %s", step, {k: round(v, 4) for k, v in res.items()})
            log({"step": step, "epoch": epoch, "kind": "eval", **{k: round(v, 5) for k, v in res.items()}})
            tick += time.monotonic() - eval_start  # evaluation time is not training time
    save()
    bar.close()
    return True


# ----------------------------------------------------------------------------------------------------------
# export


def load_run(run: str | Path, device: str = "cpu") -> Embedder:
    """The embedder of a run's last checkpoint (all heads), pooling from its config."""
    run = Path(run)
    cfg = TrainConfig(**json.loads((run / "train.json").read_text()))
    model, embedder = _build(cfg, device)
    model.load_state_dict(torch.load(run / "last.pt", map_location=device, weights_only=False)["model"])
    model.eval()
    return embedder


def export(
    run: str | Path,
    out: str | Path,
    pooling: str = "auto",
    stsb_dir: str | None = None,
    eval_json: str | Path | None = None,
    speed: str | None = None,
    device: str = "cpu",
    notes: str | None = None,
) -> tuple[Embedder, dict]:
    """Write the run's model as an embedder folder: float16 weights, tokenizer.json, PROVENANCE.md.

    Args:
        pooling: the default read-out, or "auto": measured on STS-B dev with `choose_pooling`.
        stsb_dir: STS-B folder for the dev scores (default: the run's).
        eval_json: output of benchmarks/eval_embed.py --json, copied into PROVENANCE.md.
        speed: a throughput table (benchmarks/bench_embed.py output) for PROVENANCE.md.
        device: where the dev scores are computed.
        notes: free text appended to PROVENANCE.md.

    Returns:
        The embedder and the dev scores used for the choice.
    """
    embedder = load_run(run, device)
    cfg = TrainConfig(**json.loads((Path(run) / "train.json").read_text()))
    scores = evaluate(embedder.model, embedder, stsb_dir or cfg.stsb, Path(cfg.data) / "heldout.tsv", "dev")
    embedder.pooling = choose_pooling(scores) if pooling == "auto" else pooling
    embedder.model.to("cpu")
    embedder.save(out, dtype=torch.float16)
    write_provenance(out, run, embedder, scores, eval_json, speed, notes)
    return embedder, scores


def main(argv: list[str] | None = None) -> int:
    """``python -m rwkv_mm.embed.train {fit,export}``."""
    parser = argparse.ArgumentParser(prog="python -m rwkv_mm.embed.train", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_fit = sub.add_parser("fit", help="train or resume a run")
    p_fit.add_argument("--run", required=True)
    for f in fields(TrainConfig):  # every hyper-parameter has a flag; a resumed run keeps its train.json
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        extra = {"choices": sorted(SIZES)} if f.name == "size" else {}
        default = None if f.default is MISSING else f.default
        p_fit.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default, **extra)
    p_fit.add_argument("--device", default="cpu")
    p_fit.add_argument("--threads", type=int, default=1)
    p_fit.add_argument(
        "--max-minutes", type=float, default=None, help="stop this call (resumable) after this"
    )
    p_exp = sub.add_parser("export", help="write a run as an embedder folder")
    p_exp.add_argument("run")
    p_exp.add_argument("out")
    p_exp.add_argument("--pooling", default="auto", choices=["auto", *POOLINGS])
    p_exp.add_argument("--stsb", default=None)
    p_exp.add_argument("--eval-json", default=None, help="benchmarks/eval_embed.py --json output")
    p_exp.add_argument("--speed", default=None, help="a file with benchmarks/bench_embed.py output")
    p_exp.add_argument("--device", default="cpu")
    p_exp.add_argument("--notes", default=None, help="a file whose text is appended to PROVENANCE.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "fit":
        torch.set_num_threads(args.threads)
        random.seed(args.seed)
        cfg = None
        if args.data:
            cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
        done = fit(args.run, cfg, args.device, args.max_minutes)
        return 0 if done else 3
    speed = Path(args.speed).read_text().strip() if args.speed else None
    notes = Path(args.notes).read_text().strip() if args.notes else None
    embedder, scores = export(
        args.run, args.out, args.pooling, args.stsb, args.eval_json, speed, args.device, notes
    )
    print(json.dumps({"model_id": embedder.model_id, "pooling": embedder.pooling, **scores}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
