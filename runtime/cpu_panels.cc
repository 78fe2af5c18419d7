// Few-row products against weights stored in column panels (quant.TiledWeight, quant4
// .TiledWeight4): w [O/64, 64 I], panel p holding columns 64p..64p+63 of every input row in
// turn, so a panel's product reads one contiguous stream and keeps its 64 sums per x row in
// registers. int8 (with scales), float32 or 2-byte floats, and int4 (packed rows, with scales
// and mins). Built with cpu_kernels.cc (cpu_kernels.py); float32 sums.

#include <cmath>

#include "cpu_kernels.h"

namespace {

// --- panels: w [O/64, 64 I], panel p holding columns 64p..64p+63 of every input row in turn
// (row i's 64 values at 64 i), so a panel's product reads one contiguous stream.

// Weights of 2-byte floats (a checkpoint's F16 / BF16, kept as stored): widened exactly as read.
struct Half { uint16_t bits; };
struct BHalf { uint16_t bits; };

#ifdef __AVX512F__
typedef __m512 Lanes;  // 16 floats
constexpr int kLanes = 16;
inline Lanes lanes_zero() { return _mm512_setzero_ps(); }
inline Lanes lanes_set(float v) { return _mm512_set1_ps(v); }
inline Lanes lanes_load(const float* p) { return _mm512_loadu_ps(p); }
inline Lanes lanes_load(const int8_t* p) { return load16(p); }
inline Lanes lanes_load(const Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline Lanes lanes_load(const BHalf* p) {  // a bf16 is a float32's upper 16 bits
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline Lanes lanes_fma(Lanes a, Lanes b, Lanes c) { return _mm512_fmadd_ps(a, b, c); }
inline void lanes_store(float* p, Lanes v) { _mm512_storeu_ps(p, v); }
#else
typedef f32x8 Lanes;
constexpr int kLanes = 8;
inline Lanes lanes_zero() { return Lanes{}; }
inline Lanes lanes_set(float v) { return Lanes{} + v; }
inline Lanes lanes_load(const float* p) { return load8(p); }
inline Lanes lanes_load(const int8_t* p) { return load8(p); }
inline Lanes lanes_load(const Half* p) {
#if defined(__F16C__)
  return (Lanes)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  Lanes v;
  for (int k = 0; k < 8; ++k) v[k] = half_to_float(p[k].bits);
  return v;
#endif
}
inline Lanes lanes_load(const BHalf* p) {
  Lanes v;
  for (int k = 0; k < 8; ++k) v[k] = bf16_to_float(p[k].bits);
  return v;
}
// explicit FMAs: left to contraction, a * b + c fused in some loops and not in others, and a
// row's sums took other bits beside other rows (AVX2 builds)
inline Lanes lanes_fma(Lanes a, Lanes b, Lanes c) {
#if defined(__FMA__)
  return (Lanes)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
inline void lanes_store(float* p, Lanes v) { store8(p, v); }
#endif
constexpr int kPanel = 64;
constexpr int kPanelLanes = kPanel / kLanes;

// Row r of table t (a block's, a group's) at a panel's columns c.., asked for ahead of its
// block: each block's row sits O values from the last, a stream the hardware prefetcher does
// not follow (BENCHMARKS.md, "Q4_K_M files on the CPU").
__attribute__((always_inline)) inline void prefetch_table_row(const Scales& t, int64_t r,
                                                              int64_t c) {
  if (!prefetch_tables()) return;
  const char* row = static_cast<const char*>(t.row_address(r, c));
  if (t.super_scaled()) {  // the sub-scale row, and its block's super-scales
    const char* supers = reinterpret_cast<const char*>(t.super_row(r) + c);
    __builtin_prefetch(row), __builtin_prefetch(supers), __builtin_prefetch(supers + 64);
    return;
  }
  int64_t width = t.type == ffi::DataType::F32 ? 4 : 2;
  for (int64_t offset = 0; offset < kPanel * width; offset += 64) __builtin_prefetch(row + offset);
}

// An int4 group's tables at a panel's columns c0..c0+63: its scales, and the value of a code of
// 0 (the min of asymmetric codes; -8 scale for symmetric codes around 8): scale * code + offset.
__attribute__((always_inline)) inline void int4_group_tables(const Scales& s, const Scales* mins,
                                                             int64_t g, int64_t c0, float* scale,
                                                             float* offset) {
  s.copy_row(scale, g, c0, kPanel);
  if (mins != nullptr) {
    mins->copy_row(offset, g, c0, kPanel);
  } else {
    for (int c = 0; c < kPanel; ++c) offset[c] = -8.0f * scale[c];
  }
}
// The tables' rows (scales, and mins if any) table_blocks_ahead() blocks (int4: groups) after
// block b of `blocks`, asked for ahead (prefetch_table_row); past the panel's last block, the
// next panel's first ones (a thread's run of panels goes on there).
__attribute__((always_inline)) inline void prefetch_tables_ahead(const Scales& s,
                                                                 const Scales* mins, int64_t b,
                                                                 int64_t blocks, int64_t c0) {
  int64_t ahead = b + table_blocks_ahead();
  if (ahead >= blocks) {
    ahead -= blocks, c0 += kPanel;
    if (ahead >= blocks || c0 >= s.cols) return;
  }
  prefetch_table_row(s, ahead, c0);
  if (mins != nullptr) prefetch_table_row(*mins, ahead, c0);
}

// y[m, 64 p : 64 p + 64] (m < MB) for panel p (`panel` at its first row): per scale block, MB x
// kPanelLanes sums in registers over the block's input rows, each weight load used MB times,
// then scaled into y.
template <int MB, typename W>
inline void panel_rows(const float* x, int64_t in, const W* panel, int64_t out, Scales s,
                       int64_t blocks, int64_t c0, float* y) {
  int64_t per_block = in / blocks, ahead = prefetch_distance(!std::is_same_v<W, int8_t>);
  float scale[kPanel];
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_tables_ahead(s, nullptr, b, blocks, c0);
    // the sums' loops unrolled as written: else GCC kept one row's sums on the stack, an FMA
    // from memory and a store per vector per input row (latency-bound: three quarters of a
    // batch-1 int8 product's samples in a profile)
    Lanes acc[MB][kPanelLanes];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
      for (int n = 0; n < kPanelLanes; ++n) acc[m][n] = lanes_zero();
    for (int64_t i = b * per_block; i < (b + 1) * per_block; ++i) {
      const W* row = panel + i * kPanel;
      prefetch_span(row, kPanel * sizeof(W), ahead);
      Lanes xv[MB];
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) xv[m] = lanes_set(x[m * in + i]);
#pragma GCC unroll 8
      for (int n = 0; n < kPanelLanes; ++n) {
        Lanes wv = lanes_load(row + n * kLanes);
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) acc[m][n] = lanes_fma(xv[m], wv, acc[m][n]);
      }
    }
    s.copy_row(scale, b, c0, kPanel);
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < kPanelLanes; ++n) {  // y + sums x scale in one rounding, as written
        float* at = y + m * out + c0 + n * kLanes;
        Lanes sc = lanes_load(scale + n * kLanes);
        lanes_store(at, b == 0 ? acc[m][n] * sc : lanes_fma(acc[m][n], sc, lanes_load(at)));
      }
  }
}

// --- int4 panels: tiles [O/64, 64 P] uint8 (P = I/2 packed rows, quant4's packing: in a group
// of n input rows, packed row j holds row j in its low nibble and row j + n/2 in its high one).

// A lane vector's packed bytes (kLanes of them), and their low and high nibbles as float32.
#ifdef __AVX512F__
typedef __m512i Codes;  // the bytes widened to 32 bits straight from memory: no lane extraction
inline Codes codes_load(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// A nibble's float through a 16-entry table: the permute reads an index's low 4 bits only, so
// the low nibble needs no mask (one op fewer than mask + convert, on the products' critical ports).
inline Lanes nibble_floats() {
  return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
inline Lanes codes_low(Codes c) { return _mm512_permutexvar_ps(c, nibble_floats()); }
inline Lanes codes_high(Codes c) {
  return _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), nibble_floats());
}
#elif defined(__AVX2__)
// 8 bytes widened to 32-bit lanes from memory, each nibble one mask or shift and a convert: the
// portable loop below converted lane by lane (AVX2 Q4_0 decode 0.19x llama.cpp on a Zen 3 VM,
// BENCHMARKS.md, "AVX2 without AVX-512").
typedef __m256i Codes;
inline Codes codes_load(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline Lanes codes_low(Codes c) {
  return (Lanes)_mm256_cvtepi32_ps(_mm256_and_si256(c, _mm256_set1_epi32(15)));
}
inline Lanes codes_high(Codes c) { return (Lanes)_mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4)); }
#else
struct Codes {
  uint8_t bytes[kLanes];
};
inline Codes codes_load(const uint8_t* p) {
  Codes c;
  std::memcpy(c.bytes, p, kLanes);
  return c;
}
inline Lanes codes_low(Codes c) {
  Lanes v;
  for (int k = 0; k < kLanes; ++k) v[k] = float(c.bytes[k] & 15);
  return v;
}
inline Lanes codes_high(Codes c) {
  Lanes v;
  for (int k = 0; k < kLanes; ++k) v[k] = float(c.bytes[k] >> 4);
  return v;
}
#endif

#ifdef __AVX512F__
// An int4 group's tables (int4_group_tables) at a panel's 64 columns as four vectors each
// (columns 16 k.. in out[k]): f16 tables (GGUF Q4_0's, Q4_1's) widened straight into registers,
// no round trip through memory (in a batch-1 Q4_0 decode under int8 x the tables had taken a
// quarter of the products' time); other kinds through int4_group_tables' rows.
__attribute__((always_inline)) inline void int4_group_vectors(const Scales& s, const Scales* mins,
                                                              int64_t g, int64_t c0,
                                                              __m512 scale[4], __m512 offset[4]) {
  auto f16_row = [g, c0](const Scales& t, __m512 out[4]) {
    const uint16_t* row = static_cast<const uint16_t*>(t.data) + g * t.cols + c0;
    for (int k = 0; k < 4; ++k)
      out[k] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * k)));
  };
  if (s.type == ffi::DataType::F16 && (mins == nullptr || mins->type == ffi::DataType::F16)) {
    f16_row(s, scale);
    if (mins != nullptr) return f16_row(*mins, offset);
    for (int k = 0; k < 4; ++k) offset[k] = _mm512_mul_ps(_mm512_set1_ps(-8.0f), scale[k]);
    return;
  }
  alignas(64) float scale_row[kPanel], offset_row[kPanel];
  int4_group_tables(s, mins, g, c0, scale_row, offset_row);
  for (int k = 0; k < 4; ++k)
    scale[k] = _mm512_load_ps(scale_row + 16 * k), offset[k] = _mm512_load_ps(offset_row + 16 * k);
}

// One x row against an int4 panel, each packed row read as one 64-byte vector: column 4 l + c's
// byte is byte c of 32-bit lane l, so a nibble's float is one shift and one permute of the
// whole vector (vpermps reads an index's low 4 bits), not a widening load per 16 bytes. Sums
// for columns 4 l + c gather in lane l of vector c ("strided"), in int4_panel_rows' order and
// arithmetic, so y is bit for bit its y. On an AMD Zen 4 VM: a C++ loop of it 1.2x the bytes a
// cycle, the kernel 4-7% less time a call (BENCHMARKS.md, "An AMD Zen 4 VM against llama.cpp").
// RUNTIME_KERNEL_INT4_WIDE=0: the widening loads instead (the A/B).
inline bool int4_row_wide() {
  static const bool wide = env_count("RUNTIME_KERNEL_INT4_WIDE", 1) != 0;
  return wide;
}
// A panel's 64 column values (in order, columns 16 k.. in v[k]) as four strided vectors: out[c]
// lane l = column 4 l + c.
inline void strided_from_columns(const __m512 v[4], __m512 out[4]) {
  const __m512 s0 = v[0], s1 = v[1], s2 = v[2], s3 = v[3];
  for (int c = 0; c < 4; ++c) {
    __m512i index = _mm512_add_epi32(
        _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28),
        _mm512_set1_epi32(c));
    __m512 low = _mm512_permutex2var_ps(s0, index, s1);
    __m512 high = _mm512_permutex2var_ps(s2, index, s3);
    out[c] = _mm512_shuffle_f32x4(low, high, 0x44);  // lanes 0-7 of each
  }
}
// Four strided vectors stored as the panel's 64 columns in order.
inline void store_strided(const __m512 in[4], float* columns) {
  for (int k = 0; k < 4; ++k) {  // columns 16 k + m: vector m % 4, lane 4 k + m / 4
    __m512i pick = _mm512_setr_epi32(0, 16, 0, 16, 1, 17, 1, 17, 2, 18, 2, 18, 3, 19, 3, 19);
    pick = _mm512_add_epi32(pick, _mm512_set1_epi32(4 * k));
    __m512 pairs01 = _mm512_permutex2var_ps(in[0], pick, in[1]);
    __m512 pairs23 = _mm512_permutex2var_ps(in[2], pick, in[3]);
    __m512i merge = _mm512_setr_epi32(0, 1, 18, 19, 4, 5, 22, 23, 8, 9, 26, 27, 12, 13, 30, 31);
    _mm512_storeu_ps(columns + 16 * k, _mm512_permutex2var_ps(pairs01, merge, pairs23));
  }
}
// Byte kByte of every lane of a packed row: its low nibble (row j) times x_low into acc, its high
// one (row j + half) times x_high into acc_high, at vector kByte (columns 4 l + kByte).
template <int kByte>
__attribute__((always_inline)) inline void nibbles_of_byte(__m512i bytes, __m512 x_low,
                                                           __m512 x_high, Lanes table,
                                                           __m512 acc[4], __m512 acc_high[4]) {
  __m512i low = kByte == 0 ? bytes : _mm512_srli_epi32(bytes, 8 * kByte);
  acc[kByte] = _mm512_fmadd_ps(x_low, _mm512_permutexvar_ps(low, table), acc[kByte]);
  acc_high[kByte] = _mm512_fmadd_ps(
      x_high, _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 8 * kByte + 4), table),
      acc_high[kByte]);
}
inline void int4_panel_row_wide(const float* x, int64_t in, const uint8_t* panel, Scales s,
                                const Scales* mins, int64_t groups, const float* x_sums,
                                int64_t c0, float* y) {
  int64_t per_group = in / groups, half = per_group / 2, ahead = prefetch_distance();
  const Lanes table = nibble_floats();
  __m512 result[4];
  for (int64_t g = 0; g < groups; ++g) {
    prefetch_tables_ahead(s, mins, g, groups, c0);
    __m512 acc[4], acc_high[4];
    for (int c = 0; c < 4; ++c) acc[c] = acc_high[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < half; ++j) {
      const uint8_t* row = panel + (g * half + j) * kPanel;
      prefetch_span(row, kPanel, ahead);
      int64_t low_row = g * per_group + j;
      __m512 x_low = _mm512_set1_ps(x[low_row]), x_high = _mm512_set1_ps(x[low_row + half]);
      __m512i bytes = _mm512_loadu_si512(row);
      nibbles_of_byte<0>(bytes, x_low, x_high, table, acc, acc_high);
      nibbles_of_byte<1>(bytes, x_low, x_high, table, acc, acc_high);
      nibbles_of_byte<2>(bytes, x_low, x_high, table, acc, acc_high);
      nibbles_of_byte<3>(bytes, x_low, x_high, table, acc, acc_high);
    }
    __m512 scale[4], offset[4], strided_scale[4], strided_offset[4];
    int4_group_vectors(s, mins, g, c0, scale, offset);
    strided_from_columns(scale, strided_scale), strided_from_columns(offset, strided_offset);
    __m512 x_sum = _mm512_set1_ps(x_sums[g]);
    for (int c = 0; c < 4; ++c) {
      __m512 part = _mm512_fmadd_ps(_mm512_add_ps(acc[c], acc_high[c]), strided_scale[c],
                                    _mm512_mul_ps(x_sum, strided_offset[c]));
      result[c] = g == 0 ? part : _mm512_add_ps(result[c], part);
    }
  }
  store_strided(result, y + c0);
}
#endif

// y[m, 64 p : 64 p + 64] (m < MB) for int4 panel p: per group, MB x kPanelLanes sums of x times
// the codes in registers; then y += scale * sums + offset * x_sums[m, g] (x row m's sum over
// group g), offset the group's min (asymmetric) or -8 scale (symmetric: codes around 8).
template <int MB>
inline void int4_panel_rows(const float* x, int64_t in, const uint8_t* panel, int64_t out,
                            Scales s, const Scales* mins, int64_t groups, const float* x_sums,
                            int64_t c0, float* y) {
#ifdef __AVX512F__
  if constexpr (MB == 1)
    if (int4_row_wide()) return int4_panel_row_wide(x, in, panel, s, mins, groups, x_sums, c0, y);
#endif
  int64_t per_group = in / groups, half = per_group / 2, ahead = prefetch_distance();
  float scale[kPanel], offset[kPanel];
  for (int64_t g = 0; g < groups; ++g) {
    prefetch_tables_ahead(s, mins, g, groups, c0);
    // Low and high nibbles' sums apart for up to two x rows (two independent chains per
    // register: 10% faster in a C++ harness), together for more (registers run out).
    constexpr bool apart = MB <= 2;
    Lanes acc[MB][kPanelLanes], acc_high[apart ? MB : 1][kPanelLanes];
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < kPanelLanes; ++n) acc[m][n] = lanes_zero();
    for (int m = 0; m < (apart ? MB : 1); ++m)
      for (int n = 0; n < kPanelLanes; ++n) acc_high[m][n] = lanes_zero();
    for (int64_t j = 0; j < half; ++j) {
      const uint8_t* row = panel + (g * half + j) * kPanel;
      prefetch_span(row, kPanel, ahead);  // a packed row: a byte per column
      int64_t low_row = g * per_group + j, high_row = low_row + half;
      Lanes x_low[MB], x_high[MB];
      for (int m = 0; m < MB; ++m) {
        x_low[m] = lanes_set(x[m * in + low_row]);
        x_high[m] = lanes_set(x[m * in + high_row]);
      }
      for (int n = 0; n < kPanelLanes; ++n) {
        Codes codes = codes_load(row + n * kLanes);
        Lanes low = codes_low(codes), high = codes_high(codes);
        for (int m = 0; m < MB; ++m) {
          if constexpr (apart) {
            acc[m][n] = lanes_fma(x_low[m], low, acc[m][n]);
            acc_high[m][n] = lanes_fma(x_high[m], high, acc_high[m][n]);
          } else {
            acc[m][n] = lanes_fma(x_high[m], high, lanes_fma(x_low[m], low, acc[m][n]));
          }
        }
      }
    }
    if constexpr (apart)
      for (int m = 0; m < MB; ++m)
        for (int n = 0; n < kPanelLanes; ++n) acc[m][n] = acc[m][n] + acc_high[m][n];
    int4_group_tables(s, mins, g, c0, scale, offset);
    for (int m = 0; m < MB; ++m)
      for (int n = 0; n < kPanelLanes; ++n) {
        float* at = y + m * out + c0 + n * kLanes;
        Lanes part = lanes_fma(acc[m][n], lanes_load(scale + n * kLanes),
                               lanes_set(x_sums[m * groups + g]) * lanes_load(offset + n * kLanes));
        lanes_store(at, g == 0 ? part : lanes_load(at) + part);
      }
  }
}

#include "cpu_panels_many_rows.h"  // many x rows: each chunk of a panel dequantized once
#include "cpu_panels_six.h"  // int8 codes of six bits, packed
#include "cpu_panels_int8_x.h"  // the products on x rounded to int8
#include "cpu_panels_int8_x_many_rows.h"  // ... of int8 panels, for many rows at once
#include "cpu_panels_x24.h"  // int4 under float x: x in three int8 digits on the integer dots
#include "cpu_panels_six_float_x.h"  // six-bit panels under float x: the same digits

// kInt6: int8 codes packed in six bits (cpu_panels_six.h), the int8 products bit for bit.
enum class PanelKind { kInt8, kFloat32, kInt4, kFloat16, kBFloat16, kInt6 };

// Weights of int8 codes (with scales, and mins where they have them), packed or not.
inline bool int8_kind(PanelKind kind) {
  return kind == PanelKind::kInt8 || kind == PanelKind::kInt6;
}

// Weights of floats (float32, or 2-byte floats widened as read): no scales, no x prepared.
inline bool float_kind(PanelKind kind) {
  return kind == PanelKind::kFloat32 || kind == PanelKind::kFloat16 ||
         kind == PanelKind::kBFloat16;
}

// f(static_cast<const W*>(w)) for a float kind's element type W.
template <typename F>
inline void with_float_panels(PanelKind kind, const void* w, F&& f) {
  if (kind == PanelKind::kFloat32) f(static_cast<const float*>(w));
  else if (kind == PanelKind::kFloat16) f(static_cast<const Half*>(w));
  else f(static_cast<const BHalf*>(w));
}

// Whether `rows` x rows under float x take a panel a chunk at a time (cpu_panels_many_rows.h):
// past four rows for float32, eight for int4, twelve for int8 and 2-byte floats (whose passes
// widen cheaply: the chunks' round trip through L1 lost below 16 rows on an Intel VM;
// BENCHMARKS.md, "Many rows"). On AMD CPUs the passes of a few rows held up: float32 and
// 2-byte float ones faster at every row count (never chunks), int8 ones up to 128 rows; six-bit
// ones slower, so past 12 as before, and at 13-128 rows on AMD they sum in another order than
// the int8 panels of the same codes ("Panels of a few rows on AMD").
inline bool many_rows_take(PanelKind kind, int64_t rows) {
#ifdef __AVX512F__
  static const bool amd_passes = amd_cpu();
#else
  constexpr bool amd_passes = false;  // measured on AVX-512 builds: AVX2's few-row passes spill
#endif
  int64_t above = many_rows_override();
  if (above >= 0) return rows > above;
  if (kind == PanelKind::kInt4) return rows > 8;
  if (kind == PanelKind::kInt8) return rows > (amd_passes ? 128 : 12);
  if (amd_passes && float_kind(kind)) return false;
  return rows > (kind == PanelKind::kFloat32 ? 4 : 12);
}

// One weight of a panel call: its panels, scales (and mins, if any: asymmetric int4, and int8
// of GGUF's asymmetric types) and output y [M, O]. blocks: scale rows (int4: groups).
struct PanelWeight {
  const void* w;
  PanelKind kind;
  Scales s;
  int64_t blocks, panels;
  float* y;
  Scales mins;
  bool has_mins;
  const float* x_sums;  // int4: x's sums over each group [M, G] (panel_products makes them)
  const int8_t* x_codes = nullptr;  // int8 x: x's codes [M, I], scales [M, I / x_block]
  const float* x_scales = nullptr;
  const int32_t* x_code_sums = nullptr;  // int8 weights: x's code sums [M, I / x_block]
  int64_t x_block = 0;  // int4: a group; int8: int8_x_block
  const float* min_sums = nullptr;  // int8 with mins: x's sums over each scale block [M, R]
  const int8_t* x_tiles = nullptr;  // int8 x on AMX tiles: x's codes in tile_x_codes' layout
  bool x24 = false;  // int4 under float x: x_codes as three digit rows a row (cpu_panels_x24.h)
  const float* x = nullptr;  // this weight's x rows [rows, I] (panel_products: the call's x,
  int64_t rows = 0;          // unless set: an expert's own rows in the grouped call)

  // Whether w's product takes of x what this one's does (XForWeight), and that taken.
  bool same_x_needs(const PanelWeight& w) const {
    return w.x == x && w.rows == rows && w.kind == kind && w.blocks == blocks &&
           w.has_mins == has_mins;
  }
  void take_x_of(const PanelWeight& w) {
    x_sums = w.x_sums, x_codes = w.x_codes, x_scales = w.x_scales;
    x_code_sums = w.x_code_sums, x_block = w.x_block, min_sums = w.min_sums;
    x_tiles = w.x_tiles, x24 = w.x24;
  }
};

// The inputs an int8 weight's x codes share a scale over under int8 x: 32 where its scale
// blocks are whole multiples of 32 (llama.cpp's Q8_0 activation blocks), else a scale block.
inline int64_t int8_x_block(int64_t in, int64_t blocks) {
  int64_t per_block = in / blocks;
  return per_block % 32 == 0 ? 32 : per_block;
}

#include "cpu_panels_amx.h"  // many rows under int8 x: AMX tiles

// x[0:n]'s sum: eight partial sums a step where n allows (vectorised without reassociating:
// the same order for a row whatever the rows beside it).
inline float block_sum(const float* x, int64_t n) {
  float part[8] = {};
  int64_t whole = n - n % 8;
  for (int64_t i = 0; i < whole; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += x[i + j];
  float sum = ((part[0] + part[1]) + (part[2] + part[3])) +
              ((part[4] + part[5]) + (part[6] + part[7]));
  for (int64_t i = whole; i < n; ++i) sum += x[i];
  return sum;
}

constexpr int64_t kXRows = 32;  // x rows a thread rounds at a time (whole tiles of 16)

// round(c) for each chunk c of kXRows x rows, on every thread where there are several: on one,
// rounding took a fifth of a 512-token prompt's product time while the other thread waited.
template <typename F>
void round_x_chunks(ffi::ThreadPool& pool, int64_t rows, F&& round) {
  int64_t chunks = (rows + kXRows - 1) / kXRows;
  if (chunks > 1) parallel_chunks(pool, chunks, round);
  else round(0);
}

// Whether float x's product with pw takes x's digits: int4 (int4_x24_takes), six-bit panels
// (six_x24_takes).
inline bool x24_takes(const PanelWeight& pw, int64_t in, int64_t rows) {
  return (pw.kind == PanelKind::kInt4 && int4_x24_takes(in / pw.blocks, rows)) ||
         (pw.kind == PanelKind::kInt6 && six_x24_takes(in / pw.blocks, rows));
}

// What a weight's product takes of x besides x: an int4 weight x's group sums (summed per panel
// they cost ~9% of the product: BENCHMARKS.md, "int4 in panels"); under int8 x, x rounded per
// group (int4) or per int8_x_block (int8), with the codes' sums. Float32 weights, and many rows
// under float x (their int4 weights dequantized): nothing.
struct XForWeight {
  std::vector<float> sums, scales, min_sums;
  std::vector<int8_t> codes, tiles;
  std::vector<int32_t> code_sums;

  void prepare(ffi::ThreadPool& pool, PanelWeight& pw, const float* x, int64_t rows, int64_t in,
               bool int8_x) {
#ifdef RUNTIME_INT4_X24
    if (!int8_x && x24_takes(pw, in, rows)) {  // (mins in the digits' offsets)
      int64_t per_group = in / pw.blocks;
      codes.resize(3 * rows * in), scales.resize(rows * pw.blocks), sums.resize(rows * pw.blocks);
      round_x_chunks(pool, rows, [&, per_group](int64_t c) {
        int64_t m0 = c * kXRows, n = std::min(kXRows, rows - m0);
        quantize_rows_x24(x + m0 * in, n, in, per_group, codes.data() + 3 * m0 * in,
                          scales.data() + m0 * pw.blocks, sums.data() + m0 * pw.blocks);
      });
      pw.x_codes = codes.data(), pw.x_scales = scales.data(), pw.x_sums = sums.data();
      pw.x_block = per_group, pw.x24 = true;
      return;
    }
#endif
    // an int8 weight's mins (but where many rows dequantize them): x's own sums per block
    if (int8_kind(pw.kind) && pw.has_mins && (int8_x || !many_rows_take(pw.kind, rows))) {
      int64_t per_block = in / pw.blocks;
      min_sums.resize(rows * pw.blocks);
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t b = 0; b < pw.blocks; ++b)
          min_sums[m * pw.blocks + b] = block_sum(x + m * in + b * per_block, per_block);
      pw.min_sums = min_sums.data();
    }
    if (float_kind(pw.kind) || (int8_kind(pw.kind) && !int8_x) ||
        (!int8_x && many_rows_take(pw.kind, rows)))
      return;
    int64_t per_block = pw.kind == PanelKind::kInt4 ? in / pw.blocks
                                                    : int8_x_block(in, pw.blocks);
    int64_t blocks = in / per_block;
    // under int8 x, rows past the last zero to a whole tile of 16 (AMX tiles read x 16 rows at
    // a time)
    int64_t padded = int8_x ? (rows + 15) / 16 * 16 : rows;
    sums.assign(padded * blocks, 0.0f);
    pw.x_sums = sums.data(), pw.x_block = per_block;
    if (!int8_x) {
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t b = 0; b < blocks; ++b)
          for (int64_t i = b * per_block; i < (b + 1) * per_block; ++i)
            sums[m * blocks + b] += x[m * in + i];
      return;
    }
    codes.resize(padded * in), scales.resize(padded * blocks), code_sums.resize(padded * blocks);
    pw.x_codes = codes.data(), pw.x_scales = scales.data(), pw.x_code_sums = code_sums.data();
    bool tiled = false;
#ifdef RUNTIME_PANELS_AMX
    tiled = amx_takes(pw, rows);
    if (tiled) tiles.resize(padded * in), pw.x_tiles = tiles.data();
#endif
    // x's rows rounded (and laid out for the tiles) kXRows at a time on every thread
    round_x_chunks(pool, rows, [&, per_block, blocks, tiled](int64_t c) {
      int64_t m0 = c * kXRows, n = std::min(kXRows, rows - m0);
      quantize_rows(x + m0 * in, n, in, per_block, codes.data() + m0 * in,
                    scales.data() + m0 * blocks, sums.data() + m0 * blocks,
                    code_sums.data() + m0 * blocks);
#ifdef RUNTIME_PANELS_AMX
      if (tiled)
        tile_x_codes(codes.data() + m0 * in, std::min(kXRows, padded - m0), in,
                     tile_depth(per_block), tiles.data() + m0 * in);
#endif
    });
  }
};

// y[m, 64 p : 64 p + 64] += x's sum over scale block b times the mins of block b, summed over
// the blocks, for every x row: an asymmetric int8 weight's mins (GGUF Q5_K, Q5_1; int8_mins.py)
// after its codes' product (few rows; int8 x), the same arithmetic for a row whatever the rows
// beside it. The mins of kMinBlocks blocks at a time are read once into a buffer, and each
// row's 64 sums stay in registers over them (one pass over y per chunk, not one per block).
constexpr int64_t kMinBlocks = 32;
void add_int8_mins(const PanelWeight& pw, int64_t rows, int64_t p) {
  int64_t out = pw.panels * kPanel, c0 = p * kPanel;
  float offsets[kMinBlocks][kPanel];
  for (int64_t b0 = 0; b0 < pw.blocks; b0 += kMinBlocks) {
    int64_t chunk = std::min(kMinBlocks, pw.blocks - b0);
    for (int64_t b = 0; b < chunk; ++b) pw.mins.copy_row(offsets[b], b0 + b, c0, kPanel);
    for (int64_t m = 0; m < rows; ++m) {
      float* at = pw.y + m * out + c0;
      const float* sums = pw.min_sums + m * pw.blocks + b0;
      Lanes acc[kPanelLanes];
      for (int n = 0; n < kPanelLanes; ++n) acc[n] = lanes_load(at + n * kLanes);
      for (int64_t b = 0; b < chunk; ++b) {
        Lanes sum = lanes_set(sums[b]);
        for (int n = 0; n < kPanelLanes; ++n)
          acc[n] = lanes_fma(sum, lanes_load(offsets[b] + n * kLanes), acc[n]);
      }
      for (int n = 0; n < kPanelLanes; ++n) lanes_store(at + n * kLanes, acc[n]);
    }
  }
}

// Panel p of pw for every x row under float x (cpu_panels_many_rows.h).
void many_rows(const float* x, int64_t rows, int64_t in, const PanelWeight& pw, int64_t p) {
  int64_t out = pw.panels * kPanel, c0 = p * kPanel;
  if (float_kind(pw.kind))
    with_float_panels(pw.kind, pw.w, [&](auto w) {
      panel_many_rows(x, rows, in, w + p * kPanel * in, out, pw.s, pw.blocks, c0, pw.y);
    });
  else if (pw.kind == PanelKind::kInt8)
    panel_many_rows(x, rows, in, static_cast<const int8_t*>(pw.w) + p * kPanel * in, out, pw.s,
                    pw.blocks, c0, pw.y, pw.has_mins ? &pw.mins : nullptr);
#ifdef RUNTIME_PANELS_SIX
  else if (pw.kind == PanelKind::kInt6)
    six_panel_many_rows(x, rows, in, static_cast<const uint8_t*>(pw.w) + p * kSixRowBytes * in,
                        out, pw.s, pw.blocks, c0, pw.y, pw.has_mins ? &pw.mins : nullptr);
#endif
  else
    int4_panel_many_rows(x, rows, in, static_cast<const uint8_t*>(pw.w) + p * kPanel * in / 2,
                         out, pw.s, pw.has_mins ? &pw.mins : nullptr, pw.blocks, c0, pw.y);
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Whether pw's product of `rows` rows under int8 x takes the loop of many rows (int8 weights
// whose scale blocks hold several x blocks: from kInt8XBlocksManyRows).
inline bool int8_x_many_rows_take(const PanelWeight& pw, int64_t in, int64_t rows) {
  if (pw.kind == PanelKind::kInt4) return rows >= kInt4XManyRows;
  return rows >= (in / pw.blocks > pw.x_block ? kInt8XBlocksManyRows : kInt8XManyRows);
}

// Panel p of an int8, six-bit or int4 pw for every x row under int8 x
// (cpu_panels_int8_x_many_rows.h).
void many_rows_int8_x(const PanelWeight& pw, int64_t rows, int64_t in, int64_t p) {
  int64_t out = pw.panels * kPanel;
  XRows x{pw.x_codes, pw.x_scales, pw.x_code_sums, pw.x_sums, in, in / pw.x_block};
  const uint8_t* w = static_cast<const uint8_t*>(pw.w);
  const Scales* mins = pw.has_mins ? &pw.mins : nullptr;
  if (pw.kind == PanelKind::kInt8)
    panel_many_rows_int8_x<XForm::kInt8>(x, pw.x_block, w + p * kPanel * in, out, pw.s, mins,
                                         pw.blocks, p * kPanel, pw.y, rows);
  else if (pw.kind == PanelKind::kInt4)
    panel_many_rows_int8_x<XForm::kInt4>(x, pw.x_block, w + p * kPanel * in / 2, out, pw.s,
                                         mins, pw.blocks, p * kPanel, pw.y, rows);
#ifdef RUNTIME_PANELS_SIX
  else
    panel_many_rows_int8_x<XForm::kSix>(x, pw.x_block, w + p * kSixRowBytes * in, out, pw.s,
                                        mins, pw.blocks, p * kPanel, pw.y, rows);
#endif
}
#endif

// Where each run of panels starts, weights' panels numbered in turn (first[k] is weight k's
// first): runs of equal panel counts where every weight has the same x rows, else of about equal
// panel rows (an expert of 40 rows beside one of 2 in the grouped call); the end last.
std::vector<int64_t> run_starts(const std::vector<PanelWeight>& weights,
                                const std::vector<int64_t>& first, int64_t threads) {
  int64_t total = first.back(), rows_all = 0;
  int64_t runs = std::min<int64_t>(total, 4 * std::max<int64_t>(1, threads));
  bool even = true;
  for (const PanelWeight& pw : weights) even = even && pw.rows == weights[0].rows;
  std::vector<int64_t> starts;
  if (even) {
    int64_t per_run = (total + runs - 1) / runs;
    for (int64_t g = 0; g < total; g += per_run) starts.push_back(g);
    starts.push_back(total);
    return starts;
  }
  for (const PanelWeight& pw : weights) rows_all += pw.panels * pw.rows;
  int64_t done = 0, g = 0;
  starts.push_back(0);
  for (size_t k = 0; k < weights.size(); ++k)
    for (int64_t p = 0; p < weights[k].panels; ++p, ++g) {
      done += weights[k].rows;  // a run ends where its share of all the panel rows is done
      if (done * runs >= rows_all * int64_t(starts.size()) && g + 1 < total)
        starts.push_back(g + 1);
    }
  starts.push_back(total);
  return starts;
}

// y_k = x @ w_k for every weight k of `weights`, all of input width `in` (one call for the
// products of one x: a layer's query, key and value), each weight's x its own rows where set
// (pw.x, pw.rows: the grouped call's experts), else x [rows_of_x, in]: runs of adjacent panels,
// four per thread, over all the weights' panels in turn: each run a longer contiguous stream (an
// int8 panel is a few KB, and one at a time ran slower: the prefetcher restarts per stream),
// still enough runs to even out a thread that starts late (BENCHMARKS.md, "Runs of panels").
void panel_products(ffi::ThreadPool& pool, const float* x, int64_t rows_of_x, int64_t in,
                    std::vector<PanelWeight> weights, bool int8_x = false) {
  for (PanelWeight& pw : weights)
    if (pw.x == nullptr) pw.x = x, pw.rows = rows_of_x;
  // what each weight's product takes of x besides x, once per call (XForWeight)
  // (weights of one x, kind and scale blocks take the same: prepared once, for the first; a
  // layer's query, key and value, its gate and up)
  std::vector<XForWeight> x_for(weights.size());
  for (size_t k = 0; k < weights.size(); ++k) {
    size_t j = 0;
    while (j < k && !weights[j].same_x_needs(weights[k])) ++j;
    if (j < k) weights[k].take_x_of(weights[j]);
    else x_for[k].prepare(pool, weights[k], weights[k].x, weights[k].rows, in, int8_x);
  }
  std::vector<int64_t> first(weights.size() + 1, 0);  // weight k's panels: first[k]..first[k+1]
  for (size_t k = 0; k < weights.size(); ++k) first[k + 1] = first[k] + weights[k].panels;
  std::vector<int64_t> starts = run_starts(weights, first, pool.num_threads());
  parallel_chunks(pool, int64_t(starts.size()) - 1, [=](int64_t r) {
    size_t k = 0;
    for (int64_t g = starts[r]; g < starts[r + 1]; ++g) {
      while (g >= first[k + 1]) ++k;
      const PanelWeight& pw = weights[k];
      const float* xp = pw.x;
      int64_t rows_x = pw.rows, p = g - first[k], out = pw.panels * kPanel;
#ifdef RUNTIME_PANELS_AMX
      if (pw.x_tiles != nullptr) {
        amx_panel(pw, rows_x, in, p);
        if (pw.min_sums != nullptr) add_int8_mins(pw, rows_x, p);
        continue;
      }
#endif
      if (pw.x_codes == nullptr && many_rows_take(pw.kind, rows_x)) {
        many_rows(xp, rows_x, in, pw, p);  // an int8 weight's mins in its chunks
        continue;
      }
      if (float_kind(pw.kind)) {  // six rows at a time: 24 sums in registers, 12-15%
        // faster than four from 32 rows (int8, bound by its widening, gained nothing)
        with_float_panels(pw.kind, pw.w, [&](auto w) {
          for (int64_t m0 = 0; m0 < rows_x; m0 += 6)
            with_rows_up_to<6>(rows_x - m0, [&](auto mb) {
              panel_rows<decltype(mb)::value>(xp + m0 * in, in, w + p * kPanel * in, out, pw.s,
                                              pw.blocks, p * kPanel, pw.y + m0 * out);
            });
        });
        continue;
      }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#ifdef RUNTIME_PANELS_SIX
      if (pw.x24 && pw.kind == PanelKind::kInt6) {  // the same, six-bit
        for (int64_t m0 = 0; m0 < rows_x; m0 += kX24Rows)
          six_panel_rows_x24(pw.x_codes + 3 * m0 * in, pw.x_scales + m0 * pw.blocks, in,
                             static_cast<const uint8_t*>(pw.w) + p * kSixRowBytes * in, out, pw.s,
                             pw.has_mins ? &pw.mins : nullptr, pw.blocks,
                             pw.x_sums + m0 * pw.blocks, p * kPanel, pw.y + m0 * out,
                             std::min(kX24Rows, rows_x - m0));
        continue;
      }
#endif
#endif
#ifdef RUNTIME_INT4_X24
      if (pw.x24) {  // any number of rows, kX24Rows at a time
        for (int64_t m0 = 0; m0 < rows_x; m0 += kX24Rows)
          int4_panel_rows_x24(pw.x_codes + 3 * m0 * in, pw.x_scales + m0 * pw.blocks, in,
                              static_cast<const uint8_t*>(pw.w) + p * kPanel * in / 2, out, pw.s,
                              pw.has_mins ? &pw.mins : nullptr, pw.blocks,
                              pw.x_sums + m0 * pw.blocks, p * kPanel, pw.y + m0 * out,
                              std::min(kX24Rows, rows_x - m0));
        continue;
      }
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
      if (pw.x_codes != nullptr && int8_x_many_rows_take(pw, in, rows_x)) {
        many_rows_int8_x(pw, rows_x, in, p);
        if (pw.min_sums != nullptr) add_int8_mins(pw, rows_x, p);
        continue;
      }
#endif
      for (int64_t m0 = 0; m0 < rows_x; m0 += 4)
        with_row_count(rows_x - m0, [&](auto mb) {
          constexpr int MB = decltype(mb)::value;
          const float* xm = xp + m0 * in;
          float* ym = pw.y + m0 * out;
          int64_t x_blocks = pw.x_block > 0 ? in / pw.x_block : 0;
          if (pw.kind == PanelKind::kInt8 && pw.x_codes != nullptr)
            int8_panel_rows_int8_x<MB>(pw.x_codes + m0 * in, pw.x_scales + m0 * x_blocks,
                                       pw.x_code_sums + m0 * x_blocks, pw.x_block, in,
                                       static_cast<const uint8_t*>(pw.w) + p * kPanel * in, out,
                                       pw.s, pw.blocks, p * kPanel, ym);
#ifdef RUNTIME_PANELS_SIX
          else if (pw.kind == PanelKind::kInt6 && pw.x_codes != nullptr)
            int8_panel_rows_int8_x<MB, true>(
                pw.x_codes + m0 * in, pw.x_scales + m0 * x_blocks, pw.x_code_sums + m0 * x_blocks,
                pw.x_block, in, static_cast<const uint8_t*>(pw.w) + p * kSixRowBytes * in, out,
                pw.s, pw.blocks, p * kPanel, ym);
          else if (pw.kind == PanelKind::kInt6)
            six_panel_rows<MB>(xm, in, static_cast<const uint8_t*>(pw.w) + p * kSixRowBytes * in,
                               out, pw.s, pw.blocks, p * kPanel, ym);
#endif
          else if (pw.kind == PanelKind::kInt8)
            panel_rows<MB>(xm, in, static_cast<const int8_t*>(pw.w) + p * kPanel * in, out,
                           pw.s, pw.blocks, p * kPanel, ym);
          else if (pw.x_codes != nullptr)
            int4_panel_rows_int8_x<MB>(pw.x_codes + m0 * in, pw.x_scales + m0 * pw.blocks, in,
                                       static_cast<const uint8_t*>(pw.w) + p * kPanel * in / 2,
                                       out, pw.s, pw.has_mins ? &pw.mins : nullptr, pw.blocks,
                                       pw.x_sums + m0 * pw.blocks, p * kPanel, ym);
          else
            int4_panel_rows<MB>(xm, in, static_cast<const uint8_t*>(pw.w) + p * kPanel * in / 2,
                                out, pw.s, pw.has_mins ? &pw.mins : nullptr, pw.blocks,
                                pw.x_sums + m0 * pw.blocks, p * kPanel, ym);
        });
      if (pw.min_sums != nullptr) add_int8_mins(pw, rows_x, p);
    }
  });
}

// Weight w [O/64, 64 I] (int8 or float32; uint8 int4 panels [O/64, 64 I/2]) or a stack [L, ...]
// at `layer`, with s [R, O] (any I/R; int4: R groups of an even number of rows) and an int4 or
// int8 weight's mins [R, O] (empty: none), as one of a panel call's weights for x [M, I] writing
// y [M, O]; false for other shapes or types.
bool panel_weight(const ffi::AnyBuffer& w, const ffi::AnyBuffer& s, const ffi::AnyBuffer* mins,
                  const ffi::Buffer<ffi::S32>& layer, ffi::Span<const int64_t> x_dims,
                  const ffi::AnyBuffer& y, PanelWeight* pw) {
  ffi::DataType type = w.element_type();
  PanelKind kind = type == ffi::DataType::S8     ? PanelKind::kInt8
                   : type == ffi::DataType::F32  ? PanelKind::kFloat32
                   : type == ffi::DataType::F16  ? PanelKind::kFloat16
                   : type == ffi::DataType::BF16 ? PanelKind::kBFloat16
                                                 : PanelKind::kInt4;
  if (kind == PanelKind::kInt4 && type != ffi::DataType::U8) return false;
  int64_t w_bytes = kind == PanelKind::kFloat32 ? 4 : float_kind(kind) ? 2 : 1;
  Operands op;
  bool int4 = kind == PanelKind::kInt4;
  bool quantized = int4 || kind == PanelKind::kInt8;  // super-scaled tables: theirs only
  if (!operands_of(w, w_bytes, s, layer, &op, quantized) || op.b % kPanel != 0) return false;
  // uint8 panels: int4 [O/64, 32 I], or six-bit [O/64, 48 I] (x's width tells them apart)
  if (int4 && x_dims.size() == 2 && op.b == kSixRowBytes * x_dims[1]) kind = PanelKind::kInt6;
  bool six = kind == PanelKind::kInt6;
  int64_t in = six ? op.b / kSixRowBytes : (int4 ? 2 : 1) * op.b / kPanel, out = op.a * kPanel;
  auto yd = y.dimensions();
#ifndef RUNTIME_PANELS_SIX
  if (six) return false;
#endif
  if (x_dims.size() != 2 || x_dims[1] != in || op.cols != out || in % op.blocks != 0 ||
      (kind == PanelKind::kInt4 && (in / op.blocks) % 2 != 0) ||
      (six && (in / op.blocks) % 4 != 0) ||
      y.element_type() != ffi::DataType::F32 || yd.size() != 2 || yd[0] != x_dims[0] ||
      yd[1] != out)
    return false;
  *pw = PanelWeight{op.w, kind, op.s, op.blocks, op.a, static_cast<float*>(y.untyped_data()),
                    Scales{}, false, nullptr};
  if (mins == nullptr || mins->element_count() == 0) return true;
  Operands min_op;  // the mins as a second scale table of the same shape
  if (!quantized || !operands_of(w, 1, *mins, layer, &min_op, true) ||
      min_op.blocks != op.blocks || min_op.cols != op.cols)
    return false;
  pw->mins = min_op.s, pw->has_mins = true;
  return true;
}

const char* kPanelShapes =
    "panels: shapes must be x [M, I], w [O/64, 64 I] (int8, float32, float16 or bfloat16; uint8 "
    "int4 [O/64, 32 I] in groups of an even number of rows; uint8 six-bit [O/64, 48 I] in "
    "blocks of 4k rows, AVX-512 VBMI / VNNI builds), s [R, O] and int8 / int4 mins [R, O] "
    "(float32, float16, bfloat16; int8 and int4 also super-scaled uint8 / int8 [10 R/8, O]), "
    "y [M, O], or stacks [L, ...] with a layer in range";

// Whether the int8-x quad loops take these weights: int4 groups of 8k rows, int8 x blocks of 4k.
bool int8_x_takes(const std::vector<PanelWeight>& weights, int64_t in) {
  for (const PanelWeight& pw : weights)
    if ((pw.kind == PanelKind::kInt4 && (in / pw.blocks) % 8 != 0) ||
        (int8_kind(pw.kind) && int8_x_block(in, pw.blocks) % 4 != 0))
      return false;
  return true;
}

const char* kInt8XGroups =
    "panels with int8 x: int4 groups must be a multiple of 8 rows, int8 scale blocks of 4";

// Panel products of one x in one call (every panel product's call; one weight is the common
// case): the remaining arguments
// are triples (w_k, s_k, mins_k: empty but for asymmetric int4 and int8), the results y_k, all
// read at `layer`.
template <bool kInt8X>
ffi::Error panels_of_one_x(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::S32> layer, ffi::RemainingArgs args,
                           ffi::RemainingRets rets) {
  if (args.size() % 3 != 0 || args.size() / 3 != rets.size() || rets.size() == 0)
    return ffi::Error::InvalidArgument("panels: a weight, its scales and mins for every result");
  std::vector<PanelWeight> weights(rets.size());
  for (size_t k = 0; k < rets.size(); ++k) {
    auto w = args.get<ffi::AnyBuffer>(3 * k), s = args.get<ffi::AnyBuffer>(3 * k + 1);
    auto mins = args.get<ffi::AnyBuffer>(3 * k + 2);
    auto y = rets.get<ffi::AnyBuffer>(k);
    if (!w.has_value() || !s.has_value() || !mins.has_value() || !y.has_value() ||
        !panel_weight(*w, *s, &*mins, layer, x.dimensions(), **y, &weights[k]))
      return ffi::Error::InvalidArgument(kPanelShapes);
  }
  if (kInt8X && !int8_x_takes(weights, x.dimensions()[1]))
    return ffi::Error::InvalidArgument(kInt8XGroups);
  panel_products(pool, x.typed_data(), x.dimensions()[0], x.dimensions()[1], weights, kInt8X);
  return ffi::Error::Success();
}

// Panel products of rows grouped by expert (an MoE prompt's routed pairs): x [M, I] sorted so
// that expert e owns the next sizes[e] rows; the remaining arguments are, expert by expert, K
// triples (w, s, mins) as above, all read at `layer`; results y_k [M, O_k] (rows past the
// groups zero). Each expert multiplies exactly its own rows (no tiles padded with others')
// with its own panels (llama.cpp's MUL_MAT_ID), all the hit experts' panels in one run over
// the threads.
template <bool kInt8X>
ffi::Error grouped_panels(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::S32> sizes, ffi::Buffer<ffi::S32> layer,
                          ffi::RemainingArgs args, ffi::RemainingRets rets) {
  size_t outs = rets.size(), experts = sizes.element_count();
  if (outs == 0 || args.size() != 3 * outs * experts)
    return ffi::Error::InvalidArgument(
        "grouped panels: a weight, its scales and mins for every expert and result");
  int64_t rows = x.dimensions()[0], in = x.dimensions()[1], grouped = 0;
  std::vector<std::vector<PanelWeight>> per_expert(experts, std::vector<PanelWeight>(outs));
  for (size_t e = 0; e < experts; ++e) {
    for (size_t k = 0; k < outs; ++k) {
      size_t a = 3 * (e * outs + k);
      auto w = args.get<ffi::AnyBuffer>(a), s = args.get<ffi::AnyBuffer>(a + 1);
      auto mins = args.get<ffi::AnyBuffer>(a + 2);
      auto y = rets.get<ffi::AnyBuffer>(k);
      if (!w.has_value() || !s.has_value() || !mins.has_value() || !y.has_value() ||
          !panel_weight(*w, *s, &*mins, layer, x.dimensions(), **y, &per_expert[e][k]))
        return ffi::Error::InvalidArgument(kPanelShapes);
    }
    if (kInt8X && !int8_x_takes(per_expert[e], in))
      return ffi::Error::InvalidArgument(kInt8XGroups);
    int32_t size = sizes.typed_data()[e];
    if (size < 0 || size > rows - grouped)
      return ffi::Error::InvalidArgument("grouped panels: expert row counts must add up to at "
                                         "most x's rows");
    grouped += size;
  }
  // every hit expert's panels in one call, each expert's weights on its own rows: one dispatch
  // to the threads, not one per expert
  std::vector<PanelWeight> hit;
  int64_t start = 0;
  for (size_t e = 0; e < experts; ++e) {
    int64_t size = sizes.typed_data()[e];
    if (size == 0) continue;
    for (PanelWeight pw : per_expert[e]) {
      pw.y += start * pw.panels * kPanel;
      pw.x = x.typed_data() + start * in, pw.rows = size;
      hit.push_back(pw);
    }
    start += size;
  }
  if (!hit.empty()) panel_products(pool, x.typed_data(), rows, in, std::move(hit), kInt8X);
  for (const PanelWeight& pw : per_expert[0]) {  // expert 0's outputs start at row 0
    int64_t out = pw.panels * kPanel;
    std::fill(pw.y + grouped * out, pw.y + rows * out, 0.0f);
  }
  return ffi::Error::Success();
}

}  // namespace

// Whether int4 products under float x take x's digits in this process (cpu_kernels.int4_digits):
// a VNNI or AVX2 build with RUNTIME_KERNEL_INT4_X24 not 0.
extern "C" int64_t RuntimeInt4Digits() { return int4_x24_on() ? 1 : 0; }

// Whether this build multiplies six-bit panels (cpu_panels_six.h; cpu_kernels.six_bit_panels).
extern "C" int64_t RuntimeSixBitPanels() {
#ifdef RUNTIME_PANELS_SIX
  return 1;
#else
  return 0;
#endif
}

// Whether the panel products take AMX tiles in this process (cpu_kernels.amx_tiles).
extern "C" int RuntimeAmxTiles() {
#ifdef RUNTIME_PANELS_AMX
  return amx_usable() ? 1 : 0;
#else
  return 0;
#endif
}

#define RUNTIME_PANELS_BIND                                                              \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()                   \
      .Arg<ffi::Buffer<ffi::S32>>().RemainingArgs().RemainingRets()
XLA_FFI_DEFINE_HANDLER_SYMBOL(RuntimePanelsOfOneX, panels_of_one_x<false>, RUNTIME_PANELS_BIND);
// The same products with int4 weights multiplying x rounded to int8 (int4_panel_rows_int8_x).
XLA_FFI_DEFINE_HANDLER_SYMBOL(RuntimePanelsOfOneXInt8X, panels_of_one_x<true>,
                              RUNTIME_PANELS_BIND);
#define RUNTIME_GROUPED_PANELS_BIND                                                      \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()                   \
      .Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>().RemainingArgs()          \
      .RemainingRets()
XLA_FFI_DEFINE_HANDLER_SYMBOL(RuntimeGroupedPanels, grouped_panels<false>,
                              RUNTIME_GROUPED_PANELS_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(RuntimeGroupedPanelsInt8X, grouped_panels<true>,
                              RUNTIME_GROUPED_PANELS_BIND);
