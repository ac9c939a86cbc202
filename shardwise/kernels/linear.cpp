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
//         rounding of the result to bf16 (as oneDNN's bf16 matmul); with 4 rows or more, on
//         AMX tiles where the CPU has them (the tiled layout is their operand as it lies: below).
//
// Shapes: x (..., K) contiguous, W (N, K) contiguous, b (N) or none -> y (..., N). Other
// dtypes, layouts or CPUs without the instructions fall back to at::linear.
#include <ATen/ATen.h>  // not torch/extension.h: no Python bindings here, a third of the compile
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <sys/syscall.h>
#include <unistd.h>
#include <type_traits>
#include <vector>

#include "simd.h"
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
  static constexpr int TMB = 8;  // input rows per pass over cached tiles (measured best)
  static constexpr bool AHEAD = false;  // two units of fp32 tiles overflow L2 (see Ahead)
  static In load(const T* p) { return _mm512_loadu_ps(p); }
  static In load(int64_t n, const T* p) {
    return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
  }
  static __m512 fma(__m512 acc, In w, In x) { return _mm512_fmadd_ps(w, x, acc); }
  static In bcast(const T* p) { return _mm512_set1_ps(*p); }
  static float value(T v) { return v; }
  static T store(float v) { return v; }
};
#endif

#if defined(__AVX512BF16__)
struct BF16 {  // 32 bf16 products per dot-product instruction, fp32 sums
  using T = uint16_t;
  using In = __m512bh;
  static constexpr int V = 32;
  static constexpr int TMB = 4;
  static constexpr bool AHEAD = true;
  static In load(const T* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static In load(int64_t n, const T* p) {
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p);
  }
  static __m512 fma(__m512 acc, In w, In x) { return _mm512_dpbf16_ps(acc, w, x); }
  static In bcast(const T* p) {  // the column pair (p[0], p[1]) in every 32-bit lane
    uint32_t pair;
    std::memcpy(&pair, p, 4);
    return (__m512bh)_mm512_set1_epi32(pair);
  }
  static float value(T v) {
    uint32_t u = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  static T store(float v) { return c10::BFloat16(v).x; }  // round to nearest even
};
#endif

bool supported(c10::ScalarType dtype) {
#if defined(__AVX512F__)
  if (dtype == at::kFloat) return true;
#endif
#if defined(__AVX512BF16__)
  if (dtype == at::kBFloat16) return true;
#endif
  return false;
}

#if defined(__AVX512F__)  // the kernels below: AVX-512 only (else at::linear)
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


constexpr int64_t PREFETCH = 256;  // bytes ahead in each tile's stream
// ---- the tiled layout: one contiguous stream per thread -------------------------------------
//
// W laid out in tiles of 16 rows, column-major inside: fp32 (N/16, K, 16), bf16 (N/16, K/2, 32)
// (a column pair per row: the operand layout of a bf16 dot product). One 64-byte load is one
// (pair of) column(s) of 16 rows, the 16 lanes are output rows: no horizontal sums, and each
// thread's range of tiles is a single sequential stream for the prefetchers (row-major rows are
// 16 short streams per tile, which bf16's 1 KiB rows leave too short to reach the bandwidth).
//
// The next unit of tiles, fetched into L2 a line per column-pair step of the passes that read
// the current unit from cache (the second pass on), so the stream from memory overlaps the
// arithmetic instead of preceding it: bf16 1.03x at 8 rows, 1.07-1.09x at 16-32 (interleaved in
// one process). Not for fp32: its unit is twice the bytes (442 KiB at K = 576), and two units
// overflow L2 (measured 1.00x at 8-16 rows, 0.97x at 32).
struct Ahead {
  const char* p = nullptr;
  const char* end = nullptr;
  bool on = false;  // in a pass that reads the current unit from cache
};

// GLU: the tiles come in (gate, up) pairs of the same 16 columns (tile 2i gate, 2i + 1 up) and
// the output is SwiGLU's silu(gate) * up, 16 columns a pair, rounded where the unfused pair of
// operators rounds (the product's outputs, silu, the product: shardwise::silu_mul). Against that
// pair: no second pass over the (rows, 2 x local) product, and half its output written: 1.09x
// the prefill of 128 tokens of SmolLM2 in bf16, 1.10-1.12x in fp32 (RESULTS.md, issue 10).
template <class A, int NT, int R, bool GLU = false>
inline void ttiles(const typename A::T* x, int64_t K, const typename A::T* w, int64_t t,
                   typename A::T* y, int64_t ldy, const typename A::T* bias, Ahead& ah) {
  static_assert(!GLU || NT % 2 == 0, "GLU tiles come in pairs");
  constexpr int P = A::V / 16;           // columns per lane: 1 (fp32) or 2 (bf16 pairs)
  constexpr int H = NT * R >= 8 ? 1 : 2; // accumulator chains per output vector (FMA latency)
  const int64_t tile = K * 16;           // elements per tile
  __m512 acc[NT][R][H];
#pragma GCC unroll 32
  for (int i = 0; i < NT * R * H; ++i) acc[i / (R * H)][(i / H) % R][i % H] = _mm512_setzero_ps();
  // columns (pairs) k + h * P for h < HS, each from every tile, times every row
  auto step = [&](int64_t k, auto hs) {
    constexpr int HS = decltype(hs)::value;
#pragma GCC unroll 2
    for (int h = 0; h < HS; ++h) {
      typename A::In xv[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) xv[r] = A::bcast(x + r * K + k + h * P);
#pragma GCC unroll 8
      for (int u = 0; u < NT; ++u) {
        const typename A::T* wp = w + (t + u) * tile + (k + h * P) * 16;
        if (h == 0) _mm_prefetch(reinterpret_cast<const char*>(wp) + PREFETCH, _MM_HINT_T0);
        if (h == 0 && u == 0 && ah.on && ah.p < ah.end) {
          _mm_prefetch(ah.p, _MM_HINT_T1);
          ah.p += 64;
        }
        const typename A::In wv = A::load(wp);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[u][r][h % H] = A::fma(acc[u][r][h % H], wv, xv[r]);
      }
    }
  };
  int64_t k = 0;
  for (; k + 2 * P <= K; k += 2 * P) step(k, std::integral_constant<int, 2>{});
  if (k < K) step(k, std::integral_constant<int, 1>{});  // an odd count of columns (pairs)
  if constexpr (GLU) {
    using namespace shardwise_simd;
    using E = std::conditional_t<std::is_same_v<typename A::T, float>, float, c10::BFloat16>;
    const E* tag = nullptr;  // the element type, for rounding
    const __m512 one = _mm512_set1_ps(1.f);
#pragma GCC unroll 4
    for (int u = 0; u < NT; u += 2)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        __m512 g = acc[u][r][0], v = acc[u + 1][r][0];
        if constexpr (H == 2) {
          g = _mm512_add_ps(g, acc[u][r][1]);
          v = _mm512_add_ps(v, acc[u + 1][r][1]);
        }
        if (bias) {
          g = _mm512_add_ps(g, load16(reinterpret_cast<const E*>(bias + (t + u) * 16)));
          v = _mm512_add_ps(v, load16(reinterpret_cast<const E*>(bias + (t + u + 1) * 16)));
        }
        g = round16(g, tag);
        v = round16(v, tag);
        const __m512 act = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(
            _mm512_setzero_ps(), g))));
        store16(reinterpret_cast<E*>(y + r * ldy + (t + u) / 2 * 16),
                _mm512_mul_ps(round16(act, tag), v));
      }
    return;
  }
#pragma GCC unroll 8
  for (int u = 0; u < NT; ++u)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      alignas(64) float out[16];
      __m512 a = acc[u][r][0];
      if constexpr (H == 2) a = _mm512_add_ps(a, acc[u][r][H - 1]);
      _mm512_store_ps(out, a);
      typename A::T* yr = y + r * ldy + (t + u) * 16;
      const typename A::T* br = bias ? bias + (t + u) * 16 : nullptr;
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) yr[i] = A::store(out[i] + (br ? A::value(br[i]) : 0.f));
    }
}

template <class A, int R, bool GLU>
void tpass(const typename A::T* x, int64_t K, const typename A::T* w, int64_t t0, int64_t t1,
           typename A::T* y, int64_t ldy, const typename A::T* bias, Ahead& ah) {
  // tiles streamed at once, registers permitting (NT x R accumulators of 32); GLU's in pairs
  constexpr int NT0 = R == 1 ? 8 : R == 2 ? 4 : R <= 4 ? 2 : 3;
  constexpr int NT = GLU && NT0 % 2 ? NT0 - 1 : NT0;
  int64_t t = t0;
  for (; t + NT <= t1; t += NT) ttiles<A, NT, R, GLU>(x, K, w, t, y, ldy, bias, ah);
  if constexpr (NT > 4)
    for (; t + 4 <= t1; t += 4) ttiles<A, 4, R, GLU>(x, K, w, t, y, ldy, bias, ah);
  if constexpr (NT > 2)
    for (; t + 2 <= t1; t += 2) ttiles<A, 2, R, GLU>(x, K, w, t, y, ldy, bias, ah);
  if constexpr (!GLU)  // (GLU ranges are whole pairs)
    for (; t < t1; ++t) ttiles<A, 1, R>(x, K, w, t, y, ldy, bias, ah);
}

template <class A, bool GLU = false>
void tproduct(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
              at::Tensor& y) {
  using T = typename A::T;
  // N: the output's width (GLU: one column per (gate, up) pair of weight rows)
  const int64_t T16 = w.size(0), N = T16 * 16 / (GLU ? 2 : 1), K = x.size(-1),
                M = x.numel() / K;
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* wp = reinterpret_cast<const T*>(w.data_ptr());
  const T* bp = b ? reinterpret_cast<const T*>(b->data_ptr()) : nullptr;
  T* yp = reinterpret_cast<T*>(y.data_ptr());
  // Contiguous ranges of tiles per thread, as even as whole tiles allow (a split in units
  // would leave a 36-tile weight, o_proj's and down_proj's at SmolLM2's width, 24 tiles on one
  // thread and 12 on the other: 1.33x the time of the even split). With more rows than one
  // pass takes, a range is walked in units of UNIT tiles: a unit streams from memory once, then
  // serves every input row (in passes of up to TMB) from cache. With one pass (decode) there is
  // nothing to reuse and the range is one unit, so that the widest tile groups (8 streams) run
  // to its end rather than to each unit's (12 = 8 + 2 + 2: a third of the bytes at 2 streams):
  // bf16 1.06-1.10x the layers' products of SmolLM2 at one row, fp32 0.98-1.04x.
  constexpr int64_t UNIT = 12;
  const bool one_pass = M <= A::TMB;
  constexpr int64_t S = GLU ? 2 : 1;  // tiles per unit of the split: GLU's ranges whole pairs
  at::parallel_for(0, T16 / S, 1, [&](int64_t p0, int64_t p1) {
    const int64_t r0 = p0 * S, r1 = p1 * S;
    const int64_t unit = one_pass ? r1 - r0 : UNIT;
    for (int64_t t0 = r0; t0 < r1; t0 += unit) {
      const int64_t t1 = std::min<int64_t>(r1, t0 + unit);
      Ahead ah;  // the next unit of this thread's range, if any
      if (t1 < r1) {
        ah.p = reinterpret_cast<const char*>(wp + t1 * K * 16);
        ah.end = reinterpret_cast<const char*>(wp + std::min<int64_t>(r1, t1 + UNIT) * K * 16);
      }
      for (int64_t m0 = 0; m0 < M; m0 += A::TMB) {
        ah.on = A::AHEAD && m0 > 0;
        const T* xr = xp + m0 * K;
        T* yr = yp + m0 * N;
        switch (std::min<int64_t>(A::TMB, M - m0)) {
          case 1: tpass<A, 1, GLU>(xr, K, wp, t0, t1, yr, N, bp, ah); break;
          case 2: tpass<A, 2, GLU>(xr, K, wp, t0, t1, yr, N, bp, ah); break;
          case 3: tpass<A, 3, GLU>(xr, K, wp, t0, t1, yr, N, bp, ah); break;
          case 4: tpass<A, 4, GLU>(xr, K, wp, t0, t1, yr, N, bp, ah); break;
          case 5: tpass<A, 5, GLU>(xr, K, wp, t0, t1, yr, N, bp, ah); break;
          case 6: tpass<A, 6, GLU>(xr, K, wp, t0, t1, yr, N, bp, ah); break;
          case 7: tpass<A, 7, GLU>(xr, K, wp, t0, t1, yr, N, bp, ah); break;
          default: tpass<A, 8, GLU>(xr, K, wp, t0, t1, yr, N, bp, ah); break;
        }
      }
    }
  });
}


// ---- AMX: bf16 products of many rows on the tile unit ----------------------------------------
//
// The bf16 tiled layout is exactly AMX's B operand: a tile's 16 pairs of columns x 16 rows is
// one 16-row, 64-byte tile register (VNNI pairs), 1 KiB contiguous. With enough input rows to
// fill A tiles (16 rows x 32 columns), TDPBF16PS does 16x16x32 products an instruction where
// AVX512-BF16 does 16x2: a prefill or a batch of sequences is compute-bound on AVX-512 and not
// on the tiles. Blocking: 2 A tiles (32 input rows) x 2 B tiles (two weight tiles: a SwiGLU
// gate/up pair) into 4 C tiles of fp32 sums; a thread walks its range of weight tiles a pair at
// a time and every 32 input rows against that pair (the pair, 2 x 16 x K bf16, stays in L2; the
// inputs, read once a pair, too). fp32 sums, rounded once to bf16 with the bias, as the
// AVX-512 path (the order of the sums differs: results within bf16's rounding of it).
// Needs the kernel's permission for the tile state (arch_prctl, once a process); without it,
// switched off (SHARDWISE_AMX=0 in the environment, or shardwise::set_linear_amx), with fewer
// than AMX_MIN_ROWS rows, or K not a multiple of 32, the AVX-512 path runs.
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define SHARDWISE_AMX 1
// Fewer rows: the AVX-512 path. SmolLM2's 121 products in bf16 on a 2-core Xeon with AMX
// (benchmarks/amx_bench.py), tiles against AVX-512: 0.80x at 1 row, 0.92x at 2, 1.11-1.16x at
// 4, 1.5x at 8, 2.5-3.1x at 16, 4.2x at 32, 6.6-6.8x at 128 (RESULTS.md, issue 10).
constexpr int64_t AMX_MIN_ROWS = 4;

// the kernel's permission for the tile state (asked once a process)
bool amx_permitted() {
  static const bool ok = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

// on unless SHARDWISE_AMX=0 in the environment; set_linear_amx switches it (for comparisons)
std::atomic<bool>& amx_switch() {
  static std::atomic<bool> on{[] {
    const char* env = std::getenv("SHARDWISE_AMX");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }()};
  return on;
}

bool amx_usable() { return amx_switch().load(std::memory_order_relaxed) && amx_permitted(); }

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0-1: A (16 input rows x 32 bf16), tmm2-3: B (16 column pairs x 16 weight rows), tmm4-7: C
// (16 x 16 fp32). Loaded through an asm memory operand: GCC 12's dead-store elimination drops
// the configuration's stores before the _tile_loadconfig builtin (llama.cpp's SIGILL).
inline void amx_configure() {
  TileConfig c;
  for (int i = 0; i < 8; ++i) {
    c.rows[i] = 16;
    c.colsb[i] = 64;
  }
  asm volatile("ldtilecfg %0" : : "m"(c) : "memory");
}

// rows x 16 fp32 sums (a stored C tile) -> bf16 outputs, bias added, rounded once
inline void amx_emit(const float* c, int64_t rows, uint16_t* y, int64_t ldy, const uint16_t* bias) {
  using namespace shardwise_simd;
  const __m512 b = bias ? load16(reinterpret_cast<const c10::BFloat16*>(bias)) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r)
    store16(reinterpret_cast<c10::BFloat16*>(y + r * ldy), _mm512_add_ps(_mm512_load_ps(c + r * 16), b));
}

// SwiGLU of a (gate, up) pair of C tiles, rounded where the AVX-512 path rounds
inline void amx_emit_glu(const float* g, const float* u, int64_t rows, uint16_t* y, int64_t ldy,
                         const uint16_t* bg, const uint16_t* bu) {
  using namespace shardwise_simd;
  const c10::BFloat16* tag = nullptr;
  const __m512 one = _mm512_set1_ps(1.f);
  const __m512 gb = bg ? load16(reinterpret_cast<const c10::BFloat16*>(bg)) : _mm512_setzero_ps();
  const __m512 ub = bu ? load16(reinterpret_cast<const c10::BFloat16*>(bu)) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 gv = round16(_mm512_add_ps(_mm512_load_ps(g + r * 16), gb), tag);
    const __m512 uv = round16(_mm512_add_ps(_mm512_load_ps(u + r * 16), ub), tag);
    const __m512 act = _mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_sub_ps(
        _mm512_setzero_ps(), gv))));
    store16(reinterpret_cast<c10::BFloat16*>(y + r * ldy), _mm512_mul_ps(round16(act, tag), uv));
  }
}

// weight tiles [t0, t1) times all M input rows (x: M rounded up to 16 rows, K % 32 == 0)
template <bool GLU>
void amx_range(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t t0, int64_t t1,
               uint16_t* y, int64_t N, const uint16_t* bias) {
  amx_configure();
  const int64_t tile = K * 16, lda = K * 2;  // elements per weight tile; bytes per input row
  alignas(64) float c[4][256];
  for (int64_t t = t0; t < t1; t += 2) {
    const bool two = t + 1 < t1;  // (GLU ranges are whole pairs)
    const uint16_t* b0 = w + t * tile;
    const uint16_t* b1 = w + (t + 1) * tile;
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
      const bool m2 = m0 + 16 < M;
      const uint16_t* a0 = x + m0 * K;
      const uint16_t* a1 = a0 + 16 * K;
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      _tile_zero(7);
      if (two && m2) {
        for (int64_t k = 0; k < K; k += 32) {
          _tile_loadd(2, b0 + k * 16, 64);
          _tile_loadd(3, b1 + k * 16, 64);
          _tile_loadd(0, a0 + k, lda);
          _tile_loadd(1, a1 + k, lda);
          _tile_dpbf16ps(4, 0, 2);
          _tile_dpbf16ps(5, 0, 3);
          _tile_dpbf16ps(6, 1, 2);
          _tile_dpbf16ps(7, 1, 3);
        }
      } else {
        for (int64_t k = 0; k < K; k += 32) {
          _tile_loadd(2, b0 + k * 16, 64);
          _tile_loadd(0, a0 + k, lda);
          _tile_dpbf16ps(4, 0, 2);
          if (two) {
            _tile_loadd(3, b1 + k * 16, 64);
            _tile_dpbf16ps(5, 0, 3);
          }
          if (m2) {
            _tile_loadd(1, a1 + k, lda);
            _tile_dpbf16ps(6, 1, 2);
          }
        }
      }
      _tile_stored(4, c[0], 64);
      _tile_stored(5, c[1], 64);
      _tile_stored(6, c[2], 64);
      _tile_stored(7, c[3], 64);
      const int64_t r0 = std::min<int64_t>(16, M - m0), r1 = m2 ? std::min<int64_t>(16, M - m0 - 16) : 0;
      if constexpr (GLU) {
        uint16_t* yo = y + m0 * N + t / 2 * 16;
        const uint16_t* bg = bias ? bias + t * 16 : nullptr;
        const uint16_t* bu = bias ? bias + (t + 1) * 16 : nullptr;
        amx_emit_glu(c[0], c[1], r0, yo, N, bg, bu);
        amx_emit_glu(c[2], c[3], r1, yo + 16 * N, N, bg, bu);
      } else {
        uint16_t* yo = y + m0 * N + t * 16;
        amx_emit(c[0], r0, yo, N, bias ? bias + t * 16 : nullptr);
        amx_emit(c[2], r1, yo + 16 * N, N, bias ? bias + t * 16 : nullptr);
        if (two) {
          amx_emit(c[1], r0, yo + 16, N, bias ? bias + (t + 1) * 16 : nullptr);
          amx_emit(c[3], r1, yo + 16 * N + 16, N, bias ? bias + (t + 1) * 16 : nullptr);
        }
      }
    }
  }
  _tile_release();
}

template <bool GLU>
void amx_product(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                 at::Tensor& y) {
  const int64_t T16 = w.size(0), N = T16 * 16 / (GLU ? 2 : 1), K = x.size(-1), M = x.numel() / K;
  at::Tensor xp = x;
  if (M % 16) {  // A tiles read 16 rows: the last ones padded with zeros
    xp = at::zeros({(M + 15) / 16 * 16, K}, x.options());
    xp.narrow(0, 0, M).copy_(x.reshape({M, K}));
  }
  const auto* xa = reinterpret_cast<const uint16_t*>(xp.data_ptr());
  const auto* wa = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const auto* ba = b ? reinterpret_cast<const uint16_t*>(b->data_ptr()) : nullptr;
  auto* ya = reinterpret_cast<uint16_t*>(y.data_ptr());
  // contiguous ranges of tile pairs per thread, as even as whole pairs allow
  at::parallel_for(0, (T16 + 1) / 2, 1, [&](int64_t p0, int64_t p1) {
    amx_range<GLU>(xa, M, K, wa, p0 * 2, std::min<int64_t>(T16, p1 * 2), ya, N, ba);
  });
}
#endif  // AMX

#endif  // __AVX512F__

// ---- the machine's read rate ----------------------------------------------------------------
// The sum of a large fp32 tensor, each thread its contiguous range read as STREAMS interleaved
// sequential streams with software prefetch: what the memory delivers to reads, for judging the
// products against (shardwise.bench.decode.read_bandwidth). One stream per thread is not enough
// everywhere: on a 2-core Xeon (Sapphire Rapids class) one stream a thread reads 19 GB/s (as
// torch's sum does), 4 streams 29-31, 8-16 streams 32-34; on the AMD EPYC of rounds 8-10 torch's
// sum already read at a native stream's rate.
double stream_sum(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "stream_sum: a contiguous fp32 CPU tensor");
  constexpr int STREAMS = 16;
  constexpr int64_t AHEAD = 1024;  // bytes
  const float* p = x.data_ptr<float>();
  const int64_t n = x.numel();
  std::vector<double> part(at::get_num_threads(), 0.0);
#if defined(__AVX512F__)
  at::parallel_for(0, n / 16, 1, [&](int64_t b0, int64_t b1) {
    const int64_t len = (b1 - b0) / STREAMS;  // vectors of 16 per stream
    __m512 acc[STREAMS];
    for (int s = 0; s < STREAMS; ++s) acc[s] = _mm512_setzero_ps();
    const float* base = p + b0 * 16;
    for (int64_t i = 0; i < len; ++i) {
#pragma GCC unroll 16
      for (int s = 0; s < STREAMS; ++s) {
        const float* q = base + (s * len + i) * 16;
        _mm_prefetch(reinterpret_cast<const char*>(q) + AHEAD, _MM_HINT_T0);
        acc[s] = _mm512_add_ps(acc[s], _mm512_loadu_ps(q));
      }
    }
    double t = 0;
    for (int s = 0; s < STREAMS; ++s) t += _mm512_reduce_add_ps(acc[s]);
    for (int64_t j = (b0 + STREAMS * len) * 16; j < b1 * 16; ++j) t += p[j];  // the rest
    part[at::get_thread_num()] += t;
  });
  for (int64_t j = n / 16 * 16; j < n; ++j) part[0] += p[j];
#else
  for (int64_t j = 0; j < n; ++j) part[0] += p[j];
#endif
  double total = 0;
  for (double v : part) total += v;
  return total;
}

// fn(F32{}) or fn(BF16{}) by the dtype (one this CPU supports: checked by the caller)
template <class Fn>
void by_dtype(c10::ScalarType dt, Fn&& fn) {
#if defined(__AVX512F__)
  if (dt == at::kFloat) return fn(F32{});
#endif
#if defined(__AVX512BF16__)
  if (dt == at::kBFloat16) return fn(BF16{});
#endif
}

// linear_tiled, or with GLU its SwiGLU form: silu(x W_gate^T + b_gate) * (x W_up^T + b_up) of a
// tiled weight whose tiles alternate gate, up (Tiled's SwiGLU form), (..., K) -> (..., N / 2), as
// linear_tiled then silu_mul but in one pass
template <bool GLU>
at::Tensor tiled_product(const at::Tensor& x_, const at::Tensor& w,
                         const c10::optional<at::Tensor>& b) {
  const char* name = GLU ? "linear_tiled_swiglu" : "linear_tiled";
  const auto dt = x_.scalar_type();
  const int64_t K = x_.size(-1), P = dt == at::kBFloat16 ? 2 : 1;
  TORCH_CHECK(x_.device().is_cpu() && w.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(supported(dt) && w.scalar_type() == dt, name,
              ": x and w must be float32 or bfloat16 alike, on a CPU with the "
              "instructions (check linear_supported first)");
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous() && w.size(1) == K / P && w.size(2) == 16 * P &&
              K % P == 0 && (!GLU || w.size(0) % 2 == 0),
              name, ": w must be contiguous ", P == 2 ? "(N/16, K/2, 32) with K even" :
              "(N/16, K, 16)", GLU ? ", tiles in (gate, up) pairs (N/16 even)" : "", "; got K = ",
              K, " and w ", w.sizes());
  TORCH_CHECK(!b || (b->numel() == w.size(0) * 16 && b->scalar_type() == dt && b->is_contiguous()),
              name, ": bias must have N elements of x's dtype", GLU ? ", in the tiles' order" : "");
  const auto x = x_.contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() = w.size(0) * 16 / (GLU ? 2 : 1);
  auto y = at::empty(sizes, x.options());
  if (x.numel() == 0) return y;
#if defined(__AVX512F__)
#if defined(SHARDWISE_AMX)
  if (dt == at::kBFloat16 && x.numel() >= AMX_MIN_ROWS * K && K % 32 == 0 && amx_usable()) {
    amx_product<GLU>(x, w, b, y);
    return y;
  }
#endif
  by_dtype(dt, [&](auto a) { tproduct<decltype(a), GLU>(x, w, b, y); });
#endif
  return y;
}

// Whether bf16 products of many rows run on AMX tiles here (built for them, the CPU has them,
// the kernel granted the tile state, SHARDWISE_AMX is not 0).
bool amx_in_use() {
#if defined(SHARDWISE_AMX)
  return amx_usable();
#else
  return false;
#endif
}

// Switch the AMX path on or off (on: only where amx is usable at all); the previous state.
bool set_amx(bool on) {
#if defined(SHARDWISE_AMX)
  const bool was = amx_in_use();
  amx_switch().store(on);
  return was;
#else
  (void)on;
  return false;
#endif
}

bool usable(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  if (x.device().type() != c10::kCPU || w.device().type() != c10::kCPU) return false;
  if (x.scalar_type() != w.scalar_type() || w.dim() != 2 || !w.is_contiguous()) return false;
  if (x.size(-1) != w.size(1) || x.numel() == 0) return false;
  if (b && (b->scalar_type() != w.scalar_type() || !b->is_contiguous())) return false;
  return supported(x.scalar_type());
}

at::Tensor linear(const at::Tensor& x_, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  if (!usable(x_, w, b)) return at::linear(x_, w, b);
  const auto x = x_.contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() = w.size(0);
  auto y = at::empty(sizes, x.options());
#if defined(__AVX512F__)
  by_dtype(x.scalar_type(), [&](auto a) { product<decltype(a)>(x, w, b, y); });
#endif
  return y;
}


}  // namespace

TORCH_LIBRARY_FRAGMENT(shardwise, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def("linear_supported(ScalarType dtype) -> bool", &supported);
  m.def("linear_amx() -> bool", &amx_in_use);
  m.def("set_linear_amx(bool on) -> bool", &set_amx);
  m.def("stream_sum(Tensor x) -> float", &stream_sum);
  m.def("linear_tiled(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
  m.def("linear_tiled_swiglu(Tensor x, Tensor w, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(shardwise, CPU, m) { m.impl("linear", &linear);
  m.impl("linear_tiled", &tiled_product<false>);
  m.impl("linear_tiled_swiglu", &tiled_product<true>);
}
