// Bindings of the small-batch matrix-vector products of include/rwkv_mm/gemv.h (one-token decode):
//   gemv_t(x [B, K], wt [K, N])              fp32, wt row-major (= the column-major weight's W.t())
//   gemv_packed(x [B, K], packed, scale [N]) int8 or bf16 weights packed [ceil(N/64), ceil(K/2), 64, 2]
// x float32; results float32 [B, N]. The layouts and the arithmetic are described in the header.
#include <torch/extension.h>

#include "rwkv_mm/gemv.h"

namespace {

using namespace rwkv_mm::gemv;

torch::Tensor gemv_t(torch::Tensor x, torch::Tensor wt) {
  TORCH_CHECK(x.device().is_cpu() && wt.device().is_cpu(), "gemv: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && wt.scalar_type() == torch::kFloat32, "gemv: float32 only");
  TORCH_CHECK(x.dim() == 2 && wt.dim() == 2 && x.size(1) == wt.size(0), "gemv: x [B, K] and wt [K, N]");
  TORCH_CHECK(x.size(0) >= 1, "gemv: empty batch");
  TORCH_CHECK(wt.is_contiguous(), "gemv: wt must be row-major contiguous");
  x = x.contiguous();
  const int64_t B = x.size(0), K = x.size(1), N = wt.size(1);
  auto y = torch::empty({B, N}, x.options());
  if (B <= kMaxBatch)
    f32_gemv(x.data_ptr<float>(), B, K, wt.data_ptr<float>(), N, y.data_ptr<float>(), at::get_num_threads());
  else
    f32_gemm(x.data_ptr<float>(), B, K, wt.data_ptr<float>(), N, y.data_ptr<float>(), at::get_num_threads());
  return y;
}

torch::Tensor gemv_packed(torch::Tensor x, torch::Tensor packed, torch::Tensor scale) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu() && scale.device().is_cpu(),
              "gemv_packed: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && scale.scalar_type() == torch::kFloat32,
              "gemv_packed: x and scale must be float32");
  const bool int8 = packed.scalar_type() == torch::kInt8;
  TORCH_CHECK(int8 || packed.scalar_type() == torch::kBFloat16, "gemv_packed: packed must be int8 or bfloat16, got ",
              packed.scalar_type());
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1, "gemv_packed: x must be [B, K], got ", x.sizes());
  const int64_t B = x.size(0), K = x.size(1), N = scale.numel();
  TORCH_CHECK(scale.dim() == 1 && scale.is_contiguous(), "gemv_packed: scale must be a contiguous [N]");
  TORCH_CHECK(packed.is_contiguous() && packed.dim() == 4 && packed.size(0) == tiles_of(N) &&
                  packed.size(1) == pairs_of(K) && packed.size(2) == kTile && packed.size(3) == 2,
              "gemv_packed: packed must be [ceil(N/64), ceil(K/2), 64, 2] = [", tiles_of(N), ", ", pairs_of(K),
              ", 64, 2], got ", packed.sizes());
  x = x.contiguous();
  auto y = torch::empty({B, N}, x.options());
  const int threads = at::get_num_threads();
  if (int8)
    packed_gemv<true>(x.data_ptr<float>(), B, K, packed.data_ptr(), scale.data_ptr<float>(), N,
                      y.data_ptr<float>(), threads);
  else
    packed_gemv<false>(x.data_ptr<float>(), B, K, packed.data_ptr(), scale.data_ptr<float>(), N,
                       y.data_ptr<float>(), threads);
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_t", &gemv_t, "y[B, N] = x[B, K] @ wt[K, N], fp32, wt row-major");
  m.def("gemv_packed", &gemv_packed, "y[B, N] = x[B, K] @ W^T, W packed int8 (with scales) or bf16");
}
