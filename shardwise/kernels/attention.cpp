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
#include <cmath>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float f32(float v) { return v; }
inline float f32(c10::BFloat16 v) { return static_cast<float>(v); }

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // 16 bf16 -> fp32: the bits shifted up
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// scores of one key row against the g heads' queries (d = 16 * V, queries pre-scaled, fp32)
template <class T, int V>
inline void dots(const float* qf, int64_t g, const T* kr, float* out) {
  __m512 k[V];
#pragma GCC unroll 8
  for (int c = 0; c < V; ++c) k[c] = load16(kr + 16 * c);
  for (int64_t j = 0; j < g; ++j) {
    __m512 a = _mm512_mul_ps(k[0], _mm512_loadu_ps(qf + j * 16 * V));
#pragma GCC unroll 8
    for (int c = 1; c < V; ++c) a = _mm512_fmadd_ps(k[c], _mm512_loadu_ps(qf + j * 16 * V + 16 * c), a);
    out[j] = _mm512_reduce_add_ps(a);
  }
}

// acc[j] += w[j] v for the g heads (d = 16 * V)
template <class T, int V>
inline void axpys(const float* w, int64_t g, const T* vr, float* acc) {
  __m512 v[V];
#pragma GCC unroll 8
  for (int c = 0; c < V; ++c) v[c] = load16(vr + 16 * c);
  for (int64_t j = 0; j < g; ++j) {
    const __m512 wj = _mm512_set1_ps(w[j]);
#pragma GCC unroll 8
    for (int c = 0; c < V; ++c) {
      float* a = acc + j * 16 * V + 16 * c;
      _mm512_storeu_ps(a, _mm512_fmadd_ps(wj, v[c], _mm512_loadu_ps(a)));
    }
  }
}
#endif

// the generic forms (any d, any CPU)
template <class T>
inline void dots_any(const float* qf, int64_t g, int64_t d, const T* kr, float* kf, float* out) {
  for (int64_t e = 0; e < d; ++e) kf[e] = f32(kr[e]);
  for (int64_t j = 0; j < g; ++j) {
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t e = 0; e < d; ++e) dot += qf[j * d + e] * kf[e];
    out[j] = dot;
  }
}

template <class T>
inline void axpys_any(const float* w, int64_t g, int64_t d, const T* vr, float* vf, float* acc) {
  for (int64_t e = 0; e < d; ++e) vf[e] = f32(vr[e]);
  for (int64_t j = 0; j < g; ++j)
#pragma omp simd
    for (int64_t e = 0; e < d; ++e) acc[j * d + e] += w[j] * vf[e];
}

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
  const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
  at::parallel_for(0, B * nkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf, s, acc, buf;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / nkv, kh = i % nkv, n = std::min<int64_t>(lp[b], L);
      const auto& hs = heads[kh];
      const int64_t g = hs.size();
      if (g == 0) continue;
      qf.assign(g * d, 0.f);
      for (int64_t j = 0; j < g; ++j)
        for (int64_t e = 0; e < d; ++e) qf[j * d + e] = f32(qp[(b * nq + hs[j]) * d + e]) * sc;
      s.assign(n * g, 0.f);  // scores, key-major: (n, g)
      buf.resize(d);
      for (int64_t t = 0; t < n; ++t) {  // each key row once for the g heads
        const T* kr = kp + tp[b * L + t] * ld + kh * d;
        float* st = s.data() + t * g;
#if defined(__AVX512F__)
        if (d == 64) dots<T, 4>(qf.data(), g, kr, st);
        else if (d == 128) dots<T, 8>(qf.data(), g, kr, st);
        else
#endif
        dots_any(qf.data(), g, d, kr, buf.data(), st);
      }
      std::vector<float> mx(g, -INFINITY), sum(g, 0.f);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < g; ++j) {
          float& x = s[t * g + j];
          if (cap > 0.f) x = cap * std::tanh(x / cap);
          mx[j] = std::max(mx[j], x);
        }
      for (int64_t t = 0; t < n; ++t)
        for (int64_t j = 0; j < g; ++j) {
          float& x = s[t * g + j];
          x = std::exp(x - mx[j]);
          sum[j] += x;
        }
      acc.assign(g * d, 0.f);
      for (int64_t t = 0; t < n; ++t) {  // each value row once for the g heads
        const T* vr = vp + tp[b * L + t] * ld + kh * d;
        const float* w = s.data() + t * g;
#if defined(__AVX512F__)
        if (d == 64) axpys<T, 4>(w, g, vr, acc.data());
        else if (d == 128) axpys<T, 8>(w, g, vr, acc.data());
        else
#endif
        axpys_any(w, g, d, vr, buf.data(), acc.data());
      }
      for (int64_t j = 0; j < g; ++j) {
        const float inv = n > 0 ? 1.f / sum[j] : 0.f;
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
