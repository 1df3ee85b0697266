// Vision-RWKV Bi-WKV on CUDA: forward and backward of `naive_biwkv` ("paper" and "official"), with the
// per-token bodies of include/rwkv_mm/biwkv.h (float64 sums, float32 exps and inputs, as on the CPU).
//
// Forward: token-parallel. A block takes one batch row and kGroup channels; each channel's T tokens
// are cut into BIWKV_TOKEN_SPLIT segments of L = ceil(T / 32) tokens (exactly the official kernel's
// chunks, so the official restarts fall on segment starts), one thread per (segment, channel):
//   pass 1 (right to left over the segment): the segment's right sum P (its part of P_{a-1}) and left
//          sum (its part of the left sum after its last token), and P at the end of every tile of
//          kTile tokens (what the segment itself adds to P there), kept in a small global scratch;
//   combine (shared memory): the left sum entering the segment (A, from the segments before it) and
//          the right sum leaving it (Pin, from the segments after it), each segment shifted by the
//          decay over the distance between them;
//   pass 2 (tiles left to right): P_t of a tile's tokens by a right-to-left scan into registers from
//          the tile's end, then the outputs left to right (biwkv_forward_token).
// Every sum is formed with adds of positive terms only (no subtraction, no cancellation).
//
// Backward: one thread per (batch, channel) running the passes of biwkv.h serially (the CPU kernel's
// exact path). Between passes a thread keeps per-token rows in a global float32 scratch
// [field, B, T, C] (float32 snapshots of the sums and the exact (base, steps) of their maxima).
//
// Plain CUDA (no torch headers: they make nvcc builds ~6x slower); cuda/biwkv.cpp binds the launchers.
// Layout: k, v, y, gy [B, T, C] (float32, float16 or bfloat16; channels innermost, so neighbouring
// threads read neighbouring channels), gk, gv [B, T, C] float32; w, u [C] float32.
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

// Backward: small blocks spread few (batch, channel) threads over more multiprocessors.
constexpr int kThreads = 64;

// Backward: addresses of one thread's channel: element (t) of a [B, T, C] tensor, and of scratch field f.
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

// ---- forward ----

constexpr int kSegments = BIWKV_TOKEN_SPLIT;
constexpr int kGroup = 8;  // channels per block: a warp reads 4 tokens x 8 channels (32-byte rows)
constexpr int kTile = 8;   // tokens whose P_t a thread holds in registers at a time
constexpr int kForwardThreads = kSegments * kGroup;

// Tile-end scratch: fields (n, d, base, steps) x [B, kSegments, tiles, C].
constexpr int kTileFields = 4;

__host__ __device__ int64_t tiles_per_segment(int64_t T) {
  return (biwkv_chunk_len(static_cast<int>(T), true) + kTile - 1) / kTile;
}

// One thread's segment [a, e) of channel c in batch row b, and its tile-end scratch.
struct Segment {
  int64_t B, T, C, b, c, a, e, tiles;
  int j;
  __device__ int64_t at(int64_t t) const { return (b * T + t) * C + c; }
  __device__ int64_t tile(int f, int64_t i) const { return (((f * B + b) * kSegments + j) * tiles + i) * C + c; }
};

// The first token of segment j (T for the empty segments at the end when L * 32 > T).
__device__ int64_t segment_start(int j, int64_t L, int64_t T) { return min(j * L, T); }

template <bool kOfficial, class F>
__global__ void __launch_bounds__(kForwardThreads)
    forward_kernel(int64_t B, int64_t T, int64_t C, const float* __restrict__ w, const float* __restrict__ u,
                   const F* __restrict__ k, const F* __restrict__ v, F* __restrict__ y, float* __restrict__ ends) {
  __shared__ Sum lefts[kSegments][kGroup], rights[kSegments][kGroup];
  const int g = threadIdx.x % kGroup, j = threadIdx.x / kGroup;
  const int64_t groups = (C + kGroup - 1) / kGroup;
  const int64_t L = biwkv_chunk_len(static_cast<int>(T), true);
  const int64_t a = segment_start(j, L, T), e = segment_start(j + 1, L, T);
  const Segment x{B, T, C, blockIdx.x / groups, (blockIdx.x % groups) * kGroup + g, a, e, tiles_per_segment(T), j};
  const bool active = x.c < C;
  const float wc = active ? w[x.c] : 0.0f, uc = active ? u[x.c] : 0.0f, rw = -expm1f(wc);

  // pass 1: the segment's right sum P (official: one more decay step per term) and left sum
  Sum P, H;
  bi_clear(P);
  bi_clear(H);
  for (int64_t t = active ? e - 1 : a - 1; t >= a; --t) {
    if ((t - a) % kTile == kTile - 1 || t == e - 1) {  // the last token of its tile: P before its push
      const int64_t i = (t - a) / kTile;
      ends[x.tile(0, i)] = static_cast<float>(P.n);
      ends[x.tile(1, i)] = static_cast<float>(P.d);
      ends[x.tile(2, i)] = P.base;
      ends[x.tile(3, i)] = P.steps;
    }
    const float kt = load(k + x.at(t)), vt = load(v + x.at(t));
    biwkv_right_push<kOfficial>(P, wc, kt, vt);
    bi_push(H, wc, kt, vt, 1.0f);
  }
  lefts[j][g] = bi_reversed(H, static_cast<float>(e - a));
  rights[j][g] = P;
  __syncthreads();
  if (!active) return;

  // combine, nearest segments first: A = Σ_{i<a} e^{-w (a-1-i)} x_i, the paper left sum entering the
  // segment (the official Q restarts from it); Pin = the right sum of token e - 1, all of it beyond e
  Sum A, Pin;
  bi_clear(A);
  bi_clear(Pin);
  for (int i = 1; i < kSegments; ++i) {
    if (j - i >= 0) bi_merge(A, lefts[j - i][g], static_cast<float>(a - segment_start(j - i + 1, L, T)), -wc);
    if (j + i < kSegments) bi_merge(Pin, rights[j + i][g], static_cast<float>(segment_start(j + i, L, T) - e), -wc);
  }

  // pass 2
  Sum Q = A, R;
  Max RR{WKV4_EMPTY_MAX, 0.0f, 0.0f};
  bi_clear(R);
  for (int64_t t0 = a; t0 < e; t0 += kTile) {
    const int64_t i = (t0 - a) / kTile, n = min(static_cast<int64_t>(kTile), e - t0);
    Sum Pt = {ends[x.tile(0, i)], ends[x.tile(1, i)], ends[x.tile(2, i)], ends[x.tile(3, i)]};
    bi_merge(Pt, Pin, static_cast<float>(e - t0 - n), -wc);  // P_t at the tile's last token
    Sum Ps[kTile];
    float ks[kTile], vs[kTile];
#pragma unroll
    for (int r = kTile - 1; r >= 0; --r) {
      if (r < n) {
        ks[r] = load(k + x.at(t0 + r));
        vs[r] = load(v + x.at(t0 + r));
        Ps[r] = Pt;
        biwkv_right_push<kOfficial>(Pt, wc, ks[r], vs[r]);
      }
    }
#pragma unroll
    for (int r = 0; r < kTile; ++r) {
      if (r < n) {
        const int64_t t = t0 + r;
        if (kOfficial) {
          if (t == a) {
            biwkv_chunk_start(Q, A, R, RR, ks[r], static_cast<float>(t));
          } else {
            biwkv_residual_push(R, RR, wc, ks[r], vs[r], static_cast<float>(t));
          }
        }
        store(y + x.at(t), biwkv_forward_token<kOfficial>(Q, A, R, RR, Ps[r].n, Ps[r].d, bi_o(Ps[r], -wc), wc,
                                                          rw, uc, ks[r], vs[r]));
      }
    }
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

template <bool kOfficial, class F>
void launch_forward(int64_t B, int64_t T, int64_t C, const float* w, const float* u, const void* k, const void* v,
                    void* y, float* ends, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>(B * ((C + kGroup - 1) / kGroup));
  forward_kernel<kOfficial, F><<<blocks, kForwardThreads, 0, stream>>>(
      B, T, C, w, u, static_cast<const F*>(k), static_cast<const F*>(v), static_cast<F*>(y), ends);
}

template <bool kOfficial, class F>
void launch_backward(int64_t B, int64_t T, int64_t C, const float* w, const float* u, const void* k, const void* v,
                     const void* gy, float* gk, float* gv, float* gw, float* gu, float* rows, cudaStream_t stream) {
  const auto blocks = static_cast<unsigned>((B * C + kThreads - 1) / kThreads);
  backward_kernel<kOfficial, F><<<blocks, kThreads, 0, stream>>>(
      B, T, C, w, u, static_cast<const F*>(k), static_cast<const F*>(v), static_cast<const F*>(gy), gk, gv, gw, gu,
      rows);
}

}  // namespace

// Scratch floats the launchers need: the forward's tile ends, the backward's per-token rows.
int64_t rwkv_mm_biwkv_scratch_floats(bool backward, int64_t B, int64_t T, int64_t C) {
  return backward ? kBackwardFields * B * T * C : kTileFields * B * kSegments * tiles_per_segment(T) * C;
}

// dtype: 0 float32, 1 float16, 2 bfloat16 (k, v, y). Returns the launch status.
cudaError_t rwkv_mm_biwkv_forward_cuda(int dtype, bool official, int64_t B, int64_t T, int64_t C, const float* w,
                                       const float* u, const void* k, const void* v, void* y, float* ends,
                                       cudaStream_t stream) {
  if (B * C == 0 || T == 0) return cudaSuccess;
  if (official) {
    if (dtype == 0) launch_forward<true, float>(B, T, C, w, u, k, v, y, ends, stream);
    if (dtype == 1) launch_forward<true, __half>(B, T, C, w, u, k, v, y, ends, stream);
    if (dtype == 2) launch_forward<true, __nv_bfloat16>(B, T, C, w, u, k, v, y, ends, stream);
  } else {
    if (dtype == 0) launch_forward<false, float>(B, T, C, w, u, k, v, y, ends, stream);
    if (dtype == 1) launch_forward<false, __half>(B, T, C, w, u, k, v, y, ends, stream);
    if (dtype == 2) launch_forward<false, __nv_bfloat16>(B, T, C, w, u, k, v, y, ends, stream);
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
