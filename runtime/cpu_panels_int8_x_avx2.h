// The products on x rounded to int8 (cpu_panels_int8_x.h) for AVX2 builds without AVX512-VNNI:
// four byte products per 32-bit lane through vpmaddubsw (pairs to 16 bits) and vpmaddwd (pairs
// of those to 32), as llama.cpp's AVX2 paths do. The portable loops they replace ran a batch-1
// int8-x decode at 0.13x llama.cpp on a Zen 3 VM (BENCHMARKS.md, "AVX2 without AVX-512"). Same
// integer dots, same float epilogue as the VNNI loops: y bit for bit theirs. Included by
// cpu_panels_int8_x.h inside its namespace.

#pragma once

#if defined(__AVX2__) && !(defined(__AVX512VNNI__) && defined(__AVX512BW__))
#define RUNTIME_INT8_X_AVX2 1

// Four panel rows' bytes at columns 32 h.. (4 x kPanel bytes at `rows`) as four vectors of 8
// columns' four bytes each (rows in byte order): vector n, 128-bit lane L, 32-bit lane c holds
// column 32 h + 16 L + 4 n + c ("half-quad order").
inline void half_quad_columns(const uint8_t* rows, int h, __m256i out[4]) {
  auto load = [rows, h](int r) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + r * kPanel + 32 * h));
  };
  __m256i a0 = load(0), a1 = load(1), a2 = load(2), a3 = load(3);
  __m256i lo01 = _mm256_unpacklo_epi8(a0, a1), hi01 = _mm256_unpackhi_epi8(a0, a1);
  __m256i lo23 = _mm256_unpacklo_epi8(a2, a3), hi23 = _mm256_unpackhi_epi8(a2, a3);
  out[0] = _mm256_unpacklo_epi16(lo01, lo23), out[1] = _mm256_unpackhi_epi16(lo01, lo23);
  out[2] = _mm256_unpacklo_epi16(hi01, hi23), out[3] = _mm256_unpackhi_epi16(hi01, hi23);
}
// A panel's column values (64 floats in order) at half h, vector n, in half-quad order.
inline __m256 half_quad_load(const float* columns, int h, int n) {
  return _mm256_set_m128(_mm_loadu_ps(columns + 32 * h + 16 + 4 * n),
                         _mm_loadu_ps(columns + 32 * h + 4 * n));
}
// Vector v (half h, vector n in half-quad order) stored at its columns.
inline void half_quad_store(__m256 v, int h, int n, float* columns) {
  _mm_storeu_ps(columns + 32 * h + 4 * n, _mm256_castps256_ps128(v));
  _mm_storeu_ps(columns + 32 * h + 16 + 4 * n, _mm256_extractf128_ps(v, 1));
}
inline __m256i x_quad8(const int8_t* q) {  // four x codes in every 32-bit lane
  int32_t four;
  std::memcpy(&four, q, sizeof four);
  return _mm256_set1_epi32(four);
}
// body(j, columns) for each quad of `rows` panel rows (j = 0, 4, ..), its columns 32 h.. in
// half-quad order; the first half's pass asks for the rows ahead (prefetch_distance).
template <typename Body>
__attribute__((always_inline)) inline void for_half_quads(const uint8_t* panel, int64_t rows,
                                                          int h, Body&& body) {
  const int64_t ahead = prefetch_distance();
  for (int64_t j = 0; j < rows; j += 4) {
    if (h == 0) prefetch_span(panel + j * kPanel, 4 * kPanel, ahead);
    __m256i columns[4];
    half_quad_columns(panel + j * kPanel, h, columns);
    body(j, columns);
  }
}
// 16-bit pair sums to 32 bits: each lane the sum of its four byte products.
inline __m256i pairs_to_lanes(__m256i pairs) {
  return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

// The integer dots dot[m] (half-quad order, columns 32 h..) of x rows' codes q (row stride `in`,
// at the group's first input) with an int4 group's `half` packed rows. The nibbles' codes
// (0..15) are vpmaddubsw's unsigned operand; a 16-bit pair sum is at most 2 x 15 x 128, so a
// low and a high pair add without saturating.
template <int MB>
inline void int4_half_dots(const int8_t* q, int64_t in, const uint8_t* packed, int64_t half,
                           int h, __m256i dot[MB][4]) {
  const __m256i nibble = _mm256_set1_epi8(15);
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < 4; ++n) dot[m][n] = _mm256_setzero_si256();
  for_half_quads(packed, half, h, [&](int64_t j, const __m256i columns[4]) {
#pragma GCC unroll 4
    for (int n = 0; n < 4; ++n) {
      __m256i low = _mm256_and_si256(columns[n], nibble);
      __m256i high = _mm256_and_si256(_mm256_srli_epi16(columns[n], 4), nibble);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) {
        const int8_t* qm = q + m * in + j;
        __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, x_quad8(qm)),
                                         _mm256_maddubs_epi16(high, x_quad8(qm + half)));
        dot[m][n] = _mm256_add_epi32(dot[m][n], pairs_to_lanes(pairs));
      }
    }
  });
}

// int4_panel_rows_int8_x's y: its arithmetic, in its order.
template <int MB>
inline void int4_panel_rows_int8_x_avx2(const int8_t* q, const float* x_scales, int64_t in,
                                        const uint8_t* panel, int64_t out, Scales s,
                                        const Scales* mins, int64_t groups, const float* x_sums,
                                        int64_t c0, float* y) {
  int64_t per_group = in / groups, half = per_group / 2;
  __m256 acc[MB][8];  // [m][4 h + n], half-quad order until the panel is done
  for (int m = 0; m < MB; ++m)
    for (int k = 0; k < 8; ++k) acc[m][k] = _mm256_setzero_ps();
  alignas(32) float scale[kPanel], offset[kPanel];
  for (int64_t g = 0; g < groups; ++g) {
    prefetch_tables_ahead(s, mins, g, groups, c0);
    int4_group_tables(s, mins, g, c0, scale, offset);
    for (int h = 0; h < 2; ++h) {  // 32 columns at a time: the sums fit the 16 registers
      __m256i dot[MB][4];
      int4_half_dots<MB>(q + g * per_group, in, panel + g * half * kPanel, half, h, dot);
      for (int n = 0; n < 4; ++n) {
        __m256 sc = half_quad_load(scale, h, n), off = half_quad_load(offset, h, n);
        for (int m = 0; m < MB; ++m) {
          __m256 x_scale = _mm256_set1_ps(x_scales[m * groups + g]);
          __m256 x_sum = _mm256_set1_ps(x_sums[m * groups + g]);
          acc[m][4 * h + n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[m][n]),
                                              _mm256_mul_ps(x_scale, sc),
                                              _mm256_fmadd_ps(x_sum, off, acc[m][4 * h + n]));
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int k = 0; k < 8; ++k) half_quad_store(acc[m][k], k / 4, k % 4, y + m * out + c0);
}

// The integer dots dot[m] (half-quad order, columns 32 h..) of x rows' codes q (row stride `in`,
// at the x block's first input) with `rows` int8 panel rows. Signed weights: |w| is
// vpmaddubsw's unsigned operand and x takes w's sign (vpsignb); |w| <= 128 and |x| <= 127 keep a
// 16-bit pair sum below 2^15.
template <int MB>
inline void int8_half_dots(const int8_t* q, int64_t in, const uint8_t* panel, int64_t rows, int h,
                           __m256i dot[MB][4]) {
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < 4; ++n) dot[m][n] = _mm256_setzero_si256();
  for_half_quads(panel, rows, h, [&](int64_t j, const __m256i columns[4]) {
#pragma GCC unroll 4
    for (int n = 0; n < 4; ++n) {
      __m256i magnitude = _mm256_abs_epi8(columns[n]);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) {
        __m256i signed_x = _mm256_sign_epi8(x_quad8(q + m * in + j), columns[n]);
        dot[m][n] = _mm256_add_epi32(dot[m][n],
                                     pairs_to_lanes(_mm256_maddubs_epi16(magnitude, signed_x)));
      }
    }
  });
}

// int8_panel_rows_int8_x's y: its arithmetic, in its order (no offset to take back).
template <int MB>
inline void int8_panel_rows_int8_x_avx2(const int8_t* q, const float* x_scales, int64_t x_block,
                                        int64_t in, const uint8_t* panel, int64_t out, Scales s,
                                        int64_t blocks, int64_t c0, float* y) {
  int64_t per_block = in / blocks, x_blocks = in / x_block;
  __m256 acc[MB][8];  // [m][4 h + n], half-quad order until the panel is done
  for (int m = 0; m < MB; ++m)
    for (int k = 0; k < 8; ++k) acc[m][k] = _mm256_setzero_ps();
  alignas(32) float scale[kPanel];
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_tables_ahead(s, nullptr, b, blocks, c0);
    __m256 sums[MB][8];
    for (int m = 0; m < MB; ++m)
      for (int k = 0; k < 8; ++k) sums[m][k] = _mm256_setzero_ps();
    for (int64_t xb = b * per_block / x_block; xb < (b + 1) * per_block / x_block; ++xb)
      for (int h = 0; h < 2; ++h) {  // 32 columns at a time: the sums fit the 16 registers
        __m256i dot[MB][4];
        int8_half_dots<MB>(q + xb * x_block, in, panel + xb * x_block * kPanel, x_block, h, dot);
        for (int m = 0; m < MB; ++m) {
          __m256 x_scale = _mm256_set1_ps(x_scales[m * x_blocks + xb]);
          for (int n = 0; n < 4; ++n)
            sums[m][4 * h + n] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[m][n]), x_scale, sums[m][4 * h + n]);
        }
      }
    s.copy_row(scale, b, c0, kPanel);
    for (int k = 0; k < 8; ++k) {
      __m256 sc = half_quad_load(scale, k / 4, k % 4);
      for (int m = 0; m < MB; ++m) acc[m][k] = _mm256_fmadd_ps(sc, sums[m][k], acc[m][k]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int k = 0; k < 8; ++k) half_quad_store(acc[m][k], k / 4, k % 4, y + m * out + c0);
}
#endif
