// Small fused float32 CPU ops for the batch-1 hot path, where PyTorch's per-op cost (dispatch,
// temporaries, thread wake-ups on 576-wide vectors) outweighs the arithmetic. References:
// kernels/cpu_ops.py (rms_norm_reference, paged_attention_reference).

#include "cpu_kernels.h"
#include "simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  acc0 = _mm256_add_ps(acc0, acc1);
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  float s = _mm_cvtss_f32(lo);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// K/V element loaders of the attention kernels: float32 caches, and fp8 caches
// (--kv-cache-dtype) upcast exactly on load through F16C: fp8 e5m2 is the high byte of an IEEE
// half; an fp8 e4m3fn byte's sign goes to the half's sign and its 7 exponent and mantissa bits
// to bits 7..13, a half of value x / 2^8 for normals and subnormals alike (times 256, exact).
struct KvF32 {
  using T = float;
  static __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
#if defined(SPECDEC_AVX512)
  static __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
#endif
};
struct KvE5M2 {
  using T = uint8_t;
  static __m256 load8(const uint8_t* p) {
    const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_cvtph_ps(_mm_slli_epi16(b, 8));
  }
#if defined(SPECDEC_AVX512)
  static __m512 load16(const uint8_t* p) {
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_cvtph_ps(_mm256_slli_epi16(b, 8));
  }
#endif
};
struct KvE4M3 {
  using T = uint8_t;
  static __m256 load8(const uint8_t* p) {
    const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8),
                                   _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7F)), 7));
    return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f));
  }
#if defined(SPECDEC_AVX512)
  static __m512 load16(const uint8_t* p) {
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                                      _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 7));
    return _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.0f));
  }
#endif
};

// q . k for 8 keys at once (D % 8 == 0); one reduction tree per key, the same for every lane,
// so a key's score does not depend on which keys share its batch.
template <class KV>
inline __m256 dot8(const float* q, const typename KV::T* const* k, int64_t D) {
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  for (int64_t c = 0; c < D; c += 8) {
    const __m256 qc = _mm256_loadu_ps(q + c);
    for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qc, KV::load8(k[i] + c), a[i]);
  }
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

#if defined(SPECDEC_AVX512)
// 512-bit scores: q_a . k_i for MQ queries and 8 keys at once (D % 16 == 0), the keys loaded once
// for all MQ queries; per query one accumulator per key over D in chunks of 16, then a fixed
// reduction tree (fold 512 -> 256, then dot8's), so a score never depends on the other queries
// or keys it is computed with.
template <class KV, int MQ>
inline void dot8x(const float* const* q, const typename KV::T* const* k, int64_t D, __m256* out) {
  __m512 a[MQ][8];
  for (int m = 0; m < MQ; ++m)
    for (int i = 0; i < 8; ++i) a[m][i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < D; c += 16) {
    __m512 qc[MQ];
    for (int m = 0; m < MQ; ++m) qc[m] = _mm512_loadu_ps(q[m] + c);
    for (int i = 0; i < 8; ++i) {
      const __m512 kc = KV::load16(k[i] + c);
      for (int m = 0; m < MQ; ++m) a[m][i] = _mm512_fmadd_ps(qc[m], kc, a[m][i]);
    }
  }
  for (int m = 0; m < MQ; ++m) {
    __m256 b[8];
    for (int i = 0; i < 8; ++i)
      b[i] = _mm256_add_ps(_mm512_castps512_ps256(a[m][i]), _mm512_extractf32x8_ps(a[m][i], 1));
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(b[0], b[1]), _mm256_hadd_ps(b[2], b[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(b[4], b[5]), _mm256_hadd_ps(b[6], b[7]));
    out[m] = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  }
}

#endif

// Float vectors of 8 (AVX2) and, on the avx512 and amx tiers, 16 lanes, for value_pass.
struct F8 {
  using V = __m256;
  static constexpr int kLanes = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
};
#if defined(SPECDEC_AVX512)
struct F16 {
  using V = __m512;
  static constexpr int kLanes = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
};
#endif

// dst[a][0 .. L NV) = inv[a] * sum_j p[a][j] v_j[0 .. L NV) for MQ queries (L = F::kLanes), in
// key order, skipping zero probabilities; v_j = vbase + slot_j * vstride
template <class F, class KV>
inline typename F::V load_kv(const typename KV::T* p) {
  if constexpr (F::kLanes == 8) {
    return KV::load8(p);
  } else {
#if defined(SPECDEC_AVX512)
    return KV::load16(p);
#endif
  }
}

template <class F, class KV, int MQ, int NV>
inline void value_pass(const float* const* p, const typename KV::T* vbase, int64_t vstride, const int64_t* slots,
                       int64_t L, float* const* dst, const float* inv) {
  typename F::V acc[MQ][NV];
  for (int a = 0; a < MQ; ++a)
    for (int c = 0; c < NV; ++c) acc[a][c] = F::zero();
  for (int64_t j = 0; j < L; ++j) {
    const typename KV::T* vv = vbase + slots[j] * vstride;
    for (int a = 0; a < MQ; ++a) {
      const float pj = p[a][j];
      if (pj == 0.0f) continue;  // invisible (or underflowed): adds nothing
      const typename F::V pv = F::set1(pj);
      for (int c = 0; c < NV; ++c) acc[a][c] = F::fma(pv, load_kv<F, KV>(vv + F::kLanes * c), acc[a][c]);
    }
  }
  for (int a = 0; a < MQ; ++a) {
    const typename F::V vinv = F::set1(inv[a]);
    for (int c = 0; c < NV; ++c) F::store(dst[a] + F::kLanes * c, F::mul(acc[a][c], vinv));
  }
}

// value_pass<F, MQ, NV> with MQ <= MAXQ and NV <= 4 chosen at run time
template <class F, class KV, int MQ>
inline void value_pass_nv(int nv, const float* const* p, const typename KV::T* vbase, int64_t vstride,
                          const int64_t* slots, int64_t L, float* const* dst, const float* inv) {
  switch (nv) {
    case 1: value_pass<F, KV, MQ, 1>(p, vbase, vstride, slots, L, dst, inv); break;
    case 2: value_pass<F, KV, MQ, 2>(p, vbase, vstride, slots, L, dst, inv); break;
    case 3: value_pass<F, KV, MQ, 3>(p, vbase, vstride, slots, L, dst, inv); break;
    default: value_pass<F, KV, MQ, 4>(p, vbase, vstride, slots, L, dst, inv); break;
  }
}

template <class F, class KV, int MAXQ>
inline void value_pass_any(int mq, int nv, const float* const* p, const typename KV::T* vbase, int64_t vstride,
                           const int64_t* slots, int64_t L, float* const* dst, const float* inv) {
  if constexpr (MAXQ > 0) {
    if (mq == MAXQ) value_pass_nv<F, KV, MAXQ>(nv, p, vbase, vstride, slots, L, dst, inv);
    else value_pass_any<F, KV, MAXQ - 1>(mq, nv, p, vbase, vstride, slots, L, dst, inv);
  }
}

// out rows orow(q) [D] = inv[q] * sum_j scores[q][j] v_j for nq queries (v_j = vbase + slot_j *
// vstride), in chunks of 4 F vectors of dims x MAXQ queries (D % F::kLanes == 0)
template <class F, class KV, int MAXQ, class Row>
inline void weighted_values(int64_t nq, int64_t D, const float* scores, int64_t ld, Row orow, const float* inv,
                            const typename KV::T* vbase, int64_t vstride, const int64_t* slots, int64_t L) {
  constexpr int64_t chunk = 4 * F::kLanes;
  for (int64_t d0 = 0; d0 < D; d0 += chunk) {
    const int nv = static_cast<int>(std::min<int64_t>(4, (D - d0) / F::kLanes));
    for (int64_t q0 = 0; q0 < nq; q0 += MAXQ) {
      const int mq = static_cast<int>(std::min<int64_t>(MAXQ, nq - q0));
      const float* prow[MAXQ] = {};
      float* dst[MAXQ] = {};
      float invs[MAXQ] = {};
      for (int a = 0; a < mq; ++a) {
        prow[a] = scores + (q0 + a) * ld;
        dst[a] = orow(q0 + a) + d0;
        invs[a] = inv[q0 + a];
      }
      value_pass_any<F, KV, MAXQ>(mq, nv, prow, vbase + d0, vstride, slots, L, dst, invs);
    }
  }
}

// Attention for D % 8 == 0, grouped: one work item per (kv head, block of up to 4 query rows);
// every query head of the kv head's group and every row of the block share one pass over the
// keys and (3 queries at a time) over the values, so K and V are read from cache once per
// item instead of once per (row, head). Each query's sums are still taken in key order with
// the same operations, so a row's result does not depend on which rows share its item.
template <class KV>
void grouped_attention(const float* qp, const typename KV::T* kp, const typename KV::T* vp, const int64_t* sp,
                       const bool* mp, float* op, int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t L, float sc) {
  constexpr int64_t TB = 4;
  const int64_t group = H / Hkv, tblocks = (T + TB - 1) / TB, items = Hkv * tblocks;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t grain = T * H * L * D < (1 << 16) ? items : 1;
  at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
    const int64_t ld = L + 8;
    std::vector<float> scores(TB * group * ld);
    std::vector<float> inv(TB * group);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t kvh = item % Hkv, t0 = (item / Hkv) * TB, t1 = std::min(T, t0 + TB);
      const int64_t nq = (t1 - t0) * group;
      auto qvec = [&](int64_t qi) { return qp + ((t0 + qi / group) * H + kvh * group + qi % group) * D; };
      auto orow = [&](int64_t qi) { return op + ((t0 + qi / group) * H + kvh * group + qi % group) * D; };
      // scores, 8 keys at a time, each key block read once for all nq queries
      for (int64_t j = 0; j < L; j += 8) {
        const typename KV::T* keys[8];
        for (int u = 0; u < 8; ++u) keys[u] = kp + (sp[std::min(j + u, L - 1)] * Hkv + kvh) * D;
#if defined(SPECDEC_AVX512)
        if (D % 16 == 0) {
          for (int64_t q0 = 0; q0 < nq; q0 += 3) {
            const int mq = static_cast<int>(std::min<int64_t>(3, nq - q0));
            const float* qs[3] = {qvec(q0), qvec(std::min(q0 + 1, nq - 1)), qvec(std::min(q0 + 2, nq - 1))};
            __m256 dots[3];
            if (mq == 3) dot8x<KV, 3>(qs, keys, D, dots);
            else if (mq == 2) dot8x<KV, 2>(qs, keys, D, dots);
            else dot8x<KV, 1>(qs, keys, D, dots);
            for (int a = 0; a < mq; ++a)
              _mm256_storeu_ps(scores.data() + (q0 + a) * ld + j, _mm256_mul_ps(_mm256_set1_ps(sc), dots[a]));
          }
          continue;
        }
#endif
        for (int64_t qi = 0; qi < nq; ++qi)
          _mm256_storeu_ps(scores.data() + qi * ld + j, _mm256_mul_ps(_mm256_set1_ps(sc), dot8<KV>(qvec(qi), keys, D)));
      }
      // visibility, softmax numerators (exact 0 when invisible) and denominators, 8 keys per
      // step with a fixed reduction tree (a row's sums never depend on the other rows); the
      // scores row is padded to a multiple of 8 with invisible entries
      const int64_t L8 = (L + 7) / 8 * 8;
      const __m256 vneg = _mm256_set1_ps(neg_inf);
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      for (int64_t qi = 0; qi < nq; ++qi) {
        float* row = scores.data() + qi * ld;
        const int64_t t = t0 + qi / group;
        const bool* m = mp != nullptr ? mp + t * L : nullptr;
        const int64_t last = std::min(L - 1, m != nullptr ? L - 1 : L - T + t);  // last index that may be visible
        __m256 vmx = vneg;
        for (int64_t j = 0; j < L8; j += 8) {
          const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(j)), lane);
          __m256i vis = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(last + 1)), idx);
          if (m != nullptr) {
            int64_t bits = 0;
            if (j + 8 <= L) std::memcpy(&bits, m + j, 8);
            else std::memcpy(&bits, m + j, static_cast<size_t>(L - j));
            const __m256i mb = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bits));
            vis = _mm256_and_si256(vis, _mm256_cmpgt_epi32(mb, _mm256_setzero_si256()));
          }
          const __m256 v = _mm256_blendv_ps(vneg, _mm256_loadu_ps(row + j), _mm256_castsi256_ps(vis));
          _mm256_storeu_ps(row + j, v);
          vmx = _mm256_max_ps(vmx, v);
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmx), _mm256_extractf128_ps(vmx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        if (mx == neg_inf) {  // nothing visible: zeros
          std::fill(row, row + L8, 0.0f);
          inv[qi] = 0.0f;
          continue;
        }
        const __m256 vmxb = _mm256_set1_ps(mx);
        __m256 vsum = _mm256_setzero_ps();
        for (int64_t j = 0; j < L8; j += 8) {
          const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vmxb));
          _mm256_storeu_ps(row + j, e);
          vsum = _mm256_add_ps(vsum, e);
        }
        __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(vsum), _mm256_extractf128_ps(vsum, 1));
        s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        inv[qi] = 1.0f / _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
      }
      // values: 4 vectors of dims x MAXQ queries of accumulators in registers per pass over V
#if defined(SPECDEC_AVX512)
      if (D % 16 == 0) {
        weighted_values<F16, KV, 6>(nq, D, scores.data(), ld, orow, inv.data(), vp + kvh * D, Hkv * D, sp, L);
        continue;
      }
#endif
      weighted_values<F8, KV, 3>(nq, D, scores.data(), ld, orow, inv.data(), vp + kvh * D, Hkv * D, sp, L);
    }
  });
}

}  // namespace

// x [T, H] float32, weight [H] float32 -> x * rsqrt(mean(x^2) + eps) * weight
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "rms_norm: x must be a contiguous float32 [T, H] tensor");
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.numel() == H && weight.is_contiguous(),
              "rms_norm: weight must be a contiguous float32 [H] tensor");
  auto out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* row = xp + t * H;
    // sum of squares in double: four lanes per register, then the lanes and the tail in order
    __m256d acc = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 4 <= H; i += 4) {
      const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(row + i));
      acc = _mm256_fmadd_pd(v, v, acc);
    }
    alignas(32) double lanes[4];
    _mm256_store_pd(lanes, acc);
    double ss = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    for (; i < H; ++i) ss += static_cast<double>(row[i]) * row[i];
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / H) + static_cast<float>(eps));
    float* dst = op + t * H;
    const __m256 vinv = _mm256_set1_ps(inv);
    i = 0;
    for (; i + 8 <= H; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(row + i), vinv), _mm256_loadu_ps(wp + i)));
    for (; i < H; ++i) dst[i] = (row[i] * inv) * wp[i];
  }
  return out;
}

// The caches' element type: float32, or fp8 (e4m3fn / e5m2, --kv-cache-dtype; the caller folds
// the per-layer scales into `scale` and the output). Calls fn(KvF32 / KvE4M3 / KvE5M2 tag).
template <class Fn>
void with_kv_type(const at::Tensor& k_cache, const at::Tensor& v_cache, const char* who, Fn&& fn) {
  const auto t = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == t && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(),
              who, ": caches must be contiguous [S, Hkv, D] tensors of one dtype");
  if (t == at::kFloat) fn(KvF32{});
  else if (t == at::ScalarType::Float8_e4m3fn) fn(KvE4M3{});
  else if (t == at::ScalarType::Float8_e5m2) fn(KvE5M2{});
  else TORCH_CHECK(false, who, ": caches must be float32 or fp8 (e4m3fn, e5m2); got ", t);
}

template <class KV>
const typename KV::T* kv_ptr(const at::Tensor& cache) {
  return static_cast<const typename KV::T*>(cache.data_ptr());
}

// Attention of T queries over L keys gathered from a paged pool, float32 (fp8 caches upcast on load).
//   q [T, H, D]; k_cache, v_cache [S, Hkv, D]; slots [L] int64 (pool slot of each key);
//   mask [T, L] bool (true = visible) or empty: causal by index (query t sees keys
//   j <= L - T + t). GQA: head h reads kv head h / (H / Hkv). A query that sees nothing
//   gets zeros.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& slots, const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "paged_attention: q must be a contiguous float32 [T, H, D] tensor");
  TORCH_CHECK(k_cache.dim() == 3 && (k_cache.scalar_type() == at::kFloat || k_cache.size(2) % 8 == 0),
              "paged_attention: fp8 caches need a head dim that is a multiple of 8");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.is_contiguous(),
              "paged_attention: slots must be a contiguous int64 [L] tensor");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(0), L = slots.size(0);
  TORCH_CHECK(k_cache.size(2) == D && H % Hkv == 0, "paged_attention: head shapes do not match");
  const bool has_mask = mask.numel() > 0;
  TORCH_CHECK(!has_mask || (mask.scalar_type() == at::kBool && mask.is_contiguous() &&
                            mask.size(0) == T && mask.size(1) == L),
              "paged_attention: mask must be a contiguous bool [T, L] tensor or empty");
  auto out = at::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const bool* mp = has_mask ? mask.data_ptr<bool>() : nullptr;
  float* op = out.data_ptr<float>();
  for (int64_t j = 0; j < L; ++j)
    TORCH_CHECK(sp[j] >= 0 && sp[j] < S, "paged_attention: slot ", sp[j], " outside the pool");
  const float sc = static_cast<float>(scale);
  if (D % 8 == 0) {
    with_kv_type(k_cache, v_cache, "paged_attention", [&](auto kv) {
      using KV = decltype(kv);
      grouped_attention<KV>(qp, kv_ptr<KV>(k_cache), kv_ptr<KV>(v_cache), sp, mp, op, T, H, Hkv, D, L, sc);
    });
    return out;
  }
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_attention: caches must be contiguous float32 [S, Hkv, D]");
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  // any other head size: one (row, head) at a time, scalar dots
  const int64_t group = H / Hkv;
  const int64_t grain = T * H * L * D < (1 << 16) ? T * H : 1;  // tiny problems on one thread
  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, T * H, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(L + 8);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / H, h = i % H, kvh = h / group;
      const float* qv = qp + (t * H + h) * D;
      const bool* row = has_mask ? mp + t * L : nullptr;
      const int64_t causal_end = L - T + t;  // last visible index without a mask
      float mx = neg_inf;
      for (int64_t j = 0; j < L; ++j) {
        const bool visible = has_mask ? row[j] : j <= causal_end;
        scores[j] = visible ? sc * dot(qv, kp + (sp[j] * Hkv + kvh) * D, D) : neg_inf;
        mx = std::max(mx, scores[j]);
      }
      if (mx == neg_inf) continue;  // nothing visible: zeros
      const __m256 vmx = _mm256_set1_ps(mx);
      for (int64_t j = 0; j < L; j += 8)
        _mm256_storeu_ps(scores.data() + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(scores.data() + j), vmx)));
      float denom = 0.0f;
      for (int64_t j = 0; j < L; ++j) denom += scores[j];
      const float inv = 1.0f / denom;
      float* dst = op + (t * H + h) * D;
      for (int64_t j = 0; j < L; ++j) {
        const float p = scores[j];
        if (p == 0.0f) continue;  // invisible (or underflowed): adds nothing
        const float* vv = vp + (sp[j] * Hkv + kvh) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] += p * vv[d];
      }
      for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
    }
  });
  return out;
}

// A decode batch: one query per request, request b attends its first lens[b] slots of
// index[b] (all of them visible: the query is the newest token). Requests are spread over
// the threads; each is the T = 1 case of grouped_attention, so a row's result equals
// paged_attention on that request alone.
at::Tensor paged_attention_batch(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& index, const at::Tensor& lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "paged_attention_batch: q must be a contiguous float32 [B, H, D] tensor");
  TORCH_CHECK(k_cache.dim() == 3, "paged_attention_batch: caches must be [S, Hkv, D]");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(0);
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 2 && index.is_contiguous() && index.size(0) == B,
              "paged_attention_batch: index must be a contiguous int64 [B, L] tensor");
  TORCH_CHECK(lens.scalar_type() == at::kLong && lens.dim() == 1 && lens.size(0) == B && lens.is_contiguous(),
              "paged_attention_batch: lens must be a contiguous int64 [B] tensor");
  TORCH_CHECK(k_cache.size(2) == D && H % Hkv == 0 && D % 8 == 0,
              "paged_attention_batch: head shapes do not match (or head dim not a multiple of 8)");
  const int64_t L = index.size(1);
  const int64_t* ip = index.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= L, "paged_attention_batch: lens[", b, "] = ", lp[b], " outside 1..", L);
    for (int64_t j = 0; j < lp[b]; ++j)
      TORCH_CHECK(ip[b * L + j] >= 0 && ip[b * L + j] < S, "paged_attention_batch: slot ", ip[b * L + j],
                  " outside the pool");
  }
  auto out = at::zeros_like(q);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  with_kv_type(k_cache, v_cache, "paged_attention_batch", [&](auto kv) {
    using KV = decltype(kv);
    const typename KV::T* kp = kv_ptr<KV>(k_cache);
    const typename KV::T* vp = kv_ptr<KV>(v_cache);
    auto one = [&](int64_t b) {
      grouped_attention<KV>(qp + b * H * D, kp, vp, ip + b * L, nullptr, op + b * H * D, 1, H, Hkv, D, lp[b], sc);
    };
    if (B == 1) {
      one(0);  // heads over the threads
    } else {
      // requests over the threads (the nested parallel_for inside runs inline)
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) one(b);
      });
    }
  });
  return out;
}

// Several requests packed in q (a batch of decodes, trees or short chunks): request b owns rows
// starts[b] .. starts[b + 1] and attends over slots[b] with masks[b] ([rows, L_b] bool, or empty:
// causal by index). Each request is exactly paged_attention on its own rows (the same
// grouped_attention call), so a row's result does not depend on the requests beside it;
// requests are spread over the threads (the nested parallel_for inside runs inline).
at::Tensor paged_attention_seqs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const std::vector<int64_t>& starts, const std::vector<at::Tensor>& slots,
                                const std::vector<at::Tensor>& masks, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "paged_attention_seqs: q must be a contiguous float32 [T, H, D] tensor");
  const int64_t B = static_cast<int64_t>(slots.size());
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(B >= 1 && static_cast<int64_t>(starts.size()) == B + 1 && static_cast<int64_t>(masks.size()) == B,
              "paged_attention_seqs: need B >= 1 slot lists, B masks and B + 1 row starts");
  TORCH_CHECK(starts[0] == 0 && starts[B] == T, "paged_attention_seqs: row starts must run from 0 to T = ", T);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(starts[b + 1] > starts[b], "paged_attention_seqs: request ", b, " has no rows");
  if (B == 1) return paged_attention(q, k_cache, v_cache, slots[0], masks[0], scale);
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.size(2) == D && H % k_cache.size(1) == 0,
              "paged_attention_seqs: head shapes do not match");
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(0);
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor& s = slots[b];
    const int64_t rows = starts[b + 1] - starts[b];
    TORCH_CHECK(s.scalar_type() == at::kLong && s.dim() == 1 && s.is_contiguous() && s.numel() >= 1,
                "paged_attention_seqs: slots[", b, "] must be a contiguous non-empty int64 [L] tensor");
    const int64_t* sp = s.data_ptr<int64_t>();
    for (int64_t j = 0; j < s.numel(); ++j)
      TORCH_CHECK(sp[j] >= 0 && sp[j] < S, "paged_attention_seqs: slot ", sp[j], " outside the pool");
    const at::Tensor& m = masks[b];
    TORCH_CHECK(m.numel() == 0 || (m.scalar_type() == at::kBool && m.is_contiguous() && m.dim() == 2 &&
                                   m.size(0) == rows && m.size(1) == s.numel()),
                "paged_attention_seqs: masks[", b, "] must be a contiguous bool [rows, L] tensor or empty");
  }
  auto out = at::zeros_like(q);
  if (D % 8 != 0) {  // the scalar path, one request at a time
    for (int64_t b = 0; b < B; ++b) {
      const int64_t r0 = starts[b], rows = starts[b + 1] - r0;
      out.narrow(0, r0, rows).copy_(
          paged_attention(q.narrow(0, r0, rows).contiguous(), k_cache, v_cache, slots[b], masks[b], scale));
    }
    return out;
  }
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  with_kv_type(k_cache, v_cache, "paged_attention_seqs", [&](auto kv) {
    using KV = decltype(kv);
    const typename KV::T* kp = kv_ptr<KV>(k_cache);
    const typename KV::T* vp = kv_ptr<KV>(v_cache);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = starts[b], rows = starts[b + 1] - r0;
        const bool* mp = masks[b].numel() > 0 ? masks[b].data_ptr<bool>() : nullptr;
        grouped_attention<KV>(qp + r0 * H * D, kp, vp, slots[b].data_ptr<int64_t>(), mp, op + r0 * H * D, rows, H,
                              Hkv, D, slots[b].numel(), sc);
      }
    });
  });
  return out;
}
