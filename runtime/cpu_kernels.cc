// Few-row (decode) matmuls for XLA:CPU through XLA's FFI: each streams its weight once from
// memory, widening int8 (or reading float32) in registers, never a float32 copy of a block.
// Built and registered by cpu_kernels.py; exactness is float32 accumulation (order differs
// from XLA's dot, so results agree within float32 rounding, not bit for bit).
//
// Shapes: x [M, I] float32 rows; a row-major weight w [I, O] (int8 or float32) with scales
// s [R, O] (one row per block of I/R input rows); or a transposed weight w [O, I] with s [R, O].
// y [M, O] float32 = sum_r s[r, :] * (x[:, rows of r] @ w[rows of r, :]).

#include "cpu_kernels.h"

namespace {

// Column chunks of whole 64-column tiles (a cache line of int8), at least two per thread.
int64_t column_chunk(int64_t out, int64_t threads) {
  int64_t tiles = (out + 63) / 64;
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(tiles, 2 * std::max<int64_t>(threads, 1)));
  return (tiles + chunks - 1) / chunks * 64;
}

#ifdef __AVX512F__

// rows_sweep's inner loop over 16 columns at a time where AVX-512 is there: a third fewer
// instructions per weight byte than the 8-lane loop; returns the first column it left.
template <int MB>
inline int64_t rows_sweep16(const float (&xs)[MB][4], const int8_t* r, int64_t out, int64_t c0,
                            int64_t c1, float* part, int64_t width) {
  __m512 xv[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int k = 0; k < 4; ++k) xv[m][k] = _mm512_set1_ps(xs[m][k]);
  int64_t c = c0;
  for (; c + 16 <= c1; c += 16) {
    __m512 w0 = load16(r + c), w1 = load16(r + out + c), w2 = load16(r + 2 * out + c),
           w3 = load16(r + 3 * out + c);
    for (int m = 0; m < MB; ++m) {
      float* pp = part + m * width + (c - c0);
      __m512 acc = _mm512_fmadd_ps(xv[m][0], w0, _mm512_loadu_ps(pp));
      acc = _mm512_fmadd_ps(xv[m][1], w1, acc);
      acc = _mm512_fmadd_ps(xv[m][2], w2, acc);
      _mm512_storeu_ps(pp, _mm512_fmadd_ps(xv[m][3], w3, acc));
    }
  }
  return c;
}
#endif

// part[m, :] (row stride `width`) += x[m, i0:i1] @ w[i0:i1, c0:c1] for MB <= 4 x rows, four
// weight rows at a time: the weight streams row after row (sequential reads, which the
// hardware prefetches), the partial sums stay in L1.
template <int MB, typename W>
void rows_sweep(const float* x, int64_t in, const W* w, int64_t out, int64_t i0, int64_t i1,
                int64_t c0, int64_t c1, float* part, int64_t width) {
  int64_t vec_end = c0 + (c1 - c0) / 8 * 8;
  int64_t i = i0;
  for (; i + 4 <= i1; i += 4) {
    const W* r = w + i * out;
    float xs[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int k = 0; k < 4; ++k) xs[m][k] = x[m * in + i + k];
    int64_t c = c0;
#ifdef __AVX512F__
    if constexpr (std::is_same_v<W, int8_t>) c = rows_sweep16<MB>(xs, r, out, c0, c1, part, width);
#endif
    for (; c < vec_end; c += 8) {
      f32x8 w0 = load8(r + c), w1 = load8(r + out + c), w2 = load8(r + 2 * out + c),
            w3 = load8(r + 3 * out + c);
      for (int m = 0; m < MB; ++m) {
        float* pp = part + m * width + (c - c0);
        store8(pp, load8(pp) + xs[m][0] * w0 + xs[m][1] * w1 + xs[m][2] * w2 + xs[m][3] * w3);
      }
    }
    for (int64_t c = vec_end; c < c1; ++c)
      for (int m = 0; m < MB; ++m)
        for (int k = 0; k < 4; ++k) part[m * width + (c - c0)] += xs[m][k] * float(r[k * out + c]);
  }
  for (; i < i1; ++i)
    for (int m = 0; m < MB; ++m)
      for (int64_t c = c0; c < c1; ++c)
        part[m * width + (c - c0)] += x[m * in + i] * float(w[i * out + c]);
}

// y[:, c0:c1] = x[:, r0:r1] @ w[r0:r1, c0:c1] for a row-major weight, the rows taken in
// segments within one scale block each: a segment's partial sums, scaled into y.
template <typename W>
void rows_major_chunk(const float* x, int64_t rows_x, int64_t in, const W* w, int64_t out,
                      Scales s, int64_t blocks, int64_t r0, int64_t r1, int64_t c0,
                      int64_t c1, float* y) {
  int64_t width = c1 - c0, per_block = in / blocks;
  std::vector<float> part(rows_x * width), scale(width);
  for (int64_t m = 0; m < rows_x; ++m) std::fill(y + m * out + c0, y + m * out + c1, 0.f);
  for (int64_t i0 = r0, i1; i0 < r1; i0 = i1) {
    int64_t b = i0 / per_block;
    i1 = std::min(r1, (b + 1) * per_block);
    std::fill(part.begin(), part.end(), 0.f);
    for (int64_t m0 = 0; m0 < rows_x; m0 += 4) {
      const float* xm = x + m0 * in;
      float* pm = part.data() + m0 * width;
      with_row_count(rows_x - m0, [&](auto mb) {
        rows_sweep<decltype(mb)::value>(xm, in, w, out, i0, i1, c0, c1, pm, width);
      });
    }
    s.copy(scale.data(), b * out + c0, width);
    for (int64_t m = 0; m < rows_x; ++m)
      for (int64_t c = c0; c < c1; ++c)
        y[m * out + c] += part[m * width + (c - c0)] * scale[c - c0];
  }
}

template <ffi::DataType T, typename W>
ffi::Error rows_major(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w,
                      ffi::AnyBuffer s, ffi::Buffer<ffi::S32> layer,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  Operands op;
  if (!operands_of(w, sizeof(W), s, layer, &op) || xd.size() != 2 || xd[1] != op.a ||
      op.cols != op.b || op.a % op.blocks != 0)
    return ffi::Error::InvalidArgument(
        "rows_major: shapes must be x [M, I], w [I, O], s [R, O] (float32, float16, bfloat16), "
        "or stacks [L, I, O], [L, R, O] with a layer in range");
  int64_t rows_x = xd[0], in = op.a, out = op.b, blocks = op.blocks;
  Scales sp = op.s;
  const float* xp = x.typed_data();
  const W* wp = static_cast<const W*>(op.w);
  float* yp = y->typed_data();
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (threads > 1 && in >= 8 * threads) {
    // Each thread streams whole rows into its own partial output; the partials are summed in
    // order. Column chunks (a few lines of each row, then a jump) streamed a weight from
    // memory at 11-12 GB/s on 2 threads, whole rows at 17-20 (BENCHMARKS.md, "CPU kernels").
    int64_t step = (in + threads - 1) / threads;
    step = (step + 3) / 4 * 4;
    int64_t chunks = (in + step - 1) / step;
    std::vector<float> partial(chunks * rows_x * out);
    float* pp = partial.data();
    parallel_chunks(pool, chunks, [=](int64_t c) {
      rows_major_chunk<W>(xp, rows_x, in, wp, out, sp, blocks, c * step,
                          std::min(in, (c + 1) * step), 0, out, pp + c * rows_x * out);
    });
    std::copy(pp, pp + rows_x * out, yp);
    for (int64_t c = 1; c < chunks; ++c)
      for (int64_t k = 0; k < rows_x * out; ++k) yp[k] += pp[c * rows_x * out + k];
    return ffi::Error::Success();
  }
  int64_t width = column_chunk(out, threads);
  int64_t chunks = (out + width - 1) / width;
  parallel_chunks(pool, chunks, [=](int64_t c) {
    rows_major_chunk<W>(xp, rows_x, in, wp, out, sp, blocks, 0, in, c * width,
                        std::min(out, (c + 1) * width), yp);
  });
  return ffi::Error::Success();
}

// y[m0:m0+MB, o0:o0+OB] for a transposed weight w [O, I]: per scale block and pair (x row,
// output row), an 8-lane sum, scaled into a running 8-lane total, summed across lanes once.
// MB * OB independent totals hide the add latency of one block after another.
constexpr int64_t kAheadRows = 64;
// Output rows whose scales are copied out together: the R rows of s [R, O] lie a multiple of
// 4 KiB apart for the usual vocabularies, so their lines share cache sets and evict each
// other; one line of each, copied to a small buffer, serves 16 output rows.
constexpr int64_t kScaleTile = 16;

// y[m0:m0+MB, o0:o0+OB] for a transposed weight w [O, I]: per scale block and pair (x row,
// output row), an 8-lane sum, scaled into a running 8-lane total, summed across lanes once.
// MB * OB independent totals hide the add latency of one block after another. The scale of
// block b and output row o0 + k is scales[b * kScaleTile + k].
template <int MB, int OB, typename W>
inline void transposed_rows(const float* x, int64_t in, const W* w, int64_t out,
                            const float* scales, int64_t blocks, int64_t o0, float* y) {
  int64_t per_block = in / blocks;
  // Software prefetch kAheadRows output rows ahead: one sequential stream from memory ran at
  // a fifth of the bandwidth on the hardware prefetcher alone.
  if (o0 + kAheadRows + OB <= out)
    prefetch_span(w + o0 * in, OB * in * sizeof(W), kAheadRows * in * sizeof(W));
  f32x8 total[MB][OB] = {};
  for (int64_t b = 0; b < blocks; ++b) {
    f32x8 sum[MB][OB] = {};
    for (int64_t i = b * per_block; i < (b + 1) * per_block; i += 8) {
      f32x8 xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = load8(x + m * in + i);
      for (int o = 0; o < OB; ++o) {
        f32x8 wv = load8(w + (o0 + o) * in + i);
        for (int m = 0; m < MB; ++m) sum[m][o] += xv[m] * wv;
      }
    }
    for (int o = 0; o < OB; ++o) {
      float scale = scales[b * kScaleTile + o];
      for (int m = 0; m < MB; ++m) total[m][o] += sum[m][o] * scale;
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int o = 0; o < OB; ++o) y[m * out + o0 + o] = hsum(total[m][o]);
}

// tile[b * kScaleTile + k] = the scale of block b for output row t + k (k < rows), from s
// [R, O] (one line of each of its R rows), or with `row_scales` from s [O, R]: one contiguous
// read, where R rows 2-4 O bytes apart are R streams per tile, which the hardware prefetcher
// loses (BENCHMARKS.md, "int8 x int8 products", "The head's scales").
inline void scale_tile(Scales s, int64_t blocks, int64_t out, int64_t t, int64_t rows,
                       bool row_scales, float* buffer, float* tile) {
  if (row_scales) {
    s.copy(buffer, t * blocks, rows * blocks);
    for (int64_t k = 0; k < rows; ++k)
      for (int64_t b = 0; b < blocks; ++b) tile[b * kScaleTile + k] = buffer[k * blocks + b];
    return;
  }
  for (int64_t b = 0; b < blocks; ++b) {
    s.copy(tile + b * kScaleTile, b * out + t, rows);
    if (t + 8 * kScaleTile < out) __builtin_prefetch(s.address(b * out + t + 8 * kScaleTile));
  }
}

template <int MB, typename W>
void transposed_block(const float* x, int64_t in, const W* w, int64_t out, Scales s,
                      int64_t blocks, bool row_scales, int64_t o0, int64_t o1, float* y) {
  constexpr int OB = MB == 1 ? 4 : MB == 2 ? 2 : 1;
  std::vector<float> tile(blocks * kScaleTile), buffer(row_scales ? blocks * kScaleTile : 0);
  for (int64_t t = o0; t < o1; t += kScaleTile) {
    int64_t rows = std::min(kScaleTile, o1 - t);
    scale_tile(s, blocks, out, t, rows, row_scales, buffer.data(), tile.data());
    int64_t o = t;
    for (; o + OB <= t + rows; o += OB)
      transposed_rows<MB, OB>(x, in, w, out, tile.data() + (o - t), blocks, o, y);
    for (; o < t + rows; ++o)
      transposed_rows<MB, 1>(x, in, w, out, tile.data() + (o - t), blocks, o, y);
  }
}

#ifdef __AVX512F__
// y[m, o + k] (m < MB <= 4, k < OB) of a float32 w [O, I] with one scale per output row: MB x OB
// sums in registers, each 16-float load of x or w used OB or MB times.
template <int MB, int OB>
inline void float_tile(const float* x, int64_t in, const float* w, int64_t out, Scales s,
                       int64_t o, float* y) {
  __m512 sum[MB][OB];
  for (int m = 0; m < MB; ++m)
    for (int k = 0; k < OB; ++k) sum[m][k] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= in; i += 16) {
    __m512 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_ps(x + m * in + i);
    for (int k = 0; k < OB; ++k) {
      __m512 wv = _mm512_loadu_ps(w + (o + k) * in + i);
      for (int m = 0; m < MB; ++m) sum[m][k] = _mm512_fmadd_ps(xv[m], wv, sum[m][k]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int k = 0; k < OB; ++k) {
      float total = _mm512_reduce_add_ps(sum[m][k]);
      for (int64_t j = i; j < in; ++j) total += x[m * in + j] * w[(o + k) * in + j];
      y[m * out + o + k] = total * s.at(o + k);
    }
}

// y[:rows_x, o0:o1] of a float32 w [O, I] with one scale per output row, for 5-16 x rows: per
// block of six output rows (in L1 after its first use), every block of four x rows in turn, so
// the weight streams from memory once whatever the row count (transposed_block: once per four).
void transposed_float_rows(const float* x, int64_t rows_x, int64_t in, const float* w,
                           int64_t out, Scales s, int64_t o0, int64_t o1, float* y) {
  constexpr int OB = 6;
  int64_t o = o0;
  for (; o + OB <= o1; o += OB) {
    if (o + 2 * OB <= o1)  // the next block's rows, while this one's are multiplied
      for (int64_t i = 0; i < OB * in; i += 16) __builtin_prefetch(w + (o + OB) * in + i);
    for (int64_t m0 = 0; m0 < rows_x; m0 += 4)
      with_row_count(rows_x - m0, [&](auto mb) {
        float_tile<decltype(mb)::value, OB>(x + m0 * in, in, w, out, s, o, y + m0 * out);
      });
  }
  for (; o < o1; ++o)
    for (int64_t m0 = 0; m0 < rows_x; m0 += 4)
      with_row_count(rows_x - m0, [&](auto mb) {
        float_tile<decltype(mb)::value, 1>(x + m0 * in, in, w, out, s, o, y + m0 * out);
      });
}
#endif

template <typename W>
void transposed_chunk(const float* x, int64_t rows_x, int64_t in, const W* w, int64_t out,
                      Scales s, int64_t blocks, bool row_scales, int64_t o0, int64_t o1,
                      float* y) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<W, float>) {
    if (blocks == 1 && rows_x > 4) {
      transposed_float_rows(x, rows_x, in, w, out, s, o0, o1, y);
      return;
    }
  }
#endif
  for (int64_t m0 = 0; m0 < rows_x; m0 += 4) {
    const float* xm = x + m0 * in;
    float* ym = y + m0 * out;
    with_row_count(rows_x - m0, [&](auto mb) {
      transposed_block<decltype(mb)::value>(xm, in, w, out, s, blocks, row_scales, o0, o1, ym);
    });
  }
}

// RowScales: s stored [O, R] (one row per output row) instead of [R, O].
template <ffi::DataType T, typename W, bool RowScales = false>
ffi::Error transposed(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w,
                      ffi::AnyBuffer s, ffi::Buffer<ffi::S32> layer,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  Operands op;
  bool valid = operands_of(w, sizeof(W), s, layer, &op);
  if (RowScales) std::swap(op.blocks, op.cols);  // [O, R]: R blocks of O columns
  if (!valid || xd.size() != 2 || xd[1] != op.b || op.cols != op.a || op.blocks < 1 ||
      op.b % op.blocks != 0 || (op.b / op.blocks) % 8 != 0)
    return ffi::Error::InvalidArgument(
        "transposed: shapes must be x [M, I], w [O, I], s [R, O] (or [O, R] as row scales; "
        "or stacks [L, ...] with a layer in range), I/R a multiple of 8");
  int64_t rows_x = xd[0], in = op.b, out = op.a, blocks = op.blocks;
  Scales sp = op.s;
  const float* xp = x.typed_data();
  const W* wp = static_cast<const W*>(op.w);
  float* yp = y->typed_data();
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t chunks = std::min<int64_t>(out, 4 * threads);
  int64_t per_chunk = (out + chunks - 1) / chunks;
  parallel_chunks(pool, chunks, [=](int64_t c) {
    transposed_chunk<W>(xp, rows_x, in, wp, out, sp, blocks, RowScales, c * per_chunk,
                        std::min(out, (c + 1) * per_chunk), yp);
  });
  return ffi::Error::Success();
}

// --- int4: codes 0..15 two per byte, [I/2, O], in GGUF's Q4 block layout (within a group of n
// rows, byte row j holds row j in its low nibble and row j + n/2 in its high one); a weight
// value is code * s[g, o] + offset[g, o] (offset -8 s when symmetric, the min otherwise).

typedef int32_t i32x8 __attribute__((vector_size(32)));

inline i32x8 load8_bytes(const uint8_t* p) {
#if defined(__AVX2__)
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (i32x8)_mm256_cvtepu8_epi32(bytes);
#else
  i32x8 v;
  for (int k = 0; k < 8; ++k) v[k] = p[k];
  return v;
#endif
}

// part[m, :] (row stride `width`) += sum over the group's rows of x[m, row] * code[row, c0:c1],
// R byte rows (2R weight rows) at a time; `xg` points at the group's first input.
template <int MB, int R>
inline void int4_byte_rows(const float* xg, int64_t in, const uint8_t* rows, int64_t out,
                           int64_t j, int64_t half, int64_t c0, int64_t c1, float* part,
                           int64_t width) {
  float lo[MB][R], hi[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      lo[m][r] = xg[m * in + j + r];
      hi[m][r] = xg[m * in + j + r + half];
    }
  int64_t vec_end = c0 + (c1 - c0) / 8 * 8;
  for (int64_t c = c0; c < vec_end; c += 8) {
    f32x8 low[R], high[R];
    for (int r = 0; r < R; ++r) {
      i32x8 v = load8_bytes(rows + r * out + c);
      low[r] = __builtin_convertvector(v & 15, f32x8);
      high[r] = __builtin_convertvector(v >> 4, f32x8);
    }
    for (int m = 0; m < MB; ++m) {
      float* pp = part + m * width + (c - c0);
      f32x8 sum = load8(pp);
      for (int r = 0; r < R; ++r) sum += lo[m][r] * low[r] + hi[m][r] * high[r];
      store8(pp, sum);
    }
  }
  for (int64_t c = vec_end; c < c1; ++c)
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r)
        part[m * width + (c - c0)] += lo[m][r] * float(rows[r * out + c] & 15) +
                                      hi[m][r] * float(rows[r * out + c] >> 4);
}

template <int MB>
void int4_group_sweep(const float* xg, int64_t in, const uint8_t* bytes, int64_t out, int64_t n,
                      int64_t c0, int64_t c1, float* part, int64_t width) {
  int64_t half = n / 2, j = 0;
  for (; j + 4 <= half; j += 4)
    int4_byte_rows<MB, 4>(xg, in, bytes + j * out, out, j, half, c0, c1, part, width);
  for (; j < half; j += 2)
    int4_byte_rows<MB, 2>(xg, in, bytes + j * out, out, j, half, c0, c1, part, width);
}

// y[:, c0:c1] for an int4 weight: per group, the code sums scaled, plus the offsets times the
// group's input sums.
void int4_chunk(const float* x, int64_t rows_x, int64_t in, const uint8_t* packed, int64_t out,
                const float* s, const float* offset, int64_t groups, int64_t c0, int64_t c1,
                float* y) {
  int64_t width = c1 - c0, n = in / groups;
  std::vector<float> part(rows_x * width);
  for (int64_t m = 0; m < rows_x; ++m) std::fill(y + m * out + c0, y + m * out + c1, 0.f);
  for (int64_t g = 0; g < groups; ++g) {
    std::fill(part.begin(), part.end(), 0.f);
    const uint8_t* bytes = packed + g * (n / 2) * out;
    for (int64_t m0 = 0; m0 < rows_x; m0 += 4) {
      const float* xg = x + m0 * in + g * n;
      float* pm = part.data() + m0 * width;
      with_row_count(rows_x - m0, [&](auto mb) {
        int4_group_sweep<decltype(mb)::value>(xg, in, bytes, out, n, c0, c1, pm, width);
      });
    }
    const float* scale = s + g * out;
    const float* shift = offset + g * out;
    for (int64_t m = 0; m < rows_x; ++m) {
      float xsum = 0.f;
      for (int64_t i = 0; i < n; ++i) xsum += x[m * in + g * n + i];
      for (int64_t c = c0; c < c1; ++c)
        y[m * out + c] += part[m * width + (c - c0)] * scale[c] + xsum * shift[c];
    }
  }
}

ffi::Error int4_rows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> packed,
                     ffi::Buffer<ffi::F32> s, ffi::Buffer<ffi::F32> offset,
                     ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), pd = packed.dimensions(), sd = s.dimensions(), od = offset.dimensions();
  if (xd.size() != 2 || pd.size() != 2 || sd.size() != 2 || od.size() != 2 || xd[1] != 2 * pd[0] ||
      sd[1] != pd[1] || od[0] != sd[0] || od[1] != sd[1] || sd[0] < 1 || xd[1] % sd[0] != 0 ||
      (xd[1] / sd[0]) % 4 != 0)
    return ffi::Error::InvalidArgument(
        "int4_rows: shapes must be x [M, I], packed [I/2, O], s and offset [G, O], I/G a "
        "multiple of 4");
  int64_t rows_x = xd[0], in = xd[1], out = pd[1], groups = sd[0];
  const float* xp = x.typed_data();
  const uint8_t* pp = packed.typed_data();
  const float* sp = s.typed_data();
  const float* op = offset.typed_data();
  float* yp = y->typed_data();
  int64_t width = column_chunk(out, pool.num_threads());
  int64_t chunks = (out + width - 1) / width;
  parallel_chunks(pool, chunks, [=](int64_t c) {
    int4_chunk(xp, rows_x, in, pp, out, sp, op, groups, c * width, std::min(out, (c + 1) * width), yp);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RuntimeInt8Rows, (rows_major<ffi::S8, int8_t>), RUNTIME_BIND(ffi::S8));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RuntimeF32Rows, (rows_major<ffi::F32, float>), RUNTIME_BIND(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RuntimeInt8Transposed, (transposed<ffi::S8, int8_t>),
                              RUNTIME_BIND(ffi::S8));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RuntimeInt8TransposedRowScales,
                              (transposed<ffi::S8, int8_t, true>), RUNTIME_BIND(ffi::S8));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RuntimeF32Transposed, (transposed<ffi::F32, float>),
                              RUNTIME_BIND(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RuntimeInt4Rows, int4_rows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The panel streams' prefetch distance in bytes (prefetch_distance), for reports and tests.
extern "C" int64_t RuntimeKernelPrefetchBytes() { return prefetch_distance(); }
extern "C" int64_t RuntimeKernelFloatPrefetchBytes() { return prefetch_distance(true); }
// How many blocks ahead the scale tables' rows are asked for (table_blocks_ahead); 0: not.
extern "C" int64_t RuntimeKernelTableAhead() {
  return prefetch_tables() ? table_blocks_ahead() : 0;
}
