// RWKV-5/6 WKV on CUDA: one block per (batch, head), one thread per state row. Plain CUDA (no torch
// headers, for ~35 s builds); cuda/wkv6.cpp binds the two launchers at the end of this file.
//
// The arithmetic is include/rwkv_mm/wkv6.h's, the same functions the CPU kernel calls; this file only
// stages token vectors in shared memory and synchronises. Layouts (all contiguous):
//   r, k, v: [B, T, H, N] in In (float, bf16, fp16 or double); y: [B, T, H, N] in In
//   w (log decay): [B, T, H, N] or [H, N] (RWKV-5: read with zero batch and token strides), in the
//     compute type F (float; double for double); u: [H, N] in F
//   dy and the gradients of r, w, k, v: [B, T, H, N] in F; the gradient of u per batch: [B, H, N] in F
//   states, their gradients: [B, H, N, N] in F, row i = value index, column j = key index
//   checkpoints: [B, H, S, N, N] in F, S = ceil(T / kSegment): the state entering token s * kSegment
//   backward scratch: [B * H, kSegment, N, N] in F: the states entering one segment's tokens
// Any T, any B; N = 64 is compiled with a fixed size (the forward keeps its state row in registers);
// other N use runtime loops with the row in global memory (the forward).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "rwkv_mm/wkv6.h"

namespace {

using namespace rwkv_mm::wkv6;

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float widen(__half x) { return __half2float(x); }

template <typename Out>
__device__ __forceinline__ Out narrow(float x) { return static_cast<Out>(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half narrow<__half>(float x) { return __float2half(x); }

template <typename Out, typename F>
__device__ __forceinline__ Out store_as(F x) {
  if constexpr (sizeof(F) == 8) return static_cast<Out>(x);  // double in, double out
  else return narrow<Out>(x);
}

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }

// Offsets of the N-vector of (batch bi, token t, head h): tokens, and the decay (strides wb, wt).
struct Index {
  long long T, H, n, wb, wt;
  __device__ long long at(long long bi, long long t, long long h) const { return ((bi * T + t) * H + h) * n; }
  __device__ long long at_w(long long bi, long long t, long long h) const { return bi * wb + t * wt + h * n; }
};

// Forward. Grid: B * H blocks; block: n threads (thread i = state row i); shared: 4 n F.
template <int N, typename In, typename F>
__global__ void forward_kernel(int B, int T, int H, int n, long long w_batch, long long w_token,
                               const In* __restrict__ r, const F* __restrict__ w, const In* __restrict__ k,
                               const In* __restrict__ v, const F* __restrict__ u, const F* __restrict__ s0,
                               In* __restrict__ y, F* __restrict__ s_out, F* __restrict__ ckpt) {
  extern __shared__ __align__(16) unsigned char smem[];
  F* r_s = reinterpret_cast<F*>(smem);  // the token's r, e^w, k, u ⊙ k over the key index
  F *ew_s = r_s + n, *k_s = ew_s + n, *uk_s = k_s + n;
  const long long bh = blockIdx.x;
  if (bh >= static_cast<long long>(B) * H) return;  // uniform over the block
  const int i = threadIdx.x;                         // blockDim.x == n (the launcher)
  const long long bi = bh / H, h = bh % H, nn = static_cast<long long>(n) * n;
  const Index ix{T, H, n, w_batch, w_token};
  const int segments = num_segments(T);
  const F u_i = u[h * n + i];

  F s_reg[N > 0 ? N : 1];
  F* s = N > 0 ? s_reg : s_out + bh * nn + static_cast<long long>(i) * n;  // state row i
  const F* s0_row = s0 + bh * nn + static_cast<long long>(i) * n;
  RWKV_MM_UNROLL
  for (int j = 0; j < extent<N>(n); ++j) s[j] = s0_row[j];

  for (int t = 0; t < T; ++t) {
    const long long o = ix.at(bi, t, h);
    if (ckpt != nullptr && t % kSegment == 0) {
      F* c = ckpt + (bh * segments + t / kSegment) * nn + static_cast<long long>(i) * n;
      RWKV_MM_UNROLL
      for (int j = 0; j < extent<N>(n); ++j) c[j] = s[j];
    }
    __syncthreads();  // every row is done with the previous token's vectors
    r_s[i] = widen(r[o + i]);
    ew_s[i] = exp_of(w[ix.at_w(bi, t, h) + i]);
    k_s[i] = widen(k[o + i]);
    uk_s[i] = u_i * k_s[i];
    __syncthreads();
    y[o + i] = store_as<In>(forward_row<N>(s, s, r_s, ew_s, k_s, uk_s, F(widen(v[o + i])), n));
  }
  if (N > 0) {
    F* out = s_out + bh * nn + static_cast<long long>(i) * n;
    RWKV_MM_UNROLL
    for (int j = 0; j < extent<N>(n); ++j) out[j] = s[j];
  }
}

// Backward. Grid: B * H blocks; block: n threads; thread x is state row x in the row steps and state
// column x in the element steps. Shared: dS [n][n + 1] (padded: rows and columns both conflict-free)
// and 6 vectors of n.
template <int N, typename In, typename F>
__global__ void backward_kernel(int B, int T, int H, int n, long long w_batch, long long w_token,
                                const In* __restrict__ r, const F* __restrict__ w, const In* __restrict__ k,
                                const In* __restrict__ v, const F* __restrict__ u, const F* __restrict__ ckpt,
                                const F* __restrict__ dy, const F* __restrict__ ds_last, F* __restrict__ dr,
                                F* __restrict__ dw, F* __restrict__ dk, F* __restrict__ dv, F* __restrict__ du,
                                F* __restrict__ ds_first, F* __restrict__ scratch) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int ld = n + 1;
  F* ds = reinterpret_cast<F*>(smem);  // dL/dS of the state after the current token, [n][ld]
  F *r_s = ds + n * ld, *ew_s = r_s + n, *k_s = ew_s + n, *uk_s = k_s + n, *v_s = uk_s + n, *dy_s = v_s + n;
  const long long bh = blockIdx.x;
  if (bh >= static_cast<long long>(B) * H) return;  // uniform over the block
  const int x = threadIdx.x;                         // blockDim.x == n (the launcher)
  const long long bi = bh / H, h = bh % H, nn = static_cast<long long>(n) * n;
  const Index ix{T, H, n, w_batch, w_token};
  const int segments = num_segments(T);
  F* states = scratch + bh * kSegment * nn;  // states[s] = the state entering token t0 + s

  const F u_x = u[h * n + x];
  F du_x = 0;
  for (int row = 0; row < n; ++row) ds[row * ld + x] = ds_last[bh * nn + row * n + x];

  for (int seg = segments - 1; seg >= 0; --seg) {
    const int t0 = seg * kSegment, t1 = min(T, t0 + kSegment);
    __syncthreads();  // the previous segment's element steps are done with states

    // Recompute the states entering the segment's tokens; thread x owns row x.
    F s_reg[N > 0 ? N : 1];
    const F* c = ckpt + (bh * segments + seg) * nn + static_cast<long long>(x) * n;
    RWKV_MM_UNROLL
    for (int j = 0; j < extent<N>(n); ++j) {
      states[static_cast<long long>(x) * n + j] = c[j];
      if (N > 0) s_reg[j] = c[j];
    }
    for (int t = t0; t < t1 - 1; ++t) {
      const long long o = ix.at(bi, t, h);
      __syncthreads();
      ew_s[x] = exp_of(w[ix.at_w(bi, t, h) + x]);
      k_s[x] = widen(k[o + x]);
      __syncthreads();
      F* next = states + (t - t0 + 1) * nn + static_cast<long long>(x) * n;
      const F vx = widen(v[o + x]);
      if (N > 0) {
        update_row<N>(s_reg, s_reg, ew_s, k_s, vx, n);
        RWKV_MM_UNROLL
        for (int j = 0; j < extent<N>(n); ++j) next[j] = s_reg[j];
      } else {
        update_row<N>(next - nn, next, ew_s, k_s, vx, n);
      }
    }

    // Walk the segment backwards.
    for (int t = t1 - 1; t >= t0; --t) {
      const long long o = ix.at(bi, t, h);
      __syncthreads();  // states visible; the previous element step is done with the vectors
      r_s[x] = widen(r[o + x]);
      ew_s[x] = exp_of(w[ix.at_w(bi, t, h) + x]);
      k_s[x] = widen(k[o + x]);
      uk_s[x] = u_x * k_s[x];
      v_s[x] = widen(v[o + x]);
      dy_s[x] = dy[o + x];
      __syncthreads();
      const F dyv = dot<N>(dy_s, v_s, n);
      dv[o + x] = backward_row<N>(ds + x * ld, dy_s[x], r_s, k_s, uk_s, n);  // row x
      __syncthreads();
      const F* s_prev = states + (t - t0) * nn + x;  // column x, stride n
      const F ew_x = ew_s[x], r_x = r_s[x], k_x = k_s[x];
      F gr = 0, gk = 0, gw = 0;
      RWKV_MM_UNROLL
      for (int row = 0; row < extent<N>(n); ++row) {  // column x
        const RowScalars<F> rs{v_s[row], dy_s[row]};
        backward_element(ds[row * ld + x], s_prev[static_cast<long long>(row) * n], rs, ew_x, r_x, gr, gk, gw);
      }
      finish_column(gr, gk, gw, du_x, r_x, ew_x, k_x, u_x, dyv);
      dr[o + x] = gr;
      dw[o + x] = gw;
      dk[o + x] = gk;
    }
  }
  __syncthreads();
  for (int row = 0; row < n; ++row) ds_first[bh * nn + row * n + x] = ds[row * ld + x];
  du[bh * n + x] = du_x;
}

size_t forward_smem(int n, size_t f) { return 4 * static_cast<size_t>(n) * f; }
size_t backward_smem(int n, size_t f) { return (static_cast<size_t>(n) * (n + 1) + 6 * static_cast<size_t>(n)) * f; }

// Shared memory above the default 48 KB must be requested per kernel.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <int N, typename In, typename F>
cudaError_t forward_typed(int B, int T, int H, int n, long long wb, long long wt, const void* r, const void* w,
                          const void* k, const void* v, const void* u, const void* s0, void* y, void* s_out,
                          void* ckpt, cudaStream_t stream) {
  const size_t smem = forward_smem(n, sizeof(F));
  auto kernel = forward_kernel<N, In, F>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<B * H, n, smem, stream>>>(B, T, H, n, wb, wt, static_cast<const In*>(r), static_cast<const F*>(w),
                                     static_cast<const In*>(k), static_cast<const In*>(v), static_cast<const F*>(u),
                                     static_cast<const F*>(s0), static_cast<In*>(y), static_cast<F*>(s_out),
                                     static_cast<F*>(ckpt));
  return cudaGetLastError();
}

template <int N, typename In, typename F>
cudaError_t backward_typed(int B, int T, int H, int n, long long wb, long long wt, const void* r, const void* w,
                           const void* k, const void* v, const void* u, const void* ckpt, const void* dy,
                           const void* ds_last, void* dr, void* dw, void* dk, void* dv, void* du, void* ds_first,
                           void* scratch, cudaStream_t stream) {
  const size_t smem = backward_smem(n, sizeof(F));
  auto kernel = backward_kernel<N, In, F>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<B * H, n, smem, stream>>>(
      B, T, H, n, wb, wt, static_cast<const In*>(r), static_cast<const F*>(w), static_cast<const In*>(k),
      static_cast<const In*>(v), static_cast<const F*>(u), static_cast<const F*>(ckpt), static_cast<const F*>(dy),
      static_cast<const F*>(ds_last), static_cast<F*>(dr), static_cast<F*>(dw), static_cast<F*>(dk),
      static_cast<F*>(dv), static_cast<F*>(du), static_cast<F*>(ds_first), static_cast<F*>(scratch));
  return cudaGetLastError();
}

}  // namespace

// err = NAME<N, In, F>(...) for the dtype code (0 float, 1 bf16, 2 fp16, 3 double) and head size n.
#define RWKV_MM_DISPATCH(NAME, ...)                                                   \
  switch (dtype) {                                                                    \
    case 0:                                                                           \
      err = n == 64 ? NAME<64, float, float>(__VA_ARGS__) : NAME<0, float, float>(__VA_ARGS__); \
      break;                                                                          \
    case 1:                                                                           \
      err = n == 64 ? NAME<64, __nv_bfloat16, float>(__VA_ARGS__)                     \
                    : NAME<0, __nv_bfloat16, float>(__VA_ARGS__);                     \
      break;                                                                          \
    case 2:                                                                           \
      err = n == 64 ? NAME<64, __half, float>(__VA_ARGS__) : NAME<0, __half, float>(__VA_ARGS__); \
      break;                                                                          \
    case 3:                                                                           \
      err = n == 64 ? NAME<64, double, double>(__VA_ARGS__) : NAME<0, double, double>(__VA_ARGS__); \
      break;                                                                          \
    default:                                                                          \
      return "unsupported dtype code";                                                \
  }

// Launchers, declared in cuda/wkv6.cpp. dtype: 0 float, 1 bf16, 2 fp16 (compute in float), 3 double.
// w_batch, w_token: the decay's strides (T H N, H N; or 0, 0 for an [H, N] decay).
// Return nullptr on success, else the CUDA error string.
const char* wkv6_cuda_forward(int dtype, int B, int T, int H, int n, long long w_batch, long long w_token,
                              const void* r, const void* w, const void* k, const void* v, const void* u,
                              const void* s0, void* y, void* s_out, void* ckpt, void* stream) {
  if (B * H == 0 || n == 0) return nullptr;
  cudaError_t err = cudaSuccess;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  RWKV_MM_DISPATCH(forward_typed, B, T, H, n, w_batch, w_token, r, w, k, v, u, s0, y, s_out, ckpt, s)
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* wkv6_cuda_backward(int dtype, int B, int T, int H, int n, long long w_batch, long long w_token,
                               const void* r, const void* w, const void* k, const void* v, const void* u,
                               const void* ckpt, const void* dy, const void* ds_last, void* dr, void* dw, void* dk,
                               void* dv, void* du, void* ds_first, void* scratch, void* stream) {
  if (B * H == 0 || n == 0) return nullptr;
  cudaError_t err = cudaSuccess;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  RWKV_MM_DISPATCH(backward_typed, B, T, H, n, w_batch, w_token, r, w, k, v, u, ckpt, dy, ds_last, dr, dw, dk, dv,
                   du, ds_first, scratch, s)
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
