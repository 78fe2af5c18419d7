// Greedy sampling's argmax over a step's logits [B, V] (float32) -> [B] int32, numpy's rule:
// the first maximum, or the first NaN of a row that has one. XLA:CPU's two reductions (its max
// a reduce-window) ran several times slower than this one pass, and XLA's vector max dropped
// NaNs (BENCHMARKS.md, "Decode step overheads").
#include "cpu_kernels.h"

#include <limits>

namespace {

typedef int32_t i32x8 __attribute__((vector_size(32)));

// The row's first NaN, or -1 (the rare path: a scan after the vector pass saw one).
int64_t first_nan(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (x[i] != x[i]) return i;
  return -1;
}

// One pass: each lane keeps its first maximum and where it was (strictly greater replaces), a
// NaN counted apart (it fails both comparisons); the least index among the lanes holding the
// row's maximum is the row's first.
int32_t row_argmax(const float* x, int64_t n) {
  int64_t whole = n / 8 * 8, at = 0;
  float top = -std::numeric_limits<float>::infinity();
  bool nan = false;
  if (whole > 0) {
    f32x8 best = {top, top, top, top, top, top, top, top};
    i32x8 index = {0, 1, 2, 3, 4, 5, 6, 7}, where = index, nans = index - index;
    for (int64_t i = 0; i < whole; i += 8, index += 8) {
      f32x8 v = load8(x + i);
      i32x8 greater = v > best;
      best = greater ? v : best;
      where = greater ? index : where;
      nans |= v != v;
    }
    for (int k = 0; k < 8; ++k) top = best[k] > top ? best[k] : top, nan |= nans[k] != 0;
    at = n;
    for (int k = 0; k < 8; ++k)
      if (best[k] == top && where[k] < at) at = where[k];
  }
  for (int64_t i = whole; i < n; ++i) {  // the tail: later than every lane's index
    if (x[i] > top) top = x[i], at = i;
    nan |= x[i] != x[i];
  }
  if (nan) return static_cast<int32_t>(first_nan(x, n));
  return static_cast<int32_t>(at);
}

ffi::Error greedy_tokens(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                         ffi::ResultBuffer<ffi::S32> tokens) {
  auto d = logits.dimensions();
  if (d.size() != 2 || d[1] < 1 || d[1] > std::numeric_limits<int32_t>::max() ||
      tokens->element_count() != d[0])
    return ffi::Error::InvalidArgument(
        "greedy_tokens: logits must be [B, V] float32 with 1 <= V < 2^31, tokens [B] int32");
  const float* x = logits.typed_data();
  int32_t* y = tokens->typed_data();
  int64_t rows = d[0], vocab = d[1];
  auto run = [=](int64_t b) { y[b] = row_argmax(x + b * vocab, vocab); };
  if (rows * vocab < (1 << 17)) {  // a few rows: a handoff to a thread costs more
    for (int64_t b = 0; b < rows; ++b) run(b);
  } else {
    parallel_chunks(pool, rows, run);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RuntimeGreedyTokens, greedy_tokens,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
