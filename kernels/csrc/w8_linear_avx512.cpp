// Weight-only int8 linear for the avx512 and amx tiers (the avx2 tier builds w8_linear.cpp).
//
//   y[m, n] = scale[n] * sum_b s[m, b] * (sum_{k in block b} q[m, k] * w[n, k])  (+ bias[n])
//
//   x     [M, K] float32, contiguous; quantised here to int16 codes q per block of act_block(Kp)
//   w     [N16, Kp] int8 in this tier's pack_w8 layout: tiles of 16 output channels, each tile
//         [Kp/4, 16, 4] (for every 4 k, 64 bytes: 4 consecutive k of channel 0, of channel 1,
//         ...), which is exactly an AMX int8 B tile and one `vpdpbusd` operand
//   scale [N] float32, bias [N] float32 or empty
//
// The int32 sum of each block is exact, whichever instructions compute it, and it is scaled
// into float32 accumulators in block order with the same float operations as the AVX2 tier:
// a row's result is bitwise the same for any M, on either path below and on every tier.
//
// The int16 codes are split into bytes, q = 256 hi + lo (hi = q >> 8 in -128..127, lo = q & 255),
// because the int8 dot products multiply bytes:
//   * VNNI (`vpdpbusd`, unsigned x signed bytes, 4 products per int32 lane), used for few rows:
//     sum (hi + 128) w - 128 sum w  and  sum lo w, with sum w from the same instruction on ones;
//   * AMX (amx tier, M >= kAmxMinRows = 3): TDPBSSD (hi, signed) and TDPBUSD (lo, unsigned) into two
//     int32 accumulator tiles per 16 rows and 16 channels, 64 k per instruction.
// With act_bits = 8 (w8a8_int8) the codes are already bytes (-127..127): VNNI computes
// sum (q + 128) w - 128 sum w, one instruction per row and 4 k instead of two; AMX (M >= 3) one
// TDPBSSD per 64 k (a block), signed codes times signed weights.
// Reference: `w8_linear_reference` in kernels/cpu_kernels.py (the tier's `act_block`).

#include "cpu_kernels.h"
#include "tile_driver.h"

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t TILE = 16;  // output channels per tile
constexpr int64_t kAmxMinRows = 3;  // fewer rows: VNNI is faster (measured on a 2-core Xeon)

struct Codes {
  const uint8_t* hi;  // [M, Kp] VNNI's unsigned operand: (q >> 8) + 128, or q + 128 for int8 codes
  const uint8_t* hs;  // [M, Kp] AMX's signed operand: q >> 8 as int8, or the int8 codes q
  const uint8_t* lo;  // [M, Kp] q & 255 (int16 codes only)
  const float* s;     // [M, Kp / block]
};

// hi (+128 for VNNI's unsigned operand; skipped when hi_u is null), hi (signed), lo bytes of
// int16 codes, 32 at a time
void split_codes(const int16_t* q, int64_t n, uint8_t* hi_u, uint8_t* hi_s, uint8_t* lo) {
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512i v = _mm512_loadu_si512(q + i);
    const __m256i h = _mm512_cvtepi16_epi8(_mm512_srai_epi16(v, 8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi_s + i), h);
    if (hi_u != nullptr) _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi_u + i), _mm256_xor_si256(h, bias));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo + i), _mm512_cvtepi16_epi8(v));
  }
  for (; i < n; ++i) {
    const int h = q[i] >> 8;
    hi_s[i] = static_cast<uint8_t>(h);
    if (hi_u != nullptr) hi_u[i] = static_cast<uint8_t>(h + 128);
    lo[i] = static_cast<uint8_t>(q[i] & 0xFF);
  }
}

// int8 codes (-127..127, stored as int16) -> bytes, 32 at a time (n % 32 == 0): q + 128 as
// unsigned bytes (VNNI's operand, offset) or q as signed bytes (AMX's)
void byte_codes(const int16_t* q, int64_t n, uint8_t* out, bool offset) {
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(offset ? 0x80 : 0));
  for (int64_t i = 0; i < n; i += 32) {
    const __m256i b = _mm512_cvtepi16_epi8(_mm512_loadu_si512(q + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_xor_si256(b, bias));
  }
}

inline __m512i bcast4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}

// 4 k of NT adjacent tiles: their 64-byte weight vectors into wv, and sum w added into wsum (VNNI
// on ones); the next pair's matching lines prefetched into L2 first (pf null: none)
template <int NT>
inline void load_weights(const int8_t* w, int64_t tile_bytes, int64_t k, const int8_t* pf, __m512i* wv,
                         __m512i* wsum) {
  if (pf != nullptr) {
    _mm_prefetch(reinterpret_cast<const char*>(pf + k * TILE), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(pf + tile_bytes + k * TILE), _MM_HINT_T1);
  }
  const __m512i ones = _mm512_set1_epi8(1);
  for (int t = 0; t < NT; ++t) {
    wv[t] = _mm512_loadu_si512(w + t * tile_bytes + k * TILE);
    wsum[t] = _mm512_dpbusd_epi32(wsum[t], ones, wv[t]);
  }
}

// MT rows x NT adjacent tiles with VNNI: out[m][t*16 + j] = sum_b s[m][b] * (block b's int32 sum)
// pf: the next tile pair's weights (2 x 16 x K bytes), prefetched into L2 while this pair computes
// (one 64-byte line per tile and 4 k, as fast as this pair is read), null: no prefetch
template <int MT, int NT>
inline void vnni_tile(const Codes& x, int64_t K, int64_t block, const int8_t* w, float* out, int64_t ldo,
                      const int8_t* pf) {
  const int64_t nb = K / block;
  const int64_t tile_bytes = TILE * K;
  __m512 facc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int t = 0; t < NT; ++t) facc[m][t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i ahi[MT][NT], alo[MT][NT], wsum[NT];
    for (int t = 0; t < NT; ++t) wsum[t] = _mm512_setzero_si512();
    for (int m = 0; m < MT; ++m)
      for (int t = 0; t < NT; ++t) ahi[m][t] = alo[m][t] = _mm512_setzero_si512();
    for (int64_t k = b * block; k < (b + 1) * block; k += 4) {
      __m512i wv[NT];
      load_weights<NT>(w, tile_bytes, k, pf, wv, wsum);
      for (int m = 0; m < MT; ++m) {
        const __m512i h = bcast4(x.hi + m * K + k), l = bcast4(x.lo + m * K + k);
        for (int t = 0; t < NT; ++t) {
          ahi[m][t] = _mm512_dpbusd_epi32(ahi[m][t], h, wv[t]);
          alo[m][t] = _mm512_dpbusd_epi32(alo[m][t], l, wv[t]);
        }
      }
    }
    for (int t = 0; t < NT; ++t) wsum[t] = _mm512_slli_epi32(wsum[t], 7);  // 128 sum w
    for (int m = 0; m < MT; ++m) {
      const __m512 s = _mm512_set1_ps(x.s[m * nb + b]);
      for (int t = 0; t < NT; ++t) {
        const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(_mm512_sub_epi32(ahi[m][t], wsum[t]), 8), alo[m][t]);
        facc[m][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), s, facc[m][t]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + m * ldo + t * TILE, facc[m][t]);
}

// all M rows against NT adjacent tiles in groups of up to 3 rows; the first group prefetches the
// next pair `pf` (null at the thread's last pair)
template <int NT>
void vnni_rows(int64_t M, const Codes& x, int64_t K, int64_t block, const int8_t* w, float* buf, int64_t ldo,
               const int8_t* pf) {
  const int64_t nb = K / block;
  auto at = [&](int64_t m) { return Codes{x.hi + m * K, x.hs + m * K, x.lo + m * K, x.s + m * nb}; };
  int64_t m = 0;
  for (; m + 3 <= M; m += 3, pf = nullptr) vnni_tile<3, NT>(at(m), K, block, w, buf + m * ldo, ldo, pf);
  if (M - m == 2) vnni_tile<2, NT>(at(m), K, block, w, buf + m * ldo, ldo, pf);
  if (M - m == 1) vnni_tile<1, NT>(at(m), K, block, w, buf + m * ldo, ldo, pf);
}

// act_bits = 8: u [M, K] = q + 128 as bytes. MT rows x NT tiles, as vnni_tile with one product per row.
template <int MT, int NT>
inline void vnni8_tile(const uint8_t* u, const float* xs, int64_t K, int64_t block, const int8_t* w, float* out,
                       int64_t ldo, const int8_t* pf) {
  const int64_t nb = K / block;
  const int64_t tile_bytes = TILE * K;
  __m512 facc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int t = 0; t < NT; ++t) facc[m][t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i acc[MT][NT], wsum[NT];
    for (int t = 0; t < NT; ++t) wsum[t] = _mm512_setzero_si512();
    for (int m = 0; m < MT; ++m)
      for (int t = 0; t < NT; ++t) acc[m][t] = _mm512_setzero_si512();
    for (int64_t k = b * block; k < (b + 1) * block; k += 4) {
      __m512i wv[NT];
      load_weights<NT>(w, tile_bytes, k, pf, wv, wsum);
      for (int m = 0; m < MT; ++m) {
        const __m512i a = bcast4(u + m * K + k);
        for (int t = 0; t < NT; ++t) acc[m][t] = _mm512_dpbusd_epi32(acc[m][t], a, wv[t]);
      }
    }
    for (int t = 0; t < NT; ++t) wsum[t] = _mm512_slli_epi32(wsum[t], 7);  // 128 sum w
    for (int m = 0; m < MT; ++m) {
      const __m512 s = _mm512_set1_ps(xs[m * nb + b]);
      for (int t = 0; t < NT; ++t)
        facc[m][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[m][t], wsum[t])), s, facc[m][t]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + m * ldo + t * TILE, facc[m][t]);
}

// act_bits = 8: all M rows in groups of up to 4 (fewer accumulators than the int16 path)
template <int NT>
void vnni8_rows(int64_t M, const uint8_t* u, const float* xs, int64_t K, int64_t block, const int8_t* w, float* buf,
                int64_t ldo, const int8_t* pf) {
  const int64_t nb = K / block;
  int64_t m = 0;
  for (; m + 4 <= M; m += 4, pf = nullptr)
    vnni8_tile<4, NT>(u + m * K, xs + m * nb, K, block, w, buf + m * ldo, ldo, pf);
  if (M - m == 3) vnni8_tile<3, NT>(u + m * K, xs + m * nb, K, block, w, buf + m * ldo, ldo, pf);
  if (M - m == 2) vnni8_tile<2, NT>(u + m * K, xs + m * nb, K, block, w, buf + m * ldo, ldo, pf);
  if (M - m == 1) vnni8_tile<1, NT>(u + m * K, xs + m * nb, K, block, w, buf + m * ldo, ldo, pf);
}

#if defined(SPECDEC_ISA_AMX)
// Tile registers: 0 A hi, 1 A lo (rows x 64 bytes of codes); 2, 3 B (16 x 64 bytes: 64 k of one
// 16-channel tile); 4/5 C hi/lo of B 2, 6/7 C hi/lo of B 3 (rows x 16 int32).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The tile configuration for `rows` A/C rows, loaded for as long as the object lives (one
// thread's run of tile pairs: loading it costs as much as a small pair's arithmetic); rows 0: none
class AmxTiles {
 public:
  explicit AmxTiles(int rows) : on_(rows > 0) {
    if (!on_) return;
    TileConfig cfg;
    for (int t : {0, 1}) cfg.colsb[t] = 64, cfg.rows[t] = static_cast<uint8_t>(rows);
    for (int t : {2, 3}) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    for (int t : {4, 5, 6, 7}) cfg.colsb[t] = 64, cfg.rows[t] = static_cast<uint8_t>(rows);
    // the compiler must see cfg's stores as used: a standalone test of this code built with
    // gcc -O3 dropped them (a zeroed configuration: SIGILL at the first tile instruction)
    asm volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
  }
  ~AmxTiles() {
    if (on_) _tile_release();
  }
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;

 private:
  bool on_;
};

// rows m0 .. m0 + rows - 1 (rows <= 16) x NT (1 or 2) tiles, the tiles configured for `rows` or more
// (the codes then hold zero rows up to the configured count, computed and dropped);
// pf: the next tile pair's weights, prefetched into L2 while this pair computes (null: none)
// kInt8 (act_bits 8): x.hs holds the int8 codes themselves and x.lo is unused (one product per 64 k)
template <int NT, bool kInt8>
void amx_rows(int rows, const Codes& x, int64_t K, int64_t block, const int8_t* w, float* out, int64_t ldo,
              const int8_t* pf) {
  const int64_t nb = K / block;
  const int64_t tile_bytes = TILE * K;
  alignas(64) int32_t chi[2][16 * TILE], clo[2][16 * TILE];
  alignas(64) float facc[16][2 * TILE] = {};
  for (int64_t b = 0; b < nb; ++b) {
    _tile_zero(4);
    if (!kInt8) _tile_zero(5);
    if (NT == 2) {
      _tile_zero(6);
      if (!kInt8) _tile_zero(7);
    }
    for (int64_t k = b * block; k < (b + 1) * block; k += 64) {
      if (pf != nullptr)  // 64 k of each next tile: 16 lines apiece
        for (int64_t line = 0; line < 16 * 64; line += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(pf + k * TILE + line), _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(pf + tile_bytes + k * TILE + line), _MM_HINT_T1);
        }
      _tile_loadd(0, x.hs + k, K);
      if (!kInt8) _tile_loadd(1, x.lo + k, K);
      _tile_loadd(2, w + k * TILE, 64);
      _tile_dpbssd(4, 0, 2);
      if (!kInt8) _tile_dpbusd(5, 1, 2);
      if (NT == 2) {
        _tile_loadd(3, w + tile_bytes + k * TILE, 64);
        _tile_dpbssd(6, 0, 3);
        if (!kInt8) _tile_dpbusd(7, 1, 3);
      }
    }
    _tile_stored(4, chi[0], TILE * 4);
    if (!kInt8) _tile_stored(5, clo[0], TILE * 4);
    if (NT == 2) {
      _tile_stored(6, chi[1], TILE * 4);
      if (!kInt8) _tile_stored(7, clo[1], TILE * 4);
    }
    for (int m = 0; m < rows; ++m) {
      const __m512 s = _mm512_set1_ps(x.s[m * nb + b]);
      for (int t = 0; t < NT; ++t) {
        const __m512i hi = _mm512_load_si512(chi[t] + m * TILE);
        const __m512i sum = kInt8 ? hi : _mm512_add_epi32(_mm512_slli_epi32(hi, 8), _mm512_load_si512(clo[t] + m * TILE));
        float* acc = facc[m] + t * TILE;
        _mm512_store_ps(acc, _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), s, _mm512_load_ps(acc)));
      }
    }
  }
  for (int m = 0; m < rows; ++m) std::memcpy(out + m * ldo, facc[m], sizeof(float) * NT * TILE);
}
#endif

}  // namespace

at::Tensor w8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                     const at::Tensor& bias, int64_t act_bits) {
  const W8Shape sh = check_w8_args(x, w, scale, bias, TILE, act_bits);
  const int64_t M = sh.M, K = sh.Kp, N = sh.N;
  const bool has_bias = sh.has_bias;
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const int8_t* wp = w.data_ptr<int8_t>();

  const int64_t block = act_block(K, act_bits), nb = K / block;
  std::vector<int16_t> xq(M * K);
  std::vector<float> xs(M * nb);
  quantise_rows(x.data_ptr<float>(), M, x.size(1), block, xq.data(), xs.data(), nullptr, act_qmax(act_bits));
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  const int64_t tiles = w.size(0) / TILE;
  const bool int8 = act_bits == 8;
#if defined(SPECDEC_ISA_AMX)
  const bool amx = M >= kAmxMinRows;
#else
  const bool amx = false;
#endif
  // AMX tiles are configured once for min(M, 16) rows; above 16 rows the codes get zero rows up
  // to a multiple of 16, so that every 16-row chunk uses the same configuration
  const int64_t Mp = amx && M > 16 ? (M + 15) / 16 * 16 : M;
  // the codes as bytes: int16 split into hi (+128 for VNNI; signed for AMX) and lo, or the int8
  // codes offset by 128 (VNNI) or signed (AMX) in hs
  std::vector<uint8_t> hi_u(int8 || amx ? 0 : M * K), hs(Mp * K, 0), lo(int8 ? 0 : Mp * K, 0);
  if (int8) byte_codes(xq.data(), M * K, hs.data(), !amx);
  else split_codes(xq.data(), M * K, amx ? nullptr : hi_u.data(), hs.data(), lo.data());
  const Codes codes{int8 ? hs.data() : hi_u.data(), hs.data(), lo.data(), xs.data()};

  for_tile_pairs<TILE>(M, N, tiles, scale.data_ptr<float>(), bp, y.data_ptr<float>(),
                       [&](int64_t t0, int64_t nt, float* buf) {
    const int8_t* wt = wp + t0 * TILE * K;
    const int8_t* pf = t0 + 4 <= tiles ? wt + 2 * TILE * K : nullptr;  // the next pair, when it is full
#if defined(SPECDEC_ISA_AMX)
    if (amx) {
      for (int64_t m0 = 0; m0 < M; m0 += 16, pf = nullptr) {  // the first 16 rows prefetch
        const int rows = static_cast<int>(std::min<int64_t>(16, M - m0));
        const Codes at{nullptr, codes.hs + m0 * K, int8 ? nullptr : codes.lo + m0 * K, codes.s + m0 * nb};
        float* o = buf + m0 * 2 * TILE;
        if (int8 && nt == 2) amx_rows<2, true>(rows, at, K, block, wt, o, 2 * TILE, pf);
        else if (int8) amx_rows<1, true>(rows, at, K, block, wt, o, 2 * TILE, pf);
        else if (nt == 2) amx_rows<2, false>(rows, at, K, block, wt, o, 2 * TILE, pf);
        else amx_rows<1, false>(rows, at, K, block, wt, o, 2 * TILE, pf);
      }
      return;
    }
#endif
    if (int8 && nt == 2) vnni8_rows<2>(M, codes.hi, xs.data(), K, block, wt, buf, 2 * TILE, pf);
    else if (int8) vnni8_rows<1>(M, codes.hi, xs.data(), K, block, wt, buf, 2 * TILE, pf);
    else if (nt == 2) vnni_rows<2>(M, codes, K, block, wt, buf, 2 * TILE, pf);
    else vnni_rows<1>(M, codes, K, block, wt, buf, 2 * TILE, pf);
  }, [&] {
#if defined(SPECDEC_ISA_AMX)
    return AmxTiles(amx ? static_cast<int>(std::min<int64_t>(M, 16)) : 0);
#else
    return NoScope{};
#endif
  });
  return y;
}
