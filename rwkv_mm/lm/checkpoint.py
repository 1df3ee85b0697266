"""Official RWKV language-model checkpoints: reading, version detection, config inference, conversion.

Sources: BlinkDL/RWKV-LM (the training code that names the keys), BlinkDL/ChatRWKV and the `rwkv` pip
package 0.8.32 (`rwkv/model.py`, whose loader is the reference for detection and state files).

Files: ``.pth`` (a plain ``torch.save`` of a flat state dict; official releases are bf16), read with
``weights_only=True`` (a pickle that needs code to load is refused, never executed) and memory-mapped,
so tensors keep their stored dtype and nothing is copied until used; ``.safetensors``; or a folder
holding ``model.safetensors`` and ``config.json`` (whose ``"tokenizer"`` field names the tokenizer).

Versions, told apart by their keys (independently of the key order, unlike the package's loader):

| telltale                                   | version | name                                      |
|--------------------------------------------|---------|-------------------------------------------|
| ``blocks.0.att.r_k``                       | v7      | x070 "Goose"                              |
| a key containing ``time_maa``              | v6      | x060 "Finch"                              |
| ``att.ln_x`` (no ``time_maa``)             | v5      | 5.0; 5.1 with ``att.gate``; 5.2 (x052,    |
|                                            |         | "Eagle") with ``att.time_decay`` [H, N]   |
| ``att.time_first`` and no ``ln_x``         | v4      | RWKV-4                                    |

Every dimension is read from tensor shapes (head size from ``r_k`` / ``time_faaaa`` / ``time_decay``,
LoRA sizes from ``w1`` / ``a1`` / ``v1`` / ``g1`` / ``time_maa_w1`` / ``time_decay_w1``, FFN width from
``ffn.key``), then every key is checked against the shapes the config implies. Size-1 dimensions are
not significant (``[1, 1, C]`` and ``[C]`` are the same tensor to the package, which squeezes them).

State-tuned files (``blocks.{i}.att.time_state``, one [H, N, N] tensor per layer, either inside a
model file or alone in a state file) are returned as an initial `RWKVState` in the canonical layout
S[h, value, key]. File layouts, from the loaders that read them:
- v5 / v6: the package loads ``time_state.transpose(1, 2)`` into its CPU state, which is
  [H, key, value] (``s = k @ v + w * s``), so the file is [H, value, key]: canonical, kept as is.
- v7: the package's ``RWKV_x070`` ignores time_state; ChatRWKV's RWKV-7 demos load
  ``time_state.transpose(1, 2)`` into the v7 state, which is [H, value, key], so the file is
  [H, key, value] (RWKV-PEFT trains it as flash-linear-attention's ``initial_state``, [K, V]): transposed
  here on read.

CLI::

    python -m rwkv_mm.lm.checkpoint info model.pth
    python -m rwkv_mm.lm.checkpoint convert model.pth model.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
import sys
import zipfile
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path

import torch
from torch import Tensor

from ..core.state import RWKVState

__all__ = [
    "Checkpoint",
    "RWKVConfig",
    "convert",
    "expected_shapes",
    "load_checkpoint",
    "load_state_file",
    "read_tensors",
    "synthetic_state_dict",
]

logger = logging.getLogger(__name__)

VERSIONS = ("v4", "v5", "v6", "v7")
V5_VARIANTS = ("5.0", "5.1", "5.2")
# keys of released files that no model reads: RWKV-7 layer 0 keeps a value-residual gate it never uses
IGNORED_KEYS = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
TIME_STATE = "att.time_state"


@dataclass
class RWKVConfig:
    """Shape and flavour of an RWKV LM, as read off a checkpoint.

    Args:
        version: "v4", "v5", "v6" or "v7" (the state layout of `RWKVState` follows it).
        n_layer: number of blocks L.
        n_embd: model width C.
        vocab_size: V, rows of emb.weight and head.weight (65536 World, 50277/50304 Pile, 256 bytes).
        dim_ffn: F, rows of ffn.key.weight (v7/v4: 4C; v5/v6: int(3.5C) rounded down to a multiple of 32).
        head_size: N, channels per head (v5-v7); 0 for v4.
        variant: v5 only: "5.0" (per-head decay, no gate), "5.1" (+ gate), "5.2" (decay per channel).
        bonus_key: v5 only: "time_faaaa" (the bonus as stored) or "time_first" (5.0/5.1 files, used as exp).
        d_decay: v7 w1 / v6 time_decay_w1 columns.
        d_aaa: v7 a1 columns (in-context learning rate).
        d_mv: v7 v1 columns (value residual); 0 for a one-layer model.
        d_gate: v7 g1 columns (output gate).
        d_mix: v6 columns of each of the five time_maa_w1 parts (time_maa_w2 is [5, d_mix, C]).
        tokenizer: tokenizer name from an asset folder's config.json, else None (chosen by vocab size).
    """

    version: str
    n_layer: int
    n_embd: int
    vocab_size: int
    dim_ffn: int
    head_size: int = 64
    variant: str = ""
    bonus_key: str = "time_faaaa"
    d_decay: int = 0
    d_aaa: int = 0
    d_mv: int = 0
    d_gate: int = 0
    d_mix: int = 0
    tokenizer: str | None = None

    def __post_init__(self):
        if self.version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {self.version!r}")
        if self.version == "v5" and self.variant not in V5_VARIANTS:
            raise ValueError(f"a v5 config needs variant in {V5_VARIANTS}, got {self.variant!r}")
        if self.version != "v4" and (self.head_size <= 0 or self.n_embd % self.head_size):
            raise ValueError(
                f"n_embd must be a multiple of head_size, got {self.n_embd} and {self.head_size}"
            )

    @property
    def n_head(self) -> int:
        """H = C / N (0 for v4)."""
        return self.n_embd // self.head_size if self.version != "v4" else 0

    @property
    def name(self) -> str:
        """The upstream name: x070, x060, x052 (x051, x050) or v4."""
        if self.version == "v5":
            return "x05" + self.variant[-1]
        return {"v4": "v4", "v6": "x060", "v7": "x070"}[self.version]


@dataclass
class Checkpoint:
    """A validated checkpoint.

    Args:
        path: the file read.
        config: what its shapes say.
        tensors: every tensor the model needs, under the official keys, as stored (dtype and shape kept).
        state: the initial state of a state-tuned file (batch 1, float32), else None.
    """

    path: str
    config: RWKVConfig
    tensors: dict[str, Tensor]
    state: RWKVState | None = None


# ----------------------------------------------------------------------------------------------------------
# reading


def read_tensors(path: str | PathLike) -> dict[str, Tensor]:
    """The flat dict of tensors stored in a .pth or .safetensors file, as stored (memory-mapped .pth).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a truncated or corrupt file, a pickle that needs code to load (refused, not run), or
            contents that are not a flat dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(
                f"{path}: not a readable safetensors file (truncated or corrupt?): {e}"
            ) from None
    # mmap needs the zip format of torch >= 1.6; older (legacy) files are read into memory
    mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            detail = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "")
            raise ValueError(
                f"{path}: refused: its pickle needs code to run to load (not a plain dict of tensors); "
                f"it was not executed. {detail}".strip()
            ) from None
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from None
    except Exception as e:  # zip / EOF / storage errors of a damaged file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {msg}"
        ) from None
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: expected a flat dict of tensors (a state dict), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(
            f"{path}: expected a flat dict of tensors (a state dict); entries {bad[:5]} are not tensors"
            + (
                " (a file converted by the rwkv package's convert_model: use the original)"
                if "_strategy" in obj
                else ""
            )
        )
    return obj


def _squeezed(shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _get(tensors: dict[str, Tensor], key: str, path: str, what: str) -> Tensor:
    if key not in tensors:
        raise ValueError(f"{path}: missing key {key!r} ({what})")
    return tensors[key]


def _dim(tensors: dict[str, Tensor], key: str, axis: int, path: str, rank: int = 2) -> int:
    """Size `axis` of tensors[key] read as a `rank`-D tensor (extra size-1 dims dropped, missing ones
    put in front)."""
    t = _get(tensors, key, path, f"a {rank}-D tensor")
    shape = tuple(t.shape)
    if len(shape) != rank:
        shape = _squeezed(shape)
        shape = (1,) * (rank - len(shape)) + shape
    if len(shape) != rank:
        raise ValueError(f"{path}: key {key!r} has shape {_shape_str(t.shape)}, expected a {rank}-D tensor")
    return shape[axis]


def detect_version(tensors: dict[str, Tensor], path: str = "<checkpoint>") -> tuple[str, str]:
    """(version, v5 variant or "") from the keys, as in the module docstring."""
    keys = tensors.keys()
    if "emb.weight" not in keys:
        raise ValueError(f"{path}: unknown layout: no 'emb.weight' (not an RWKV language model checkpoint?)")
    if any(".ffn.s_emb" in k for k in keys):
        raise ValueError(f"{path}: the RWKV-7 DeepEmbed variant (ffn.s_emb) is not supported")
    if any(k.endswith("att.r_k") for k in keys):
        return "v7", ""
    if any("time_maa" in k for k in keys):
        return "v6", ""
    if any(".att.ln_x." in k for k in keys):
        variant = "5.1" if any(k.endswith("att.gate.weight") for k in keys) else "5.0"
        decay = tensors.get("blocks.0.att.time_decay")
        if decay is not None and decay.dim() > 1 and decay.shape[1] > 1:  # [H, N]: the package's test
            variant = "5.2"
        return "v5", variant
    if any(k.endswith("att.time_first") for k in keys):
        return "v4", ""
    raise ValueError(
        f"{path}: unknown layout: none of the telltale keys of RWKV v4-v7 "
        "(att.r_k, time_maa, att.ln_x, att.time_first)"
    )


def infer_config(tensors: dict[str, Tensor], path: str = "<checkpoint>") -> RWKVConfig:
    """The config a state dict's shapes imply (no key is checked here beyond those read)."""
    version, variant = detect_version(tensors, path)
    V, C = _dim(tensors, "emb.weight", 0, path), _dim(tensors, "emb.weight", 1, path)
    layers = {int(k.split(".")[1]) for k in tensors if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if not layers:
        raise ValueError(f"{path}: missing key 'blocks.0.ln1.weight' (no blocks.* keys at all)")
    L = max(layers) + 1
    F = _dim(tensors, "blocks.0.ffn.key.weight", 0, path)
    kw: dict = {}
    if version == "v7":
        N = _dim(tensors, "blocks.0.att.r_k", 1, path)
        kw = dict(
            d_decay=_dim(tensors, "blocks.0.att.w1", 1, path),
            d_aaa=_dim(tensors, "blocks.0.att.a1", 1, path),
            d_gate=_dim(tensors, "blocks.0.att.g1", 1, path),
            d_mv=_dim(tensors, "blocks.1.att.v1", 1, path) if L > 1 else 0,
        )
    elif version == "v6":
        N = C // _dim(tensors, "blocks.0.att.time_faaaa", 0, path)
        kw = dict(
            d_mix=_dim(tensors, "blocks.0.att.time_maa_w1", 1, path) // 5,
            d_decay=_dim(tensors, "blocks.0.att.time_decay_w1", 1, path),
        )
    elif version == "v5":
        rank = 2 if variant == "5.2" else 1
        N = C // _dim(tensors, "blocks.0.att.time_decay", 0, path, rank=rank)
        kw = dict(
            variant=variant, bonus_key="time_faaaa" if "blocks.0.att.time_faaaa" in tensors else "time_first"
        )
    else:
        N = 0
    try:
        return RWKVConfig(version=version, n_layer=L, n_embd=C, vocab_size=V, dim_ffn=F, head_size=N, **kw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def expected_shapes(config: RWKVConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an official checkpoint of `config` with its shape, in the official key order.

    RWKV-7 files may also hold blocks.0.att.v0/v1/v2 (unused, see IGNORED_KEYS); they are not listed.
    """
    C, V, F, L = config.n_embd, config.vocab_size, config.dim_ffn, config.n_layer
    H, N = config.n_head, config.head_size
    mix = (1, 1, C)
    out: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
    for i in range(L):
        p = f"blocks.{i}."
        if i == 0:
            out.update({p + "ln0.weight": (C,), p + "ln0.bias": (C,)})
        for ln in ("ln1", "ln2"):
            out.update({p + ln + ".weight": (C,), p + ln + ".bias": (C,)})
        a = p + "att."
        linears = ["receptance", "key", "value", "output"]
        if config.version == "v7":
            out.update({a + "x_" + c: mix for c in "rwkvag"})
            lora = {"w": config.d_decay, "a": config.d_aaa, "v": config.d_mv, "g": 0}
            for c, d in lora.items():
                if c == "v" and i == 0:
                    continue
                if c != "g":
                    out[a + c + "0"] = mix
                    out.update({a + c + "1": (C, d), a + c + "2": (d, C)})
            out.update({a + "g1": (C, config.d_gate), a + "g2": (config.d_gate, C)})
            out.update({a + "k_k": mix, a + "k_a": mix, a + "r_k": (H, N)})
        elif config.version == "v6":
            out.update({a + "time_maa_" + c: mix for c in "xwkvrg"})
            out.update({a + "time_maa_w1": (C, 5 * config.d_mix), a + "time_maa_w2": (5, config.d_mix, C)})
            out.update({a + "time_decay_w1": (C, config.d_decay), a + "time_decay_w2": (config.d_decay, C)})
            out.update({a + "time_decay": mix, a + "time_faaaa": (H, N)})
            linears.append("gate")
        elif config.version == "v5":
            gated = config.variant != "5.0"
            out.update({a + "time_mix_" + c: mix for c in ("kvrg" if gated else "kvr")})
            decay = (H, N) if config.variant == "5.2" else (H,)
            out.update({a + "time_decay": decay, a + config.bonus_key: decay})
            if gated:
                linears.append("gate")
        else:
            out.update({a + "time_mix_" + c: mix for c in "kvr"})
            out.update({a + "time_decay": (C,), a + "time_first": (C,)})
        out.update({a + n + ".weight": (C, C) for n in linears})
        if config.version != "v4":
            out.update({a + "ln_x.weight": (C,), a + "ln_x.bias": (C,)})
        f = p + "ffn."
        if config.version == "v7":
            out[f + "x_k"] = mix
        else:
            prefix = "time_maa_" if config.version == "v6" else "time_mix_"
            out.update({f + prefix + "k": mix, f + prefix + "r": mix})
        out.update({f + "key.weight": (F, C)})
        if config.version != "v7":
            out[f + "receptance.weight"] = (C, C)
        out[f + "value.weight"] = (C, F)
    out.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return out


def parse_checkpoint(tensors: dict[str, Tensor], path: str = "<checkpoint>") -> Checkpoint:
    """Detect, infer the config and check every key and shape of an official state dict."""
    config = infer_config(tensors, path)
    expected = expected_shapes(config)
    for key, shape in expected.items():
        if key not in tensors:
            raise ValueError(
                f"{path}: missing key {key!r} (expected shape {_shape_str(shape)}, {config.name})"
            )
        found = tensors[key].shape
        if _squeezed(found) != _squeezed(shape):
            raise ValueError(
                f"{path}: key {key!r} has shape {_shape_str(found)}, expected {_shape_str(shape)} "
                f"(from a {config.name} config with C={config.n_embd}, N={config.head_size})"
            )
        if not tensors[key].is_floating_point():
            raise ValueError(f"{path}: key {key!r} has dtype {tensors[key].dtype}, expected a floating dtype")
    state_keys = [k for k in tensors if k.endswith(TIME_STATE)]
    extra = [k for k in tensors if k not in expected and k not in IGNORED_KEYS and k not in state_keys]
    if extra:
        raise ValueError(f"{path}: unexpected keys for a {config.name} checkpoint: {extra[:8]}")
    state = _state_from_time_state(tensors, config, path) if state_keys else None
    return Checkpoint(str(path), config, {k: tensors[k] for k in expected}, state)


def load_checkpoint(path: str | PathLike) -> Checkpoint:
    """Read and validate a .pth / .safetensors file, or a folder with model.safetensors + config.json."""
    path = Path(path)
    tokenizer = None
    if path.is_dir():
        cfg_file = path / "config.json"
        if cfg_file.is_file():
            tokenizer = json.loads(cfg_file.read_text()).get("tokenizer")
        path = path / "model.safetensors"
    ckpt = parse_checkpoint(read_tensors(path), str(path))
    ckpt.config.tokenizer = tokenizer
    logger.info("%s: RWKV %s, %s", path, ckpt.config.name, asdict(ckpt.config))
    return ckpt


# ----------------------------------------------------------------------------------------------------------
# state-tuned files


def _state_from_time_state(tensors: dict[str, Tensor], config: RWKVConfig, path: str) -> RWKVState:
    """The initial state held by blocks.{i}.att.time_state keys (layouts in the module docstring)."""
    if config.version == "v4":
        raise ValueError(f"{path}: RWKV-4 has no matrix state; unexpected time_state keys")
    H, N, C = config.n_head, config.head_size, config.n_embd
    layers = []
    for i in range(config.n_layer):
        key = f"blocks.{i}.{TIME_STATE}"
        t = _get(tensors, key, path, f"expected shape {_shape_str((H, N, N))}")
        if _squeezed(t.shape) != _squeezed((H, N, N)):
            raise ValueError(
                f"{path}: key {key!r} has shape {_shape_str(t.shape)}, expected {_shape_str((H, N, N))}"
            )
        s = t.reshape(H, N, N).float()
        if config.version == "v7":
            s = s.transpose(1, 2)  # file [H, key, value] -> [H, value, key]
        zeros = torch.zeros(1, C)
        layers.append({"att_shift": zeros, "wkv": s.contiguous().unsqueeze(0), "ffn_shift": zeros.clone()})
    return RWKVState(config.version, layers)


def load_state_file(path: str | PathLike, config: RWKVConfig) -> RWKVState:
    """The initial state stored in a state-tuning file (only blocks.{i}.att.time_state keys) for `config`.

    Returns:
        RWKVState of batch 1 with float32 tensors: zero shifts and wkv [1, H, N, N] (value, key).
    """
    tensors = read_tensors(path)
    extra = [k for k in tensors if not k.endswith(TIME_STATE)]
    if extra:
        raise ValueError(f"{path}: a state file holds only blocks.*.{TIME_STATE} keys, got {extra[:5]}")
    n = len(tensors)
    if n != config.n_layer:
        raise ValueError(f"{path}: holds {n} layers of time_state, the model has {config.n_layer}")
    return _state_from_time_state(tensors, config, str(path))


# ----------------------------------------------------------------------------------------------------------
# conversion and synthetic checkpoints


def convert(src: str | PathLike, dst: str | PathLike) -> Checkpoint:
    """Validate `src` (.pth or .safetensors) and write every tensor, dtype kept, to the safetensors `dst`."""
    from safetensors.torch import save_file

    tensors = read_tensors(src)
    ckpt = parse_checkpoint(tensors, str(src))
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t  # safetensors refuses tensors that share memory
        seen.add(ptr)
    metadata = {"format": "rwkv_mm.lm", "version": ckpt.config.name, "source": Path(src).name}
    save_file(out, str(dst), metadata=metadata)
    logger.info("wrote %s (%d tensors, %s)", dst, len(out), ckpt.config.name)
    return ckpt


def synthetic_state_dict(
    config: RWKVConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    layer0_value_residual: bool = True,
    time_state: bool = False,
) -> dict[str, Tensor]:
    """A random state dict in the official format of `config`, conditioned to behave like a trained net.

    Initialisation (specs/lm.md §5): emb N(0, 0.5²); norms 1 + N(0, 0.1²) / N(0, 0.1²); mixing
    coefficients U(0, 1); LoRA matrices std 0.1; square and ffn.key / head matrices N(0, 1/fan_in) with
    att.output and ffn.value scaled by 0.2 (keeps a random deep net out of its chaotic regime, so that
    fp32 implementations agree to ~1e-6); v7 w0 U(-5, 1), a0 / v0 N(0, 0.5²), k_k U(0.5, 1),
    k_a U(0.8, 1.2), r_k N(0, 0.2²); decays U(-6, 1) (v4: U(-3, 2)); bonuses N(0, 0.5²).

    Args:
        config: the shapes to produce.
        seed: torch generator seed.
        dtype: dtype of every tensor (official releases are bfloat16).
        layer0_value_residual: v7: add the unused blocks.0.att.v0/v1/v2 of released files.
        time_state: add blocks.{i}.att.time_state [H, N, N] N(0, 0.3²) (a state-tuned file; v5-v7).
    """
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=g) * std + mean

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    shapes = expected_shapes(config)
    if config.version == "v7" and layer0_value_residual and config.n_layer > 1:
        C, d = config.n_embd, config.d_mv
        extra = {"blocks.0.att.v0": (1, 1, C), "blocks.0.att.v1": (C, d), "blocks.0.att.v2": (d, C)}
        at = list(shapes).index("blocks.0.att.g1")
        items = list(shapes.items())
        shapes = dict(items[:at] + list(extra.items()) + items[at:])
    sd = {}
    for key, shape in shapes.items():
        parts = key.split(".")
        name = parts[-1]
        module = parts[-2] if name in ("weight", "bias") else ""
        if key == "emb.weight":
            t = normal(shape, 0.5)
        elif module.startswith("ln"):
            t = normal(shape, 0.1, 1.0) if key.endswith(".weight") else normal(shape, 0.1)
        elif key.endswith(".weight"):  # Linear [out, in]
            t = normal(shape, 1 / math.sqrt(shape[1]))
            if key.endswith("att.output.weight") or key.endswith("ffn.value.weight"):
                t = t * 0.2
        elif name.startswith(("x_", "time_maa_", "time_mix_")) and name not in ("time_maa_w1", "time_maa_w2"):
            t = uniform(shape, 0.0, 1.0)
        elif name in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2") or name.endswith(("_w1", "_w2")):
            t = normal(shape, 0.1)
        elif name == "w0":
            t = uniform(shape, -5.0, 1.0)
        elif name in ("a0", "v0"):
            t = normal(shape, 0.5)
        elif name == "k_k":
            t = uniform(shape, 0.5, 1.0)
        elif name == "k_a":
            t = uniform(shape, 0.8, 1.2)
        elif name == "r_k":
            t = normal(shape, 0.2)
        elif name == "time_decay":
            t = uniform(shape, -3.0, 2.0) if config.version == "v4" else uniform(shape, -6.0, 1.0)
        elif name in ("time_faaaa", "time_first"):
            t = normal(shape, 0.5)
        else:
            raise AssertionError(f"no init rule for {key}")
        sd[key] = t.to(dtype)
    if time_state:
        if config.version == "v4":
            raise ValueError("RWKV-4 has no time_state")
        H, N = config.n_head, config.head_size
        for i in range(config.n_layer):
            sd[f"blocks.{i}.{TIME_STATE}"] = normal((H, N, N), 0.3).to(dtype)
    return sd


def main(argv: list[str] | None = None) -> int:
    """`python -m rwkv_mm.lm.checkpoint {info,convert}`."""
    parser = argparse.ArgumentParser(
        prog="python -m rwkv_mm.lm.checkpoint", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="print the detected version and config as JSON")
    p_info.add_argument("path")
    p_conv = sub.add_parser("convert", help="validate a checkpoint and write it as .safetensors (dtype kept)")
    p_conv.add_argument("src")
    p_conv.add_argument("dst")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            ckpt = load_checkpoint(args.path)
            dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in ckpt.tensors.values()})
            params = sum(t.numel() for t in ckpt.tensors.values())
            info = {
                "name": ckpt.config.name,
                **asdict(ckpt.config),
                "params": params,
                "dtypes": dtypes,
                "state_tuned": ckpt.state is not None,
            }
            print(json.dumps(info, indent=2))
        else:
            if not str(args.dst).endswith(".safetensors"):
                parser.error(f"the output must end in .safetensors, got {args.dst}")
            ckpt = convert(args.src, args.dst)
            print(f"{args.dst}: {ckpt.config.name}, {ckpt.config.n_layer} layers, width {ckpt.config.n_embd}")
    except (ValueError, FileNotFoundError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
