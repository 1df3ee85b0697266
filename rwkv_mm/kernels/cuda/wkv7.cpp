// Torch bindings of the RWKV-7 CUDA kernel (cuda/wkv7.cu, which has no torch headers).
// Checks devices, dtypes and shapes, allocates outputs and calls the launchers on the current stream.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <vector>

#include "rwkv_mm/wkv7.h"

const char* wkv7_cuda_forward(int dtype, int B, int T, int H, int n, const void* r, const void* w, const void* k,
                              const void* v, const void* a, const void* b, const void* s0, void* y, void* s_out,
                              void* ckpt, void* stream);
const char* wkv7_cuda_backward(int dtype, int B, int T, int H, int n, const void* r, const void* w, const void* k,
                               const void* v, const void* a, const void* b, const void* ckpt, const void* dy,
                               const void* ds_last, void* dr, void* dw, void* dk, void* dv, void* da, void* db,
                               void* ds_first, void* scratch, void* stream);

namespace {

using rwkv_mm::wkv7::kSegment;
using rwkv_mm::wkv7::num_segments;

// The launchers' dtype code of the token inputs r, k, v, a, b.
int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    case at::kDouble: return 3;
    default: TORCH_CHECK(false, "wkv7 cuda kernel: unsupported dtype ", t);
  }
  return -1;
}

// float64 for float64 inputs, else float32: the dtype of w, states, dy and gradients.
at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check(const torch::Tensor& x, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
           const torch::Tensor& like) {
  TORCH_CHECK(x.device() == like.device(), "wkv7 cuda kernel: ", name, " is on ", x.device(), ", expected ",
              like.device());
  TORCH_CHECK(x.scalar_type() == dtype, "wkv7 cuda kernel: ", name, " has dtype ", x.scalar_type(), ", expected ",
              dtype);
  TORCH_CHECK(x.sizes() == shape, "wkv7 cuda kernel: ", name, " has shape ", x.sizes(), ", expected ", shape);
  TORCH_CHECK(x.is_contiguous(), "wkv7 cuda kernel: ", name, " must be contiguous");
}

void check_tokens(const torch::Tensor& r, const std::vector<torch::Tensor>& xs, const char* names) {
  TORCH_CHECK(r.is_cuda(), "wkv7 cuda kernel: expected CUDA tensors, got ", r.device());
  TORCH_CHECK(r.dim() == 4, "wkv7 cuda kernel: r must be [B, T, H, N], got ", r.sizes());
  TORCH_CHECK(r.size(3) <= 1024, "wkv7 cuda kernel: head size ", r.size(3), " > 1024");
  for (const auto& x : xs) check(x, names, r.scalar_type(), r.sizes(), r);
}

// forward(r, w, k, v, a, b, s0, save_checkpoints) -> [y, final state, checkpoints (empty unless saved)]
std::vector<torch::Tensor> forward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor a, torch::Tensor b, torch::Tensor s0, bool save_checkpoints) {
  check_tokens(r, {r, k, v, a, b}, "r, k, v, a, b");
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const at::ScalarType f = compute_dtype(r.scalar_type());
  check(w, "w", f, r.sizes(), r);
  check(s0, "state", f, {B, H, N, N}, r);
  const c10::cuda::CUDAGuard guard(r.device());
  torch::Tensor y = torch::empty_like(r), s_out = torch::empty_like(s0);
  torch::Tensor ckpt = save_checkpoints ? s0.new_empty({B, H, num_segments(T), N, N}) : s0.new_empty({0});
  const char* err = wkv7_cuda_forward(dtype_code(r.scalar_type()), B, T, H, N, r.data_ptr(), w.data_ptr(),
                                      k.data_ptr(), v.data_ptr(), a.data_ptr(), b.data_ptr(), s0.data_ptr(),
                                      y.data_ptr(), s_out.data_ptr(), save_checkpoints ? ckpt.data_ptr() : nullptr,
                                      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "wkv7 cuda forward failed: ", err);
  return {y, s_out, ckpt};
}

// backward(r, w, k, v, a, b, checkpoints, dy, d final state) -> [dr, dw, dk, dv, da, db, d initial state]
std::vector<torch::Tensor> backward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor a, torch::Tensor b, torch::Tensor ckpt, torch::Tensor dy,
                                    torch::Tensor ds_last) {
  check_tokens(r, {r, k, v, a, b}, "r, k, v, a, b");
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  const at::ScalarType f = compute_dtype(r.scalar_type());
  check(w, "w", f, r.sizes(), r);
  check(dy, "dy", f, r.sizes(), r);
  check(ckpt, "checkpoints", f, {B, H, num_segments(T), N, N}, r);
  check(ds_last, "state gradient", f, {B, H, N, N}, r);
  const c10::cuda::CUDAGuard guard(r.device());
  const auto opts = w.options();
  torch::Tensor dr = torch::empty_like(w), dw = torch::empty_like(w), dk = torch::empty_like(w);
  torch::Tensor dv = torch::empty_like(w), da = torch::empty_like(w), db = torch::empty_like(w);
  torch::Tensor ds_first = torch::empty_like(ds_last);
  torch::Tensor scratch = torch::empty({B * H, kSegment + 1, N, N}, opts);
  const char* err = wkv7_cuda_backward(
      dtype_code(r.scalar_type()), B, T, H, N, r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(), a.data_ptr(),
      b.data_ptr(), ckpt.data_ptr(), dy.data_ptr(), ds_last.data_ptr(), dr.data_ptr(), dw.data_ptr(), dk.data_ptr(),
      dv.data_ptr(), da.data_ptr(), db.data_ptr(), ds_first.data_ptr(), scratch.data_ptr(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "wkv7 cuda backward failed: ", err);
  return {dr, dw, dk, dv, da, db, ds_first};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "RWKV-7 WKV, CUDA kernel (fp32 / bf16 / fp16 in, fp32 math; fp64), forward with state in/out and backward";
  m.def("forward", &forward, "wkv7 forward: (r, w, k, v, a, b, s0, save_checkpoints) -> [y, state, checkpoints]");
  m.def("backward", &backward, "wkv7 backward: (r, w, k, v, a, b, checkpoints, dy, dstate) -> grads + dstate0");
}
