// shardwise::qlinear -- y = x W^T (+ b) for the few rows of a decode step, W quantized in groups
// along its input dimension and streamed once, dequantized in registers.
//
//   int8  W[i, j] = s[i, g] q[i, j]                 q int8, one byte per weight
//   int4  W[i, j] = s[i, g] (q[i, j] - 8) + z[i, g]  q in [0, 15], two per byte
//
// with g = j / group (uniform groups, group a multiple of 32, K a multiple of group). int4 bytes
// are laid out per 32 columns: byte t of a 32-column block holds column t in its low nibble and
// column t + 16 in its high nibble (one 16-byte load gives two 16-lane vectors). Scales and zero
// points are fp32 or bf16 (the activation dtype's rounding, as torch's int4 kernel keeps them).
//
// Products are exact: fp32 FMAs of the dequantized weights, or for int4 with bf16 activations
// (AVX512-BF16) bf16 dot products of exact bf16 weight values and the bf16 activations, summed
// in fp32 (no activation quantization: the result is the dequantized model's, up to summation
// order). The int4 zero point is folded out
// of the stream: sum_j W x_j = sum_g s_g sum_{j in g} q_j x_j + sum_g (z_g - 8 s_g) sum_{j in g} x_j,
// the second term from per-group sums of x computed once per call.
//
// Work split: contiguous ranges of 16-row tiles over the intra-op threads, input rows in passes
// of up to 4, 8 tiles streamed at once for one input row (4 for two, 2 for 3-4), a group's sums
// kept apart and scaled once.
#include <ATen/ATen.h>  // not torch/extension.h: no Python bindings here, a third of the compile
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {

#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int MB = 4;  // input rows per pass
constexpr int64_t PREFETCH = 1024;  // bytes ahead in each tile's stream (past the tile's end: harmless)

using shardwise_simd::load16;

// One pass: R input rows times NT tiles of 16 weight rows (tiles [t, t + NT)), group by group.
// Lanes are output rows: no horizontal sums; a group's partial sums are scaled once per group.
template <int BITS, class S, int NT, int R, bool DOT>
inline void tiles(const float* x, const uint16_t* xb, int64_t K, const float* xsum,
                  const uint8_t* q, const S* s, const S* z, int64_t group, int64_t t, float* y,
                  int64_t ldy, const float* bias) {
  const int64_t ng = K / group;
  const int64_t tile_bytes = BITS == 4 ? K * 8 : K * 16;  // 16 rows x K weights
  __m512 acc[NT][R];
#pragma GCC unroll 16
  for (int i = 0; i < NT * R; ++i) acc[i / R][i % R] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    // two partial sums per output vector (even and odd columns): FMA latency, not throughput,
    // would bound a single chain
    __m512 part[NT][R][2];
#pragma GCC unroll 16
    for (int i = 0; i < NT * R; ++i) part[i / R][i % R][0] = part[i / R][i % R][1] = _mm512_setzero_ps();
#if defined(__AVX512BF16__)
    if constexpr (BITS == 4 && DOT) {
      // bf16 activations: 16-bit lanes hold a column pair per row; OR'd into 0x4300 (bf16 128)
      // a nibble is the bf16 128 + q, exact; one dot product instruction multiplies 16 rows by
      // the column pair (x[k], x[k+1]) broadcast and sums the pair. The 128 + 8 offset comes
      // out below: sum (128 + q) x - 136 sum x = sum (q - 8) x.
      const __m512i magic = _mm512_set1_epi32(0x43004300);
      const __m512i mask = _mm512_set1_epi32(0x000F000F);
      for (int64_t k = g * group; k < (g + 1) * group; k += 8) {
#pragma GCC unroll 4
        for (int u = 0; u < NT; ++u) {
          const __m512i v = _mm512_loadu_si512(q + (t + u) * tile_bytes + k * 8);
          _mm_prefetch(reinterpret_cast<const char*>(q + (t + u) * tile_bytes + k * 8 + PREFETCH),
                       _MM_HINT_T0);
#pragma GCC unroll 4
          for (int p = 0; p < 4; ++p) {
            const __m512bh w = (__m512bh)_mm512_ternarylogic_epi32(
                _mm512_srli_epi32(v, 4 * p), mask, magic, 0xEA);
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r) {
              uint32_t pair;
              std::memcpy(&pair, xb + r * K + k + 2 * p, 4);
              part[u][r][p & 1] = _mm512_dpbf16_ps(part[u][r][p & 1], w,
                                                   (__m512bh)_mm512_set1_epi32(pair));
            }
          }
        }
      }
    } else
#endif
    if constexpr (BITS == 4) {
      // lane r of a 32-bit word holds row r's 8 columns k..k+7 (see the layout above); a nibble
      // OR'd into the mantissa of 2^23 is the float 2^23 + q, minus 2^23 + 8 is q - 8
      const __m512i magic = _mm512_set1_epi32(0x4B000000);
      const __m512 bias8 = _mm512_set1_ps(8388616.f);
      for (int64_t k = g * group; k < (g + 1) * group; k += 8) {
#pragma GCC unroll 4
        for (int u = 0; u < NT; ++u) {
          const __m512i v = _mm512_loadu_si512(q + (t + u) * tile_bytes + k * 8);
          _mm_prefetch(reinterpret_cast<const char*>(q + (t + u) * tile_bytes + k * 8 + PREFETCH),
                       _MM_HINT_T0);
#pragma GCC unroll 8
          for (int c = 0; c < 8; ++c) {
            // (v >> 4c) & 0xF | magic in one ternary-logic op after the shift
            const __m512i n = _mm512_ternarylogic_epi32(
                _mm512_srli_epi32(v, 16 * (c & 1) + 4 * (c >> 1)), _mm512_set1_epi32(0xF), magic,
                0xEA);
            const __m512 w = _mm512_sub_ps(_mm512_castsi512_ps(n), bias8);
#pragma GCC unroll 4
            for (int r = 0; r < R; ++r)
              part[u][r][c & 1] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[r * K + k + c]),
                                                  part[u][r][c & 1]);
          }
        }
      }
    } else {
      for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
#pragma GCC unroll 4
        for (int u = 0; u < NT; ++u) {
          const __m256i b = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(q + (t + u) * tile_bytes + k * 16));
          _mm_prefetch(reinterpret_cast<const char*>(q + (t + u) * tile_bytes + k * 16 + PREFETCH),
                       _MM_HINT_T0);
          const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
          const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            part[u][r][0] = _mm512_fmadd_ps(w0, _mm512_set1_ps(x[r * K + k]), part[u][r][0]);
            part[u][r][1] = _mm512_fmadd_ps(w1, _mm512_set1_ps(x[r * K + k + 1]), part[u][r][1]);
          }
        }
      }
    }
#pragma GCC unroll 4
    for (int u = 0; u < NT; ++u) {
      const __m512 sv = load16(s + ((t + u) * ng + g) * 16);
      __m512 zv = _mm512_setzero_ps();
      if constexpr (BITS == 4) zv = load16(z + ((t + u) * ng + g) * 16);
      if constexpr (DOT) zv = _mm512_fnmadd_ps(_mm512_set1_ps(136.f), sv, zv);  // z - 136 s
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        acc[u][r] = _mm512_fmadd_ps(_mm512_add_ps(part[u][r][0], part[u][r][1]), sv, acc[u][r]);
        if constexpr (BITS == 4)  // sum_{j in g} z x_j
          acc[u][r] = _mm512_fmadd_ps(zv, _mm512_set1_ps(xsum[r * ng + g]), acc[u][r]);
      }
    }
  }
#pragma GCC unroll 4
  for (int u = 0; u < NT; ++u) {
    const __m512 bv = bias ? _mm512_loadu_ps(bias + (t + u) * 16) : _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      _mm512_storeu_ps(y + r * ldy + (t + u) * 16, _mm512_add_ps(acc[u][r], bv));
  }
}

template <int BITS, class S, int R, bool DOT>
void pass(const float* x, const uint16_t* xb, int64_t K, const float* xsum, const uint8_t* q,
          const S* s, const S* z, int64_t group, int64_t t0, int64_t t1, float* y, int64_t ldy,
          const float* bias) {
  constexpr int NT = R == 1 ? 8 : R == 2 ? 4 : 2;  // streams at once, registers permitting
  int64_t t = t0;
  for (; t + NT <= t1; t += NT)
    tiles<BITS, S, NT, R, DOT>(x, xb, K, xsum, q, s, z, group, t, y, ldy, bias);
  if constexpr (NT > 4)
    for (; t + 4 <= t1; t += 4)
      tiles<BITS, S, 4, R, DOT>(x, xb, K, xsum, q, s, z, group, t, y, ldy, bias);
  if constexpr (NT > 2)
    for (; t + 2 <= t1; t += 2)
      tiles<BITS, S, 2, R, DOT>(x, xb, K, xsum, q, s, z, group, t, y, ldy, bias);
  for (; t < t1; ++t) tiles<BITS, S, 1, R, DOT>(x, xb, K, xsum, q, s, z, group, t, y, ldy, bias);
}

template <int BITS, class S, bool DOT = false>
void product(const float* xp, const uint16_t* xbp, int64_t M, int64_t K, const at::Tensor& q,
             const at::Tensor& s, const c10::optional<at::Tensor>& z, int64_t group,
             const float* bp, float* yp, int64_t N) {
  const int64_t ng = K / group;
  const uint8_t* qp = reinterpret_cast<const uint8_t*>(q.data_ptr());
  const S* sp = reinterpret_cast<const S*>(s.data_ptr());
  const S* zp = z ? reinterpret_cast<const S*>(z->data_ptr()) : nullptr;
  std::vector<float> xsum(BITS == 4 ? M * ng : 0);
  if constexpr (BITS == 4) {
    for (int64_t r = 0; r < M; ++r)
      for (int64_t g = 0; g < ng; ++g) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t k = g * group; k < (g + 1) * group; k += 16)
          acc = _mm512_add_ps(acc, _mm512_loadu_ps(xp + r * K + k));
        xsum[r * ng + g] = _mm512_reduce_add_ps(acc);
      }
  }
  const float* xs = xsum.data();
  // contiguous ranges of tiles (16 weight rows each) per thread, as even as whole tiles allow
  // (units of 8 tiles split a 36-tile weight 24 + 12 over two threads)
  at::parallel_for(0, N / 16, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      const float* xr = xp + m0 * K;
      const uint16_t* xbr = xbp ? xbp + m0 * K : nullptr;
      const float* xsr = BITS == 4 ? xs + m0 * ng : nullptr;
      float* yr = yp + m0 * N;
      switch (std::min<int64_t>(MB, M - m0)) {
        case 1: pass<BITS, S, 1, DOT>(xr, xbr, K, xsr, qp, sp, zp, group, t0, t1, yr, N, bp); break;
        case 2: pass<BITS, S, 2, DOT>(xr, xbr, K, xsr, qp, sp, zp, group, t0, t1, yr, N, bp); break;
        case 3: pass<BITS, S, 3, DOT>(xr, xbr, K, xsr, qp, sp, zp, group, t0, t1, yr, N, bp); break;
        default: pass<BITS, S, 4, DOT>(xr, xbr, K, xsr, qp, sp, zp, group, t0, t1, yr, N, bp); break;
      }
    }
  });
}
#endif

void check(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s,
           const c10::optional<at::Tensor>& z, int64_t group, int64_t bits,
           const c10::optional<at::Tensor>& b) {
  const int64_t K = x.size(-1);
  TORCH_CHECK(bits == 4 || bits == 8, "qlinear: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu(), "qlinear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "qlinear: x must be float32 or bfloat16");
  TORCH_CHECK(group > 0 && group % 32 == 0 && K % group == 0,
              "qlinear: group ", group, " must be a multiple of 32 dividing K = ", K);
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.size(1) == (bits == 4 ? K / 8 : K) &&
              q.size(2) == 16 && q.element_size() == (bits == 4 ? 4 : 1),
              "qlinear: q must be contiguous ", bits == 4 ? "int32 (N / 16, K / 8, 16)" :
              "int8 (N / 16, K, 16)");
  TORCH_CHECK(s.dim() == 3 && s.is_contiguous() && s.size(0) == q.size(0) &&
              s.size(1) == K / group && s.size(2) == 16,
              "qlinear: scales must be contiguous (N / 16, K / group, 16)");
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16,
              "qlinear: scales must be float32 or bfloat16");
  TORCH_CHECK(bits == 8 || (z && z->sizes() == s.sizes() && z->is_contiguous() &&
                            z->scalar_type() == s.scalar_type()),
              "qlinear: int4 needs zero points shaped and typed as the scales");
  TORCH_CHECK(!b || (b->numel() == q.size(0) * 16), "qlinear: bias must have N elements");
}

at::Tensor qlinear(const at::Tensor& x_, const at::Tensor& q, const at::Tensor& s,
                   const c10::optional<at::Tensor>& z, int64_t group, int64_t bits,
                   const c10::optional<at::Tensor>& b) {
  check(x_, q, s, z, group, bits, b);
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const int64_t K = x_.size(-1), N = q.size(0) * 16, M = x_.numel() / K;
  const at::Tensor x = x_.contiguous();
  auto sizes = x_.sizes().vec();
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options());
  // the few input rows in fp32 (and the output, if bf16) in buffers of this call: no aten ops
  std::vector<float> xf, yf, bf;
  const float* xp;
  float* yp;
  if (x.scalar_type() == at::kFloat) {
    xp = x.data_ptr<float>();
    yp = y.data_ptr<float>();
  } else {
    const c10::BFloat16* xb = x.data_ptr<c10::BFloat16>();
    xf.resize(M * K);
    for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(xb[i]);
    yf.resize(M * N);
    xp = xf.data();
    yp = yf.data();
  }
  const float* bp = nullptr;
  if (b) {
    const at::Tensor bc = b->to(at::kFloat).contiguous();
    bf.assign(bc.data_ptr<float>(), bc.data_ptr<float>() + N);
    bp = bf.data();
  }
  const bool f32 = s.scalar_type() == at::kFloat;
  const uint16_t* xbp = x.scalar_type() == at::kBFloat16 ?
      reinterpret_cast<const uint16_t*>(x.data_ptr()) : nullptr;
  if (bits == 4) {
#if defined(__AVX512BF16__)
    if (xbp && !f32) product<4, c10::BFloat16, true>(xp, xbp, M, K, q, s, z, group, bp, yp, N);
    else
#endif
    if (f32) product<4, float>(xp, xbp, M, K, q, s, z, group, bp, yp, N);
    else product<4, c10::BFloat16>(xp, xbp, M, K, q, s, z, group, bp, yp, N);
  } else {
    if (f32) product<8, float>(xp, xbp, M, K, q, s, z, group, bp, yp, N);
    else product<8, c10::BFloat16>(xp, xbp, M, K, q, s, z, group, bp, yp, N);
  }
  if (x.scalar_type() != at::kFloat) {  // one rounding to bf16, to nearest even
    c10::BFloat16* out = y.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < M * N; ++i) out[i] = c10::BFloat16(yf[i]);
  }
  return y;
#else
  TORCH_CHECK(false, "qlinear: this CPU lacks AVX-512 (check qlinear_supported first)");
#endif
}

bool qsupported() {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(shardwise, m) {
  m.def("qlinear(Tensor x, Tensor q, Tensor scale, Tensor? zero, int group, int bits, "
        "Tensor? bias=None) -> Tensor");
  m.def("qlinear_supported() -> bool", &qsupported);
}

TORCH_LIBRARY_IMPL(shardwise, CPU, m) { m.impl("qlinear", &qlinear); }
