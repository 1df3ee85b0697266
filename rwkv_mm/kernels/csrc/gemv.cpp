// Small-batch matrix-vector products for one-token decode: y[B, N] = x[B, K] @ wt[K, N], B in 1..4,
// fp32, with wt row-major (the transposed nn.Linear weight: the model stores W [N, K] column-major, so
// W.t() is this wt without a copy). Decode is memory-bound on wt, so the loop is shaped for streaming:
// each thread owns a contiguous slice of the N columns and sweeps the K rows eight at a time, so it reads
// eight sequential streams while its y slice (tiles of NT columns) stays in L1;
// every wt element is loaded once and used for all B rows of x. Masked AVX-512 loads handle N % 16.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace {

// Tuned on the 0.1B decode shapes (one thread, weights cold in DRAM): 8 rows per sweep streamed at
// ~92% of a plain array read; software prefetch (T0/T1/NTA, 4..32 rows ahead) only slowed it down.
constexpr int64_t KU = 8;     // rows of wt per sweep (sequential streams), even
constexpr int64_t NT = 1024;  // columns per tile: the B y rows of a tile stay in L1

template <int B>
void gemv_slice(const float* __restrict x, const float* __restrict wt, float* __restrict y, int64_t K,
                int64_t N, int64_t n0, int64_t n1) {
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
void gemv_batch(const float* x, const float* wt, float* y, int64_t K, int64_t N) {
  // slices of whole cache lines (16 floats), at least 256 columns each so that tiny N stays serial
  const int64_t lines = (N + 15) / 16;
  const int threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (lines + 15) / 16)));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t n0 = std::min(N, lines * t / nt * 16), n1 = std::min(N, lines * (t + 1) / nt * 16);
    for (int64_t a = n0; a < n1; a += NT) gemv_slice<B>(x, wt, y, K, N, a, std::min(n1, a + NT));
  }
}

torch::Tensor gemv_t(torch::Tensor x, torch::Tensor wt) {
  TORCH_CHECK(x.device().is_cpu() && wt.device().is_cpu(), "gemv: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && wt.scalar_type() == torch::kFloat32, "gemv: float32 only");
  TORCH_CHECK(x.dim() == 2 && wt.dim() == 2 && x.size(1) == wt.size(0), "gemv: x [B, K] and wt [K, N]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 4, "gemv: batch 1..4, got ", x.size(0));
  TORCH_CHECK(wt.is_contiguous(), "gemv: wt must be row-major contiguous");
  x = x.contiguous();
  const int64_t B = x.size(0), K = x.size(1), N = wt.size(1);
  auto y = torch::empty({B, N}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = wt.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (B) {
    case 1: gemv_batch<1>(xp, wp, yp, K, N); break;
    case 2: gemv_batch<2>(xp, wp, yp, K, N); break;
    case 3: gemv_batch<3>(xp, wp, yp, K, N); break;
    default: gemv_batch<4>(xp, wp, yp, K, N); break;
  }
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_t", &gemv_t, "y[B, N] = x[B, K] @ wt[K, N], fp32, B in 1..4, wt row-major");
}
