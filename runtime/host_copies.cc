// Host-side copies of loading (host_copies.py): transposes of checkpoint blocks, six-bit
// packing of int8 panels, the first pass of a scale table's super-scaling, GGUF K-quant blocks
// decoded. Plain C functions
// on numpy buffers (ctypes), each the exact bytes of the numpy form it stands in for; numpy
// and XLA move 1-byte elements one at a time (BENCHMARKS.md, "Loading on every core").

#include <cmath>
#include <cstdint>
#include <cstring>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

namespace {

constexpr int64_t kTile = 64;  // a tile's rows and columns: in and out both in L1

// out [cols, rows] = in [rows, cols] (T: the element's bytes), tile by tile.
template <typename T>
void transpose_2d(const T* in, int64_t rows, int64_t cols, T* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    int64_t r1 = r0 + kTile < rows ? r0 + kTile : rows;
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      int64_t c1 = c0 + kTile < cols ? c0 + kTile : cols;
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) out[c * rows + r] = in[r * cols + c];
    }
  }
}

#ifdef __SSE2__
// vector interleave of T-sized elements: the low halves of a and b, or (kHigh) the high halves
template <typename T, bool kHigh>
inline __m128i interleave(__m128i a, __m128i b) {
  static_assert(sizeof(T) <= 4, "8-byte elements take the plain tiles");
  if constexpr (sizeof(T) == 1) return kHigh ? _mm_unpackhi_epi8(a, b) : _mm_unpacklo_epi8(a, b);
  if constexpr (sizeof(T) == 2) return kHigh ? _mm_unpackhi_epi16(a, b) : _mm_unpacklo_epi16(a, b);
  return kHigh ? _mm_unpackhi_epi32(a, b) : _mm_unpacklo_epi32(a, b);
}

// out's N rows of N elements (one 16-byte vector each; strides in elements) = the transpose of
// in's: log2(N) rounds of interleaving rows i and i + N/2 (a perfect shuffle each round).
template <typename T>
inline void transpose_block(const T* in, int64_t in_stride, T* out, int64_t out_stride) {
  constexpr int N = 16 / sizeof(T);
  __m128i a[N], b[N];
  for (int i = 0; i < N; ++i)
    a[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i * in_stride));
  for (int round = 1; round < N; round *= 2) {
    for (int i = 0; i < N / 2; ++i) {
      b[2 * i] = interleave<T, false>(a[i], a[i + N / 2]);
      b[2 * i + 1] = interleave<T, true>(a[i], a[i + N / 2]);
    }
    for (int i = 0; i < N; ++i) a[i] = b[i];
  }
  for (int i = 0; i < N; ++i)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i * out_stride), a[i]);
}

// transpose_2d with a kernel of B x B elements inside each tile, the tile's edges one at a
// time.
template <typename T, int B, void (*kernel)(const T*, int64_t, T*, int64_t)>
void transpose_2d_blocks(const T* in, int64_t rows, int64_t cols, T* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
    int64_t r1 = r0 + kTile < rows ? r0 + kTile : rows;
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      int64_t c1 = c0 + kTile < cols ? c0 + kTile : cols;
      int64_t rb = r0 + (r1 - r0) / B * B, cb = c0 + (c1 - c0) / B * B;
      for (int64_t r = r0; r < rb; r += B)
        for (int64_t c = c0; c < cb; c += B)
          kernel(in + r * cols + c, cols, out + c * rows + r, rows);
      for (int64_t c = c0; c < c1; ++c)  // the tile's edges
        for (int64_t r = c < cb ? rb : r0; r < r1; ++r) out[c * rows + r] = in[r * cols + c];
    }
  }
}

template <>
void transpose_2d<uint8_t>(const uint8_t* in, int64_t rows, int64_t cols, uint8_t* out) {
  transpose_2d_blocks<uint8_t, 16, transpose_block<uint8_t>>(in, rows, cols, out);
}

template <>
void transpose_2d<uint16_t>(const uint16_t* in, int64_t rows, int64_t cols, uint16_t* out) {
  transpose_2d_blocks<uint16_t, 8, transpose_block<uint16_t>>(in, rows, cols, out);
}

template <>
void transpose_2d<uint32_t>(const uint32_t* in, int64_t rows, int64_t cols, uint32_t* out) {
  transpose_2d_blocks<uint32_t, 4, transpose_block<uint32_t>>(in, rows, cols, out);
}
#endif

template <typename T>
void transpose_batches(const void* in, int64_t batches, int64_t rows, int64_t cols, void* out) {
  const T* from = static_cast<const T*>(in);
  T* to = static_cast<T*>(out);
  for (int64_t b = 0; b < batches; ++b)
    transpose_2d(from + b * rows * cols, rows, cols, to + b * rows * cols);
}

// word j of a six-bit quad -> the panel column it holds (six_bit.WORD_COLUMNS)
inline int64_t word_column(int64_t j) { return 16 * (j / 4 % 4) + 4 * (j / 16) + j % 4; }

}  // namespace

extern "C" {

// out [B, C, R] = in [B, R, C] for elements of `bytes` (1, 2, 4 or 8) bytes; 0, else -1.
int64_t RuntimeHostTranspose(const void* in, int64_t batches, int64_t rows, int64_t cols,
                             int64_t bytes, void* out) {
  switch (bytes) {
    case 1: transpose_batches<uint8_t>(in, batches, rows, cols, out); return 0;
    case 2: transpose_batches<uint16_t>(in, batches, rows, cols, out); return 0;
    case 4: transpose_batches<uint32_t>(in, batches, rows, cols, out); return 0;
    case 8: transpose_batches<uint64_t>(in, batches, rows, cols, out); return 0;
    default: return -1;
  }
}

// six_bit.packed: int8 panel rows [N, 64 I] (codes in [-32, 31], I a multiple of 4) ->
// uint8 [N, 48 I]: per quad of input rows, 64 little-endian 24-bit words, word j column
// word_column(j) of the four rows, row r's code in bits 6r .. 6r + 5.
void RuntimeHostSixBitPack(const int8_t* tiles, int64_t rows, int64_t width, uint8_t* out) {
  const int64_t quads = width / 256;
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t q = 0; q < quads; ++q) {
      const int8_t* quad = tiles + n * width + q * 256;
      uint8_t* to = out + n * quads * 192 + q * 192;
      for (int64_t j = 0; j < 64; ++j) {
        int64_t c = word_column(j);
        uint32_t word = 0;
        for (int r = 0; r < 4; ++r) word |= (uint32_t(uint8_t(quad[64 * r + c])) & 63) << (6 * r);
        to[3 * j] = uint8_t(word), to[3 * j + 1] = uint8_t(word >> 8);
        to[3 * j + 2] = uint8_t(word >> 16);
      }
    }
}

// gguf_quants' Q4_K packed codes: qs [N, 128] (bytes 32c .. 32c + 31 hold values 64c .. 64c + 31
// in their low nibbles, 64c + 32 .. in their high) -> [N, 128] in quant4's order per group of 32
// (byte j of a group: value j low, value j + 16 high).
void RuntimeHostQ4KPacked(const uint8_t* qs, int64_t blocks, uint8_t* out) {
  for (int64_t n = 0; n < blocks * 4; ++n) {  // 32 bytes of qs: groups 2c (low), 2c + 1 (high)
    const uint8_t* from = qs + 32 * n;
    uint8_t* to = out + 32 * n;
    for (int j = 0; j < 16; ++j) {
      to[j] = uint8_t((from[j] & 15) | ((from[j + 16] & 15) << 4));
      to[16 + j] = uint8_t((from[j] >> 4) | (from[j + 16] & 0xF0));
    }
  }
}

// gguf_quants' Q6_K values: blocks [N, 192] (ql 128 | qh 64) -> int8 [N, 256]: in half h of a
// block, value i's low 4 bits are ql[64h + i % 64]'s low (i < 64) or high nibble, its high 2
// bits qh[32h + i % 32]'s bits 2 (i / 32), 2 (i / 32) + 1; minus 32.
void RuntimeHostQ6KValues(const uint8_t* raw, int64_t blocks, int8_t* out) {
  for (int64_t n = 0; n < blocks * 2; ++n) {  // halves
    const uint8_t* ql = raw + 192 * (n / 2) + 64 * (n % 2);
    const uint8_t* qh = raw + 192 * (n / 2) + 128 + 32 * (n % 2);
    int8_t* to = out + 128 * n;
    for (int i = 0; i < 128; ++i) {
      int low = i < 64 ? ql[i] & 15 : ql[i - 64] >> 4;
      int high = (qh[i % 32] >> (2 * (i / 32))) & 3;
      to[i] = int8_t((low | (high << 4)) - 32);
    }
  }
}

// gguf_quants' Q5_K codes: blocks [N, 160] (qh 32 | qs 128) -> uint8 [N, 256] in 0..31: value
// 64c + 32t + j takes qs[32c + j]'s low (t = 0) or high nibble and bit 2c + t of qh[j] above it.
void RuntimeHostQ5KCodes(const uint8_t* raw, int64_t blocks, uint8_t* out) {
  for (int64_t n = 0; n < blocks; ++n) {
    const uint8_t *qh = raw + 160 * n, *qs = qh + 32;
    uint8_t* to = out + 256 * n;
    for (int c = 0; c < 4; ++c)
      for (int t = 0; t < 2; ++t)
        for (int j = 0; j < 32; ++j) {
          int low = t == 0 ? qs[32 * c + j] & 15 : qs[32 * c + j] >> 4;
          to[64 * c + 32 * t + j] = uint8_t(low | (((qh[j] >> (2 * c + t)) & 1) << 4));
        }
  }
}

// gguf_quants' Q4_K / Q5_K sub-scales: raw [N, 14] (an f16 factor, then the 12 scale bytes) ->
// float32 [N, 8], factor x sc (mins = 0) or -(factor x m) (mins = 1), the 6-bit sc / m of
// sub-block i: bytes 0-3 / 4-7 low 6 bits (i < 4), else byte 8 + i - 4's low / high nibble with
// the top 2 bits of byte i - 4 / i above it.
void RuntimeHostKSubScales(const uint8_t* raw, int64_t blocks, int64_t mins, float* out) {
  for (int64_t n = 0; n < blocks; ++n) {
    const uint8_t* block = raw + 14 * n;
    _Float16 half;
    std::memcpy(&half, block, 2);
    const float factor = float(half);
    const uint8_t *a = block + 2, *b = block + 6, *c = block + 10;
    for (int i = 0; i < 8; ++i) {
      int value;
      if (!mins)
        value = i < 4 ? a[i] & 63 : (c[i - 4] & 15) | ((a[i - 4] >> 6) << 4);
      else
        value = i < 4 ? b[i] & 63 : (c[i - 4] >> 4) | ((b[i - 4] >> 6) << 4);
      float product = factor * float(value);
      out[8 * n + i] = mins ? -product : product;
    }
  }
}

// super_scales._decomposed's first pass over blocks [N, 8] of float32 values: the super an
// f16 of the block's value of largest magnitude (its first) over a candidate sub (uint8: 63;
// int8: -128, then -127: super_scales.CANDIDATES' first), kept where every value is that super
// times an integer sub in range, exactly. Writes supers [N] (f16 bits) and subs [N, 8] of the
// solved blocks and solved [N] (1 solved, 0 not: numpy's later passes take those, and blocks
// with a value not finite); an all-zero block is solved with super and subs 0. Returns the
// number unsolved.
int64_t RuntimeHostSuperScaleFirstPass(const float* blocks, int64_t count, int64_t signed_subs,
                                       uint16_t* supers, int8_t* subs, uint8_t* solved) {
  const int low = signed_subs ? -128 : 0, high = signed_subs ? 127 : 255;
  const int candidates[2] = {signed_subs ? -128 : 63, -127};
  const int tries = signed_subs ? 2 : 1;
  int64_t left = 0;
  for (int64_t n = 0; n < count; ++n) {
    const float* v = blocks + 8 * n;
    solved[n] = 0;
    bool finite = true;
    float extreme = v[0];
    for (int k = 0; k < 8; ++k) {
      finite = finite && std::isfinite(v[k]);
      if (std::fabs(v[k]) > std::fabs(extreme)) extreme = v[k];
    }
    if (finite && extreme == 0.0f) {  // all zeros
      supers[n] = 0, solved[n] = 1;
      std::memset(subs + 8 * n, 0, 8);
      continue;
    }
    for (int t = 0; finite && t < tries && !solved[n]; ++t) {
      _Float16 candidate = _Float16(extreme / float(candidates[t]));
      float wide = float(candidate);
      if (!std::isfinite(wide) || wide == 0.0f) continue;
      int codes[8];
      bool exact = true;
      for (int k = 0; k < 8 && exact; ++k) {
        float code = std::nearbyint(v[k] / wide);
        exact = code >= low && code <= high && wide * code == v[k];
        codes[k] = exact ? int(code) : 0;
      }
      if (!exact) continue;
      std::memcpy(supers + n, &candidate, 2);
      for (int k = 0; k < 8; ++k) subs[8 * n + k] = int8_t(uint8_t(codes[k] & 255));
      solved[n] = 1;
    }
    left += !solved[n];
  }
  return left;
}

}  // extern "C"
