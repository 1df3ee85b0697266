// Vision-RWKV Bi-WKV on CUDA: forward and backward of `naive_biwkv` ("paper" and "official"), one
// thread per (batch, channel) running the passes of include/rwkv_mm/biwkv.h (the CPU kernel's exact
// path, same arithmetic: float64 sums, float32 exps and inputs).
//
// Why not the official kernel's 32-threads-per-channel segmented scan: the per-(b, c) two-scan is the
// arithmetic the CPU kernel and the tests check, it has no T_MAX, no C >= 32 or B*C % 32 condition, and
// a training batch (B*C ~ 10^4-10^5 threads) fills the GPU; the price is low occupancy for B*C of a
// few hundred (single-image inference), where the segmented design would be faster.
//
// Plain CUDA (no torch headers: they make nvcc builds ~6x slower); cuda/biwkv.cpp binds the launchers.
// Layout: k, v, y, gy [B, T, C] (float32, float16 or bfloat16; channels innermost, so the threads of a
// warp read consecutive channels), gk, gv [B, T, C] float32; w, u [C] float32. Between passes a
// thread keeps per-token rows in a global float32 scratch [field, B, T, C] (float32 snapshots of the
// sums and the exact (base, steps) of their maxima, as on the CPU).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "rwkv_mm/biwkv.h"

namespace {

using namespace rwkv_mm;

using Sum = BiSum<BiAcc, float>;
using SumG = BiSumG<BiAcc, float>;
using Max = BiMax<float>;

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }

// Small blocks spread few (batch, channel) threads over more multiprocessors.
constexpr int kThreads = 64;

// Addresses of one thread's channel: element (t) of a [B, T, C] tensor, and of scratch field f.
struct Lane {
  int64_t B, T, C, b, c;
  __device__ int64_t at(int64_t t) const { return (b * T + t) * C + c; }
  __device__ int64_t row(int f, int64_t t) const { return ((f * B + b) * T + t) * C + c; }
};

__device__ void clear(SumG& s) {
  bi_clear(s);
  s.fn = s.fd = 0.0;
  s.imax = 0.0f;
}

// ---- forward: scratch fields P_t (n, d, base, steps) ----

template <bool kOfficial, class F>
__global__ void forward_kernel(int64_t B, int64_t T, int64_t C, const float* __restrict__ w,
                               const float* __restrict__ u, const F* __restrict__ k, const F* __restrict__ v,
                               F* __restrict__ y, float* __restrict__ rows) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // b * C + c
  if (i >= B * C) return;
  const Lane x{B, T, C, i / C, i % C};
  const float wc = w[x.c], uc = u[x.c], rw = -expm1f(wc);
  const int64_t L = biwkv_chunk_len(static_cast<int>(T), kOfficial);
  Sum P;
  bi_clear(P);
  for (int64_t t = T - 1; t >= 0; --t) {
    rows[x.row(0, t)] = static_cast<float>(P.n);
    rows[x.row(1, t)] = static_cast<float>(P.d);
    rows[x.row(2, t)] = P.base;
    rows[x.row(3, t)] = P.steps;
    biwkv_right_push<kOfficial>(P, wc, load(k + x.at(t)), load(v + x.at(t)));
  }
  Sum Q, A, R;
  Max RR{WKV4_EMPTY_MAX, 0.0f, 0.0f};
  bi_clear(Q);
  bi_clear(A);
  bi_clear(R);
  for (int64_t t = 0; t < T; ++t) {
    const float kt = load(k + x.at(t)), vt = load(v + x.at(t));
    if (kOfficial) {
      if (t % L == 0) {
        biwkv_chunk_start(Q, A, R, RR, kt, static_cast<float>(t));
      } else {
        biwkv_residual_push(R, RR, wc, kt, vt, static_cast<float>(t));
      }
    }
    const BiAcc Po = bi_max_of(rows[x.row(2, t)], rows[x.row(3, t)], -wc);
    store(y + x.at(t), biwkv_forward_token<kOfficial>(Q, A, R, RR, rows[x.row(0, t)], rows[x.row(1, t)], Po, wc,
                                                      rw, uc, kt, vt));
  }
}

// ---- backward: scratch fields P_t (n, d, fn, fd, base, steps, imax), then PT_t (n, d, base, steps)
// and the gradient factors (m, ga, gb) ----

enum { P_N = 0, P_D, P_FN, P_FD, P_BASE, P_STEPS, P_IMAX };
enum { PT_N = 0, PT_D, PT_BASE, PT_STEPS, G_M, G_A, G_B, kBackwardFields };

// gk must be zero on entry (the EPS term's part is scattered into it first); gw, gu [B, C] per batch row.
template <bool kOfficial, class F>
__global__ void backward_kernel(int64_t B, int64_t T, int64_t C, const float* __restrict__ w,
                                const float* __restrict__ u, const F* __restrict__ k, const F* __restrict__ v,
                                const F* __restrict__ gy, float* __restrict__ gk, float* __restrict__ gv,
                                float* __restrict__ gw, float* __restrict__ gu, float* __restrict__ rows) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * C) return;
  const Lane x{B, T, C, i / C, i % C};
  const float wc = w[x.c], uc = u[x.c], rw = -expm1f(wc), ew = expf(wc);
  const int64_t L = biwkv_chunk_len(static_cast<int>(T), kOfficial);
  // pass 1: right sum with its decay-weighted sums and argmax
  SumG P;
  clear(P);
  for (int64_t t = T - 1; t >= 0; --t) {
    rows[x.row(P_N, t)] = static_cast<float>(P.n);
    rows[x.row(P_D, t)] = static_cast<float>(P.d);
    rows[x.row(P_FN, t)] = static_cast<float>(P.fn);
    rows[x.row(P_FD, t)] = static_cast<float>(P.fd);
    rows[x.row(P_BASE, t)] = P.base;
    rows[x.row(P_STEPS, t)] = P.steps;
    rows[x.row(P_IMAX, t)] = P.imax;
    biwkv_right_push_g<kOfficial>(P, wc, load(k + x.at(t)), load(v + x.at(t)), static_cast<float>(t));
  }
  // pass 2: outputs again, gradient factors, dw, du, EPS term, transposed right sum
  SumG Q, A, R;
  Max RR{WKV4_EMPTY_MAX, 0.0f, 0.0f};
  Sum PT;
  clear(Q);
  clear(A);
  clear(R);
  bi_clear(PT);
  BiAcc acc_w = 0.0, acc_u = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    const float kt = load(k + x.at(t)), vt = load(v + x.at(t)), tf = static_cast<float>(t);
    if (kOfficial) {
      if (t % L == 0) {
        biwkv_chunk_start(Q, A, R, RR, kt, tf);
      } else {
        biwkv_residual_push(R, RR, wc, kt, vt, tf);
      }
    }
    const BiAcc Po = bi_max_of(rows[x.row(P_BASE, t)], rows[x.row(P_STEPS, t)], -wc);
    float dw = 0.0f, du = 0.0f;
    const BiGrad g = biwkv_backward_token<kOfficial>(
        Q, A, R, RR, rows[x.row(P_N, t)], rows[x.row(P_D, t)], Po, rows[x.row(P_FN, t)], rows[x.row(P_FD, t)],
        rows[x.row(P_IMAX, t)], wc, ew, rw, uc, kt, vt, load(gy + x.at(t)), tf, static_cast<float>(t - t % L), dw,
        du);
    acc_w += dw;
    acc_u += du;
    if (kOfficial) gk[x.at(static_cast<int64_t>(g.eps_index))] += g.gm;  // to the token that sets m_t
    rows[x.row(PT_N, t)] = static_cast<float>(PT.n);  // PT_t, before token t joins it
    rows[x.row(PT_D, t)] = static_cast<float>(PT.d);
    rows[x.row(PT_BASE, t)] = PT.base;
    rows[x.row(PT_STEPS, t)] = PT.steps;
    rows[x.row(G_M, t)] = g.m;
    rows[x.row(G_A, t)] = g.ga;
    rows[x.row(G_B, t)] = g.gb;
    biwkv_transposed_right_push<kOfficial>(PT, wc, g.ga, g.gb, g.m);
  }
  gw[i] = static_cast<float>(acc_w);
  gu[i] = static_cast<float>(acc_u);
  // pass 3: transposed left sums, dk, dv
  Sum QT, AT, RT;
  bi_clear(QT);
  bi_clear(AT);
  bi_clear(RT);
  for (int64_t t = T - 1; t >= 0; --t) {
    const float ga = rows[x.row(G_A, t)], gb = rows[x.row(G_B, t)], m = rows[x.row(G_M, t)];
    if (kOfficial) {
      if (t % L == L - 1 || t == T - 1) biwkv_chunk_end(QT, AT, RT);
      biwkv_transposed_residual_push(RT, wc, ga, gb, m);
      if (t % L == 0) bi_clear(RT);
    }
    const BiAcc PTo = bi_max_of(rows[x.row(PT_BASE, t)], rows[x.row(PT_STEPS, t)], -wc);
    float dk = gk[x.at(t)], dv;
    biwkv_transposed_token<kOfficial>(QT, AT, RT, rows[x.row(PT_N, t)], rows[x.row(PT_D, t)], PTo, wc, rw, uc,
                                      load(k + x.at(t)), load(v + x.at(t)), ga, gb, m, dk, dv);
    gk[x.at(t)] = dk;
    gv[x.at(t)] = dv;
  }
}

unsigned blocks(int64_t B, int64_t C) { return static_cast<unsigned>((B * C + kThreads - 1) / kThreads); }

template <bool kOfficial, class F>
void launch_forward(int64_t B, int64_t T, int64_t C, const float* w, const float* u, const void* k, const void* v,
                    void* y, float* rows, cudaStream_t stream) {
  forward_kernel<kOfficial, F><<<blocks(B, C), kThreads, 0, stream>>>(
      B, T, C, w, u, static_cast<const F*>(k), static_cast<const F*>(v), static_cast<F*>(y), rows);
}

template <bool kOfficial, class F>
void launch_backward(int64_t B, int64_t T, int64_t C, const float* w, const float* u, const void* k, const void* v,
                     const void* gy, float* gk, float* gv, float* gw, float* gu, float* rows, cudaStream_t stream) {
  backward_kernel<kOfficial, F><<<blocks(B, C), kThreads, 0, stream>>>(
      B, T, C, w, u, static_cast<const F*>(k), static_cast<const F*>(v), static_cast<const F*>(gy), gk, gv, gw, gu,
      rows);
}

}  // namespace

// Scratch floats the launchers need: rows of 4 (forward) or 7 (backward) fields of B * T * C.
int64_t rwkv_mm_biwkv_scratch_fields(bool backward) { return backward ? kBackwardFields : 4; }

// dtype: 0 float32, 1 float16, 2 bfloat16 (k, v, y). Returns the launch status.
cudaError_t rwkv_mm_biwkv_forward_cuda(int dtype, bool official, int64_t B, int64_t T, int64_t C, const float* w,
                                       const float* u, const void* k, const void* v, void* y, float* rows,
                                       cudaStream_t stream) {
  if (B * C == 0 || T == 0) return cudaSuccess;
  if (official) {
    if (dtype == 0) launch_forward<true, float>(B, T, C, w, u, k, v, y, rows, stream);
    if (dtype == 1) launch_forward<true, __half>(B, T, C, w, u, k, v, y, rows, stream);
    if (dtype == 2) launch_forward<true, __nv_bfloat16>(B, T, C, w, u, k, v, y, rows, stream);
  } else {
    if (dtype == 0) launch_forward<false, float>(B, T, C, w, u, k, v, y, rows, stream);
    if (dtype == 1) launch_forward<false, __half>(B, T, C, w, u, k, v, y, rows, stream);
    if (dtype == 2) launch_forward<false, __nv_bfloat16>(B, T, C, w, u, k, v, y, rows, stream);
  }
  return cudaGetLastError();
}

// dtype as above (k, v, gy); gk (zeroed), gv float32 [B, T, C]; gw, gu [B, C].
cudaError_t rwkv_mm_biwkv_backward_cuda(int dtype, bool official, int64_t B, int64_t T, int64_t C, const float* w,
                                        const float* u, const void* k, const void* v, const void* gy, float* gk,
                                        float* gv, float* gw, float* gu, float* rows, cudaStream_t stream) {
  if (B * C == 0) return cudaSuccess;
  if (official) {
    if (dtype == 0) launch_backward<true, float>(B, T, C, w, u, k, v, gy, gk, gv, gw, gu, rows, stream);
    if (dtype == 1) launch_backward<true, __half>(B, T, C, w, u, k, v, gy, gk, gv, gw, gu, rows, stream);
    if (dtype == 2) launch_backward<true, __nv_bfloat16>(B, T, C, w, u, k, v, gy, gk, gv, gw, gu, rows, stream);
  } else {
    if (dtype == 0) launch_backward<false, float>(B, T, C, w, u, k, v, gy, gk, gv, gw, gu, rows, stream);
    if (dtype == 1) launch_backward<false, __half>(B, T, C, w, u, k, v, gy, gk, gv, gw, gu, rows, stream);
    if (dtype == 2) launch_backward<false, __nv_bfloat16>(B, T, C, w, u, k, v, gy, gk, gv, gw, gu, rows, stream);
  }
  return cudaGetLastError();
}
