"""The RWKV core: the WKV recurrences (the only home of them), shared layers and the state container."""

from .layers import ChannelMix, head_group_norm, low_rank, low_rank_multi, q_shift, token_shift
from .ops import BACKENDS, biwkv, wkv4, wkv6, wkv7
from .state import RWKVState

__all__ = [
    "BACKENDS",
    "ChannelMix",
    "RWKVState",
    "biwkv",
    "head_group_norm",
    "low_rank",
    "low_rank_multi",
    "q_shift",
    "token_shift",
    "wkv4",
    "wkv6",
    "wkv7",
]
