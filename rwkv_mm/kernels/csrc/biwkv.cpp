// Vision-RWKV Bi-WKV on the CPU: forward and backward of `naive_biwkv`, modes "paper" and "official".
//
// Layout: k, v, y [B, T, C] float32, contiguous (channels innermost); w, u [C]. The work is cut into
// (batch, block of kBlock channels) jobs spread over OpenMP threads. A job runs the passes of
// include/rwkv_mm/biwkv.h over the tokens, each token updating its kBlock channels in an inner loop
// the compiler vectorises; between passes, per-token rows of the job's channels are kept in a
// thread-local scratch [T][field][kBlock] (float32 snapshots of the float64 sums).
//   forward:  1. right sum P, t = T-1..0 (stored)   2. left sums and outputs, t = 0..T-1
//             (the shared-shift form when the job's channels fit it, else running maxima)
//   backward: 1. right sum P with its decay-weighted sums (stored)
//             2. left sums, outputs recomputed, gradient factors, dw, du, EPS term, transposed right
//                sum PT (stored over P's rows)
//             3. transposed left sums, dk and dv, t = T-1..0
// Vectorisation (checked with -fopt-info-vec, GCC 12): every lane loop runs exactly kBlock times
// (the last block of C runs on zero-padded copies) and is kept rolled (`GCC unroll 1`: fully
// unrolled, the big ones fall to poor straight-line code), and holds no branch, not even a select on
// a per-token flag: chunk starts and ends get lane loops of their own.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

// Lets GCC turn the selects of the lane loops into vector blends when their results meet float64
// sums (with -ftrapping-math it keeps a float-to-double conversion under its branch, and the loop
// scalar). The kernels rely on no floating-point exception state.
#pragma GCC optimize("no-trapping-math")

#include "rwkv_mm/biwkv.h"

namespace {

using namespace rwkv_mm;

constexpr int kBlock = 16;  // channels per job: one AVX-512 / two AVX2 vectors of float32

// ---- per-job state ----

// Per-channel state arrays of one job; at(c) gives the structs of biwkv.h over lane c.
struct SumLanes {
  BiAcc n[kBlock], d[kBlock];
  float base[kBlock], steps[kBlock];
  BiSum<BiAcc&, float&> at(int c) { return {n[c], d[c], base[c], steps[c]}; }
  void clear() {
    #pragma GCC unroll 1
    for (int c = 0; c < kBlock; ++c) {
      BiSum<BiAcc&, float&> s = at(c);
      bi_clear(s);
    }
  }
};

struct SumGLanes {
  BiAcc n[kBlock], d[kBlock], fn[kBlock], fd[kBlock];
  float base[kBlock], steps[kBlock], imax[kBlock];
  BiSumG<BiAcc&, float&> at(int c) { return {n[c], d[c], fn[c], fd[c], base[c], steps[c], imax[c]}; }
  void clear() {
    #pragma GCC unroll 1
    for (int c = 0; c < kBlock; ++c) {
      BiSumG<BiAcc&, float&> s = at(c);
      bi_clear(s);
      s.fn = s.fd = 0.0;
      s.imax = 0.0f;
    }
  }
};

struct MaxLanes {
  float base[kBlock], steps[kBlock], imax[kBlock];
  BiMax<float&> at(int c) { return {base[c], steps[c], imax[c]}; }
};

struct FlatLanes {
  BiAcc qn[kBlock], qd[kBlock], an[kBlock], ad[kBlock], rn[kBlock], rd[kBlock];
  float qo[kBlock], ao[kBlock], ro[kBlock], rro[kBlock];
  BiFlatLeft<BiAcc&, float&> at(int c) {
    return {qn[c], qd[c], an[c], ad[c], rn[c], rd[c], qo[c], ao[c], ro[c], rro[c]};
  }
};

// One job's channel constants (padding lanes get w = u = 0).
struct Channels {
  float w[kBlock], u[kBlock], eu[kBlock], rw[kBlock];  // eu = e^u, rw = 1 - e^w
  BiAcc ew[kBlock], dec[kBlock];                        // e^w, e^-w
  Channels(const float* w_, const float* u_, int nc) {
    #pragma GCC unroll 1
    for (int c = 0; c < kBlock; ++c) {
      w[c] = c < nc ? w_[c] : 0.0f;
      u[c] = c < nc ? u_[c] : 0.0f;
      eu[c] = std::exp(u[c]);
      rw[c] = -std::expm1(w[c]);
      ew[c] = std::exp(static_cast<BiAcc>(w[c]));
      dec[c] = std::exp(-static_cast<BiAcc>(w[c]));
    }
  }
};

// A job's scratch rows: per token, kFields float32 fields of kBlock lanes (snapshots of the float64
// sums, and the exact (base, steps) of their maxima). The buffer is the calling thread's, kept between
// calls (T * kFields * 64 bytes, 1.8 MB at T = 4096): a fresh one per call cost ~0.3 ms of page faults
// and zeroing at B = 1, T = 4096, C = 192 (a forward takes ~0.8 ms).
template <int kFields>
struct Rows {
  explicit Rows(int64_t T) {
    thread_local std::vector<float> buffer;
    const size_t n = static_cast<size_t>(T) * kFields * kBlock;
    if (buffer.size() < n) buffer.resize(n);
    data_ = buffer.data();
  }
  float* at(int64_t t, int field) { return data_ + (t * kFields + field) * kBlock; }

 private:
  float* data_;
};

// ---- job addressing ----

struct Dims {
  int64_t B, T, C, blocks;
};

// One job's kBlock channels of the [B, T, C] tensors: the address of (token 0, first channel) of each
// and the row stride; token t of channel c is at [t * stride + c].
struct Columns {
  const float *k, *v, *gy;  // gy: backward only
  float *y, *gk, *gv;       // y: forward only; gk, gv: backward only
  int64_t stride;
};

// The columns of job j: in place for a full block of channels; for the last, partial block of a C
// that is not a multiple of kBlock, zero-padded copies that finish() copies back.
class JobColumns {
 public:
  JobColumns(Dims s, int64_t j) : s_(s), b_(j / s.blocks), c0_((j % s.blocks) * kBlock) {
    nc_ = static_cast<int>(std::min<int64_t>(kBlock, s.C - c0_));
  }
  int64_t batch() const { return b_; }
  int64_t first_channel() const { return c0_; }
  int channels() const { return nc_; }

  Columns forward(const float* k, const float* v, float* y) {
    if (nc_ == kBlock) return {k + offset(), v + offset(), nullptr, y + offset(), nullptr, nullptr, s_.C};
    return {pad_in(k_, k), pad_in(v_, v), nullptr, pad_out(y_), nullptr, nullptr, kBlock};
  }
  Columns backward(const float* k, const float* v, const float* gy, float* gk, float* gv) {
    if (nc_ == kBlock) {
      return {k + offset(), v + offset(), gy + offset(), nullptr, gk + offset(), gv + offset(), s_.C};
    }
    return {pad_in(k_, k), pad_in(v_, v), pad_in(gy_, gy), nullptr, pad_out(gk_), pad_out(gv_), kBlock};
  }
  void finish(float* out1, float* out2 = nullptr) {  // y, or gk and gv
    if (nc_ == kBlock) return;
    unpad(out1, out2 ? gk_ : y_);
    if (out2) unpad(out2, gv_);
  }

 private:
  int64_t offset() const { return b_ * s_.T * s_.C + c0_; }
  float* pad_in(std::vector<float>& buf, const float* x) {
    buf.assign(static_cast<size_t>(s_.T) * kBlock, 0.0f);
    for (int64_t t = 0; t < s_.T; ++t) {
      for (int c = 0; c < nc_; ++c) buf[t * kBlock + c] = x[offset() + t * s_.C + c];
    }
    return buf.data();
  }
  float* pad_out(std::vector<float>& buf) {
    buf.assign(static_cast<size_t>(s_.T) * kBlock, 0.0f);
    return buf.data();
  }
  void unpad(float* x, const std::vector<float>& buf) const {
    for (int64_t t = 0; t < s_.T; ++t) {
      for (int c = 0; c < nc_; ++c) x[offset() + t * s_.C + c] = buf[t * kBlock + c];
    }
  }
  Dims s_;
  int64_t b_, c0_;
  int nc_;
  std::vector<float> k_, v_, gy_, y_, gk_, gv_;
};

// ---- forward ----

// P_t per token: exact form (n, d, base, steps); flat form (n, d, o, e = e^{k_t - kappa}).
using ForwardRows = Rows<4>;

// Forward of one job with running maxima (any input).
template <bool kOfficial>
void forward_exact(const Channels& ch, const Columns& x, int64_t T, ForwardRows& rows) {
  const int L = biwkv_chunk_len(static_cast<int>(T), kOfficial);
  SumLanes P;
  P.clear();
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* kt = x.k + t * x.stride;
    const float* vt = x.v + t * x.stride;
    float *pn = rows.at(t, 0), *pd = rows.at(t, 1), *pb = rows.at(t, 2), *ps = rows.at(t, 3);
    #pragma GCC unroll 1
    for (int c = 0; c < kBlock; ++c) {
      BiSum<BiAcc&, float&> p = P.at(c);
      pn[c] = static_cast<float>(p.n);
      pd[c] = static_cast<float>(p.d);
      pb[c] = p.base;
      ps[c] = p.steps;
      biwkv_right_push<kOfficial>(p, ch.w[c], kt[c], vt[c]);
    }
  }
  SumLanes Q, A, R;
  MaxLanes RR;
  Q.clear();
  A.clear();
  R.clear();
  for (int64_t t = 0; t < T; ++t) {
    const float* kt = x.k + t * x.stride;
    const float* vt = x.v + t * x.stride;
    float* yt = x.y + t * x.stride;
    const float *pn = rows.at(t, 0), *pd = rows.at(t, 1), *pb = rows.at(t, 2), *ps = rows.at(t, 3);
    if (kOfficial && t % L == 0) {
      #pragma GCC unroll 1
      for (int c = 0; c < kBlock; ++c) {
        BiSum<BiAcc&, float&> q = Q.at(c), a = A.at(c), rs = R.at(c);
        BiMax<float&> rr = RR.at(c);
        biwkv_chunk_start(q, a, rs, rr, kt[c], static_cast<float>(t));
      }
    } else if (kOfficial) {
      #pragma GCC unroll 1
      for (int c = 0; c < kBlock; ++c) {
        BiSum<BiAcc&, float&> rs = R.at(c);
        BiMax<float&> rr = RR.at(c);
        biwkv_residual_push(rs, rr, ch.w[c], kt[c], vt[c], static_cast<float>(t));
      }
    }
    #pragma GCC unroll 1
    for (int c = 0; c < kBlock; ++c) {
      BiSum<BiAcc&, float&> q = Q.at(c), a = A.at(c), rs = R.at(c);
      BiMax<float&> rr = RR.at(c);
      yt[c] = biwkv_forward_token<kOfficial>(q, a, rs, rr, pn[c], pd[c], bi_max_of(pb[c], ps[c], -ch.w[c]),
                                             ch.w[c], ch.rw[c], ch.u[c], kt[c], vt[c]);
    }
  }
}

// Forward of one job with the shared shift kappa (biwkv_fits holds for all its channels).
template <bool kOfficial>
void forward_flat(const Channels& ch, const float* kappa, const Columns& x, int64_t T, ForwardRows& rows) {
  const int L = biwkv_chunk_len(static_cast<int>(T), kOfficial);
  BiAcc pn[kBlock] = {}, pd[kBlock] = {};
  float po[kBlock];
  for (int c = 0; c < kBlock; ++c) po[c] = WKV4_EMPTY_MAX;
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* kt = x.k + t * x.stride;
    const float* vt = x.v + t * x.stride;
    float *rn = rows.at(t, 0), *rd = rows.at(t, 1), *ro = rows.at(t, 2), *re = rows.at(t, 3);
    #pragma GCC unroll 1
    for (int c = 0; c < kBlock; ++c) {
      const float e = wkv_exp(kt[c] - kappa[c]);
      rn[c] = static_cast<float>(pn[c]);
      rd[c] = static_cast<float>(pd[c]);
      ro[c] = po[c];
      re[c] = e;
      biwkv_flat_right_push<kOfficial>(pn[c], pd[c], po[c], ch.dec[c], ch.w[c], e, kt[c], vt[c]);
    }
  }
  FlatLanes S;
  #pragma GCC unroll 1
  for (int c = 0; c < kBlock; ++c) {
    BiFlatLeft<BiAcc&, float&> st = S.at(c);
    biwkv_flat_clear(st);
  }
  for (int64_t t = 0; t < T; ++t) {
    const float* kt = x.k + t * x.stride;
    const float* vt = x.v + t * x.stride;
    float* yt = x.y + t * x.stride;
    const float *rn = rows.at(t, 0), *rd = rows.at(t, 1), *ro = rows.at(t, 2), *re = rows.at(t, 3);
    if (kOfficial && t % L == 0) {
      #pragma GCC unroll 1
      for (int c = 0; c < kBlock; ++c) {
        BiFlatLeft<BiAcc&, float&> st = S.at(c);
        biwkv_flat_chunk_start(st, ch.w[c], ch.dec[c], kt[c]);
      }
    } else if (kOfficial) {
      #pragma GCC unroll 1
      for (int c = 0; c < kBlock; ++c) {
        BiFlatLeft<BiAcc&, float&> st = S.at(c);
        biwkv_flat_residual_push(st, ch.w[c], ch.ew[c], re[c], kt[c], vt[c]);
      }
    }
    #pragma GCC unroll 1
    for (int c = 0; c < kBlock; ++c) {
      BiFlatLeft<BiAcc&, float&> st = S.at(c);
      yt[c] = biwkv_flat_token<kOfficial>(st, rn[c], rd[c], ro[c], ch.w[c], ch.dec[c], ch.eu[c], ch.rw[c],
                                          ch.u[c], kappa[c], re[c], kt[c], vt[c]);
    }
  }
}

// Jobs whose channels all fit one shared shift take forward_flat (one exp per token instead of four
// to eight), the others forward_exact.
template <bool kOfficial>
void forward_cpu(const float* w, const float* u, const float* k, const float* v, float* y, Dims s) {
  if (s.T == 0) return;
#pragma omp parallel
  {
    ForwardRows rows(s.T);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < s.B * s.blocks; ++j) {
      JobColumns job(s, j);
      const Columns x = job.forward(k, v, y);
      const Channels ch(w + job.first_channel(), u + job.first_channel(), job.channels());
      float kmax[kBlock], kmin[kBlock];
      for (int c = 0; c < kBlock; ++c) kmax[c] = kmin[c] = x.k[c];
      for (int64_t t = 1; t < s.T; ++t) {
        #pragma GCC unroll 1
        for (int c = 0; c < kBlock; ++c) {
          kmax[c] = wkv_max(kmax[c], x.k[t * x.stride + c]);
          kmin[c] = kmin[c] < x.k[t * x.stride + c] ? kmin[c] : x.k[t * x.stride + c];
        }
      }
      bool flat = true;
      #pragma GCC unroll 1
      for (int c = 0; c < kBlock; ++c) {
        flat = flat && biwkv_fits(kmax[c] - kmin[c], ch.w[c], ch.u[c], static_cast<float>(s.T));
      }
      if (flat) {
        forward_flat<kOfficial>(ch, kmax, x, s.T, rows);
      } else {
        forward_exact<kOfficial>(ch, x, s.T, rows);
      }
      job.finish(y);
    }
  }
}

// ---- backward ----

// Pass 1 writes P_t: (n, d, fn, fd, base, steps, imax). Pass 2 reads them and writes PT_t (n, d, base,
// steps) and the gradient factors (m, ga, gb).
using BackwardRows = Rows<7>;
enum { P_N = 0, P_D, P_FN, P_FD, P_BASE, P_STEPS, P_IMAX };
enum { PT_N = 0, PT_D, PT_BASE, PT_STEPS, G_M, G_A, G_B };

// gw, gu: this job's kBlock lanes of dw, du; x.gk must be zero on entry.
template <bool kOfficial>
void backward_job(const Channels& ch, const Columns& x, int64_t T, float* gw, float* gu, BackwardRows& rows) {
  const int L = biwkv_chunk_len(static_cast<int>(T), kOfficial);
  // pass 1: right sum with its decay-weighted sums and argmax
  SumGLanes P;
  P.clear();
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* kt = x.k + t * x.stride;
    const float* vt = x.v + t * x.stride;
    float* r[7];
    for (int f = 0; f < 7; ++f) r[f] = rows.at(t, f);
    #pragma GCC unroll 1
    for (int c = 0; c < kBlock; ++c) {
      BiSumG<BiAcc&, float&> p = P.at(c);
      r[P_N][c] = static_cast<float>(p.n);
      r[P_D][c] = static_cast<float>(p.d);
      r[P_FN][c] = static_cast<float>(p.fn);
      r[P_FD][c] = static_cast<float>(p.fd);
      r[P_BASE][c] = p.base;
      r[P_STEPS][c] = p.steps;
      r[P_IMAX][c] = p.imax;
      biwkv_right_push_g<kOfficial>(p, ch.w[c], kt[c], vt[c], static_cast<float>(t));
    }
  }
  // pass 2: outputs again, gradient factors, dw, du, EPS term, transposed right sum
  SumGLanes Q, A, R;
  MaxLanes RR;
  SumLanes PT;
  Q.clear();
  A.clear();
  R.clear();
  PT.clear();
  BiAcc acc_w[kBlock] = {}, acc_u[kBlock] = {};
  float gm[kBlock], eps_index[kBlock];
  for (int64_t t = 0; t < T; ++t) {
    const float* kt = x.k + t * x.stride;
    const float* vt = x.v + t * x.stride;
    const float* gyt = x.gy + t * x.stride;
    const float tf = static_cast<float>(t), start = static_cast<float>(t - t % L);
    float* r[7];
    for (int f = 0; f < 7; ++f) r[f] = rows.at(t, f);
    if (kOfficial && t % L == 0) {
      #pragma GCC unroll 1
      for (int c = 0; c < kBlock; ++c) {
        BiSumG<BiAcc&, float&> q = Q.at(c), a = A.at(c), rs = R.at(c);
        BiMax<float&> rr = RR.at(c);
        biwkv_chunk_start(q, a, rs, rr, kt[c], tf);
      }
    } else if (kOfficial) {
      #pragma GCC unroll 1
      for (int c = 0; c < kBlock; ++c) {
        BiSumG<BiAcc&, float&> rs = R.at(c);
        BiMax<float&> rr = RR.at(c);
        biwkv_residual_push(rs, rr, ch.w[c], kt[c], vt[c], tf);
      }
    }
    #pragma GCC unroll 1
    for (int c = 0; c < kBlock; ++c) {
      BiSumG<BiAcc&, float&> q = Q.at(c), a = A.at(c), rs = R.at(c);
      BiMax<float&> rr = RR.at(c);
      BiSum<BiAcc&, float&> pt = PT.at(c);
      float dw = 0.0f, du = 0.0f;
      const BiGrad g = biwkv_backward_token<kOfficial>(
          q, a, rs, rr, r[P_N][c], r[P_D][c], bi_max_of(r[P_BASE][c], r[P_STEPS][c], -ch.w[c]), r[P_FN][c],
          r[P_FD][c], r[P_IMAX][c], ch.w[c], static_cast<float>(ch.ew[c]), ch.rw[c], ch.u[c], kt[c], vt[c],
          gyt[c], tf, start, dw, du);
      acc_w[c] += dw;
      acc_u[c] += du;
      gm[c] = g.gm;
      eps_index[c] = g.eps_index;
      r[PT_N][c] = static_cast<float>(pt.n);  // PT_t, before token t joins it
      r[PT_D][c] = static_cast<float>(pt.d);
      r[PT_BASE][c] = pt.base;
      r[PT_STEPS][c] = pt.steps;
      r[G_M][c] = g.m;
      r[G_A][c] = g.ga;
      r[G_B][c] = g.gb;
      biwkv_transposed_right_push<kOfficial>(pt, ch.w[c], g.ga, g.gb, g.m);
    }
    if (kOfficial) {  // the EPS term's dk goes to the token that sets the maximum
      for (int c = 0; c < kBlock; ++c) x.gk[static_cast<int64_t>(eps_index[c]) * x.stride + c] += gm[c];
    }
  }
  #pragma GCC unroll 1
  for (int c = 0; c < kBlock; ++c) {
    gw[c] = static_cast<float>(acc_w[c]);
    gu[c] = static_cast<float>(acc_u[c]);
  }
  // pass 3: transposed left sums, dk, dv
  SumLanes QT, AT, RT;
  QT.clear();
  AT.clear();
  RT.clear();
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* kt = x.k + t * x.stride;
    const float* vt = x.v + t * x.stride;
    float* gkt = x.gk + t * x.stride;
    float* gvt = x.gv + t * x.stride;
    const float* r[7];
    for (int f = 0; f < 7; ++f) r[f] = rows.at(t, f);
    if (kOfficial) {
      if (t % L == L - 1 || t == T - 1) {
        #pragma GCC unroll 1
        for (int c = 0; c < kBlock; ++c) {
          BiSum<BiAcc&, float&> qt = QT.at(c), at = AT.at(c), rt = RT.at(c);
          biwkv_chunk_end(qt, at, rt);
        }
      }
      #pragma GCC unroll 1
      for (int c = 0; c < kBlock; ++c) {
        BiSum<BiAcc&, float&> rt = RT.at(c);
        biwkv_transposed_residual_push(rt, ch.w[c], r[G_A][c], r[G_B][c], r[G_M][c]);
      }
      if (t % L == 0) RT.clear();
    }
    #pragma GCC unroll 1
    for (int c = 0; c < kBlock; ++c) {
      BiSum<BiAcc&, float&> qt = QT.at(c), at = AT.at(c), rt = RT.at(c);
      biwkv_transposed_token<kOfficial>(qt, at, rt, r[PT_N][c], r[PT_D][c],
                                        bi_max_of(r[PT_BASE][c], r[PT_STEPS][c], -ch.w[c]), ch.w[c], ch.rw[c],
                                        ch.u[c], kt[c], vt[c], r[G_A][c], r[G_B][c], r[G_M][c], gkt[c], gvt[c]);
    }
  }
}

// gw, gu [B, C] per batch row; gk must be zero on entry.
template <bool kOfficial>
void backward_cpu(const float* w, const float* u, const float* k, const float* v, const float* gy, float* gw,
                  float* gu, float* gk, float* gv, Dims s) {
#pragma omp parallel
  {
    BackwardRows rows(s.T);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < s.B * s.blocks; ++j) {
      JobColumns job(s, j);
      const Columns x = job.backward(k, v, gy, gk, gv);
      const Channels ch(w + job.first_channel(), u + job.first_channel(), job.channels());
      float dw[kBlock], du[kBlock];
      backward_job<kOfficial>(ch, x, s.T, dw, du, rows);
      job.finish(gk, gv);
      for (int c = 0; c < job.channels(); ++c) {
        gw[job.batch() * s.C + job.first_channel() + c] = dw[c];
        gu[job.batch() * s.C + job.first_channel() + c] = du[c];
      }
    }
  }
}

// ---- bindings ----

void check_input(const torch::Tensor& x, const char* name, int64_t dims) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, name, " must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(x.dim() == dims, name, " must be ", dims, "-D, got ", x.dim(), "-D");
}

Dims check_inputs(const torch::Tensor& w, const torch::Tensor& u, const torch::Tensor& k,
                  const torch::Tensor& v) {
  check_input(k, "k", 3);
  check_input(v, "v", 3);
  check_input(w, "w", 1);
  check_input(u, "u", 1);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape");
  TORCH_CHECK(w.size(0) == C && u.size(0) == C, "w and u must be [C] = [", C, "]");
  TORCH_CHECK(T < (int64_t{1} << 24), "T must be below 2^24 (token indices are kept in float32)");
  return {B, T, C, (C + kBlock - 1) / kBlock};
}

// forward(w [C], u [C], k [B, T, C], v [B, T, C], official) -> y [B, T, C]
torch::Tensor forward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v, bool official) {
  const Dims s = check_inputs(w, u, k, v);
  auto y = torch::empty_like(k);
  auto run = official ? forward_cpu<true> : forward_cpu<false>;
  run(w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), y.data_ptr<float>(), s);
  return y;
}

// backward(w, u, k, v, gy, official) -> (gw [B, C], gu [B, C], gk, gv); gw, gu per batch row
std::vector<torch::Tensor> backward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                    torch::Tensor gy, bool official) {
  const Dims s = check_inputs(w, u, k, v);
  check_input(gy, "gy", 3);
  TORCH_CHECK(gy.sizes() == k.sizes(), "gy must have k's shape");
  auto gk = torch::zeros_like(k), gv = torch::empty_like(k);
  auto gw = k.new_empty({s.B, s.C}), gu = k.new_empty({s.B, s.C});
  auto run = official ? backward_cpu<true> : backward_cpu<false>;
  run(w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), gy.data_ptr<float>(),
      gw.data_ptr<float>(), gu.data_ptr<float>(), gk.data_ptr<float>(), gv.data_ptr<float>(), s);
  return {gw, gu, gk, gv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Vision-RWKV Bi-WKV, C++ CPU kernel (OpenMP over batch x channel blocks)";
  m.def("forward", &forward, "biwkv forward: (w, u, k, v, official) -> y");
  m.def("backward", &backward, "biwkv backward: (w, u, k, v, gy, official) -> (gw[B,C], gu[B,C], gk, gv)");
}
