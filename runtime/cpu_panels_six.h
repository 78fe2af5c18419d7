// int8 panels whose codes fit six bits (GGUF Q6_K, Q5_K, Q5_0: six_bit.py), stored packed:
// every four input rows of a panel (a quad) as 64 24-bit words, one per column, s_0 | s_1 << 6 |
// s_2 << 12 | s_3 << 18 (s_r: row r's code, six bits two's complement), in quad_columns' order
// (cpu_panels_int8_x.h): 48 bytes of words n = 16 k .. 16 k + 15 are vector k's 16 columns.
// A byte permute (VBMI) puts a vector's words in its 32-bit lanes; then a multishift and a mask
// give vpdpbusd its four rows' codes (s ^ 32 = v + 32, unsigned), or a shift pair one row's
// code as an int32. The int8 products on 3/4 of the bytes: int8 x's bit for bit (its dots less
// 32 x sum(x's codes)); under float x the digits' (cpu_panels_six_x24.h), or float loops that
// take each column's FMAs in the int8 loops' order (bit for bit theirs, the A/B).
// AVX-512 VBMI and VNNI builds only (cpu_kernels.six_bit_panels: elsewhere weights stay int8).
// The format and its unpacking here; the float-x loops in cpu_panels_six_float_x.h. Included by
// cpu_panels.cc inside its namespace, before the int8-x loops.

#pragma once

constexpr int64_t kSixQuad = 3 * kPanel;  // bytes of a quad of a panel
constexpr int64_t kSixRowBytes = kSixQuad / 4;
constexpr int64_t kSixVector = kSixQuad / 4;  // bytes of a vector's 16 words

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#define RUNTIME_PANELS_SIX  // six-bit panels' loops: built, and taken (RuntimeSixBitPanels)

// Vector k's 16 words of a quad, word c in the low 24 bits of 32-bit lane c. Plain 64-byte loads
// inside the quad: vectors 0-2 from their first byte, vector 3 the quad's last 64 bytes (its
// words at byte 16). 48-byte masked loads held six-bit products to half their speed on an AMD
// Zen 5 VM (BENCHMARKS.md, "Six-bit panels and weight prefetch on the Zen 5").
__attribute__((always_inline)) inline __m512i six_words(const uint8_t* quad, int k) {
  const __m512i spread = _mm512_set_epi8(
      47, 47, 46, 45, 44, 44, 43, 42, 41, 41, 40, 39, 38, 38, 37, 36, 35, 35, 34, 33, 32, 32, 31,
      30, 29, 29, 28, 27, 26, 26, 25, 24, 23, 23, 22, 21, 20, 20, 19, 18, 17, 17, 16, 15, 14, 14,
      13, 12, 11, 11, 10, 9, 8, 8, 7, 6, 5, 5, 4, 3, 2, 2, 1, 0);
  if (k == 3)
    return _mm512_permutexvar_epi8(_mm512_add_epi8(spread, _mm512_set1_epi8(16)),
                                   _mm512_loadu_si512(quad + kSixQuad - 64));
  return _mm512_permutexvar_epi8(spread, _mm512_loadu_si512(quad + k * kSixVector));
}

// The four rows' codes of 16 words as vpdpbusd's unsigned bytes, v + 32 (byte r of lane c: row
// r of column c, quad_columns' layout).
__attribute__((always_inline)) inline __m512i six_unsigned(__m512i words) {
  const __m512i windows = _mm512_set1_epi64(0x322C2620120C0600ll);  // bits 0 6 12 18 32 .. 50
  const __m512i low6 = _mm512_set1_epi8(63), bias = _mm512_set1_epi8(32);
  // (a & b) ^ c (0x6A): the six bits, sign bit flipped (s ^ 32 = v + 32)
  return _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(windows, words), low6, bias, 0x6A);
}

// Row r's codes of 16 words as float32 (bits 6 r .. 6 r + 5, sign-extended).
template <int kRow>
__attribute__((always_inline)) inline __m512 six_row_floats(__m512i words) {
  return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(words, 26 - 6 * kRow), 26));
}
#endif
