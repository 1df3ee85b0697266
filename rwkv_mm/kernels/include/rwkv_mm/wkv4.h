// RWKV-4 WKV, one channel at a time: the running-max steps of `naive_wkv4` (rwkv_mm/core/reference.py),
// shared by csrc/wkv4.cpp (CPU, vectorised across channels) and cuda/wkv4.cu (one thread per
// (batch, channel)). biwkv.h builds on the same pieces.
//
// A running sum of terms e^{x_i} (v_i, 1) is held as (n, d, o): n = Σ e^{x_i - o} v_i,
// d = Σ e^{x_i - o} and o = the largest exponent seen (the `rwkv` package's aa, bb, pp).
// The empty sum is (0, 0, WKV4_EMPTY_MAX). Everything is float32.
//
// Inside the kernels o is kept as base + steps * w: the exponent the maximum had when it was set and
// the number of decay steps since (a float, exact up to 2^24). Adding w to o at every token, as the
// reference does, drifts in float32 by up to one rounding per token (~1e-4 after 1000 tokens at
// |o| ~ 10), and that drift is an error in the weight of every new term against the old ones.
#pragma once

#include <string.h>

#include "rwkv_mm/common.h"

namespace rwkv_mm {

// Running maximum of an empty sum (reference.py's WKV4_EMPTY_MAX): finite, so that o + w and
// o - x never meet an infinity, and e^{o - x} is exactly 0.
constexpr float WKV4_EMPTY_MAX = -1e38f;

template <class T>
RWKV_HD T wkv_max(T a, T b) {
  return a >= b ? a : b;
}

// e^x in float32. The device uses expf. The host uses this branch-free polynomial (Cephes' expf:
// x = n ln2 + r, |r| <= ln2 / 2, degree-7 polynomial for e^r, 2^n from the exponent bits; max error
// 1.4 ulp), because libm's expf is only vectorised under -ffast-math and the CPU kernels vectorise
// across channels. Below -87 it returns 0 (no denormals); the kernels never pass more than ~88.
RWKV_HD float wkv_exp(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - n * 0.693359375f;  // Cody-Waite: ln2 in two parts
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int bits = (static_cast<int>(n) + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
#endif
}

// The two weights e^{a - max(a, b)} and e^{b - max(a, b)} with a single exp (one of them is 1).
struct Wkv4Pair {
  float ea, eb;
  bool a_wins;
};

RWKV_HD Wkv4Pair wkv4_pair(float a, float b) {
  const float e = wkv_exp(-fabsf(a - b));
  const bool a_wins = a >= b;
  return {a_wins ? 1.0f : e, a_wins ? e : 1.0f, a_wins};
}

// y_t = (past + e^{u + k_t} v_t) / (the same with v -> 1), the past being the state (n, d, o).
RWKV_HD float wkv4_output(float n, float d, float o, float u, float k, float v) {
  const Wkv4Pair e = wkv4_pair(o, u + k);
  return (e.ea * n + e.eb * v) / (e.ea * d + e.eb);
}

// State update: decay the sum by e^{w}, then add e^{k} (v, 1); o = base + steps * w.
RWKV_HD void wkv4_update(float& n, float& d, float& base, float& steps, float w, float k, float v) {
  const Wkv4Pair e = wkv4_pair(base + (steps + 1.0f) * w, k);
  n = e.ea * n + e.eb * v;
  d = e.ea * d + e.eb;
  base = e.a_wins ? base : k;
  steps = e.a_wins ? steps + 1.0f : 0.0f;
}

// One token of the backward pass, walking t from T-1 down to 0.
//
// (n, d, o) is the state before token t (recomputed by a forward pass). On entry (gn, gd) are the
// loss gradients w.r.t. the state after the token, and `delta` is the part of its max-entry gradient
// that is not explained by the sums it scales: g_o = gn n' + gd d' + delta. Any function of the sums
// n' e^{o'}, d' e^{o'} alone (the next token, a chained call) has delta = 0; a loss that uses the max
// entry by itself gives delta != 0 at the last token, and delta follows the max back to where it was
// set (k_t, or the initial state). On return (gn, gd, delta) describe the state before the token.
// gk, gv are set; gw, gu are accumulated. (The output's own max q needs no such term: y depends on
// the sums only, so the derivative through q is identically zero and is left out.)
RWKV_HD void wkv4_backward_step(float n, float d, float o, float w, float u, float k, float v, float gy,
                                float& gn, float& gd, float& delta, float& gk, float& gv, float& gw,
                                float& gu) {
  // output: y = (e1 n + e2 v) / (e1 d + e2), e1 = e^{o - q}, e2 = e^{u + k - q}, q = max(o, u + k)
  const Wkv4Pair e = wkv4_pair(o, u + k);
  const float den = e.ea * d + e.eb;
  const float g_num = gy / den;                              // dL / d(numerator)
  const float g_den = -g_num * (e.ea * n + e.eb * v) / den;  // dL / d(denominator)
  // state update: n' = f1 n + f2 v, d' = f1 d + f2, o' = max(o + w, k), f1 = e^{o + w - o'}, f2 = e^{k - o'}
  const Wkv4Pair f = wkv4_pair(o + w, k);
  const float g_f1 = gn * n + gd * d;  // dL/df1 (f1 also scales o': its term is in delta)
  const float g_f2 = gn * v + gd;
  const float g_e2 = g_num * v + g_den;
  gv = gn * f.eb + g_num * e.eb;
  gk = g_f2 * f.eb + g_e2 * e.eb + (f.a_wins ? 0.0f : delta);
  gu += g_e2 * e.eb;
  gw += g_f1 * f.ea + (f.a_wins ? delta : 0.0f);
  gn = gn * f.ea + g_num * e.ea;
  gd = gd * f.ea + g_den * e.ea;
  delta = f.a_wins ? delta : 0.0f;
}

}  // namespace rwkv_mm
