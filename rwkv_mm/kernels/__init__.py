"""Compiled WKV backends (C++ for the CPU, CUDA for GPUs), looked up lazily by ``rwkv_mm.core.ops``.

``get(op, backend)`` returns a callable with the signature and the result conventions of the op's
``naive_<op>`` twin in ``rwkv_mm.core.reference`` (differentiable: each kernel has a backward), or
None when that backend cannot run here; ``unavailable_reason`` says why in one line. Kernels are
built on first use (``build.py``); the autograd glue of each op lives in ``kernels/<op>.py`` as
``make(module, backend) -> callable``.

``RWKV_MM_KERNELS=off`` keeps ``backend="auto"`` on the plain-torch forms (no builds at all); a
backend asked for by name is still built.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable

from . import build

__all__ = ["COMPILED_BACKENDS", "get", "unavailable_reason"]

COMPILED_BACKENDS = build.BACKENDS

_callables: dict[tuple[str, str], Callable] = {}
_fallback_warned = False


def _device_problem(backend: str) -> str:
    import torch

    if backend == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible"
    return ""


def get(op: str, backend: str, warn_on_fallback: bool = False) -> Callable | None:
    """The compiled implementation of ``op`` (``build.OPS``: the WKV ops and "gemv") for ``backend``, or None.

    With ``warn_on_fallback`` (what ``backend="auto"`` uses), a kernel that fails to build or load is
    reported once per process with a warning, and the caller falls back to the plain-torch form.
    """
    key = (op, backend)
    if key in _callables:
        return _callables[key]
    if _device_problem(backend) or (warn_on_fallback and _auto_disabled()):
        return None
    module = build.load(op, backend)
    if module is None:
        if warn_on_fallback:
            _warn_fallback_once(op, backend)
        return None
    _callables[key] = importlib.import_module(f"{__name__}.{op}").make(module, backend)
    return _callables[key]


def _auto_disabled() -> bool:
    return os.environ.get("RWKV_MM_KERNELS", _AUTO_DEFAULT).lower() in ("off", "0", "no", "false")


# what RWKV_MM_KERNELS means when unset: build and use the compiled kernels
_AUTO_DEFAULT = "auto"


def unavailable_reason(op: str, backend: str) -> str:
    """One line saying why ``get(op, backend)`` returns None."""
    return _device_problem(backend) or build.unavailable_reason(op, backend) or "not built yet"


def _warn_fallback_once(op: str, backend: str) -> None:
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(
            f"rwkv_mm: the compiled {backend} kernel for {op} is unavailable "
            f"({build.unavailable_reason(op, backend)}); using the plain-torch forms instead",
            RuntimeWarning,
            stacklevel=3,
        )
