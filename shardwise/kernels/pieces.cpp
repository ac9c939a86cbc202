// The eager step's elementwise pieces, one pass over their rows each: RMSNorm, SiLU(gate) * up,
// and the rotary embedding. shardwise/models/pieces.py and rope.py define them (and run them
// under autograd, under torch.compile and off the CPU); these run them in eager inference on the
// CPU, where a mixed serving step (prompt chunks beside decodes) otherwise spends ~15% of its time
// in torch's 4-7 operators per piece, each a pass over memory and a dispatch. Each rounds to the
// input dtype where the torch composition rounds, so bf16 results match it up to the last bit of
// an exp or of a sum's order.
#include <ATen/ATen.h>  // not torch/extension.h: no Python bindings here, a third of the compile
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>

#include "simd.h"

namespace {

using shardwise_simd::f32;
#if defined(__AVX512F__)
using shardwise_simd::exp16;
using shardwise_simd::load16;
using shardwise_simd::round16;
using shardwise_simd::store16;
#endif

template <class T>
inline float rnd(float v) { return f32(static_cast<T>(v)); }  // v rounded to T, as fp32

// y = x / rms(x) rounded to T, then times w in T (offset 0: Llama); or x / rms(x) * (offset + w)
// in fp32, then to T (Gemma's offset 1)
template <class T>
void rms_rows(const T* x, const T* w, T* y, int64_t rows, int64_t n, float eps, float offset) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * n;
      T* yr = y + r * n;
      float ss = 0.f;
      int64_t i = 0;
#if defined(__AVX512F__)
      __m512 acc = _mm512_setzero_ps();
      for (; i + 16 <= n; i += 16) {
        const __m512 v = load16(xr + i);
        acc = _mm512_fmadd_ps(v, v, acc);
      }
      ss = _mm512_reduce_add_ps(acc);
#endif
      for (; i < n; ++i) ss += f32(xr[i]) * f32(xr[i]);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
      i = 0;
#if defined(__AVX512F__)
      const __m512 iv = _mm512_set1_ps(inv), ov = _mm512_set1_ps(offset);
      for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_mul_ps(load16(xr + i), iv);
        store16(yr + i, offset != 0.f ? _mm512_mul_ps(v, _mm512_add_ps(ov, load16(w + i)))
                                      : _mm512_mul_ps(load16(w + i), round16(v, xr)));
      }
#endif
      for (; i < n; ++i)
        yr[i] = static_cast<T>(offset != 0.f ? f32(xr[i]) * inv * (offset + f32(w[i]))
                                             : f32(w[i]) * rnd<T>(f32(xr[i]) * inv));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x_, const at::Tensor& w_, double eps, double offset) {
  TORCH_CHECK(x_.device().is_cpu() && x_.scalar_type() == w_.scalar_type() &&
              (x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kBFloat16),
              "rms_norm: CPU float32 or bfloat16 x and weight alike, got ", x_.scalar_type(),
              " and ", w_.scalar_type());
  const int64_t n = x_.size(-1);
  TORCH_CHECK(w_.dim() == 1 && w_.size(0) == n, "rms_norm: weight (", n, ",), got ", w_.sizes());
  const auto x = x_.contiguous();
  const auto w = w_.contiguous();
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t rows = n ? x.numel() / n : 0;
  const float e = static_cast<float>(eps), o = static_cast<float>(offset);
  if (x.scalar_type() == at::kFloat)
    rms_rows<float>(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), rows, n, e, o);
  else
    rms_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), w.data_ptr<c10::BFloat16>(),
                            y.data_ptr<c10::BFloat16>(), rows, n, e, o);
  return y;
}

// out = silu(gate) * up for gate_up (rows, 2 * local): silu = g / (1 + exp(-g)) rounded to T,
// then the product rounded
template <class T>
void silu_mul_rows(const T* gu, T* out, int64_t rows, int64_t local) {
  at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = gu + r * 2 * local;
      const T* u = g + local;
      T* o = out + r * local;
      int64_t i = 0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.f);
      for (; i + 16 <= local; i += 16) {
        const __m512 gv = load16(g + i);
        const __m512 sv = _mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        store16(o + i, _mm512_mul_ps(round16(sv, g), load16(u + i)));
      }
#endif
      for (; i < local; ++i) {
        const float gi = f32(g[i]);
        o[i] = static_cast<T>(rnd<T>(gi / (1.f + std::exp(-gi))) * f32(u[i]));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gu_, int64_t local) {
  TORCH_CHECK(gu_.device().is_cpu() && (gu_.scalar_type() == at::kFloat ||
              gu_.scalar_type() == at::kBFloat16), "silu_mul: CPU float32 or bfloat16, got ",
              gu_.scalar_type());
  TORCH_CHECK(gu_.dim() >= 1 && gu_.size(-1) == 2 * local, "silu_mul: last dimension ",
              gu_.dim() ? gu_.size(-1) : 0, " is not 2 x ", local);
  const auto gu = gu_.contiguous();
  auto sizes = gu.sizes().vec();
  sizes.back() = local;
  auto out = at::empty(sizes, gu.options());
  const int64_t rows = local ? gu.numel() / (2 * local) : 0;
  if (gu.scalar_type() == at::kFloat)
    silu_mul_rows<float>(gu.data_ptr<float>(), out.data_ptr<float>(), rows, local);
  else
    silu_mul_rows<c10::BFloat16>(gu.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(),
                                 rows, local);
  return out;
}

// Rotary embedding of x (b, h, s, d), unit stride in d, by cos, sin (b or 1, 1, s, d): the pairs
// (x_j, x_{j + d/2}) rotated, x cos + rot(x) sin, each product rounded to T and then the sum (the
// torch composition's roundings). The result is laid out (b, s, h, d), what the KV cache's rows
// and the heads' merge read, and returned as its (b, h, s, d) view.
template <class T>
void rope_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  const int64_t b = x.size(0), h = x.size(1), s = x.size(2), d = x.size(3), half = d / 2;
  const T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  const int64_t cs0 = cos.size(0) == 1 ? 0 : cos.stride(0), cs2 = cos.stride(2);
  const int64_t ss0 = sin.size(0) == 1 ? 0 : sin.stride(0), ss2 = sin.stride(2);
  at::parallel_for(0, b * s, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bi = t / s, si = t % s;
      const T* c = cp + bi * cs0 + si * cs2;
      const T* sn = sp + bi * ss0 + si * ss2;
      for (int64_t hi = 0; hi < h; ++hi) {
        const T* xr = xp + bi * xs0 + hi * xs1 + si * xs2;
        T* o = op + (t * h + hi) * d;
        int64_t j = 0;
#if defined(__AVX512F__)
        if (half % 16 == 0) {
          for (; j < half; j += 16) {  // o_j = x_j c_j - x_{j+half} s_j; o_{j+half} = x_{j+half} c + x_j s
            const __m512 lo = load16(xr + j), hi_ = load16(xr + j + half);
            const __m512 a0 = round16(_mm512_mul_ps(lo, load16(c + j)), xr);
            const __m512 r0 = round16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), hi_), load16(sn + j)), xr);
            store16(o + j, _mm512_add_ps(a0, r0));
            const __m512 a1 = round16(_mm512_mul_ps(hi_, load16(c + j + half)), xr);
            const __m512 r1 = round16(_mm512_mul_ps(lo, load16(sn + j + half)), xr);
            store16(o + j + half, _mm512_add_ps(a1, r1));
          }
          continue;
        }
#endif
        for (; j < half; ++j) {
          o[j] = static_cast<T>(rnd<T>(f32(xr[j]) * f32(c[j])) + rnd<T>(-f32(xr[j + half]) * f32(sn[j])));
          o[j + half] = static_cast<T>(rnd<T>(f32(xr[j + half]) * f32(c[j + half])) +
                                       rnd<T>(f32(xr[j]) * f32(sn[j + half])));
        }
      }
    }
  });
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos_, const at::Tensor& sin_) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0,
              "rope: x (b, h, s, d) with unit stride in an even d, got ", x.sizes());
  const int64_t b = x.size(0), h = x.size(1), s = x.size(2), d = x.size(3);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == cos_.scalar_type() &&
              x.scalar_type() == sin_.scalar_type() &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "rope: CPU float32 or bfloat16 x, cos and sin alike");
  TORCH_CHECK(cos_.dim() == 4 && cos_.sizes() == sin_.sizes() &&
              (cos_.size(0) == 1 || cos_.size(0) == b) && cos_.size(1) == 1 &&
              cos_.size(2) == s && cos_.size(3) == d,
              "rope: cos, sin (b or 1, 1, s, d) for x ", x.sizes(), ", got ", cos_.sizes());
  const auto cos = cos_.stride(3) == 1 ? cos_ : cos_.contiguous();
  const auto sin = sin_.stride(3) == 1 ? sin_ : sin_.contiguous();
  auto out = at::empty({b, s, h, d}, x.options());
  if (x.scalar_type() == at::kFloat)
    rope_rows<float>(x, cos, sin, out);
  else
    rope_rows<c10::BFloat16>(x, cos, sin, out);
  return out.permute({0, 2, 1, 3});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shardwise, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, float offset) -> Tensor");
  m.def("silu_mul(Tensor gate_up, int local) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(shardwise, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope", &rope);
}
