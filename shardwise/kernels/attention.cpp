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
#include <ATen/ATen.h>  // not torch/extension.h: no Python bindings here, a third of the compile
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

using shardwise_simd::f32;

#if defined(__AVX512F__)
using shardwise_simd::exp16;
using shardwise_simd::load16;

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

// the largest of n scores (-inf for none)
inline float max_of(const float* x, int64_t n) {
  __m512 mv = _mm512_set1_ps(-INFINITY);
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + t));
  if (t < n)
    mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(mv, (__mmask16)((1u << (n - t)) - 1), x + t));
  return _mm512_reduce_max_ps(mv);
}

// x <- exp(x - mx) over n scores (mx >= each); returns their sum
inline float exp_sum(float* x, int64_t n, float mx) {
  const __m512 m = _mm512_set1_ps(mx);
  __m512 sv = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) {
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

// x <- exp(x - max x) over n scores; returns their sum
inline float softmax_numerators(float* x, int64_t n) { return exp_sum(x, n, max_of(x, n)); }
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

// What both attention operators ask of q and the cache (op: the operator's name for the message)
void check_cache(const char* op, const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                 int64_t d) {
  TORCH_CHECK(q.device().is_cpu() && kc.device().is_cpu() && vc.device().is_cpu(),
              op, ": CPU tensors only");
  TORCH_CHECK(q.scalar_type() == kc.scalar_type() && kc.scalar_type() == vc.scalar_type() &&
              (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              op, ": q and the cache must be float32 or bfloat16 alike");
  TORCH_CHECK(kc.dim() == 2 && kc.sizes() == vc.sizes() && kc.is_contiguous() &&
              vc.is_contiguous() && d > 0 && kc.size(1) % d == 0,
              op, ": the cache must be contiguous (slots, nkv * d) with d = ", d, "; got ",
              kc.sizes());
}

at::Tensor paged_decode(const at::Tensor& q_, const at::Tensor& kc, const at::Tensor& vc,
                        const at::Tensor& table_, const at::Tensor& lens_,
                        const at::Tensor& kv_of_, double scale, double softcap) {
  TORCH_CHECK(q_.dim() == 3, "paged_decode: q must be (B, nq, d), got ", q_.sizes());
  const int64_t B = q_.size(0), nq = q_.size(1), d = q_.size(2);
  check_cache("paged_decode", q_, kc, vc, d);
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

// ---------------------------------------------------------------------------------------------
// shardwise::prefill_attention -- a prompt chunk's queries attending causally to their keys
// where they lie in the paged cache (the cached prefix and the chunk alike): no gathered copy of
// the keys and no mask tensor.
//
//   q (nq, s, d), unit stride in d; cache k, v (slots, nkv * d); slots (L,) the cache row of each
//   key, in position order; kv_of (nq,) the KV head each query head reads; query i reads key j
//   when j <= i + q_start and, with a window w > 0, i + q_start - j < w.
//   out (nq, s, d) = softmax(cap(scale q k^T)) v over each row's visible keys.
//
// The keys are taken in blocks of PB_KEYS. Each block's keys and values are converted to fp32
// once per KV head (the keys transposed: a vector holds 16 key positions of one dimension). A
// unit of work is one query head's PB_ROWS rows: it scores its rows against the block 4 rows x 32
// keys at a time in registers, then folds the block into each row's running softmax (the online
// rescaling of flash attention: running maximum, running sum, weighted values rescaled when the
// maximum grows). Scores, softmax and sums in fp32; in bf16 with AVX512-BF16 the products are
// pair dot products of the bf16 inputs (the softmax weights rounded to bf16 for them, as
// torch's flash attention does); one rounding of the result. Units are
// ordered so that equal contiguous ranges of them (at::parallel_for's split) carry similar causal
// work: row blocks alternate from the first and the last.
constexpr int64_t PB_KEYS = 256;  // keys per block (a multiple of 32)
constexpr int64_t PB_ROWS = 16;   // query rows per unit
constexpr int64_t PB_GROUP = 4;   // query rows scored together in registers

// where dimension e of block key t lies in the packed keys: 32-key tiles, each (d, 32), so that
// scoring 32 keys reads one contiguous tile
inline int64_t kt_at(int64_t d, int64_t e, int64_t t) {
  return (t >> 5) * d * 32 + e * 32 + (t & 31);
}

struct Prefill {
  int64_t s, nq, d, L, nkv, ld, q_start, window;
  int64_t lo(int64_t i) const {  // the first key row i reads
    return window > 0 ? std::max<int64_t>(0, i + q_start + 1 - window) : 0;
  }
  int64_t hi(int64_t i) const {  // one past the last
    return std::max<int64_t>(lo(i), std::min(L, i + q_start + 1));
  }
};

#if defined(__AVX512F__)
// S[r][t] = q_r . k_t for R rows (fp32, pre-scaled, qf[r * d + e]) and keys t in [a, b) of the
// block (a a multiple of 32, b of 16), kt in 32-key tiles (PB_KEYS / 32, d, 32): kt_at(e, t)
template <int R>
inline void prefill_scores(const float* qf, int64_t d, const float* kt, int64_t a, int64_t b,
                           float* S) {
  int64_t t = a;
  for (; t + 32 <= b; t += 32) {
    __m512 c[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) c[r][0] = c[r][1] = _mm512_setzero_ps();
    for (int64_t e = 0; e < d; ++e) {
      const __m512 k0 = _mm512_loadu_ps(kt + kt_at(d, e, t));
      const __m512 k1 = _mm512_loadu_ps(kt + kt_at(d, e, t) + 16);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512 qr = _mm512_set1_ps(qf[r * d + e]);
        c[r][0] = _mm512_fmadd_ps(qr, k0, c[r][0]);
        c[r][1] = _mm512_fmadd_ps(qr, k1, c[r][1]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_ps(S + r * PB_KEYS + t, c[r][0]);
      _mm512_storeu_ps(S + r * PB_KEYS + t + 16, c[r][1]);
    }
  }
  if (t < b) {  // 16 left (a separate loop: a flag in the one above costs fp32 ~10%)
    __m512 c[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) c[r] = _mm512_setzero_ps();
    for (int64_t e = 0; e < d; ++e) {
      const __m512 k0 = _mm512_loadu_ps(kt + kt_at(d, e, t));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) c[r] = _mm512_fmadd_ps(_mm512_set1_ps(qf[r * d + e]), k0, c[r]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(S + r * PB_KEYS + t, c[r]);
  }
}

// acc[r][c0 .. c0 + 16 NV) += sum_t P[r][t] v_t for keys t in [a, b) of the block, vv (PB_KEYS, d)
template <int R, int NV>
inline void prefill_values(const float* P, const float* vv, int64_t d, int64_t c0, int64_t a,
                           int64_t b, float* acc) {
  __m512 o[R][NV];
#pragma GCC unroll 16
  for (int i = 0; i < R * NV; ++i) o[i / NV][i % NV] = _mm512_loadu_ps(acc + (i / NV) * d + c0 + 16 * (i % NV));
  for (int64_t t = a; t < b; ++t) {
    __m512 v[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) v[c] = _mm512_loadu_ps(vv + t * d + c0 + 16 * c);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 p = _mm512_set1_ps(P[r * PB_KEYS + t]);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) o[r][c] = _mm512_fmadd_ps(p, v[c], o[r][c]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R * NV; ++i) _mm512_storeu_ps(acc + (i / NV) * d + c0 + 16 * (i % NV), o[i / NV][i % NV]);
}

// f(c0, NV) over the output's columns in chunks of up to 64 (NV vectors of 16: the registers of
// 4 rows' sums)
template <class F>
inline void column_chunks(int64_t d, F&& f) {
  for (int64_t c0 = 0; c0 < d; c0 += 64) {
    switch (std::min<int64_t>(4, (d - c0) / 16)) {
      case 4: f(c0, std::integral_constant<int, 4>{}); break;
      case 3: f(c0, std::integral_constant<int, 3>{}); break;
      case 2: f(c0, std::integral_constant<int, 2>{}); break;
      default: f(c0, std::integral_constant<int, 1>{}); break;
    }
  }
}

template <int R>
inline void prefill_values_all(const float* P, const float* vv, int64_t d, int64_t a, int64_t b,
                               float* acc) {
  column_chunks(d, [&](int64_t c0, auto nv) {
    prefill_values<R, decltype(nv)::value>(P, vv, d, c0, a, b, acc);
  });
}
#endif

#if defined(__AVX512BF16__)
// The bf16 forms, for AVX512-BF16's pair dot products (two bf16 products summed into each fp32
// lane, twice the multiply-adds of fp32 FMAs an instruction). Keys: 32-key tiles, each (d / 2,
// 32, 2): a vector holds 16 keys' values of two adjacent dimensions. Values: (keys / 2, d, 2): a
// vector holds 16 dimensions of two adjacent keys.
inline int64_t kp_at(int64_t d, int64_t e, int64_t t) {
  return (t >> 5) * d * 32 + (e >> 1) * 64 + (t & 31) * 2 + (e & 1);
}
inline int64_t vp_at(int64_t d, int64_t t, int64_t e) { return (t >> 1) * 2 * d + e * 2 + (t & 1); }

inline __m512bh pair_at(const uint16_t* p) {  // the bf16 pair p[0], p[1] in every lane
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return (__m512bh)_mm512_set1_epi32(v);
}

// S[r][t] = scale q_r . k_t, q rows in bf16 (qb[r * d + e]), keys [a, b) as in prefill_scores
template <int R>
inline void prefill_scores_bf16(const uint16_t* qb, int64_t d, const uint16_t* kt, int64_t a,
                                int64_t b, float scale, float* S) {
  const __m512 sv = _mm512_set1_ps(scale);
  for (int64_t t = a; t < b; t += 32) {
    const uint16_t* tile = kt + (t >> 5) * d * 32;
    const bool two = t + 32 <= b;  // else the tile's first 16 keys only
    __m512 c[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) c[r][0] = c[r][1] = _mm512_setzero_ps();
    for (int64_t e2 = 0; e2 < d / 2; ++e2) {
      const __m512bh k0 = (__m512bh)_mm512_loadu_si512(tile + e2 * 64);
      const __m512bh k1 = (__m512bh)_mm512_loadu_si512(tile + e2 * 64 + 32);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512bh qv = pair_at(qb + r * d + 2 * e2);
        c[r][0] = _mm512_dpbf16_ps(c[r][0], qv, k0);
        if (two) c[r][1] = _mm512_dpbf16_ps(c[r][1], qv, k1);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_ps(S + r * PB_KEYS + t, _mm512_mul_ps(c[r][0], sv));
      if (two) _mm512_storeu_ps(S + r * PB_KEYS + t + 16, _mm512_mul_ps(c[r][1], sv));
    }
  }
}

// acc[r][c0 .. c0 + 16 NV) += sum_t P[r][t] v_t, the weights in bf16 (Pb[r * PB_KEYS + t]),
// keys [a, b), both even
template <int R, int NV>
inline void prefill_values_bf16(const uint16_t* Pb, const uint16_t* vv, int64_t d, int64_t c0,
                                int64_t a, int64_t b, float* acc) {
  __m512 o[R][NV];
#pragma GCC unroll 16
  for (int i = 0; i < R * NV; ++i) o[i / NV][i % NV] = _mm512_loadu_ps(acc + (i / NV) * d + c0 + 16 * (i % NV));
  for (int64_t t = a; t < b; t += 2) {
    const uint16_t* vr = vv + (t >> 1) * 2 * d + c0 * 2;
    __m512bh v[NV];
#pragma GCC unroll 4
    for (int c = 0; c < NV; ++c) v[c] = (__m512bh)_mm512_loadu_si512(vr + 32 * c);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh w = pair_at(Pb + r * PB_KEYS + t);
#pragma GCC unroll 4
      for (int c = 0; c < NV; ++c) o[r][c] = _mm512_dpbf16_ps(o[r][c], w, v[c]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R * NV; ++i) _mm512_storeu_ps(acc + (i / NV) * d + c0 + 16 * (i % NV), o[i / NV][i % NV]);
}

template <int R>
inline void prefill_values_bf16_all(const uint16_t* Pb, const uint16_t* vv, int64_t d, int64_t a,
                                    int64_t b, float* acc) {
  column_chunks(d, [&](int64_t c0, auto nv) {
    prefill_values_bf16<R, decltype(nv)::value>(Pb, vv, d, c0, a, b, acc);
  });
}
#endif

// How a block's products run: plain loops (any CPU, any d), AVX-512 fp32 FMAs (d a multiple of
// 16), or AVX512-BF16 pair dot products (bf16 inputs, d a multiple of 16)
enum class Mode { generic, fma, dp };

// One KV head's block of keys and values, packed: fp32 (generic, fma: keys at kt_at, values
// (PB_KEYS, d)) or bf16 pairs (dp: kp_at, vp_at); and one group of query rows: fp32 pre-scaled
// (qf) or bf16 as given (qb), with the bf16 weights' scratch (Pb)
struct Group {
  const float* kt = nullptr;
  const float* vv = nullptr;
  const uint16_t* kt16 = nullptr;
  const uint16_t* vv16 = nullptr;
  const float* qf = nullptr;
  const uint16_t* qb = nullptr;
  uint16_t* Pb = nullptr;
};

// Fold keys [k0, k1) (the block packed, PB_KEYS wide) into rows i0 .. i0 + R of one query head:
// scores, mask, running softmax (m, l), weighted values (acc, rows of d).
template <int R>
void prefill_group(const Prefill& p, int64_t i0, const Group& g, int64_t k0, int64_t k1,
                   float* S, float* m, float* l, float* acc, float scale, float cap, Mode mode) {
  int64_t lo = k1, hi = k0;
  for (int r = 0; r < R; ++r) {
    lo = std::min(lo, std::max(p.lo(i0 + r), k0));
    hi = std::max(hi, std::min(p.hi(i0 + r), k1));
  }
  if (lo >= hi) return;
  // a at a tile's start (32 keys), b past the last key to a multiple of 16
  const int64_t a = (lo - k0) & ~int64_t(31), b = (hi - k0 + 15) & ~int64_t(15);
#if defined(__AVX512BF16__)
  if (mode == Mode::dp) prefill_scores_bf16<R>(g.qb, p.d, g.kt16, a, b, scale, S);
#endif
#if defined(__AVX512F__)
  if (mode == Mode::fma) prefill_scores<R>(g.qf, p.d, g.kt, a, b, S);
#endif
  if (mode == Mode::generic)
    for (int r = 0; r < R; ++r)
      for (int64_t t = a; t < b; ++t) {
        float dot = 0.f;
        for (int64_t e = 0; e < p.d; ++e) dot += g.qf[r * p.d + e] * g.kt[kt_at(p.d, e, t)];
        S[r * PB_KEYS + t] = dot;
      }
  for (int r = 0; r < R; ++r) {
    float* x = S + r * PB_KEYS;
    const int64_t rl = std::max(p.lo(i0 + r), k0) - k0, rh = std::min(p.hi(i0 + r), k1) - k0;
    if (rl >= rh) {  // this row reads nothing here: its weights are 0
      std::fill(x + a, x + b, 0.f);
    } else {
      if (cap > 0.f)
        for (int64_t t = rl; t < rh; ++t) x[t] = cap * std::tanh(x[t] / cap);
      for (int64_t t = a; t < rl; ++t) x[t] = 0.f;
      for (int64_t t = rh; t < b; ++t) x[t] = 0.f;
#if defined(__AVX512F__)
      const float mnew = std::max(m[r], max_of(x + rl, rh - rl));
      const float sum = exp_sum(x + rl, rh - rl, mnew);
#else
      float mnew = m[r], sum = 0.f;
      for (int64_t t = rl; t < rh; ++t) mnew = std::max(mnew, x[t]);
      for (int64_t t = rl; t < rh; ++t) sum += (x[t] = std::exp(x[t] - mnew));
#endif
      const float alpha = std::exp(m[r] - mnew);  // 0 for the first keys (m = -inf)
      m[r] = mnew;
      l[r] = l[r] * alpha + sum;
      if (alpha != 1.f)
        for (int64_t e = 0; e < p.d; ++e) acc[r * p.d + e] *= alpha;
    }
#if defined(__AVX512BF16__)
    if (mode == Mode::dp)  // the weights in bf16 for the pair products (the sums stay fp32)
      for (int64_t t = a; t < b; t += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(g.Pb + r * PB_KEYS + t),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + t)));
#endif
  }
#if defined(__AVX512BF16__)
  if (mode == Mode::dp) {
    prefill_values_bf16_all<R>(g.Pb, g.vv16, p.d, a, b, acc);
    return;
  }
#endif
#if defined(__AVX512F__)
  if (mode == Mode::fma) {
    prefill_values_all<R>(S, g.vv, p.d, a, b, acc);
    return;
  }
#endif
  for (int r = 0; r < R; ++r)
    for (int64_t t = a; t < b; ++t) {
      const float w = S[r * PB_KEYS + t];
      if (w != 0.f)
        for (int64_t e = 0; e < p.d; ++e) acc[r * p.d + e] += w * g.vv[t * p.d + e];
    }
}

template <class T>
void prefill(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
             const at::Tensor& slots, const int64_t* kvp, const Prefill& p, double scale,
             double softcap, at::Tensor& out) {
  const int64_t s = p.s, nq = p.nq, d = p.d;
  const T* qp = q.data_ptr<T>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  const T* kp = kc.data_ptr<T>();
  const T* vp = vc.data_ptr<T>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  Mode mode = Mode::generic;
#if defined(__AVX512F__)
  if (d % 16 == 0) mode = Mode::fma;
#endif
#if defined(__AVX512BF16__)
  if (d % 16 == 0 && std::is_same_v<T, c10::BFloat16>) mode = Mode::dp;
#endif
  const bool dp = mode == Mode::dp;
  const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
  std::vector<float> acc(nq * s * d, 0.f), m(nq * s, -INFINITY), l(nq * s, 0.f);
  std::vector<float> kt(dp ? 0 : p.nkv * d * PB_KEYS), vv(dp ? 0 : p.nkv * PB_KEYS * d);
  std::vector<uint16_t> kt16(dp ? p.nkv * d * PB_KEYS : 0), vv16(dp ? p.nkv * PB_KEYS * d : 0);
  const int64_t nb = (s + PB_ROWS - 1) / PB_ROWS;
  // the first key any row reads, one past the last
  int64_t first = p.L, last = 0;
  for (int64_t i = 0; i < s; ++i)
    if (p.lo(i) < p.hi(i)) first = std::min(first, p.lo(i)), last = std::max(last, p.hi(i));
  for (int64_t k0 = first - first % PB_KEYS; k0 < last; k0 += PB_KEYS) {
    const int64_t k1 = std::min(k0 + PB_KEYS, last);
    at::parallel_for(0, p.nkv, 1, [&](int64_t h0, int64_t h1) {  // pack the block
      for (int64_t kh = h0; kh < h1; ++kh) {
        for (int64_t t = 0; t < PB_KEYS; ++t) {
          const bool key = k0 + t < k1;  // else padding: zeros
          const T* kr = key ? kp + sp[k0 + t] * p.ld + kh * d : nullptr;
          const T* vr = key ? vp + sp[k0 + t] * p.ld + kh * d : nullptr;
          if (dp) {
            uint16_t* ktb = kt16.data() + kh * d * PB_KEYS;
            uint16_t* vvb = vv16.data() + kh * PB_KEYS * d;
            for (int64_t e = 0; e < d; ++e) {
              ktb[kp_at(d, e, t)] = key ? reinterpret_cast<const uint16_t*>(kr)[e] : 0;
              vvb[vp_at(d, t, e)] = key ? reinterpret_cast<const uint16_t*>(vr)[e] : 0;
            }
          } else {
            float* ktb = kt.data() + kh * d * PB_KEYS;
            float* vvb = vv.data() + kh * PB_KEYS * d;
            for (int64_t e = 0; e < d; ++e) {
              ktb[kt_at(d, e, t)] = key ? f32(kr[e]) : 0.f;
              vvb[t * d + e] = key ? f32(vr[e]) : 0.f;
            }
          }
        }
      }
    });
    at::parallel_for(0, nb * nq, 1, [&](int64_t u0, int64_t u1) {
      std::vector<float> S(PB_GROUP * PB_KEYS), qf(PB_GROUP * d);
      std::vector<uint16_t> qb(dp ? PB_GROUP * d : 0), Pb(dp ? PB_GROUP * PB_KEYS : 0);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t j = u / nq, h = u % nq;  // row blocks 0, nb-1, 1, nb-2, ...
        const int64_t blk = j % 2 == 0 ? j / 2 : nb - 1 - j / 2;
        const int64_t kh = kvp[h];
        Group g;
        if (dp) {
          g.kt16 = kt16.data() + kh * d * PB_KEYS, g.vv16 = vv16.data() + kh * PB_KEYS * d;
          g.qb = qb.data(), g.Pb = Pb.data();
        } else {
          g.kt = kt.data() + kh * d * PB_KEYS, g.vv = vv.data() + kh * PB_KEYS * d;
          g.qf = qf.data();
        }
        for (int64_t i0 = blk * PB_ROWS; i0 < std::min(s, (blk + 1) * PB_ROWS); i0 += PB_GROUP) {
          const int64_t R = std::min(PB_GROUP, s - i0);
          for (int64_t r = 0; r < R; ++r) {
            const T* qr = qp + h * qs0 + (i0 + r) * qs1;
            if (dp) std::memcpy(qb.data() + r * d, qr, d * sizeof(T));
            else for (int64_t e = 0; e < d; ++e) qf[r * d + e] = f32(qr[e]) * sc;
          }
          float* mr = m.data() + h * s + i0;
          float* lr = l.data() + h * s + i0;
          float* ar = acc.data() + (h * s + i0) * d;
          switch (R) {
            case 4: prefill_group<4>(p, i0, g, k0, k1, S.data(), mr, lr, ar, sc, cap, mode); break;
            case 3: prefill_group<3>(p, i0, g, k0, k1, S.data(), mr, lr, ar, sc, cap, mode); break;
            case 2: prefill_group<2>(p, i0, g, k0, k1, S.data(), mr, lr, ar, sc, cap, mode); break;
            default: prefill_group<1>(p, i0, g, k0, k1, S.data(), mr, lr, ar, sc, cap, mode); break;
          }
        }
      }
    });
  }
  at::parallel_for(0, nq * s, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      for (int64_t e = 0; e < d; ++e) op[r * d + e] = static_cast<T>(acc[r * d + e] * inv);
    }
  });
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                             const at::Tensor& slots_, const at::Tensor& kv_of_, int64_t q_start,
                             int64_t window, double scale, double softcap) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "prefill_attention: q must be (nq, s, d) with "
              "unit stride in d, got ", q.sizes(), " strides ", q.strides());
  const int64_t nq = q.size(0), s = q.size(1), d = q.size(2);
  check_cache("prefill_attention", q, kc, vc, d);
  TORCH_CHECK(slots_.dim() == 1 && kv_of_.numel() == nq && q_start >= 0 && window >= 0,
              "prefill_attention: slots (L,), kv_of (nq,), q_start >= 0 and window >= 0; got "
              "slots ", slots_.sizes(), ", kv_of of ", kv_of_.numel(), ", q_start ", q_start,
              ", window ", window);
  const auto slots = slots_.to(at::kLong).contiguous();
  const auto kv_of = kv_of_.to(at::kLong).contiguous();
  const int64_t nkv = kc.size(1) / d, L = slots.numel();
  const int64_t* kvp = kv_of.data_ptr<int64_t>();
  for (int64_t h = 0; h < nq; ++h)
    TORCH_CHECK(kvp[h] >= 0 && kvp[h] < nkv, "prefill_attention: query head ", h,
                " reads KV head ", kvp[h], " outside 0..", nkv - 1);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < L; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < kc.size(0), "prefill_attention: key ", t, " names slot ",
                sp[t], " outside the cache's ", kc.size(0));
  auto out = at::empty({nq, s, d}, q.options());
  const Prefill p{s, nq, d, L, nkv, kc.size(1), q_start, window};
  if (q.scalar_type() == at::kFloat)
    prefill<float>(q, kc, vc, slots, kvp, p, scale, softcap, out);
  else
    prefill<c10::BFloat16>(q, kc, vc, slots, kvp, p, scale, softcap, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shardwise, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor table, Tensor lens, "
        "Tensor kv_of, float scale, float softcap) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor kv_of, "
        "int q_start, int window, float scale, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(shardwise, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("prefill_attention", &prefill_attention);
}
