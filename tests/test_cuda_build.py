"""Every CUDA extension (wkv4, wkv6, wkv7, biwkv) compiles here, with or without a GPU.

nvcc needs ``TORCH_CUDA_ARCH_LIST`` when no GPU is visible ("8.0;9.0" is set when unset). Without a
CUDA toolkit the test is skipped with the reason, unless ``RWKV_MM_REQUIRE_CUDA_BUILD=1`` (CI), which
makes a missing toolkit a failure; a toolkit that is present but fails to build is always a failure.
The first build takes ~30-40 s per op (2 cores); later runs load the cached extension.
"""

from __future__ import annotations

import os

import pytest

from rwkv_mm.kernels import build


@pytest.mark.slow
@pytest.mark.parametrize("op", ["wkv4", "wkv6", "wkv7", "biwkv"])
def test_cuda_extension_compiles(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if build.cuda_home() is None:
        reason = "no CUDA toolkit found (set CUDA_HOME to a folder with include/cuda_runtime.h)"
        if os.environ.get("RWKV_MM_REQUIRE_CUDA_BUILD") == "1":
            pytest.fail(f"RWKV_MM_REQUIRE_CUDA_BUILD=1 but {reason}")
        pytest.skip(reason)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    build.reload_for_tests()  # forget a failure cached before the arch list was set
    module = build.load(op, "cuda")
    assert module is not None, f"the {op} cuda kernel failed to build: {build.unavailable_reason(op, 'cuda')}"
    assert build.unavailable_reason(op, "cuda") == ""
    assert callable(module.forward) and callable(module.backward)
