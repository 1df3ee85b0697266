// RWKV-5/6 WKV on the CPU: OpenMP over (batch, head), the per-row steps of include/rwkv_mm/wkv6.h.
//
// Tensors (contiguous, all of the compute dtype F = float or double; the Python glue converts):
//   r, k, v, y and their gradients: [B, T, H, N]
//   w (log decay): [B, T, H, N] (RWKV-6) or [H, N] (RWKV-5, read with zero batch and token strides);
//     its gradient is always [B, T, H, N] (the glue sums it for RWKV-5)
//   u: [H, N]; its gradient per batch: [B, H, N] (the glue sums over B)
//   states and their gradients: [B, H, N, N] (value i, key j)
//   checkpoints: [B, H, S, N, N], S = ceil(T / kSegment), entry s = the state entering token s * kSegment
// The backward recomputes each segment's states from its checkpoint, then walks it backwards.
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "rwkv_mm/wkv6.h"

namespace {

using namespace rwkv_mm::wkv6;

struct Shape {
  int64_t B, T, H, N;
  int64_t w_batch, w_token;  // strides of ew in elements: (T H N, H N), or (0, 0) for an [H, N] decay
  // Offset of the N-vector of (batch b, token t, head h) in a [B, T, H, N] tensor.
  int64_t at(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * N; }
  int64_t at_w(int64_t b, int64_t t, int64_t h) const { return b * w_batch + t * w_token + h * N; }
};

template <int N, typename F>
void forward_cpu(const Shape& d, const F* r, const F* ew, const F* k, const F* v, const F* u, const F* s0, F* y,
                 F* s_out, F* ckpt, int threads) {
  const int n = static_cast<int>(d.N);
  const int64_t nn = d.N * d.N, segments = num_segments(static_cast<int>(d.T));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t bh = 0; bh < d.B * d.H; ++bh) {
    const int64_t bi = bh / d.H, h = bh % d.H;
    F* S = s_out + bh * nn;  // the running state, [N, N]
    std::memcpy(S, s0 + bh * nn, nn * sizeof(F));
    std::vector<F> uk(d.N);  // u ⊙ k of the current token
    for (int64_t t = 0; t < d.T; ++t) {
      if (ckpt != nullptr && t % kSegment == 0)
        std::memcpy(ckpt + (bh * segments + t / kSegment) * nn, S, nn * sizeof(F));
      const int64_t o = d.at(bi, t, h);
      const F* ew_t = ew + d.at_w(bi, t, h);
      for (int j = 0; j < n; ++j) uk[j] = u[h * n + j] * k[o + j];
      for (int i = 0; i < n; ++i)
        y[o + i] = forward_row<N>(S + i * n, S + i * n, r + o, ew_t, k + o, uk.data(), v[o + i], n);
    }
  }
}

template <int N, typename F>
void backward_cpu(const Shape& d, const F* r, const F* ew, const F* k, const F* v, const F* u, const F* ckpt,
                  const F* dy, const F* ds_last, F* dr, F* dw, F* dk, F* dv, F* du, F* ds_first, int threads) {
  const int n = static_cast<int>(d.N);
  const int64_t nn = d.N * d.N, segments = num_segments(static_cast<int>(d.T));
#pragma omp parallel num_threads(threads)
  {
    std::vector<F> states(kSegment * nn);  // states[s] = the state after token t0 + s - 1 (entering t0 + s)
    std::vector<F> ds_buf(nn), uk(d.N);
    F* ds = ds_buf.data();  // dL/dS of the state after the current token
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < d.B * d.H; ++bh) {
      const int64_t bi = bh / d.H, h = bh % d.H;
      const F* u_h = u + h * n;
      F* du_bh = du + bh * n;
      std::fill(du_bh, du_bh + n, F(0));
      std::memcpy(ds, ds_last + bh * nn, nn * sizeof(F));
      for (int64_t seg = segments - 1; seg >= 0; --seg) {
        const int64_t t0 = seg * kSegment, t1 = std::min<int64_t>(d.T, t0 + kSegment);
        // recompute the states entering the segment's tokens from its checkpoint
        std::memcpy(states.data(), ckpt + (bh * segments + seg) * nn, nn * sizeof(F));
        for (int64_t t = t0; t < t1 - 1; ++t) {
          const int64_t o = d.at(bi, t, h);
          const F* s_in = states.data() + (t - t0) * nn;
          F* s_out = states.data() + (t - t0 + 1) * nn;
          for (int i = 0; i < n; ++i)
            update_row<N>(s_in + i * n, s_out + i * n, ew + d.at_w(bi, t, h), k + o, v[o + i], n);
        }
        // walk the segment backwards
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t o = d.at(bi, t, h);
          const F* ew_t = ew + d.at_w(bi, t, h);
          const F* s_prev = states.data() + (t - t0) * nn;
          for (int j = 0; j < n; ++j) uk[j] = u_h[j] * k[o + j];
          const F dyv = dot<N>(dy + o, v + o, n);
          for (int i = 0; i < n; ++i)
            dv[o + i] = backward_row<N>(ds + i * n, dy[o + i], r + o, k + o, uk.data(), n);
          F *dr_t = dr + o, *dk_t = dk + o, *dw_t = dw + o;
          std::fill(dr_t, dr_t + n, F(0));
          std::fill(dk_t, dk_t + n, F(0));
          std::fill(dw_t, dw_t + n, F(0));
          const F* r_t = r + o;
          for (int i = 0; i < n; ++i) {
            const RowScalars<F> row{v[o + i], dy[o + i]};
            F* ds_i = ds + i * n;
            const F* sp = s_prev + i * n;
            RWKV_MM_VECTOR_LOOP
            for (int j = 0; j < extent<N>(n); ++j)
              backward_element(ds_i[j], sp[j], row, ew_t[j], r_t[j], dr_t[j], dk_t[j], dw_t[j]);
          }
          for (int j = 0; j < n; ++j)
            finish_column(dr_t[j], dk_t[j], dw_t[j], du_bh[j], r_t[j], ew_t[j], k[o + j], u_h[j], dyv);
        }
      }
      std::memcpy(ds_first + bh * nn, ds, nn * sizeof(F));
    }
  }
}

void check_inputs(const std::vector<torch::Tensor>& xs, const torch::Tensor& like) {
  for (const auto& x : xs) {
    TORCH_CHECK(x.device().is_cpu(), "wkv6 cpp kernel: expected CPU tensors, got ", x.device());
    TORCH_CHECK(x.scalar_type() == like.scalar_type(), "wkv6 cpp kernel: expected ", like.scalar_type(),
                " tensors, got ", x.scalar_type());
    TORCH_CHECK(x.is_contiguous(), "wkv6 cpp kernel: expected contiguous tensors");
  }
}

Shape shape_of(const torch::Tensor& r, const torch::Tensor& w, const torch::Tensor& u) {
  TORCH_CHECK(r.dim() == 4, "wkv6 cpp kernel: r must be [B, T, H, N], got ", r.sizes());
  const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
  TORCH_CHECK(u.dim() == 2 && u.size(0) == H && u.size(1) == N, "wkv6: u must be [H, N]");
  if (w.dim() == 2) {
    TORCH_CHECK(w.size(0) == H && w.size(1) == N, "wkv6: w must be [B, T, H, N] or [H, N]");
    return {B, T, H, N, 0, 0};
  }
  TORCH_CHECK(w.sizes() == r.sizes(), "wkv6: w must be [B, T, H, N] or [H, N]");
  return {B, T, H, N, T * H * N, H * N};
}

// forward(r, w, k, v, u, s0, save_checkpoints) -> [y, final state, checkpoints (empty unless saved)]
std::vector<torch::Tensor> forward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor u, torch::Tensor s0, bool save_checkpoints) {
  const Shape d = shape_of(r, w, u);
  check_inputs({r, w, k, v, u, s0}, r);
  for (const auto& x : {k, v}) TORCH_CHECK(x.sizes() == r.sizes(), "wkv6: shape mismatch");
  TORCH_CHECK(s0.numel() == d.B * d.H * d.N * d.N, "wkv6: state must be [B, H, N, N]");
  const torch::Tensor ew = w.exp();
  torch::Tensor y = torch::empty_like(r), s_out = torch::empty_like(s0);
  torch::Tensor ckpt = save_checkpoints ? r.new_empty({d.B, d.H, num_segments(d.T), d.N, d.N}) : r.new_empty({0});
  const int threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "wkv6_forward_cpu", [&] {
    const auto p = [](const torch::Tensor& x) { return x.data_ptr<scalar_t>(); };
    scalar_t* ck = save_checkpoints ? p(ckpt) : nullptr;
    if (d.N == 64)
      forward_cpu<64>(d, p(r), p(ew), p(k), p(v), p(u), p(s0), p(y), p(s_out), ck, threads);
    else
      forward_cpu<0>(d, p(r), p(ew), p(k), p(v), p(u), p(s0), p(y), p(s_out), ck, threads);
  });
  return {y, s_out, ckpt};
}

// backward(r, w, k, v, u, checkpoints, dy, d final state) -> [dr, dw, dk, dv, du per batch, d initial state]
std::vector<torch::Tensor> backward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor u, torch::Tensor ckpt, torch::Tensor dy, torch::Tensor ds_last) {
  const Shape d = shape_of(r, w, u);
  check_inputs({r, w, k, v, u, ckpt, dy, ds_last}, r);
  for (const auto& x : {k, v, dy}) TORCH_CHECK(x.sizes() == r.sizes(), "wkv6: shape mismatch");
  TORCH_CHECK(ckpt.numel() == d.B * d.H * num_segments(d.T) * d.N * d.N, "wkv6: checkpoints have the wrong size");
  TORCH_CHECK(ds_last.numel() == d.B * d.H * d.N * d.N, "wkv6: state gradient must be [B, H, N, N]");
  const torch::Tensor ew = w.exp();
  torch::Tensor dr = torch::empty_like(r), dw = torch::empty_like(r), dk = torch::empty_like(r);
  torch::Tensor dv = torch::empty_like(r), du = r.new_empty({d.B, d.H, d.N});
  torch::Tensor ds_first = torch::empty_like(ds_last);
  const int threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "wkv6_backward_cpu", [&] {
    const auto p = [](const torch::Tensor& x) { return x.data_ptr<scalar_t>(); };
    if (d.N == 64)
      backward_cpu<64>(d, p(r), p(ew), p(k), p(v), p(u), p(ckpt), p(dy), p(ds_last), p(dr), p(dw), p(dk), p(dv),
                       p(du), p(ds_first), threads);
    else
      backward_cpu<0>(d, p(r), p(ew), p(k), p(v), p(u), p(ckpt), p(dy), p(ds_last), p(dr), p(dw), p(dk), p(dv),
                      p(du), p(ds_first), threads);
  });
  return {dr, dw, dk, dv, du, ds_first};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "RWKV-5/6 WKV, C++ CPU kernel (fp32 / fp64), forward with state in/out and backward";
  m.def("forward", &forward, "wkv6 forward: (r, w, k, v, u, s0, save_checkpoints) -> [y, state, checkpoints]");
  m.def("backward", &backward, "wkv6 backward: (r, w, k, v, u, checkpoints, dy, dstate) -> grads + dstate0");
}
