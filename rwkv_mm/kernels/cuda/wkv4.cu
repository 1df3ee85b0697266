// RWKV-4 WKV on CUDA: forward and backward of `naive_wkv4`, one thread per (batch, channel).
//
// Plain CUDA (no torch headers: they make nvcc builds ~6x slower); cuda/wkv4.cpp binds the launchers.
// Layout: k, v, y, gy, gk, gv [B, T, C] (float32, float16 or bfloat16; channels innermost, so the
// threads of a warp read consecutive channels); w, u [C] and the state (num, den, max) [B, C] float32.
// Arithmetic: float32, the per-channel steps of include/rwkv_mm/wkv4.h (the CPU kernel's). Any T, B, C.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "rwkv_mm/wkv4.h"

namespace {

using rwkv_mm::wkv4_backward_step;
using rwkv_mm::wkv4_output;
using rwkv_mm::wkv4_update;

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }

// Small blocks spread few (batch, channel) threads over more multiprocessors.
constexpr int kThreads = 64;

// num, den, mx: the initial state on entry, the final one on return.
template <class F>
__global__ void forward_kernel(int64_t B, int64_t T, int64_t C, const float* __restrict__ w,
                               const float* __restrict__ u, const F* __restrict__ k, const F* __restrict__ v,
                               F* __restrict__ y, float* __restrict__ num, float* __restrict__ den,
                               float* __restrict__ mx) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // b * C + c
  if (i >= B * C) return;
  const int64_t b = i / C, c = i % C;
  const float wc = w[c], uc = u[c];
  float n = num[i], d = den[i], base = mx[i], steps = 0.0f;  // max = base + steps * w
  for (int64_t t = 0, at = b * T * C + c; t < T; ++t, at += C) {
    const float kt = load(k + at), vt = load(v + at);
    store(y + at, wkv4_output(n, d, base + steps * wc, uc, kt, vt));
    wkv4_update(n, d, base, steps, wc, kt, vt);
  }
  num[i] = n;
  den[i] = d;
  mx[i] = base + steps * wc;
}

// states: scratch [3, B, T, C] float32 (the state entering each token). gw, gu [B, C] per batch row.
// gn, gd, go: the final state's gradients on entry, the initial state's on return.
template <class F>
__global__ void backward_kernel(int64_t B, int64_t T, int64_t C, const float* __restrict__ w,
                                const float* __restrict__ u, const F* __restrict__ k, const F* __restrict__ v,
                                const float* __restrict__ num0, const float* __restrict__ den0,
                                const float* __restrict__ mx0, const F* __restrict__ gy, F* __restrict__ gk,
                                F* __restrict__ gv, float* __restrict__ gw, float* __restrict__ gu,
                                float* __restrict__ gn, float* __restrict__ gd, float* __restrict__ go,
                                float* __restrict__ states) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * C) return;
  const int64_t b = i / C, c = i % C, field = B * T * C;
  const float wc = w[c], uc = u[c];
  float n = num0[i], d = den0[i], base = mx0[i], steps = 0.0f;
  for (int64_t t = 0, at = b * T * C + c; t < T; ++t, at += C) {
    states[at] = n;
    states[field + at] = d;
    states[2 * field + at] = base + steps * wc;
    wkv4_update(n, d, base, steps, wc, load(k + at), load(v + at));
  }
  float g_n = gn[i], g_d = gd[i], delta = go[i] - (gn[i] * n + gd[i] * d);
  float g_w = 0.0f, g_u = 0.0f;
  for (int64_t t = T - 1, at = b * T * C + (T - 1) * C + c; t >= 0; --t, at -= C) {
    float dk, dv;
    wkv4_backward_step(states[at], states[field + at], states[2 * field + at], wc, uc, load(k + at),
                       load(v + at), load(gy + at), g_n, g_d, delta, dk, dv, g_w, g_u);
    store(gk + at, dk);
    store(gv + at, dv);
  }
  gw[i] = g_w;
  gu[i] = g_u;
  gn[i] = g_n;
  gd[i] = g_d;
  go[i] = g_n * num0[i] + g_d * den0[i] + delta;
}

unsigned blocks(int64_t B, int64_t C) { return static_cast<unsigned>((B * C + kThreads - 1) / kThreads); }

}  // namespace

// dtype: 0 float32, 1 float16, 2 bfloat16 (k, v, y). Returns the launch status.
cudaError_t rwkv_mm_wkv4_forward_cuda(int dtype, int64_t B, int64_t T, int64_t C, const float* w, const float* u,
                                      const void* k, const void* v, void* y, float* num, float* den, float* mx,
                                      cudaStream_t stream) {
  if (B * C == 0) return cudaSuccess;
  const unsigned grid = blocks(B, C);
  if (dtype == 0) {
    forward_kernel<<<grid, kThreads, 0, stream>>>(B, T, C, w, u, static_cast<const float*>(k),
                                                  static_cast<const float*>(v), static_cast<float*>(y), num, den,
                                                  mx);
  } else if (dtype == 1) {
    forward_kernel<<<grid, kThreads, 0, stream>>>(B, T, C, w, u, static_cast<const __half*>(k),
                                                  static_cast<const __half*>(v), static_cast<__half*>(y), num, den,
                                                  mx);
  } else {
    forward_kernel<<<grid, kThreads, 0, stream>>>(B, T, C, w, u, static_cast<const __nv_bfloat16*>(k),
                                                  static_cast<const __nv_bfloat16*>(v),
                                                  static_cast<__nv_bfloat16*>(y), num, den, mx);
  }
  return cudaGetLastError();
}

// dtype as above (k, v, gy, gk, gv). states: scratch of 3 * B * T * C floats.
cudaError_t rwkv_mm_wkv4_backward_cuda(int dtype, int64_t B, int64_t T, int64_t C, const float* w, const float* u,
                                       const void* k, const void* v, const float* num0, const float* den0,
                                       const float* mx0, const void* gy, void* gk, void* gv, float* gw, float* gu,
                                       float* gn, float* gd, float* go, float* states, cudaStream_t stream) {
  if (B * C == 0) return cudaSuccess;
  const unsigned grid = blocks(B, C);
  if (dtype == 0) {
    backward_kernel<<<grid, kThreads, 0, stream>>>(
        B, T, C, w, u, static_cast<const float*>(k), static_cast<const float*>(v), num0, den0, mx0,
        static_cast<const float*>(gy), static_cast<float*>(gk), static_cast<float*>(gv), gw, gu, gn, gd, go, states);
  } else if (dtype == 1) {
    backward_kernel<<<grid, kThreads, 0, stream>>>(
        B, T, C, w, u, static_cast<const __half*>(k), static_cast<const __half*>(v), num0, den0, mx0,
        static_cast<const __half*>(gy), static_cast<__half*>(gk), static_cast<__half*>(gv), gw, gu, gn, gd, go,
        states);
  } else {
    backward_kernel<<<grid, kThreads, 0, stream>>>(
        B, T, C, w, u, static_cast<const __nv_bfloat16*>(k), static_cast<const __nv_bfloat16*>(v), num0, den0, mx0,
        static_cast<const __nv_bfloat16*>(gy), static_cast<__nv_bfloat16*>(gk), static_cast<__nv_bfloat16*>(gv), gw,
        gu, gn, gd, go, states);
  }
  return cudaGetLastError();
}
