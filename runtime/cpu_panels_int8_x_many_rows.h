// Many x rows under int8 x on an int8, six-bit or int4 panel (cpu_panels.cc's
// int8_x_many_rows_take): the panel's columns as vpdpbusd's unsigned operand (int8 offset,
// six-bit unpacked, int4 nibbles apart) and its table rows in quad_columns' order are made once
// per chunk of scale blocks into a buffer, then every group of rows reads them: the row loop's
// work is the dots and their epilogue only. The four-row loops (int8_panel_rows_int8_x,
// int4_panel_rows_int8_x) redid that preparation every four rows (about one op per dot), and
// the int8 one held 48 vectors of sums (it spilled). Each output's sums and FMAs are those
// loops', in their order: the same y bit for bit. Included by cpu_panels.cc inside its
// namespace, after cpu_panels_int8_x.h.

#pragma once

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// rows from which a product takes this loop (cpu_panels.cc's int8_x_many_rows_take), where it
// overtook the four-row loops: int8 from 12, int8 whose scale blocks hold several x blocks
// (their loop keeps the fewer rows) from 24, int4 (whose loop unpacks less) from 48
// (BENCHMARKS.md, "int8 x, many rows")
constexpr int64_t kInt8XManyRows = 12, kInt8XBlocksManyRows = 24, kInt4XManyRows = 48;
constexpr int64_t kInt8XChunkInputs = 256;  // inputs a chunk prepares (16 KB of columns)

// The forms of panel this loop reads: int8, six-bit int8 codes, int4 (x_block: a group).
enum class XForm { kInt8, kSix, kInt4 };

// The columns of `inputs` rows of a panel (int8 at kPanel bytes a row, six-bit quads, or int4
// groups of per_group rows, low nibbles the group's first half) as vpdpbusd's unsigned operand,
// quad by quad of input rows: cols[4 j + n] is vector n of inputs 4 j .. 4 j + 3.
template <XForm F>
inline void prepare_int8_x_columns(const uint8_t* panel, int64_t inputs, int64_t per_group,
                                   __m512i* cols) {
  const __m512i offset = _mm512_set1_epi8(char(0x80)), nibble = _mm512_set1_epi8(15);
  const int64_t ahead = prefetch_distance(), half = per_group / 2;
  int64_t packed_quads = F == XForm::kInt4 ? inputs / 8 : inputs / 4;
  for (int64_t j = 0; j < packed_quads; ++j) {
    __m512i columns[4];
    if constexpr (F == XForm::kSix) {
#ifdef RUNTIME_PANELS_SIX
      const uint8_t* quad = panel + j * kSixQuad;
      prefetch_span(quad, kSixQuad, ahead);
      for (int k = 0; k < 4; ++k) columns[k] = six_unsigned(six_words(quad, k));
#endif
    } else {
      quad_columns(panel + 4 * j * kPanel, ahead, columns);
    }
    if constexpr (F == XForm::kInt4) {  // packed rows 4 j..: inputs i and i + half of a group
      int64_t i = 4 * j / half * per_group + 4 * j % half;
      for (int k = 0; k < 4; ++k) {
        _mm512_store_si512(cols + i + k, _mm512_and_si512(columns[k], nibble));
        _mm512_store_si512(cols + i + half + k,
                           _mm512_and_si512(_mm512_srli_epi16(columns[k], 4), nibble));
      }
      continue;
    }
    if constexpr (F == XForm::kInt8)
      for (int k = 0; k < 4; ++k) columns[k] = _mm512_xor_si512(columns[k], offset);
    for (int k = 0; k < 4; ++k) _mm512_store_si512(cols + 4 * j + k, columns[k]);
  }
}

// The products' tables of a chunk's scale blocks (int4: groups), 4 vectors each in
// quad_columns' order (int4: the scales', then the offsets').
template <XForm F>
inline void prepare_int8_x_tables(const Scales& s, const Scales* mins, int64_t b0, int64_t n,
                                  int64_t c0, __m512* tables) {
  for (int64_t b = 0; b < n; ++b)
    if constexpr (F == XForm::kInt4)
      int4_group_quad_tables(s, mins, b0 + b, c0, tables + 8 * b, tables + 8 * b + 4);
    else
      quad_table_row(s, b0 + b, c0, tables + 4 * b);
}

// x's per-row values a chunk's products take, at its first row and x block.
struct XRows {
  const int8_t* q;  // codes [M, I], at the chunk's first input
  const float* scales;  // [M, XB]
  const int32_t* code_sums;  // int8: [M, XB]
  const float* sums;  // int4: x_scale x sum(codes) [M, G]
  int64_t in, x_blocks;
};

// Half h (vectors 2h, 2h + 1) of MB rows' accumulators over a chunk of scale blocks, each
// output's terms as the four-row loops take them, in their order:
// - int8 (one x block a block: kOne): y += table x fma(dot, x_scale, 0), the dot started at
//   -taken x sum(x's codes) (what the loop above subtracts after);
// - int8 (several): y += table x the x blocks' sum of dot x x_scale;
// - int4: y += dot x (x_scale x scale) + x_sum x offset.
template <int MB, XForm F, bool kOne>
inline void int8_x_rows_half(const XRows& x, const __m512i* cols, const __m512* tables, int h,
                             int32_t taken, int64_t chunk_blocks, int64_t per_block,
                             int64_t x_block, __m512 acc[MB][2]) {
  const int64_t x_per_block = per_block / x_block, stride = F == XForm::kInt4 ? 8 : 4;
  for (int64_t b = 0; b < chunk_blocks; ++b) {
    const __m512* table = tables + stride * b + 2 * h;
    __m512 sums[kOne ? 1 : MB][2];
    if constexpr (!kOne)
      for (int m = 0; m < MB; ++m) sums[m][0] = sums[m][1] = _mm512_setzero_ps();
    for (int64_t xk = 0; xk < x_per_block; ++xk) {
      int64_t k = b * x_per_block + xk, j0 = k * x_block / 4;  // chunk's x block, first quad
      __m512i dot[MB][2];
      for (int m = 0; m < MB; ++m)
        dot[m][0] = dot[m][1] = F == XForm::kInt4 ? _mm512_setzero_si512()
                                : _mm512_set1_epi32(-taken * x.code_sums[m * x.x_blocks + k]);
      for (int64_t j = j0; j < j0 + x_block / 4; ++j) {
        __m512i c0 = _mm512_load_si512(cols + 4 * j + 2 * h);
        __m512i c1 = _mm512_load_si512(cols + 4 * j + 2 * h + 1);
        for (int m = 0; m < MB; ++m) {
          __m512i xq = x_quad(x.q + m * x.in + 4 * j);
          dot[m][0] = _mm512_dpbusd_epi32(dot[m][0], c0, xq);
          dot[m][1] = _mm512_dpbusd_epi32(dot[m][1], c1, xq);
        }
      }
      for (int m = 0; m < MB; ++m) {
        __m512 x_scale = _mm512_set1_ps(x.scales[m * x.x_blocks + k]);
        for (int v = 0; v < 2; ++v) {
          __m512 term = _mm512_cvtepi32_ps(dot[m][v]);
          if constexpr (F == XForm::kInt4)
            acc[m][v] = _mm512_fmadd_ps(
                term, _mm512_mul_ps(x_scale, table[v]),
                _mm512_fmadd_ps(_mm512_set1_ps(x.sums[m * x.x_blocks + k]), table[4 + v],
                                acc[m][v]));
          else if constexpr (kOne)
            acc[m][v] = _mm512_fmadd_ps(
                table[v], _mm512_fmadd_ps(term, x_scale, _mm512_setzero_ps()), acc[m][v]);
          else
            sums[m][v] = _mm512_fmadd_ps(term, x_scale, sums[m][v]);
        }
      }
    }
    if constexpr (!kOne)
      for (int m = 0; m < MB; ++m)
        for (int v = 0; v < 2; ++v) acc[m][v] = _mm512_fmadd_ps(table[v], sums[m][v], acc[m][v]);
  }
}

// One chunk's products for MB rows: their accumulators in acc_rows ([MB][4] vectors,
// quad_columns' order) carried over from the chunks before.
template <int MB, XForm F, bool kOne>
inline void int8_x_rows_chunk(const XRows& x, const __m512i* cols, const __m512* tables,
                              int32_t taken, int64_t chunk_blocks, int64_t per_block,
                              int64_t x_block, __m512* acc_rows) {
  for (int h = 0; h < 2; ++h) {
    __m512 acc[MB][2];
    for (int m = 0; m < MB; ++m)
      for (int v = 0; v < 2; ++v) acc[m][v] = acc_rows[4 * m + 2 * h + v];
    int8_x_rows_half<MB, F, kOne>(x, cols, tables, h, taken, chunk_blocks, per_block, x_block,
                                  acc);
    for (int m = 0; m < MB; ++m)
      for (int v = 0; v < 2; ++v) acc_rows[4 * m + 2 * h + v] = acc[m][v];
  }
}

// The product of panel `panel` (its bytes) for all `rows` rows of x at once, chunk by chunk of
// its scale blocks (int4: groups; a chunk: at least one, about kInt8XChunkInputs inputs):
// int8_panel_rows_int8_x's or int4_panel_rows_int8_x's y. x: at row 0, input 0.
template <XForm F>
void panel_many_rows_int8_x(XRows x, int64_t x_block, const uint8_t* panel, int64_t out,
                            Scales s, const Scales* mins, int64_t blocks, int64_t c0, float* y,
                            int64_t rows) {
  int64_t in = x.in, per_block = in / blocks;
  int64_t chunk_blocks = std::max<int64_t>(1, std::min(blocks, kInt8XChunkInputs / per_block));
  int32_t taken = F == XForm::kSix ? 32 : 128;  // (int4: nothing taken, its x_sums instead)
  thread_local std::vector<__m512i> cols;  // (C++17: allocated at their 64-byte alignment)
  thread_local std::vector<__m512> tables, acc_rows;
  cols.resize(chunk_blocks * per_block);  // a vector for each input
  tables.resize(8 * chunk_blocks);
  acc_rows.assign(4 * rows, _mm512_setzero_ps());
  const int64_t row_bytes = F == XForm::kSix ? kSixRowBytes : F == XForm::kInt4 ? kPanel / 2
                                                                                : kPanel;
  for (int64_t b0 = 0; b0 < blocks; b0 += chunk_blocks) {
    int64_t n = std::min(chunk_blocks, blocks - b0), i0 = b0 * per_block;
    prepare_int8_x_columns<F>(panel + i0 * row_bytes, n * per_block, per_block, cols.data());
    prepare_int8_x_tables<F>(s, mins, b0, n, c0, tables.data());
    auto row_group = [&](int64_t m0, auto mb, auto one) {
      XRows at = x;
      int64_t k0 = i0 / x_block;
      at.q += m0 * in + i0, at.scales += m0 * x.x_blocks + k0;
      if (F == XForm::kInt4) at.sums += m0 * x.x_blocks + k0;
      else at.code_sums += m0 * x.x_blocks + k0;
      int8_x_rows_chunk<decltype(mb)::value, F, decltype(one)::value>(
          at, cols.data(), tables.data(), taken, n, per_block, x_block,
          acc_rows.data() + 4 * m0);
    };
    if (x_block == per_block) {
      for (int64_t m0 = 0; m0 < rows; m0 += 6)
        with_rows_up_to<6>(rows - m0, [&](auto mb) { row_group(m0, mb, std::true_type{}); });
    } else {
      for (int64_t m0 = 0; m0 < rows; m0 += 4)
        with_rows_up_to<4>(rows - m0, [&](auto mb) { row_group(m0, mb, std::false_type{}); });
    }
  }
  for (int64_t m = 0; m < rows; ++m) store_in_order(acc_rows.data() + 4 * m, y + m * out + c0);
}
#endif
