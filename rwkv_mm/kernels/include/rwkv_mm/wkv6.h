// RWKV-5/6 recurrence steps, shared by the C++ CPU kernel (csrc/wkv6.cpp) and the CUDA kernel
// (cuda/wkv6.cu): one arithmetic, two launchers.
//
// Layout (ARCHITECTURE.md): a head's state S is N x N, row i = value index, column j = key index,
// row-major. Token vectors r, ew = e^w, k and the bonus u are indexed by the key index j; v, y by i.
//
// Forward, per token (S_{t-1} = state before token t; uk = u ⊙ k, the bonus of the current token):
//   y_i      = sum_j r_j (S_{t-1}[i,j] + uk_j v_i)
//   S_t[i,j] = S_{t-1}[i,j] ew_j + v_i k_j
//
// Backward, tokens from last to first, dS = dL/dS_t (starting from the final state's gradient):
//   row i (reads row i of dS):  dv_i = sum_j (dS[i,j] k_j + dy_i r_j uk_j)
//   element (i, j), summed over the rows i into column sums:
//     dr_j += dy_i S_{t-1}[i,j]      dk_j += dS[i,j] v_i      dw_j += dS[i,j] S_{t-1}[i,j]
//     dS[i,j] <- dS[i,j] ew_j + dy_i r_j                     (now dL/dS_{t-1})
//   per token, with dyv = dy . v:  dr_j += uk_j dyv;  dk_j += u_j r_j dyv;  du_j += r_j k_j dyv;
//   dw_j *= ew_j (w is a log decay). After token 0, dS is the initial state's gradient.
// The CPU kernel runs the element step as "for i: for j" with the column sums as vectors over j;
// the CUDA kernel gives thread j column j and loops over i, with dS in shared memory.
//
// Template parameter N: the head size when known at compile time, or 0 to use the runtime size n.
#pragma once

// The generic row helpers (extent, Partials, dot, loop hints) are wkv7.h's.
#include "rwkv_mm/wkv7.h"

namespace rwkv_mm {
namespace wkv6 {

using wkv7::dot;
using wkv7::extent;
using wkv7::kLanes;
using wkv7::Partials;

// Tokens per checkpoint: the forward saves the state entering every segment of this many tokens,
// and the backward recomputes a segment's states from its checkpoint before walking it backwards.
constexpr int kSegment = 16;

// One token on one state row (length n): s_out = s_in diag(ew) + v k. s_out may be s_in.
template <int N, typename F>
RWKV_HD void update_row(const F* s_in, F* s_out, const F* ew, const F* k, F v, int n) {
  const int m = extent<N>(n);
  RWKV_MM_VECTOR_LOOP
  for (int j = 0; j < m; ++j) s_out[j] = s_in[j] * ew[j] + v * k[j];
}

// Returns y_i = sum_j r_j (s_in[j] + uk_j v), uk = u ⊙ k, and updates the row like update_row.
template <int N, typename F>
RWKV_HD F forward_row(const F* s_in, F* s_out, const F* r, const F* ew, const F* k, const F* uk, F v, int n) {
  const int m = extent<N>(n);
  Partials<F> y;
  RWKV_MM_UNROLL
  for (int j0 = 0; j0 < m; j0 += kLanes) {
    RWKV_MM_VECTOR_LOOP
    for (int l = 0; l < kLanes; ++l) {
      const int j = j0 + l;
      if (j < m) {
        const F s = s_in[j];
        y.p[l] += r[j] * (s + uk[j] * v);
        s_out[j] = s * ew[j] + v * k[j];
      }
    }
  }
  return y.total();
}

// Backward row step on row i of dS (read only): returns dv_i = sum_j (dS[i,j] k_j + dy_i r_j uk_j).
template <int N, typename F>
RWKV_HD F backward_row(const F* ds, F dy, const F* r, const F* k, const F* uk, int n) {
  const int m = extent<N>(n);
  Partials<F> dv;
  RWKV_MM_UNROLL
  for (int j0 = 0; j0 < m; j0 += kLanes) {
    RWKV_MM_VECTOR_LOOP
    for (int l = 0; l < kLanes; ++l) {
      const int j = j0 + l;
      if (j < m) dv.p[l] += ds[j] * k[j] + dy * r[j] * uk[j];
    }
  }
  return dv.total();
}

// Per-row scalars of one token that the element step reads.
template <typename F>
struct RowScalars {
  F v, dy;
};

// Backward element step for (i, j): adds row i's terms to column j's sums and turns dS[i,j] into
// dL/dS_{t-1}[i,j]. s_prev = S_{t-1}[i,j]; ew, r: column j's ew_j, r_j.
template <typename F>
RWKV_HD void backward_element(F& ds, F s_prev, const RowScalars<F>& row, F ew, F r, F& dr, F& dk, F& dw) {
  dr += row.dy * s_prev;
  dk += ds * row.v;
  dw += ds * s_prev;
  ds = ds * ew + row.dy * r;
}

// Completes column j's gradients of one token from the element sums: the bonus terms (dyv = dy . v)
// and the log-decay factor. du accumulates over the tokens.
template <typename F>
RWKV_HD void finish_column(F& dr, F& dk, F& dw, F& du, F r, F ew, F k, F u, F dyv) {
  dr += u * k * dyv;
  dk += u * r * dyv;
  du += r * k * dyv;
  dw *= ew;
}

using wkv7::num_segments;  // wkv7::kSegment == kSegment
static_assert(wkv7::kSegment == kSegment, "num_segments assumes the same segment length");

}  // namespace wkv6
}  // namespace rwkv_mm
