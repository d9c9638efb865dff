// Weight-only int4 linear for the avx512 and amx tiers (the avx2 tier builds w4_linear.cpp, with
// the same arithmetic and so the same results, bit for bit).
//
//   y[m, n] = sum_k x[m, k] * w[n, k]  (+ bias[n]),  w[n, k] = scale[n, g] * q[n, k] + low[n, g]
//   (g = k / 32, q in 0..15: llama.cpp's Q4_1 arrangement)
//
//   x  [M, K] float32, contiguous (K is padded with zeros to Kp, a multiple of 64)
//   wq [N16, Kp/2] uint8, ws [N16/16, Kp/32, 2, 16] float16 (scale, low) in this tier's pack_w4 layout
//
// As on AVX2, each row of x is quantised to int16 per block of 32 k (scale sx_g, sum of codes
// S_g) and per block and channel  sum_k x_k w_k = sx_g * (scale * sum_k xq_k q_k + low * S_g),
// the inner sum exact in int32; here from `vpdpwssd` (AVX-512 VNNI: 16 channels x 2 k of int16
// products added into int32 lanes in one instruction, where AVX2 needs vpmaddwd + vpaddd for 8).
//
// Layout (pack_w4 for avx512/amx): tiles of 16 output channels; per 4 k, 32 bytes, byte 2c + j
// = q[c][k + j] | q[c][k + 2 + j] << 4 (j = 0, 1): one zero-extension to 32 int16 lanes and a
// mask / shift give the (k, k+1) and (k+2, k+3) pairs of the 16 channels.
// Reference: `w4_linear_reference` in kernels/cpu_kernels.py.

#include "cpu_kernels.h"
#include "tile_driver.h"

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstring>
#include <vector>

namespace {

constexpr int64_t TILE = 16;  // output channels per tile
constexpr int64_t BLOCK = kW4Group;  // k per activation scale: the weight groups

struct Rows {
  const int16_t* q;    // [M, K]
  const float* s;      // [M, K/32]
  const int32_t* sum;  // [M, K/32]
};

inline __m512i bcast_pair(const int16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}

// MT rows x NT adjacent tiles; pf: the next tile pair's weights, prefetched into L2 while this
// pair computes (one 64-byte line per tile and 8 k, as fast as this pair is read), or null
template <int MT, int NT>
inline void tile4(const Rows& x, int64_t K, const uint8_t* wq, const at::Half* ws, float* out, int64_t ldo,
                  const uint8_t* pf) {
  const int64_t nb = K / BLOCK;
  const int64_t tile_bytes = TILE * K / 2;
  const int64_t tile_scales = nb * 2 * TILE;
  const __m512i low4 = _mm512_set1_epi16(0x0F);
  __m512 facc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int t = 0; t < NT; ++t) facc[m][t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i acc[MT][NT];
    for (int m = 0; m < MT; ++m)
      for (int t = 0; t < NT; ++t) acc[m][t] = _mm512_setzero_si512();
#pragma GCC unroll 2
    for (int64_t k = b * BLOCK; k < (b + 1) * BLOCK; k += 4) {
      if (pf != nullptr && (k & 7) == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(pf + k * TILE / 2), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(pf + tile_bytes + k * TILE / 2), _MM_HINT_T1);
      }
      __m512i w0[NT], w1[NT];
      for (int t = 0; t < NT; ++t) {
        const __m512i v = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + t * tile_bytes + k * TILE / 2)));
        w0[t] = _mm512_and_si512(v, low4);
        w1[t] = _mm512_srli_epi16(v, 4);
      }
      for (int m = 0; m < MT; ++m) {
        const __m512i x0 = bcast_pair(x.q + m * K + k), x1 = bcast_pair(x.q + m * K + k + 2);
        for (int t = 0; t < NT; ++t)
          acc[m][t] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(acc[m][t], w0[t], x0), w1[t], x1);
      }
    }
    for (int t = 0; t < NT; ++t) {
      const at::Half* sc = ws + t * tile_scales + b * 2 * TILE;
      const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc)));
      const __m512 low = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + TILE)));
      for (int m = 0; m < MT; ++m) {
        const __m512 s_g = _mm512_set1_ps(static_cast<float>(x.sum[m * nb + b]));
        const __m512 part = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][t]), scale, _mm512_mul_ps(low, s_g));
        facc[m][t] = _mm512_fmadd_ps(part, _mm512_set1_ps(x.s[m * nb + b]), facc[m][t]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + m * ldo + t * TILE, facc[m][t]);
}

// all M rows against NT adjacent tiles in groups of up to 4 rows; the first group prefetches pf
template <int NT>
void rows4(int64_t M, const Rows& x, int64_t K, const uint8_t* wq, const at::Half* ws, float* buf, int64_t ldo,
           const uint8_t* pf) {
  const int64_t nb = K / BLOCK;
  auto at = [&](int64_t m) { return Rows{x.q + m * K, x.s + m * nb, x.sum + m * nb}; };
  int64_t m = 0;
  for (; m + 4 <= M; m += 4, pf = nullptr) tile4<4, NT>(at(m), K, wq, ws, buf + m * ldo, ldo, pf);
  if (M - m == 3) tile4<3, NT>(at(m), K, wq, ws, buf + m * ldo, ldo, pf);
  if (M - m == 2) tile4<2, NT>(at(m), K, wq, ws, buf + m * ldo, ldo, pf);
  if (M - m == 1) tile4<1, NT>(at(m), K, wq, ws, buf + m * ldo, ldo, pf);
}

}  // namespace

at::Tensor w4_linear(const at::Tensor& x, const at::Tensor& wq, const at::Tensor& ws, int64_t N,
                     const at::Tensor& bias) {
  const W8Shape sh = check_w4_args(x, wq, ws, N, bias, TILE);
  const int64_t M = sh.M, K = sh.Kp, tiles = wq.size(0) / TILE;
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const uint8_t* wp = wq.data_ptr<uint8_t>();
  const at::Half* sp = ws.data_ptr<at::Half>();
  const float* bp = sh.has_bias ? bias.data_ptr<float>() : nullptr;

  const int64_t nb = K / BLOCK;
  std::vector<int16_t> xq(M * K);
  std::vector<float> xs(M * nb);
  std::vector<int32_t> xsum(M * nb);
  quantise_rows(x.data_ptr<float>(), M, x.size(1), BLOCK, xq.data(), xs.data(), xsum.data());
  const Rows rows{xq.data(), xs.data(), xsum.data()};

  for_tile_pairs<TILE>(M, N, tiles, nullptr, bp, y.data_ptr<float>(), [&](int64_t t0, int64_t nt, float* buf) {
    const uint8_t* wt = wp + t0 * TILE * K / 2;
    const at::Half* st = sp + t0 * nb * 2 * TILE;
    const uint8_t* pf = t0 + 4 <= tiles ? wt + 2 * TILE * K / 2 : nullptr;  // the next pair, when it is full
    if (nt == 2) rows4<2>(M, rows, K, wt, st, buf, 2 * TILE, pf);
    else rows4<1>(M, rows, K, wt, st, buf, 2 * TILE, pf);
  });
  return y;
}
