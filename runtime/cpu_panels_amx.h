// Many x rows under int8 x on CPUs with AMX (Intel Sapphire Rapids on): x's codes times a
// panel's codes in tiles of 16 rows x 16 columns of exact int32 dots (tdpbssd for int8 weights,
// tdpbsud for int4 codes, unsigned), then, per row and block, the same float arithmetic in the
// same order as the VNNI loops (cpu_panels_int8_x.h). So y is the same bit for bit, and a row's
// result never depends on the rows beside it (a prompt's rows agree with a decode step's).
// A tile product does 16 x 16 x 64 multiply-adds in 16 cycles, 16 VNNI instructions' 1,024;
// the scaling after each block bounds the kernel at ~2.3x the VNNI loops (BENCHMARKS.md, "AMX
// tiles"). Included by cpu_panels.cc after its PanelWeight.

#pragma once

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512VNNI__) && \
    defined(__AVX512BW__)
#define RUNTIME_PANELS_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

constexpr int64_t kTile = 16;       // x rows, and output columns, of a tile of dots
constexpr int64_t kTileDepth = 64;  // inputs one tile product takes at most (a row's 64 bytes)

// Whether this process may use the tiles: Linux grants their state on request (5.16 on), and
// RUNTIME_KERNEL_AMX=0 keeps the VNNI loops (the A/B).
inline bool amx_usable() {
  static const bool usable =
      env_count("RUNTIME_KERNEL_AMX", 1) != 0 &&
      syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  return usable;
}

// x rows from which a product takes the tiles (RUNTIME_KERNEL_AMX_ROWS overrides): below 16 the
// VNNI loops were faster (8 rows: 0.22 against 0.35 ms on a [2048, 2048] int8 weight; laying a
// panel's codes out for the tiles costs the same at any row count), from 16 the tiles.
inline int64_t amx_min_rows() {
  static const int64_t rows = env_count("RUNTIME_KERNEL_AMX_ROWS", 16);
  return rows;
}

// The inputs of one tile product for x blocks of `x_block` inputs (0: the tiles cannot take it).
inline int64_t tile_depth(int64_t x_block) {
  if (x_block % 4 != 0) return 0;
  return x_block <= kTileDepth ? x_block : x_block % kTileDepth == 0 ? kTileDepth : 0;
}

// Tiles 0-3: dots [16 rows, 16 columns] int32, four x blocks' in flight (a product's latency is
// some 50 cycles); 4, 5: x codes [16 rows, depth]; 6, 7: weight codes [depth / 4, 16 columns x
// 4 inputs] (the layout vpdpbusd also reads), dots tile T taking x tile 4 + T % 2 and weight
// tile 6 + T % 2.
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t row_bytes[16] = {};
  uint8_t rows[16] = {};
};
inline void configure_tiles(int64_t depth) {
  TileConfig config;
  for (int t = 0; t < 4; ++t) config.rows[t] = kTile, config.row_bytes[t] = kTile * 4;
  for (int t = 4; t < 6; ++t) config.rows[t] = kTile, config.row_bytes[t] = depth;
  for (int t = 6; t < 8; ++t) config.rows[t] = depth / 4, config.row_bytes[t] = kTile * 4;
  // GCC 12 does not see ldtilecfg read the struct, and dropped its stores without this barrier
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

// A panel's codes as the tiles' weight operand: column tile t's at t * 16 in, each quad of
// inputs i..i+3 as 16 columns x 4 bytes at 16 i. int8: as stored; int4: each group's low and
// high nibbles (inputs j and j + n/2 of a group of n: quant4's packing) as bytes 0..15.
inline void tile_codes_int8(const int8_t* panel, int64_t in, uint8_t* to) {
  const int64_t ahead = prefetch_distance();
  for (int64_t i = 0; i < in; i += 4) {
    __m512i quad[4], ordered[4];
    quad_columns(reinterpret_cast<const uint8_t*>(panel + i * kPanel), ahead, quad);
    transpose_lanes(quad, ordered);
    for (int t = 0; t < 4; ++t) _mm512_storeu_si512(to + t * kTile * in + kTile * i, ordered[t]);
  }
}
inline void tile_codes_int4(const uint8_t* panel, int64_t in, int64_t per_group, uint8_t* to) {
  const int64_t ahead = prefetch_distance(), half = per_group / 2;
  const __m512i nibble = _mm512_set1_epi8(15);
  for (int64_t g0 = 0; g0 < in; g0 += per_group)
    for (int64_t j = 0; j < half; j += 4) {
      __m512i quad[4], low[4], high[4], ordered[4];
      quad_columns(panel + (g0 / 2 + j) * kPanel, ahead, quad);
      for (int n = 0; n < 4; ++n) {
        low[n] = _mm512_and_si512(quad[n], nibble);
        high[n] = _mm512_and_si512(_mm512_srli_epi16(quad[n], 4), nibble);
      }
      transpose_lanes(low, ordered);
      for (int t = 0; t < 4; ++t)
        _mm512_storeu_si512(to + t * kTile * in + kTile * (g0 + j), ordered[t]);
      transpose_lanes(high, ordered);
      for (int t = 0; t < 4; ++t)
        _mm512_storeu_si512(to + t * kTile * in + kTile * (g0 + half + j), ordered[t]);
    }
}

// x's codes q [M, I] (M a multiple of 16) as the tiles' x operand: per 16 rows, each `depth`
// inputs' [16, depth] codes contiguous (at 16 i for inputs i..), so a tile load reads 16 x depth
// bytes in a row (x rows `in` apart met in the same cache sets: a third of the time).
inline void tile_x_codes(const int8_t* q, int64_t rows, int64_t in, int64_t depth, int8_t* to) {
  for (int64_t m0 = 0; m0 < rows; m0 += kTile)
    for (int64_t i = 0; i < in; i += depth)
      for (int64_t r = 0; r < kTile; ++r)
        std::memcpy(to + m0 * in + kTile * i + r * depth, q + (m0 + r) * in + i, depth);
}

// Tile T = 16 x rows' codes (x, tile_x_codes' layout at the rows) over inputs i0..i0+n times a
// column tile's codes at the same inputs (tile_codes' layout), `depth` inputs a product. (GCC's
// tile intrinsics are macros that spell the tile's number: one branch per tile.)
#define RUNTIME_START_DOTS(T, X, W)                                                  \
  _tile_zero(T);                                                                     \
  for (int64_t i = i0; i < i0 + n; i += depth) {                                     \
    _tile_loadd(X, x + kTile * i, depth);                                            \
    _tile_loadd(W, codes + kTile * i, kTile * 4);                                    \
    if constexpr (kUnsignedCodes) _tile_dpbsud(T, X, W); else _tile_dpbssd(T, X, W); \
  }
template <int T, bool kUnsignedCodes>
inline void start_dots(const int8_t* x, const uint8_t* codes, int64_t i0, int64_t n,
                       int64_t depth) {
  if constexpr (T == 0) { RUNTIME_START_DOTS(0, 4, 6) }
  else if constexpr (T == 1) { RUNTIME_START_DOTS(1, 5, 7) }
  else if constexpr (T == 2) { RUNTIME_START_DOTS(2, 4, 6) }
  else { RUNTIME_START_DOTS(3, 5, 7) }
}
#undef RUNTIME_START_DOTS
template <int T>
inline void store_dots(int32_t* dots) {
  if constexpr (T == 0) _tile_stored(0, dots, kTile * 4);
  else if constexpr (T == 1) _tile_stored(1, dots, kTile * 4);
  else if constexpr (T == 2) _tile_stored(2, dots, kTile * 4);
  else _tile_stored(3, dots, kTile * 4);
}

// For x blocks k < count (x_block inputs each): their dots [16, 16] (rows, columns) handed to
// scale(k, dots) in order, the products of blocks k + 1..k + 3 running while block k's dots are
// scaled (two in flight: 2-6% slower).
template <bool kUnsignedCodes, typename F>
inline void each_block_dots(const int8_t* x, const uint8_t* codes, int64_t x_block,
                            int64_t depth, int64_t count, F&& scale) {
  alignas(64) int32_t dots[kTile * kTile];
  auto start = [&](auto tile, int64_t k) {
    if (k < count)
      start_dots<decltype(tile)::value, kUnsignedCodes>(x, codes, k * x_block, x_block, depth);
  };
  auto finish = [&](auto tile, int64_t k) {  // block k's dots out, block k + 4 started, k scaled
    store_dots<decltype(tile)::value>(dots);
    start(tile, k + 4);
    scale(k, dots);
  };
  using T0 = std::integral_constant<int, 0>;
  using T1 = std::integral_constant<int, 1>;
  using T2 = std::integral_constant<int, 2>;
  using T3 = std::integral_constant<int, 3>;
  start(T0{}, 0), start(T1{}, 1), start(T2{}, 2), start(T3{}, 3);
  for (int64_t k = 0; k < count; k += 4) {
    finish(T0{}, k);
    if (k + 1 < count) finish(T1{}, k + 1);
    if (k + 2 < count) finish(T2{}, k + 2);
    if (k + 3 < count) finish(T3{}, k + 3);
  }
}

inline __m512 dots_row(const int32_t* dots, int r) {
  return _mm512_cvtepi32_ps(_mm512_load_si512(dots + kTile * r));
}

// What one column tile of one panel needs besides x's codes: its codes (tile_codes), its scale
// (and, int4, offset) rows [blocks, 64] read once per panel, x's scales (and, int4, sums).
struct TileOperands {
  const int8_t* x;  // tile_x_codes' layout
  const uint8_t* codes;
  const float *scales, *offsets, *x_scales, *x_sums;
  int64_t in, blocks, x_block, depth;
};

// Where a call of the tile loops works: x rows m0..m0+15 (those below `rows` written to y,
// rows `out` apart, at column tile t).
struct TileSpan {
  int64_t m0, rows;
  int t;
  float* y;
  int64_t out;

  void store(const __m512 acc[kTile]) const {
    for (int r = 0; r < std::min<int64_t>(kTile, rows - m0); ++r)
      _mm512_storeu_ps(y + (m0 + r) * out + kTile * t, acc[r]);
  }
};

// An int8 panel's span: per weight block, the sums over its x blocks of x_scale x dot, then
// y += scale x sum, as int8_panel_rows_int8_x does them (one x block a weight block: y +=
// scale x (x_scale x dot)).
inline void int8_tile_rows(const TileOperands& op, const TileSpan& at) {
  int64_t x_blocks = op.in / op.x_block, x_per_block = x_blocks / op.blocks;
  __m512 acc[kTile];
  for (int r = 0; r < kTile; ++r) acc[r] = _mm512_setzero_ps();
  const float* x_scales = op.x_scales + at.m0 * x_blocks;
  const int8_t* x = op.x + at.m0 * op.in;
  const float* scales = op.scales + kTile * at.t;
  if (x_per_block == 1) {
    each_block_dots<false>(x, op.codes, op.x_block, op.depth, x_blocks,
                           [&](int64_t k, const int32_t* dots) {
      __m512 scale = _mm512_loadu_ps(scales + k * kPanel);
      for (int r = 0; r < kTile; ++r)
        acc[r] = _mm512_fmadd_ps(
            scale, _mm512_mul_ps(dots_row(dots, r), _mm512_set1_ps(x_scales[r * x_blocks + k])),
            acc[r]);
    });
  } else {
    __m512 sums[kTile];
    each_block_dots<false>(x, op.codes, op.x_block, op.depth, x_blocks,
                           [&](int64_t k, const int32_t* dots) {
      bool first = k % x_per_block == 0;
      for (int r = 0; r < kTile; ++r)
        sums[r] = _mm512_fmadd_ps(dots_row(dots, r), _mm512_set1_ps(x_scales[r * x_blocks + k]),
                                  first ? _mm512_setzero_ps() : sums[r]);
      if ((k + 1) % x_per_block != 0) return;
      __m512 scale = _mm512_loadu_ps(scales + k / x_per_block * kPanel);
      for (int r = 0; r < kTile; ++r) acc[r] = _mm512_fmadd_ps(scale, sums[r], acc[r]);
    });
  }
  at.store(acc);
}

// The same for an int4 panel: per group, y += dot x x_scale x scale + x_sum x offset, as
// int4_panel_rows_int8_x does it.
inline void int4_tile_rows(const TileOperands& op, const TileSpan& at) {
  __m512 acc[kTile];
  for (int r = 0; r < kTile; ++r) acc[r] = _mm512_setzero_ps();
  const float *x_scales = op.x_scales + at.m0 * op.blocks, *x_sums = op.x_sums + at.m0 * op.blocks;
  const float *scales = op.scales + kTile * at.t, *offsets = op.offsets + kTile * at.t;
  each_block_dots<true>(op.x + at.m0 * op.in, op.codes, op.x_block, op.depth, op.blocks,
                        [&](int64_t g, const int32_t* dots) {
    __m512 scale = _mm512_loadu_ps(scales + g * kPanel);
    __m512 offset = _mm512_loadu_ps(offsets + g * kPanel);
    for (int r = 0; r < kTile; ++r) {
      __m512 x_scale = _mm512_set1_ps(x_scales[r * op.blocks + g]);
      __m512 x_sum = _mm512_set1_ps(x_sums[r * op.blocks + g]);
      acc[r] = _mm512_fmadd_ps(dots_row(dots, r), _mm512_mul_ps(x_scale, scale),
                               _mm512_fmadd_ps(x_sum, offset, acc[r]));
    }
  });
  at.store(acc);
}

// Whether panel products of `rows` x rows take the tiles for weight pw (int8 x only).
inline bool amx_takes(const PanelWeight& pw, int64_t rows) {
  return pw.x_codes != nullptr && pw.kind != PanelKind::kInt6 && rows >= amx_min_rows() &&
         tile_depth(pw.x_block) != 0 && amx_usable();
}

// Panel p of pw for every x row (x's codes and scales padded to whole tiles: XForWeight): the
// panel's codes laid out for the tiles and its scale rows read once, then 16 rows at a time.
void amx_panel(const PanelWeight& pw, int64_t rows, int64_t in, int64_t p) {
  struct Buffers {
    std::vector<uint8_t> codes;
    std::vector<float> scales, offsets;
  };
  thread_local Buffers buffers;
  bool int4 = pw.kind == PanelKind::kInt4;
  int64_t c0 = p * kPanel, out = pw.panels * kPanel;
  buffers.codes.resize(in * kPanel);
  buffers.scales.resize(pw.blocks * kPanel), buffers.offsets.resize(pw.blocks * kPanel);
  if (int4)
    tile_codes_int4(static_cast<const uint8_t*>(pw.w) + p * kPanel * in / 2, in, in / pw.blocks,
                    buffers.codes.data());
  else
    tile_codes_int8(static_cast<const int8_t*>(pw.w) + p * kPanel * in, in, buffers.codes.data());
  for (int64_t b = 0; b < pw.blocks; ++b) {
    float *scale = buffers.scales.data() + b * kPanel, *offset = buffers.offsets.data() + b * kPanel;
    if (int4) int4_group_tables(pw.s, pw.has_mins ? &pw.mins : nullptr, b, c0, scale, offset);
    else pw.s.copy_row(scale, b, c0, kPanel);
  }
  TileOperands op{pw.x_tiles, buffers.codes.data(), buffers.scales.data(),
                  buffers.offsets.data(), pw.x_scales, pw.x_sums, in, pw.blocks, pw.x_block,
                  tile_depth(pw.x_block)};
  configure_tiles(op.depth);
  for (int64_t m0 = 0; m0 < rows; m0 += kTile)
    for (int t = 0; t < 4; ++t) {
      TileOperands column = op;
      column.codes += t * kTile * in;
      TileSpan at{m0, rows, t, pw.y + c0, out};
      if (int4) int4_tile_rows(column, at);
      else int8_tile_rows(column, at);
    }
  _tile_release();
}
#endif
