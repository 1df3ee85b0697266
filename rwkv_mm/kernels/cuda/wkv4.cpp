// Torch bindings of the RWKV-4 WKV CUDA kernels (cuda/wkv4.cu): checks, allocation, the stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/extension.h>

#include <vector>

cudaError_t rwkv_mm_wkv4_forward_cuda(int dtype, int64_t B, int64_t T, int64_t C, const float* w, const float* u,
                                      const void* k, const void* v, void* y, float* num, float* den, float* mx,
                                      cudaStream_t stream);
cudaError_t rwkv_mm_wkv4_backward_cuda(int dtype, int64_t B, int64_t T, int64_t C, const float* w, const float* u,
                                       const void* k, const void* v, const float* num0, const float* den0,
                                       const float* mx0, const void* gy, void* gk, void* gv, float* gw, float* gu,
                                       float* gn, float* gd, float* go, float* states, cudaStream_t stream);

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

void check_all(const torch::Tensor& w, const torch::Tensor& u, const torch::Tensor& k, const torch::Tensor& v,
               std::initializer_list<torch::Tensor> states) {
  check(k, "k", k, true, 3);
  check(v, "v", k, true, 3);
  check(w, "w", k, false, 1);
  check(u, "u", k, false, 1);
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape");
  TORCH_CHECK(w.size(0) == k.size(2) && u.size(0) == k.size(2), "w and u must be [C]");
  TORCH_CHECK(k.size(1) < (int64_t{1} << 24), "T must be below 2^24 (decay steps are counted in float32)");
  for (const auto& s : states) {
    check(s, "a state tensor", k, false, 2);
    TORCH_CHECK(s.size(0) == k.size(0) && s.size(1) == k.size(2), "state tensors must be [B, C]");
  }
}

void check_launch(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "wkv4 CUDA kernel: ", cudaGetErrorString(err)); }

// forward(w [C], u [C], k [B, T, C], v [B, T, C], num, den, max [B, C]) -> (y, num, den, max)
std::vector<torch::Tensor> forward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor num, torch::Tensor den, torch::Tensor mx) {
  check_all(w, u, k, v, {num, den, mx});
  const c10::cuda::CUDAGuard guard(k.device());
  auto y = torch::empty_like(k);
  auto num1 = num.clone(), den1 = den.clone(), mx1 = mx.clone();
  check_launch(rwkv_mm_wkv4_forward_cuda(dtype_code(k), k.size(0), k.size(1), k.size(2), w.data_ptr<float>(),
                                         u.data_ptr<float>(), k.data_ptr(), v.data_ptr(), y.data_ptr(),
                                         num1.data_ptr<float>(), den1.data_ptr<float>(), mx1.data_ptr<float>(),
                                         c10::cuda::getCurrentCUDAStream().stream()));
  return {y, num1, den1, mx1};
}

// backward(w, u, k, v, num0, den0, max0, gy, g_num, g_den, g_max)
//   -> (gw [B, C], gu [B, C], gk, gv, g_num0, g_den0, g_max0); gw, gu per batch row
std::vector<torch::Tensor> backward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor num0, torch::Tensor den0, torch::Tensor mx0, torch::Tensor gy,
                                    torch::Tensor gnum, torch::Tensor gden, torch::Tensor gmx) {
  check_all(w, u, k, v, {num0, den0, mx0, gnum, gden, gmx});
  check(gy, "gy", k, true, 3);
  TORCH_CHECK(gy.sizes() == k.sizes(), "gy must have k's shape");
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto gk = torch::empty_like(k), gv = torch::empty_like(k);
  auto gw = torch::empty_like(num0), gu = torch::empty_like(num0);
  auto gn = gnum.clone(), gd = gden.clone(), go = gmx.clone();
  auto states = torch::empty({3, B, T, C}, num0.options());
  check_launch(rwkv_mm_wkv4_backward_cuda(
      dtype_code(k), B, T, C, w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(), v.data_ptr(),
      num0.data_ptr<float>(), den0.data_ptr<float>(), mx0.data_ptr<float>(), gy.data_ptr(), gk.data_ptr(),
      gv.data_ptr(), gw.data_ptr<float>(), gu.data_ptr<float>(), gn.data_ptr<float>(), gd.data_ptr<float>(),
      go.data_ptr<float>(), states.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()));
  return {gw, gu, gk, gv, gn, gd, go};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "RWKV-4 WKV, CUDA kernel (one thread per batch x channel)";
  m.def("forward", &forward, "wkv4 forward: (w, u, k, v, num, den, max) -> (y, num, den, max)");
  m.def("backward", &backward,
        "wkv4 backward: (w, u, k, v, num0, den0, max0, gy, g_num, g_den, g_max) -> "
        "(gw[B,C], gu[B,C], gk, gv, g_num0, g_den0, g_max0)");
}
