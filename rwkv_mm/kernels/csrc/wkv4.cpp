// RWKV-4 WKV on the CPU: forward and backward of `naive_wkv4` (rwkv_mm/core/reference.py).
//
// Layout: k, v, y [B, T, C] float32, contiguous (channels innermost); w, u [C]; the state
// (num, den, max) [B, C] float32. The work is cut into (batch, block of kBlock channels) jobs spread
// over OpenMP threads; a job walks the tokens in order and, per token, updates its kBlock channels in
// a lane loop the compiler vectorises (the per-channel steps are in include/rwkv_mm/wkv4.h). As in
// biwkv.cpp, lane loops run exactly kBlock times (the last block of C on zero-padded copies) and
// are kept rolled for the vectoriser (checked with -fopt-info-vec, GCC 12).
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "rwkv_mm/wkv4.h"

namespace {

using rwkv_mm::wkv4_backward_step;
using rwkv_mm::wkv4_output;
using rwkv_mm::wkv4_update;

constexpr int kBlock = 16;  // channels per job: one AVX-512 / two AVX2 vectors

struct Dims {
  int64_t B, T, C, blocks;
};

// A job's kBlock columns (channels c0 ...) of batch row b of a [B, T, C] tensor: in place for a full
// block, else a zero-padded copy (loaded for inputs, T = const float; written back by store() for
// outputs, T = float). Token t of lane c is at data()[t * stride() + c].
template <class T>
class Column {
 public:
  Column(T* x, Dims s, int64_t b, int64_t c0)
      : x_(x + b * s.T * s.C + c0), C_(s.C), T_(s.T), nc_(static_cast<int>(std::min<int64_t>(kBlock, s.C - c0))) {
    if (nc_ == kBlock) return;
    pad_.assign(static_cast<size_t>(T_) * kBlock, 0.0f);
    if constexpr (std::is_const_v<T>) {
      for (int64_t t = 0; t < T_; ++t) {
        for (int c = 0; c < nc_; ++c) pad_[t * kBlock + c] = x_[t * C_ + c];
      }
    }
  }
  T* data() { return nc_ == kBlock ? x_ : pad_.data(); }
  int64_t stride() const { return nc_ == kBlock ? C_ : kBlock; }
  void store() {
    static_assert(!std::is_const_v<T>, "store() is for output columns");
    if (nc_ == kBlock) return;
    for (int64_t t = 0; t < T_; ++t) {
      for (int c = 0; c < nc_; ++c) x_[t * C_ + c] = pad_[t * kBlock + c];
    }
  }

 private:
  T* x_;
  int64_t C_, T_;
  int nc_;
  std::vector<float> pad_;
};

// y [B, T, C]; the state in num, den, mx is the initial one on entry and the final one on return.
void forward_cpu(const float* w, const float* u, const float* k, const float* v, float* y, float* num,
                 float* den, float* mx, Dims s) {
#pragma omp parallel for schedule(static)
  for (int64_t job = 0; job < s.B * s.blocks; ++job) {
    const int64_t b = job / s.blocks, c0 = (job % s.blocks) * kBlock;
    const int nc = static_cast<int>(std::min<int64_t>(kBlock, s.C - c0));
    Column<const float> kc(k, s, b, c0), vc(v, s, b, c0);
    Column<float> yc(y, s, b, c0);
    const float *kp = kc.data(), *vp = vc.data();
    float* yp = yc.data();
    const int64_t stride = kc.stride();
    float wb[kBlock] = {}, ub[kBlock] = {}, n[kBlock] = {}, d[kBlock] = {}, base[kBlock], steps[kBlock] = {};
    for (int c = 0; c < kBlock; ++c) base[c] = rwkv_mm::WKV4_EMPTY_MAX;
    for (int c = 0; c < nc; ++c) {  // max = base + steps * w
      wb[c] = w[c0 + c];
      ub[c] = u[c0 + c];
      n[c] = num[b * s.C + c0 + c];
      d[c] = den[b * s.C + c0 + c];
      base[c] = mx[b * s.C + c0 + c];
    }
    for (int64_t t = 0; t < s.T; ++t) {
      const float* kt = kp + t * stride;
      const float* vt = vp + t * stride;
      float* yt = yp + t * stride;
#pragma GCC unroll 1
      for (int c = 0; c < kBlock; ++c) {
        yt[c] = wkv4_output(n[c], d[c], base[c] + steps[c] * wb[c], ub[c], kt[c], vt[c]);
        wkv4_update(n[c], d[c], base[c], steps[c], wb[c], kt[c], vt[c]);
      }
    }
    yc.store();
    for (int c = 0; c < nc; ++c) {
      num[b * s.C + c0 + c] = n[c];
      den[b * s.C + c0 + c] = d[c];
      mx[b * s.C + c0 + c] = base[c] + steps[c] * wb[c];
    }
  }
}

// One token of the backward pass over the kBlock lanes of a job; st = its state rows (n, d, max).
// A function of its own with restrict pointers: inlined into backward_cpu, GCC 12 leaves it scalar.
__attribute__((noinline)) void backward_lanes(const float* __restrict st, const float* __restrict w,
                                              const float* __restrict u, const float* __restrict k,
                                              const float* __restrict v, const float* __restrict gy,
                                              float* __restrict g_n, float* __restrict g_d,
                                              float* __restrict delta, float* __restrict gk, float* __restrict gv,
                                              float* __restrict g_w, float* __restrict g_u) {
#pragma GCC unroll 1
  for (int c = 0; c < kBlock; ++c) {
    wkv4_backward_step(st[c], st[kBlock + c], st[2 * kBlock + c], w[c], u[c], k[c], v[c], gy[c], g_n[c], g_d[c],
                       delta[c], gk[c], gv[c], g_w[c], g_u[c]);
  }
}

// Gradients: gk, gv [B, T, C]; gw, gu [B, C] (per batch row; the caller sums over B); the initial
// state's in gn, gd, go [B, C], which hold the final state's gradients on entry.
void backward_cpu(const float* w, const float* u, const float* k, const float* v, const float* num0,
                  const float* den0, const float* mx0, const float* gy, float* gk, float* gv, float* gw,
                  float* gu, float* gn, float* gd, float* go, Dims s) {
#pragma omp parallel
  {
    std::vector<float> states(static_cast<size_t>(s.T) * 3 * kBlock);  // [T][n, d, max][kBlock]
#pragma omp for schedule(static)
    for (int64_t job = 0; job < s.B * s.blocks; ++job) {
      const int64_t b = job / s.blocks, c0 = (job % s.blocks) * kBlock;
      const int nc = static_cast<int>(std::min<int64_t>(kBlock, s.C - c0));
      Column<const float> kc(k, s, b, c0), vc(v, s, b, c0), gyc(gy, s, b, c0);
      Column<float> gkc(gk, s, b, c0), gvc(gv, s, b, c0);
      const float *kp = kc.data(), *vp = vc.data(), *gyp = gyc.data();
      float *gkp = gkc.data(), *gvp = gvc.data();
      const int64_t stride = kc.stride();
      float wb[kBlock] = {}, ub[kBlock] = {}, n[kBlock] = {}, d[kBlock] = {}, base[kBlock], steps[kBlock] = {};
      for (int c = 0; c < kBlock; ++c) base[c] = rwkv_mm::WKV4_EMPTY_MAX;
      for (int c = 0; c < nc; ++c) {
        wb[c] = w[c0 + c];
        ub[c] = u[c0 + c];
        n[c] = num0[b * s.C + c0 + c];
        d[c] = den0[b * s.C + c0 + c];
        base[c] = mx0[b * s.C + c0 + c];
      }
      // recompute the state entering every token
      for (int64_t t = 0; t < s.T; ++t) {
        const float* kt = kp + t * stride;
        const float* vt = vp + t * stride;
        float* st = states.data() + t * 3 * kBlock;
#pragma GCC unroll 1
        for (int c = 0; c < kBlock; ++c) {
          st[c] = n[c];
          st[kBlock + c] = d[c];
          st[2 * kBlock + c] = base[c] + steps[c] * wb[c];
          wkv4_update(n[c], d[c], base[c], steps[c], wb[c], kt[c], vt[c]);
        }
      }
      // walk back; (n, d) is the final state: the max gradient not explained by the sums is delta
      float g_n[kBlock] = {}, g_d[kBlock] = {}, delta[kBlock] = {}, g_w[kBlock] = {}, g_u[kBlock] = {};
      for (int c = 0; c < nc; ++c) {
        const int64_t i = b * s.C + c0 + c;
        g_n[c] = gn[i];
        g_d[c] = gd[i];
        delta[c] = go[i] - (gn[i] * n[c] + gd[i] * d[c]);
      }
      for (int64_t t = s.T - 1; t >= 0; --t) {
        const float* kt = kp + t * stride;
        const float* vt = vp + t * stride;
        const float* gyt = gyp + t * stride;
        float* gkt = gkp + t * stride;
        float* gvt = gvp + t * stride;
        const float* st = states.data() + t * 3 * kBlock;
        backward_lanes(st, wb, ub, kt, vt, gyt, g_n, g_d, delta, gkt, gvt, g_w, g_u);
      }
      gkc.store();
      gvc.store();
      for (int c = 0; c < nc; ++c) {
        const int64_t i = b * s.C + c0 + c;
        gw[i] = g_w[c];
        gu[i] = g_u[c];
        gn[i] = g_n[c];
        gd[i] = g_d[c];
        go[i] = g_n[c] * num0[i] + g_d[c] * den0[i] + delta[c];
      }
    }
  }
}

void check_input(const torch::Tensor& x, const char* name, int64_t dims) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(x.dim() == dims, name, " must be ", dims, "-D, got ", x.dim(), "-D");
}

Dims check_inputs(const torch::Tensor& w, const torch::Tensor& u, const torch::Tensor& k, const torch::Tensor& v,
                  std::initializer_list<torch::Tensor> states) {
  check_input(k, "k", 3);
  check_input(v, "v", 3);
  check_input(w, "w", 1);
  check_input(u, "u", 1);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape");
  TORCH_CHECK(w.size(0) == C && u.size(0) == C, "w and u must be [C] = [", C, "]");
  for (const auto& x : states) {
    check_input(x, "a state tensor", 2);
    TORCH_CHECK(x.size(0) == B && x.size(1) == C, "state tensors must be [B, C] = [", B, ", ", C, "]");
  }
  TORCH_CHECK(T < (int64_t{1} << 24), "T must be below 2^24 (decay steps are counted in float32)");
  return {B, T, C, (C + kBlock - 1) / kBlock};
}

// forward(w [C], u [C], k [B, T, C], v [B, T, C], num, den, max [B, C]) -> (y, num, den, max)
std::vector<torch::Tensor> forward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                   torch::Tensor num, torch::Tensor den, torch::Tensor mx) {
  const Dims s = check_inputs(w, u, k, v, {num, den, mx});
  auto y = torch::empty_like(k);
  auto num1 = num.clone(), den1 = den.clone(), mx1 = mx.clone();
  forward_cpu(w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
              y.data_ptr<float>(), num1.data_ptr<float>(), den1.data_ptr<float>(), mx1.data_ptr<float>(), s);
  return {y, num1, den1, mx1};
}

// backward(w, u, k, v, num0, den0, max0, gy, g_num, g_den, g_max)
//   -> (gw [B, C], gu [B, C], gk, gv, g_num0, g_den0, g_max0); gw, gu per batch row
std::vector<torch::Tensor> backward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor num0, torch::Tensor den0, torch::Tensor mx0,
                                    torch::Tensor gy, torch::Tensor gnum, torch::Tensor gden,
                                    torch::Tensor gmx) {
  const Dims s = check_inputs(w, u, k, v, {num0, den0, mx0, gnum, gden, gmx});
  check_input(gy, "gy", 3);
  TORCH_CHECK(gy.sizes() == k.sizes(), "gy must have k's shape");
  auto gk = torch::empty_like(k), gv = torch::empty_like(k);
  auto gw = torch::empty_like(num0), gu = torch::empty_like(num0);
  auto gn = gnum.clone(), gd = gden.clone(), go = gmx.clone();
  backward_cpu(w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
               num0.data_ptr<float>(), den0.data_ptr<float>(), mx0.data_ptr<float>(), gy.data_ptr<float>(),
               gk.data_ptr<float>(), gv.data_ptr<float>(), gw.data_ptr<float>(), gu.data_ptr<float>(),
               gn.data_ptr<float>(), gd.data_ptr<float>(), go.data_ptr<float>(), s);
  return {gw, gu, gk, gv, gn, gd, go};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "RWKV-4 WKV, C++ CPU kernel (OpenMP over batch x channel blocks)";
  m.def("forward", &forward, "wkv4 forward: (w, u, k, v, num, den, max) -> (y, num, den, max)");
  m.def("backward", &backward,
        "wkv4 backward: (w, u, k, v, num0, den0, max0, gy, g_num, g_den, g_max) -> "
        "(gw[B,C], gu[B,C], gk, gv, g_num0, g_den0, g_max0)");
}
