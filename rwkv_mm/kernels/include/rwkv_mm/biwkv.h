// Vision-RWKV Bi-WKV, one channel at a time: the per-token bodies of every pass, shared by
// csrc/biwkv.cpp (CPU, vectorised across channels) and cuda/biwkv.cu (forward: threads over token
// segments of a channel, joined with bi_merge; backward: one thread per (batch, channel)).
// The launchers only loop over tokens, load inputs and keep the scratch rows; all arithmetic is here.
//
// Per (b, c), with x_i = e^{k_i} (v_i, 1), both modes are sums of running-max scans (wkv4.h's (n, d, o)):
//   y_t = (Q_t + P_t + rw R_t + e^{u + k_t} x_t) / (the same with v -> 1) [+ EPS e^{m_t}: official]
//   paper:    Q_t = Σ_{i<t} e^{-w (t-1-i)} x_i              P_t = Σ_{i>t} e^{-w (i-1-t)} x_i    R = 0
//   official: L = ceil(T / 32), s = the start of t's chunk (the kernel's thread-per-chunk split):
//             Q_t = Σ_{i<s} e^{-w (t-i)} x_i + Σ_{s<=i<t} e^{-w (t-1-i)} x_i
//             P_t = Σ_{i>t} e^{-w (i-t)} x_i
//             R_t = Σ_{s<j<=t} e^{w (t-j)} x_j, rw = 1 - e^w (the residual the kernel's
//             subtract-the-next-token right state leaves; specs/vision.md §5.3-5.4)
//             m_t = max(o1, o2, u + k_t) with the kernel's running maxima o2 = max exponent of Q_t and
//             o1 = max(max_{i>=s} k_i - w (i-t), max_{s<j<=t} k_j + w (t+1-j)).
// This is `naive_biwkv`'s arithmetic with adds only: the kernel's right state (P + rw R, updated by
// subtraction) cancels in float32 when one token dominates; P and R are scanned separately instead.
// Q is restarted at each chunk start from A = the paper's left sum (Q_s = e^{-w} A_s).
// The sums accumulate in float64 (BiAcc), and so are the exponents compared and subtracted (a maximum
// base + steps * ld of magnitude ~20 holds only ~2e-6 absolute in float32, an error in the weight of
// every term); inputs and exps are float32. Measured at T = 1000 against float64 (max error / max):
// float32 sums 4e-6 in y and 2e-5 in dk; float32 exponents 2e-5 in dk; both float64 ~3e-7 and 3e-6.
// What the launchers keep between passes are float32 snapshots of the sums (one rounding each, not
// accumulated) and the exact (base, steps) of the maxima.
//
// Backward: y_t = N_t / D_t gives dL/dN_t = α_t = g_t / D_t, dL/dD_t = β_t = -g_t y_t / D_t, held as
// (ga, gb) e^{-m_t}. Then dv_j = e^{k_j} Σ_t W[t, j] α_t and dk_j = v_j dv_j + e^{k_j} Σ_t W[t, j] β_t,
// where the transposed sums are scans of the same kinds run the other way (PT, QT, RT below); dw needs
// each scan's derivative by its decay, kept as decay-step-weighted sums (fn, fd); du = Σ_t α_t e^{u+k_t} x_t.
// The official EPS e^{m_t} term sends dL/dm_t = EPS gb_t to the input that sets the maximum (k_{imax},
// and w through its distance), as autograd through the reference does.
#pragma once

#include "rwkv_mm/wkv4.h"

namespace rwkv_mm {

constexpr int BIWKV_TOKEN_SPLIT = 32;  // the official kernel's chunks per (b, c)
constexpr float BIWKV_EPS = 1e-6f;     // added by it to the max-normalised denominator

// Token chunk length: the official kernel's L = ceil(T / 32); the paper mode is one chunk.
RWKV_HD int biwkv_chunk_len(int T, bool official) {
  return official ? (T + BIWKV_TOKEN_SPLIT - 1) / BIWKV_TOKEN_SPLIT : (T > 0 ? T : 1);
}

using BiAcc = double;

// A running sum e^{o} (n, d) of terms e^{x_i} (a_i, b_i) (b_i = 1 in the forward sums), decayed by
// e^{ld} per step. Its maximum o = base + steps * ld (wkv4.h: no drift). The CUDA kernel holds these
// by value (D = BiAcc, F = float); the CPU kernel passes references into its per-channel arrays
// (BiAcc&, float&), so that the same code runs on a vectorised lane.
template <class D, class F>
struct BiSum {
  D n, d;
  F base, steps;
};

// The same with what the backward needs: fn, fd = the sums with each term weighted by its number of
// decay steps (the derivative by ld), and the index of the largest term. Token indices are kept as
// floats (exact below 2^24, which the launchers check): int and float lanes mixed in one loop keep
// the CPU compiler from vectorising it.
template <class D, class F>
struct BiSumG {
  D n, d, fn, fd;
  F base, steps, imax;
};

// A running maximum of exponents, base + steps * ld, and the token it came from.
template <class F>
struct BiMax {
  F base, steps, imax;
};

// A running maximum base + steps * ld, formed in float64 (base and steps are exact floats, so a
// launcher may store them between passes and recompute the same value).
RWKV_HD BiAcc bi_max_of(float base, float steps, float ld) { return base + steps * static_cast<BiAcc>(ld); }

template <class S>
RWKV_HD BiAcc bi_o(const S& s, float ld) {
  return bi_max_of(s.base, s.steps, ld);
}

// wkv4_pair for float64 exponents: their difference is formed in float64, the exp in float32.
RWKV_HD Wkv4Pair bi_pair(BiAcc a, BiAcc b) {
  const float e = wkv_exp(static_cast<float>(-fabs(a - b)));
  const bool a_wins = a >= b;
  return {a_wins ? 1.0f : e, a_wins ? e : 1.0f, a_wins};
}

RWKV_HD float bi_exp(BiAcc x) { return wkv_exp(static_cast<float>(x)); }

template <class S>
RWKV_HD void bi_clear(S& s) {
  s.n = 0.0f;
  s.d = 0.0f;
  s.base = WKV4_EMPTY_MAX;
  s.steps = 0.0f;
}

// Decay the sum by e^{ld}, then add e^{x} (a, b).
template <class S>
RWKV_HD void bi_push(S& s, float ld, float x, float a, float b) {
  const Wkv4Pair e = bi_pair(s.base + (s.steps + 1.0f) * static_cast<BiAcc>(ld), x);
  s.n = e.ea * s.n + e.eb * a;
  s.d = e.ea * s.d + e.eb * b;
  s.base = e.a_wins ? s.base : x;
  s.steps = e.a_wins ? s.steps + 1.0f : 0.0f;
}

// The same for a BiSumG; the new term has c_new decay steps and index i.
template <class S>
RWKV_HD void bi_push_g(S& s, float ld, float x, float a, float b, float c_new, float i) {
  const Wkv4Pair e = bi_pair(s.base + (s.steps + 1.0f) * static_cast<BiAcc>(ld), x);
  s.fn = e.ea * (s.fn + s.n) + c_new * e.eb * a;  // every old term gains one step
  s.fd = e.ea * (s.fd + s.d) + c_new * e.eb * b;
  s.n = e.ea * s.n + e.eb * a;
  s.d = e.ea * s.d + e.eb * b;
  s.base = e.a_wins ? s.base : x;
  s.steps = e.a_wins ? s.steps + 1.0f : 0.0f;
  s.imax = e.a_wins ? s.imax : i;
}

template <class M>
RWKV_HD void bi_max_push(M& s, float ld, float x, float i) {
  const bool old = s.base + (s.steps + 1.0f) * static_cast<BiAcc>(ld) >= x;
  s.base = old ? s.base : x;
  s.steps = old ? s.steps + 1.0f : 0.0f;
  s.imax = old ? s.imax : i;
}

// Two sums combined: s += e^{gap * ld} x, with x's terms gap steps further from the current position
// than its own maximum says (the CUDA forward joins the sums of token segments so).
template <class S>
RWKV_HD void bi_merge(S& s, const S& x, float gap, float ld) {
  const float steps = x.steps + gap;
  const Wkv4Pair e = bi_pair(bi_o(s, ld), bi_max_of(x.base, steps, ld));
  s.n = e.ea * s.n + e.eb * x.n;
  s.d = e.ea * s.d + e.eb * x.d;
  s.base = e.a_wins ? s.base : x.base;
  s.steps = e.a_wins ? s.steps : steps;
}

// A segment's left sum from a right-to-left scan: H = Σ_{a<=i<a+len} e^{w (i-a)} x_i (bi_push with
// ld = w) is e^{w (len-1)} G, G = Σ e^{-w (a+len-1-i)} x_i (the left sum after the segment's last
// token); G has H's sums, and its maximum, seen from the segment's end, lies len-1-steps steps of -w away.
template <class S>
RWKV_HD S bi_reversed(const S& H, float len) {
  S G = H;
  G.steps = len - 1.0f - H.steps;
  return G;
}

// ---- pass 1 (t = T-1 .. 0): the right sum P_t, read out before the push of token t ----

// Paper: token t joins P_{t-1} with weight 1 (distance i-1-t = 0); official: with e^{-w} (one step).
template <bool kOfficial, class S>
RWKV_HD void biwkv_right_push(S& P, float w, float k, float v) {
  bi_push(P, -w, kOfficial ? k - w : k, v, 1.0f);
}

template <bool kOfficial, class S>
RWKV_HD void biwkv_right_push_g(S& P, float w, float k, float v, float t) {
  bi_push_g(P, -w, kOfficial ? k - w : k, v, 1.0f, kOfficial ? 1.0f : 0.0f, t);
}

// ---- pass 2 (t = 0 .. T-1): left sums, combine ----

// Official mode, token t: at a chunk start, Q = e^{-w} A (each earlier token one more decay step), R
// is empty and the in-chunk maximum of k_i + w (t-i) starts at k_s (biwkv_chunk_start); at any other
// token, R and that maximum take token t (biwkv_residual_push). The launchers branch between the two
// outside their lane loops (a branch or a select on a flag inside one keeps it from vectorising).
// Both work for BiSum and BiSumG.
template <class S, class M>
RWKV_HD void biwkv_chunk_start(S& Q, const S& A, S& R, M& RR, float k, float t) {
  Q.n = A.n;
  Q.d = A.d;
  Q.base = A.base;
  Q.steps = A.steps + 1.0f;
  bi_clear(R);
  RR.base = k;
  RR.steps = 0.0f;
  RR.imax = t;
}

template <class D, class F>
RWKV_HD void biwkv_chunk_start(BiSumG<D, F>& Q, const BiSumG<D, F>& A, BiSumG<D, F>& R, BiMax<F>& RR,
                               float k, float t) {
  Q.n = A.n;
  Q.d = A.d;
  Q.base = A.base;
  Q.steps = A.steps + 1.0f;
  Q.fn = A.fn + A.n;  // e^{-w} A: one more step for every term
  Q.fd = A.fd + A.d;
  Q.imax = A.imax;
  bi_clear(R);
  R.fn = 0.0f;
  R.fd = 0.0f;
  R.imax = t;
  RR.base = k;
  RR.steps = 0.0f;
  RR.imax = t;
}

template <class S, class M>
RWKV_HD void biwkv_residual_push(S& R, M& RR, float w, float k, float v, float t) {
  bi_push(R, w, k, v, 1.0f);
  bi_max_push(RR, w, k, t);
}

template <class D, class F>
RWKV_HD void biwkv_residual_push(BiSumG<D, F>& R, BiMax<F>& RR, float w, float k, float v, float t) {
  bi_push_g(R, w, k, v, 1.0f, 0.0f, t);
  bi_max_push(RR, w, k, t);
}

// Which input sets the official kernel's normaliser m_t (for the EPS term's gradient); a float code,
// like the token indices.
constexpr float BI_MAX_Q = 0.0f, BI_MAX_P = 1.0f, BI_MAX_RR = 2.0f, BI_MAX_R = 3.0f, BI_MAX_SELF = 4.0f;

// One output, everything scaled by e^{-m}: y = num / den. eq, ep, er, es are the factors e^{o - m}
// of Q, P, R (without rw) and of the current token's e^{u + k}. m is rounded to float32 first: it is
// only a reference point, and the backward keeps it as one.
struct BiCombine {
  BiAcc num, den;
  float m, eq, ep, er, es, argmax;
};

template <bool kOfficial>
RWKV_HD BiCombine biwkv_combine(BiAcc Qn, BiAcc Qd, BiAcc Qo, BiAcc Pn, BiAcc Pd, BiAcc Po, BiAcc Rn,
                                BiAcc Rd, BiAcc Ro, BiAcc RRo, float w, float rw, float u, float k,
                                float v) {
  BiCombine r;
  const BiAcc self = static_cast<BiAcc>(u) + k;
  BiAcc m;
  if constexpr (!kOfficial) {
    m = wkv_max(wkv_max(Qo, Po), self);
    r.argmax = BI_MAX_SELF;  // unused: no EPS term
  } else {  // m = max(o2, o1, u + k), o1 = max(Po, RRo, Ro + w)
    m = wkv_max(Qo, Po);
    r.argmax = Qo >= Po ? BI_MAX_Q : BI_MAX_P;
    r.argmax = RRo > m ? BI_MAX_RR : r.argmax;
    m = wkv_max(m, RRo);
    r.argmax = Ro + w > m ? BI_MAX_R : r.argmax;
    m = wkv_max(m, Ro + w);
    r.argmax = self > m ? BI_MAX_SELF : r.argmax;
    m = wkv_max(m, self);
  }
  r.m = static_cast<float>(m);
  r.eq = bi_exp(Qo - r.m);
  r.ep = bi_exp(Po - r.m);
  r.es = bi_exp(self - r.m);
  r.num = r.eq * Qn + r.ep * Pn + static_cast<BiAcc>(r.es) * v;  // float64 products: y - v may be tiny
  r.den = r.eq * Qd + r.ep * Pd + r.es;
  r.er = 0.0f;
  if constexpr (kOfficial) {
    r.er = bi_exp(Ro - r.m);
    r.num += static_cast<BiAcc>(rw) * r.er * Rn;
    r.den += static_cast<BiAcc>(rw) * r.er * Rd + BIWKV_EPS;
  }
  return r;
}

// Forward, token t (after biwkv_chunk_start / biwkv_residual_push in official mode): the output, then
// Q (and A) take token t. P = P_t from pass 1 (Po: its maximum). rw = 1 - e^w.
template <bool kOfficial, class S, class M>
RWKV_HD float biwkv_forward_token(S& Q, S& A, const S& R, const M& RR, BiAcc Pn, BiAcc Pd, BiAcc Po, float w,
                                  float rw, float u, float k, float v) {
  const BiCombine c = biwkv_combine<kOfficial>(Q.n, Q.d, bi_o(Q, -w), Pn, Pd, Po, R.n, R.d, bi_o(R, w),
                                               bi_o(RR, w), w, rw, u, k, v);
  bi_push(Q, -w, k, v, 1.0f);
  if (kOfficial) bi_push(A, -w, k, v, 1.0f);
  return static_cast<float>(c.num / c.den);
}

// ---- forward with one shared shift (the CPU kernel's fast path) ----
//
// When every exponent of a (b, c) stays within ±BIWKV_SHIFT_BUDGET of κ = max_t k_t (biwkv_fits:
// the spread of k, the decay or growth over the whole sequence and the bonus), the sums can be held
// relative to e^{κ} with no running maxima: x_t = e^{k_t - κ} (v_t, 1) costs one exp per token and
// every step is a multiply-add by e^{-w} (dec) or e^{w} (ew); sums stay within e^{±(60 + ln T)}, far
// from float32 overflow and denormals. The official EPS term still needs the kernel's running maxima,
// tracked as plain maxima (their rounding only moves the 1e-6 term). Same passes as above.

constexpr float BIWKV_SHIFT_BUDGET = 60.0f;

RWKV_HD bool biwkv_fits(float k_spread, float w, float u, float T) {
  return k_spread + fabsf(w) * T + fabsf(u) <= BIWKV_SHIFT_BUDGET;
}

// Pass 1: P_{t-1} = e^{-w} P_t + c x_t (c = 1 paper, e^{-w} official); o = max exponent (official).
template <bool kOfficial>
RWKV_HD void biwkv_flat_right_push(BiAcc& n, BiAcc& d, float& o, BiAcc dec, float w, float e, float k,
                                   float v) {
  const BiAcc c = kOfficial ? dec * e : e;
  n = dec * n + c * v;
  d = dec * d + c;
  o = kOfficial ? wkv_max(o - w, k - w) : o;
}

// Pass 2 state: the left sums Q, A and the residual R, relative to e^{κ}, with their maxima.
template <class D, class F>
struct BiFlatLeft {
  D qn, qd, an, ad, rn, rd;
  F qo, ao, ro, rro;
};

template <class S>
RWKV_HD void biwkv_flat_clear(S& s) {
  s.qn = s.qd = s.an = s.ad = s.rn = s.rd = 0.0f;
  s.qo = s.ao = s.ro = s.rro = WKV4_EMPTY_MAX;
}

// Official mode, as biwkv_chunk_start / biwkv_residual_push.
template <class S>
RWKV_HD void biwkv_flat_chunk_start(S& s, float w, BiAcc dec, float k) {
  s.qn = dec * s.an;
  s.qd = dec * s.ad;
  s.qo = s.ao - w;
  s.rn = s.rd = 0.0f;
  s.ro = WKV4_EMPTY_MAX;
  s.rro = k;
}

template <class S>
RWKV_HD void biwkv_flat_residual_push(S& s, float w, BiAcc ew, float e, float k, float v) {
  s.rn = ew * s.rn + e * v;
  s.rd = ew * s.rd + e;
  s.ro = wkv_max(s.ro + w, k);
  s.rro = wkv_max(s.rro + w, k);
}

// Token t: y_t, then Q (and A) take token t. P = P_t (Po: its maximum, official); e = e^{k - κ};
// eu = e^u, rw = 1 - e^w.
template <bool kOfficial, class S>
RWKV_HD float biwkv_flat_token(S& s, BiAcc Pn, BiAcc Pd, float Po, float w, BiAcc dec, float eu, float rw,
                               float u, float kappa, float e, float k, float v) {
  const float es = eu * e;
  BiAcc num = s.qn + Pn + static_cast<BiAcc>(es) * v;
  BiAcc den = s.qd + Pd + es;
  if (kOfficial) {
    const float m = wkv_max(wkv_max(s.qo, Po), wkv_max(wkv_max(s.rro, s.ro + w), u + k));
    num += rw * s.rn;
    den += rw * s.rd + BIWKV_EPS * wkv_exp(m - kappa);
    s.an = dec * s.an + e * v;
    s.ad = dec * s.ad + e;
    s.qo = wkv_max(s.qo - w, k);
    s.ao = wkv_max(s.ao - w, k);
  }
  s.qn = dec * s.qn + e * v;
  s.qd = dec * s.qd + e;
  return static_cast<float>(num / den);
}

// ---- backward ----

// What pass 2 of the backward leaves for token t: the output's gradient factors (α_t, β_t) =
// (ga, gb) e^{-m}, and (official) dL/dm_t of the EPS term with the token whose k sets m_t.
struct BiGrad {
  float ga, gb, m, gm, eps_index;
};

// Backward pass 2, token t (after biwkv_chunk_start / biwkv_residual_push in official mode):
// recompute the output with the decay-weighted sums, turn dy_t into (ga, gb) and accumulate this
// token's part of dw and du (the EPS term's too; its dk part, gm, goes to token eps_index). P is P_t
// with its decay-weighted sums and argmax from pass 1; s = the start of t's chunk; ew = e^w,
// rw = 1 - e^w.
template <bool kOfficial, class S, class M>
RWKV_HD BiGrad biwkv_backward_token(S& Q, S& A, const S& R, const M& RR, BiAcc Pn, BiAcc Pd, BiAcc Po,
                                    BiAcc Pfn, BiAcc Pfd, float Pimax, float w, float ew, float rw, float u,
                                    float k, float v, float gy, float t, float s, float& gw, float& gu) {
  const BiCombine c = biwkv_combine<kOfficial>(Q.n, Q.d, bi_o(Q, -w), Pn, Pd, Po, R.n, R.d, bi_o(R, w),
                                               bi_o(RR, w), w, rw, u, k, v);
  BiGrad g;
  const BiAcc y = c.num / c.den;
  g.m = c.m;
  g.ga = static_cast<float>(gy / c.den);
  g.gb = static_cast<float>(-g.ga * y);
  gu += static_cast<float>(c.es * g.ga * (v - y));  // α v + β = α (v - y): formed without cancellation
  // dN/dw: the left and right sums decay by e^{-w} per step, the residual term is (1 - e^w) R(w)
  BiAcc dn = -c.eq * Q.fn - c.ep * Pfn;
  BiAcc dd = -c.eq * Q.fd - c.ep * Pfd;
  if (kOfficial) {
    dn += c.er * (rw * R.fn - ew * R.n);
    dd += c.er * (rw * R.fd - ew * R.d);
  }
  gw += static_cast<float>(g.ga * (dn - y * dd));
  g.gm = 0.0f;
  g.eps_index = t;
  if (kOfficial) {
    // m_t = k_i + (a whole number) w for the token i that sets it: route dL/dm_t to k_i and w
    g.gm = BIWKV_EPS * g.gb;
    const float iq = Q.imax, ip = Pimax, irr = RR.imax, ir = R.imax;
    float coef = 0.0f;  // dm_t / dw
    coef = c.argmax == BI_MAX_Q ? (iq >= s ? iq + 1.0f : iq) - t : coef;
    coef = c.argmax == BI_MAX_P ? t - ip : coef;
    coef = c.argmax == BI_MAX_RR ? t - irr : coef;
    coef = c.argmax == BI_MAX_R ? t - ir + 1.0f : coef;
    float idx = t;
    idx = c.argmax == BI_MAX_Q ? iq : idx;
    idx = c.argmax == BI_MAX_P ? ip : idx;
    idx = c.argmax == BI_MAX_RR ? irr : idx;
    idx = c.argmax == BI_MAX_R ? ir : idx;
    gw += g.gm * coef;
    gu += c.argmax == BI_MAX_SELF ? g.gm : 0.0f;
    g.eps_index = idx;
  }
  bi_push_g(Q, -w, k, v, 1.0f, 0.0f, t);
  if (kOfficial) bi_push_g(A, -w, k, v, 1.0f, 0.0f, t);
  return g;
}

// Pass 2 also runs the transposed right sum: PT_j = Σ_{t<j} (P_t's weight of token j) (ga_t, gb_t)
// e^{-m_t}, read before token j's push. Paper: weight e^{-w (j-1-t)}; official: e^{-w (j-t)}.
template <bool kOfficial, class S>
RWKV_HD void biwkv_transposed_right_push(S& PT, float w, float ga, float gb, float m) {
  bi_push(PT, -w, kOfficial ? -m - w : -m, ga, gb);
}

// ---- backward pass 3 (j = T-1 .. 0): the transposed left sums, dk and dv ----
//
// QT_j = Σ_{t>j} (Q_t's weight of token j) γ_t: paper e^{-w (t-1-j)}; official the same inside j's
// chunk and e^{-w (t-j)} beyond it, so QT restarts at each chunk end from AT = the paper sum.
// RT_j = Σ_{j<=t<=e} e^{w (t-j)} γ_t over the rest of j's chunk (R_t's weight of token j, t > s).
// Official mode, per token j: at a chunk end biwkv_chunk_end; then biwkv_transposed_residual_push;
// at a chunk start (R_t never holds token s) RT is cleared for this token (the next token ends a
// chunk and restarts it anyway).

template <class S>
RWKV_HD void biwkv_chunk_end(S& QT, const S& AT, S& RT) {
  QT.n = AT.n;
  QT.d = AT.d;
  QT.base = AT.base;
  QT.steps = AT.steps + 1.0f;
  bi_clear(RT);
}

template <class S>
RWKV_HD void biwkv_transposed_residual_push(S& RT, float w, float ga, float gb, float m) {
  bi_push(RT, w, -m, ga, gb);
}

// Token j: QT, AT hold tokens > j; PT = PT_j from pass 2 (PTo: its maximum). dk holds the EPS part on
// entry (pass 2 scatters it); dk is completed and dv set.
template <bool kOfficial, class S>
RWKV_HD void biwkv_transposed_token(S& QT, S& AT, const S& RT, BiAcc PTa, BiAcc PTb, BiAcc PTo, float w,
                                    float rw, float u, float k, float v, float ga, float gb, float m,
                                    float& dk, float& dv) {
  const BiAcc self = static_cast<BiAcc>(u) - m;
  const BiAcc qo = bi_o(QT, -w);
  const BiAcc ro = kOfficial ? bi_o(RT, w) : static_cast<BiAcc>(WKV4_EMPTY_MAX);
  const BiAcc M = wkv_max(wkv_max(PTo, qo), wkv_max(self, ro));
  const float ep = bi_exp(PTo - M), eq = bi_exp(qo - M), es = bi_exp(self - M);
  BiAcc sa = ep * PTa + eq * QT.n + es * ga;  // Σ_t W[t, j] α_t, scaled by e^{-M}
  BiAcc sb = ep * PTb + eq * QT.d + es * gb;  // Σ_t W[t, j] β_t
  if (kOfficial) {
    const float er = rw * bi_exp(ro - M);
    sa += er * RT.n;
    sb += er * RT.d;
  }
  const float ek = bi_exp(k + M);  // <= ~e^{|w|}: each term is a fraction of token t's denominator
  dv = static_cast<float>(ek * sa);
  dk += static_cast<float>(ek * (v * sa + sb));
  bi_push(QT, -w, -m, ga, gb);
  if (kOfficial) bi_push(AT, -w, -m, ga, gb);
}

}  // namespace rwkv_mm
