// Few-row (decode) matmuls for XLA:CPU through XLA's FFI: each streams its weight once from
// memory, widening int8 (or reading float32) in registers, never a float32 copy of a block.
// Built and registered by cpu_kernels.py; exactness is float32 accumulation (order differs
// from XLA's dot, so results agree within float32 rounding, not bit for bit).
//
// Shapes: x [M, I] float32 rows; a row-major weight w [I, O] (int8 or float32) with scales
// s [R, O] (one row per block of I/R input rows); or a transposed weight w [O, I] with s [R, O].
// y [M, O] float32 = sum_r s[r, :] * (x[:, rows of r] @ w[rows of r, :]).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float f32x8 __attribute__((vector_size(32)));
typedef int8_t i8x8 __attribute__((vector_size(8)));

inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f32x8 load8(const int8_t* p) {
#if defined(__AVX2__)  // GCC's __builtin_convertvector widens int8 lane by lane
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (f32x8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
#else
  i8x8 v;
  std::memcpy(&v, p, sizeof v);
  return __builtin_convertvector(v, f32x8);
#endif
}
inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }
inline float hsum(f32x8 v) {
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  return v[0];
}

// Scale tables as stored ([R, O] in float32, float16 or bfloat16), read as float32 here: a
// conversion in XLA first would write (and this then read) a float32 copy on every call.
struct Scales {
  const void* data;
  ffi::DataType type;

  float at(int64_t k) const {
    if (type == ffi::DataType::F32) return static_cast<const float*>(data)[k];
    uint16_t bits = static_cast<const uint16_t*>(data)[k];
    if (type == ffi::DataType::BF16) {
      uint32_t wide = uint32_t(bits) << 16;
      float value;
      std::memcpy(&value, &wide, sizeof value);
      return value;
    }
#if defined(__F16C__)
    return _cvtsh_ss(bits);
#else
    return float(reinterpret_cast<const _Float16&>(bits));
#endif
  }
  // dst[0:n] = the scales at k:k+n, one loop per dtype (vectorised, no test per element)
  void copy(float* dst, int64_t k, int64_t n) const {
    if (type == ffi::DataType::F32) {
      std::memcpy(dst, static_cast<const float*>(data) + k, n * sizeof(float));
      return;
    }
    const uint16_t* bits = static_cast<const uint16_t*>(data) + k;
    if (type == ffi::DataType::BF16) {
      for (int64_t j = 0; j < n; ++j) {
        uint32_t wide = uint32_t(bits[j]) << 16;
        std::memcpy(dst + j, &wide, sizeof wide);
      }
      return;
    }
    int64_t j = 0;
#if defined(__F16C__)
    for (; j + 8 <= n; j += 8)
      _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + j))));
#endif
    for (; j < n; ++j) dst[j] = at(k + j);
  }
  const void* address(int64_t k) const {
    return static_cast<const char*>(data) + k * (type == ffi::DataType::F32 ? 4 : 2);
  }
};

// A Scales view of an FFI buffer; false for other element types.
bool scales_of(const ffi::AnyBuffer& buffer, Scales* scales) {
  ffi::DataType type = buffer.element_type();
  if (type != ffi::DataType::F32 && type != ffi::DataType::F16 && type != ffi::DataType::BF16)
    return false;
  *scales = Scales{buffer.untyped_data(), type};
  return true;
}

// Runs chunk(c) for c in [0, chunks) on the caller and on XLA's intra-op threads. Helpers take
// chunks from a shared counter; the caller waits only for chunks a running thread has taken, so
// a helper task that starts late (or never, in a busy pool) cannot stall the call.
struct Chunks {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t count = 0;
  std::function<void(int64_t)> run;

  void drain() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < count;) {
      run(c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void parallel_chunks(ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> run) {
  auto work = std::make_shared<Chunks>();
  work->count = count;
  work->run = std::move(run);
  int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work->drain(); });
  work->drain();
  while (work->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
  work->run = nullptr;  // late helpers find no chunk and never call it
}

// Calls f(std::integral_constant<int, MB>{}) with MB = min(4, rows): the kernels take x rows
// four at a time, their count a compile-time constant (sums held in registers).
template <typename F>
inline void with_row_count(int64_t rows, F&& f) {
  switch (std::min<int64_t>(4, rows)) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// Column chunks of whole 64-column tiles (a cache line of int8), at least two per thread.
int64_t column_chunk(int64_t out, int64_t threads) {
  int64_t tiles = (out + 63) / 64;
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(tiles, 2 * std::max<int64_t>(threads, 1)));
  return (tiles + chunks - 1) / chunks * 64;
}

#ifdef __AVX512F__
inline __m512 load16(const int8_t* p) {
  __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
}

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
                      ffi::AnyBuffer s, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), sd = s.dimensions();
  Scales sp;
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 2 || xd[1] != wd[0] || sd[1] != wd[1] ||
      sd[0] < 1 || wd[0] % sd[0] != 0 || !scales_of(s, &sp))
    return ffi::Error::InvalidArgument(
        "rows_major: shapes must be x [M, I], w [I, O], s [R, O] (float32, float16, bfloat16)");
  int64_t rows_x = xd[0], in = xd[1], out = wd[1], blocks = sd[0];
  const float* xp = x.typed_data();
  const W* wp = reinterpret_cast<const W*>(w.untyped_data());
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
  if (o0 + kAheadRows + OB <= out) {
    const char* ahead = reinterpret_cast<const char*>(w + (o0 + kAheadRows) * in);
    for (int64_t byte = 0; byte < int64_t(OB * in * sizeof(W)); byte += 64)
      __builtin_prefetch(ahead + byte);
  }
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

template <int MB, typename W>
void transposed_block(const float* x, int64_t in, const W* w, int64_t out, Scales s,
                      int64_t blocks, int64_t o0, int64_t o1, float* y) {
  constexpr int OB = MB == 1 ? 4 : MB == 2 ? 2 : 1;
  std::vector<float> tile(blocks * kScaleTile);
  for (int64_t t = o0; t < o1; t += kScaleTile) {
    int64_t rows = std::min(kScaleTile, o1 - t);
    for (int64_t b = 0; b < blocks; ++b) {
      s.copy(tile.data() + b * kScaleTile, b * out + t, rows);
      if (t + 8 * kScaleTile < out) __builtin_prefetch(s.address(b * out + t + 8 * kScaleTile));
    }
    int64_t o = t;
    for (; o + OB <= t + rows; o += OB)
      transposed_rows<MB, OB>(x, in, w, out, tile.data() + (o - t), blocks, o, y);
    for (; o < t + rows; ++o)
      transposed_rows<MB, 1>(x, in, w, out, tile.data() + (o - t), blocks, o, y);
  }
}

template <typename W>
void transposed_chunk(const float* x, int64_t rows_x, int64_t in, const W* w, int64_t out,
                      Scales s, int64_t blocks, int64_t o0, int64_t o1, float* y) {
  for (int64_t m0 = 0; m0 < rows_x; m0 += 4) {
    const float* xm = x + m0 * in;
    float* ym = y + m0 * out;
    with_row_count(rows_x - m0, [&](auto mb) {
      transposed_block<decltype(mb)::value>(xm, in, w, out, s, blocks, o0, o1, ym);
    });
  }
}

template <ffi::DataType T, typename W>
ffi::Error transposed(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w,
                      ffi::AnyBuffer s, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), sd = s.dimensions();
  Scales sp;
  if (!scales_of(s, &sp) || xd.size() != 2 || wd.size() != 2 || sd.size() != 2 || xd[1] != wd[1] || sd[1] != wd[0] ||
      sd[0] < 1 || wd[1] % sd[0] != 0 || (wd[1] / sd[0]) % 8 != 0)
    return ffi::Error::InvalidArgument(
        "transposed: shapes must be x [M, I], w [O, I], s [R, O], I/R a multiple of 8");
  int64_t rows_x = xd[0], in = xd[1], out = wd[0], blocks = sd[0];
  const float* xp = x.typed_data();
  const W* wp = reinterpret_cast<const W*>(w.untyped_data());
  float* yp = y->typed_data();
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t chunks = std::min<int64_t>(out, 4 * threads);
  int64_t per_chunk = (out + chunks - 1) / chunks;
  parallel_chunks(pool, chunks, [=](int64_t c) {
    transposed_chunk<W>(xp, rows_x, in, wp, out, sp, blocks, c * per_chunk,
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

#define RUNTIME_BIND(T)                                                                   \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<T>>() \
      .Arg<ffi::AnyBuffer>().Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(RuntimeInt8Rows, (rows_major<ffi::S8, int8_t>), RUNTIME_BIND(ffi::S8));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RuntimeF32Rows, (rows_major<ffi::F32, float>), RUNTIME_BIND(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(RuntimeInt8Transposed, (transposed<ffi::S8, int8_t>),
                              RUNTIME_BIND(ffi::S8));
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
