// Matrix-vector products and small GEMMs for one-token decode on the CPU (AVX-512), shared by
// csrc/gemv.cpp (the bindings `_linear` and `QuantLinear` call) and csrc/decode7.cpp (the fused
// RWKV-7 decode step). y[B, N] = x[B, K] @ W[N, K]^T with float32 x and y, B small (decode).
//
// Three weight formats:
// - fp32: wt = W^T row-major [K, N] (the column-major nn.Linear weight `RWKVLM.from_file` stores). Each
//   thread owns a contiguous slice of the N columns and sweeps the K rows eight at a time: eight
//   sequential streams, the y slice (tiles of kColumns) in L1, every weight loaded once for all B rows.
// - int8: packed [ceil(N / 64), ceil(K / 2), 64, 2] int8, element [t, p, c, j] = q[64 t + c, 2 p + j]
//   (zeros in the padding), plus a float32 scale [N] per output channel: W ~= q * scale[:, None].
//   Each 64-column tile is one sequential stream. The activation row is quantized on the fly to int16
//   (scale max|x| / 32767, so the weights carry almost all of the error) and the products are summed
//   in int32 by AVX512-VNNI `vpdpwssd` (two k per lane), flushed to float32 every kFlush pairs.
// - bf16: packed the same way in bfloat16, with a float32 scale [N] (ones after `pack_bf16`). The
//   activation row is split into two bfloat16 terms, x = hi + lo (|x - hi - lo| <= 2^-16 |x|), and
//   both go through AVX512-BF16 `vdpbf16ps` with float32 accumulation: the dot product sees float32
//   activations to ~16 bits, at no visible cost (decode is memory-bound on the weights).
// The fp32 kernels need AVX-512F (without it the build fails and the models use torch); without
// AVX512-VNNI / AVX512-BF16, the packed formats take plain loops.
#pragma once

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace rwkv_mm {
namespace gemv {

// Small loops over registers are unrolled before GCC decides where arrays of vectors live: rolled,
// it keeps them in memory and stores every accumulator on each iteration.
#define RWKV_MM_GEMV_UNROLL _Pragma("GCC unroll 16")

// ---------------------------------------------------------------------------------------------
// fp32, wt [K, N] row-major. Tuned on the 0.1B decode shapes (one thread, weights cold in DRAM):
// 8 rows per sweep streamed at ~92% of a plain array read; software prefetch only slowed it down.
constexpr int64_t kRowsPerSweep = 8;  // rows of wt per sweep (sequential streams), even
constexpr int64_t kColumns = 1024;    // columns per tile: the B y rows of a tile stay in L1
constexpr int kMaxBatch = 4;          // rows of x per pass; larger batches take several passes

template <int B>
void f32_slice(const float* __restrict x, const float* __restrict wt, float* __restrict y, int64_t K,
               int64_t N, int64_t n0, int64_t n1) {
  constexpr int64_t KU = kRowsPerSweep;
  for (int b = 0; b < B; ++b) std::fill(y + b * N + n0, y + b * N + n1, 0.0f);
  int64_t k = 0;
  for (; k + KU <= K; k += KU) {
    __m512 xs[B][KU];
    for (int b = 0; b < B; ++b)
      for (int u = 0; u < KU; ++u) xs[b][u] = _mm512_set1_ps(x[b * K + k + u]);
    const float* w0 = wt + k * N;
    int64_t n = n0;
    for (; n + 16 <= n1; n += 16) {
      __m512 w[KU];
      for (int u = 0; u < KU; ++u) w[u] = _mm512_loadu_ps(w0 + u * N + n);
      for (int b = 0; b < B; ++b) {
        __m512 acc = _mm512_fmadd_ps(xs[b][0], w[0], _mm512_loadu_ps(y + b * N + n));
        __m512 acc2 = _mm512_mul_ps(xs[b][1], w[1]);
        RWKV_MM_GEMV_UNROLL
        for (int u = 2; u < KU; u += 2) {  // two dependency chains
          acc = _mm512_fmadd_ps(xs[b][u], w[u], acc);
          acc2 = _mm512_fmadd_ps(xs[b][u + 1], w[u + 1], acc2);
        }
        _mm512_storeu_ps(y + b * N + n, _mm512_add_ps(acc, acc2));
      }
    }
    if (n < n1) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n1 - n)) - 1u);
      __m512 w[KU];
      for (int u = 0; u < KU; ++u) w[u] = _mm512_maskz_loadu_ps(m, w0 + u * N + n);
      for (int b = 0; b < B; ++b) {
        __m512 acc = _mm512_maskz_loadu_ps(m, y + b * N + n);
        for (int u = 0; u < KU; ++u) acc = _mm512_fmadd_ps(xs[b][u], w[u], acc);
        _mm512_mask_storeu_ps(y + b * N + n, m, acc);
      }
    }
  }
  for (; k < K; ++k) {  // the last K % KU rows
    const float* w0 = wt + k * N;
    for (int b = 0; b < B; ++b) {
      const __m512 xb = _mm512_set1_ps(x[b * K + k]);
      for (int64_t n = n0; n < n1; n += 16) {
        const __mmask16 m =
            n + 16 <= n1 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n1 - n)) - 1u);
        __m512 acc = _mm512_maskz_loadu_ps(m, y + b * N + n);
        acc = _mm512_fmadd_ps(xb, _mm512_maskz_loadu_ps(m, w0 + n), acc);
        _mm512_mask_storeu_ps(y + b * N + n, m, acc);
      }
    }
  }
}

template <int B>
void f32_pass(const float* x, const float* wt, float* y, int64_t K, int64_t N, int threads) {
  // slices of whole cache lines (16 floats), at least 256 columns each so that tiny N stays serial
  const int64_t lines = (N + 15) / 16;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, (lines + 15) / 16)));
  if (threads == 1) {
    for (int64_t a = 0; a < N; a += kColumns) f32_slice<B>(x, wt, y, K, N, a, std::min(N, a + kColumns));
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t n0 = std::min(N, lines * t / nt * 16), n1 = std::min(N, lines * (t + 1) / nt * 16);
    for (int64_t a = n0; a < n1; a += kColumns) f32_slice<B>(x, wt, y, K, N, a, std::min(n1, a + kColumns));
  }
}

// y[B, N] = x[B, K] @ wt[K, N], any B >= 1 (passes of up to kMaxBatch rows).
inline void f32_gemv(const float* x, int64_t B, int64_t K, const float* wt, int64_t N, float* y, int threads) {
  for (int64_t b0 = 0; b0 < B; b0 += kMaxBatch) {
    const float* xb = x + b0 * K;
    float* yb = y + b0 * N;
    switch (std::min<int64_t>(kMaxBatch, B - b0)) {
      case 1: f32_pass<1>(xb, wt, yb, K, N, threads); break;
      case 2: f32_pass<2>(xb, wt, yb, K, N, threads); break;
      case 3: f32_pass<3>(xb, wt, yb, K, N, threads); break;
      default: f32_pass<4>(xb, wt, yb, K, N, threads); break;
    }
  }
}

// fp32 with more rows (batched decode, B > 4): a small GEMM, compute-bound when the weights are in
// cache (170-185 GFLOP/s at B = 16 on the 0.1B shapes, one core of the dev box: ~1.6x torch's best
// large matmul there), else bound by how fast the weights stream in.
// Register tiles of up to 6 rows x 64 columns (24 accumulators) run over kGemmDepth rows of wt at a
// time, so that the weight panel [kGemmDepth, 64] the first row group pulls from memory serves the
// other row groups from L1. Each thread sweeps slices of kGemmSlice columns, depth block by depth block
// (kGemmDepth sequential streams of 4 KB); the y slice stays in L2. The first row group prefetches its
// rows kGemmPrefetch columns ahead: ~1.5x on weights streamed from DRAM (0.1B layer and head shapes).
constexpr int64_t kGemmDepth = 16;     // rows of wt per panel
constexpr int64_t kGemmSlice = 1024;   // columns per slice
constexpr int64_t kGemmPrefetch = 128;  // columns
constexpr int kGemmRows = 6;           // rows per register tile

template <int R, bool kPrefetch = false>
inline void f32_tile(const float* __restrict x, int64_t K, const float* __restrict wt, int64_t N,
                     float* __restrict y, int64_t k0, int64_t k1, int64_t n, const __mmask16* m) {
  __m512 acc[R][4];
  RWKV_MM_GEMV_UNROLL
  for (int r = 0; r < R; ++r)
    RWKV_MM_GEMV_UNROLL
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_maskz_loadu_ps(m[j], y + r * N + n + 16 * j);
  for (int64_t k = k0; k < k1; ++k) {
    const float* w = wt + k * N + n;
    if constexpr (kPrefetch) {
      RWKV_MM_GEMV_UNROLL
      for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + kGemmPrefetch + 16 * j), _MM_HINT_T0);
    }
    __m512 wv[4];
    RWKV_MM_GEMV_UNROLL
    for (int j = 0; j < 4; ++j) wv[j] = _mm512_maskz_loadu_ps(m[j], w + 16 * j);
    RWKV_MM_GEMV_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * K + k]);
      RWKV_MM_GEMV_UNROLL
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(xb, wv[j], acc[r][j]);
    }
  }
  RWKV_MM_GEMV_UNROLL
  for (int r = 0; r < R; ++r)
    RWKV_MM_GEMV_UNROLL
    for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(y + r * N + n + 16 * j, m[j], acc[r][j]);
}

inline void f32_gemm_slice(const float* x, int64_t M, int64_t K, const float* wt, int64_t N, float* y, int64_t n0,
                           int64_t n1) {
  for (int64_t b = 0; b < M; ++b) std::fill(y + b * N + n0, y + b * N + n1, 0.0f);
  for (int64_t k0 = 0; k0 < K; k0 += kGemmDepth) {
    const int64_t k1 = std::min(K, k0 + kGemmDepth);
    for (int64_t n = n0; n < n1; n += 64) {
      __mmask16 m[4];
      for (int j = 0; j < 4; ++j) {
        const int64_t left = n1 - n - 16 * j;
        m[j] = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                          : static_cast<__mmask16>(left > 0 ? (1u << left) - 1u : 0u);
      }
      int64_t b = 0;
      if (M >= kGemmRows) {
        f32_tile<kGemmRows, true>(x, K, wt, N, y, k0, k1, n, m);
        b = kGemmRows;
      }
      for (; b + kGemmRows <= M; b += kGemmRows) f32_tile<kGemmRows>(x + b * K, K, wt, N, y + b * N, k0, k1, n, m);
      switch (M - b) {
        case 1: f32_tile<1>(x + b * K, K, wt, N, y + b * N, k0, k1, n, m); break;
        case 2: f32_tile<2>(x + b * K, K, wt, N, y + b * N, k0, k1, n, m); break;
        case 3: f32_tile<3>(x + b * K, K, wt, N, y + b * N, k0, k1, n, m); break;
        case 4: f32_tile<4>(x + b * K, K, wt, N, y + b * N, k0, k1, n, m); break;
        case 5: f32_tile<5>(x + b * K, K, wt, N, y + b * N, k0, k1, n, m); break;
        default: break;
      }
    }
  }
}

// y[M, N] = x[M, K] @ wt[K, N] for any M >= 1 (meant for M > kMaxBatch).
inline void f32_gemm(const float* x, int64_t M, int64_t K, const float* wt, int64_t N, float* y, int threads) {
  const int64_t slices = (N + kGemmSlice - 1) / kGemmSlice;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, slices)));
  if (threads == 1) {
    for (int64_t n = 0; n < N; n += kGemmSlice) f32_gemm_slice(x, M, K, wt, N, y, n, std::min(N, n + kGemmSlice));
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t s = 0; s < slices; ++s)
    f32_gemm_slice(x, M, K, wt, N, y, s * kGemmSlice, std::min(N, (s + 1) * kGemmSlice));
}

// ---------------------------------------------------------------------------------------------
// Packed formats (int8, bf16): 64-column tiles, k in pairs.
constexpr int64_t kTile = 64;    // columns per tile (4 vectors of 16)
constexpr int64_t kFlush = 256;  // int8: pairs summed in int32 before a flush (2 * 256 * 32767 * 127 < 2^31)
constexpr float kInt16Max = 32767.0f;

inline int64_t pairs_of(int64_t K) { return (K + 1) / 2; }
inline int64_t tiles_of(int64_t N) { return (N + kTile - 1) / kTile; }

// One activation row as int16 pairs (element 2p in the low half of pairs[p]); returns the scale s
// with x ~= s * q (0 for an all-zero row).
inline float quantize_row_i16(const float* x, int64_t K, int32_t* pairs) {
  float amax = 0.0f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float inv = amax > 0.0f ? kInt16Max / amax : 0.0f;
  for (int64_t p = 0; p < pairs_of(K); ++p) {
    const int64_t k = 2 * p;
    const int32_t lo = static_cast<int32_t>(std::nearbyint(x[k] * inv));
    const int32_t hi = k + 1 < K ? static_cast<int32_t>(std::nearbyint(x[k + 1] * inv)) : 0;
    pairs[p] = static_cast<int32_t>((static_cast<uint32_t>(lo) & 0xFFFFu) | (static_cast<uint32_t>(hi) << 16));
  }
  return amax / kInt16Max;
}

// float32 -> bfloat16 bits, round to nearest even (finite inputs).
inline uint32_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

inline float bf16_value(uint32_t bits) {
  const uint32_t u = bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One activation row as two bfloat16 terms x = hi + lo, each as pairs (element 2p in the low half).
inline void split_row_bf16(const float* x, int64_t K, uint32_t* hi, uint32_t* lo) {
  for (int64_t p = 0; p < pairs_of(K); ++p) {
    uint32_t h[2] = {0, 0}, l[2] = {0, 0};
    for (int j = 0; j < 2; ++j) {
      const int64_t k = 2 * p + j;
      if (k >= K) break;
      h[j] = bf16_bits(x[k]);
      l[j] = bf16_bits(x[k] - bf16_value(h[j]));
    }
    hi[p] = h[0] | (h[1] << 16);
    lo[p] = l[0] | (l[1] << 16);
  }
}

// acc[b][c] (+)= sum_k x_b[k] W[64 t + c, k] over one tile; w = the tile [Kp, 64, 2].
template <int B>
void q8_tile(const int32_t* xq, int64_t Kp, const int8_t* __restrict w, float* __restrict acc) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512 f[B][4];
  RWKV_MM_GEMV_UNROLL
  for (int b = 0; b < B; ++b)
    RWKV_MM_GEMV_UNROLL
    for (int j = 0; j < 4; ++j) f[b][j] = _mm512_setzero_ps();
  for (int64_t p0 = 0; p0 < Kp; p0 += kFlush) {
    const int64_t p1 = std::min(Kp, p0 + kFlush);
    __m512i s[B][4];
    RWKV_MM_GEMV_UNROLL
    for (int b = 0; b < B; ++b)
      RWKV_MM_GEMV_UNROLL
      for (int j = 0; j < 4; ++j) s[b][j] = _mm512_setzero_si512();
    for (int64_t p = p0; p < p1; ++p) {
      const int8_t* wp = w + p * 2 * kTile;
      __m512i wv[4];
      RWKV_MM_GEMV_UNROLL
      for (int j = 0; j < 4; ++j)
        wv[j] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 32 * j)));
      RWKV_MM_GEMV_UNROLL
      for (int b = 0; b < B; ++b) {
        const __m512i xb = _mm512_set1_epi32(xq[b * Kp + p]);
        RWKV_MM_GEMV_UNROLL
        for (int j = 0; j < 4; ++j) s[b][j] = _mm512_dpwssd_epi32(s[b][j], xb, wv[j]);
      }
    }
    RWKV_MM_GEMV_UNROLL
    for (int b = 0; b < B; ++b)
      RWKV_MM_GEMV_UNROLL
      for (int j = 0; j < 4; ++j) f[b][j] = _mm512_add_ps(f[b][j], _mm512_cvtepi32_ps(s[b][j]));
  }
  RWKV_MM_GEMV_UNROLL
  for (int b = 0; b < B; ++b)
    RWKV_MM_GEMV_UNROLL
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc + b * kTile + 16 * j, f[b][j]);
#else
  for (int b = 0; b < B; ++b) {
    for (int c = 0; c < kTile; ++c) {
      int64_t s = 0;  // int64: no flush needed here
      for (int64_t p = 0; p < Kp; ++p) {
        const int32_t xp = xq[b * Kp + p];
        const int16_t x0 = static_cast<int16_t>(xp & 0xFFFF), x1 = static_cast<int16_t>(xp >> 16);
        s += x0 * w[(p * kTile + c) * 2] + x1 * w[(p * kTile + c) * 2 + 1];
      }
      acc[b * kTile + c] = static_cast<float>(s);
    }
  }
#endif
}

template <int B>
void bf16_tile(const uint32_t* xhi, const uint32_t* xlo, int64_t Kp, const uint16_t* __restrict w,
               float* __restrict acc) {
#if defined(__AVX512BF16__)
  __m512 f[B][4];
  RWKV_MM_GEMV_UNROLL
  for (int b = 0; b < B; ++b)
    RWKV_MM_GEMV_UNROLL
    for (int j = 0; j < 4; ++j) f[b][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < Kp; ++p) {
    const uint16_t* wp = w + p * 2 * kTile;
    __m512bh wv[4];
    RWKV_MM_GEMV_UNROLL
    for (int j = 0; j < 4; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(wp + 32 * j);
    RWKV_MM_GEMV_UNROLL
    for (int b = 0; b < B; ++b) {
      const __m512bh h = (__m512bh)_mm512_set1_epi32(static_cast<int>(xhi[b * Kp + p]));
      const __m512bh l = (__m512bh)_mm512_set1_epi32(static_cast<int>(xlo[b * Kp + p]));
      RWKV_MM_GEMV_UNROLL
      for (int j = 0; j < 4; ++j) f[b][j] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(f[b][j], l, wv[j]), h, wv[j]);
    }
  }
  RWKV_MM_GEMV_UNROLL
  for (int b = 0; b < B; ++b)
    RWKV_MM_GEMV_UNROLL
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(acc + b * kTile + 16 * j, f[b][j]);
#else
  for (int b = 0; b < B; ++b) {
    for (int c = 0; c < kTile; ++c) {
      float s = 0.0f;
      for (int64_t p = 0; p < Kp; ++p)
        for (int j = 0; j < 2; ++j) {
          const int sh = 16 * j;
          const float x = bf16_value((xhi[b * Kp + p] >> sh) & 0xFFFFu) + bf16_value((xlo[b * Kp + p] >> sh) & 0xFFFFu);
          s += x * bf16_value(w[(p * kTile + c) * 2 + j]);
        }
      acc[b * kTile + c] = s;
    }
  }
#endif
}

// Scratch rows of the activations, per thread.
struct PackedScratch {
  std::vector<int32_t> xq;
  std::vector<uint32_t> hi, lo;
  std::vector<float> xscale;
};

inline PackedScratch& packed_scratch() {
  thread_local PackedScratch s;
  return s;
}

// The tiles [t0, t1) of a packed weight for B (<= kMaxBatch) rows; y rows have stride N.
template <int B, bool kInt8>
void packed_tiles(const PackedScratch& s, int64_t Kp, const void* w, const float* scale, int64_t N, float* y,
                  int64_t t0, int64_t t1) {
  alignas(64) float acc[B * kTile];
  for (int64_t t = t0; t < t1; ++t) {
    if constexpr (kInt8)
      q8_tile<B>(s.xq.data(), Kp, static_cast<const int8_t*>(w) + t * Kp * 2 * kTile, acc);
    else
      bf16_tile<B>(s.hi.data(), s.lo.data(), Kp, static_cast<const uint16_t*>(w) + t * Kp * 2 * kTile, acc);
    const int64_t n0 = t * kTile, n1 = std::min(N, n0 + kTile);
    for (int b = 0; b < B; ++b) {
      const float xs = kInt8 ? s.xscale[b] : 1.0f;
      for (int64_t n = n0; n < n1; ++n) y[b * N + n] = acc[b * kTile + (n - n0)] * xs * scale[n];
    }
  }
}

template <int B, bool kInt8>
void packed_pass(const PackedScratch& s, int64_t Kp, const void* w, const float* scale, int64_t N, float* y,
                 int threads) {
  const int64_t tiles = tiles_of(N);
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tiles / 4)));
  if (threads == 1) {
    packed_tiles<B, kInt8>(s, Kp, w, scale, N, y, 0, tiles);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    packed_tiles<B, kInt8>(s, Kp, w, scale, N, y, tiles * t / nt, tiles * (t + 1) / nt);
  }
}

// y[B, N] = x[B, K] @ W^T for a packed int8 (kInt8) or bf16 weight; any B >= 1.
template <bool kInt8>
void packed_gemv(const float* x, int64_t B, int64_t K, const void* w, const float* scale, int64_t N, float* y,
                 int threads) {
  const int64_t Kp = pairs_of(K);
  PackedScratch& s = packed_scratch();
  for (int64_t b0 = 0; b0 < B; b0 += kMaxBatch) {
    const int rows = static_cast<int>(std::min<int64_t>(kMaxBatch, B - b0));
    if (kInt8) {
      s.xq.resize(rows * Kp);
      s.xscale.resize(rows);
      for (int b = 0; b < rows; ++b) s.xscale[b] = quantize_row_i16(x + (b0 + b) * K, K, s.xq.data() + b * Kp);
    } else {
      s.hi.resize(rows * Kp);
      s.lo.resize(rows * Kp);
      for (int b = 0; b < rows; ++b)
        split_row_bf16(x + (b0 + b) * K, K, s.hi.data() + b * Kp, s.lo.data() + b * Kp);
    }
    float* yb = y + b0 * N;
    switch (rows) {
      case 1: packed_pass<1, kInt8>(s, Kp, w, scale, N, yb, threads); break;
      case 2: packed_pass<2, kInt8>(s, Kp, w, scale, N, yb, threads); break;
      case 3: packed_pass<3, kInt8>(s, Kp, w, scale, N, yb, threads); break;
      default: packed_pass<4, kInt8>(s, Kp, w, scale, N, yb, threads); break;
    }
  }
}

}  // namespace gemv
}  // namespace rwkv_mm
