// int4 panels under float x on the integer dots (cpu_panels_x24.h) for AVX2 builds without
// AVX512-VNNI: the same 24-bit x in three int8 digits, each digit's dots by vpmaddubsw
// (int4_half_dots), put together in the VNNI loop's arithmetic, so y is bit for bit an
// AVX-512 build's. Why: AVX2's float loop converts and multiplies each code (a batch-1 Q4_K_M
// decode at 0.5-0.6x llama.cpp on a Zen 3 VM); three dots of 32 codes an instruction pair
// still do less (BENCHMARKS.md, "AVX2 without AVX-512"). Included by cpu_panels_x24.h inside
// its namespace.

#pragma once

#ifdef RUNTIME_INT8_X_AVX2
// max |x[0:n]| (n a multiple of 8), a NaN skipped as by std::max.
inline float abs_peak8(const float* x, int64_t n) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 peak = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8)
    peak = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), magnitude), peak);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, peak);
  return *std::max_element(lanes, lanes + 8);
}
// The balanced base-256 digit of q in [-128, 127] and (q - digit) / 256.
inline __m256i low_digit8(__m256i q, __m256i* rest) {
  __m256i digit = _mm256_sub_epi32(
      _mm256_and_si256(_mm256_add_epi32(q, _mm256_set1_epi32(128)), _mm256_set1_epi32(255)),
      _mm256_set1_epi32(128));
  *rest = _mm256_srai_epi32(_mm256_sub_epi32(q, digit), 8);
  return digit;
}
// Eight 32-bit lanes holding int8 values stored as 8 bytes.
inline void store_bytes8(int8_t* at, __m256i v) {
  __m256i bytes = _mm256_packs_epi32(v, v);
  bytes = _mm256_packs_epi16(bytes, bytes);  // 128-bit lane L: its four at bytes 0-3
  bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(at), _mm256_castsi256_si128(bytes));
}

// quantize_rows_x24 (cpu_panels_x24.h): the same codes, scales and sums.
void quantize_rows_x24(const float* x, int64_t rows, int64_t in, int64_t per_group,
                       int8_t* codes, float* scales, float* sums) {
  int64_t groups = in / per_group;
  const __m256i peak_code = _mm256_set1_epi32(int32_t(kX24Peak));
  const __m256i floor_code = _mm256_sub_epi32(_mm256_setzero_si256(), peak_code);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = x + m * in + g * per_group;
      float amax = abs_peak8(xg, per_group);
      __m256 inverse = _mm256_set1_ps(amax > 0.0f ? kX24Peak / amax : 0.0f);
      __m256d total = _mm256_setzero_pd();  // sum(q), exact in double
      int8_t* at = codes + 3 * m * in + g * per_group;
      for (int64_t i = 0; i < per_group; i += 8) {
        __m256i q = _mm256_cvtps_epi32(_mm256_round_ps(
            _mm256_mul_ps(_mm256_loadu_ps(xg + i), inverse),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        q = _mm256_max_epi32(_mm256_min_epi32(q, peak_code), floor_code);
        __m256i rest, high;
        __m256i l = low_digit8(q, &rest);
        __m256i mid = low_digit8(rest, &high);
        store_bytes8(at + i, high), store_bytes8(at + in + i, mid);
        store_bytes8(at + 2 * in + i, l);
        total = _mm256_add_pd(total, _mm256_add_pd(
                                         _mm256_cvtepi32_pd(_mm256_castsi256_si128(q)),
                                         _mm256_cvtepi32_pd(_mm256_extracti128_si256(q, 1))));
      }
      alignas(32) double lanes[4];
      _mm256_store_pd(lanes, total);
      float scale = amax / kX24Peak;
      scales[m * groups + g] = scale;
      sums[m * groups + g] = float(double(scale) * ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])));
    }
}

// int4_panel_rows_x24's y (up to kX24Rows rows, a row at a time per group, 32 columns at a
// time): add_group_x24's arithmetic on int4_half_dots' three digit dots.
inline void int4_panel_rows_x24(const int8_t* codes, const float* x_scales, int64_t in,
                                const uint8_t* panel, int64_t out, Scales s, const Scales* mins,
                                int64_t groups, const float* x_sums, int64_t c0, float* y,
                                int64_t rows) {
  int64_t per_group = in / groups, half = per_group / 2;
  __m256 acc[kX24Rows][8];  // [m][4 h + n], half-quad order until the panel is done
  for (int64_t m = 0; m < rows; ++m)
    for (int k = 0; k < 8; ++k) acc[m][k] = _mm256_setzero_ps();
  alignas(32) float scale[kPanel], offset[kPanel];
  const __m256 digit_weight = _mm256_set1_ps(65536.0f);
  for (int64_t g = 0; g < groups; ++g) {
    prefetch_tables_ahead(s, mins, g, groups, c0);
    int4_group_tables(s, mins, g, c0, scale, offset);
    const uint8_t* packed = panel + g * half * kPanel;
    for (int64_t m = 0; m < rows; ++m) {
      __m256 row_scale = _mm256_set1_ps(x_scales[m * groups + g]);
      __m256 row_sum = _mm256_set1_ps(x_sums[m * groups + g]);
      for (int h = 0; h < 2; ++h) {
        __m256i dot[3][4];
        int4_half_dots<3>(codes + 3 * m * in + g * per_group, in, packed, half, h, dot);
        for (int n = 0; n < 4; ++n) {
          __m256i low = _mm256_add_epi32(_mm256_slli_epi32(dot[1][n], 8), dot[2][n]);
          __m256 whole = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[0][n]), digit_weight,
                                         _mm256_cvtepi32_ps(low));
          __m256 sc = half_quad_load(scale, h, n), off = half_quad_load(offset, h, n);
          acc[m][4 * h + n] = _mm256_fmadd_ps(whole, _mm256_mul_ps(row_scale, sc),
                                              _mm256_fmadd_ps(row_sum, off, acc[m][4 * h + n]));
        }
      }
    }
  }
  for (int64_t m = 0; m < rows; ++m)
    for (int k = 0; k < 8; ++k) half_quad_store(acc[m][k], k / 4, k % 4, y + m * out + c0);
}
#endif
