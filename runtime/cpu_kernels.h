// What the CPU kernels share: the scale tables as stored, one layer's operands of a stacked
// weight, the thread-pool split, the x-row count as a compile-time constant, the handlers'
// binding, kept apart from the kernels themselves (cpu_kernels.cc); internal to the file that
// includes it.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#if defined(__x86_64__) || defined(__i386__)  // F16C without AVX2, too (Ivy Bridge)
#include <cpuid.h>
#include <immintrin.h>
#endif
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {  // each including file gets its own copy

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
#ifdef __AVX512F__
inline __m512 load16(const int8_t* p) {  // 16 int8 widened to float32
  __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
}
#endif
inline float hsum(f32x8 v) {
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
  v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
  return v[0];
}

// A kernel setting from the environment (a count, at least 0), or `otherwise` where unset.
inline int64_t env_count(const char* name, int64_t otherwise) {
  const char* env = std::getenv(name);
  return env != nullptr ? std::max<int64_t>(0, std::atoll(env)) : otherwise;
}

// Whether this is an AMD CPU (cpuid's vendor string).
inline bool amd_cpu() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int eax, ebx, ecx, edx;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
  char vendor[12];
  std::memcpy(vendor, &ebx, 4), std::memcpy(vendor + 4, &edx, 4), std::memcpy(vendor + 8, &ecx, 4);
  return std::memcmp(vendor, "AuthenticAMD", 12) == 0;
#else
  return false;
#endif
}

// The CPU's family (cpuid leaf 1; the extended family added where the base one is 15): 0x19 for
// AMD's Zen 3 and Zen 4, 0x1A for Zen 5; 0 where cpuid does not answer.
inline unsigned cpu_family() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return 0;
  unsigned base = (eax >> 8) & 0xF;
  return base == 0xF ? base + ((eax >> 20) & 0xFF) : base;
#else
  return 0;
#endif
}

// Bytes ahead of a weight stream (a panel run, the KV memory) that the kernels ask the cache
// for; RUNTIME_KERNEL_PREFETCH overrides (0: none). The hardware prefetcher alone left a batch-1
// int8 decode at ~15 GB/s on an Intel VM whose float32 stream reached 27; 2 KB ahead gave 1.5x.
// On an AMD Zen 4 VM (AVX-512 builds) the hardware alone did better: int8-x decode 3-37% faster,
// the rest level. On an AMD Zen 3 VM (AVX2 builds) and a Zen 5 VM (AVX-512) quantized streams
// wanted it again (Zen 3: int8-x Q4_0 and Q4_K_M decode 1.2x, Q8_0 1.1x; Zen 5: Q4_K_M, Q5_K_M,
// Q4_0 1.1-1.25x) and float ones did not (F32 10% slower, level), so on AMD `float_stream`
// (float weights, the KV memory) keeps none, and quantized streams keep none on Zen 4 only
// (family 19h with AVX-512) (BENCHMARKS.md, "Software prefetch in the panel kernels",
// "Software prefetch by vendor", "AVX2 without AVX-512", "An AMD Zen 5 VM against llama.cpp").
inline int64_t prefetch_distance(bool float_stream = false) {
#ifdef __AVX512F__
  constexpr bool avx512 = true;
#else
  constexpr bool avx512 = false;
#endif
  static const bool amd = amd_cpu();
  static const bool zen4 = amd && avx512 && cpu_family() == 0x19;
  static const int64_t quantized =
      env_count("RUNTIME_KERNEL_PREFETCH", zen4 ? 0 : 2048) / 64 * 64;
  static const int64_t floats = env_count("RUNTIME_KERNEL_PREFETCH", amd ? 0 : 2048) / 64 * 64;
  return float_stream ? floats : quantized;
}

// Whether the kernels ask for a scale table's rows ahead of their block (cpu_panels.cc,
// prefetch_table_row), on either vendor: that stream (a row every block, O values apart)
// neither hardware prefetcher followed (Q4_K_M decode 4-7% slower without on the AMD VM);
// RUNTIME_KERNEL_PREFETCH_TABLES=0: not (the A/B).
inline bool prefetch_tables() {
  static const bool on = env_count("RUNTIME_KERNEL_PREFETCH_TABLES", 1) != 0;
  return on;
}

// How many blocks ahead those rows are asked for: 6, not the 2 it was, cut a Q4_K_M step ~9%
// and a Q6_K one ~15% on the AMD VM, where each row is a DRAM access of its own (BENCHMARKS.md,
// "Scale rows further ahead"); RUNTIME_KERNEL_TABLE_AHEAD overrides (the A/B).
inline int64_t table_blocks_ahead() {
  static const int64_t ahead = std::max<int64_t>(1, env_count("RUNTIME_KERNEL_TABLE_AHEAD", 6));
  return ahead;
}

// Asks for the cache lines of `bytes` bytes from p, `ahead` bytes further on (none when ahead
// is 0). always_inline: a prefetch has no side effects, so GCC deleted the calls it did not
// inline.
__attribute__((always_inline)) inline void prefetch_span(const void* p, int64_t bytes,
                                                         int64_t ahead) {
  if (ahead != 0)
    for (int64_t offset = 0; offset < bytes; offset += 64)
      __builtin_prefetch(static_cast<const char*>(p) + ahead + offset);
}

inline float half_to_float(uint16_t bits) {
#if defined(__F16C__)
  return _cvtsh_ss(bits);
#else
  return float(reinterpret_cast<const _Float16&>(bits));
#endif
}

inline float bf16_to_float(uint16_t bits) {  // a bf16 is a float32's upper 16 bits
  uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

// Scale tables as stored ([R, O], or [O, R] as row scales; float32, float16 or bfloat16), read
// as float32 here: a conversion in XLA first would write (and this then read) a float32 copy on
// every call. uint8 / int8: a panel weight's super-scaled table (super_scales.py: per block
// of 8 groups, 8 rows of unsigned / signed 8-bit sub-scales, then 2 rows of the block's f16
// super-scales [O]): group g's value is super * sub, exact in float32 (GGUF Q4_K, Q6_K).
constexpr int64_t kSuperGroups = 8, kSuperRows = kSuperGroups + 2;  // super_scales.py

struct Scales {
  const void* data;
  ffi::DataType type;
  int64_t cols = 0;  // O of an [R, O] table (operands_of): k = r * O + c

  bool super_scaled() const { return type == ffi::DataType::U8 || type == ffi::DataType::S8; }
  float sub_at(int64_t g, int64_t c) const {
    return type == ffi::DataType::S8 ? float(reinterpret_cast<const int8_t*>(sub_row(g))[c])
                                     : float(sub_row(g)[c]);
  }

  const uint8_t* sub_row(int64_t g) const {
    return static_cast<const uint8_t*>(data) +
           (g / kSuperGroups * kSuperRows + g % kSuperGroups) * cols;
  }
  const uint16_t* super_row(int64_t g) const {
    return reinterpret_cast<const uint16_t*>(static_cast<const uint8_t*>(data) +
                                             (g / kSuperGroups * kSuperRows + kSuperGroups) * cols);
  }
  float at(int64_t k) const {
    if (type == ffi::DataType::F32) return static_cast<const float*>(data)[k];
    if (super_scaled()) {
      int64_t g = k / cols, c = k - g * cols;
      return half_to_float(super_row(g)[c]) * sub_at(g, c);
    }
    uint16_t bits = static_cast<const uint16_t*>(data)[k];
    return type == ffi::DataType::BF16 ? bf16_to_float(bits) : half_to_float(bits);
  }
  // dst[0:n] = the scales at k:k+n (one row's: uint8 tables), one loop per dtype (vectorised,
  // no test per element). always_inline: the panel loops call it once per block of 16 or 32
  // rows (BENCHMARKS.md, "Q4_K_M files on the CPU").
  __attribute__((always_inline)) void copy(float* dst, int64_t k, int64_t n) const {
    if (type == ffi::DataType::F32) {
      std::memcpy(dst, static_cast<const float*>(data) + k, n * sizeof(float));
      return;
    }
    if (super_scaled()) return copy_super_scaled(dst, k / cols, k % cols, n);
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
  // dst[0:n] = row r's values at columns c:c+n of an [R, O] table (a panel's block): no
  // division for a super-scaled one.
  __attribute__((always_inline)) void copy_row(float* dst, int64_t r, int64_t c,
                                               int64_t n) const {
    if (super_scaled()) return copy_super_scaled(dst, r, c, n);
    copy(dst, r * cols + c, n);
  }
  __attribute__((always_inline)) void copy_super_scaled(float* dst, int64_t g, int64_t c,
                                                       int64_t n) const {
    int64_t j = 0;
    const uint8_t* sub = sub_row(g) + c;
    const uint16_t* supers = super_row(g) + c;
    bool is_signed = type == ffi::DataType::S8;
#if defined(__F16C__) && defined(__AVX2__)
    for (; j + 8 <= n; j += 8) {
      __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sub + j));
      __m256 subs = _mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(bytes)
                                                 : _mm256_cvtepu8_epi32(bytes));
      __m256 wide = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(supers + j)));
      _mm256_storeu_ps(dst + j, _mm256_mul_ps(wide, subs));
    }
#endif
    for (; j < n; ++j) dst[j] = half_to_float(supers[j]) * sub_at(g, c + j);
  }
  const void* address(int64_t k) const {
    if (super_scaled()) return sub_row(k / cols) + k % cols;
    return static_cast<const char*>(data) + k * (type == ffi::DataType::F32 ? 4 : 2);
  }
  const void* row_address(int64_t r, int64_t c) const {
    return super_scaled() ? sub_row(r) + c : address(r * cols + c);
  }
};

// A Scales view of an FFI buffer; false for other element types.
bool scales_of(const ffi::AnyBuffer& buffer, Scales* scales) {
  ffi::DataType type = buffer.element_type();
  if (type != ffi::DataType::F32 && type != ffi::DataType::F16 && type != ffi::DataType::BF16 &&
      type != ffi::DataType::U8 && type != ffi::DataType::S8)
    return false;
  *scales = Scales{buffer.untyped_data(), type};
  return true;
}

// One product's weight [A, B] and scales [R, C]: the operands as they are, or layer `layer` of
// stacks [L, A, B] and [L, R, C] (a scan's stacked weights read in place: XLA copies a scan's
// slice out of its stack before an operation that takes it, here every layer's whole weight).
struct Operands {
  const void* w;
  int64_t a, b;         // the weight's two dimensions
  Scales s;             // at the layer's table
  int64_t blocks, cols; // R, C
};

inline bool layer_at(ffi::Span<const int64_t> dims, const void* data, int64_t bytes, int64_t layer,
                     const void** at, int64_t* d0, int64_t* d1) {
  if (dims.size() == 2 && layer == 0) {
    *at = data, *d0 = dims[0], *d1 = dims[1];
    return true;
  }
  if (dims.size() != 3 || layer < 0 || layer >= dims[0]) return false;
  *at = static_cast<const char*>(data) + layer * dims[1] * dims[2] * bytes;
  *d0 = dims[1], *d1 = dims[2];
  return true;
}

// False for bad shapes, a layer out of range, or scales of another type (super-scaled tables
// only where `super_scaled_ok`: panels).
template <typename WeightBuffer>
bool operands_of(const WeightBuffer& w, int64_t w_bytes, const ffi::AnyBuffer& s,
                 const ffi::Buffer<ffi::S32>& layer, Operands* op, bool super_scaled_ok = false) {
  if (layer.element_count() != 1 || !scales_of(s, &op->s)) return false;
  bool super_scaled = op->s.super_scaled();
  if (super_scaled && !super_scaled_ok) return false;
  int64_t l = layer.typed_data()[0],
          s_bytes = op->s.type == ffi::DataType::F32 ? 4 : super_scaled ? 1 : 2;
  if (!layer_at(w.dimensions(), w.untyped_data(), w_bytes, l, &op->w, &op->a, &op->b) ||
      !layer_at(s.dimensions(), s.untyped_data(), s_bytes, l, &op->s.data, &op->blocks,
                &op->cols))
    return false;
  op->s.cols = op->cols;
  if (super_scaled) {  // kSuperRows rows per kSuperGroups groups (Scales)
    if (op->blocks % kSuperRows != 0) return false;
    op->blocks = op->blocks / kSuperRows * kSuperGroups;
  }
  return op->blocks >= 1;
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

// Calls f(std::integral_constant<int, MB>{}) with MB = min(N, rows) (at least 1): a kernel
// taking x rows N at a time, their count a compile-time constant (sums held in registers).
template <int N, typename F>
inline void with_rows_up_to(int64_t rows, F&& f) {
  if constexpr (N > 1)
    if (rows < N) return with_rows_up_to<N - 1>(rows, std::forward<F>(f));
  f(std::integral_constant<int, N>{});
}

// with_rows_up_to four: most kernels take x rows four at a time.
template <typename F>
inline void with_row_count(int64_t rows, F&& f) {
  with_rows_up_to<4>(rows, std::forward<F>(f));
}

}  // namespace

// The binding of every int8 / float32 handler: (thread pool, x, w, s, layer) -> y.
#define RUNTIME_BIND(T)                                                                   \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<T>>() \
      .Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::S32>>().Ret<ffi::Buffer<ffi::F32>>()
