// RWKV-7 recurrence steps, shared by the C++ CPU kernel (csrc/wkv7.cpp) and the CUDA kernel
// (cuda/wkv7.cu): one arithmetic, two launchers.
//
// Layout (ARCHITECTURE.md): a head's state S is N x N, row i = value index, column j = key index,
// row-major. Token vectors r, ew = e^w, k, a, b are indexed by the key index j; v and y by i.
//
// Forward, per token (S_t = state after token t):
//   sa_i   = sum_j S_{t-1}[i,j] a_j
//   S_t[i,j] = S_{t-1}[i,j] ew_j + sa_i b_j + v_i k_j
//   y_i    = sum_j S_t[i,j] r_j
//
// Backward, tokens from last to first, dS = dL/dS_t (starting from the final state's gradient):
//   row i (reads and writes row i of dS only):
//     dS[i,:] += dy_i r;   dv_i = dS[i,:] . k;   dsa_i = dS[i,:] . b
//   element (i, j), summed over the rows i into column sums (needs dsa of every row):
//     dr_j += dy_i S_t[i,j]          dk_j += dS[i,j] v_i          db_j += dS[i,j] sa_i
//     dw_j += dS[i,j] S_{t-1}[i,j]   da_j += dsa_i S_{t-1}[i,j]
//     dS[i,j] <- dS[i,j] ew_j + dsa_i a_j                       (now dL/dS_{t-1})
//   then dw_j *= ew_j (w is a log decay). After token 0, dS is the initial state's gradient.
// The CPU kernel runs the element step as "for i: for j" with the column sums as vectors over j
// (contiguous, vectorised); the CUDA kernel gives thread j column j and loops over i, with dS in
// shared memory. Both call the same functions below, in the same order over i.
//
// Template parameter N: the head size when known at compile time (loops fully unrolled on the GPU,
// fixed-length vector loops on the CPU), or 0 to use the runtime size n.
#pragma once

#include "rwkv_mm/common.h"

// Loop hints: unrolled on the GPU (so that register arrays stay in registers), vectorised with
// OpenMP simd on the CPU, none in the host pass of a .cu file. wkv6.h reuses them and the row helpers.
#define RWKV_MM_PRAGMA(x) _Pragma(#x)
#if defined(__CUDA_ARCH__)
#define RWKV_MM_VECTOR_LOOP RWKV_MM_PRAGMA(unroll)
#define RWKV_MM_UNROLL RWKV_MM_PRAGMA(unroll)
#elif defined(__CUDACC__)
#define RWKV_MM_VECTOR_LOOP
#define RWKV_MM_UNROLL
#else
#define RWKV_MM_VECTOR_LOOP RWKV_MM_PRAGMA(omp simd)
#define RWKV_MM_UNROLL RWKV_MM_PRAGMA(GCC unroll 16)
#endif

namespace rwkv_mm {
namespace wkv7 {

// Tokens per checkpoint: the forward saves the state entering every segment of this many tokens,
// and the backward recomputes a segment's states from its checkpoint before walking it backwards.
constexpr int kSegment = 16;

// The loop length: the compile-time N when given, else the runtime n.
template <int N>
RWKV_HD int extent(int n) {
  return N > 0 ? N : n;
}

// Partial sums of a length-n reduction: lane l adds terms j = l, l + kLanes, ..., and the lanes are
// combined pairwise at the end. The same order on both launchers; on the CPU the lanes are one vector
// register (no serial horizontal sum), on the GPU they are kLanes independent dependency chains. Every
// loop has a literal trip count, so the lanes stay in registers on the GPU.
constexpr int kLanes = 16;

template <typename F>
struct Partials {
  F p[kLanes];
  RWKV_HD Partials() {
    RWKV_MM_VECTOR_LOOP
    for (int l = 0; l < kLanes; ++l) p[l] = 0;
  }
  RWKV_HD F total() const {
    static_assert(kLanes == 16, "the pairwise sum below is written for 16 lanes");
    F q[8];
    RWKV_MM_VECTOR_LOOP
    for (int l = 0; l < 8; ++l) q[l] = p[l] + p[l + 8];
    RWKV_MM_VECTOR_LOOP
    for (int l = 0; l < 4; ++l) q[l] += q[l + 4];
    return (q[0] + q[2]) + (q[1] + q[3]);
  }
};

template <int N, typename F>
RWKV_HD F dot(const F* x, const F* y, int n) {
  const int m = extent<N>(n);
  Partials<F> sum;
  RWKV_MM_UNROLL
  for (int j0 = 0; j0 < m; j0 += kLanes) {
    RWKV_MM_VECTOR_LOOP
    for (int l = 0; l < kLanes; ++l)
      if (j0 + l < m) sum.p[l] += x[j0 + l] * y[j0 + l];
  }
  return sum.total();
}

// The state update of one element.
template <typename F>
RWKV_HD F next_state(F s, F ew, F sa, F b, F v, F k) {
  return s * ew + sa * b + v * k;
}

// One token on one state row s (length n): s_out = s_in diag(ew) + sa b + v k, where sa = s_in . a.
// s_out may be s_in. Returns sa.
template <int N, typename F>
RWKV_HD F update_row(const F* s_in, F* s_out, const F* ew, const F* k, const F* a, const F* b, F v, int n) {
  const int m = extent<N>(n);
  const F sa = dot<N>(s_in, a, n);
  RWKV_MM_VECTOR_LOOP
  for (int j = 0; j < m; ++j) s_out[j] = next_state(s_in[j], ew[j], sa, b[j], v, k[j]);
  return sa;
}

// update_row, then returns y_i = s_out . r.
template <int N, typename F>
RWKV_HD F forward_row(const F* s_in, F* s_out, const F* r, const F* ew, const F* k, const F* a, const F* b,
                      F v, int n) {
  const int m = extent<N>(n);
  const F sa = dot<N>(s_in, a, n);
  Partials<F> y;
  RWKV_MM_UNROLL
  for (int j0 = 0; j0 < m; j0 += kLanes) {
    RWKV_MM_VECTOR_LOOP
    for (int l = 0; l < kLanes; ++l) {
      const int j = j0 + l;
      if (j < m) {
        const F s = next_state(s_in[j], ew[j], sa, b[j], v, k[j]);
        s_out[j] = s;
        y.p[l] += s * r[j];
      }
    }
  }
  return y.total();
}

template <typename F>
struct RowGrads {
  F dv;   // dL/dv_i
  F dsa;  // dL/dsa_i
};

// Backward row step on row i of dS (length n): adds dy_i r, returns dv_i and dsa_i.
template <int N, typename F>
RWKV_HD RowGrads<F> backward_row(F* ds, F dy, const F* r, const F* k, const F* b, int n) {
  const int m = extent<N>(n);
  Partials<F> dv, dsa;
  RWKV_MM_UNROLL
  for (int j0 = 0; j0 < m; j0 += kLanes) {
    RWKV_MM_VECTOR_LOOP
    for (int l = 0; l < kLanes; ++l) {
      const int j = j0 + l;
      if (j < m) {
        const F d = ds[j] + dy * r[j];
        ds[j] = d;
        dv.p[l] += d * k[j];
        dsa.p[l] += d * b[j];
      }
    }
  }
  return {dv.total(), dsa.total()};
}

// Per-row scalars of one token that the element step reads.
template <typename F>
struct RowScalars {
  F v, sa, dy, dsa;
};

// Backward element step for (i, j): adds row i's terms to column j's sums and turns dS[i,j] into
// dL/dS_{t-1}[i,j]. s_prev = S_{t-1}[i,j], s_cur = S_t[i,j]; ew, a: column j's ew_j, a_j.
template <typename F>
RWKV_HD void backward_element(F& ds, F s_prev, F s_cur, const RowScalars<F>& row, F ew, F a, F& dr, F& dk,
                              F& db, F& dw, F& da) {
  dr += row.dy * s_cur;
  dk += ds * row.v;
  db += ds * row.sa;
  dw += ds * s_prev;
  da += row.dsa * s_prev;
  ds = ds * ew + row.dsa * a;
}

// dL/dw_j from the column sum of dS[i,j] S_{t-1}[i,j] (the step multiplies by e^{w_j}).
template <typename F>
RWKV_HD F log_decay_grad(F dw_sum, F ew) {
  return dw_sum * ew;
}

// Number of checkpoint segments for T tokens.
RWKV_HD int num_segments(int T) {
  return (T + kSegment - 1) / kSegment;
}

}  // namespace wkv7
}  // namespace rwkv_mm
