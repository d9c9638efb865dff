// What the integer linear kernels of every tier share: the input checks of the int8 and int4 kernels, and
// the activation side: rows of float32 x quantised to int16 codes with one float scale per
// block of k (reference: quantize_activations_reference in kernels/cpu_kernels.py).

#include "cpu_kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <vector>

void quantise_row(const float* x, int64_t K, int64_t block, int16_t* q, float* s, int32_t* sums, float qmax) {
  for (int64_t b = 0; b < K; b += block) {
    __m256 amax = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t k = b; k < b + block; k += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float mx = _mm_cvtss_f32(m4);
    // blocks below 1e-30 (qmax / amax would overflow float for amax < ~1e-34) count as zero
    const bool zero = !(mx > 1e-30f);
    const float inv = zero ? 0.0f : qmax / mx;
    s[b / block] = zero ? 0.0f : mx / qmax;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int64_t k = b; k < b + block; k += 16) {
      const __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv));
      const __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv));
      // packs works per 128-bit lane: fix the order with a cross-lane permute
      const __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), p);
    }
    if (sums != nullptr) {
      int32_t total = 0;
      for (int64_t k = b; k < b + block; ++k) total += q[k];
      sums[b / block] = total;
    }
  }
}

void quantise_rows(const float* x, int64_t M, int64_t K, int64_t block, int16_t* q, float* s, int32_t* sums,
                   float qmax) {
  const int64_t Kp = padded_k(K), nb = Kp / block;
  std::vector<float> tail(K == Kp ? 0 : Kp, 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    if (K != Kp) {  // the missing k of the last block count as zeros
      std::copy(row, row + K, tail.begin());
      row = tail.data();
    }
    quantise_row(row, Kp, block, q + m * Kp, s + m * nb, sums == nullptr ? nullptr : sums + m * nb, qmax);
  }
}

W8Shape check_w8_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& bias,
                      int64_t tile, int64_t act_bits) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "w8_linear: x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(),
              "w8_linear: w must be a contiguous int8 [N", tile, ", Kp] tensor in pack_w8 layout");
  const int64_t M = x.size(0), K = padded_k(x.size(1)), N = scale.numel();
  TORCH_CHECK(w.size(1) == K, "w8_linear: x has K=", x.size(1), " (", K, " packed) but w has K=", w.size(1));
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              "w8_linear: scale must be a contiguous float32 [N] tensor");
  TORCH_CHECK(w.size(0) == (N + tile - 1) / tile * tile,
              "w8_linear: w has ", w.size(0), " rows; N=", N, " scales need ", (N + tile - 1) / tile * tile);
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == at::kFloat && bias.numel() == N),
              "w8_linear: bias must be float32 [N] or empty");
  TORCH_CHECK(act_bits == 8 || act_bits == 16, "w8_linear: act_bits must be 8 or 16, got ", act_bits);
  return {M, K, N, has_bias};
}

W8Shape check_w4_args(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws, int64_t N,
                      const at::Tensor& bias, int64_t tile) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "w4_linear: x must be a contiguous float32 [M, K] tensor");
  const int64_t M = x.size(0), K = padded_k(x.size(1));
  const int64_t nt = (N + tile - 1) / tile * tile;
  TORCH_CHECK(wq.scalar_type() == at::kByte && wq.is_contiguous() && wq.dim() == 2 && wq.size(0) == nt &&
                  wq.size(1) == K / 2,
              "w4_linear: wq must be a contiguous uint8 [", nt, ", ", K / 2, "] tensor in pack_w4 layout (x has K=",
              K, ")");
  TORCH_CHECK(ws.scalar_type() == at::kHalf && ws.is_contiguous() && ws.numel() == nt / tile * (K / kW4Group) * 2 * tile,
              "w4_linear: ws must be contiguous float16 [N", tile, "/", tile, ", K/32, 2, ", tile,
              "] scales in pack_w4 layout");
  const bool has_bias = bias.numel() > 0;
  TORCH_CHECK(!has_bias || (bias.scalar_type() == at::kFloat && bias.numel() == N),
              "w4_linear: bias must be float32 [N] or empty");
  return {M, K, N, has_bias};
}
