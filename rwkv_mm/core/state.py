"""Recurrent state of the RWKV language models (v4 to v7), for chaining calls, batching and state files.

Per layer, a dict of tensors (B = batch, C = width, H heads of N channels, C = H * N):

| version    | tensors, in the order of the `rwkv` pip package's per-layer state list                 |
|------------|-----------------------------------------------------------------------------------------|
| v5, v6, v7 | att_shift [B, C], wkv [B, H, N, N], ffn_shift [B, C]                                    |
| v4         | att_shift [B, C], num [B, C], den [B, C], max [B, C], ffn_shift [B, C]                  |

- att_shift / ffn_shift: the last token seen by the time mix / channel mix (the ln1 / ln2 output), in the
  activation dtype.
- wkv: the matrix state S[b, h, i, j] with **i = value index, j = key index** (the official CUDA kernels'
  and RWKV-7 pip layout). The pip package keeps v5/v6 CPU states transposed ([key, value]); lm converts
  such lists where it reads them.
- num, den, max: RWKV-4's numerator and denominator scaled by e^{-max} (the pip package's aa, bb, pp);
  max starts at -1e30.

The recurrent tensors (wkv, num, den, max) stay float32 whatever the activation dtype (float64 in
float64 runs). No method mutates a state: `select`, `concat` and `clone` return new tensors; `to` and
`detach` follow torch and may share storage with the original.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["RWKVState"]

LAYOUTS = {
    "v4": ("att_shift", "num", "den", "max", "ffn_shift"),
    "v5": ("att_shift", "wkv", "ffn_shift"),
    "v6": ("att_shift", "wkv", "ffn_shift"),
    "v7": ("att_shift", "wkv", "ffn_shift"),
}
RECURRENT = frozenset({"wkv", "num", "den", "max"})
FORMAT = "rwkv_mm.state"
FILE_LAYOUT = {  # written into the file's metadata for readers outside rwkv_mm
    "v4": "att_shift [B,C]; num [B,C]; den [B,C]; max [B,C]; ffn_shift [B,C]",
    "v5": "att_shift [B,C]; wkv [B,H,N,N] = S[b,h,value,key]; ffn_shift [B,C]",
}
FILE_LAYOUT["v6"] = FILE_LAYOUT["v7"] = FILE_LAYOUT["v5"]


def _recurrent_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True, eq=False)
class RWKVState:
    """Recurrent state of an RWKV LM: one dict of tensors per layer (layout in the module docstring).

    Args:
        version: "v4", "v5", "v6" or "v7"; fixes the tensor names of each layer.
        layers: per layer, a dict name -> tensor with the batch on dim 0.
    """

    version: str
    layers: list[dict[str, torch.Tensor]]

    def __post_init__(self):
        if self.version not in LAYOUTS:
            raise ValueError(f"version must be one of {sorted(LAYOUTS)}, got {self.version!r}")
        if not self.layers:
            raise ValueError("a state needs at least one layer, got 0")
        names = LAYOUTS[self.version]
        for i, layer in enumerate(self.layers):
            if set(layer) != set(names):
                raise ValueError(
                    f"layer {i} of a {self.version} state needs {list(names)}, got {list(layer)}"
                )
        B = self.batch_size
        for i, layer in enumerate(self.layers):
            for name, t in layer.items():
                if t.dim() == 0 or t.shape[0] != B:
                    raise ValueError(
                        f"layer {i} {name} has shape {list(t.shape)}, expected batch size {B} on dim 0"
                    )

    @classmethod
    def zeros(
        cls,
        version: str,
        num_layers: int,
        batch_size: int,
        dim: int,
        head_size: int = 64,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "RWKVState":
        """The initial state: zeros (v4 `max`: -1e30).

        Args:
            version: "v4", "v5", "v6" or "v7".
            num_layers: number of layers L.
            batch_size: B.
            dim: model width C.
            head_size: N, the channels per head (v5-v7; ignored for v4). Defaults to 64.
            device: device of every tensor.
            dtype: dtype of the shift tensors; recurrent tensors are float32 (float64 if dtype is float64).
        """
        if version not in LAYOUTS:
            raise ValueError(f"version must be one of {sorted(LAYOUTS)}, got {version!r}")
        if version != "v4" and dim % head_size != 0:
            raise ValueError(f"dim must be a multiple of head_size, got dim={dim}, head_size={head_size}")
        rdt = _recurrent_dtype(dtype)
        wkv_shape = (batch_size, dim // head_size, head_size, head_size)
        layers = []
        for _ in range(num_layers):
            layer = {}
            for name in LAYOUTS[version]:
                layer[name] = torch.full(
                    wkv_shape if name == "wkv" else (batch_size, dim),
                    -1e30 if name == "max" else 0.0,
                    device=device,
                    dtype=rdt if name in RECURRENT else dtype,
                )
            layers.append(layer)
        return cls(version, layers)

    @property
    def batch_size(self) -> int:
        """B, the size of dim 0 of every tensor."""
        return self.layers[0]["att_shift"].shape[0]

    def _map(self, fn) -> "RWKVState":
        return RWKVState(self.version, [{n: fn(n, t) for n, t in layer.items()} for layer in self.layers])

    def select(self, indices: Sequence[int] | torch.Tensor) -> "RWKVState":
        """A new state holding the batch rows `indices` (1-D ints, negative allowed, or a bool mask)."""
        idx = indices if isinstance(indices, torch.Tensor) else torch.tensor(list(indices), dtype=torch.long)
        if idx.dim() != 1:
            raise ValueError(f"indices must be 1-D, got shape {list(idx.shape)}")
        return self._map(lambda n, t: t[idx.to(t.device)])  # advanced indexing copies

    @classmethod
    def concat(cls, states: Sequence["RWKVState"]) -> "RWKVState":
        """One state with the batches of `states` stacked in order (new tensors)."""
        if not states:
            raise ValueError("concat needs at least one state, got 0")
        first = states[0]
        for s in states[1:]:
            if s.version != first.version or len(s.layers) != len(first.layers):
                raise ValueError(
                    f"cannot concat a {s.version} state of {len(s.layers)} layers with a "
                    f"{first.version} state of {len(first.layers)} layers"
                )
        layers = [
            {n: torch.cat([s.layers[i][n] for s in states]) for n in layer}
            for i, layer in enumerate(first.layers)
        ]
        return cls(first.version, layers)

    def clone(self) -> "RWKVState":
        """A deep copy (new tensors)."""
        return self._map(lambda n, t: t.clone())

    def detach(self) -> "RWKVState":
        """The same values cut from the autograd graph (truncated backprop through time)."""
        return self._map(lambda n, t: t.detach())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "RWKVState":
        """Moves every tensor to `device`; casts the shift tensors to `dtype` and keeps the recurrent ones
        float32 (float64 if dtype is float64)."""

        def cast(name: str, t: torch.Tensor) -> torch.Tensor:
            if dtype is None:
                return t.to(device)
            return t.to(device, _recurrent_dtype(dtype) if name in RECURRENT else dtype)

        return self._map(cast)

    def stack(self, name: str) -> torch.Tensor:
        """One tensor over the layers, e.g. stack("wkv") -> [L, B, H, N, N] (what embeddings pool)."""
        if name not in LAYOUTS[self.version]:
            raise ValueError(f"a {self.version} state holds {list(LAYOUTS[self.version])}, got {name!r}")
        return torch.stack([layer[name] for layer in self.layers])

    def equal(self, other: "RWKVState") -> bool:
        """True if both states have the same version, names, dtypes, devices and bit-identical values."""
        if self.version != other.version or len(self.layers) != len(other.layers):
            return False
        for a, b in zip(self.layers, other.layers, strict=True):
            if set(a) != set(b):
                return False
            for n, t in a.items():
                u = b[n]
                if t.dtype != u.dtype or t.device != u.device or not torch.equal(t, u):
                    return False
        return True

    def save(self, path: str | PathLike) -> None:
        """Writes a safetensors file: tensors `layers.{i}.{name}`, metadata format / version / layout."""
        tensors = {
            f"layers.{i}.{n}": t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
            for i, layer in enumerate(self.layers)
            for n, t in layer.items()
        }
        metadata = {
            "format": FORMAT,
            "version": self.version,
            "num_layers": str(len(self.layers)),
            "layout": FILE_LAYOUT[self.version],
        }
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | PathLike, device: torch.device | str = "cpu") -> "RWKVState":
        """Reads a file written by `save`, onto `device`."""
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(
                    f"{path} is not an rwkv_mm state file (format {metadata.get('format')!r}, "
                    f"expected {FORMAT!r})"
                )
            version, num_layers = metadata["version"], int(metadata["num_layers"])
            if version not in LAYOUTS:
                raise ValueError(f"{path} holds an unknown state version {version!r}")
            names = LAYOUTS[version]
            keys = {f"layers.{i}.{n}" for i in range(num_layers) for n in names}
            if keys != set(f.keys()):
                raise ValueError(
                    f"{path}: tensors {sorted(set(f.keys()) ^ keys)} do not fit a "
                    f"{num_layers}-layer {version} state"
                )
            layers = [{n: f.get_tensor(f"layers.{i}.{n}") for n in names} for i in range(num_layers)]
        return cls(version, layers)

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{n} {list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for n, t in self.layers[0].items()
        )
        return f"RWKVState(version={self.version!r}, layers={len(self.layers)}, {shapes})"
