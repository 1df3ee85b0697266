"""Build the compiled WKV kernels on first use, cache them, and say clearly why one cannot be built.

Each op has its own extension per backend, so one failing kernel never takes the others down:
- ``cpp``:  ``csrc/<op>.cpp`` (C++ with OpenMP, binds itself with PYBIND11_MODULE)
- ``cuda``: ``cuda/<op>.cu`` (plain CUDA, no torch headers: ~35 s builds instead of ~200 s) and
  ``cuda/<op>.cpp`` (the thin torch binding)
both with ``include/`` on the include path, where the per-row / per-channel recurrence steps live as
``RWKV_HD`` (``__host__ __device__``) functions shared by the two launchers. Builds go through
``torch.utils.cpp_extension.load`` into its cache (``$TORCH_EXTENSIONS_DIR`` when set); a rebuild
happens only when a source or a flag changes, and a warm load in a fresh process takes milliseconds.

The CUDA toolkit is found from ``$CUDA_HOME``, else ``/usr/local/cuda``, else the real location of
the ``nvcc`` on PATH (which may be a wrapper script); a candidate counts only when it holds the CUDA
headers and the runtime library. Without a visible GPU, nvcc needs ``TORCH_CUDA_ARCH_LIST``
(e.g. "8.0;9.0") to know what to compile for.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import time
from pathlib import Path
from types import ModuleType

__all__ = ["OPS", "BACKENDS", "cuda_home", "load", "unavailable_reason"]

logger = logging.getLogger(__name__)

OPS = ("wkv4", "wkv6", "wkv7", "biwkv", "gemv", "decode7")
BACKENDS = ("cpp", "cuda")
# the ops each backend has kernels for (the decode kernels are CPU kernels only)
OPS_BY_BACKEND = {"cpp": OPS, "cuda": ("wkv4", "wkv6", "wkv7", "biwkv")}
KERNELS_DIR = Path(__file__).resolve().parent
CPP_FLAGS = ["-O3", "-march=native", "-fopenmp"]
CUDA_FLAGS = ["-O3", "-Xptxas=-O3"]

_loaded: dict[tuple[str, str], ModuleType] = {}
_failed: dict[tuple[str, str], str] = {}


def _is_cuda_home(path: Path) -> bool:
    """A CUDA toolkit root: it holds cuda_runtime.h and the CUDA runtime library."""
    libs = ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
    return (path / "include" / "cuda_runtime.h").is_file() and any(
        (path / lib / "libcudart.so").exists() for lib in libs
    )


def _nvcc_roots(nvcc: Path) -> list[Path]:
    """Toolkit roots the nvcc on PATH may stand for: its real location, or the nvcc a wrapper script runs."""
    real = nvcc.resolve()
    roots = [real.parent.parent]
    try:
        text = real.read_text(errors="ignore") if real.stat().st_size < 65536 else ""
    except OSError:
        text = ""
    roots += [Path(m).parent.parent for m in re.findall(r"(/[^\s'\"]+/bin/nvcc)\b", text)]
    return roots


def cuda_home() -> Path | None:
    """The CUDA toolkit to build with: $CUDA_HOME, /usr/local/cuda, or the one behind the nvcc on PATH."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]))
    candidates.append(Path("/usr/local/cuda"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += _nvcc_roots(Path(nvcc))
    return next((c.resolve() for c in candidates if _is_cuda_home(c)), None)


def _sources(op: str, backend: str) -> list[Path]:
    if backend == "cpp":
        return [KERNELS_DIR / "csrc" / f"{op}.cpp"]
    return [KERNELS_DIR / "cuda" / f"{op}.cu", KERNELS_DIR / "cuda" / f"{op}.cpp"]


def _toolchain_problem(backend: str) -> str | None:
    """Why ``backend`` cannot be built on this machine, or None."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler found (install g++ or set CXX)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the PyPI package puts the binary next to the interpreter)
        except ImportError:
            return "ninja is not installed (pip install ninja)"
    if backend == "cuda":
        if cuda_home() is None:
            return "no CUDA toolkit found (set CUDA_HOME to a folder with include/cuda_runtime.h)"
        import torch

        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            return "no GPU visible: set TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0') to build the CUDA kernels"
    return None


def _build(op: str, backend: str) -> ModuleType:
    home = cuda_home()
    if home is not None:  # torch guesses CUDA_HOME once, at import, from the nvcc on PATH (a wrapper here)
        os.environ["CUDA_HOME"] = str(home)
    import torch.utils.cpp_extension as cpp_extension

    problem = _toolchain_problem(backend)
    if problem:
        raise RuntimeError(problem)
    sources = _sources(op, backend)
    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"no {backend} kernel source for {op}: {', '.join(missing)}")
    kwargs: dict = {}
    if backend == "cuda":
        cpp_extension.CUDA_HOME = str(home)  # in case torch was imported before CUDA_HOME was set
        kwargs["extra_cuda_cflags"] = CUDA_FLAGS
    start = time.perf_counter()
    logger.info("building the %s %s kernel (first use; cached afterwards)", op, backend)
    module = cpp_extension.load(
        name=f"rwkv_mm_{op}_{backend}",
        sources=[str(s) for s in sources],
        extra_include_paths=[str(KERNELS_DIR / "include")],
        extra_cflags=CPP_FLAGS,
        extra_ldflags=["-fopenmp"],
        verbose=False,
        **kwargs,
    )
    logger.info("%s %s kernel ready in %.1f s", op, backend, time.perf_counter() - start)
    return module


def load(op: str, backend: str) -> ModuleType | None:
    """The compiled extension of ``op`` for ``backend`` ("cpp" or "cuda"), built on first use; None when
    it cannot be built or loaded (``unavailable_reason`` says why). Results are cached per process."""
    if op not in OPS or backend not in BACKENDS:
        raise ValueError(f"op must be one of {OPS} and backend one of {BACKENDS}, got {op!r}, {backend!r}")
    key = (op, backend)
    if key in _loaded:
        return _loaded[key]
    if key in _failed:
        return None
    try:
        _loaded[key] = _build(op, backend)
    except Exception as err:  # noqa: BLE001 -- any build or load failure means "not available", with its reason
        _failed[key] = f"{type(err).__name__}: {_one_line(err)}"
        logger.debug("the %s %s kernel is unavailable", op, backend, exc_info=True)
        return None
    return _loaded[key]


def unavailable_reason(op: str, backend: str) -> str:
    """One line saying why ``load(op, backend)`` returned None ("" when it did not)."""
    return _failed.get((op, backend), "")


def _one_line(err: Exception) -> str:
    """The gist of a build error: its first line, or the first compiler error line in it."""
    text = str(err).strip()
    for line in text.splitlines():
        if "error" in line.lower() and ("\u2018" in line or ":" in line):
            return line.strip()[:300]
    return (text.splitlines() or [""])[0][:300]


def module_for(op: str, backend: str) -> ModuleType:
    """Like ``load`` but raising a RuntimeError with the reason when the kernel is unavailable."""
    module = load(op, backend)
    if module is None:
        raise RuntimeError(f"the {op} {backend} kernel is unavailable: {unavailable_reason(op, backend)}")
    return module


def reload_for_tests() -> None:
    """Forget cached build results (tests that change the environment call this)."""
    _loaded.clear()
    _failed.clear()
    importlib.invalidate_caches()


def main() -> None:
    """Build every kernel and print each build time (``python -m rwkv_mm.kernels``)."""
    import argparse

    parser = argparse.ArgumentParser(description="Build the compiled WKV kernels and report the build times.")
    parser.add_argument("--backend", choices=BACKENDS, action="append", help="default: both")
    args = parser.parse_args()
    failures = 0
    for backend in args.backend or BACKENDS:
        for op in OPS_BY_BACKEND[backend]:
            start = time.perf_counter()
            ok = load(op, backend) is not None
            seconds = time.perf_counter() - start
            failures += not ok
            status = f"ready in {seconds:.1f} s" if ok else f"UNAVAILABLE: {unavailable_reason(op, backend)}"
            print(f"{op:6s} {backend:5s} {status}", flush=True)
    raise SystemExit(1 if failures else 0)
