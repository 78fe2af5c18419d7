// The panel kernels' products on activations rounded to int8 (opt-in: layout.INT8_ACTIVATIONS,
// run.py --int8-activations): x rounded per block (quantize_rows), then integer dot products of
// its codes with int4 codes or int8 weights, four per 32-bit lane (AVX512-VNNI vpdpbusd; AVX2's
// vpmaddubsw, cpu_panels_int8_x_avx2.h; a portable loop elsewhere) (BENCHMARKS.md, "int8
// activations"). Included by cpu_panels.cc inside its namespace, after its panel width kPanel
// and the Scales of cpu_kernels.h.

#pragma once

#include "cpu_panels_int8_x_avx2.h"  // vpmaddubsw loops where VNNI is missing

// int4 panels: x rounded per weight group, as llama.cpp's Q4_0 path does; the codes (0..15,
// unsigned) multiply x's bytes four per lane in place of two conversions and two float FMAs
// per pair of weights. y += (w_scale * x_scale) * dot + offset * x_scale * sum(x's codes):
// int4_panel_rows' formula on the rounded x. int8 panels: x rounded per int8_x_block, each
// weight offset by 128 to be vpdpbusd's unsigned operand, 128 x sum(x's codes) taken back.

#ifdef __AVX512F__
// max |x[0:n]| (n a multiple of 16), a NaN skipped as by std::max.
inline float abs_peak16(const float* x, int64_t n) {
  __m512 peak = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16)
    peak = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + i)), peak);
  return _mm512_reduce_max_ps(peak);
}

// One group of quantize_rows, 16 inputs a step (per_group a multiple of 16): the same codes, the
// same scale (max and a product round alike in any order).
inline void quantize_group16(const float* xg, int64_t per_group, int8_t* q, float* scale,
                             float* sum, int32_t* code_sum) {
  float amax = abs_peak16(xg, per_group);
  float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
  __m512i total = _mm512_setzero_si512();
  for (int64_t i = 0; i < per_group; i += 16) {
    __m512 scaled = _mm512_mul_ps(_mm512_loadu_ps(xg + i), _mm512_set1_ps(inverse));
    __m512i codes = _mm512_cvtps_epi32(_mm512_roundscale_ps(scaled, _MM_FROUND_TO_NEAREST_INT |
                                                                        _MM_FROUND_NO_EXC));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(codes));
    total = _mm512_add_epi32(total, codes);
  }
  int32_t codes_total = _mm512_reduce_add_epi32(total);
  *scale = amax / 127.0f, *sum = *scale * float(codes_total);
  if (code_sum != nullptr) *code_sum = codes_total;
}
#endif

// x [M, I] rounded per group of `per_group` inputs: codes q [M, I], scales [M, G] and the rounded
// rows' group sums x_scale * sum(q) [M, G].
void quantize_rows(const float* x, int64_t rows, int64_t in, int64_t per_group, int8_t* q,
                   float* scales, float* sums, int32_t* code_sums = nullptr) {
  int64_t groups = in / per_group;
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = x + m * in + g * per_group;
#ifdef __AVX512F__
      if (per_group % 16 == 0) {
        quantize_group16(xg, per_group, q + m * in + g * per_group, scales + m * groups + g,
                         sums + m * groups + g,
                         code_sums != nullptr ? code_sums + m * groups + g : nullptr);
        continue;
      }
#endif
      float amax = 0.0f;
      for (int64_t i = 0; i < per_group; ++i) amax = std::max(amax, std::fabs(xg[i]));
      float scale = amax / 127.0f, inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
      int32_t total = 0;
      for (int64_t i = 0; i < per_group; ++i) {
        int32_t code = int32_t(std::nearbyint(xg[i] * inverse));
        q[m * in + g * per_group + i] = int8_t(code);
        total += code;
      }
      scales[m * groups + g] = scale;
      sums[m * groups + g] = scale * float(total);
      if (code_sums != nullptr) code_sums[m * groups + g] = total;
    }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Four packed rows of a panel (4 x 64 bytes at `rows`) as four vectors of 16 columns' four
// bytes each (one 32-bit lane per column, rows in byte order), the columns in the order
// unpacking leaves them: vector n, 128-bit lane L, lane c holds column 16 L + 4 n + c.
inline void quad_columns(const uint8_t* rows, int64_t ahead, __m512i out[4]) {
  prefetch_span(rows, 4 * kPanel, ahead);
  __m512i a0 = _mm512_loadu_si512(rows), a1 = _mm512_loadu_si512(rows + kPanel);
  __m512i a2 = _mm512_loadu_si512(rows + 2 * kPanel), a3 = _mm512_loadu_si512(rows + 3 * kPanel);
  __m512i lo01 = _mm512_unpacklo_epi8(a0, a1), hi01 = _mm512_unpackhi_epi8(a0, a1);
  __m512i lo23 = _mm512_unpacklo_epi8(a2, a3), hi23 = _mm512_unpackhi_epi8(a2, a3);
  out[0] = _mm512_unpacklo_epi16(lo01, lo23), out[1] = _mm512_unpackhi_epi16(lo01, lo23);
  out[2] = _mm512_unpacklo_epi16(hi01, hi23), out[3] = _mm512_unpackhi_epi16(hi01, hi23);
}
// A 4 x 4 transpose of 128-bit lanes (out[L]'s lane n is in[n]'s lane L): quad_columns' order
// to the columns' order, and back.
inline void transpose_lanes(const __m512i in[4], __m512i out[4]) {
  __m512i t0 = _mm512_shuffle_i32x4(in[0], in[1], 0x44);
  __m512i t1 = _mm512_shuffle_i32x4(in[0], in[1], 0xEE);
  __m512i t2 = _mm512_shuffle_i32x4(in[2], in[3], 0x44);
  __m512i t3 = _mm512_shuffle_i32x4(in[2], in[3], 0xEE);
  out[0] = _mm512_shuffle_i32x4(t0, t2, 0x88), out[1] = _mm512_shuffle_i32x4(t0, t2, 0xDD);
  out[2] = _mm512_shuffle_i32x4(t1, t3, 0x88), out[3] = _mm512_shuffle_i32x4(t1, t3, 0xDD);
}
// A panel's 64 column values (in order) as four vectors in quad_columns' order.
inline void load_in_quad_order(const float* columns, __m512 out[4]) {
  __m512i in[4], quad[4];
  for (int k = 0; k < 4; ++k) in[k] = _mm512_castps_si512(_mm512_loadu_ps(columns + 16 * k));
  transpose_lanes(in, quad);
  for (int n = 0; n < 4; ++n) out[n] = _mm512_castsi512_ps(quad[n]);
}
// Four vectors in quad_columns' order stored as the panel's 64 columns in order.
inline void store_in_order(const __m512 v[4], float* columns) {
  __m512i quad[4], in_order[4];
  for (int n = 0; n < 4; ++n) quad[n] = _mm512_castps_si512(v[n]);
  transpose_lanes(quad, in_order);
  for (int k = 0; k < 4; ++k) _mm512_storeu_si512(columns + 16 * k, in_order[k]);
}
#ifdef __AVX512VBMI__
// Column j of a panel's 64 in quad_columns' order: vector j / 16, 128-bit lane j / 4 % 4.
alignas(64) constexpr uint8_t kQuadColumns[64] = {
    0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51, 4,  5,  6,  7,  20, 21,
    22, 23, 36, 37, 38, 39, 52, 53, 54, 55, 8,  9,  10, 11, 24, 25, 26, 27, 40, 41, 42, 43,
    56, 57, 58, 59, 12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63};
alignas(64) constexpr uint16_t kQuadHalves[2][32] = {  // the same, for vectors 0-1 and 2-3
    {0, 1, 2, 3, 16, 17, 18, 19, 32, 33, 34, 35, 48, 49, 50, 51,
     4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39, 52, 53, 54, 55},
    {8,  9,  10, 11, 24, 25, 26, 27, 40, 41, 42, 43, 56, 57, 58, 59,
     12, 13, 14, 15, 28, 29, 30, 31, 44, 45, 46, 47, 60, 61, 62, 63}};

// Vector n of a super-scaled row's values in quad_columns' order: its 16 sub-scales (bytes
// 16 n.. of subs, permuted) widened, times its 16 super-scales (halves 16 (n % 2).. of the
// pair's permuted supers): super * sub, exact, as Scales::copy makes them.
template <int n>
__attribute__((always_inline)) inline __m512 super_scaled_vector(__m512i subs, __m512i supers,
                                                                 bool is_signed) {
  __m128i bytes = _mm512_extracti32x4_epi32(subs, n);
  __m512i wide = is_signed ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes);
  __m256i halves =
      n % 2 == 0 ? _mm512_castsi512_si256(supers) : _mm512_extracti64x4_epi64(supers, 1);
  return _mm512_mul_ps(_mm512_cvtph_ps(halves), _mm512_cvtepi32_ps(wide));
}

// Row g of table t at a panel's columns c0.. in quad_columns' order (quad_table_row). A
// super-scaled one's bytes and halves permuted in registers (VBMI): made as a float row and
// transposed, the tables took ~20 ops a block of Q6_K's 16 rows against the block's ~100 of
// dots; six-bit digits at one row 6-18% faster in L2 (BENCHMARKS.md, "Six-bit panels").
// Others: the row, then load_in_quad_order.
__attribute__((always_inline)) inline void super_scaled_quad_row(const Scales& t, int64_t g,
                                                                 int64_t c0, __m512 out[4]) {
  __m512i subs = _mm512_permutexvar_epi8(_mm512_load_si512(kQuadColumns),
                                         _mm512_loadu_si512(t.sub_row(g) + c0));
  const uint16_t* supers = t.super_row(g) + c0;
  __m512i low = _mm512_loadu_si512(supers), high = _mm512_loadu_si512(supers + 32);
  __m512i pair01 = _mm512_permutex2var_epi16(low, _mm512_load_si512(kQuadHalves[0]), high);
  __m512i pair23 = _mm512_permutex2var_epi16(low, _mm512_load_si512(kQuadHalves[1]), high);
  bool is_signed = t.type == ffi::DataType::S8;
  out[0] = super_scaled_vector<0>(subs, pair01, is_signed);
  out[1] = super_scaled_vector<1>(subs, pair01, is_signed);
  out[2] = super_scaled_vector<2>(subs, pair23, is_signed);
  out[3] = super_scaled_vector<3>(subs, pair23, is_signed);
}
#endif
__attribute__((always_inline)) inline void quad_table_row(const Scales& t, int64_t g, int64_t c0,
                                                          __m512 out[4]) {
#ifdef __AVX512VBMI__
  if (t.super_scaled()) return super_scaled_quad_row(t, g, c0, out);
#endif
  alignas(64) float row[kPanel];
  t.copy_row(row, g, c0, kPanel);
  load_in_quad_order(row, out);
}

// An int4 group's tables at a panel's 64 columns in quad_columns' order (int4_group_vectors).
__attribute__((always_inline)) inline void int4_group_quad_tables(const Scales& s,
                                                                  const Scales* mins, int64_t g,
                                                                  int64_t c0, __m512 scale[4],
                                                                  __m512 offset[4]) {
  if (s.super_scaled() && (mins == nullptr || mins->super_scaled())) {  // GGUF Q4_K's
    quad_table_row(s, g, c0, scale);
    if (mins != nullptr) return quad_table_row(*mins, g, c0, offset);
    for (int n = 0; n < 4; ++n) offset[n] = _mm512_mul_ps(_mm512_set1_ps(-8.0f), scale[n]);
    return;
  }
  __m512 columns[2][4];
  int4_group_vectors(s, mins, g, c0, columns[0], columns[1]);
  for (int t = 0; t < 2; ++t) {
    __m512i in[4], quad[4];
    for (int k = 0; k < 4; ++k) in[k] = _mm512_castps_si512(columns[t][k]);
    transpose_lanes(in, quad);
    for (int n = 0; n < 4; ++n) (t == 0 ? scale : offset)[n] = _mm512_castsi512_ps(quad[n]);
  }
}
inline __m512i x_quad(const int8_t* q) {  // four x codes in every 32-bit lane
  int32_t four;
  std::memcpy(&four, q, sizeof four);
  return _mm512_set1_epi32(four);
}

// The group's integer dots dot[m] (quad_columns' order) of x rows' codes q (row stride `in`,
// at the group's first input) with the group's `half` packed rows.
template <int MB>
inline void int4_group_dots(const int8_t* q, int64_t in, const uint8_t* packed, int64_t half,
                            __m512i dot[MB][4]) {
  // Low and high nibbles' dots apart for up to two x rows (two chains per register), together
  // for more (registers run out), as in int4_panel_rows.
  constexpr bool apart = MB <= 2;
  const __m512i nibble = _mm512_set1_epi8(15);
  const int64_t ahead = prefetch_distance();
  // sums in locals, written to dot after the loop, their loops unrolled as written: summed in
  // dot itself, GCC stored the eight sums to the stack every iteration (~8% of the product's
  // time at 1-4 rows; int8_block_dots measured no better so)
  __m512i low_dot[MB][4], high_dot[apart ? MB : 1][4];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < 4; ++n) low_dot[m][n] = _mm512_setzero_si512();
  for (int m = 0; m < (apart ? MB : 1); ++m)
    for (int n = 0; n < 4; ++n) high_dot[m][n] = _mm512_setzero_si512();
  for (int64_t j = 0; j < half; j += 4) {
    __m512i columns[4];
    quad_columns(packed + j * kPanel, ahead, columns);
    __m512i x_low[MB], x_high[MB];
    for (int m = 0; m < MB; ++m)
      x_low[m] = x_quad(q + m * in + j), x_high[m] = x_quad(q + m * in + half + j);
#pragma GCC unroll 4
    for (int n = 0; n < 4; ++n) {
      __m512i low = _mm512_and_si512(columns[n], nibble);
      __m512i high = _mm512_and_si512(_mm512_srli_epi16(columns[n], 4), nibble);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) {
        low_dot[m][n] = _mm512_dpbusd_epi32(low_dot[m][n], low, x_low[m]);
        if constexpr (apart)
          high_dot[m][n] = _mm512_dpbusd_epi32(high_dot[m][n], high, x_high[m]);
        else
          low_dot[m][n] = _mm512_dpbusd_epi32(low_dot[m][n], high, x_high[m]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < 4; ++n) {
      dot[m][n] = low_dot[m][n];
      if constexpr (apart) dot[m][n] = _mm512_add_epi32(dot[m][n], high_dot[m][n]);
    }
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// The integer dots dot[m] (quad_columns' order) of x rows' codes q (row stride `in`, at the
// block's first input) with `rows` int8 panel rows, each weight offset by 128 (xor 0x80:
// vpdpbusd's unsigned operand; kSix: six-bit panels, at `panel`'s byte of the block, by 32);
// the caller takes 128 (32) x sum(q) back.
template <int MB, bool kSix = false>
inline void int8_block_dots(const int8_t* q, int64_t in, const uint8_t* panel, int64_t rows,
                            __m512i dot[MB][4]) {
  const __m512i offset = _mm512_set1_epi8(char(0x80));  // (kSix: six_unsigned offsets)
  const int64_t ahead = prefetch_distance();
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < 4; ++n) dot[m][n] = _mm512_setzero_si512();
  for (int64_t j = 0; j < rows; j += 4) {
    __m512i columns[4];
    if constexpr (kSix) {
#ifdef RUNTIME_PANELS_SIX
      const uint8_t* quad = panel + j / 4 * kSixQuad;
      prefetch_span(quad, kSixQuad, ahead);
      for (int k = 0; k < 4; ++k) columns[k] = six_unsigned(six_words(quad, k));
#endif
    } else {
      quad_columns(panel + j * kPanel, ahead, columns);
    }
    __m512i x[MB];
    for (int m = 0; m < MB; ++m) x[m] = x_quad(q + m * in + j);
    for (int n = 0; n < 4; ++n) {
      __m512i shifted = kSix ? columns[n] : _mm512_xor_si512(columns[n], offset);
      for (int m = 0; m < MB; ++m) dot[m][n] = _mm512_dpbusd_epi32(dot[m][n], shifted, x[m]);
    }
  }
}
#endif

// panel_rows (int8) on x rounded to int8 per block of `x_block` inputs (q, x_scales [M, XB],
// x's code sums [M, XB]): per scale block of the weight, the sum over its x blocks of
// x_scale * integer dot, then y += scale * that sum. Under VNNI the sums stay in quad_columns'
// order until the panel is done: putting them in order per block cost more than the dots.
// kSix: a six-bit panel (cpu_panels_six.h), its codes offset by 32, not 128.
template <int MB, bool kSix = false>
inline void int8_panel_rows_int8_x(const int8_t* q, const float* x_scales,
                                   const int32_t* code_sums, int64_t x_block, int64_t in,
                                   const uint8_t* panel, int64_t out, Scales s, int64_t blocks,
                                   int64_t c0, float* y) {
  int64_t per_block = in / blocks, x_blocks = in / x_block;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < 4; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    // the table rows two blocks ahead (as panel_rows does): one row every 16 input rows of
    // a Q6_K weight, a stream the hardware prefetcher does not follow
    prefetch_tables_ahead(s, nullptr, b, blocks, c0);
    __m512 sums[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < 4; ++n) sums[m][n] = _mm512_setzero_ps();
    for (int64_t k = b * per_block / x_block; k < (b + 1) * per_block / x_block; ++k) {
      __m512i dot[MB][4];
      int8_block_dots<MB, kSix>(q + k * x_block, in,
                                panel + k * x_block * (kSix ? kSixRowBytes : kPanel), x_block,
                                dot);
      for (int m = 0; m < MB; ++m) {
        __m512i taken = _mm512_set1_epi32((kSix ? 32 : 128) * code_sums[m * x_blocks + k]);
        __m512 x_scale = _mm512_set1_ps(x_scales[m * x_blocks + k]);
        for (int n = 0; n < 4; ++n)
          sums[m][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dot[m][n], taken)),
                                       x_scale, sums[m][n]);
      }
    }
    __m512 quad_scale[4];
    quad_table_row(s, b, c0, quad_scale);
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < 4; ++n)
        acc[m][n] = _mm512_fmadd_ps(quad_scale[n], sums[m][n], acc[m][n]);
  }
  for (int m = 0; m < MB; ++m) store_in_order(acc[m], y + m * out + c0);
#elif defined(RUNTIME_INT8_X_AVX2)
  static_assert(!kSix, "six-bit panels: AVX-512 VNNI builds only");
  (void)code_sums, (void)x_blocks, (void)per_block;  // no offset to take back: |w| and x's sign
  int8_panel_rows_int8_x_avx2<MB>(q, x_scales, x_block, in, panel, out, s, blocks, c0, y);
#else
  static_assert(!kSix, "six-bit panels: AVX-512 VNNI builds only");
  alignas(64) float scale[kPanel];
  float sums[MB][kPanel];
  for (int64_t b = 0; b < blocks; ++b) {
    for (int m = 0; m < MB; ++m)
      for (int c = 0; c < kPanel; ++c) sums[m][c] = 0.0f;
    for (int64_t k = b * per_block / x_block; k < (b + 1) * per_block / x_block; ++k) {
      int32_t dots[MB][kPanel];
      for (int m = 0; m < MB; ++m)
        for (int c = 0; c < kPanel; ++c) {
          int32_t total = 0;
          for (int64_t i = k * x_block; i < (k + 1) * x_block; ++i)
            total += int32_t(int8_t(panel[i * kPanel + c])) * q[m * in + i];
          dots[m][c] = total;
        }
      for (int m = 0; m < MB; ++m) {
        float x_scale = x_scales[m * x_blocks + k];
        for (int c = 0; c < kPanel; ++c) sums[m][c] += x_scale * float(dots[m][c]);
      }
    }
    s.copy_row(scale, b, c0, kPanel);
    for (int m = 0; m < MB; ++m) {
      float* at = y + m * out + c0;
      for (int c = 0; c < kPanel; ++c)
        at[c] = b == 0 ? scale[c] * sums[m][c] : at[c] + scale[c] * sums[m][c];
    }
  }
#endif
}

// int4_panel_rows on x rounded to int8 (q, x_scales [M, G], x_sums [M, G] of the rounded rows):
// y += dot * x_scale * scale + x_sum * offset per group (offset: the mins, or -8 x scale).
template <int MB>
inline void int4_panel_rows_int8_x(const int8_t* q, const float* x_scales, int64_t in,
                                   const uint8_t* panel, int64_t out, Scales s, const Scales* mins,
                                   int64_t groups, const float* x_sums, int64_t c0, float* y) {
  int64_t per_group = in / groups, half = per_group / 2;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512 acc[MB][4];  // quad_columns' order until the panel is done (as in the int8 rows)
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < 4; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    prefetch_tables_ahead(s, mins, g, groups, c0);  // as int4_panel_rows
    __m512i dot[MB][4];
    int4_group_dots<MB>(q + g * per_group, in, panel + g * half * kPanel, half, dot);
    __m512 quad_scale[4], quad_offset[4];
    int4_group_quad_tables(s, mins, g, c0, quad_scale, quad_offset);
    for (int m = 0; m < MB; ++m) {
      __m512 x_scale = _mm512_set1_ps(x_scales[m * groups + g]);
      __m512 x_sum = _mm512_set1_ps(x_sums[m * groups + g]);
      for (int n = 0; n < 4; ++n)
        acc[m][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m][n]),
                                    _mm512_mul_ps(x_scale, quad_scale[n]),
                                    _mm512_fmadd_ps(x_sum, quad_offset[n], acc[m][n]));
    }
  }
  for (int m = 0; m < MB; ++m) store_in_order(acc[m], y + m * out + c0);
#elif defined(RUNTIME_INT8_X_AVX2)
  (void)half;
  int4_panel_rows_int8_x_avx2<MB>(q, x_scales, in, panel, out, s, mins, groups, x_sums, c0, y);
#else
  alignas(64) float scale[kPanel], offset[kPanel];
  for (int64_t g = 0; g < groups; ++g) {
    int32_t dots[MB][kPanel];
    for (int m = 0; m < MB; ++m)
      for (int c = 0; c < kPanel; ++c) {
        int32_t total = 0;
        for (int64_t j = 0; j < half; ++j) {
          uint8_t byte = panel[(g * half + j) * kPanel + c];
          total += int32_t(byte & 15) * q[m * in + g * per_group + j] +
                   int32_t(byte >> 4) * q[m * in + g * per_group + half + j];
        }
        dots[m][c] = total;
      }
    int4_group_tables(s, mins, g, c0, scale, offset);
    for (int m = 0; m < MB; ++m) {
      float x_scale = x_scales[m * groups + g], x_sum = x_sums[m * groups + g];
      float* at = y + m * out + c0;
      for (int c = 0; c < kPanel; ++c) {
        float part = float(dots[m][c]) * x_scale * scale[c] + x_sum * offset[c];
        at[c] = g == 0 ? part : at[c] + part;
      }
    }
  }
#endif
}
