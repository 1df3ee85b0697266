// RWKV-7 WKV on CUDA: one block per (batch, head), one thread per state row. Plain CUDA (no torch
// headers, for ~35 s builds); cuda/wkv7.cpp binds the two launchers at the end of this file.
//
// The arithmetic is include/rwkv_mm/wkv7.h's, the same functions the CPU kernel calls; this file only
// stages token vectors in shared memory and synchronises. Layouts (all contiguous):
//   r, k, v, a, b: [B, T, H, N] in In (float, bf16, fp16 or double); y: [B, T, H, N] in In
//   w (log decay), dy and all gradients: [B, T, H, N] in the compute type F (float; double for double)
//   states, their gradients: [B, H, N, N] in F, row i = value index, column j = key index
//   checkpoints: [B, H, S, N, N] in F, S = ceil(T / kSegment): the state entering token s * kSegment
//   backward scratch: [B * H, kSegment + 1, N, N] in F: the recomputed states of one segment
// Any T (no compile-time length, no multiple-of-16 rule), any B; N = 64 is compiled with a fixed size
// (the forward keeps its state row in registers); other N use runtime loops with the row in global
// memory (the forward) — the launcher handles any 1 <= N <= 1024 that fits in shared memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "rwkv_mm/wkv7.h"

namespace {

using namespace rwkv_mm::wkv7;

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

// Forward. Grid: B * H blocks; block: n threads (thread i = state row i); shared: 5 n F.
template <int N, typename In, typename F>
__global__ void forward_kernel(int B, int T, int H, int n, const In* __restrict__ r, const F* __restrict__ w,
                               const In* __restrict__ k, const In* __restrict__ v, const In* __restrict__ a,
                               const In* __restrict__ b, const F* __restrict__ s0, In* __restrict__ y,
                               F* __restrict__ s_out, F* __restrict__ ckpt) {
  extern __shared__ __align__(16) unsigned char smem[];
  F* r_s = reinterpret_cast<F*>(smem);  // the token's r, e^w, k, a, b over the key index
  F *ew_s = r_s + n, *k_s = ew_s + n, *a_s = k_s + n, *b_s = a_s + n;
  const long long bh = blockIdx.x;
  if (bh >= static_cast<long long>(B) * H) return;  // uniform over the block
  const int i = threadIdx.x;                         // blockDim.x == n (the launcher)
  const long long bi = bh / H, h = bh % H, nn = static_cast<long long>(n) * n;
  const int segments = num_segments(T);

  F s_reg[N > 0 ? N : 1];
  F* s = N > 0 ? s_reg : s_out + bh * nn + static_cast<long long>(i) * n;  // state row i
  const F* s0_row = s0 + bh * nn + static_cast<long long>(i) * n;
  RWKV_MM_UNROLL
  for (int j = 0; j < extent<N>(n); ++j) s[j] = s0_row[j];

  for (int t = 0; t < T; ++t) {
    const long long o = ((bi * T + t) * H + h) * n;
    if (ckpt != nullptr && t % kSegment == 0) {
      F* c = ckpt + (bh * segments + t / kSegment) * nn + static_cast<long long>(i) * n;
      RWKV_MM_UNROLL
      for (int j = 0; j < extent<N>(n); ++j) c[j] = s[j];
    }
    __syncthreads();  // every row is done with the previous token's vectors
    r_s[i] = widen(r[o + i]);
    ew_s[i] = exp_of(w[o + i]);
    k_s[i] = widen(k[o + i]);
    a_s[i] = widen(a[o + i]);
    b_s[i] = widen(b[o + i]);
    __syncthreads();
    const F yi = forward_row<N>(s, s, r_s, ew_s, k_s, a_s, b_s, F(widen(v[o + i])), n);
    y[o + i] = store_as<In>(yi);
  }
  if (N > 0) {
    F* out = s_out + bh * nn + static_cast<long long>(i) * n;
    RWKV_MM_UNROLL
    for (int j = 0; j < extent<N>(n); ++j) out[j] = s[j];
  }
}

// Backward. Grid: B * H blocks; block: n threads; thread x is state row x in the row steps and state
// column x in the element steps. Shared: dS [n][n + 1] (padded: rows and columns both conflict-free),
// 8 token vectors of n, and sa of the segment's tokens [kSegment][n].
template <int N, typename In, typename F>
__global__ void backward_kernel(int B, int T, int H, int n, const In* __restrict__ r, const F* __restrict__ w,
                                const In* __restrict__ k, const In* __restrict__ v, const In* __restrict__ a,
                                const In* __restrict__ b, const F* __restrict__ ckpt, const F* __restrict__ dy,
                                const F* __restrict__ ds_last, F* __restrict__ dr, F* __restrict__ dw,
                                F* __restrict__ dk, F* __restrict__ dv, F* __restrict__ da, F* __restrict__ db,
                                F* __restrict__ ds_first, F* __restrict__ scratch) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int ld = n + 1;
  F* ds = reinterpret_cast<F*>(smem);  // dL/dS of the state after the current token, [n][ld]
  F *r_s = ds + n * ld, *ew_s = r_s + n, *k_s = ew_s + n, *a_s = k_s + n, *b_s = a_s + n;
  F *v_s = b_s + n, *dy_s = v_s + n, *dsa_s = dy_s + n, *sa_seg = dsa_s + n;
  const long long bh = blockIdx.x;
  if (bh >= static_cast<long long>(B) * H) return;  // uniform over the block
  const int x = threadIdx.x;                         // blockDim.x == n (the launcher)
  const long long bi = bh / H, h = bh % H, nn = static_cast<long long>(n) * n;
  const int segments = num_segments(T);
  F* states = scratch + bh * (kSegment + 1) * nn;  // states[s] = the state after token t0 + s - 1

  for (int row = 0; row < n; ++row) ds[row * ld + x] = ds_last[bh * nn + row * n + x];

  for (int seg = segments - 1; seg >= 0; --seg) {
    const int t0 = seg * kSegment, t1 = min(T, t0 + kSegment);
    __syncthreads();  // the previous segment's element steps are done with states and sa_seg

    // Recompute the segment's states from its checkpoint; thread x owns row x.
    F s_reg[N > 0 ? N : 1];
    const F* c = ckpt + (bh * segments + seg) * nn + static_cast<long long>(x) * n;
    RWKV_MM_UNROLL
    for (int j = 0; j < extent<N>(n); ++j) {
      states[static_cast<long long>(x) * n + j] = c[j];
      if (N > 0) s_reg[j] = c[j];
    }
    for (int t = t0; t < t1; ++t) {
      const long long o = ((bi * T + t) * H + h) * n;
      __syncthreads();
      ew_s[x] = exp_of(w[o + x]);
      k_s[x] = widen(k[o + x]);
      a_s[x] = widen(a[o + x]);
      b_s[x] = widen(b[o + x]);
      __syncthreads();
      F* next = states + (t - t0 + 1) * nn + static_cast<long long>(x) * n;
      const F vx = widen(v[o + x]);
      if (N > 0) {
        sa_seg[(t - t0) * n + x] = update_row<N>(s_reg, s_reg, ew_s, k_s, a_s, b_s, vx, n);
        RWKV_MM_UNROLL
        for (int j = 0; j < extent<N>(n); ++j) next[j] = s_reg[j];
      } else {
        sa_seg[(t - t0) * n + x] = update_row<N>(next - nn, next, ew_s, k_s, a_s, b_s, vx, n);
      }
    }

    // Walk the segment backwards.
    for (int t = t1 - 1; t >= t0; --t) {
      const long long o = ((bi * T + t) * H + h) * n;
      __syncthreads();  // states visible; the previous element step is done with the vectors
      r_s[x] = widen(r[o + x]);
      ew_s[x] = exp_of(w[o + x]);
      k_s[x] = widen(k[o + x]);
      a_s[x] = widen(a[o + x]);
      b_s[x] = widen(b[o + x]);
      v_s[x] = widen(v[o + x]);
      dy_s[x] = dy[o + x];
      __syncthreads();
      const RowGrads<F> g = backward_row<N>(ds + x * ld, dy_s[x], r_s, k_s, b_s, n);  // row x
      dv[o + x] = g.dv;
      dsa_s[x] = g.dsa;
      __syncthreads();
      const F* s_prev = states + (t - t0) * nn + x;  // column x, stride n
      const F* s_cur = s_prev + nn;
      const F* sa = sa_seg + (t - t0) * n;
      const F ew_x = ew_s[x], a_x = a_s[x];
      F gr = 0, gk = 0, gb = 0, gw = 0, ga = 0;
      RWKV_MM_UNROLL
      for (int row = 0; row < extent<N>(n); ++row) {  // column x
        const RowScalars<F> rs{v_s[row], sa[row], dy_s[row], dsa_s[row]};
        backward_element(ds[row * ld + x], s_prev[static_cast<long long>(row) * n],
                         s_cur[static_cast<long long>(row) * n], rs, ew_x, a_x, gr, gk, gb, gw, ga);
      }
      dr[o + x] = gr;
      dw[o + x] = log_decay_grad(gw, ew_x);
      dk[o + x] = gk;
      da[o + x] = ga;
      db[o + x] = gb;
    }
  }
  __syncthreads();
  for (int row = 0; row < n; ++row) ds_first[bh * nn + row * n + x] = ds[row * ld + x];
}

size_t forward_smem(int n, size_t f) { return 5 * static_cast<size_t>(n) * f; }
size_t backward_smem(int n, size_t f) {
  return (static_cast<size_t>(n) * (n + 1) + 8 * static_cast<size_t>(n) + kSegment * static_cast<size_t>(n)) * f;
}

// Shared memory above the default 48 KB must be requested per kernel.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <int N, typename In, typename F>
cudaError_t forward_typed(int B, int T, int H, int n, const void* r, const void* w, const void* k, const void* v,
                          const void* a, const void* b, const void* s0, void* y, void* s_out, void* ckpt,
                          cudaStream_t stream) {
  const size_t smem = forward_smem(n, sizeof(F));
  auto kernel = forward_kernel<N, In, F>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<B * H, n, smem, stream>>>(B, T, H, n, static_cast<const In*>(r), static_cast<const F*>(w),
                                     static_cast<const In*>(k), static_cast<const In*>(v), static_cast<const In*>(a),
                                     static_cast<const In*>(b), static_cast<const F*>(s0), static_cast<In*>(y),
                                     static_cast<F*>(s_out), static_cast<F*>(ckpt));
  return cudaGetLastError();
}

template <int N, typename In, typename F>
cudaError_t backward_typed(int B, int T, int H, int n, const void* r, const void* w, const void* k, const void* v,
                           const void* a, const void* b, const void* ckpt, const void* dy, const void* ds_last,
                           void* dr, void* dw, void* dk, void* dv, void* da, void* db, void* ds_first, void* scratch,
                           cudaStream_t stream) {
  const size_t smem = backward_smem(n, sizeof(F));
  auto kernel = backward_kernel<N, In, F>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<B * H, n, smem, stream>>>(
      B, T, H, n, static_cast<const In*>(r), static_cast<const F*>(w), static_cast<const In*>(k),
      static_cast<const In*>(v), static_cast<const In*>(a), static_cast<const In*>(b), static_cast<const F*>(ckpt),
      static_cast<const F*>(dy), static_cast<const F*>(ds_last), static_cast<F*>(dr), static_cast<F*>(dw),
      static_cast<F*>(dk), static_cast<F*>(dv), static_cast<F*>(da), static_cast<F*>(db), static_cast<F*>(ds_first),
      static_cast<F*>(scratch));
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

// Launchers, declared in cuda/wkv7.cpp. dtype: 0 float, 1 bf16, 2 fp16 (compute in float), 3 double.
// Return nullptr on success, else the CUDA error string.
const char* wkv7_cuda_forward(int dtype, int B, int T, int H, int n, const void* r, const void* w, const void* k,
                              const void* v, const void* a, const void* b, const void* s0, void* y, void* s_out,
                              void* ckpt, void* stream) {
  if (B * H == 0 || n == 0) return nullptr;
  cudaError_t err = cudaSuccess;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  RWKV_MM_DISPATCH(forward_typed, B, T, H, n, r, w, k, v, a, b, s0, y, s_out, ckpt, s)
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* wkv7_cuda_backward(int dtype, int B, int T, int H, int n, const void* r, const void* w, const void* k,
                               const void* v, const void* a, const void* b, const void* ckpt, const void* dy,
                               const void* ds_last, void* dr, void* dw, void* dk, void* dv, void* da, void* db,
                               void* ds_first, void* scratch, void* stream) {
  if (B * H == 0 || n == 0) return nullptr;
  cudaError_t err = cudaSuccess;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  RWKV_MM_DISPATCH(backward_typed, B, T, H, n, r, w, k, v, a, b, ckpt, dy, ds_last, dr, dw, dk, dv, da, db,
                   ds_first, scratch, s)
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
