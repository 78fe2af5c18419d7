// Six-bit panels (cpu_panels_six.h) under float x: the float loops, each column's FMAs in the
// int8 loops' order (bit for bit their y), and the integer dots on x in three int8 digits as
// int4 panels take them (cpu_panels_x24.h), the default: the float loop on six-bit codes takes
// 17 vector ops per 64 weights (unpacking, conversions, FMAs) and ran no faster than the int8
// panels it saves a quarter of the bytes of; the dots take ~7 (BENCHMARKS.md, "Six-bit
// panels"). Included by cpu_panels.cc after cpu_panels_x24.h, inside its namespace.

#pragma once

// Whether a six-bit weight's product of `rows` float x rows takes the digits: the int4 digits'
// switch and limits, blocks of at most 256 rows (63 x 128 x 256 rows x 256 in int32); one row,
// and 9-32. On a Zen 4 VM against the float loops ([M, 2048] @ [2048, 8192], blocks of 16):
// 1.1-1.25x at one row, 1.2x at 16, level at 32, but 0.7-0.85x at 2-8 rows (the few-row loops
// share a quad's unpacking among their rows: a row adds 16 FMAs a quad, the digits ~27 ops) and
// 0.8-1.0x at 64-512 (the many-row chunks) (BENCHMARKS.md, "Six-bit panels").
inline bool six_x24_takes(int64_t per_block, int64_t rows) {
  return int4_x24_takes(per_block, rows) && per_block <= 256 &&
         (rows == 1 || (rows > 8 && rows <= 32));
}

#ifdef RUNTIME_PANELS_SIX
// A quad's FMAs for MB x rows (x at the quad's first input, row stride `in`) into sums in
// quad_columns' order: each column's rows in order, as the int8 float loops add them.
template <int MB>
__attribute__((always_inline)) inline void six_quad_fmas(const float* x, int64_t in,
                                                         const uint8_t* quad, __m512 acc[][4]) {
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    __m512i words = six_words(quad, k);
    __m512 w[4] = {six_row_floats<0>(words), six_row_floats<1>(words),
                   six_row_floats<2>(words), six_row_floats<3>(words)};
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r)
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m)
        acc[m][k] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * in + r]), w[r], acc[m][k]);
  }
}

// panel_rows on a six-bit panel, bit for bit its y on the int8 codes (the float loops: where
// the digits are off, or blocks they do not take).
template <int MB>
inline void six_panel_rows(const float* x, int64_t in, const uint8_t* panel, int64_t out,
                           Scales s, int64_t blocks, int64_t c0, float* y) {
  int64_t per_block = in / blocks, ahead = prefetch_distance();
  alignas(64) float scale_row[kPanel];
  __m512 result[MB][4];
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_tables_ahead(s, nullptr, b, blocks, c0);
    __m512 acc[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int k = 0; k < 4; ++k) acc[m][k] = _mm512_setzero_ps();
    for (int64_t i0 = b * per_block; i0 < (b + 1) * per_block; i0 += 4) {
      prefetch_span(panel + i0 / 4 * kSixQuad, kSixQuad, ahead);
      six_quad_fmas<MB>(x + i0, in, panel + i0 / 4 * kSixQuad, acc);
    }
    s.copy_row(scale_row, b, c0, kPanel);
    __m512 scale[4];
    load_in_quad_order(scale_row, scale);
    for (int m = 0; m < MB; ++m)
      for (int k = 0; k < 4; ++k)  // as panel_rows: y + sums x scale in one rounding
        result[m][k] = b == 0 ? _mm512_mul_ps(acc[m][k], scale[k])
                              : _mm512_fmadd_ps(acc[m][k], scale[k], result[m][k]);
  }
  for (int m = 0; m < MB; ++m) store_in_order(result[m], y + m * out + c0);
}

// `count` rows (whole quads) of a six-bit panel from input row i0 dequantized into wf [count,
// 64] as panel_many_rows does an int8 panel's (code x scale, + min in one rounding).
inline void six_rows_dequantized(const uint8_t* panel, int64_t i0, int64_t count,
                                 int64_t per_block, Scales s, const Scales* mins, int64_t c0,
                                 int64_t ahead, float* wf) {
  alignas(64) float scale[kPanel], offset[kPanel], codes[4][kPanel];
  for (int64_t k = 0; k < count; ++k) {
    int64_t i = i0 + k;
    if (k == 0 || i % per_block == 0) {  // a scale block opens (or goes on): its tables
      s.copy_row(scale, i / per_block, c0, kPanel);
      if (mins != nullptr) mins->copy_row(offset, i / per_block, c0, kPanel);
    }
    if (k % 4 == 0) {  // the quad's codes as floats, in column order
      const uint8_t* quad = panel + i / 4 * kSixQuad;
      prefetch_span(quad, kSixQuad, ahead);
      __m512 rows[4][4];
      for (int v = 0; v < 4; ++v) {
        __m512i words = six_words(quad, v);
        rows[0][v] = six_row_floats<0>(words), rows[1][v] = six_row_floats<1>(words);
        rows[2][v] = six_row_floats<2>(words), rows[3][v] = six_row_floats<3>(words);
      }
      for (int r = 0; r < 4; ++r) store_in_order(rows[r], codes[r]);
    }
    for (int l = 0; l < kPanelLanes; ++l)
      lanes_store(wf + k * kPanel + l * kLanes,
                  dequantized(lanes_load(codes[k % 4] + l * kLanes), scale + l * kLanes,
                              mins == nullptr ? nullptr : offset + l * kLanes));
  }
}

// panel_many_rows on a six-bit panel (its chunks of 64 rows, whole quads: in % 4 == 0).
inline void six_panel_many_rows(const float* x, int64_t rows, int64_t in, const uint8_t* panel,
                                int64_t out, Scales s, int64_t blocks, int64_t c0, float* y,
                                const Scales* mins) {
  ManyRowsBuffers& buffers = many_rows_buffers(rows);
  float *wf = buffers.chunk.data(), *sums = buffers.sums.data();
  int64_t per_block = in / blocks, ahead = prefetch_distance();
  for (int64_t i0 = 0; i0 < in; i0 += kChunkRows) {
    Chunk chunk{wf, {i0}, {std::min(kChunkRows, in - i0)}, 1};
    six_rows_dequantized(panel, i0, chunk.count[0], per_block, s, mins, c0, ahead, wf);
    chunk_sums_all(x, rows, in, chunk, sums, i0 == 0, i0 + kChunkRows >= in ? y + c0 : nullptr,
                   out);
  }
}

// One x row's three digit dots with a block of `quads` quads (its unsigned codes v + 32 from
// `columns`, four vectors a quad, or with kUnpack unpacked here from `panel`), put together:
// acc += scale (x_scale dot - 32 x_sum) + x_sum min (the dot's sum of (v + 32) x less 32 of
// x's sums), in quad_columns' order.
template <bool kUnpack>
__attribute__((always_inline)) inline void add_block_six_x24(
    const int8_t* codes, int64_t in, const uint8_t* panel, const __m512i* columns, int64_t quads,
    const __m512 scale[4], const __m512* mins, float x_scale, float x_sum, __m512 acc[4]) {
  __m512i dot[3][4];
  for (int d = 0; d < 3; ++d)
    for (int n = 0; n < 4; ++n) dot[d][n] = _mm512_setzero_si512();
  int64_t ahead = prefetch_distance();
  for (int64_t j = 0; j < quads; ++j) {
    __m512i w[4];
    if constexpr (kUnpack) prefetch_span(panel + j * kSixQuad, kSixQuad, ahead);
    for (int n = 0; n < 4; ++n)
      w[n] = kUnpack ? six_unsigned(six_words(panel + j * kSixQuad, n)) : columns[4 * j + n];
#pragma GCC unroll 3
    for (int d = 0; d < 3; ++d) {
      __m512i x = x_quad(codes + d * in + 4 * j);
#pragma GCC unroll 4
      for (int n = 0; n < 4; ++n) dot[d][n] = _mm512_dpbusd_epi32(dot[d][n], w[n], x);
    }
  }
  const __m512 digit_weight = _mm512_set1_ps(65536.0f);
  __m512 row_scale = _mm512_set1_ps(x_scale), row_sum = _mm512_set1_ps(x_sum);
  __m512 taken = _mm512_set1_ps(-32.0f * x_sum);
  for (int n = 0; n < 4; ++n) {
    __m512i low = _mm512_add_epi32(_mm512_slli_epi32(dot[1][n], 8), dot[2][n]);
    __m512 whole = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[0][n]), digit_weight,
                                   _mm512_cvtepi32_ps(low));
    acc[n] = _mm512_fmadd_ps(_mm512_fmadd_ps(whole, row_scale, taken), scale[n], acc[n]);
    if (mins != nullptr) acc[n] = _mm512_fmadd_ps(row_sum, mins[n], acc[n]);
  }
}

// six_panel_rows on x in 24 bits (quantize_rows_x24's codes, x_scales and x_sums [rows, R]), up
// to kX24Rows rows, per block: one row unpacks its codes as it goes, its sums in registers;
// more, the block's codes unpacked once into L1 and read by each row. The tables made once for
// all the rows; the same arithmetic for a row whatever the rows beside it.
inline void six_panel_rows_x24(const int8_t* codes, const float* x_scales, int64_t in,
                               const uint8_t* panel, int64_t out, Scales s, const Scales* mins,
                               int64_t blocks, const float* x_sums, int64_t c0, float* y,
                               int64_t rows) {
  int64_t per_block = in / blocks, quads = per_block / 4;
  __m512i columns[256];  // a block's unsigned codes, at most 256 rows (six_x24_takes)
  __m512 acc[kX24Rows][4];
  for (int64_t m = 0; m < rows; ++m)
    for (int n = 0; n < 4; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_tables_ahead(s, mins, b, blocks, c0);
    __m512 scale[4], min_vectors[4];
    quad_table_row(s, b, c0, scale);
    if (mins != nullptr) quad_table_row(*mins, b, c0, min_vectors);
    const __m512* block_mins = mins != nullptr ? min_vectors : nullptr;
    const uint8_t* block = panel + b * quads * kSixQuad;
    if (rows == 1) {
      add_block_six_x24<true>(codes + b * per_block, in, block, nullptr, quads, scale,
                              block_mins, x_scales[b], x_sums[b], acc[0]);
      continue;
    }
    for (int64_t j = 0; j < quads; ++j)
      for (int n = 0; n < 4; ++n)
        columns[4 * j + n] = six_unsigned(six_words(block + j * kSixQuad, n));
    for (int64_t m = 0; m < rows; ++m)
      add_block_six_x24<false>(codes + 3 * m * in + b * per_block, in, nullptr, columns, quads,
                               scale, block_mins, x_scales[m * blocks + b],
                               x_sums[m * blocks + b], acc[m]);
  }
  for (int64_t m = 0; m < rows; ++m) store_in_order(acc[m], y + m * out + c0);
}
#endif
