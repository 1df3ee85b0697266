"""The kernel build machinery: finding the CUDA toolkit, one-line reasons, auto's one fallback warning."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from rwkv_mm import kernels
from rwkv_mm.core import chunked, ops
from rwkv_mm.kernels import build
from tests.wkv_inputs import wkv4_inputs


def fake_toolkit(root: Path) -> Path:
    """A folder laid out like a CUDA toolkit: include/cuda_runtime.h, lib64/libcudart.so, bin/nvcc."""
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "lib64").mkdir()
    (root / "lib64" / "libcudart.so").write_text("")
    (root / "bin").mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    return root


@pytest.fixture
def no_default_toolkit(monkeypatch):
    """Hide /usr/local/cuda and any real nvcc, so only what a test sets up is found."""
    real_is_home = build._is_cuda_home
    monkeypatch.setattr(build, "_is_cuda_home", lambda p: p != Path("/usr/local/cuda") and real_is_home(p))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")


def test_cuda_home_prefers_the_environment_variable(tmp_path, monkeypatch, no_default_toolkit):
    home = fake_toolkit(tmp_path / "cuda-x")
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert build.cuda_home() == home.resolve()


def test_cuda_home_ignores_a_folder_without_headers_and_libraries(tmp_path, monkeypatch, no_default_toolkit):
    (tmp_path / "empty" / "include").mkdir(parents=True)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "empty"))
    assert build.cuda_home() is None


def test_cuda_home_follows_an_nvcc_wrapper_script_on_path(tmp_path, monkeypatch, no_default_toolkit):
    home = fake_toolkit(tmp_path / "opt" / "cuda-13.0")
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    wrapper = wrappers / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", str(wrappers))
    assert build.cuda_home() == home.resolve()


def test_cuda_home_follows_a_symlinked_nvcc(tmp_path, monkeypatch, no_default_toolkit):
    home = fake_toolkit(tmp_path / "cuda-12")
    (home / "bin" / "nvcc").chmod(0o755)
    links = tmp_path / "bin"
    links.mkdir()
    (links / "nvcc").symlink_to(home / "bin" / "nvcc")
    monkeypatch.setenv("PATH", str(links))
    assert build.cuda_home() == home.resolve()


def test_a_missing_compiler_gives_a_one_line_reason(monkeypatch):
    build.reload_for_tests()
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    try:
        assert build.load("wkv4", "cpp") is None
        reason = build.unavailable_reason("wkv4", "cpp")
        assert "no C++ compiler found" in reason and "\n" not in reason
    finally:
        build.reload_for_tests()


def test_cuda_without_gpu_or_arch_list_says_what_to_set(monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the arch list is taken from it")
    if build.cuda_home() is None:
        pytest.skip("no CUDA toolkit on this machine")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert "TORCH_CUDA_ARCH_LIST" in build._toolchain_problem("cuda")


def test_unknown_op_or_backend_is_rejected():
    with pytest.raises(ValueError, match="op must be one of"):
        build.load("wkv5", "cpp")


def test_auto_warns_once_per_process_and_falls_back_to_the_torch_form(monkeypatch):
    monkeypatch.setenv("RWKV_MM_KERNELS", "auto")
    monkeypatch.setattr(build, "load", lambda op, backend: None)
    monkeypatch.setattr(build, "unavailable_reason", lambda op, backend: "RuntimeError: compiler exploded")
    monkeypatch.setattr(kernels, "_fallback_warned", False)
    monkeypatch.setattr(kernels, "_callables", {})
    x = wkv4_inputs(1, 5, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y_auto, _ = ops.wkv4(**x)
        ops.wkv4(**x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "compiler exploded" in messages[0] and "plain-torch" in messages[0]
    y_torch, _ = chunked.wkv4(**x)
    assert (y_auto == y_torch).all()
    with pytest.raises(RuntimeError, match="backend 'cpp' is not available for wkv4: RuntimeError: compiler"):
        ops.wkv4(**x, backend="cpp")


def test_kernels_off_keeps_auto_from_building_anything(monkeypatch):
    monkeypatch.setenv("RWKV_MM_KERNELS", "off")
    monkeypatch.setattr(kernels, "_callables", {})
    built = []
    monkeypatch.setattr(build, "load", lambda op, backend: built.append(op))
    ops.wkv4(**wkv4_inputs(1, 5, 3))
    assert built == []
    with pytest.raises(RuntimeError, match="backend 'cpp' is not available"):
        ops.wkv4(**wkv4_inputs(1, 5, 3), backend="cpp")  # asked for by name: built (here: refused)
    assert built == ["wkv4"]
