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

// q . k for 8 keys at once (D % 8 == 0); one reduction tree per key, the same for every lane,
// so a key's score does not depend on which keys share its batch.
inline __m256 dot8(const float* q, const float* const* k, int64_t D) {
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  for (int64_t c = 0; c < D; c += 8) {
    const __m256 qc = _mm256_loadu_ps(q + c);
    for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[i] + c), a[i]);
  }
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
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
    double ss = 0.0;
    for (int64_t i = 0; i < H; ++i) ss += static_cast<double>(row[i]) * row[i];
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / H) + static_cast<float>(eps));
    float* dst = op + t * H;
    for (int64_t i = 0; i < H; ++i) dst[i] = (row[i] * inv) * wp[i];
  }
  return out;
}

// Attention of T queries over L keys gathered from a paged pool, float32.
//   q [T, H, D]; k_cache, v_cache [S, Hkv, D]; slots [L] int64 (pool slot of each key);
//   mask [T, L] bool (true = visible) or empty: causal by index (query t sees keys
//   j <= L - T + t). GQA: head h reads kv head h / (H / Hkv). A query that sees nothing
//   gets zeros.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& slots, const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "paged_attention: q must be a contiguous float32 [T, H, D] tensor");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 3,
              "paged_attention: caches must be contiguous float32 [S, Hkv, D]");
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
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const bool* mp = has_mask ? mask.data_ptr<bool>() : nullptr;
  float* op = out.data_ptr<float>();
  for (int64_t j = 0; j < L; ++j)
    TORCH_CHECK(sp[j] >= 0 && sp[j] < S, "paged_attention: slot ", sp[j], " outside the pool");
  const int64_t group = H / Hkv;
  const float sc = static_cast<float>(scale);
  // small problems (one decode token over a short prefix) are cheaper on one thread
  const int64_t grain = T * H * L * D < (1 << 16) ? T * H : 1;

  const float neg_inf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, T * H, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(L + 8);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / H, h = i % H, kvh = h / group;
      const float* qv = qp + (t * H + h) * D;
      const bool* row = has_mask ? mp + t * L : nullptr;
      const int64_t causal_end = L - T + t;  // last visible index without a mask
      auto visible = [&](int64_t j) { return has_mask ? row[j] : j <= causal_end; };
      // scores (invisible keys: -inf), 8 keys at a time when D allows
      int64_t j = 0;
      if (D % 8 == 0) {
        for (; j < L; j += 8) {
          const float* keys[8];
          for (int u = 0; u < 8; ++u) keys[u] = kp + (sp[std::min(j + u, L - 1)] * Hkv + kvh) * D;
          _mm256_storeu_ps(scores.data() + j, _mm256_mul_ps(_mm256_set1_ps(sc), dot8(qv, keys, D)));
        }
      } else {
        for (; j < L; ++j) scores[j] = sc * dot(qv, kp + (sp[j] * Hkv + kvh) * D, D);
      }
      float mx = neg_inf;
      for (j = 0; j < L; ++j) {
        if (!visible(j)) scores[j] = neg_inf;
        mx = std::max(mx, scores[j]);
      }
      if (mx == neg_inf) continue;  // nothing visible: zeros
      // probabilities (exp(-inf) = 0), then the weighted sum of values in key order
      const __m256 vmx = _mm256_set1_ps(mx);
      for (j = 0; j < L; j += 8) _mm256_storeu_ps(scores.data() + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(scores.data() + j), vmx)));
      float denom = 0.0f;
      for (j = 0; j < L; ++j) denom += scores[j];
      const float inv = 1.0f / denom;
      float* dst = op + (t * H + h) * D;
      if (D % 8 == 0) {
        for (int64_t d0 = 0; d0 < D; d0 += 64) {  // 8 accumulators of 8 floats in registers
          const int64_t nv = std::min<int64_t>(8, (D - d0) / 8);
          __m256 acc[8];
          for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
          for (j = 0; j < L; ++j) {
            const float p = scores[j];
            if (p == 0.0f) continue;  // invisible (or underflowed): adds nothing
            const __m256 vp8 = _mm256_set1_ps(p);
            const float* vv = vp + (sp[j] * Hkv + kvh) * D + d0;
            for (int c = 0; c < nv; ++c) acc[c] = _mm256_fmadd_ps(vp8, _mm256_loadu_ps(vv + 8 * c), acc[c]);
          }
          const __m256 vinv = _mm256_set1_ps(inv);
          for (int c = 0; c < nv; ++c) _mm256_storeu_ps(dst + d0 + 8 * c, _mm256_mul_ps(acc[c], vinv));
        }
      } else {
        for (j = 0; j < L; ++j) {
          const float p = scores[j];
          if (p == 0.0f) continue;
          const float* vv = vp + (sp[j] * Hkv + kvh) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] += p * vv[d];
        }
        for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
      }
    }
  });
  return out;
}
