"""The vision face: Vision-RWKV models for timm.

Importing this package registers the `vrwkv_*` and `vrwkv6_*` models in timm's registry::

    import timm, rwkv_mm.vision
    m = timm.create_model("vrwkv_tiny", pretrained=True,
                          pretrained_cfg_overlay=dict(file="vrwkv_t_in1k_224.pth"))
"""

from .vrwkv import VRWKV, checkpoint_filter_fn
from .vrwkv6 import VRWKV6

__all__ = ["VRWKV", "VRWKV6", "checkpoint_filter_fn"]
