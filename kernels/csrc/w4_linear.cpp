// Weight-only int4 linear for small row counts: the AVX2 tier (the avx512 and amx tiers build
// w4_linear_avx512.cpp instead, with the same arithmetic and so the same results).
//
//   y[m, n] = sum_k x[m, k] * w[n, k]  (+ bias[n]),  w[n, k] = scale[n, g] * q[n, k] + low[n, g]
//   (g = k / 32, q in 0..15: llama.cpp's Q4_1 arrangement, 4 bits + two float16 per 32 weights)
//
//   x  [M, K] float32, contiguous (K is padded with zeros to Kp, a multiple of 32)
//   wq [N8, Kp/2] uint8, ws [N8/8, Kp/32, 2, 8] float16 (scale, low) in pack_w4's layout
//
// As in w8_linear.cpp, each row of x is quantised to int16 per block of 32 k (scale sx_g, sum of
// codes S_g), so per block and channel
//   sum_k x_k w_k = sx_g * (scale * sum_k xq_k q_k + low * S_g)
// with the inner sum in int32 from `vpmaddwd`. Half the weight bytes of int8 (plus 1 bit of
// scales per weight): batch-1 decode streams 66 MB instead of 106 MB for the bundled model.
//
// Layout (pack_w4): tiles of 8 output channels; per 4 k, 16 bytes whose low nibbles are the
// int8 kernel's 16-byte pair group for (k, k+1) and high nibbles the one for (k+2, k+3).
// Reference: `w4_linear_reference` in kernels/cpu_kernels.py.

#include "cpu_kernels.h"
#include "tile_driver.h"

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t TILE = 8;  // output channels per tile (every tier)
constexpr int64_t BLOCK = kW4Group;  // k per activation scale: the weight groups

struct Rows {
  const int16_t* q;   // [M, K]
  const float* s;     // [M, K/32]
  const int32_t* sum; // [M, K/32]
};

template <int MT, int NT>
inline void tile4(const Rows& x, int64_t K, const uint8_t* wq, const at::Half* ws, float* out, int64_t ldo) {
  const int64_t nb = K / BLOCK;
  const int64_t tile_bytes = TILE * K / 2;
  const int64_t tile_scales = nb * 2 * TILE;
  const __m256i low4 = _mm256_set1_epi16(0x0F);
  __m256 facc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int t = 0; t < NT; ++t) facc[m][t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i acc[MT][NT];
    for (int m = 0; m < MT; ++m)
      for (int t = 0; t < NT; ++t) acc[m][t] = _mm256_setzero_si256();
#pragma GCC unroll 2
    for (int64_t k = b * BLOCK; k < (b + 1) * BLOCK; k += 4) {
      __m256i w0[NT], w1[NT];
      for (int t = 0; t < NT; ++t) {
        // one widening per 16 bytes: int16 lane i holds byte i, low nibble (k, k+1), high (k+2, k+3)
        const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wq + t * tile_bytes + k * 4)));
        w0[t] = _mm256_and_si256(v, low4);
        w1[t] = _mm256_srli_epi16(v, 4);
      }
      for (int m = 0; m < MT; ++m) {
        int32_t p0, p1;
        std::memcpy(&p0, x.q + m * K + k, sizeof(p0));
        std::memcpy(&p1, x.q + m * K + k + 2, sizeof(p1));
        const __m256i x0 = _mm256_set1_epi32(p0), x1 = _mm256_set1_epi32(p1);
        for (int t = 0; t < NT; ++t)
          acc[m][t] = _mm256_add_epi32(acc[m][t], _mm256_add_epi32(_mm256_madd_epi16(w0[t], x0),
                                                                   _mm256_madd_epi16(w1[t], x1)));
      }
    }
    for (int t = 0; t < NT; ++t) {
      const at::Half* sc = ws + t * tile_scales + b * 2 * TILE;
      const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
      const __m256 low = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + TILE)));
      for (int m = 0; m < MT; ++m) {
        const __m256 s_g = _mm256_set1_ps(static_cast<float>(x.sum[m * nb + b]));
        const __m256 part = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][t]), scale, _mm256_mul_ps(low, s_g));
        facc[m][t] = _mm256_fmadd_ps(part, _mm256_set1_ps(x.s[m * nb + b]), facc[m][t]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int t = 0; t < NT; ++t) _mm256_storeu_ps(out + m * ldo + t * TILE, facc[m][t]);
}

template <int NT>
void rows4(int64_t M, const Rows& x, int64_t K, const uint8_t* wq, const at::Half* ws, float* buf, int64_t ldo) {
  const int64_t nb = K / BLOCK;
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) {
    const Rows r{x.q + m * K, x.s + m * nb, x.sum + m * nb};
    tile4<2, NT>(r, K, wq, ws, buf + m * ldo, ldo);
  }
  if (m < M) {
    const Rows r{x.q + m * K, x.s + m * nb, x.sum + m * nb};
    tile4<1, NT>(r, K, wq, ws, buf + m * ldo, ldo);
  }
}

}  // namespace

at::Tensor w4_linear(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws, int64_t N,
                     const at::Tensor& bias) {
  const W8Shape sh = check_w4_args(x, wq, ws, N, bias, TILE);
  const int64_t M = sh.M, K = sh.Kp, n8 = wq.size(0);
  const bool has_bias = sh.has_bias;
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = wq.data_ptr<uint8_t>();
  const at::Half* sp = ws.data_ptr<at::Half>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();

  const int64_t nb = K / BLOCK;
  std::vector<int16_t> xq(M * K);
  std::vector<float> xs(M * nb);
  std::vector<int32_t> xsum(M * nb);
  quantise_rows(xp, M, x.size(1), BLOCK, xq.data(), xs.data(), xsum.data());
  const Rows rows{xq.data(), xs.data(), xsum.data()};

  for_tile_pairs<TILE>(M, N, n8 / TILE, nullptr, bp, yp, [&](int64_t t0, int64_t nt, float* buf) {
    const uint8_t* wt = wp + t0 * TILE * K / 2;
    const at::Half* st = sp + t0 * nb * 2 * TILE;
    if (nt == 2) rows4<2>(M, rows, K, wt, st, buf, 2 * TILE);
    else rows4<1>(M, rows, K, wt, st, buf, 2 * TILE);
  });
  return y;
}
