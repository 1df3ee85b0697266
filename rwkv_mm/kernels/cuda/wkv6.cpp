// Torch bindings of the RWKV-5/6 CUDA kernel (cuda/wkv6.cu, which has no torch headers).
// Checks devices, dtypes and shapes, allocates outputs and calls the launchers on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <vector>

#include "rwkv_mm/wkv6.h"

const char* wkv6_cuda_forward(int dtype, int B, int T, int H, int n, long long w_batch, long long w_token,
                              const void* r, const void* w, const void* k, const void* v, const void* u,
                              const void* s0, void* y, void* s_out, void* ckpt, void* stream);
const char* wkv6_cuda_backward(int dtype, int B, int T, int H, int n, long long w_batch, long long w_token,
                               const void* r, const void* w, const void* k, const void* v, const void* u,
                               const void* ckpt, const void* dy, const void* ds_last, void* dr, void* dw, void* dk,
                               void* dv, void* du, void* ds_first, void* scratch, void* stream);

namespace {

using rwkv_mm::wkv6::kSegment;
using rwkv_mm::wkv6::num_segments;

// The launchers' dtype code of the token inputs r, k, v.
int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    case at::kDouble: return 3;
    default: TORCH_CHECK(false, "wkv6 cuda kernel: unsupported dtype ", t);
  }
  return -1;
}

// float64 for float64 inputs, else float32: the dtype of w, u, states, dy and gradients.
at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check(const torch::Tensor& x, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
           const torch::Tensor& like) {
  TORCH_CHECK(x.device() == like.device(), "wkv6 cuda kernel: ", name, " is on ", x.device(), ", expected ",
              like.device());
  TORCH_CHECK(x.scalar_type() == dtype, "wkv6 cuda kernel: ", name, " has dtype ", x.scalar_type(), ", expected ",
              dtype);
  TORCH_CHECK(x.sizes() == shape, "wkv6 cuda kernel: ", name, " has shape ", x.sizes(), ", expected ", shape);
  TORCH_CHECK(x.is_contiguous(), "wkv6 cuda kernel: ", name, " must be contiguous");
}

struct Dims {
  int64_t B, T, H, N, w_batch, w_token;
};

// Checks r, k, v, w, u; returns the sizes and the decay's batch and token strides.
Dims check_inputs(const torch::Tensor& r, const torch::Tensor& w, const torch::Tensor& k, const torch::Tensor& v,
                  const torch::Tensor& u) {
  TORCH_CHECK(r.is_cuda(), "wkv6 cuda kernel: expected CUDA tensors, got ", r.device());
  TORCH_CHECK(r.dim() == 4, "wkv6 cuda kernel: r must be [B, T, H, N], got ", r.sizes());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  TORCH_CHECK(N <= 1024, "wkv6 cuda kernel: head size ", N, " > 1024");
  check(k, "k", r.scalar_type(), r.sizes(), r);
  check(v, "v", r.scalar_type(), r.sizes(), r);
  const at::ScalarType f = compute_dtype(r.scalar_type());
  check(u, "u", f, {H, N}, r);
  if (w.dim() == 2) {
    check(w, "w", f, {H, N}, r);
    return {B, T, H, N, 0, 0};
  }
  check(w, "w", f, r.sizes(), r);
  return {B, T, H, N, T * H * N, H * N};
}

// forward(r, w, k, v, u, s0, save_checkpoints) -> [y, final state, checkpoints (empty unless saved)]
std::vector<torch::Tensor> forward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor u, torch::Tensor s0, bool save_checkpoints) {
  const Dims d = check_inputs(r, w, k, v, u);
  check(s0, "state", u.scalar_type(), {d.B, d.H, d.N, d.N}, r);
  const c10::cuda::CUDAGuard guard(r.device());
  torch::Tensor y = torch::empty_like(r), s_out = torch::empty_like(s0);
  torch::Tensor ckpt =
      save_checkpoints ? s0.new_empty({d.B, d.H, num_segments(d.T), d.N, d.N}) : s0.new_empty({0});
  const char* err = wkv6_cuda_forward(dtype_code(r.scalar_type()), d.B, d.T, d.H, d.N, d.w_batch, d.w_token,
                                      r.data_ptr(), w.data_ptr(), k.data_ptr(), v.data_ptr(), u.data_ptr(),
                                      s0.data_ptr(), y.data_ptr(), s_out.data_ptr(),
                                      save_checkpoints ? ckpt.data_ptr() : nullptr,
                                      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "wkv6 cuda forward failed: ", err);
  return {y, s_out, ckpt};
}

// backward(r, w, k, v, u, checkpoints, dy, d final state) -> [dr, dw, dk, dv, du per batch, d initial state]
std::vector<torch::Tensor> backward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor u, torch::Tensor ckpt, torch::Tensor dy, torch::Tensor ds_last) {
  const Dims d = check_inputs(r, w, k, v, u);
  const at::ScalarType f = u.scalar_type();
  check(dy, "dy", f, r.sizes(), r);
  check(ckpt, "checkpoints", f, {d.B, d.H, num_segments(d.T), d.N, d.N}, r);
  check(ds_last, "state gradient", f, {d.B, d.H, d.N, d.N}, r);
  const c10::cuda::CUDAGuard guard(r.device());
  torch::Tensor dr = torch::empty_like(dy), dw = torch::empty_like(dy), dk = torch::empty_like(dy);
  torch::Tensor dv = torch::empty_like(dy), du = dy.new_empty({d.B, d.H, d.N});
  torch::Tensor ds_first = torch::empty_like(ds_last);
  torch::Tensor scratch = dy.new_empty({d.B * d.H, kSegment, d.N, d.N});
  const char* err = wkv6_cuda_backward(
      dtype_code(r.scalar_type()), d.B, d.T, d.H, d.N, d.w_batch, d.w_token, r.data_ptr(), w.data_ptr(),
      k.data_ptr(), v.data_ptr(), u.data_ptr(), ckpt.data_ptr(), dy.data_ptr(), ds_last.data_ptr(), dr.data_ptr(),
      dw.data_ptr(), dk.data_ptr(), dv.data_ptr(), du.data_ptr(), ds_first.data_ptr(), scratch.data_ptr(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "wkv6 cuda backward failed: ", err);
  return {dr, dw, dk, dv, du, ds_first};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "RWKV-5/6 WKV, CUDA kernel (fp32 / bf16 / fp16 in, fp32 math; fp64), forward with state in/out and backward";
  m.def("forward", &forward, "wkv6 forward: (r, w, k, v, u, s0, save_checkpoints) -> [y, state, checkpoints]");
  m.def("backward", &backward, "wkv6 backward: (r, w, k, v, u, checkpoints, dy, dstate) -> grads + dstate0");
}
