// The greedy pick: each row's largest logit and its first index (torch.max(x, dim=-1)'s answer).
//
// torch's max-with-index over a row of 49,152 logits takes 70-200 us on one core here (it
// carries the index through every comparison); this reads the row twice from cache instead,
// a vectorised max and then the first lane equal to it, ~5 us (benchmarks/RESULTS.md, issue 10).
// A row holding a NaN answers as torch does: the NaN, at its first index.
#include <ATen/ATen.h>  // not torch/extension.h: no Python bindings here, a third of the compile
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "simd.h"

namespace {

using shardwise_simd::f32;
#ifdef __AVX512F__
using shardwise_simd::load16;
#endif

template <typename T>
std::pair<float, int64_t> row_max(const T* x, int64_t n) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  bool nan = false;
#ifdef __AVX512F__
  __m512 m = _mm512_set1_ps(best);
  __mmask16 unordered = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 v = load16(x + i);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, v);
  }
  nan = unordered != 0;
  best = _mm512_reduce_max_ps(m);
#endif
  for (; i < n; ++i) {
    float v = f32(x[i]);
    nan |= std::isnan(v);
    best = v > best ? v : best;
  }
  if (nan) {  // torch's answer: the first NaN
    for (int64_t j = 0; j < n; ++j)
      if (std::isnan(f32(x[j]))) return {f32(x[j]), j};
  }
  int64_t j = 0;
#ifdef __AVX512F__
  const __m512 b = _mm512_set1_ps(best);
  for (; j + 16 <= n; j += 16) {
    __mmask16 eq = _mm512_cmp_ps_mask(load16(x + j), b, _CMP_EQ_OQ);
    if (eq) return {best, j + __builtin_ctz(eq)};
  }
#endif
  for (; j < n; ++j)
    if (f32(x[j]) == best) return {best, j};
  return {best, 0};  // n == 0 is refused before
}

std::tuple<at::Tensor, at::Tensor> row_argmax(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "row_argmax: (rows, n > 0) logits, got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "row_argmax: float32 or bfloat16 logits, got ", x.scalar_type());
  auto xc = x.contiguous();
  const int64_t rows = xc.size(0), n = xc.size(1);
  auto values = at::empty({rows}, xc.options());
  auto indices = at::empty({rows}, xc.options().dtype(at::kLong));
  int64_t* idx = indices.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      if (xc.scalar_type() == at::kFloat) {
        auto [v, i] = row_max(xc.data_ptr<float>() + r * n, n);
        values.data_ptr<float>()[r] = v, idx[r] = i;
      } else {
        auto [v, i] = row_max(xc.data_ptr<at::BFloat16>() + r * n, n);
        values.data_ptr<at::BFloat16>()[r] = static_cast<at::BFloat16>(v), idx[r] = i;
      }
    }
  });
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shardwise, m) {
  m.def("row_argmax(Tensor x) -> (Tensor values, Tensor indices)");
}

TORCH_LIBRARY_IMPL(shardwise, CPU, m) { m.impl("row_argmax", &row_argmax); }
