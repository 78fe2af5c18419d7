// What the attention kernels share (cpu_attention.cc: decode; cpu_prefill_attention.cc:
// prefill): bfloat16 and float16 widening, a vectorisable e^x, 16 lanes of a key or value row.
// Internal to the file that includes it, after cpu_kernels.h.
#pragma once

#include <cmath>

#include "cpu_kernels.h"

// The attention handlers' binding after their operands: scale, soft cap (0: none), sliding
// window (0: none), and the float32 result.
#define RUNTIME_ATTENTION_ATTRS                                                        \
  .Attr<float>("scale").Attr<float>("cap").Attr<int64_t>("window").Ret<ffi::Buffer<ffi::F32>>()

namespace {

// A float16 key or value (--kv-dtype float16); a plain uint16_t is a bfloat16 one.
struct HalfKV {
  uint16_t bits;
};

inline float widen(float v) { return v; }
inline float widen(uint16_t bits) {  // bfloat16: the high half of a float32
  uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}
inline float widen(HalfKV h) { return half_to_float(h.bits); }

// f(T{}) for the memory's element type: float32, bfloat16 (uint16_t) or float16 (HalfKV).
template <typename F>
inline void with_memory_type(ffi::DataType type, F&& f) {
  if (type == ffi::DataType::F32) f(float{});
  else if (type == ffi::DataType::BF16) f(uint16_t{});
  else f(HalfKV{});
}
inline bool memory_type_known(ffi::DataType type) {
  return type == ffi::DataType::F32 || type == ffi::DataType::BF16 ||
         type == ffi::DataType::F16;
}

// q[0:h] . k[0:h] in 16 independent lanes (which the compiler vectorises), then their sum.
template <typename T>
inline float dot(const float* q, const T* k, int64_t h) {
  float lanes[16] = {};
  int64_t i = 0;
  for (; i + 16 <= h; i += 16)
    for (int j = 0; j < 16; ++j) lanes[j] += q[i + j] * widen(k[i + j]);
  float sum = 0.0f;
  for (; i < h; ++i) sum += q[i] * widen(k[i]);
  for (int j = 0; j < 16; ++j) sum += lanes[j];
  return sum;
}

// e^x for x <= 0 (a logit minus the row's max), within 2 ulp of expf; plain arithmetic, so the
// loop that calls it vectorises (expf is a call per element: 26k per SmolLM step).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // below, e^x is under float32's normal range: 0 after the scale
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (plain adds, which vectorise where rint may not)
  float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // x - n ln 2, ln 2 in two parts
  float p = 1.98412701e-4f;  // e^r on [-ln2/2, ln2/2], Taylor to r^7 (error < 1e-8)
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (int32_t(n) + 127) << 23;  // 2^n, n >= -126
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

#ifdef __AVX512F__
// exp_nonpositive in 16 lanes (the same steps, so the same values).
inline __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 shift = _mm512_set1_ps(12582912.0f);
  __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504f), shift), shift);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                             _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  const float terms[] = {1.38888889e-3f, 8.33333333e-3f, 4.16666667e-2f, 1.66666667e-1f,
                         0.5f, 1.0f, 1.0f};
  __m512 p = _mm512_set1_ps(1.98412701e-4f);
  for (float term : terms) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(term));
  __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

inline __m512 lanes16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 lanes16(const uint16_t* p) {  // 16 bfloat16 -> float32
  __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 lanes16(const HalfKV* p) {  // 16 float16 -> float32
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

}  // namespace
