// shardwise::paged_decode -- one query token per sequence attending to its keys where they lie
// in the paged KV cache, read once.
//
// The static decode step otherwise gathers every row's keys and values into a (B, nkv, L, d)
// copy (L the bucketed width, padding included) and runs scaled_dot_product_attention on it:
// the cache's bytes are read, written and read again, and at 16 sequences of a few hundred
// tokens that costs more than the weights. Here each (sequence, KV head) pair is one unit of
// work: its keys' rows are read from the cache through the sequence's slot table, only up to the
// sequence's length, and every query head of the group is scored against each key while it is
// in L1 (a key is read once per KV head, not once per query head).
//
//   q (B, nq, d); cache k, v (slots, nkv * d); table (B, L) slot of each key position;
//   lens (B,) keys per row (<= L); kv_of (nq,) the KV head each query head reads;
//   out (B, nq, d) = softmax(cap(scale q k^T)) v over the row's first lens[b] keys,
//   cap(x) = c tanh(x / c) with a soft-cap c > 0, else x.
//
// Scores, softmax and sums in fp32 (exp of the score minus the row's maximum), one rounding of
// the result to the input dtype. fp32 or bf16, any CPU (plain loops the compiler vectorizes).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

using shardwise_simd::f32;

#if defined(__AVX512F__)
using shardwise_simd::load16;

// exp(x) for x <= 0 (a score minus its row's maximum), 16 lanes: x = n ln2 + r with |r| <=
// ln2 / 2, exp(r) by a degree-6 polynomial (Cephes' expf coefficients, ~1e-7 relative), then
// scaled by 2^n. Below -87.3 the result is clamped near 1e-38 (nothing a softmax can see).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// s[j * n + t] = q_j . k_t for G heads (queries pre-scaled, fp32, in registers), every key row
// t < n of this KV head (d = 16 * V)
template <class T, int V, int G>
inline void dots(const float* qf, int64_t n, const int64_t* rows, const T* kp, int64_t ld,
                 float* s) {
  __m512 qv[G][V];
#pragma GCC unroll 16
  for (int i = 0; i < G * V; ++i) qv[i / V][i % V] = _mm512_loadu_ps(qf + 16 * i);
  for (int64_t t = 0; t < n; ++t) {
    const T* kr = kp + rows[t] * ld;
    __m512 k[V];
#pragma GCC unroll 8
    for (int c = 0; c < V; ++c) k[c] = load16(kr + 16 * c);
#pragma GCC unroll 8
    for (int j = 0; j < G; ++j) {
      __m512 a = _mm512_mul_ps(k[0], qv[j][0]);
#pragma GCC unroll 8
      for (int c = 1; c < V; ++c) a = _mm512_fmadd_ps(k[c], qv[j][c], a);
      s[j * n + t] = _mm512_reduce_add_ps(a);
    }
  }
}

// acc_j = sum_t w[j * n + t] v_t for G heads, the sums in registers (d = 16 * V)
template <class T, int V, int G>
inline void axpys(const float* w, int64_t n, const int64_t* rows, const T* vp, int64_t ld,
                  float* acc) {
  __m512 a[G][V];
#pragma GCC unroll 16
  for (int i = 0; i < G * V; ++i) a[i / V][i % V] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const T* vr = vp + rows[t] * ld;
    __m512 v[V];
#pragma GCC unroll 8
    for (int c = 0; c < V; ++c) v[c] = load16(vr + 16 * c);
#pragma GCC unroll 8
    for (int j = 0; j < G; ++j) {
      const __m512 wj = _mm512_set1_ps(w[j * n + t]);
#pragma GCC unroll 8
      for (int c = 0; c < V; ++c) a[j][c] = _mm512_fmadd_ps(wj, v[c], a[j][c]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < G * V; ++i) _mm512_storeu_ps(acc + 16 * i, a[i / V][i % V]);
}

// f(j, G) over the g heads of one (sequence, KV head) in groups of G from head j, as many as
// the registers hold (d = 16 * V; V = 4: up to 4 heads, 16 registers of queries or sums; V = 8:
// up to 2)
template <int V, class F>
inline void head_groups(int64_t g, F&& f) {
  constexpr int64_t GM = V == 4 ? 4 : 2;
  for (int64_t j = 0; j < g; j += GM) {
    const int64_t m = std::min(GM, g - j);
    if constexpr (V == 4) {
      if (m == 4) { f(j, std::integral_constant<int, 4>{}); continue; }
      if (m == 3) { f(j, std::integral_constant<int, 3>{}); continue; }
    }
    if (m == 2) f(j, std::integral_constant<int, 2>{});
    else f(j, std::integral_constant<int, 1>{});
  }
}

// the unit's scores (values = false) or output sums (values = true), d = 16 * V
template <class T, int V>
void unit_avx512(bool values, const float* qf, int64_t g, int64_t n, const int64_t* rows,
                 const T* kp, const T* vp, int64_t ld, float* s, float* acc) {
  head_groups<V>(g, [&](int64_t j, auto G) {
    constexpr int NG = decltype(G)::value;
    if (values) axpys<T, V, NG>(s + j * n, n, rows, vp, ld, acc + j * 16 * V);
    else dots<T, V, NG>(qf + j * 16 * V, n, rows, kp, ld, s + j * n);
  });
}

// x <- exp(x - max x) over n scores; returns their sum
inline float softmax_numerators(float* x, int64_t n) {
  __m512 mv = _mm512_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + t));
  float mx = _mm512_reduce_max_ps(mv);
  for (; t < n; ++t) mx = std::max(mx, x[t]);
  const __m512 m = _mm512_set1_ps(mx);
  __m512 sv = _mm512_setzero_ps();
  for (t = 0; t + 16 <= n; t += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + t), m));
    _mm512_storeu_ps(x + t, e);
    sv = _mm512_add_ps(sv, e);
  }
  if (t < n) {
    const __mmask16 k = (__mmask16)((1u << (n - t)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + t), m));
    _mm512_mask_storeu_ps(x + t, k, e);
    sv = _mm512_add_ps(sv, _mm512_maskz_mov_ps(k, e));
  }
  return _mm512_reduce_add_ps(sv);
}
#endif

// the generic forms (any d, any CPU); scores head-major, s[j * n + t]
template <class T>
inline void dots_any(const float* qf, int64_t g, int64_t d, int64_t n, const T* kr, int64_t t,
                     float* kf, float* s) {
  for (int64_t e = 0; e < d; ++e) kf[e] = f32(kr[e]);
  for (int64_t j = 0; j < g; ++j) {
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t e = 0; e < d; ++e) dot += qf[j * d + e] * kf[e];
    s[j * n + t] = dot;
  }
}

template <class T>
inline void axpys_any(const float* s, int64_t g, int64_t d, int64_t n, const T* vr, int64_t t,
                      float* vf, float* acc) {
  for (int64_t e = 0; e < d; ++e) vf[e] = f32(vr[e]);
  for (int64_t j = 0; j < g; ++j) {
    const float w = s[j * n + t];
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) acc[j * d + e] += w * vf[e];
  }
}

constexpr size_t MAX_GROUP = 64;  // query heads per KV head

template <class T>
void paged(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
           const at::Tensor& table, const at::Tensor& lens, const at::Tensor& kv_of,
           double scale, double softcap, at::Tensor& out) {
  const int64_t B = q.size(0), nq = q.size(1), d = q.size(2), L = table.size(1);
  const int64_t nkv = kc.size(1) / d, ld = kc.size(1);
  const T* qp = q.data_ptr<T>();
  const T* kp = kc.data_ptr<T>();
  const T* vp = vc.data_ptr<T>();
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  // the query heads of each KV head
  std::vector<std::vector<int64_t>> heads(nkv);
  const int64_t* kvp = kv_of.data_ptr<int64_t>();
  for (int64_t h = 0; h < nq; ++h) heads[kvp[h]].push_back(h);
  for (const auto& hs : heads)
    TORCH_CHECK(hs.size() <= MAX_GROUP, "paged_decode: ", hs.size(), " query heads read one KV "
                "head; at most ", MAX_GROUP);
  const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
  // A unit of work: one sequence's KV head with its query heads (the KV rows read once for the
  // group). Fewer units than a few per thread (batch 1, SmolLM2's 3 KV heads on 2 threads: 2 + 1)
  // leave threads idle, so then a unit is one query head, which reads its KV head itself.
  size_t gmax = 1;
  for (const auto& hs : heads) gmax = std::max(gmax, hs.size());
  const int64_t threads = at::get_num_threads();
  const int64_t parts = threads > 1 && B * nkv < 4 * threads ? static_cast<int64_t>(gmax) : 1;
  at::parallel_for(0, B * nkv * parts, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf, s, acc, buf;  // this thread's, reused across its units
    std::vector<int64_t> rows;           // the unit's key rows, as offsets into the cache
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (nkv * parts), kh = (i / parts) % nkv, n = std::min<int64_t>(lp[b], L);
      const auto& all = heads[kh];
      const int64_t part = i % parts;
      if (part >= static_cast<int64_t>(all.size())) continue;
      const int64_t* hs = parts == 1 ? all.data() : all.data() + part;
      const int64_t g = parts == 1 ? static_cast<int64_t>(all.size()) : 1;
      if (g == 0) continue;
      qf.resize(g * d);
      for (int64_t j = 0; j < g; ++j)
        for (int64_t e = 0; e < d; ++e) qf[j * d + e] = f32(qp[(b * nq + hs[j]) * d + e]) * sc;
      s.resize(std::max<int64_t>(g * n, 1));  // scores, head-major: (g, n)
      acc.assign(g * d, 0.f);
      rows.resize(n);
      for (int64_t t = 0; t < n; ++t) rows[t] = tp[b * L + t];
      const T* kb = kp + kh * d;  // this KV head's columns
      const T* vb = vp + kh * d;
#if defined(__AVX512F__)
      const bool fast = d == 64 || d == 128;
#else
      const bool fast = false;
#endif
      if (fast) {
#if defined(__AVX512F__)
        if (d == 64) unit_avx512<T, 4>(false, qf.data(), g, n, rows.data(), kb, vb, ld, s.data(), nullptr);
        else unit_avx512<T, 8>(false, qf.data(), g, n, rows.data(), kb, vb, ld, s.data(), nullptr);
#endif
      } else {
        buf.resize(d);
        for (int64_t t = 0; t < n; ++t) dots_any(qf.data(), g, d, n, kb + rows[t] * ld, t, buf.data(), s.data());
      }
      float sums[MAX_GROUP];
      for (int64_t j = 0; j < g; ++j) {
        float* x = s.data() + j * n;
        if (cap > 0.f)
          for (int64_t t = 0; t < n; ++t) x[t] = cap * std::tanh(x[t] / cap);
#if defined(__AVX512F__)
        sums[j] = softmax_numerators(x, n);
#else
        float mx = -INFINITY, sum = 0.f;
        for (int64_t t = 0; t < n; ++t) mx = std::max(mx, x[t]);
        for (int64_t t = 0; t < n; ++t) sum += (x[t] = std::exp(x[t] - mx));
        sums[j] = sum;
#endif
      }
      if (fast) {
#if defined(__AVX512F__)
        if (d == 64) unit_avx512<T, 4>(true, nullptr, g, n, rows.data(), kb, vb, ld, s.data(), acc.data());
        else unit_avx512<T, 8>(true, nullptr, g, n, rows.data(), kb, vb, ld, s.data(), acc.data());
#endif
      } else {
        for (int64_t t = 0; t < n; ++t) axpys_any(s.data(), g, d, n, vb + rows[t] * ld, t, buf.data(), acc.data());
      }
      for (int64_t j = 0; j < g; ++j) {
        const float inv = n > 0 ? 1.f / sums[j] : 0.f;
        T* o = op + (b * nq + hs[j]) * d;
        for (int64_t e = 0; e < d; ++e) o[e] = static_cast<T>(acc[j * d + e] * inv);
      }
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q_, const at::Tensor& kc, const at::Tensor& vc,
                        const at::Tensor& table_, const at::Tensor& lens_,
                        const at::Tensor& kv_of_, double scale, double softcap) {
  TORCH_CHECK(q_.dim() == 3, "paged_decode: q must be (B, nq, d), got ", q_.sizes());
  const int64_t B = q_.size(0), nq = q_.size(1), d = q_.size(2);
  TORCH_CHECK(q_.device().is_cpu() && kc.device().is_cpu() && vc.device().is_cpu(),
              "paged_decode: CPU tensors only");
  TORCH_CHECK(q_.scalar_type() == kc.scalar_type() && kc.scalar_type() == vc.scalar_type() &&
              (q_.scalar_type() == at::kFloat || q_.scalar_type() == at::kBFloat16),
              "paged_decode: q and the cache must be float32 or bfloat16 alike");
  TORCH_CHECK(kc.dim() == 2 && kc.sizes() == vc.sizes() && kc.is_contiguous() &&
              vc.is_contiguous() && d > 0 && kc.size(1) % d == 0,
              "paged_decode: the cache must be contiguous (slots, nkv * d) with d = ", d,
              "; got ", kc.sizes());
  TORCH_CHECK(table_.dim() == 2 && table_.size(0) == B && lens_.numel() == B &&
              kv_of_.numel() == nq, "paged_decode: table (B, L), lens (B,), kv_of (nq,)");
  const auto q = q_.contiguous();
  const auto table = table_.to(at::kLong).contiguous();
  const auto lens = lens_.to(at::kLong).contiguous();
  const auto kv_of = kv_of_.to(at::kLong).contiguous();
  const int64_t nkv = kc.size(1) / d;
  const int64_t* kvp = kv_of.data_ptr<int64_t>();
  for (int64_t h = 0; h < nq; ++h)
    TORCH_CHECK(kvp[h] >= 0 && kvp[h] < nkv, "paged_decode: query head ", h, " reads KV head ",
                kvp[h], " outside 0..", nkv - 1);
  // slots read are checked as they are read (only the first lens[b] of a row are)
  const int64_t slots = kc.size(0);
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0, n = std::min<int64_t>(lp[b], table.size(1)); t < n; ++t)
      TORCH_CHECK(tp[b * table.size(1) + t] >= 0 && tp[b * table.size(1) + t] < slots,
                  "paged_decode: row ", b, " key ", t, " names slot ", tp[b * table.size(1) + t],
                  " outside the cache's ", slots);
  auto out = at::empty({B, nq, d}, q.options());
  if (q.scalar_type() == at::kFloat)
    paged<float>(q, kc, vc, table, lens, kv_of, scale, softcap, out);
  else
    paged<c10::BFloat16>(q, kc, vc, table, lens, kv_of, scale, softcap, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shardwise, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor table, Tensor lens, "
        "Tensor kv_of, float scale, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(shardwise, CPU, m) { m.impl("paged_decode", &paged_decode); }
