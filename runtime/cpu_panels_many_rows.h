// Many x rows against one panel under float x (prompts, and decode of many slots): the panel
// is read 64 input rows at a time, dequantized once to float32 (int8: code x scale; int4:
// scale x nibble + offset) into a buffer that stays in L1, and every six x rows' sums continue
// over the chunk from a buffer of partial sums. panel_rows read the whole panel again for every
// four or six x rows (float32: 147 KB at D 576, from L2), widened it again each time, and closed
// every scale block of every row with a pass over y; here the sums run over the whole panel
// (BENCHMARKS.md, "Many rows: panels dequantized a chunk at a time"). An int8 code times a
// 16-bit scale is exact in float32: the same products, summed in another order.
// Included by cpu_panels.cc inside its namespace, after panel_rows' Lanes.

#pragma once

// Input rows per chunk: 64 x 64 float32 is 16 KB, L1 with room for x and the sums.
constexpr int64_t kChunkRows = 64;

// Rows above which every panel call takes this path, from RUNTIME_KERNEL_MANY_ROWS (0: always,
// a large value: never; the A/B); -1 unset: each kind's own (many_rows_take, cpu_panels.cc).
inline int64_t many_rows_override() {
  static const int64_t rows = env_count("RUNTIME_KERNEL_MANY_ROWS", -1);
  return rows;
}

// A chunk: wf [rows, 64] (the panel's weights dequantized), its rows in spans of consecutive
// inputs (int4: a group's low rows, then its high rows; two groups to a chunk).
struct Chunk {
  static constexpr int kMaxSpans = 4;
  const float* wf;
  int64_t first[kMaxSpans], count[kMaxSpans];
  int spans = 0;
  int64_t rows() const {
    int64_t n = 0;
    for (int k = 0; k < spans; ++k) n += count[k];
    return n;
  }
};

// A pass of the sums holds kPassLanes vectors of each row's 64 columns and kPassRows rows: the
// whole panel and six rows with AVX-512 (24 of 32 registers); half of it and three rows with
// AVX2 (12 of 16), whose six rows of a whole panel (48 sums) had spilled every FMA (16
// sequences decoded at 0.5x llama.cpp on a Zen 3 VM; BENCHMARKS.md, "AVX2 without AVX-512").
constexpr int kPassLanes = kPanelLanes < 4 ? kPanelLanes : 4;
constexpr int kPassRows = kLanes == 16 ? 6 : 3;

// acc[m] += x[m, first + k] * wf[k, l0 lanes on] over the `n` rows k of wf [n, 64], in order (x
// at row 0 of the rows, stride `in`), asking for the lines `ahead` bytes on (a float32 panel
// read in place).
template <int MB>
inline void span_sums(const float* x, int64_t in, const float* wf, int64_t n, int64_t first,
                      int64_t ahead, int l0, Lanes acc[MB][kPassLanes]) {
  for (int64_t k = 0; k < n; ++k) {
    prefetch_span(wf + k * kPanel, kPanel * sizeof(float), ahead);
    Lanes xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = lanes_set(x[m * in + first + k]);
    for (int l = 0; l < kPassLanes; ++l) {
      Lanes wv = lanes_load(wf + k * kPanel + (l0 + l) * kLanes);
      for (int m = 0; m < MB; ++m) acc[m][l] = lanes_fma(xv[m], wv, acc[m][l]);
    }
  }
}

// The sums of x rows m0..m0+MB (x at row 0, stride `in`) continued over a chunk: from zero for
// the panel's first chunk, else from sums (rows kPanel apart); into y (at the panel's first
// column, rows `out` apart) after its last, else back to sums. `ahead`: span_sums' (the first
// pass's). Each sum takes the same terms in the same order whatever the passes.
template <int MB>
inline void chunk_sums(const float* x, int64_t in, int64_t m0, const Chunk& chunk, float* sums,
                       bool first, float* y, int64_t out, int64_t ahead) {
  x += m0 * in, sums += m0 * kPanel;
  float* to = y != nullptr ? y + m0 * out : sums;
  int64_t stride = y != nullptr ? out : kPanel;
  for (int l0 = 0; l0 < kPanelLanes; l0 += kPassLanes) {
    Lanes acc[MB][kPassLanes];
    for (int m = 0; m < MB; ++m)
      for (int l = 0; l < kPassLanes; ++l)
        acc[m][l] = first ? lanes_zero() : lanes_load(sums + m * kPanel + (l0 + l) * kLanes);
    const float* wf = chunk.wf;
    for (int k = 0; k < chunk.spans; ++k) {
      span_sums<MB>(x, in, wf, chunk.count[k], chunk.first[k], l0 == 0 ? ahead : 0, l0, acc);
      wf += chunk.count[k] * kPanel;
    }
    for (int m = 0; m < MB; ++m)
      for (int l = 0; l < kPassLanes; ++l)
        lanes_store(to + m * stride + (l0 + l) * kLanes, acc[m][l]);
  }
}

// Every x row's sums over one chunk, kPassRows rows at a time; the first rows stream the chunk
// with prefetch `ahead` bytes on (a float32 chunk read in place; 0: a chunk already in L1).
inline void chunk_sums_all(const float* x, int64_t rows, int64_t in, const Chunk& chunk,
                           float* sums, bool first, float* y, int64_t out, int64_t ahead = 0) {
  for (int64_t m0 = 0; m0 < rows; m0 += kPassRows)
    with_rows_up_to<kPassRows>(rows - m0, [&](auto mb) {
      chunk_sums<decltype(mb)::value>(x, in, m0, chunk, sums, first, y, out,
                                      m0 == 0 ? ahead : 0);
    });
}

// code x scale, or fma(code, scale, min) with mins: one rounding whatever GCC contracts (the
// six-bit panels' chunks equal the int8 ones' bit for bit).
__attribute__((always_inline)) inline Lanes dequantized(Lanes code, const float* scale,
                                                       const float* offset) {
  Lanes s = lanes_load(scale);
  return offset == nullptr ? code * s : lanes_fma(code, s, lanes_load(offset));
}

// The buffers of one thread: a chunk dequantized, and every x row's 64 sums so far.
struct ManyRowsBuffers {
  std::vector<float> chunk = std::vector<float>(kChunkRows * kPanel), sums;
};
inline ManyRowsBuffers& many_rows_buffers(int64_t rows) {
  thread_local ManyRowsBuffers buffers;
  if (int64_t(buffers.sums.size()) < rows * kPanel) buffers.sums.resize(rows * kPanel);
  return buffers;
}

// y[:, c0 : c0 + 64] for every x row [rows, in] against panel `panel` (W float: chunks read in
// place; int8: dequantized with the scales of their blocks, plus their mins where it has them:
// GGUF's asymmetric types, whose mins' term then costs nothing more).
template <typename W>
void panel_many_rows(const float* x, int64_t rows, int64_t in, const W* panel, int64_t out,
                     Scales s, int64_t blocks, int64_t c0, float* y,
                     const Scales* mins = nullptr) {
  ManyRowsBuffers& buffers = many_rows_buffers(rows);
  float *wf = buffers.chunk.data(), *sums = buffers.sums.data(), scale[kPanel], offset[kPanel];
  int64_t per_block = in / blocks, block_end = 0;
  int64_t ahead = prefetch_distance(!std::is_same_v<W, int8_t>);
  for (int64_t i0 = 0; i0 < in; i0 += kChunkRows) {
    Chunk chunk{wf, {i0}, {std::min(kChunkRows, in - i0)}, 1};
    if constexpr (std::is_same_v<W, float>) {
      chunk.wf = panel + i0 * kPanel;
    } else {
      for (int64_t k = 0; k < chunk.count[0]; ++k) {
        const W* row = panel + (i0 + k) * kPanel;
        prefetch_span(row, kPanel * sizeof(W), ahead);
        if (i0 + k == block_end) {  // a scale block opens: its scales (and mins)
          s.copy_row(scale, block_end / per_block, c0, kPanel);
          if (mins != nullptr) mins->copy_row(offset, block_end / per_block, c0, kPanel);
          block_end += per_block;
        }
        for (int l = 0; l < kPanelLanes; ++l)  // code x scale (+ min: one rounding, as written)
          lanes_store(wf + k * kPanel + l * kLanes,
                      dequantized(lanes_load(row + l * kLanes), scale + l * kLanes,
                                  mins == nullptr ? nullptr : offset + l * kLanes));
      }
    }
    chunk_sums_all(x, rows, in, chunk, sums, i0 == 0, i0 + kChunkRows >= in ? y + c0 : nullptr,
                   out, std::is_same_v<W, float> ? ahead : 0);
  }
}

// The same for an int4 panel: each group's codes dequantized (scale x code + offset: the min,
// or -8 scale for symmetric codes), its low rows then its high rows, chunks of whole groups
// (or of part of one).
inline void int4_panel_many_rows(const float* x, int64_t rows, int64_t in, const uint8_t* panel,
                                 int64_t out, Scales s, const Scales* mins, int64_t groups,
                                 int64_t c0, float* y) {
  ManyRowsBuffers& buffers = many_rows_buffers(rows);
  float *wf = buffers.chunk.data(), *sums = buffers.sums.data(), scale[kPanel], offset[kPanel];
  int64_t per_group = in / groups, half = per_group / 2, ahead = prefetch_distance();
  int64_t most = std::min(kChunkRows / 2, half);  // packed rows of a group in one chunk
  Chunk chunk{wf, {}, {}, 0};
  bool first = true;
  for (int64_t g = 0; g < groups; ++g) {
    int4_group_tables(s, mins, g, c0, scale, offset);
    for (int64_t j0 = 0; j0 < half; j0 += most) {
      int64_t pairs = std::min(most, half - j0);
      float* at = wf + chunk.rows() * kPanel;
      for (int64_t j = 0; j < pairs; ++j) {
        const uint8_t* row = panel + (g * half + j0 + j) * kPanel;
        prefetch_span(row, kPanel, ahead);
        for (int l = 0; l < kPanelLanes; ++l) {
          Codes codes = codes_load(row + l * kLanes);
          Lanes sc = lanes_load(scale + l * kLanes), off = lanes_load(offset + l * kLanes);
          lanes_store(at + j * kPanel + l * kLanes, lanes_fma(codes_low(codes), sc, off));
          lanes_store(at + (pairs + j) * kPanel + l * kLanes,
                      lanes_fma(codes_high(codes), sc, off));
        }
      }
      int64_t low = g * per_group + j0;
      chunk.first[chunk.spans] = low, chunk.count[chunk.spans++] = pairs;
      chunk.first[chunk.spans] = low + half, chunk.count[chunk.spans++] = pairs;
      bool last = g + 1 == groups && j0 + pairs == half;
      if (!last && chunk.rows() + 2 * most <= kChunkRows && chunk.spans < Chunk::kMaxSpans)
        continue;  // room for the next group's rows
      chunk_sums_all(x, rows, in, chunk, sums, first, last ? y + c0 : nullptr, out);
      first = false;
      chunk.spans = 0;
    }
  }
}
