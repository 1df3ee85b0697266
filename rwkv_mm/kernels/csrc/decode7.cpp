// One RWKV-7 (x070) block for one token per sequence, fused: the whole block in one call, so that
// decode pays no per-op dispatch. The arithmetic is `rwkv_mm.lm.model.Block` / `TimeMix7` /
// `ChannelMix7` at T = 1, in the same order (the tests compare the two):
//
//   xa = LN1(x);  x_m = lerp(xa, att_shift, mu_m) for m in r, w, k, v, a, g
//   r, k, v = R x_r, K x_k, V x_v
//   w = -0.606531 sigmoid(w0 + tanh(x_w w1) w2);  a = sigmoid(a0 + (x_a a1) a2);  g = sigmoid(x_g g1) g2
//   kk = normalize_per_head(k * k_k);  k = k * (1 + (a - 1) k_a)
//   layer 0: v_first = v;  else v = lerp(v, v_first, sigmoid(v0 + (x_v v1) v2))
//   S = S diag(e^w) + (S (-kk)) (kk a)^T + v k^T;  y = S r            (include/rwkv_mm/wkv7.h)
//   y = GroupNorm_heads(y) + (sum_head(r k r_k)) v;  x = x + O (y g)
//   xf = LN2(x);  x = x + FV relu(FK lerp(xf, ffn_shift, mu_k))^2
//
// Rows: B sequences, all float32. The projections take any weight format of include/rwkv_mm/gemv.h:
// fp32 (nn.Linear weights [out, in] column-major, LoRA matrices [in, out] row-major) or packed
// int8 / bf16 with per-channel scales.
// The carried state is never written: the new shifts and the new WKV state are new tensors.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "rwkv_mm/gemv.h"
#include "rwkv_mm/wkv7.h"

namespace {

using namespace rwkv_mm;

constexpr float kDecayScale = 0.606531f;  // as rwkv_mm.lm.model.V7_DECAY_SCALE
constexpr float kLnEps = 1e-5f;
constexpr float kLnxEps = 64e-5f;
constexpr float kNormEps = 1e-12f;  // F.normalize

// --- elementwise helpers ------------------------------------------------------------------------

// e^x for 16 floats: range reduction by ln 2, degree-6 polynomial on [-ln2/2, ln2/2] (~1 ulp).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.0f)), _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 tail_mask(int64_t i, int64_t n) {
  return n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1u);
}

enum class Act { kExp, kSigmoid, kTanh };

// y = act(x + bias) (bias may be null), n floats.
inline void activate(const float* x, const float* bias, float* y, int64_t n, Act act) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(i, n);
    __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    if (bias != nullptr) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias + i));
    __m512 out;
    if (act == Act::kExp) {
      out = exp16(v);
    } else if (act == Act::kSigmoid) {
      out = _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
    } else {  // tanh(v) = 1 - 2 / (e^{2v} + 1)
      const __m512 e = exp16(_mm512_add_ps(v, v));
      out = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
    }
    _mm512_mask_storeu_ps(y + i, m, out);
  }
}

// torch.lerp(start, end, weight), with torch's CPU formula (exact at weight 0 and 1).
inline float lerp(float s, float e, float w) { return w < 0.5f ? s + w * (e - s) : e - (e - s) * (1.0f - w); }

// y = (x - mean) / sqrt(var + eps) * weight + bias over n floats.
inline void layer_norm(const float* x, const float* weight, const float* bias, float* y, int64_t n, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  const float mean = sum / static_cast<float>(n);
  float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < n; ++i) sq += (x[i] - mean) * (x[i] - mean);
  const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - mean) * rstd * weight[i] + bias[i];
}

// --- projections ----------------------------------------------------------------------------------

struct Mat {
  const float* wt = nullptr;  // fp32 [K, N] row-major
  const void* packed = nullptr;
  const float* scale = nullptr;
  bool int8 = false;
  int64_t K = 0, N = 0;
};

// w: an nn.Linear weight [N, K] column-major (linear) or a LoRA matrix [K, N] row-major, float32;
// or packed int8 / bf16 [ceil(N/64), ceil(K/2), 64, 2] with scale [N].
Mat make_mat(const torch::Tensor& w, const torch::Tensor& scale, bool linear, int64_t K, const char* name) {
  Mat m;
  m.K = K;
  TORCH_CHECK(w.device().is_cpu(), "decode7: ", name, " must be on the CPU");
  if (w.scalar_type() == torch::kFloat32) {
    TORCH_CHECK(w.dim() == 2, "decode7: ", name, " must be 2-D, got ", w.sizes());
    const torch::Tensor wt = linear ? w.t() : w;  // [K, N]
    TORCH_CHECK(wt.size(0) == K && wt.is_contiguous(), "decode7: ", name,
                linear ? " must be a column-major [out, " : " must be a row-major [", K,
                linear ? "] weight" : ", out] matrix", ", got sizes ", w.sizes(), " strides ", w.strides());
    m.N = wt.size(1);
    m.wt = wt.data_ptr<float>();
    return m;
  }
  m.int8 = w.scalar_type() == torch::kInt8;
  TORCH_CHECK(m.int8 || w.scalar_type() == torch::kBFloat16, "decode7: ", name,
              " must be float32, or packed int8 / bfloat16, got ", w.scalar_type());
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.dim() == 1 && scale.is_contiguous(), "decode7: ",
              name, " needs a float32 [out] scale");
  m.N = scale.numel();
  TORCH_CHECK(w.is_contiguous() && w.dim() == 4 && w.size(0) == gemv::tiles_of(m.N) &&
                  w.size(1) == gemv::pairs_of(K) && w.size(2) == gemv::kTile && w.size(3) == 2,
              "decode7: packed ", name, " must be [", gemv::tiles_of(m.N), ", ", gemv::pairs_of(K), ", 64, 2], got ",
              w.sizes());
  m.packed = w.data_ptr();
  m.scale = scale.data_ptr<float>();
  return m;
}

// y[B, N] = x[B, K] @ W^T.
void project(const Mat& m, const float* x, float* y, int64_t B, int threads) {
  if (m.packed != nullptr) {
    if (m.int8)
      gemv::packed_gemv<true>(x, B, m.K, m.packed, m.scale, m.N, y, threads);
    else
      gemv::packed_gemv<false>(x, B, m.K, m.packed, m.scale, m.N, y, threads);
  } else if (B <= gemv::kMaxBatch) {
    gemv::f32_gemv(x, B, m.K, m.wt, m.N, y, threads);
  } else {
    gemv::f32_gemm(x, B, m.K, m.wt, m.N, y, threads);
  }
}

// --- the block ------------------------------------------------------------------------------------

enum Vec { LN1_W, LN1_B, X_R, X_W, X_K, X_V, X_A, X_G, W0, A0, V0, K_K, K_A, R_K, LNX_W, LNX_B, LN2_W, LN2_B,
           FFN_X_K, NUM_VECS };
enum MatId { RECEPTANCE, KEY, VALUE, OUTPUT, W1, W2, A1, A2, V1, V2, G1, G2, FFN_KEY, FFN_VALUE, NUM_MATS };
const char* const kMatNames[] = {"receptance", "key", "value", "output", "w1", "w2", "a1",
                                  "a2", "v1", "v2", "g1", "g2", "ffn.key", "ffn.value"};

// A scratch buffer of floats, one per thread, carved into named rows.
struct Arena {
  std::vector<float> buf;
  size_t used = 0;
  float* take(int64_t n) {
    float* p = buf.data() + used;
    used += static_cast<size_t>((n + 15) / 16 * 16);  // 64-byte steps
    TORCH_CHECK(used <= buf.size(), "decode7: scratch overflow");
    return p;
  }
};

// step(x, att_shift, wkv, ffn_shift, v_first, vecs, mats, scales, head_size)
//   -> [x, att_shift, wkv, ffn_shift, v_first]
// x, att_shift, ffn_shift, v_first [B, C] (v_first: empty in layer 0); wkv [B, H, N, N] (value, key);
// vecs: the NUM_VECS per-channel tensors in `Vec` order (v0 empty in layer 0); mats, scales: the
// NUM_MATS projections in `MatId` order (v1, v2 empty in layer 0; scales empty for fp32 weights).
// The weights are checked on every call (cheap), so they may change between calls.
std::vector<torch::Tensor> step(torch::Tensor x, torch::Tensor att_shift, torch::Tensor wkv, torch::Tensor ffn_shift,
                                torch::Tensor v_first, const std::vector<torch::Tensor>& vecs,
                                const std::vector<torch::Tensor>& mats, const std::vector<torch::Tensor>& scales,
                                int64_t head_size) {
  TORCH_CHECK(vecs.size() == NUM_VECS && mats.size() == NUM_MATS && scales.size() == NUM_MATS,
              "decode7: expected ", NUM_VECS, " vectors and ", NUM_MATS, " matrices");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
              "decode7: x must be float32 [B, C] on the CPU");
  x = x.contiguous();
  const int64_t B = x.size(0), C = x.size(1), N = head_size, H = C / N;
  const bool first = v_first.numel() == 0;
  TORCH_CHECK(N > 0 && C % N == 0, "decode7: width ", C, " is not a multiple of the head size ", N);
  for (const torch::Tensor* t : {&att_shift, &ffn_shift})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->numel() == B * C, "decode7: shift states must be [B, C]");
  TORCH_CHECK(wkv.scalar_type() == torch::kFloat32 && wkv.numel() == B * H * N * N,
              "decode7: wkv must be float32 [B, H, N, N]");
  TORCH_CHECK(first || (v_first.scalar_type() == torch::kFloat32 && v_first.numel() == B * C),
              "decode7: v_first must be float32 [B, C]");
  att_shift = att_shift.contiguous();
  ffn_shift = ffn_shift.contiguous();
  wkv = wkv.contiguous();
  if (!first) v_first = v_first.contiguous();
  std::vector<const float*> vec(NUM_VECS, nullptr);
  for (int i = 0; i < NUM_VECS; ++i) {
    if (i == V0 && first) continue;
    const torch::Tensor& t = vecs[i];  // every one holds C floats ([C], [1, 1, C] or r_k [H, N])
    TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.numel() == C,
                "decode7: per-channel tensor ", i, " must be a contiguous float32 of ", C, " elements");
    vec[i] = t.data_ptr<float>();
  }
  const int64_t F = mats[FFN_KEY].scalar_type() == torch::kFloat32 ? mats[FFN_KEY].size(0) : scales[FFN_KEY].numel();
  std::vector<Mat> mat(NUM_MATS);
  const int64_t in_width[NUM_MATS] = {C, C, C, C, C, 0, C, 0, C, 0, C, 0, C, F};
  for (int i = 0; i < NUM_MATS; ++i) {
    if ((i == V1 || i == V2) && first) continue;
    const bool linear = i <= OUTPUT || i >= FFN_KEY;
    const int64_t K = in_width[i] > 0 ? in_width[i] : mat[i - 1].N;  // a LoRA's up matrix takes its down's out
    mat[i] = make_mat(mats[i], scales[i], linear, K, kMatNames[i]);
  }
  for (int i : {RECEPTANCE, KEY, VALUE, OUTPUT, W2, A2, G2, FFN_VALUE})
    TORCH_CHECK(mat[i].N == C, "decode7: ", kMatNames[i], " must give ", C, " outputs, got ", mat[i].N);
  TORCH_CHECK(first || mat[V2].N == C, "decode7: v2 must give ", C, " outputs");
  TORCH_CHECK(mat[FFN_VALUE].K == mat[FFN_KEY].N, "decode7: ffn.value takes ", mat[FFN_KEY].N, " inputs");

  const int threads = at::get_num_threads();
  const int64_t Dw = mat[W1].N, Da = mat[A1].N, Dg = mat[G1].N, Dv = first ? 0 : mat[V1].N;
  thread_local Arena arena;
  arena.used = 0;
  arena.buf.resize(static_cast<size_t>(B * (18 * C + Dw + Da + Dg + Dv + F) + 32 * 16));  // 24 rows, padded
  float *xr = arena.take(B * C), *xw = arena.take(B * C), *xk = arena.take(B * C), *xv = arena.take(B * C);
  float *xa_ = arena.take(B * C), *xg = arena.take(B * C);
  float *r = arena.take(B * C), *k = arena.take(B * C), *w = arena.take(B * C), *a = arena.take(B * C);
  float *g = arena.take(B * C), *kk = arena.take(B * C), *kb = arena.take(B * C), *gate = arena.take(B * C);
  float *y = arena.take(B * C), *o = arena.take(B * C), *xk2 = arena.take(B * C);
  float *hw = arena.take(B * Dw), *ha = arena.take(B * Da), *hg = arena.take(B * Dg), *hv = arena.take(B * Dv);
  float* hf = arena.take(B * F);

  torch::Tensor x_out = torch::empty_like(x), xa_t = torch::empty_like(x), xf_t = torch::empty_like(x);
  torch::Tensor wkv_out = torch::empty({B, H, N, N}, x.options());
  torch::Tensor v_t = first ? torch::empty_like(x) : v_first;
  float *xo = x_out.data_ptr<float>(), *xa = xa_t.data_ptr<float>(), *xf = xf_t.data_ptr<float>();
  float* v = first ? v_t.data_ptr<float>() : arena.take(B * C);
  const float *xi = x.data_ptr<float>(), *sx = att_shift.data_ptr<float>(), *sf = ffn_shift.data_ptr<float>();
  const float* vf = first ? nullptr : v_first.data_ptr<float>();

  // time mix: inputs
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o0 = b * C;
    layer_norm(xi + o0, vec[LN1_W], vec[LN1_B], xa + o0, C, kLnEps);
    float* dst[6] = {xr + o0, xw + o0, xk + o0, xv + o0, xa_ + o0, xg + o0};
    for (int m = 0; m < 6; ++m) {
      const float* mu = vec[X_R + m];
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dst[m][c] = lerp(xa[o0 + c], sx[o0 + c], mu[c]);
    }
  }
  project(mat[RECEPTANCE], xr, r, B, threads);
  project(mat[KEY], xk, k, B, threads);
  project(mat[VALUE], xv, v, B, threads);
  project(mat[W1], xw, hw, B, threads);
  activate(hw, nullptr, hw, B * Dw, Act::kTanh);
  project(mat[W2], hw, w, B, threads);
  project(mat[A1], xa_, ha, B, threads);
  project(mat[A2], ha, a, B, threads);
  project(mat[G1], xg, hg, B, threads);
  activate(hg, nullptr, hg, B * Dg, Act::kSigmoid);
  project(mat[G2], hg, g, B, threads);
  if (!first) {
    project(mat[V1], xv, hv, B, threads);
    project(mat[V2], hv, gate, B, threads);
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o0 = b * C;
    activate(w + o0, vec[W0], w + o0, C, Act::kSigmoid);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) w[o0 + c] = -kDecayScale * w[o0 + c];
    activate(w + o0, nullptr, w + o0, C, Act::kExp);  // e^w, the per-step decay factor
    activate(a + o0, vec[A0], a + o0, C, Act::kSigmoid);
    for (int64_t h = 0; h < H; ++h) {  // kk = normalize(k * k_k) per head
      const int64_t s = o0 + h * N;
      float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < N; ++j) {
        kk[s + j] = k[s + j] * vec[K_K][h * N + j];
        sq += kk[s + j] * kk[s + j];
      }
      const float norm = std::max(std::sqrt(sq), kNormEps);
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) kk[s + j] = kk[s + j] / norm;
    }
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      k[o0 + c] = k[o0 + c] * (1.0f + (a[o0 + c] - 1.0f) * vec[K_A][c]);
      kb[o0 + c] = kk[o0 + c] * a[o0 + c];  // b = kk * a
      kk[o0 + c] = -kk[o0 + c];             // a = -kk
    }
    if (!first) {
      activate(gate + o0, vec[V0], gate + o0, C, Act::kSigmoid);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) v[o0 + c] = lerp(v[o0 + c], vf[o0 + c], gate[o0 + c]);
    }
  }
  // WKV: one step per (sequence, head), the old state read, the new one written
  const float* s_in = wkv.data_ptr<float>();
  float* s_out = wkv_out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t s = b * C + h * N, st = (b * H + h) * N * N;
      const int n = static_cast<int>(N);
      for (int64_t i = 0; i < N; ++i) {
        const float* row_in = s_in + st + i * N;
        float* row_out = s_out + st + i * N;
        y[s + i] = N == 64 ? wkv7::forward_row<64>(row_in, row_out, r + s, w + s, k + s, kk + s, kb + s, v[s + i], n)
                           : wkv7::forward_row<0>(row_in, row_out, r + s, w + s, k + s, kk + s, kb + s, v[s + i], n);
      }
      // per-head group norm, the current-token bonus, the gate
      float bonus = 0.0f;
#pragma omp simd reduction(+ : bonus)
      for (int64_t j = 0; j < N; ++j) bonus += r[s + j] * k[s + j] * vec[R_K][h * N + j];
      layer_norm(y + s, vec[LNX_W] + h * N, vec[LNX_B] + h * N, y + s, N, kLnxEps);
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) y[s + j] = (y[s + j] + bonus * v[s + j]) * g[s + j];
    }
  }
  project(mat[OUTPUT], y, o, B, threads);
  // channel mix
  for (int64_t b = 0; b < B; ++b) {
    const int64_t o0 = b * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) xo[o0 + c] = xi[o0 + c] + o[o0 + c];
    layer_norm(xo + o0, vec[LN2_W], vec[LN2_B], xf + o0, C, kLnEps);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) xk2[o0 + c] = lerp(xf[o0 + c], sf[o0 + c], vec[FFN_X_K][c]);
  }
  project(mat[FFN_KEY], xk2, hf, B, threads);
#pragma omp simd
  for (int64_t i = 0; i < B * F; ++i) {
    const float t = std::max(hf[i], 0.0f);
    hf[i] = t * t;
  }
  project(mat[FFN_VALUE], hf, o, B, threads);
#pragma omp simd
  for (int64_t i = 0; i < B * C; ++i) xo[i] += o[i];
  return {x_out, xa_t, wkv_out, xf_t, v_t};
}

// A block's weights, held between calls (the tensors are shared with the model, not copied).
struct Block7 {
  std::vector<torch::Tensor> vecs, mats, scales;
  int64_t head_size;
  std::vector<torch::Tensor> operator()(torch::Tensor x, torch::Tensor att_shift, torch::Tensor wkv,
                                        torch::Tensor ffn_shift, torch::Tensor v_first) const {
    return step(x, att_shift, wkv, ffn_shift, v_first, vecs, mats, scales, head_size);
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "RWKV-7 block for one token per sequence, fused (CPU, float32 activations)";
  pybind11::class_<Block7>(m, "Block7")
      .def(pybind11::init<std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                          int64_t>(),
           "Block7(vecs, mats, scales, head_size)")
      .def("__call__", &Block7::operator(),
           "(x, att_shift, wkv, ffn_shift, v_first) -> [x, att_shift, wkv, ffn_shift, v_first]");
}
