"""Train Vision-RWKV models: a timm-style CLI for classification and segmentation, single process or DDP.

    python -m rwkv_mm.vision.train --model vrwkv_fmnist --data fashion-mnist --epochs 20 \\
        --batch-size 128 --lr 1e-3 --model-ema --output runs/vrwkv-fmnist
    python -m rwkv_mm.vision.train ... --resume              # continue from OUTPUT/last.pt
    torchrun --nproc_per_node 2 -m rwkv_mm.vision.train ...  # DDP (gloo on CPU, nccl on GPU)
    python -m rwkv_mm.vision.train --task seg --model vrwkv_fmnist --data fashion-mnist ...  # scenes, mIoU
    python -m rwkv_mm.vision.train export --checkpoint runs/vrwkv-fmnist/last.pt \\
        --output rwkv_mm/assets/vrwkv-fmnist            # bundled asset: safetensors + config + provenance

Recipe as Vision-RWKV's (and timm's train.py): AdamW without weight decay on norms, biases and the
mixing coefficients, per-step cosine schedule with linear warm-up, label smoothing, optional
Mixup/CutMix, gradient clipping, optional EMA of the weights (timm's ModelEmaV3). Every epoch ends
with an evaluation, a row in OUTPUT/metrics.csv and a checkpoint OUTPUT/last.pt (model, optimizer,
scheduler, EMA, epoch, RNG states, arguments) written atomically; OUTPUT/best.pt keeps the weights
of the best evaluation. Checkpoints hold tensors and plain Python values only, so they load with
`torch.load(weights_only=True)`. The global RNGs are reseeded from (seed, epoch, rank) at the start
of every epoch and the sampler shuffles from (seed, epoch), so a resumed run repeats the epochs it
has left exactly as an uninterrupted run would.
"""

from __future__ import annotations

import argparse
import ast
import csv
import datetime
import json
import logging
import math
import os
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

__all__ = ["build_parser", "evaluate", "export", "main", "train", "train_step"]

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------- arguments
def _kv(text: str) -> tuple[str, Any]:
    """`key=value` with a Python literal value (`depth=2`, `mlp_ratio=2.0`, `bi_wkv_mode='paper'`)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word: a string


def build_parser() -> argparse.ArgumentParser:
    """The training CLI's arguments (timm train.py's names where it has them)."""
    p = argparse.ArgumentParser(
        prog="python -m rwkv_mm.vision.train",
        description="Train a Vision-RWKV classifier or segmenter (`... export --help` for the exporter).",
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="vrwkv_fmnist", help="timm model name (rwkv_mm's vrwkv_* registered)")
    g.add_argument(
        "--model-kwargs",
        nargs="*",
        type=_kv,
        default=[],
        metavar="KEY=VALUE",
        help="extra model arguments, e.g. depth=2 embed_dim=32",
    )
    g.add_argument(
        "--pretrained",
        action="store_true",
        help="start from the model's pretrained weights (vrwkv_fmnist: the bundled classifier)",
    )
    g.add_argument("--task", choices=("cls", "seg"), default="cls", help="classification or segmentation")
    g.add_argument(
        "--data",
        default="fashion-mnist",
        choices=("fashion-mnist", "fashion-mnist-scenes", "imagefolder"),
        help="fashion-mnist (with --task seg: the synthetic scenes) or imagefolder (DATA_DIR/{train,val})",
    )
    g.add_argument(
        "--data-dir",
        default=None,
        help="folder of the Fashion-MNIST idx files (default: Debian's) or of the ImageFolder data",
    )
    g.add_argument("--img-size", type=int, default=None, help="input side (ImageFolder) / backbone img_size")
    g.add_argument("--train-limit", type=int, default=None, help="use only this many training samples/scenes")
    g.add_argument(
        "--eval-limit", type=int, default=None, help="use only this many evaluation samples/scenes"
    )
    g.add_argument("--scene-size", type=int, default=128, help="side of a synthetic scene")
    g.add_argument("--seg-channels", type=int, default=128, help="width of the segmentation decoder")
    g.add_argument("--no-aug", action="store_true", help="no training augmentation (Fashion-MNIST)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=20)
    g.add_argument("--batch-size", "-b", type=int, default=128, help="per process")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--warmup-epochs", type=float, default=1.0)
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--clip-grad", type=float, default=5.0, help="max gradient norm; 0 for none")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--mixup", type=float, default=0.0, help="Mixup alpha; 0 for off")
    g.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha; 0 for off")
    g.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    g.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (also evaluated)")
    g.add_argument("--model-ema-decay", type=float, default=0.999)
    g.add_argument("--max-steps-per-epoch", type=int, default=None, help="cut every epoch short (smoke runs)")

    g = p.add_argument_group("run")
    g.add_argument("--output", "-o", required=True, help="run folder: last.pt, best.pt, metrics.csv, log")
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="continue from a checkpoint (bare: OUTPUT/last.pt)",
    )
    g.add_argument(
        "--stop-epoch",
        type=int,
        default=None,
        help="stop after this many epochs, keeping the --epochs schedule (split a run into sessions)",
    )
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


# ---------------------------------------------------------------- distributed
@dataclass
class DistInfo:
    """Where this process sits: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        index = local_rank if world_size > 1 else torch.device(device).index
        if index is not None:
            torch.cuda.set_device(index)
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, dev)


def _all_reduce(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t)
    return t


# ---------------------------------------------------------------- data and model
def build_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, tuple[str, ...], int]:
    """(train set, eval set, class names, input channels) for the task and data of `args`."""
    from .data import (
        FashionMNIST,
        FashionMNISTScenes,
        fashion_mnist_transform,
        image_folder,
        load_fashion_mnist,
    )

    if args.task == "seg":
        if args.data == "imagefolder":
            raise ValueError("--task seg trains on the synthetic scenes; use --data fashion-mnist")
        tr_img, tr_lab = load_fashion_mnist("train", args.data_dir)
        te_img, te_lab = load_fashion_mnist("test", args.data_dir)
        common = dict(size=args.scene_size)
        train_set = FashionMNISTScenes(
            tr_img, tr_lab, length=args.train_limit or 20000, seed=args.seed, **common
        )
        # evaluation scenes from the test items, with a seed of their own
        eval_set = FashionMNISTScenes(
            te_img, te_lab, length=args.eval_limit or 1000, seed=10_000 + args.seed, **common
        )
        return train_set, eval_set, train_set.classes, 1
    if args.data in ("fashion-mnist", "fashion-mnist-scenes"):
        if args.data == "fashion-mnist-scenes":
            raise ValueError("fashion-mnist-scenes is a segmentation set; add --task seg")
        train_tf = fashion_mnist_transform(train=True, pad=0 if args.no_aug else 2, flip=not args.no_aug)
        train_set = FashionMNIST("train", args.data_dir, transform=train_tf, limit=args.train_limit)
        eval_set = FashionMNIST("test", args.data_dir, limit=args.eval_limit)
        return train_set, eval_set, train_set.classes, 1
    if args.data_dir is None:
        raise ValueError("--data imagefolder needs --data-dir with train/ and val/ subfolders")
    size = args.img_size or 224
    root = Path(args.data_dir)
    train_set = image_folder(root / "train", train=not args.no_aug, input_size=(3, size, size))
    eval_set = image_folder(root / "val", train=False, input_size=(3, size, size))
    if args.train_limit:
        train_set = Subset(train_set, range(min(args.train_limit, len(train_set))))
    if args.eval_limit:
        eval_set = Subset(eval_set, range(min(args.eval_limit, len(eval_set))))
    classes = tuple((train_set.dataset if isinstance(train_set, Subset) else train_set).classes)
    return train_set, eval_set, classes, 3


def build_model(args: argparse.Namespace, num_classes: int, in_chans: int) -> nn.Module:
    """A timm classifier, or a VRWKVSegmenter on a timm backbone for --task seg."""
    import timm

    from . import vrwkv  # noqa: F401  (registers the models)
    from .heads import VRWKVSegmenter

    kwargs: dict[str, Any] = dict(in_chans=in_chans, drop_path_rate=args.drop_path, **dict(args.model_kwargs))
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    if args.task == "seg":
        kwargs.setdefault("img_size", args.scene_size)
        backbone = timm.create_model(args.model, pretrained=args.pretrained, num_classes=0, **kwargs)
        return VRWKVSegmenter(backbone, num_classes=num_classes, channels=args.seg_channels)
    return timm.create_model(args.model, pretrained=args.pretrained, num_classes=num_classes, **kwargs)


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW; no weight decay on 1-D parameters and the model's `no_weight_decay()` names."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt="adamw", lr=args.lr, weight_decay=args.weight_decay)


def build_criterion(args: argparse.Namespace, num_classes: int) -> tuple[nn.Module, Any]:
    """(loss, mixup_fn or None). With Mixup/CutMix the targets are soft and carry the smoothing."""
    if args.task == "cls" and (args.mixup > 0 or args.cutmix > 0):
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            label_smoothing=args.smoothing,
            num_classes=num_classes,
        )
        return SoftTargetCrossEntropy(), mixup
    return nn.CrossEntropyLoss(label_smoothing=args.smoothing), None


# ---------------------------------------------------------------- steps
def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    clip_grad: float | None = None,
    amp: bool = False,
) -> float:
    """One optimisation step on a batch; returns the loss before the update.

    Args:
        model: the model (DDP-wrapped or not), in train mode.
        x: [B, C, H, W] inputs.
        y: [B] class targets, [B, K] soft targets, or [B, H, W] masks.
        criterion: the loss.
        optimizer: the optimizer.
        clip_grad: max gradient norm; None or 0 for no clipping.
        amp: bfloat16 autocast.
    """
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = criterion(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    return loss.item()


def _confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[K, K] counts, rows = true class, columns = predicted class (targets outside [0, K) ignored)."""
    keep = (target >= 0) & (target < num_classes)
    idx = target[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(conf: torch.Tensor, task: str) -> dict[str, float]:
    """top1 (cls) or mIoU and pixel accuracy (seg) from a confusion matrix (rows true, columns predicted)."""
    conf = conf.double()
    total = conf.sum().clamp_min(1)
    acc = (conf.diag().sum() / total).item()
    if task == "cls":
        return {"top1": 100.0 * acc}
    union = conf.sum(0) + conf.sum(1) - conf.diag()
    iou = conf.diag() / union.clamp_min(1)
    miou = iou[union > 0].mean().item() if (union > 0).any() else 0.0
    return {"miou": 100.0 * miou, "pixel_acc": 100.0 * acc}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    task: str = "cls",
    info: DistInfo | None = None,
    amp: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Loss, metrics and the confusion matrix over `loader` (summed over all ranks under DDP).

    Returns:
        {"loss": float, "top1": float} (cls) or {"loss", "miou", "pixel_acc"} (seg), and "confusion":
        a [K, K] int64 tensor (rows true, columns predicted).
    """
    info = info or DistInfo(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=info.device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=info.device)  # (sum of losses, count)
    for x, y in tqdm(loader, desc="eval", disable=not progress, leave=False, **_tqdm_kw()):
        x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss_sum[0] += F.cross_entropy(logits.float(), y, reduction="sum").item()
        loss_sum[1] += y.numel()
        conf += _confusion(logits.argmax(1).flatten(), y.flatten(), num_classes)
    _all_reduce(conf, info)
    _all_reduce(loss_sum, info)
    model.train(was_training)
    out = {"loss": (loss_sum[0] / loss_sum[1].clamp_min(1)).item(), **metrics_from_confusion(conf, task)}
    out["confusion"] = conf.cpu()
    return out


def _tqdm_kw() -> dict[str, Any]:
    # a log file gets a line now and then rather than a stream of carriage returns
    return {"mininterval": 0.5 if sys.stderr.isatty() else 60.0, "dynamic_ncols": True}


# ---------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain Python values (weights_only-loadable)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by `train` (weights_only=True: tensors and plain values only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _plain_args(args: argparse.Namespace) -> dict[str, Any]:
    out = dict(vars(args))
    out["model_kwargs"] = dict(args.model_kwargs)
    return out


# ---------------------------------------------------------------- metrics file
def _write_metrics(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _trim_metrics(path: Path, last_epoch: int) -> None:
    """Drop rows after `last_epoch` (written before a crash, but not covered by the checkpoint)."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    kept = [r for r in rows if int(r["epoch"]) <= last_epoch]
    if len(kept) != len(rows):
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(kept)


# ---------------------------------------------------------------- training
def train(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) a training run as described by `args` (see `build_parser`).

    Args:
        args: parsed arguments.
        argv: the command-line arguments, recorded in the checkpoints for provenance.

    Returns:
        On every rank: {"history": [per-epoch metric rows of this call], "best": {...}, "output": path,
        "model": the trained model (unwrapped from DDP), "ema": timm's ModelEmaV3 or None}.
    """
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

    torch.set_num_threads(args.threads)
    info = init_distributed(args.device)
    out_dir = Path(args.output)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(args.seed)

    train_set, eval_set, classes, in_chans = build_datasets(args)
    num_classes = len(classes)
    model = build_model(args, num_classes, in_chans).to(info.device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, args)
    criterion, mixup = build_criterion(args, num_classes)

    sampler = DistributedSampler(
        train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=args.seed, drop_last=True
    )
    drop_last = len(train_set) // info.world_size >= args.batch_size  # never an empty epoch on tiny data
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        drop_last=drop_last,
        pin_memory=info.device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    eval_loader = DataLoader(
        Subset(eval_set, range(info.rank, len(eval_set), info.world_size)),
        batch_size=args.batch_size * 2,
        shuffle=False,
        num_workers=args.workers,
    )
    steps_per_epoch = len(loader)
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    total_steps = max(args.epochs * steps_per_epoch, 1)
    warmup_steps = min(int(args.warmup_epochs * steps_per_epoch), total_steps - 1)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=total_steps,
        lr_min=args.min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=args.warmup_lr,
        t_in_epochs=False,
    )
    ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=True) if args.model_ema else None
    metric_key = "top1" if args.task == "cls" else "miou"

    start_epoch, num_updates = 0, 0
    best: dict[str, Any] = {"metric": -math.inf, "epoch": -1, "weights": None}
    resume = out_dir / "last.pt" if args.resume == "auto" else (Path(args.resume) if args.resume else None)
    if resume is not None:
        if not resume.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {resume}")
        ckpt = load_checkpoint(resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.module.load_state_dict(ckpt["ema"])
        start_epoch, num_updates = ckpt["epoch"] + 1, ckpt["num_updates"]
        best = ckpt.get("best", best)
        _set_rng_state(ckpt["rng"])
        if info.is_main:
            _trim_metrics(out_dir / "metrics.csv", ckpt["epoch"])
            logger.info("resumed from %s: epoch %d done, %d updates", resume, ckpt["epoch"], num_updates)
    scheduler.step_update(num_updates)

    ddp_model = model
    if info.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    if info.is_main:
        logger.info(
            "%s (%s): %.3fM parameters, %d classes, %d train / %d eval samples, %d steps/epoch x %d "
            "processes",
            args.model,
            args.task,
            n_params / 1e6,
            num_classes,
            len(train_set),
            len(eval_set),
            steps_per_epoch,
            info.world_size,
        )

    history: list[dict[str, Any]] = []
    progress = info.is_main and not args.no_progress
    end_epoch = args.epochs if args.stop_epoch is None else min(args.stop_epoch, args.epochs)
    for epoch in range(start_epoch, end_epoch):
        _seed_everything(args.seed + 1000 * (epoch + 1) + info.rank)
        sampler.set_epoch(epoch)
        ddp_model.train()
        t0, seen, n_steps, loss_sum = time.time(), 0, 0, 0.0
        bar = tqdm(
            total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not progress, **_tqdm_kw()
        )
        for x, y in loader:
            if n_steps >= steps_per_epoch:
                break
            x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
            if mixup is not None:
                x, y = mixup(x, y)
            loss = train_step(ddp_model, x, y, criterion, optimizer, args.clip_grad, args.amp)
            num_updates += 1
            scheduler.step_update(num_updates)
            if ema is not None:
                ema.update(model, step=num_updates)
            seen += x.shape[0]
            n_steps += 1
            loss_sum += loss
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
        bar.close()
        train_time = time.time() - t0
        train_loss = torch.tensor([loss_sum, max(n_steps, 1)], dtype=torch.float64)
        train_loss = _all_reduce(train_loss.to(info.device), info).cpu()

        ev = evaluate(model, eval_loader, num_classes, args.task, info, args.amp, progress)
        ev_ema = (
            evaluate(ema.module, eval_loader, num_classes, args.task, info, args.amp, progress)
            if ema
            else None
        )
        row = {
            "epoch": epoch,
            "step": num_updates,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": (train_loss[0] / train_loss[1]).item(),
            "eval_loss": ev["loss"],
            **{f"eval_{k}": ev[k] for k in ev if k not in ("loss", "confusion")},
        }
        if ev_ema is not None:
            row.update({f"ema_eval_{k}": ev_ema[k] for k in ev_ema if k not in ("loss", "confusion")})
        row["epoch_time_s"] = round(train_time, 2)
        row["train_samples_per_s"] = round(seen * info.world_size / max(train_time, 1e-9), 1)
        history.append(row)

        chosen, which = (ev_ema, "ema") if ev_ema is not None else (ev, "model")
        improved = chosen[metric_key] > best["metric"]
        if improved:
            best = {"metric": chosen[metric_key], "epoch": epoch, "weights": which}
        if info.is_main:
            state = {
                "version": CHECKPOINT_VERSION,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "ema": ema.module.state_dict() if ema is not None else None,
                "epoch": epoch,
                "num_updates": num_updates,
                "best": best,
                "eval": {k: v for k, v in chosen.items() if k != "confusion"},
                "eval_weights": which,
                "confusion": chosen["confusion"],
                "classes": list(classes),
                "args": _plain_args(args),
                "argv": list(argv) if argv is not None else None,
                "world_size": info.world_size,
                "rng": _rng_state(),
                "torch_version": str(torch.__version__),
            }
            save_checkpoint(out_dir / "last.pt", state)
            if improved:
                weights = state["ema"] if which == "ema" else state["model"]
                save_checkpoint(
                    out_dir / "best.pt",
                    {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "ema", "rng")}
                    | {"model": weights},
                )
            _write_metrics(out_dir / "metrics.csv", row)
            logger.info(
                "epoch %d: %s",
                epoch,
                ", ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in row.items()
                    if k != "epoch"
                ),
            )
    if info.distributed:
        dist.barrier()
    return {"history": history, "best": best, "output": str(out_dir), "model": model, "ema": ema}


# ---------------------------------------------------------------- export
PROVENANCE_TEMPLATE = """# {asset}: a Vision-RWKV Fashion-MNIST classifier

`timm.create_model("{model}", pretrained=True)` (after `import rwkv_mm.vision`) loads these weights offline.

- **Architecture**: `{model}` in `rwkv_mm/vision/vrwkv.py` (Vision-RWKV, arXiv 2403.02308; official code
  OpenGVLab/Vision-RWKV, Apache-2.0), Bi-WKV mode "paper"; arguments `{model_args}`;
  {params} parameters; input {input_size}, mean {mean}, std {std}.
- **Weights**: {weights} of epoch {epoch_1} of {epochs}, trained from scratch by rwkv_mm on {date_trained}
  ({world_size} CPU process(es), torch {torch_version}); released with rwkv_mm under Apache-2.0.
- **Data**: Fashion-MNIST (Han Xiao, Kashif Rasul, Roland Vollgraf, Zalando SE, 2017;
  https://github.com/zalandoresearch/fashion-mnist; 60000 training and 10000 test images), MIT licence
  (Expat, "Copyright 2017, Zalando SE"), read from Debian's `dataset-fashion-mnist` package
  (/usr/share/datasets/fashion-mnist, version {deb_version}); trained on {train_images} of the training
  images, evaluated on {test_images} test images.
- **Training command**:

      {command}

- **Test accuracy** ({test_images} test images, this file's weights): **{top1:.2f} %** (test loss {loss:.4f}).
  No validation split was held out; the weights exported are the {weights} weights after the last
  epoch of the fixed schedule{selection}.
- Exported {date} with `{export_command}`.
{note}
## Confusion matrix (rows: true class, columns: predicted)

{confusion}

## Per-class accuracy

{per_class}
"""


def _deb_version(package: str) -> str:
    status = Path("/var/lib/dpkg/status")
    if status.exists():
        block = None
        for line in status.read_text(errors="replace").splitlines():
            if line.startswith("Package: "):
                block = line.split(": ", 1)[1]
            elif block == package and line.startswith("Version: "):
                return line.split(": ", 1)[1]
    return "unknown"


def _without_resume(argv: list[str]) -> list[str]:
    """The training command without `--resume [PATH]` (a resumed run records the resuming command)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        if not a.startswith("--resume="):
            out.append(a)
    return out


def _markdown_confusion(conf: torch.Tensor, classes: list[str]) -> tuple[str, str]:
    short = [c.split("/")[0] for c in classes]
    lines = ["| true \\ pred | " + " | ".join(short) + " |", "|---" * (len(classes) + 1) + "|"]
    for i, c in enumerate(classes):
        lines.append(f"| {c} | " + " | ".join(str(int(v)) for v in conf[i]) + " |")
    per = ["| class | accuracy % |", "|---|---|"]
    for i, c in enumerate(classes):
        per.append(f"| {c} | {100.0 * conf[i, i].item() / max(conf[i].sum().item(), 1):.1f} |")
    return "\n".join(lines), "\n".join(per)


def export(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    weights: str = "auto",
    data_dir: str | None = None,
    batch_size: int = 500,
    export_command: str = "",
    note: str = "",
) -> dict[str, Any]:
    """Write a trained classifier as a bundled asset: model.safetensors, config.json, PROVENANCE.md.

    The weights are evaluated on the full Fashion-MNIST test set (accuracy and confusion matrix go into
    config.json and PROVENANCE.md).

    Args:
        checkpoint: a `last.pt` / `best.pt` written by `train` (Fashion-MNIST classification).
        output: the asset folder (created).
        weights: "ema", "model", or "auto" (EMA when the checkpoint has it).
        data_dir: Fashion-MNIST folder; Debian's by default.
        batch_size: evaluation batch size.
        export_command: the command line recorded in PROVENANCE.md.
        note: extra text for PROVENANCE.md (e.g. how an interrupted run was continued).

    Returns:
        The config written to config.json.
    """
    import timm
    from safetensors.torch import save_file

    from . import vrwkv  # noqa: F401
    from .data import FashionMNIST

    ckpt = load_checkpoint(checkpoint)
    args = ckpt["args"]
    if args["task"] != "cls" or args["data"] != "fashion-mnist":
        raise ValueError(
            f"export writes Fashion-MNIST classifiers; this checkpoint is {args['task']} on {args['data']}"
        )
    if weights == "auto":
        weights = "ema" if ckpt.get("ema") is not None else "model"
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema', 'model' or 'auto', got {weights!r}")
    state = ckpt["ema"] if weights == "ema" else ckpt["model"]
    if state is None:
        raise ValueError(f"{checkpoint} holds no {weights} weights")
    classes = list(ckpt["classes"])
    model_kwargs = dict(args["model_kwargs"])
    if args.get("img_size") is not None:
        model_kwargs["img_size"] = args["img_size"]
    model = timm.create_model(args["model"], num_classes=len(classes), in_chans=1, **model_kwargs)
    model.load_state_dict(state)
    cfg = model.pretrained_cfg

    ev = evaluate(
        model, DataLoader(FashionMNIST("test", data_dir), batch_size=batch_size), len(classes), progress=True
    )
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(
        tensors, str(out / "model.safetensors"), metadata={"format": "pt", "architecture": args["model"]}
    )

    n_params = sum(p.numel() for p in model.parameters())
    config = {
        "architecture": args["model"],
        "model_args": model_kwargs,
        "num_classes": len(classes),
        "label_names": classes,
        "input_size": list(cfg.get("input_size", (1, 28, 28))),
        "mean": list(cfg.get("mean")),
        "std": list(cfg.get("std")),
        "interpolation": cfg.get("interpolation"),
        "crop_pct": cfg.get("crop_pct"),
        "bi_wkv_mode": "paper",
        "num_parameters": n_params,
        "weights": weights,
        "epoch": int(ckpt["epoch"]) + 1,
        "epochs": int(args["epochs"]),
        "test_top1": round(ev["top1"], 2),
        "test_loss": round(ev["loss"], 4),
        "confusion_matrix": ev["confusion"].tolist(),
        "dataset": "Fashion-MNIST (MIT, Zalando SE), Debian package dataset-fashion-mnist",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    argv = _without_resume(ckpt.get("argv") or [])
    command = shlex.join(["python", "-m", "rwkv_mm.vision.train", *argv]) if argv else "(not recorded)"
    confusion, per_class = _markdown_confusion(ev["confusion"], classes)
    mtime = datetime.datetime.fromtimestamp(os.path.getmtime(checkpoint), datetime.timezone.utc)
    last_epoch = int(ckpt["epoch"]) + 1 == int(args["epochs"])
    (out / "PROVENANCE.md").write_text(
        PROVENANCE_TEMPLATE.format(
            asset=out.name,
            model=args["model"],
            model_args=json.dumps(model_kwargs) if model_kwargs else "registry defaults",
            params=f"{n_params:,}",
            input_size=tuple(config["input_size"]),
            mean=tuple(round(m, 4) for m in config["mean"]),
            std=tuple(round(s, 4) for s in config["std"]),
            weights="EMA" if weights == "ema" else "raw",
            epoch_1=config["epoch"],
            epochs=config["epochs"],
            date_trained=mtime.strftime("%Y-%m-%d"),
            world_size=ckpt.get("world_size", 1),
            torch_version=ckpt.get("torch_version", "?"),
            deb_version=_deb_version("dataset-fashion-mnist"),
            train_images=args.get("train_limit") or "all",
            test_images=int(ev["confusion"].sum()),
            command=command,
            top1=ev["top1"],
            loss=ev["loss"],
            selection="" if last_epoch else " (NOTE: the run had not finished its schedule)",
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            export_command=export_command or "rwkv_mm.vision.train.export(...)",
            note=f"- {note}\n" if note else "",
            confusion=confusion,
            per_class=per_class,
        )
    )
    logger.info("exported %s (%s weights, test top-1 %.2f %%) to %s", checkpoint, weights, ev["top1"], out)
    return config


def build_export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rwkv_mm.vision.train export",
        description="Write a trained Fashion-MNIST classifier as a bundled asset.",
    )
    p.add_argument("--checkpoint", required=True, help="last.pt or best.pt of a training run")
    p.add_argument("--output", required=True, help="asset folder, e.g. rwkv_mm/assets/vrwkv-fmnist")
    p.add_argument("--weights", choices=("auto", "ema", "model"), default="auto")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: Debian's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", default="", help="extra line for PROVENANCE.md")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: `python -m rwkv_mm.vision.train [export] ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if argv[:1] == ["export"]:
        args = build_export_parser().parse_args(argv[1:])
        torch.set_num_threads(args.threads)
        export(
            args.checkpoint,
            args.output,
            args.weights,
            args.data_dir,
            export_command=shlex.join(["python", "-m", "rwkv_mm.vision.train", *argv]),
            note=args.note,
        )
        return 0
    args = build_parser().parse_args(argv)
    try:
        train(args, argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
