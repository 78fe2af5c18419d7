// Decode attention over a KV memory read where it lies (a scanned layer's memory is layer l of
// the stacked [L, B, K, S, H] arrays): one query token per row, every step, every layer. XLA:CPU
// ran it as a copy of the layer's memory out of its stack, then two small batched dots and a
// softmax between them, ten times this kernel's time (BENCHMARKS.md, "Decode attention kernel").
// Built with cpu_kernels.cc (cpu_kernels.py); float32 sums, so results agree with XLA's within
// float32 rounding.
//
// Shapes: q [B, K, G, H] float32 (rotated); memory keys, values [B', K, S, H] or stacks
// [L, B', K, S, H] (float32, bfloat16 or float16) with `layer`; held [B, S'] the position each
// of the first S' slots holds (negative: empty); positions [B] the query's; rows [B] the memory row of
// each query row; the chunk's own keys, values [B, T, K, H] (T 0 or 1, the memory's dtype).
// y [B, K, G, H] float32 = softmax over the visible keys of scale * q.k (capped) times v.

#include <cmath>
#include <limits>

#include "cpu_kernels.h"
#include "cpu_attention.h"

namespace {

#ifdef __AVX512F__
// out[j * stride] = q[j] . key for the MB query rows q [MB, H] (H a multiple of 16): the key
// row is loaded once for all of them; one tree sum per logit.
template <int MB, typename T>
inline void key_logits16(const float* q, const T* key, int64_t dim, float* out, int64_t stride) {
  __m512 acc[MB];
  for (int j = 0; j < MB; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t h = 0; h < dim; h += 16) {
    __m512 k = lanes16(key + h);
    for (int j = 0; j < MB; ++j)
      acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(q + j * dim + h), k, acc[j]);
  }
  for (int j = 0; j < MB; ++j) out[j * stride] = _mm512_reduce_add_ps(acc[j]);
}

// out[j, h0 : h0 + 16 C] = sum_s p[j * n + s] value_row(s)[h0 : h0 + 16 C] for MB query rows:
// MB x C sums in registers over every key.
template <int MB, int C, typename T, typename Rows>
inline void weighted16(const float* p, int64_t n, const Rows& value_row, int64_t h0,
                       int64_t dim, float* out) {
  __m512 acc[MB][C];
#pragma GCC unroll 4
  for (int j = 0; j < MB; ++j)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[j][c] = _mm512_setzero_ps();
  int64_t ahead = prefetch_distance(true);
  // the loops unrolled as written: otherwise GCC kept acc on the stack, a store of every
  // sum for every key (BENCHMARKS.md, "KV memory dtypes")
  for (int64_t s = 0; s < n; ++s) {
    const T* v = value_row(s) + h0;
    prefetch_span(v, 16 * C * sizeof(T), ahead);  // the next rows' values, read in turn
    __m512 ps[MB];
#pragma GCC unroll 4
    for (int j = 0; j < MB; ++j) ps[j] = _mm512_set1_ps(p[j * n + s]);
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      __m512 vv = lanes16(v + 16 * c);
#pragma GCC unroll 4
      for (int j = 0; j < MB; ++j) acc[j][c] = _mm512_fmadd_ps(ps[j], vv, acc[j][c]);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < MB; ++j)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + j * dim + h0 + 16 * c, acc[j][c]);
}
#endif

// logits[g * n] = q[g] . key for the G query rows q [G, H] of one kv head.
template <typename T>
inline void key_logits(const float* q, int64_t groups, const T* key, int64_t dim, float* logits,
                       int64_t n) {
#ifdef __AVX512F__
  if (dim % 16 == 0) {
    for (int64_t g = 0; g < groups; g += 4)
      with_row_count(groups - g, [&](auto mb) {
        key_logits16<decltype(mb)::value>(q + g * dim, key, dim, logits + g * n, n);
      });
    return;
  }
#endif
  for (int64_t g = 0; g < groups; ++g) logits[g * n] = dot(q + g * dim, key, dim);
}

// out[g] = sum_s p[g * n + s] value_row(s) for the G query rows of one kv head: out [G, H].
template <typename T, typename Rows>
inline void weighted_values(const float* p, int64_t n, int64_t groups, const Rows& value_row,
                            int64_t dim, float* out) {
#ifdef __AVX512F__
  if (dim % 16 == 0) {
    for (int64_t g = 0; g < groups; g += 4)
      for (int64_t h0 = 0; h0 < dim; h0 += 64)
        with_row_count(groups - g, [&](auto mb) {
          with_row_count((dim - h0) / 16, [&](auto c) {
            weighted16<decltype(mb)::value, decltype(c)::value, T>(p + g * n, n, value_row, h0,
                                                                   dim, out + g * dim);
          });
        });
    return;
  }
#endif
  std::fill(out, out + groups * dim, 0.0f);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t s = 0; s < n; ++s) {
      const T* v = value_row(s);
      for (int64_t h = 0; h < dim; ++h) out[g * dim + h] += p[g * n + s] * widen(v[h]);
    }
}

// Softmax in place over row[0:n] (logits, -inf where unseen): scaled, capped.
inline void softmax_row(float* row, int64_t n, float scale, float cap) {
  const float unseen = -std::numeric_limits<float>::infinity();
  float top = unseen;
  for (int64_t s = 0; s < n; ++s) {
    if (row[s] == unseen) continue;
    float logit = scale * row[s];
    if (cap > 0.0f) logit = cap * std::tanh(logit / cap);
    row[s] = logit;
    top = std::max(top, logit);
  }
  float total = 0.0f;
  for (int64_t s = 0; s < n; ++s) {
    float p = row[s] == unseen ? 0.0f : exp_nonpositive(row[s] - top);
    row[s] = p;
    total += p;
  }
  for (int64_t s = 0; s < n; ++s) row[s] /= total;
}

struct Attention {
  const float* q;
  const void* keys;  // layer l's [B', K, S, H]
  const void* values;
  const int32_t* held;
  const int32_t* positions;
  const int32_t* rows;
  const void* new_keys;  // [B, T, K, H]
  const void* new_values;
  int64_t memory_rows, heads, groups, slots, read, dim, chunk;
  float scale, cap;
  int64_t window;
  float* y;

  // Query row b, kv head k: its G query heads over the visible memory slots, then the chunk
  // (at the query's own position). probs: scratch for [G, S' + T].
  template <typename T>
  void head(int64_t b, int64_t k, std::vector<float>& probs) const {
    int64_t position = positions[b], n = read + chunk;
    int64_t memory = (rows[b] * heads + k) * slots * dim, own = (b * chunk * heads + k) * dim;
    const T* key0 = static_cast<const T*>(keys) + memory;
    const T* value0 = static_cast<const T*>(values) + memory;
    const T* new_k = static_cast<const T*>(new_keys) + own;
    const T* new_v = static_cast<const T*>(new_values) + own;
    const int32_t* held_b = held + b * read;
    const float* qk = q + (b * heads + k) * groups * dim;  // [G, H]
    probs.resize(groups * n);
    int64_t ahead = prefetch_distance(true);
    for (int64_t s = 0; s < n; ++s) {
      if (s < read) prefetch_span(key0 + s * dim, dim * sizeof(T), ahead);  // keys in turn
      int64_t at = s < read ? held_b[s] : position;
      if (at < 0 || at > position || (window > 0 && position - at >= window)) {
        for (int64_t g = 0; g < groups; ++g)
          probs[g * n + s] = -std::numeric_limits<float>::infinity();
        continue;
      }
      key_logits(qk, groups, s < read ? key0 + s * dim : new_k + (s - read) * heads * dim, dim,
                 probs.data() + s, n);
    }
    for (int64_t g = 0; g < groups; ++g) softmax_row(probs.data() + g * n, n, scale, cap);
    auto value_row = [=](int64_t s) {
      return s < read ? value0 + s * dim : new_v + (s - read) * heads * dim;
    };
    weighted_values<T>(probs.data(), n, groups, value_row, dim,
                       y + (b * heads + k) * groups * dim);
  }
};

// The memory's [B', K, S, H] (layer `layer` of a stack [L, ...]); false for other shapes.
bool memory_at(const ffi::AnyBuffer& buffer, int64_t layer, int64_t bytes, const void** at,
               ffi::Span<const int64_t>* dims) {
  auto d = buffer.dimensions();
  if (d.size() == 4 && layer == 0) {
    *at = buffer.untyped_data(), *dims = d;
    return true;
  }
  if (d.size() != 5 || layer < 0 || layer >= d[0]) return false;
  *at = static_cast<const char*>(buffer.untyped_data()) + layer * d[1] * d[2] * d[3] * d[4] * bytes;
  *dims = d.last(4);
  return true;
}

ffi::Error decode_attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer keys,
                            ffi::AnyBuffer values, ffi::Buffer<ffi::S32> layer,
                            ffi::Buffer<ffi::S32> held, ffi::Buffer<ffi::S32> positions,
                            ffi::Buffer<ffi::S32> rows, ffi::AnyBuffer new_keys,
                            ffi::AnyBuffer new_values, float scale, float cap, int64_t window,
                            ffi::ResultBuffer<ffi::F32> y) {
  auto type = keys.element_type();
  bool typed = memory_type_known(type) &&
               values.element_type() == type && new_keys.element_type() == type &&
               new_values.element_type() == type && layer.element_count() == 1;
  int64_t bytes = type == ffi::DataType::F32 ? 4 : 2, l = typed ? layer.typed_data()[0] : -1;
  Attention a;
  ffi::Span<const int64_t> kd, vd;
  auto qd = q.dimensions(), hd = held.dimensions(), nd = new_keys.dimensions();
  bool valid = typed && memory_at(keys, l, bytes, &a.keys, &kd) &&
               memory_at(values, l, bytes, &a.values, &vd) && qd.size() == 4 && hd.size() == 2 &&
               nd.size() == 4 && kd == vd &&
               qd[1] == kd[1] && qd[3] == kd[3] && hd[0] == qd[0] && hd[1] <= kd[2] &&
               positions.element_count() == qd[0] && rows.element_count() == qd[0] &&
               nd[0] == qd[0] && nd[1] <= 1 && nd[2] == kd[1] && nd[3] == kd[3] &&
               new_values.dimensions() == nd;
  if (!valid)
    return ffi::Error::InvalidArgument(
        "decode_attention: shapes must be q [B, K, G, H] float32, memory [B', K, S, H] (or "
        "stacks [L, ...] with a layer in range; float32, bfloat16 or float16), held "
        "[B, S' <= S], positions and rows [B], the chunk's keys and values [B, 0 or 1, K, H]");
  a.q = q.typed_data(), a.held = held.typed_data(), a.positions = positions.typed_data();
  a.rows = rows.typed_data(), a.new_keys = new_keys.untyped_data();
  a.new_values = new_values.untyped_data(), a.y = y->typed_data();
  a.memory_rows = kd[0], a.heads = kd[1], a.slots = kd[2], a.dim = kd[3];
  a.groups = qd[2], a.read = hd[1], a.chunk = nd[1];
  a.scale = scale, a.cap = cap, a.window = window;
  for (int64_t b = 0; b < qd[0]; ++b)
    if (a.rows[b] < 0 || a.rows[b] >= a.memory_rows)
      return ffi::Error::InvalidArgument("decode_attention: a row index is out of range");
  int64_t tasks = qd[0] * a.heads;
  auto run = [a, type](int64_t task) {
    thread_local std::vector<float> logits;
    with_memory_type(type, [&](auto element) {
      a.head<decltype(element)>(task / a.heads, task % a.heads, logits);
    });
  };
  // Threads only for enough work: a handoff costs ~1.3 us. Above 16K products a row's memory
  // comes from DRAM at one thread's rate: SmolLM decode at 225 positions, 2^18 -> 2^14, 1.17x.
  if (tasks * a.groups * (a.read + a.chunk) * a.dim < (1 << 14)) {
    for (int64_t t = 0; t < tasks; ++t) run(t);
  } else {
    parallel_chunks(pool, tasks, run);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RuntimeDecodeAttention, decode_attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>() RUNTIME_ATTENTION_ATTRS);
