// Weight-only int8 linear for small row counts on x86 CPUs with AVX2 + FMA.
//
//   y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]  (+ bias[n])
//
//   x     [M, K] float32, contiguous (M is small: 1 for decode, up to ~64 for verification)
//   w     [N, K] int8, contiguous (per-output-channel symmetric quantisation)
//   scale [N]    float32
//   bias  [N]    float32 or an empty tensor
//
// Batch-1 decode streams every weight once per token, so the kernel is written to stream
// int8 weights at memory speed: output rows are split across threads (at::parallel_for), a
// block of 4 weight rows is widened to float32 once into an L1-resident buffer, and each
// group of up to 3 activation rows is multiplied against it with 12 register accumulators.
// Verification with M rows re-reads the buffer, not memory, so it costs far less than M
// single-row steps. The reference is `w8_linear_reference` in kernels/cpu_quant.py.

#include "cpu_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t NB = 4;  // weight rows per block

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 shuf = _mm_movehdup_ps(lo);
  __m128 sums = _mm_add_ps(lo, shuf);
  shuf = _mm_movehl_ps(shuf, sums);
  sums = _mm_add_ss(sums, shuf);
  return _mm_cvtss_f32(sums);
}

// acc[m][r] = x[m] . w[r] straight from int8 weights stored in the kernel's 32-byte layout:
// byte j of dword d of each 32-byte group holds k = 8 j + d, so a shift pair pulls out 8
// consecutive k's as int32 lanes without a shuffle (see pack_w8 in kernels/cpu_quant.py).
template <int MT>
inline void tile_direct(const float* x, int64_t ldx, const int8_t* w, int64_t K, float out[][NB]) {
  __m256 acc[MT][NB];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NB; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    for (int r = 0; r < NB; ++r) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k));
      const __m256 f0 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24));
      const __m256 f1 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 16), 24));
      const __m256 f2 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 8), 24));
      const __m256 f3 = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 24));
      for (int m = 0; m < MT; ++m) {
        const float* xk = x + m * ldx + k;
        acc[m][r] = _mm256_fmadd_ps(f0, _mm256_loadu_ps(xk), acc[m][r]);
        acc[m][r] = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xk + 8), acc[m][r]);
        acc[m][r] = _mm256_fmadd_ps(f2, _mm256_loadu_ps(xk + 16), acc[m][r]);
        acc[m][r] = _mm256_fmadd_ps(f3, _mm256_loadu_ps(xk + 24), acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < NB; ++r) out[m][r] = hsum(acc[m][r]);
}

}  // namespace

at::Tensor w8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                        const at::Tensor& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "w8_linear: x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(),
              "w8_linear: w must be a contiguous int8 [N, K] tensor");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "w8_linear: x has K=", K, " but w has K=", w.size(1));
  TORCH_CHECK(K % 32 == 0, "w8_linear: K must be a multiple of 32, got ", K);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == N && scale.is_contiguous(),
              "w8_linear: scale must be a contiguous float32 [N] tensor");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == at::kFloat && bias.numel() == N),
              "w8_linear: bias must be float32 [N] or empty");
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t blocks = (N + NB - 1) / NB;

  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    std::vector<int8_t> tail;  // a zero-padded copy of the last, partial block
    float out[3][NB];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * NB;
      const int64_t rows = std::min(NB, N - n0);
      const int8_t* wb = wp + n0 * K;
      if (rows < NB) {
        tail.assign(NB * K, 0);
        std::copy(wb, wb + rows * K, tail.begin());
        wb = tail.data();
      }
      for (int64_t m0 = 0; m0 < M; m0 += 3) {
        const int64_t mt = std::min<int64_t>(3, M - m0);
        const float* xm = xp + m0 * K;
        if (mt == 3) tile_direct<3>(xm, K, wb, K, out);
        else if (mt == 2) tile_direct<2>(xm, K, wb, K, out);
        else tile_direct<1>(xm, K, wb, K, out);
        for (int64_t m = 0; m < mt; ++m) {
          float* dst = yp + (m0 + m) * N + n0;
          for (int64_t r = 0; r < rows; ++r) {
            const float v = out[m][r] * sp[n0 + r];
            dst[r] = has_bias ? v + bp[n0 + r] : v;
          }
        }
      }
    }
  });
  return y;
}

