// int4 panels under float x on the integer dots: x rounded to 24 bits per weight group
// (q = round(x * kX24Peak / amax), kept as three int8 digits q = 65536 h + 256 m + l), then each
// digit's integer dot with the group's codes (int4_group_dots, three code rows per x row), put
// together in float: 65536 dot_h + (256 dot_m + dot_l), one rounding. x keeps what float32 keeps
// of the group's largest |x| (2^-24 of it); the sums are exact integers, where the float loop
// rounds at every FMA, so y stays within float32's rounding of the float loop's y.
// Why: under float x the int4 loop is bound by its float work (a shift, a permute and an FMA per
// 16 weights: ~4.4 bytes a cycle on a Zen 4 core); a dot does 64 weights an instruction, so
// three of them still take ~0.6x the time (BENCHMARKS.md, "int4 under float x: x in three int8
// digits"). Included by cpu_panels.cc after cpu_panels_int8_x.h and cpu_panels_many_rows.h,
// inside its namespace.
// RUNTIME_KERNEL_INT4_X24=0: the float loops instead (the A/B).

#pragma once

constexpr float kX24Peak = 127.0f * 65793.0f;  // 127 (65536 + 256 + 1): every digit in int8
constexpr int64_t kX24Rows = 8;  // int4_panel_rows_x24's rows a call

#if (defined(__AVX512VNNI__) && defined(__AVX512BW__)) || defined(RUNTIME_INT8_X_AVX2)
#define RUNTIME_INT4_X24 1
#endif

// A VNNI or AVX2 build (cpu_panels_x24_avx2.h) with RUNTIME_KERNEL_INT4_X24 not 0 (read once).
inline bool int4_x24_on() {
#ifdef RUNTIME_INT4_X24
  static const bool on = env_count("RUNTIME_KERNEL_INT4_X24", 1) != 0;
  return on;
#else
  return false;
#endif
}

// Whether an int4 weight's product of `rows` float x rows takes the digits' dots: VNNI or AVX2,
// groups of a multiple of 16 rows (int4_group_dots' step, quantize_rows_x24's) up to 1024 (256
// dot_m + dot_l in int32). Any number of rows: a row at a time they outran the float loops of
// few rows and the chunks of many rows (cpu_panels_many_rows.h) at 1-512 rows, 1.15-1.8x on a
// Zen 4 VM (BENCHMARKS.md, "int4 under float x"); RUNTIME_KERNEL_MANY_ROWS, where set, still
// sends the rows past it to the chunks (the A/B).
inline bool int4_x24_takes(int64_t per_group, int64_t rows) {
  int64_t above = many_rows_override();
  return int4_x24_on() && per_group % 16 == 0 && per_group <= 1024 && (above < 0 || rows <= above);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// The balanced base-256 digit of q in [-128, 127] and (q - digit) / 256.
inline __m512i low_digit(__m512i q, __m512i* rest) {
  __m512i digit = _mm512_sub_epi32(
      _mm512_and_si512(_mm512_add_epi32(q, _mm512_set1_epi32(128)), _mm512_set1_epi32(255)),
      _mm512_set1_epi32(128));
  *rest = _mm512_srai_epi32(_mm512_sub_epi32(q, digit), 8);
  return digit;
}

// x [M, I] rounded to 24 bits per group of `per_group` (a multiple of 16) inputs: codes [3M, I]
// (rows 3m, 3m + 1, 3m + 2: the digits h, m, l of q = 65536 h + 256 m + l), scales [M, G]
// (amax / kX24Peak) and the rounded rows' group sums scale * sum(q) [M, G].
void quantize_rows_x24(const float* x, int64_t rows, int64_t in, int64_t per_group,
                       int8_t* codes, float* scales, float* sums) {
  int64_t groups = in / per_group;
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const float* xg = x + m * in + g * per_group;
      float amax = abs_peak16(xg, per_group);
      __m512 inverse = _mm512_set1_ps(amax > 0.0f ? kX24Peak / amax : 0.0f);
      const __m512i peak_code = _mm512_set1_epi32(int32_t(kX24Peak)), zero = _mm512_setzero_si512();
      // sum(q) in double: exact (|q| < 2^23, at most 1024 of them), past int32's range
      __m512d total_low = _mm512_setzero_pd(), total_high = _mm512_setzero_pd();
      int8_t* at = codes + 3 * m * in + g * per_group;
      for (int64_t i = 0; i < per_group; i += 16) {
        __m512i q = _mm512_cvtps_epi32(_mm512_roundscale_ps(
            _mm512_mul_ps(_mm512_loadu_ps(xg + i), inverse),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        // amax * (peak / amax) may round to peak + 1, past the top digit's 127
        q = _mm512_max_epi32(_mm512_min_epi32(q, peak_code), _mm512_sub_epi32(zero, peak_code));
        __m512i rest, high;
        __m512i l = low_digit(q, &rest);
        __m512i mid = low_digit(rest, &high);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(at + i), _mm512_cvtepi32_epi8(high));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(at + in + i), _mm512_cvtepi32_epi8(mid));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(at + 2 * in + i), _mm512_cvtepi32_epi8(l));
        total_low = _mm512_add_pd(total_low, _mm512_cvtepi32_pd(_mm512_castsi512_si256(q)));
        total_high = _mm512_add_pd(total_high,
                                   _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(q, 1)));
      }
      float scale = amax / kX24Peak;
      scales[m * groups + g] = scale;
      sums[m * groups + g] =
          float(double(scale) * _mm512_reduce_add_pd(_mm512_add_pd(total_low, total_high)));
    }
}

// A group's three digit dots of one x row (int4_group_dots) put together and added to acc (in
// quad_columns' order): acc += dot * x_scale * scale + x_sum * offset, int4_panel_rows_int8_x's
// formula on the 24-bit x.
__attribute__((always_inline)) inline void add_group_x24(const int8_t* codes, int64_t in,
                                                         const uint8_t* packed, int64_t half,
                                                         const __m512 scale[4],
                                                         const __m512 offset[4], float x_scale,
                                                         float x_sum, __m512 acc[4]) {
  __m512i dot[3][4];
  int4_group_dots<3>(codes, in, packed, half, dot);
  const __m512 digit_weight = _mm512_set1_ps(65536.0f);
  __m512 row_scale = _mm512_set1_ps(x_scale), row_sum = _mm512_set1_ps(x_sum);
  for (int n = 0; n < 4; ++n) {
    __m512i low = _mm512_add_epi32(_mm512_slli_epi32(dot[1][n], 8), dot[2][n]);
    __m512 whole = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[0][n]), digit_weight,
                                   _mm512_cvtepi32_ps(low));
    acc[n] = _mm512_fmadd_ps(whole, _mm512_mul_ps(row_scale, scale[n]),
                             _mm512_fmadd_ps(row_sum, offset[n], acc[n]));
  }
}

// int4_panel_rows on x in 24 bits, up to kX24Rows rows (each row's three digit rows of codes as
// quantize_rows_x24 leaves them, x_scales and x_sums [rows, G]), a row at a time per group: its
// three digit rows' 12 sums in registers; the group's tables made once for all the rows (made
// per row, Q4_K's super-scaled ones cost a 512-token prompt 10%), its packed rows read again
// from L1. One row keeps its sums in registers; more, in memory between groups. The same
// arithmetic for a row whatever the rows beside it.
inline void int4_panel_rows_x24(const int8_t* codes, const float* x_scales, int64_t in,
                                const uint8_t* panel, int64_t out, Scales s, const Scales* mins,
                                int64_t groups, const float* x_sums, int64_t c0, float* y,
                                int64_t rows) {
  int64_t per_group = in / groups, half = per_group / 2;
  __m512 acc[kX24Rows][4];
  for (int64_t m = 0; m < rows; ++m)
    for (int n = 0; n < 4; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    prefetch_tables_ahead(s, mins, g, groups, c0);
    __m512 scale[4], offset[4];
    int4_group_quad_tables(s, mins, g, c0, scale, offset);
    const uint8_t* packed = panel + g * half * kPanel;
    if (rows == 1) {  // its sums in registers
      add_group_x24(codes + g * per_group, in, packed, half, scale, offset, x_scales[g],
                    x_sums[g], acc[0]);
      continue;
    }
    for (int64_t m = 0; m < rows; ++m)
      add_group_x24(codes + 3 * m * in + g * per_group, in, packed, half, scale, offset,
                    x_scales[m * groups + g], x_sums[m * groups + g], acc[m]);
  }
  for (int64_t m = 0; m < rows; ++m) store_in_order(acc[m], y + m * out + c0);
}
#endif

#include "cpu_panels_x24_avx2.h"  // the same on AVX2's vpmaddubsw
