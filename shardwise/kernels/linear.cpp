// shardwise::linear -- y = x W^T (+ b) for the few rows of a decode step, streaming W once.
//
// A decode step multiplies a few activation rows by every weight matrix: the time is the
// weights' bytes over the memory bandwidth, and a general GEMM (MKL, oneDNN) pays for packing,
// blocking and dispatch it cannot amortise. This kernel streams 16 rows of W at once (one
// stream cannot keep enough loads in flight to reach the bandwidth; 16 can), multiplies each
// block of 16 rows by every input row while it sits in L1 (input rows in passes of MB = 4, with
// 16 accumulators in registers), and splits W's rows over the intra-op threads in contiguous
// ranges.
//
//   fp32: 16 lanes per FMA (AVX-512F), fp32 accumulation;
//   bf16: 32 products per instruction (AVX512-BF16 dot products), fp32 accumulation, one
//         rounding of the result to bf16 (as oneDNN's bf16 matmul).
//
// Shapes: x (..., K) contiguous, W (N, K) contiguous, b (N) or none -> y (..., N). Other
// dtypes, layouts or CPUs without the instructions fall back to at::linear.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int BLOCK = 16;  // weight rows per unit of work (threads split these)
constexpr int MB = 4;      // input rows per pass

#if defined(__AVX512F__)
struct F32 {  // 16 fp32 products per FMA
  using T = float;
  using In = __m512;
  static constexpr int V = 16;
  static In load(const T* p) { return _mm512_loadu_ps(p); }
  static In load(int64_t n, const T* p) {
    return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
  }
  static __m512 fma(__m512 acc, In w, In x) { return _mm512_fmadd_ps(w, x, acc); }
  static float value(T v) { return v; }
  static T store(float v) { return v; }
};
#endif

#if defined(__AVX512BF16__)
struct BF16 {  // 32 bf16 products per dot-product instruction, fp32 sums
  using T = uint16_t;
  using In = __m512bh;
  static constexpr int V = 32;
  static In load(const T* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static In load(int64_t n, const T* p) {
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p);
  }
  static __m512 fma(__m512 acc, In w, In x) { return _mm512_dpbf16_ps(acc, w, x); }
  static float value(T v) {
    uint32_t u = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static T store(float v) { return c10::BFloat16(v).x; }  // round to nearest even
};
#endif

// The 16 sums of 16 vectors: lane i of the result = sum of a[i]'s lanes (a transpose-and-add
// tree: 45 shuffles and adds instead of 16 full reductions of ~10 instructions each).
inline __m512 reduce16(const __m512* a) {
  __m512 p[8], q[4], r[2];
  for (int j = 0; j < 8; ++j)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    p[j] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * j], a[2 * j + 1]),
                         _mm512_unpackhi_ps(a[2 * j], a[2 * j + 1]));
  for (int j = 0; j < 4; ++j) {  // per 128-bit lane: rows 4j..4j+3, that lane's partial sums
    const __m512d x = _mm512_castps_pd(p[2 * j]), y = _mm512_castps_pd(p[2 * j + 1]);
    q[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int j = 0; j < 2; ++j)  // [q0.L0+L1, q0.L2+L3, q1.L0+L1, q1.L2+L3]
    r[j] = _mm512_add_ps(_mm512_shuffle_f32x4(q[2 * j], q[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(q[2 * j], q[2 * j + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(r[0], r[1], 0x88),
                       _mm512_shuffle_f32x4(r[0], r[1], 0xDD));
}

// y[r * ldy + i] = sum_k x[r * K + k] w[i * K + k] (+ bias[i]) for r < R, i < NR. NR weight
// rows stream at once (memory-level parallelism: 16 streams reach the bandwidth a single
// stream cannot); NR x R accumulators stay in registers (everything unrolled at compile time).
template <class A, int NR, int R>
inline void tile(const typename A::T* x, int64_t K, const typename A::T* w, typename A::T* y,
                 int64_t ldy, const typename A::T* bias) {
  __m512 acc[NR][R];
#pragma GCC unroll 16
  for (int i = 0; i < NR * R; ++i) acc[i / R][i % R] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + A::V <= K; k += A::V) {
    typename A::In xv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) xv[r] = A::load(x + r * K + k);
#pragma GCC unroll 16
    for (int i = 0; i < NR; ++i) {
      const typename A::In wv = A::load(w + i * K + k);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[i][r] = A::fma(acc[i][r], wv, xv[r]);
    }
  }
  if (k < K) {
    typename A::In xv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) xv[r] = A::load(K - k, x + r * K + k);
#pragma GCC unroll 16
    for (int i = 0; i < NR; ++i) {
      const typename A::In wv = A::load(K - k, w + i * K + k);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[i][r] = A::fma(acc[i][r], wv, xv[r]);
    }
  }
  if constexpr (NR == 16 && R == 1) {
    alignas(64) float sums[16];
    __m512 a16[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) a16[i] = acc[i][0];
    _mm512_store_ps(sums, reduce16(a16));
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) y[i] = A::store(sums[i] + (bias ? A::value(bias[i]) : 0.f));
    return;
  }
#pragma GCC unroll 16
  for (int i = 0; i < NR * R; ++i)
    y[(i % R) * ldy + i / R] = A::store(_mm512_reduce_add_ps(acc[i / R][i % R]) +
                                        (bias ? A::value(bias[i / R]) : 0.f));
}

// rows <= BLOCK weight rows times R input rows: the widest tiles that keep 16 accumulators
template <class A, int R>
void rows_times(const typename A::T* x, int64_t K, const typename A::T* w, int64_t rows,
                typename A::T* y, int64_t ldy, const typename A::T* bias) {
  constexpr int NR = R == 1 ? 16 : R == 2 ? 8 : 4;
  int64_t i = 0;
  for (; i + NR <= rows; i += NR)
    tile<A, NR, R>(x, K, w + i * K, y + i, ldy, bias ? bias + i : nullptr);
  for (; i + 4 <= rows; i += 4)
    tile<A, 4, R>(x, K, w + i * K, y + i, ldy, bias ? bias + i : nullptr);
  for (; i < rows; ++i)
    tile<A, 1, R>(x, K, w + i * K, y + i, ldy, bias ? bias + i : nullptr);
}

template <class A>
void product(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
             at::Tensor& y) {
  using T = typename A::T;
  const int64_t K = w.size(1), N = w.size(0), M = x.numel() / K;
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* wp = reinterpret_cast<const T*>(w.data_ptr());
  const T* bp = b ? reinterpret_cast<const T*>(b->data_ptr()) : nullptr;
  T* yp = reinterpret_cast<T*>(y.data_ptr());
  // contiguous ranges of W's rows per thread; each block of rows times every input row
  at::parallel_for(0, (N + BLOCK - 1) / BLOCK, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n = blk * BLOCK, rows = std::min<int64_t>(BLOCK, N - n);
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const T* xr = xp + m0 * K;
        const T* wr = wp + n * K;
        T* yr = yp + m0 * N + n;
        const T* br = bp ? bp + n : nullptr;
        switch (std::min<int64_t>(MB, M - m0)) {
          case 1: rows_times<A, 1>(xr, K, wr, rows, yr, N, br); break;
          case 2: rows_times<A, 2>(xr, K, wr, rows, yr, N, br); break;
          case 3: rows_times<A, 3>(xr, K, wr, rows, yr, N, br); break;
          default: rows_times<A, 4>(xr, K, wr, rows, yr, N, br); break;
        }
      }
    }
  });
}

bool usable(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  if (x.device().type() != c10::kCPU || w.device().type() != c10::kCPU) return false;
  if (x.scalar_type() != w.scalar_type() || w.dim() != 2 || !w.is_contiguous()) return false;
  if (x.size(-1) != w.size(1) || x.numel() == 0) return false;
  if (b && (b->scalar_type() != w.scalar_type() || !b->is_contiguous())) return false;
#if defined(__AVX512F__)
  if (x.scalar_type() == at::kFloat) return true;
#endif
#if defined(__AVX512BF16__)
  if (x.scalar_type() == at::kBFloat16) return true;
#endif
  return false;
}

at::Tensor linear(const at::Tensor& x_, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  if (!usable(x_, w, b)) return at::linear(x_, w, b);
  const auto x = x_.contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() = w.size(0);
  auto y = at::empty(sizes, x.options());
#if defined(__AVX512F__)
  if (x.scalar_type() == at::kFloat) {
    product<F32>(x, w, b, y);
    return y;
  }
#endif
#if defined(__AVX512BF16__)
  product<BF16>(x, w, b, y);
#endif
  return y;
}

bool supported(c10::ScalarType dtype) {
#if defined(__AVX512F__)
  if (dtype == at::kFloat) return true;
#endif
#if defined(__AVX512BF16__)
  if (dtype == at::kBFloat16) return true;
#endif
  return false;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shardwise, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def("linear_supported(ScalarType dtype) -> bool", &supported);
}

TORCH_LIBRARY_IMPL(shardwise, CPU, m) { m.impl("linear", &linear); }
