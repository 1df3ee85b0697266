"""Shared RWKV building blocks: token shift, Q-Shift, low-rank projections, per-head group norm, channel mix.

Sources:
- RWKV-4 / 5 / 6 / 7 language models: BlinkDL/RWKV-LM, BlinkDL/ChatRWKV and the `rwkv` pip package (0.8.32).
- Vision-RWKV (VRWKV, VRWKV6): "Vision-RWKV: Efficient and Scalable Visual Perception with RWKV-Like
  Architectures", arXiv 2403.02308; official code OpenGVLab/Vision-RWKV.

Mixing with the shifted tokens is written as `torch.lerp` at the call sites (`lerp(start, end, w)` =
`start + w * (end - start)`). The argument order is part of each family's parametrisation:

- v4, v5, VRWKV (and VRWKV6's channel mix): `lerp(shifted, x, mu)` = `x * mu + shifted * (1 - mu)`
- v6, v7, VRWKV6's spatial mix:            `lerp(x, shifted, mu)` = `x + (shifted - x) * mu`

Q-Shift channel groups (g = channels per head // 4; the plain VRWKV form is one head spanning all C):
group 0 takes the left neighbour (w - s), group 1 the right (w + s), group 2 the one above (h - s),
group 3 the one below (h + s); neighbours outside the image are zeros.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ChannelMix", "head_group_norm", "low_rank", "low_rank_multi", "q_shift", "token_shift"]


def token_shift(x: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
    """Causal token shift: the previous token's row at every position.

    Args:
        x: [B, T, C] tokens.
        prev: [B, C] the token before x[:, 0] (the carried state); zeros when None.

    Returns:
        [B, T, C] with out[:, 0] = prev and out[:, t] = x[:, t - 1].
    """
    if prev is None:
        return F.pad(x, (0, 0, 1, -1))  # pad one zero row in front, drop the last row
    if x.shape[1] == 1:
        return prev.unsqueeze(1)
    return torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1)


def q_shift(
    x: torch.Tensor,
    resolution: tuple[int, int],
    shift_pixel: int = 1,
    heads: int = 1,
) -> torch.Tensor:
    """Vision-RWKV's Q-Shift: each channel quarter takes a neighbouring patch (zero padded).

    With heads=1 this is VRWKV's `q_shift` (channel_gamma 1/4); with heads=C//64 it is VRWKV6's
    `q_shift_multihead`, where the four quarters repeat inside every head. Group order: see the module
    docstring.

    Args:
        x: [B, T, C] tokens in row-major order (t = h * W + w), T = H * W.
        resolution: (H, W) patch grid.
        shift_pixel: neighbour distance s in patches.
        heads: number of channel blocks that each get the four quarters; C // heads must be a multiple of 4.

    Returns:
        [B, T, C] shifted tokens.
    """
    B, T, C = x.shape
    H, W = resolution
    if H * W != T:
        raise ValueError(f"resolution {H}x{W} gives {H * W} tokens, got T={T}")
    if C % (4 * heads) != 0:
        raise ValueError(f"channels per head must be a multiple of 4, got C={C} with heads={heads}")
    if shift_pixel < 0:
        raise ValueError(f"shift_pixel must be >= 0, got {shift_pixel}")
    sh, sw = min(shift_pixel, H), min(shift_pixel, W)
    xv = x.reshape(B, H, W, heads, 4, C // (4 * heads))  # (B, H, W, heads, quarter, g)
    out = torch.zeros_like(xv)
    out[:, :, sw:, :, 0] = xv[:, :, : W - sw, :, 0]  # from the left neighbour
    out[:, :, : W - sw, :, 1] = xv[:, :, sw:, :, 1]  # from the right neighbour
    out[:, sh:, :, :, 2] = xv[:, : H - sh, :, :, 2]  # from the neighbour above
    out[:, : H - sh, :, :, 3] = xv[:, sh:, :, :, 3]  # from the neighbour below
    return out.view(B, T, C)


def low_rank(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Low-rank projection `act(x @ w1) @ w2` (the RWKV-6/7 "LoRA" terms).

    The caller owns w1 and w2 under the checkpoint's own names (v7 `w1/w2` with tanh, `a1/a2` and `v1/v2`
    with no activation, `g1/g2` with sigmoid; v6 `time_decay_w1/w2` with tanh) and adds any bias itself.

    Args:
        x: [..., C] input.
        w1: [C, D] down projection.
        w2: [D, C_out] up projection.
        act: activation between the two (torch.tanh, torch.sigmoid) or None for none.

    Returns:
        [..., C_out].
    """
    h = x @ w1
    if act is not None:
        h = act(h)
    return h @ w2


def low_rank_multi(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor] | None = torch.tanh,
) -> torch.Tensor:
    """K low-rank projections sharing one down projection: RWKV-6's `time_maa_w1` / `time_maa_w2`.

    Computes `act(x @ w1)`, splits the result into K chunks of D and applies w2[k] to chunk k.

    Args:
        x: [..., C] input.
        w1: [C, K * D] down projections, concatenated.
        w2: [K, D, C_out] up projections.
        act: activation between the two; defaults to torch.tanh (RWKV-6); None for none.

    Returns:
        [K, ..., C_out]; `.unbind(0)` gives the K outputs (v6: w, k, v, r, g).
    """
    K, D, _ = w2.shape
    h = x @ w1
    if act is not None:
        h = act(h)
    h = h.reshape(-1, K, D).transpose(0, 1)  # (K, M, D), M = prod(x.shape[:-1])
    return torch.bmm(h, w2).view(K, *x.shape[:-1], w2.shape[-1])


def head_group_norm(
    x: torch.Tensor,
    num_heads: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 64e-5,
) -> torch.Tensor:
    """Per-head GroupNorm over the channels of every token (RWKV's `ln_x`).

    Equal to `F.group_norm(x.reshape(-1, C), num_heads, weight, bias, eps)`, computed as a layer norm over
    each head's channels followed by the affine map (about 2x faster on CPU, T = 1 included).

    Args:
        x: [..., C] tokens ([B, T, C] or [N, C]).
        num_heads: number of groups H; C must be divisible by H.
        weight: [C] scale.
        bias: [C] shift.
        eps: variance epsilon; 64e-5 for the RWKV-5/6/7 LMs, 1e-5 for VRWKV6.

    Returns:
        [..., C], same dtype as x.
    """
    C = x.shape[-1]
    if C % num_heads != 0:
        raise ValueError(f"channels must be divisible by num_heads, got C={C}, num_heads={num_heads}")
    y = F.layer_norm(x.unflatten(-1, (num_heads, C // num_heads)), (C // num_heads,), eps=eps)
    return torch.addcmul(bias, y.flatten(-2), weight)


class ChannelMix(nn.Module):
    """Squared-ReLU channel mix ("ffn") of RWKV v4-v7 and Vision-RWKV.

    `out = value(relu(key(xk))²)`, with an optional LayerNorm on the hidden activations (key_norm,
    VRWKV-L) and an optional receptance gate `sigmoid(receptance(xr)) ⊙ out` (v4, v5, v6, VRWKV; not v7).

    The forward takes the already-mixed inputs: the token shift (causal or Q-Shift), the lerp order and the
    mixing parameters' names differ per family, so a model's `ffn` subclasses this module, declares its
    coefficients under the checkpoint's names (v7 `x_k`; v6 `time_maa_k/r`; v4/v5 `time_mix_k/r`; VRWKV
    `spatial_mix_k/r`) and calls `super().forward(xk, xr)`. Parameter names match the official keys:
    `ffn.key.weight`, `ffn.value.weight`, `ffn.receptance.weight`, `ffn.key_norm.*`.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        gate: bool = True,
        key_norm: bool = False,
        device=None,
        dtype=None,
    ):
        """
        Args:
            dim: model width C.
            hidden: hidden width F (v7 4C, v6 int(3.5C // 32 * 32), VRWKV 4C).
            gate: add the sigmoid receptance gate.
            key_norm: LayerNorm(F) on relu(key(xk))² before value.
            device: parameter device.
            dtype: parameter dtype.
        """
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.key = nn.Linear(dim, hidden, bias=False, **dd)
        self.key_norm = nn.LayerNorm(hidden, **dd) if key_norm else None
        self.value = nn.Linear(hidden, dim, bias=False, **dd)
        self.receptance = nn.Linear(dim, dim, bias=False, **dd) if gate else None

    def forward(self, xk: torch.Tensor, xr: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            xk: [..., C] input mixed for the key.
            xr: [..., C] input mixed for the receptance; required with gate, not allowed without.

        Returns:
            [..., C].
        """
        if (xr is None) != (self.receptance is None):
            raise ValueError(f"xr must be given exactly when gate=True (gate={self.receptance is not None})")
        k = self.key(xk)
        if torch.is_grad_enabled():
            k = torch.relu(k)
            k = k * k  # squared ReLU (faster than .square(), which dispatches to pow on CPU)
        else:  # the same values, without a second [..., F] hidden
            k = torch.relu_(k).mul_(k)
        if self.key_norm is not None:
            k = self.key_norm(k)
        out = self.value(k)
        if self.receptance is not None:
            out = torch.sigmoid(self.receptance(xr)) * out
        return out
