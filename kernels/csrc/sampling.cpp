// Sampling without sorting the vocabulary: truncated distributions and exponential races.
//
//   truncated_probs(scaled [S, V] float32, top_k [S] int64, top_p [S] float32, min_p [S] float32)
//     -> probs [S, V] float32: per row, softmax over the top_k largest values (top_k >= V: all),
//        then the smallest set of most likely tokens whose probability mass reaches top_p (a token
//        stays while the mass strictly before it is < top_p; top_p >= 1: no cut), then tokens below
//        min_p times the most likely one's probability dropped; the survivors renormalised, zeros
//        elsewhere. The most likely token always stays.
//   race_rows(probs [B, V] float32, seeds [B] int64) -> int64 [B]
//     -> per row one exponential race, argmax_i p_i / E_i (below).
//
// The reference (`truncated_probs_reference` in kernels/cpu_kernels.py, the same rules as HF and
// vLLM) sorts the whole row: ~2.5-5 ms per 49152-wide row on this project's 2-core machines, and
// torch's exponential race over the row (`exponential_` per row) ~1.5 ms. Here the top-k cut is
// an nth_element, and the top-p cut needs the order of the few tokens near its boundary only: the
// probabilities go into buckets of 1/16 octave below the top one (a histogram of mass), the bucket
// where the mass from the top reaches top_p is found, everything above it stays, everything below
// goes, and only that bucket's tokens are sorted (probability descending, equal ones by index).
// Sums are float64, so where the reference's float32 running sum and this one fall on either side
// of top_p (a token whose mass before it is within ~1e-6 of top_p) the two may keep a different
// number of tokens; everywhere else the kept set is the same and the values agree to float32
// rounding (tests/test_sampling_kernels.py). Rows are spread over threads.

#include "cpu_kernels.h"
#include "simd.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace {

constexpr int kBuckets = 1024;  // 1/16 of an octave each below the top probability; the rest in the last
constexpr int kHist = 4;        // interleaved histograms: no chain of adds into one bucket

float max_row(const float* x, int64_t n) {
  __m256 v = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(x + i));
  float lanes[8];
  _mm256_storeu_ps(lanes, v);
  float m = lanes[0];
  for (int u = 1; u < 8; ++u) m = std::max(m, lanes[u]);
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// float lanes within blocks of 64 values, float64 across blocks
double sum_row(const float* x, int64_t n) {
  double total = 0.0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    for (int64_t j = 16; j < 64; j += 16) {
      a = _mm256_add_ps(a, _mm256_loadu_ps(x + i + j));
      b = _mm256_add_ps(b, _mm256_loadu_ps(x + i + j + 8));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(a, b));
    for (float f : lanes) total += f;
  }
  for (; i < n; ++i) total += x[i];
  return total;
}

void scale_row(float* x, int64_t n, float s) {
  const __m256 vs = _mm256_set1_ps(s);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), vs));
  for (; i < n; ++i) x[i] *= s;
}

// a positive float's exponent and top 4 mantissa bits: non-decreasing in its value
inline int32_t octave16(float p) {
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  return bits >> 19;
}

struct RowScratch {
  std::vector<float> values;
  std::vector<int32_t> bucket;
  std::vector<std::pair<float, int64_t>> edge;
};

void truncate_row(const float* l, float* out, int64_t V, int64_t top_k, float top_p, float min_p, RowScratch& rs) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const bool cut_k = top_k > 0 && top_k < V;
  // the top-k cut: values above the k-th largest stay, and of those equal to it the first by index
  float kth = neg_inf;
  int64_t ties_left = 0;
  if (cut_k) {
    rs.values.assign(l, l + V);
    std::nth_element(rs.values.begin(), rs.values.begin() + (top_k - 1), rs.values.end(), std::greater<float>());
    kth = rs.values[top_k - 1];
    int64_t above = 0;
    for (int64_t i = 0; i < V; ++i) above += l[i] > kth;
    ties_left = top_k - above;
  }
  const float m = max_row(l, V);
  // exp(l - m), 8 at a time; then the top-k cut zeroes what it drops
  const __m256 vm = _mm256_set1_ps(m);
  int64_t i8 = 0;
  for (; i8 + 8 <= V; i8 += 8) _mm256_storeu_ps(out + i8, exp8(_mm256_sub_ps(_mm256_loadu_ps(l + i8), vm)));
  for (int64_t i = i8; i < V; ++i) out[i] = std::exp(l[i] - m);
  if (cut_k) {
    for (int64_t i = 0; i < V; ++i) {
      if (l[i] > kth) continue;
      if (l[i] == kth && ties_left > 0) --ties_left;
      else out[i] = 0.0f;
    }
  }
  // probabilities as a softmax gives them (float32); masses in float64
  const float inv_z = static_cast<float>(1.0 / sum_row(out, V));
  scale_row(out, V, inv_z);
  const float p_max = max_row(out, V);  // the most likely token's
  if (top_p < 1.0f) {
    rs.bucket.resize(V);
    int32_t* bk = rs.bucket.data();
    const __m256i top = _mm256_set1_epi32(octave16(p_max)), last = _mm256_set1_epi32(kBuckets - 1);
    int64_t i = 0;
    for (; i + 8 <= V; i += 8) {
      const __m256i key = _mm256_srli_epi32(_mm256_castps_si256(_mm256_loadu_ps(out + i)), 19);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(bk + i), _mm256_min_epi32(_mm256_sub_epi32(top, key), last));
    }
    for (; i < V; ++i) bk[i] = std::min(octave16(p_max) - octave16(out[i]), kBuckets - 1);
    std::vector<double> hist(kHist * kBuckets, 0.0);
    for (i = 0; i < V; ++i) hist[(i % kHist) * kBuckets + bk[i]] += out[i];  // zeros add nothing
    double before = 0.0;  // the mass of the buckets above the edge bucket
    int edge_b = kBuckets - 1;
    for (int b = 0; b < kBuckets; ++b) {
      double mass = 0.0;
      for (int h = 0; h < kHist; ++h) mass += hist[h * kBuckets + b];
      if (before + mass >= top_p) {
        edge_b = b;
        break;
      }
      before += mass;
    }
    // above the edge bucket everything stays, below it everything goes; in it, by probability
    // (equal ones by index) while the mass before a token is < top_p
    rs.edge.clear();
    for (i = 0; i < V; ++i) {
      if (bk[i] < edge_b || out[i] == 0.0f) continue;
      if (bk[i] == edge_b) rs.edge.emplace_back(out[i], i);
      else out[i] = 0.0f;
    }
    std::sort(rs.edge.begin(), rs.edge.end(), [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    for (const auto& [p, j] : rs.edge) {
      if (before >= top_p) out[j] = 0.0f;  // the row's top token has before == 0 < top_p: it stays
      before += p;
    }
  }
  if (min_p > 0.0f) {
    const float cut = min_p * p_max;
    for (int64_t i = 0; i < V; ++i)
      if (out[i] < cut) out[i] = 0.0f;
  }
  scale_row(out, V, static_cast<float>(1.0 / sum_row(out, V)));
}

}  // namespace

at::Tensor truncated_probs(const at::Tensor& scaled, const at::Tensor& top_k, const at::Tensor& top_p,
                           const at::Tensor& min_p) {
  TORCH_CHECK(scaled.dim() == 2 && scaled.scalar_type() == at::kFloat && scaled.is_contiguous(),
              "truncated_probs: scaled logits must be a contiguous float32 [S, V] tensor");
  const int64_t S = scaled.size(0), V = scaled.size(1);
  TORCH_CHECK(V >= 1, "truncated_probs: rows must not be empty");
  TORCH_CHECK(top_k.dim() == 1 && top_k.size(0) == S && top_k.scalar_type() == at::kLong,
              "truncated_probs: top_k must be int64 [S]");
  TORCH_CHECK(top_p.dim() == 1 && top_p.size(0) == S && top_p.scalar_type() == at::kFloat,
              "truncated_probs: top_p must be float32 [S]");
  TORCH_CHECK(min_p.dim() == 1 && min_p.size(0) == S && min_p.scalar_type() == at::kFloat,
              "truncated_probs: min_p must be float32 [S]");
  auto out = at::empty({S, V}, scaled.options());
  const float* lp = scaled.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const auto tk = top_k.contiguous();
  const auto tp = top_p.contiguous();
  const auto mp = min_p.contiguous();
  const int64_t* tkp = tk.data_ptr<int64_t>();
  const float* tpp = tp.data_ptr<float>();
  const float* mpp = mp.data_ptr<float>();
  for (int64_t r = 0; r < S; ++r)
    TORCH_CHECK(tpp[r] > 0.0f && mpp[r] >= 0.0f && mpp[r] <= 1.0f,
                "truncated_probs: need top_p in (0, 1] and min_p in [0, 1]");
  at::parallel_for(0, S, 1, [&](int64_t r0, int64_t r1) {
    RowScratch rs;
    for (int64_t r = r0; r < r1; ++r) truncate_row(lp + r * V, op + r * V, V, tkp[r], tpp[r], mpp[r], rs);
  });
  return out;
}

// One exponential race per row: argmax_i p_i / E_i with E_i = -ln U_i, U_i uniform in (0, 1) from
// a counter-based generator (splitmix64 of the row's seed and i), so the draw picks i with
// probability p_i / sum p and depends on each token's own key only: rounding differences between a
// row computed in a batch and alone move the winner only where two keys tie to rounding. Since
// -ln U >= 1 - U, p_i / (1 - U_i) bounds a key from above without a logarithm; after the row's
// most likely token sets the first best key, only tokens whose bound beats the best take the log.
namespace {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// U_i in (0, 1): the top 53 bits of splitmix64(seed + i * golden), plus half a step
inline double race_uniform(uint64_t seed, int64_t i) {
  const uint64_t x = splitmix64(seed + static_cast<uint64_t>(i) * 0xD1B54A32D192ED03ull);
  return (static_cast<double>(x >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

int64_t race_row(const float* p, int64_t V, uint64_t seed) {
  int64_t best = 0;
  for (int64_t i = 1; i < V; ++i)
    if (p[i] > p[best]) best = i;
  double best_key = static_cast<double>(p[best]) / -std::log(race_uniform(seed, best));
  for (int64_t i = 0; i < V; ++i) {
    if (!(p[i] > 0.0f) || i == best) continue;
    const double u = race_uniform(seed, i);
    const double pi = p[i];
    if (pi <= best_key * (1.0 - u)) continue;  // its key <= pi / (1 - u) <= best_key
    const double key = pi / -std::log(u);
    if (key > best_key) {
      best_key = key;
      best = i;
    }
  }
  return best;
}

}  // namespace

at::Tensor race_rows(const at::Tensor& probs, const at::Tensor& seeds) {
  TORCH_CHECK(probs.dim() == 2 && probs.scalar_type() == at::kFloat && probs.is_contiguous(),
              "race_rows: probs must be a contiguous float32 [B, V] tensor");
  const int64_t B = probs.size(0), V = probs.size(1);
  TORCH_CHECK(V >= 1, "race_rows: rows must not be empty");
  TORCH_CHECK(seeds.dim() == 1 && seeds.size(0) == B && seeds.scalar_type() == at::kLong,
              "race_rows: seeds must be int64 [B]");
  auto idx = at::empty({B}, probs.options().dtype(at::kLong));
  const float* pp = probs.data_ptr<float>();
  const auto sc = seeds.contiguous();
  const int64_t* sp = sc.data_ptr<int64_t>();
  int64_t* out = idx.data_ptr<int64_t>();
  for (int64_t r = 0; r < B; ++r) {
    const float* p = pp + r * V;
    bool any = false;
    for (int64_t i = 0; i < V && !any; ++i) any = p[i] > 0.0f;
    TORCH_CHECK(any, "race_rows: a row has no positive weight");
    out[r] = race_row(p, V, static_cast<uint64_t>(sp[r]));
  }
  return idx;
}
