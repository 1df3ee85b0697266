// RWKV-7 WKV on the CPU: OpenMP over (batch, head), the per-row steps of include/rwkv_mm/wkv7.h.
//
// Tensors (contiguous, all of the compute dtype F = float or double; the Python glue converts):
//   r, ew (= e^w), k, v, a, b, y, and their gradients: [B, T, H, N]
//   states and their gradients: [B, H, N, N] (value i, key j)
//   checkpoints: [B, H, S, N, N], S = ceil(T / kSegment), entry s = the state entering token s * kSegment
// The backward recomputes each segment's states (kSegment + 1 of them, ~270 KB per thread at N = 64,
// fp32) from its checkpoint, then walks the segment backwards (see the header for the equations).
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "rwkv_mm/wkv7.h"

namespace {

using namespace rwkv_mm::wkv7;

struct Shape {
  int64_t B, T, H, N;
  // Offset of the N-vector of (batch b, token t, head h) in a [B, T, H, N] tensor.
  int64_t at(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * N; }
};

template <int N, typename F>
void forward_cpu(const Shape& d, const F* r, const F* ew, const F* k, const F* v, const F* a, const F* b,
                 const F* s0, F* y, F* s_out, F* ckpt, int threads) {
  const int n = static_cast<int>(d.N);
  const int64_t nn = d.N * d.N, segments = num_segments(static_cast<int>(d.T));
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t bh = 0; bh < d.B * d.H; ++bh) {
    const int64_t bi = bh / d.H, h = bh % d.H;
    F* S = s_out + bh * nn;  // the running state, [N, N]
    std::memcpy(S, s0 + bh * nn, nn * sizeof(F));
    for (int64_t t = 0; t < d.T; ++t) {
      if (ckpt != nullptr && t % kSegment == 0)
        std::memcpy(ckpt + (bh * segments + t / kSegment) * nn, S, nn * sizeof(F));
      const int64_t o = d.at(bi, t, h);
      for (int i = 0; i < n; ++i)
        y[o + i] = forward_row<N>(S + i * n, S + i * n, r + o, ew + o, k + o, a + o, b + o, v[o + i], n);
    }
  }
}

template <int N, typename F>
void backward_cpu(const Shape& d, const F* r, const F* ew, const F* k, const F* v, const F* a, const F* b,
                  const F* ckpt, const F* dy, const F* ds_last, F* dr, F* dw, F* dk, F* dv, F* da, F* db,
                  F* ds_first, int threads) {
  const int n = static_cast<int>(d.N);
  const int64_t nn = d.N * d.N, segments = num_segments(static_cast<int>(d.T));
#pragma omp parallel num_threads(threads)
  {
    std::vector<F> states((kSegment + 1) * nn);  // states[s] = the state after token t0 + s - 1
    std::vector<F> sa_seg(kSegment * d.N);         // sa of each token of the segment
    std::vector<F> ds_buf(nn), dsa(d.N);
    F* ds = ds_buf.data();  // dL/dS of the state after the current token
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < d.B * d.H; ++bh) {
      const int64_t bi = bh / d.H, h = bh % d.H;
      std::memcpy(ds, ds_last + bh * nn, nn * sizeof(F));
      for (int64_t seg = segments - 1; seg >= 0; --seg) {
        const int64_t t0 = seg * kSegment, t1 = std::min<int64_t>(d.T, t0 + kSegment);
        // recompute the segment's states from its checkpoint
        std::memcpy(states.data(), ckpt + (bh * segments + seg) * nn, nn * sizeof(F));
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t o = d.at(bi, t, h);
          const F* s_in = states.data() + (t - t0) * nn;
          F* s_out = states.data() + (t - t0 + 1) * nn;
          for (int i = 0; i < n; ++i)
            sa_seg[(t - t0) * n + i] =
                update_row<N>(s_in + i * n, s_out + i * n, ew + o, k + o, a + o, b + o, v[o + i], n);
        }
        // walk the segment backwards
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const int64_t o = d.at(bi, t, h);
          const F* s_prev = states.data() + (t - t0) * nn;
          const F* s_cur = s_prev + nn;
          const F* sa = sa_seg.data() + (t - t0) * n;
          for (int i = 0; i < n; ++i) {
            const RowGrads<F> g = backward_row<N>(ds + i * n, dy[o + i], r + o, k + o, b + o, n);
            dv[o + i] = g.dv;
            dsa[i] = g.dsa;
          }
          F *dr_t = dr + o, *dk_t = dk + o, *db_t = db + o, *dw_t = dw + o, *da_t = da + o;
          std::fill(dr_t, dr_t + n, F(0));
          std::fill(dk_t, dk_t + n, F(0));
          std::fill(db_t, db_t + n, F(0));
          std::fill(dw_t, dw_t + n, F(0));
          std::fill(da_t, da_t + n, F(0));
          const F *ew_t = ew + o, *a_t = a + o;
          for (int i = 0; i < n; ++i) {
            const RowScalars<F> row{v[o + i], sa[i], dy[o + i], dsa[i]};
            F* ds_i = ds + i * n;
            const F *sp = s_prev + i * n, *sc = s_cur + i * n;
            RWKV_MM_VECTOR_LOOP
            for (int j = 0; j < extent<N>(n); ++j)
              backward_element(ds_i[j], sp[j], sc[j], row, ew_t[j], a_t[j], dr_t[j], dk_t[j], db_t[j], dw_t[j],
                               da_t[j]);
          }
          for (int j = 0; j < n; ++j) dw_t[j] = log_decay_grad(dw_t[j], ew_t[j]);
        }
      }
      std::memcpy(ds_first + bh * nn, ds, nn * sizeof(F));
    }
  }
}

void check_inputs(const std::vector<torch::Tensor>& xs, const torch::Tensor& like) {
  for (const auto& x : xs) {
    TORCH_CHECK(x.device().is_cpu(), "wkv7 cpp kernel: expected CPU tensors, got ", x.device());
    TORCH_CHECK(x.scalar_type() == like.scalar_type(), "wkv7 cpp kernel: expected ", like.scalar_type(),
                " tensors, got ", x.scalar_type());
    TORCH_CHECK(x.is_contiguous(), "wkv7 cpp kernel: expected contiguous tensors");
  }
}

Shape shape_of(const torch::Tensor& r) {
  TORCH_CHECK(r.dim() == 4, "wkv7 cpp kernel: r must be [B, T, H, N], got ", r.sizes());
  return {r.size(0), r.size(1), r.size(2), r.size(3)};
}

// forward(r, w, k, v, a, b, s0, save_checkpoints) -> [y, final state, checkpoints (empty unless saved)]
std::vector<torch::Tensor> forward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor a, torch::Tensor b, torch::Tensor s0, bool save_checkpoints) {
  const Shape d = shape_of(r);
  check_inputs({r, w, k, v, a, b, s0}, r);
  for (const auto& x : {w, k, v, a, b}) TORCH_CHECK(x.sizes() == r.sizes(), "wkv7: shape mismatch");
  TORCH_CHECK(s0.dim() == 4 && s0.size(0) == d.B && s0.size(1) == d.H && s0.size(2) == d.N && s0.size(3) == d.N,
              "wkv7: state must be [B, H, N, N]");
  const torch::Tensor ew = w.exp();
  torch::Tensor y = torch::empty_like(r), s_out = torch::empty_like(s0);
  torch::Tensor ckpt = save_checkpoints ? r.new_empty({d.B, d.H, num_segments(d.T), d.N, d.N}) : r.new_empty({0});
  const int threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "wkv7_forward_cpu", [&] {
    const auto p = [](const torch::Tensor& x) { return x.data_ptr<scalar_t>(); };
    scalar_t* ck = save_checkpoints ? p(ckpt) : nullptr;
    if (d.N == 64)
      forward_cpu<64>(d, p(r), p(ew), p(k), p(v), p(a), p(b), p(s0), p(y), p(s_out), ck, threads);
    else
      forward_cpu<0>(d, p(r), p(ew), p(k), p(v), p(a), p(b), p(s0), p(y), p(s_out), ck, threads);
  });
  return {y, s_out, ckpt};
}

// backward(r, w, k, v, a, b, checkpoints, dy, d final state) -> [dr, dw, dk, dv, da, db, d initial state]
std::vector<torch::Tensor> backward(torch::Tensor r, torch::Tensor w, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor a, torch::Tensor b, torch::Tensor ckpt, torch::Tensor dy,
                                    torch::Tensor ds_last) {
  const Shape d = shape_of(r);
  check_inputs({r, w, k, v, a, b, ckpt, dy, ds_last}, r);
  for (const auto& x : {w, k, v, a, b, dy}) TORCH_CHECK(x.sizes() == r.sizes(), "wkv7: shape mismatch");
  TORCH_CHECK(ckpt.numel() == d.B * d.H * num_segments(d.T) * d.N * d.N, "wkv7: checkpoints have the wrong size");
  TORCH_CHECK(ds_last.numel() == d.B * d.H * d.N * d.N, "wkv7: state gradient must be [B, H, N, N]");
  const torch::Tensor ew = w.exp();
  torch::Tensor dr = torch::empty_like(r), dw = torch::empty_like(r), dk = torch::empty_like(r);
  torch::Tensor dv = torch::empty_like(r), da = torch::empty_like(r), db = torch::empty_like(r);
  torch::Tensor ds_first = torch::empty_like(ds_last);
  const int threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "wkv7_backward_cpu", [&] {
    const auto p = [](const torch::Tensor& x) { return x.data_ptr<scalar_t>(); };
    if (d.N == 64)
      backward_cpu<64>(d, p(r), p(ew), p(k), p(v), p(a), p(b), p(ckpt), p(dy), p(ds_last), p(dr), p(dw), p(dk),
                       p(dv), p(da), p(db), p(ds_first), threads);
    else
      backward_cpu<0>(d, p(r), p(ew), p(k), p(v), p(a), p(b), p(ckpt), p(dy), p(ds_last), p(dr), p(dw), p(dk),
                      p(dv), p(da), p(db), p(ds_first), threads);
  });
  return {dr, dw, dk, dv, da, db, ds_first};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "RWKV-7 WKV, C++ CPU kernel (fp32 / fp64), forward with state in/out and backward";
  m.def("forward", &forward, "wkv7 forward: (r, w, k, v, a, b, s0, save_checkpoints) -> [y, state, checkpoints]");
  m.def("backward", &backward, "wkv7 backward: (r, w, k, v, a, b, checkpoints, dy, dstate) -> grads + dstate0");
}
