// Greedy sampling's argmax over a step's logits [B, V] (float32) -> [B] int32, numpy's rule:
// the first maximum, or the first NaN of a row that has one. XLA:CPU ran jnp.max over the
// vocabulary as a reduce-window, ~3.6 GB/s on one thread (58 us a step for V 32000; ~700 us for
// 16 x 49152), and its vector max drops NaNs (BENCHMARKS.md, "Greedy tokens in a kernel").
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

int32_t row_argmax(const float* x, int64_t n) {
  const float lowest = -std::numeric_limits<float>::infinity();
  f32x8 best = {lowest, lowest, lowest, lowest, lowest, lowest, lowest, lowest};
  i32x8 nans = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t whole = n / 8 * 8;
  for (int64_t i = 0; i < whole; i += 8) {  // a NaN fails both comparisons: counted apart
    f32x8 v = load8(x + i);
    best = v > best ? v : best;
    nans |= v != v;
  }
  float top = lowest;
  bool nan = false;
  for (int k = 0; k < 8; ++k) top = best[k] > top ? best[k] : top, nan |= nans[k] != 0;
  for (int64_t i = whole; i < n; ++i) top = x[i] > top ? x[i] : top, nan |= x[i] != x[i];
  if (nan) return static_cast<int32_t>(first_nan(x, n));
  for (int64_t i = 0; i < n; ++i)  // the first index holding it (all -inf: index 0)
    if (x[i] == top) return static_cast<int32_t>(i);
  return 0;
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
  if (rows * vocab < (1 << 17)) {  // a row or two: a handoff to a thread costs more
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
