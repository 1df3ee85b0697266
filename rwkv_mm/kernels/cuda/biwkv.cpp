// Torch bindings of the Bi-WKV CUDA kernels (cuda/biwkv.cu): checks, allocation, the stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <vector>

int64_t rwkv_mm_biwkv_scratch_floats(bool backward, int64_t B, int64_t T, int64_t C);
cudaError_t rwkv_mm_biwkv_forward_cuda(int dtype, bool official, int64_t B, int64_t T, int64_t C, const float* w,
                                       const float* u, const void* k, const void* v, void* y, float* ends,
                                       cudaStream_t stream);
cudaError_t rwkv_mm_biwkv_backward_cuda(int dtype, bool official, int64_t B, int64_t T, int64_t C, const float* w,
                                        const float* u, const void* k, const void* v, const void* gy, float* gk,
                                        float* gv, float* gw, float* gu, float* rows, cudaStream_t stream);

namespace {

int dtype_code(const torch::Tensor& k) {
  switch (k.scalar_type()) {
    case torch::kFloat32:
      return 0;
    case torch::kFloat16:
      return 1;
    case torch::kBFloat16:
      return 2;
    default:
      TORCH_CHECK(false, "k must be float32, float16 or bfloat16, got ", k.scalar_type());
  }
  return 0;
}

void check(const torch::Tensor& x, const char* name, const torch::Tensor& k, bool like_k, int64_t dims) {
  TORCH_CHECK(x.is_cuda() && x.device() == k.device(), name, " must be on k's CUDA device");
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(x.dim() == dims, name, " must be ", dims, "-D, got ", x.dim(), "-D");
  const auto dtype = like_k ? k.scalar_type() : torch::kFloat32;
  TORCH_CHECK(x.scalar_type() == dtype, name, " must be ", dtype, ", got ", x.scalar_type());
}

void check_all(const torch::Tensor& w, const torch::Tensor& u, const torch::Tensor& k, const torch::Tensor& v) {
  check(k, "k", k, true, 3);
  check(v, "v", k, true, 3);
  check(w, "w", k, false, 1);
  check(u, "u", k, false, 1);
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape");
  TORCH_CHECK(w.size(0) == k.size(2) && u.size(0) == k.size(2), "w and u must be [C]");
  TORCH_CHECK(k.size(1) < (int64_t{1} << 24), "T must be below 2^24 (token indices are kept in float32)");
}

torch::Tensor scratch(const torch::Tensor& k, bool backward) {
  return torch::empty({rwkv_mm_biwkv_scratch_floats(backward, k.size(0), k.size(1), k.size(2))},
                      k.options().dtype(torch::kFloat32));
}

void check_launch(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "biwkv CUDA kernel: ", cudaGetErrorString(err)); }

// forward(w [C], u [C], k [B, T, C], v [B, T, C], official) -> y [B, T, C] in k's dtype
torch::Tensor forward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v, bool official) {
  check_all(w, u, k, v);
  const c10::cuda::CUDAGuard guard(k.device());
  auto y = torch::empty_like(k);
  auto ends = scratch(k, false);
  check_launch(rwkv_mm_biwkv_forward_cuda(dtype_code(k), official, k.size(0), k.size(1), k.size(2),
                                          w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(), v.data_ptr(),
                                          y.data_ptr(), ends.data_ptr<float>(),
                                          c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

// backward(w, u, k, v, gy, official) -> (gw [B, C], gu [B, C], gk, gv); gw, gu per batch row; gk, gv float32
std::vector<torch::Tensor> backward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor gy, bool official) {
  check_all(w, u, k, v);
  check(gy, "gy", k, true, 3);
  TORCH_CHECK(gy.sizes() == k.sizes(), "gy must have k's shape");
  const c10::cuda::CUDAGuard guard(k.device());
  const auto f32 = k.options().dtype(torch::kFloat32);
  auto gk = torch::zeros(k.sizes(), f32), gv = torch::empty(k.sizes(), f32);
  auto gw = torch::empty({k.size(0), k.size(2)}, f32), gu = torch::empty({k.size(0), k.size(2)}, f32);
  auto rows = scratch(k, true);
  check_launch(rwkv_mm_biwkv_backward_cuda(dtype_code(k), official, k.size(0), k.size(1), k.size(2),
                                           w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(), v.data_ptr(),
                                           gy.data_ptr(), gk.data_ptr<float>(), gv.data_ptr<float>(),
                                           gw.data_ptr<float>(), gu.data_ptr<float>(), rows.data_ptr<float>(),
                                           c10::cuda::getCurrentCUDAStream().stream()));
  return {gw, gu, gk, gv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Vision-RWKV Bi-WKV, CUDA kernels (forward: token segments in parallel; backward: one thread per batch x channel)";
  m.def("forward", &forward, "biwkv forward: (w, u, k, v, official) -> y");
  m.def("backward", &backward, "biwkv backward: (w, u, k, v, gy, official) -> (gw[B,C], gu[B,C], gk, gv)");
}
