"""Sentence embeddings from RWKV-7 blocks: a recurrent encoder whose final state is read out into a vector.

Sources: "RWKV-7 Goose" (arXiv 2503.14456) for the blocks (imported from `rwkv_mm.lm.model`, the only copy
of the time mix and channel mix); EmbeddingRWKV (arXiv 2601.07861, howard-hou/EmbeddingRWKV) for the
end-of-text pooling and the residual MLP head; sentence-transformers for the `encode` conventions.

A text (plus a prompt, if any) is tokenized, one end-of-text token is appended, and the tokens run through
the blocks in chunks of `chunk_len` with the recurrent state carried from chunk to chunk: any length,
no truncation, memory independent of the length. Three read-outs ("poolings") of the same pass:

| pooling | reads                                                      | head                            |
|---------|------------------------------------------------------------|---------------------------------|
| "state" | final WKV states S [B, H, N, N] of the last `state_layers` | learned queries q (key space):  |
|         | layers (value index first)                                 | per-head norm(S q), then an MLP |
| "mean"  | mean over all positions of the final hidden state (ln_out) | residual MLP + projection       |
| "eos"   | final hidden state (ln_out) at the end-of-text token       | residual MLP + projection       |

Batches of texts of different lengths are run without padding: the batch is sorted by length and run one
segment at a time, each segment ending where the next-shortest text ends; the texts that end there are
read out and dropped, the others carry on with their state. So every text's result is exactly what it
would be alone.

`Embedder.from_lm(path)` runs the blocks of any language-model checkpoint `RWKVLM.from_file` reads, with
untrained read-outs (zero-shot): "eos" (default) and "mean" give the ln_out hidden state, "state" the
per-head-normalised mean over keys of the last layer's WKV state. Untrained read-outs are much weaker than
the trained default (specs/embed.md §0).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.state import RWKVState
from ..lm.checkpoint import RWKVConfig, load_checkpoint
from ..lm.model import Block
from ..lm.tokenizer import Tokenizer, load_tokenizer, tokenizer_for_vocab_size

__all__ = ["Embedder", "EmbedderConfig", "RWKVEncoder"]

logger = logging.getLogger(__name__)

POOLINGS = ("state", "mean", "eos")
CONFIG_FORMAT = "rwkv_mm.embed/1"
DEFAULT_ASSET = "embedder"
BUILTIN_TOKENIZERS = ("world", "20b", "bytes")


@dataclass
class EmbedderConfig:
    """Shape of an embedder: the RWKV-7 encoder, the read-out heads, the tokenizer.

    Args:
        n_layer: blocks L.
        n_embd: width C.
        head_size: N, channels per head (H = C / N heads).
        dim_ffn: channel-mix width F.
        d_decay: LoRA rank of the decay.
        d_aaa: LoRA rank of the in-context learning rate.
        d_mv: LoRA rank of the value residual.
        d_gate: LoRA rank of the output gate.
        vocab_size: V, rows of the embedding table.
        dim: output dimension D of the trained heads (0: untrained read-outs, D = C).
        pooling: the read-out `encode` uses: "state", "mean" or "eos".
        heads: the read-outs that have a trained head (empty: untrained read-outs only).
        state_layers: "state" reads the WKV states of this many last layers.
        state_queries: "state" learned queries per head and layer.
        head_hidden: hidden width of the heads' MLPs.
        tokenizer: a file name inside the model folder, or a tokenizer name ("world", "20b", "bytes").
        eos_id: the end-of-text id appended to every text.
        chunk_len: tokens per recurrent step of a long text (memory bound, not a length limit).
        version: RWKV version of the blocks ("v7" for trained embedders; any for `from_lm`).
        lm: from_lm only: every RWKVConfig field of the source checkpoint.
    """

    n_layer: int = 4
    n_embd: int = 256
    head_size: int = 64
    dim_ffn: int = 1024
    d_decay: int = 32
    d_aaa: int = 32
    d_mv: int = 16
    d_gate: int = 64
    vocab_size: int = 16384
    dim: int = 384
    pooling: str = "state"
    heads: tuple[str, ...] = POOLINGS
    state_layers: int = 2
    state_queries: int = 4
    head_hidden: int = 512
    tokenizer: str = "tokenizer.json"
    eos_id: int = 0
    chunk_len: int = 512
    version: str = "v7"
    lm: dict = field(default_factory=dict)

    def __post_init__(self):
        self.heads = tuple(self.heads)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        bad = [h for h in self.heads if h not in POOLINGS]
        if bad:
            raise ValueError(f"heads must be among {POOLINGS}, got {bad}")
        if self.chunk_len < 1:
            raise ValueError(f"chunk_len must be >= 1, got {self.chunk_len}")

    def lm_config(self) -> RWKVConfig:
        """The RWKVConfig of the blocks."""
        if self.lm:
            return RWKVConfig(**{**self.lm, "tokenizer": None})
        return RWKVConfig(
            version="v7",
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            vocab_size=self.vocab_size,
            dim_ffn=self.dim_ffn,
            head_size=self.head_size,
            d_decay=self.d_decay,
            d_aaa=self.d_aaa,
            d_mv=self.d_mv if self.n_layer > 1 else 0,
            d_gate=self.d_gate,
        )

    @property
    def out_dim(self) -> int:
        """D, the dimension `encode` returns for `pooling`."""
        return self.dim if self.pooling in self.heads else self.n_embd

    def to_json(self) -> dict:
        """The config.json contents (architecture and format first)."""
        d = asdict(self)
        d["heads"] = list(self.heads)
        return {"architecture": "rwkv_mm.embed.Embedder", "format": CONFIG_FORMAT, **d}

    @classmethod
    def from_json(cls, d: dict) -> EmbedderConfig:
        """Inverse of `to_json` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------------------------
# heads


class MLPHead(nn.Module):
    """`proj(x + fc2(gelu(fc1(x))))`: EmbeddingRWKV's residual head (fc2 zero-initialised, so it starts as
    the projection alone), then a linear map to D. x: [B, C] -> [B, D]."""

    def __init__(self, dim_in: int, dim_out: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.fc2 = nn.Linear(hidden, dim_in)
        self.proj = nn.Linear(dim_in, dim_out)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x + self.fc2(F.gelu(self.fc1(x))))


class StateReadout(nn.Module):
    """Learned read-out of final WKV states.

    Each of the last `layers` layers' state S [B, H, N, N] (value i, key j) is queried by `queries`
    learned key-space vectors per head, y = S q [B, H, Q, N] (what a token with receptance q would read);
    each y is layer-normalised over N with a learned gain, the L * H * Q * N features are flattened and
    mapped to D by `lin(f) + fc2(gelu(fc1(f)))`.
    """

    def __init__(self, layers: int, heads: int, head_size: int, queries: int, dim_out: int, hidden: int):
        super().__init__()
        self.layers = layers
        self.query = nn.Parameter(torch.randn(layers, heads, queries, head_size) / math.sqrt(head_size))
        self.gain = nn.Parameter(torch.ones(layers, heads, queries, head_size))
        n = layers * heads * queries * head_size
        self.lin = nn.Linear(n, dim_out)
        self.fc1 = nn.Linear(n, hidden)
        self.fc2 = nn.Linear(hidden, dim_out)

    def forward(self, wkv: Tensor) -> Tensor:
        """wkv: [L', B, H, N, N] the last L' layers' states (L' = `layers`). Returns [B, D]."""
        y = torch.einsum("lbhij,lhqj->blhqi", wkv, self.query)  # (B, L', H, Q, N)
        y = F.layer_norm(y, y.shape[-1:]) * self.gain
        f = y.flatten(1)
        return self.lin(f) + self.fc2(F.gelu(self.fc1(f)))


def untrained_state_readout(wkv: Tensor) -> Tensor:
    """Zero-shot "state" read-out: the last layer's S [B, H, N, N] averaged over the key index,
    layer-normalised per head, flattened: [B, H * N]."""
    y = wkv[-1].mean(dim=-1)  # (B, H, N)
    return F.layer_norm(y, y.shape[-1:]).flatten(1)


# ----------------------------------------------------------------------------------------------------------
# encoder


class RWKVEncoder(nn.Module):
    """RWKV blocks (from `rwkv_mm.lm.model`) + ln_out + read-out heads; no LM head.

    Parameter names follow the LM checkpoints (`emb.weight`, `blocks.{i}.*`, `ln_out.*`), so `from_lm` is a
    key copy; the heads live under `heads.{pooling}.*`.
    """

    def __init__(self, config: EmbedderConfig):
        super().__init__()
        self.config = config
        lm = config.lm_config()
        self.lm = lm
        self.emb = nn.Embedding(lm.vocab_size, lm.n_embd)
        self.blocks = nn.ModuleList(Block(lm, i) for i in range(lm.n_layer))
        self.ln_out = nn.LayerNorm(lm.n_embd)
        heads: dict[str, nn.Module] = {}
        for name in config.heads:
            if name == "state":
                if lm.version == "v4":
                    raise ValueError("RWKV-4 has no matrix state: no 'state' head")
                heads[name] = StateReadout(
                    min(config.state_layers, lm.n_layer),
                    lm.n_head,
                    lm.head_size,
                    config.state_queries,
                    config.dim,
                    config.head_hidden,
                )
            else:
                heads[name] = MLPHead(lm.n_embd, config.dim, config.head_hidden)
        self.heads = nn.ModuleDict(heads)

    def _run(self, tokens: Tensor, state: RWKVState) -> tuple[Tensor, RWKVState]:
        """tokens [B, T] from `state` -> (hidden before ln_out [B, T, C], new state)."""
        x = self.blocks[0].ln0(self.emb(tokens))
        v_first = None
        layers = []
        for block, layer_state in zip(self.blocks, state.layers):
            x, new, v_first = block(x, layer_state, v_first)
            layers.append(new)
        return x, RWKVState(self.lm.version, layers)

    def _readout(self, name: str, feats: Tensor) -> Tensor:
        if name == "state" and name not in self.heads:
            return untrained_state_readout(feats)
        return self.heads[name](feats) if name in self.heads else feats

    def pool(
        self, seqs: Sequence[Tensor], poolings: Sequence[str], chunk_len: int | None = None
    ) -> dict[str, Tensor]:
        """Embed token sequences with each read-out in `poolings`.

        Args:
            seqs: B 1-D LongTensors (end-of-text included), any lengths >= 1, any order.
            poolings: names among "state", "mean", "eos".
            chunk_len: tokens per step (default config.chunk_len); the results do not depend on it.

        Returns:
            {pooling: [B, D] float32} in the order of `seqs` (differentiable).
        """
        chunk_len = chunk_len or self.config.chunk_len
        device = self.emb.weight.device
        B = len(seqs)
        lengths = torch.tensor([len(s) for s in seqs])
        if B == 0 or int(lengths.min()) < 1:
            raise ValueError("pool needs at least one sequence, each of at least one token")
        order = torch.argsort(lengths, descending=True, stable=True)
        lens = lengths[order].tolist()
        T = lens[0]
        tokens = torch.zeros(B, T, dtype=torch.long)
        for row, i in enumerate(order.tolist()):
            tokens[row, : lens[row]] = seqs[i].to(torch.long).cpu()
        tokens = tokens.to(device)
        lm = self.lm
        state = RWKVState.zeros(
            lm.version, lm.n_layer, B, lm.n_embd, lm.head_size or 64, device, self.emb.weight.dtype
        )
        need_mean = "mean" in poolings
        k = min(self.config.state_layers, lm.n_layer) if "state" in self.heads else 1
        acc = torch.zeros(B, lm.n_embd, device=device) if need_mean else None
        done: dict[str, list[Tensor]] = {p: [] for p in poolings}
        t, active = 0, B
        while active > 0:
            end = min(t + chunk_len, lens[active - 1])
            x, state = self._run(tokens[:active, t:end], state)
            if need_mean:
                acc = acc + self.ln_out(x).float().sum(dim=1)
            t = end
            still = active
            while still > 0 and lens[still - 1] == t:
                still -= 1
            if still < active:  # rows still..active-1 end here: read them out
                fin = slice(still, active)
                for p in poolings:
                    if p == "mean":
                        feats = acc[fin] / torch.tensor(lens[fin], device=device, dtype=acc.dtype)[:, None]
                    elif p == "eos":
                        feats = self.ln_out(x[fin, -1]).float()
                    else:
                        feats = torch.stack([layer["wkv"][fin] for layer in state.layers[-k:]]).float()
                    done[p].append(self._readout(p, feats))
                state = RWKVState(
                    lm.version, [{n: v[:still] for n, v in layer.items()} for layer in state.layers]
                )
                if need_mean:
                    acc = acc[:still]
                active = still
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(B)
        inverse = inverse.to(device)
        # finished groups came out shortest first: reverse to the sorted (longest-first) order, then unsort
        return {p: torch.cat(done[p][::-1])[inverse] for p in poolings}


# ----------------------------------------------------------------------------------------------------------
# the public class


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Embedder:
    """Sentence embedder with the sentence-transformers `encode` API.

    Attributes:
        dim: D, the embedding dimension.
        model_id: identifies the weights: "<folder name>@<sha256 of model.safetensors>[:12]".
        pooling: the read-out in use ("state", "mean" or "eos").
        config: the EmbedderConfig.
        model: the RWKVEncoder (eval mode).
        tokenizer: a `rwkv_mm.lm.tokenizer.Tokenizer`.
        chunk_chars: the chunk size (characters) a new `Index` uses with this embedder: trained on
            sentences, it retrieves best from short chunks (benchmarks/eval_search.py, Python docs section
            retrieval, MRR@10: 0.47 at 200 characters, 0.45 at 400, 0.40 at 1000).

    Example:
        >>> emb = Embedder.load()                                   # the bundled default
        >>> vecs = emb.encode(["a cat", "a kitten"], normalize_embeddings=True)   # float32 [2, D]
        >>> emb.similarity(vecs, vecs)                              # [2, 2] cosine
    """

    chunk_chars = 200

    def __init__(
        self,
        model: RWKVEncoder,
        tokenizer: Tokenizer,
        model_id: str = "untrained",
        pooling: str | None = None,
        device: str | torch.device = "cpu",
    ):
        self.model = model.to(device).eval()
        self.config = model.config
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.pooling = pooling or self.config.pooling
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.pooling == "state" and self.model.lm.version == "v4":
            raise ValueError("RWKV-4 has no matrix state: use pooling 'eos' or 'mean'")
        self.device = torch.device(device)

    @property
    def dim(self) -> int:
        """D: the trained head's output size, or the width C for an untrained read-out."""
        return self.config.dim if self.pooling in self.config.heads else self.model.lm.n_embd

    def __repr__(self) -> str:
        return f"Embedder(model_id={self.model_id!r}, pooling={self.pooling!r}, dim={self.dim})"

    # ------------------------------------------------------------------------------------------------------
    # loading and saving

    @classmethod
    def load(
        cls, dir: str | os.PathLike | None = None, pooling: str | None = None, device: str = "cpu"
    ) -> Embedder:
        """Load an embedder folder (model.safetensors + config.json [+ tokenizer file]).

        Args:
            dir: the folder; None loads the bundled default (`rwkv_mm/assets/embedder/`).
            pooling: override the folder's default read-out.
            device: where the weights go.
        """
        from safetensors.torch import load_file

        if dir is None:
            from .. import assets

            folder = assets.path(DEFAULT_ASSET)
        else:
            folder = Path(dir)
        cfg_file, weights = folder / "config.json", folder / "model.safetensors"
        if not cfg_file.is_file() or not weights.is_file():
            raise FileNotFoundError(
                f"{folder} is not an embedder folder: needs config.json and model.safetensors"
            )
        raw = json.loads(cfg_file.read_text())
        if raw.get("format") != CONFIG_FORMAT:
            raise ValueError(f"{cfg_file}: format {raw.get('format')!r}, expected {CONFIG_FORMAT!r}")
        config = EmbedderConfig.from_json(raw)
        model = RWKVEncoder(config)
        tensors = {k: v.float() for k, v in load_file(str(weights)).items()}
        model.load_state_dict(tensors, strict=True)
        model_id = f"{folder.resolve().name}@{_file_sha256(weights)[:12]}"
        return cls(model, _tokenizer(config.tokenizer, folder, config.vocab_size), model_id, pooling, device)

    def save(self, dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
        """Write model.safetensors (weights in `dtype`), config.json and the tokenizer file into `dir`.

        Returns:
            The folder. `Embedder.load(dir)` gives the same embeddings (to `dtype` rounding).
        """
        from safetensors.torch import save_file

        folder = Path(dir)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.model.state_dict().items()}
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": CONFIG_FORMAT})
        os.chmod(
            folder / "model.safetensors", 0o644
        )  # safetensors writes 0600; the file ships as package data
        config = EmbedderConfig.from_json({**self.config.to_json(), "pooling": self.pooling})
        tok_path = getattr(self.tokenizer, "path", None)
        if tok_path is not None and config.tokenizer not in BUILTIN_TOKENIZERS and Path(tok_path).is_file():
            target = folder / Path(config.tokenizer).name
            if Path(tok_path).resolve() != target.resolve():
                target.write_bytes(Path(tok_path).read_bytes())
            config.tokenizer = target.name
        (folder / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")
        self.model_id = f"{folder.resolve().name}@{_file_sha256(folder / 'model.safetensors')[:12]}"
        logger.info("saved %s to %s", self.model_id, folder)
        return folder

    @classmethod
    def from_lm(
        cls, path: str | os.PathLike, pooling: str = "eos", chunk_len: int = 512, device: str = "cpu"
    ) -> Embedder:
        """Embed with the blocks of any LM checkpoint `RWKVLM.from_file` reads (.pth, .safetensors, folder).

        Zero-shot: the read-outs are untrained ("eos"/"mean": the ln_out hidden state, D = C; "state": the
        last layer's WKV state averaged over keys), so the vectors are much weaker than a trained
        embedder's. The end-of-text id is the tokenizer's (0 for World / 20B / bytes).
        """
        ckpt = load_checkpoint(path)
        lmc = ckpt.config
        tok = load_tokenizer(lmc.tokenizer) if lmc.tokenizer else tokenizer_for_vocab_size(lmc.vocab_size)
        lm_fields = {k: v for k, v in asdict(lmc).items() if k != "tokenizer"}
        config = EmbedderConfig(
            n_layer=lmc.n_layer,
            n_embd=lmc.n_embd,
            head_size=lmc.head_size,
            dim_ffn=lmc.dim_ffn,
            vocab_size=lmc.vocab_size,
            dim=lmc.n_embd,
            pooling=pooling,
            heads=(),
            tokenizer=tok.name,
            eos_id=tok.eos_id,
            chunk_len=chunk_len,
            version=lmc.version,
            lm=lm_fields,
        )
        model = RWKVEncoder(config)
        own = model.state_dict()
        tensors = {k: ckpt.tensors[k].reshape(own[k].shape).float() for k in own}
        model.load_state_dict(tensors, strict=True)
        sha = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]
        return cls(model, tok, f"{Path(path).name}@zero-shot-{sha}", pooling, device)

    # ------------------------------------------------------------------------------------------------------
    # encoding

    def tokenize(self, texts: Sequence[str]) -> list[Tensor]:
        """Token ids of each text with the end-of-text id appended: B 1-D LongTensors."""
        hf = getattr(self.tokenizer, "hf", None)
        if hf is not None:
            ids = [e.ids for e in hf.encode_batch(list(texts), add_special_tokens=False)]
        else:
            ids = [self.tokenizer.encode(t) for t in texts]
        eos = self.config.eos_id
        return [torch.tensor([*i, eos], dtype=torch.long) for i in ids]

    @torch.inference_mode()
    def encode(
        self,
        sentences: str | Sequence[str],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        normalize_embeddings: bool = False,
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        prompt: str | None = None,
    ) -> np.ndarray | Tensor | list[Tensor]:
        """Embed sentences or documents of any length (sentence-transformers semantics).

        Args:
            sentences: one text (returns 1-D [D]) or a list of texts (returns 2-D [n, D]).
            batch_size: texts per forward pass (texts are sorted by length first, as sentence-transformers
                does; results come back in input order).
            show_progress_bar: a tqdm bar over batches; None shows it when logging is at INFO or DEBUG.
            normalize_embeddings: L2-normalise (then the dot product is the cosine).
            convert_to_numpy: float32 numpy (default).
            convert_to_tensor: one float32 torch tensor (takes precedence over convert_to_numpy).
            prompt: text prepended to every input (e.g. "Instruct: ...\\nQuery: " for queries).

        Returns:
            float32 [n, D] (or [D] for a single string); a list of 1-D tensors if both conversions are off.
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prompt:
            texts = [prompt + t for t in texts]
        if show_progress_bar is None:
            show_progress_bar = logger.getEffectiveLevel() in (logging.INFO, logging.DEBUG)
        out = torch.empty(len(texts), self.dim)
        if texts:
            seqs = self.tokenize(texts)
            order = sorted(range(len(texts)), key=lambda i: -len(seqs[i]))
            starts = range(0, len(texts), batch_size)
            if show_progress_bar:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc="Batches")
            for s in starts:
                idx = order[s : s + batch_size]
                vecs = self.model.pool([seqs[i] for i in idx], [self.pooling])[self.pooling]
                out[idx] = vecs.float().cpu()
        if normalize_embeddings:
            out = F.normalize(out, dim=-1)
        if single:
            out = out[0]
        if convert_to_tensor:
            return out
        if convert_to_numpy:
            return out.numpy()
        return list(out) if not single else out

    @staticmethod
    def similarity(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> Tensor:
        """Cosine similarity of every row of `a` [n, D] (or [D]) with every row of `b` [m, D]: [n, m]."""
        a = torch.as_tensor(a, dtype=torch.float32)
        b = torch.as_tensor(b, dtype=torch.float32)
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def _tokenizer(name: str, folder: Path, vocab_size: int) -> Tokenizer:
    """The tokenizer a config names: a file in the model folder, else a built-in name."""
    candidate = folder / name
    if candidate.is_file():
        return load_tokenizer(candidate)
    if name in BUILTIN_TOKENIZERS:
        return load_tokenizer(name)
    return tokenizer_for_vocab_size(vocab_size)
