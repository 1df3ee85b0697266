"""Compiled WKV backends (C++ for the CPU, CUDA for GPUs), looked up lazily by ``rwkv_mm.core.ops``.

``get(op, backend)`` returns a callable with the signature of the op's ``naive_<op>`` twin in
``rwkv_mm.core.reference``, or None when that backend cannot run here; ``unavailable_reason`` says
why in one line. No compiled kernels are part of this release yet, so every lookup says so and
``backend="auto"`` runs the plain-torch forms of ``rwkv_mm.core.chunked``.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["COMPILED_BACKENDS", "get", "unavailable_reason"]

COMPILED_BACKENDS = ("cpp", "cuda")


def get(op: str, backend: str) -> Callable | None:
    """The compiled implementation of ``op`` ("wkv4", "wkv6", "wkv7", "biwkv") for ``backend``, or None."""
    return None


def unavailable_reason(backend: str) -> str:
    """One line saying why ``backend`` is not available."""
    return f"no compiled '{backend}' kernels are included in this version of rwkv_mm"
