"""biwkv(mode="official") against the released Vision-RWKV CUDA kernel itself, compiled on the GPU.

The upstream source is not part of rwkv_mm: point ``RWKV_MM_UPSTREAM_BIWKV_CU`` at a copy of
OpenGVLab/Vision-RWKV's ``classification/mmcls_custom/models/backbones/cuda/wkv_cuda.cu`` (only its
``cuda_forward`` launcher is used; the binding below is ours). Without the variable or a CUDA device
the test is skipped, saying which is missing. Inputs follow the models: ``w = spatial_decay / T`` and
``u = spatial_first / T`` with decays of both signs, T = 196 (14x14 patches) and 1024 (32x32).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rwkv_mm.core import ops
from rwkv_mm.core.reference import naive_biwkv

UPSTREAM_ENV = "RWKV_MM_UPSTREAM_BIWKV_CU"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available())"
    ),
    pytest.mark.skipif(
        not os.environ.get(UPSTREAM_ENV), reason=f"{UPSTREAM_ENV} does not name the upstream wkv_cuda.cu"
    ),
]

BINDING = r"""
#include <torch/extension.h>
void cuda_forward(int B, int T, int C, float *w, float *u, float *k, float *v, float *y);
torch::Tensor forward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v) {
    auto y = torch::empty_like(k);
    cuda_forward(k.size(0), k.size(1), k.size(2), w.data_ptr<float>(), u.data_ptr<float>(),
                 k.data_ptr<float>(), v.data_ptr<float>(), y.data_ptr<float>());
    return y;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("forward", &forward); }
"""


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory):
    from torch.utils.cpp_extension import load

    source = Path(os.environ[UPSTREAM_ENV])
    assert source.is_file(), f"{UPSTREAM_ENV}={source} is not a file"
    build = tmp_path_factory.mktemp("upstream_biwkv")
    (build / "binding.cpp").write_text(BINDING)
    (build / "wkv_cuda.cu").write_text(source.read_text())
    return load(
        name="vrwkv_upstream_biwkv",
        sources=[str(build / "binding.cpp"), str(build / "wkv_cuda.cu")],
        extra_cuda_cflags=["-O3", "--use_fast_math", "-DTmax=1024"],
        build_directory=str(build),
        verbose=False,
    )


@pytest.mark.parametrize("T", [196, 1024])
def test_official_mode_equals_the_released_kernel(upstream, T: int) -> None:
    g = torch.Generator().manual_seed(T)
    B, C = 2, 64
    decay = torch.randn(C, generator=g) * 3.0  # spatial_decay: both signs, as trained models have
    first = torch.randn(C, generator=g) * 3.0
    w, u = decay / T, first / T
    k = torch.randn(B, T, C, generator=g)
    v = torch.randn(B, T, C, generator=g)

    y_up = upstream.forward(*(x.cuda().contiguous() for x in (w, u, k, v))).cpu()
    y_ref = naive_biwkv(w.double(), u.double(), k.double(), v.double(), mode="official")
    y_ops = ops.biwkv(w, u, k, v, mode="official", backend="torch")
    y_cuda = ops.biwkv(*(x.cuda() for x in (w, u, k, v)), mode="official", backend="cuda").cpu()

    scale = y_ref.abs().max().item()
    # the released kernel runs in fp32 with --use_fast_math exp: allow a few fp32 ulps of the output scale
    assert (y_up.double() - y_ref).abs().max().item() <= 1e-4 * scale
    assert (y_ops.double() - y_up.double()).abs().max().item() <= 1e-4 * scale
    assert (y_cuda.double() - y_up.double()).abs().max().item() <= 1e-4 * scale
    # and the paper formula is measurably different from what the kernel computes
    y_paper = naive_biwkv(w.double(), u.double(), k.double(), v.double(), mode="paper")
    gap = (y_paper - y_up.double()).abs().max().item()
    assert gap > 1e-3 * scale, f"paper vs released kernel differ by only {gap:.3g} (scale {scale:.3g})"
