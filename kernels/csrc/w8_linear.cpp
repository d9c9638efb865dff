// Int8-weight linear for small row counts: the AVX2 tier (the avx512 and amx tiers build
// w8_linear_avx512.cpp instead, with the same arithmetic and so the same results).
//
//   y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]  (+ bias[n])
//   act_bits 16 (w8a16): activation codes int16; 8 (w8a8_int8): codes in -127..127
//
//   x     [M, K] float32, contiguous (M is small: 1 for decode, up to ~64 for verification)
//   w     [N8, Kp] int8 in pack_w8's layout (N8 = N rounded up to 8, Kp = K rounded up to 32,
//         zero padding; per-channel symmetric)
//   scale [N]    float32
//   bias  [N]    float32 or an empty tensor
//
// Integer dot products: each row of x is quantised on the fly to int16 with one float scale
// per block of act_block(Kp) k (relative error <= 2^-16 of the block's largest |x|, far finer than the
// bf16 activations of the usual w8a16 kernels), and `vpmaddwd` multiplies int16 activation
// pairs with sign-extended int8 weight pairs into int32: 16 multiply-adds per instruction and
// no int -> float conversion of the weights. Each block's int32 sums are scaled into float32
// accumulators in block order, so a row's result does not depend on M (lossless speculative
// verification needs a verified row to equal its decoded self).
//
// Layout (pack_w8): tiles of 8 output channels; within a tile, for each pair of k, 16 bytes
// [n0 k, n0 k+1, n1 k, n1 k+1, ..., n7 k+1]; one 16-byte load sign-extends to the 8 int16
// pairs that `vpmaddwd` wants. Output tiles are split across threads (at::parallel_for); a
// tile's weights (8 x K bytes) stay in L1 while every group of rows of x passes over them.
// Reference: `w8_linear_reference` in kernels/cpu_kernels.py.

#include "cpu_kernels.h"
#include "tile_driver.h"

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t TILE = 8;  // output channels per tile


// MT rows of x against NT adjacent tiles: out[m][t*8 + j] = sum_b s[m][b] * (int sums of block b)
// pf: the next tile pair's weights (2 x 8 x K bytes), prefetched into L2 while this pair computes,
// so that memory and arithmetic overlap (null: no prefetch).
template <int MT, int NT>
inline void tile_kernel(const int16_t* xq, const float* xs, int64_t K, int64_t BLOCK, const int8_t* w, float* out,
                        int64_t ldo, const int8_t* pf) {
  __m256 facc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int t = 0; t < NT; ++t) facc[m][t] = _mm256_setzero_ps();
  const int64_t tile_bytes = TILE * K;
  for (int64_t b = 0; b < K; b += BLOCK) {
    __m256i acc[MT][NT];
    for (int m = 0; m < MT; ++m)
      for (int t = 0; t < NT; ++t) acc[m][t] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int64_t k = b; k < b + BLOCK; k += 2) {
      // 16 bytes of the next pair per k pair: over K / 2 iterations that is its 16 K bytes
      if (pf != nullptr && (k & 7) == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(pf + k * 16), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(pf + k * 16 + 64), _MM_HINT_T1);
      }
      __m256i wv[NT];
      for (int t = 0; t < NT; ++t)
        wv[t] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + t * tile_bytes + k * TILE)));
      for (int m = 0; m < MT; ++m) {
        int32_t pair;
        std::memcpy(&pair, xq + m * K + k, sizeof(pair));
        const __m256i xb = _mm256_set1_epi32(pair);
        for (int t = 0; t < NT; ++t) acc[m][t] = _mm256_add_epi32(acc[m][t], _mm256_madd_epi16(wv[t], xb));
      }
    }
    for (int m = 0; m < MT; ++m) {
      const __m256 s = _mm256_set1_ps(xs[m * (K / BLOCK) + b / BLOCK]);
      for (int t = 0; t < NT; ++t) facc[m][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][t]), s, facc[m][t]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int t = 0; t < NT; ++t) _mm256_storeu_ps(out + m * ldo + t * TILE, facc[m][t]);
}

// all M rows against NT adjacent tiles (weights stay in L1), in groups of up to 3 rows
// (the first group of rows prefetches the next pair `pf`, null at the thread's last pair)
template <int NT>
void rows_kernel(int64_t M, const int16_t* xq, const float* xs, int64_t K, int64_t block, const int8_t* w,
                 float* buf, int64_t ldo, const int8_t* pf) {
  int64_t m = 0;
  const int64_t nb = K / block;
  for (; m + 3 <= M; m += 3, pf = nullptr)
    tile_kernel<3, NT>(xq + m * K, xs + m * nb, K, block, w, buf + m * ldo, ldo, pf);
  if (M - m == 2) tile_kernel<2, NT>(xq + m * K, xs + m * nb, K, block, w, buf + m * ldo, ldo, pf);
  if (M - m == 1) tile_kernel<1, NT>(xq + m * K, xs + m * nb, K, block, w, buf + m * ldo, ldo, pf);
}

}  // namespace

at::Tensor w8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                     const at::Tensor& bias, int64_t act_bits) {
  const W8Shape sh = check_w8_args(x, w, scale, bias, TILE, act_bits);
  const int64_t M = sh.M, K = sh.Kp, N = sh.N;
  const bool has_bias = sh.has_bias;
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();

  const int64_t block = act_block(K, act_bits);
  std::vector<int16_t> xq(M * K);
  std::vector<float> xs(M * (K / block));
  // int8 codes (w8a8_int8) are int16 codes in -127..127 here: the same exact block sums as the
  // avx512 tier's one-byte VNNI path, at w8a16's speed (a one-byte vpmaddubsw path would need
  // another weight layout; not written)
  quantise_rows(xp, M, x.size(1), block, xq.data(), xs.data(), nullptr, act_qmax(act_bits));

  const int64_t tiles = w.size(0) / TILE;
  for_tile_pairs<TILE>(M, N, tiles, sp, bp, yp, [&](int64_t t0, int64_t nt, float* buf) {
    const int8_t* wt = wp + t0 * TILE * K;
    const int8_t* pf = t0 + 4 <= tiles ? wt + 2 * TILE * K : nullptr;  // the next pair, when it is full
    if (nt == 2) rows_kernel<2>(M, xq.data(), xs.data(), K, block, wt, buf, 2 * TILE, pf);
    else rows_kernel<1>(M, xq.data(), xs.data(), K, block, wt, buf, 2 * TILE, pf);
  });
  return y;
}
