// Prefill attention of a long prompt or chunk on the CPU: flash-attention style, a tile of
// queries against blocks of keys with a running max and sum per query row, never the [T, S]
// logits. XLA:CPU ran models/blockwise.py's loop at 37-61 GFLOP/s, this kernel at 116 (SmolLM
// heads, 2k tokens); an 8k SmolLM prompt prefills at 1.40x llama.cpp's rate with it, 0.82x
// without (BENCHMARKS.md, "Prefill attention kernel"). Built with cpu_kernels.cc
// (cpu_kernels.py); float32 sums and statistics.
//
// Shapes: q [B, T, K, G, H] float32 (rotated) at positions [B, T]; the memory keys, values
// [B', K, S, H] (float32, bfloat16 or float16), of which the first S' slots of row rows[b] hold the
// positions held [B, S'] (negative: empty); the chunk's own keys, values [B, U, K, H] (U = T,
// or 0 when the memory already holds them; the memory's dtype) at the queries' positions.
// A key is seen by a query when its position is >= 0, <= the query's, and (window > 0) fewer
// than `window` positions back. y [B, T, K, G, H] float32 = softmax over the seen keys of
// scale * q.k (capped: cap tanh(l / cap)) times v; 0 for a query that sees no key.

#include <cmath>
#include <limits>

#include "cpu_kernels.h"
#include "cpu_attention.h"

namespace {

constexpr int64_t kKeys = 64;     // keys per block: a query row's logits are 4 x 16 lanes
constexpr int64_t kQueries = 64;  // queries per task (rows: queries x G query heads)
constexpr float kUnseen = -1e30f;

// cap tanh(x / cap): an odd series below |x / cap| = 1/4 (next term < 1e-8 relative), above it
// (1 - e) / (1 + e) with e = e^(-2|x / cap|); both branchless, so the loop vectorises.
inline float capped(float x, float cap) {
  float y = std::fabs(x / cap), y2 = y * y;
  float series = y * (1.0f + y2 * (-1.0f / 3 + y2 * (2.0f / 15 + y2 * (-17.0f / 315 +
                                                                       y2 * 62.0f / 2835))));
  float e = exp_nonpositive(-2.0f * y);
  float t = y < 0.25f ? series : (1.0f - e) / (1.0f + e);
  return std::copysign(cap * t, x);
}

#ifdef __AVX512F__
inline __m512 capped16(__m512 x, float cap) {  // capped() in 16 lanes
  __m512 y = _mm512_abs_ps(_mm512_div_ps(x, _mm512_set1_ps(cap))), y2 = _mm512_mul_ps(y, y);
  __m512 series = _mm512_fmadd_ps(y2, _mm512_set1_ps(62.0f / 2835), _mm512_set1_ps(-17.0f / 315));
  series = _mm512_fmadd_ps(y2, series, _mm512_set1_ps(2.0f / 15));
  series = _mm512_fmadd_ps(y2, series, _mm512_set1_ps(-1.0f / 3));
  series = _mm512_mul_ps(y, _mm512_fmadd_ps(y2, series, _mm512_set1_ps(1.0f)));
  __m512 e = exp_nonpositive16(_mm512_mul_ps(y, _mm512_set1_ps(-2.0f)));
  __m512 one = _mm512_set1_ps(1.0f);
  __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
  t = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(y, _mm512_set1_ps(0.25f), _CMP_LT_OQ), t, series);
  __m512 sign = _mm512_and_ps(x, _mm512_castsi512_ps(_mm512_set1_epi32(int32_t(0x80000000u))));
  return _mm512_or_ps(_mm512_mul_ps(t, _mm512_set1_ps(cap)), sign);
}
#endif

// logits [R, 64] = q [R, H] (rows at stride H) times kt [H, 64] (a key block transposed).
inline void block_logits(const float* q, int64_t rows, int64_t dim, const float* kt,
                         float* logits) {
#ifdef __AVX512F__
  for (int64_t r = 0; r < rows; r += 4)
    with_row_count(rows - r, [&](auto mb) {
      constexpr int MB = decltype(mb)::value;
      __m512 acc[MB][4];
      for (int j = 0; j < MB; ++j)
        for (int c = 0; c < 4; ++c) acc[j][c] = _mm512_setzero_ps();
      for (int64_t h = 0; h < dim; ++h) {
        __m512 k[4];
        for (int c = 0; c < 4; ++c) k[c] = _mm512_loadu_ps(kt + h * kKeys + 16 * c);
        for (int j = 0; j < MB; ++j) {
          __m512 qv = _mm512_set1_ps(q[(r + j) * dim + h]);
          for (int c = 0; c < 4; ++c) acc[j][c] = _mm512_fmadd_ps(qv, k[c], acc[j][c]);
        }
      }
      for (int j = 0; j < MB; ++j)
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(logits + (r + j) * kKeys + 16 * c, acc[j][c]);
    });
#else
  for (int64_t r = 0; r < rows; ++r) {
    float* out = logits + r * kKeys;
    std::fill(out, out + kKeys, 0.0f);
    for (int64_t h = 0; h < dim; ++h)
      for (int64_t s = 0; s < kKeys; ++s) out[s] += q[r * dim + h] * kt[h * kKeys + s];
  }
#endif
}

// acc[r] = acc[r] * correction[r] + sum_s p[r, s] value_row(s) for R rows (acc [R, H]).
template <typename T>
inline void block_values(const float* p, int64_t rows, int64_t keys, const T* value0,
                         int64_t stride, const float* correction, int64_t dim, float* acc) {
#ifdef __AVX512F__
  if (dim % 16 == 0) {
    for (int64_t r = 0; r < rows; r += 4)
      for (int64_t h0 = 0; h0 < dim; h0 += 64)
        with_row_count(rows - r, [&](auto mb) {
          with_row_count((dim - h0) / 16, [&](auto cc) {
            constexpr int MB = decltype(mb)::value, C = decltype(cc)::value;
            __m512 a[MB][C];
            for (int j = 0; j < MB; ++j) {
              __m512 scale = _mm512_set1_ps(correction[r + j]);
              for (int c = 0; c < C; ++c)
                a[j][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + (r + j) * dim + h0 + 16 * c), scale);
            }
            for (int64_t s = 0; s < keys; ++s) {
              const T* v = value0 + s * stride + h0;
              __m512 vv[C];
              for (int c = 0; c < C; ++c) vv[c] = lanes16(v + 16 * c);
              for (int j = 0; j < MB; ++j) {
                __m512 ps = _mm512_set1_ps(p[(r + j) * kKeys + s]);
                for (int c = 0; c < C; ++c) a[j][c] = _mm512_fmadd_ps(ps, vv[c], a[j][c]);
              }
            }
            for (int j = 0; j < MB; ++j)
              for (int c = 0; c < C; ++c)
                _mm512_storeu_ps(acc + (r + j) * dim + h0 + 16 * c, a[j][c]);
          });
        });
    return;
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    float* out = acc + r * dim;
    for (int64_t h = 0; h < dim; ++h) out[h] *= correction[r];
    for (int64_t s = 0; s < keys; ++s)
      for (int64_t h = 0; h < dim; ++h) out[h] += p[r * kKeys + s] * widen(value0[s * stride + h]);
  }
}

// One task's queries: rows r = t * G + g, their positions, and the online softmax's state.
struct Tile {
  int64_t queries, rows;
  const int32_t* positions;  // [queries]
  int32_t first, last;       // the smallest and largest query position
  std::vector<float> q, logits, top, total, correction, acc, kt;
};

struct Prefill {
  const float* q;
  const void *keys, *values, *new_keys, *new_values;
  const int32_t *held, *rows, *positions;
  int64_t length, heads, groups, dim, slots, read, chunk;
  float scale, cap;
  int64_t window;
  float* y;

  bool sees(int32_t key, int32_t query) const {
    return key >= 0 && key <= query && (window <= 0 || int64_t(query) - key < window);
  }

  // Row r's logits of a key block (positions at [64]) scaled, capped and masked, then turned
  // into e^(l - max) with the running max, sum and the correction of the sums before;
  // seen_below > 0: the first seen_below keys are seen by every query (no mask to evaluate).
  void softmax_block(Tile& tile, int64_t r, const int32_t* at, int64_t seen_below) const {
    float* row = tile.logits.data() + r * kKeys;
    int32_t query = tile.positions[r / groups];
    float top = tile.top[r], sum = 0.0f;
#ifdef __AVX512F__
    // lowest seen position: query - window + 1 (int32 positions; a window past them: none)
    int64_t lowest = window > 0 ? std::max<int64_t>(int64_t(query) - window + 1, 0) : 0;
    __m512i first = _mm512_set1_epi32(int32_t(lowest)), last = _mm512_set1_epi32(query);
    __m512 unseen = _mm512_set1_ps(kUnseen), tops = _mm512_set1_ps(top), sums = _mm512_setzero_ps();
    for (int64_t c = 0; c < kKeys; c += 16) {
      __m512 logit = _mm512_mul_ps(_mm512_loadu_ps(row + c), _mm512_set1_ps(scale));
      if (cap > 0.0f) logit = capped16(logit, cap);
      __m512i keys = _mm512_loadu_si512(at + c);
      __mmask16 seen = seen_below > 0
          ? _mm512_cmplt_epi32_mask(_mm512_add_epi32(_mm512_set1_epi32(int32_t(c)),
                                                     _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7,
                                                                       8, 9, 10, 11, 12, 13, 14, 15)),
                                    _mm512_set1_epi32(int32_t(seen_below)))
          : _mm512_cmpge_epi32_mask(keys, first) & _mm512_cmple_epi32_mask(keys, last);
      logit = _mm512_mask_blend_ps(seen, unseen, logit);
      _mm512_storeu_ps(row + c, logit);
      tops = _mm512_max_ps(tops, logit);
    }
    top = _mm512_reduce_max_ps(tops);
    for (int64_t c = 0; c < kKeys; c += 16) {
      __m512 logit = _mm512_loadu_ps(row + c);
      __mmask16 seen = _mm512_cmp_ps_mask(logit, unseen, _CMP_NEQ_OQ);
      __m512 p = _mm512_maskz_mov_ps(seen, exp_nonpositive16(_mm512_sub_ps(logit,
                                                                           _mm512_set1_ps(top))));
      _mm512_storeu_ps(row + c, p);
      sums = _mm512_add_ps(sums, p);
    }
    sum = _mm512_reduce_add_ps(sums);
#else
    for (int64_t s = 0; s < kKeys; ++s) {
      float logit = row[s] * scale;
      if (cap > 0.0f) logit = capped(logit, cap);
      bool seen = seen_below > 0 ? s < seen_below : sees(at[s], query);
      row[s] = seen ? logit : kUnseen;
      top = std::max(top, row[s]);
    }
    for (int64_t s = 0; s < kKeys; ++s) {
      row[s] = row[s] == kUnseen ? 0.0f : exp_nonpositive(row[s] - top);
      sum += row[s];
    }
#endif
    tile.correction[r] = tile.top[r] == kUnseen ? 0.0f : exp_nonpositive(tile.top[r] - top);
    tile.total[r] = tile.total[r] * tile.correction[r] + sum;
    tile.top[r] = top;
  }

  // The tile's rows over keys [s0, s0 + n) of one source: key s at key0 + s * stride, at
  // position key_positions[s].
  template <typename T>
  void block(Tile& tile, const T* key0, const T* value0, int64_t stride,
             const int32_t* key_positions, int64_t n) const {
    int32_t at[kKeys];  // the block's key positions, -1 (unseen) past its n keys
    int32_t low = std::numeric_limits<int32_t>::max(), high = -1;
    bool any_empty = false;
    for (int64_t s = 0; s < kKeys; ++s) {
      at[s] = s < n ? key_positions[s] : -1;
      any_empty |= s < n && at[s] < 0;
      if (at[s] >= 0) low = std::min(low, at[s]), high = std::max(high, at[s]);
    }
    if (high < 0 || low > tile.last || (window > 0 && int64_t(tile.first) - high >= window))
      return;  // no query of the tile sees a key of the block
    bool all_seen = !any_empty && high <= tile.first &&
                    (window <= 0 || int64_t(tile.last) - low < window);
    float* kt = tile.kt.data();
    for (int64_t s = 0; s < kKeys; ++s)
      for (int64_t h = 0; h < dim; ++h)
        kt[h * kKeys + s] = s < n ? widen(key0[s * stride + h]) : 0.0f;
    block_logits(tile.q.data(), tile.rows, dim, kt, tile.logits.data());
    for (int64_t r = 0; r < tile.rows; ++r)
      softmax_block(tile, r, at, all_seen ? n : 0);
    block_values(tile.logits.data(), tile.rows, n, value0, stride, tile.correction.data(), dim,
                 tile.acc.data());
  }

  // Query row b, kv head k, queries t0 .. t0 + TQ - 1.
  template <typename T>
  void task(int64_t b, int64_t k, int64_t t0, Tile& tile) const {
    tile.queries = std::min(kQueries, length - t0);
    tile.rows = tile.queries * groups;
    tile.positions = positions + b * length + t0;
    tile.first = *std::min_element(tile.positions, tile.positions + tile.queries);
    tile.last = *std::max_element(tile.positions, tile.positions + tile.queries);
    tile.q.resize(tile.rows * dim), tile.logits.resize(tile.rows * kKeys);
    tile.acc.assign(tile.rows * dim, 0.0f), tile.kt.resize(dim * kKeys);
    tile.top.assign(tile.rows, kUnseen), tile.total.assign(tile.rows, 0.0f);
    tile.correction.resize(tile.rows);
    int64_t gh = groups * dim;
    for (int64_t t = 0; t < tile.queries; ++t)
      std::copy_n(q + ((b * length + t0 + t) * heads + k) * gh, gh, tile.q.data() + t * gh);
    const T* key0 = static_cast<const T*>(keys) + (rows[b] * heads + k) * slots * dim;
    const T* value0 = static_cast<const T*>(values) + (rows[b] * heads + k) * slots * dim;
    for (int64_t s0 = 0; s0 < read; s0 += kKeys)
      block(tile, key0 + s0 * dim, value0 + s0 * dim, dim, held + b * read + s0,
            std::min(kKeys, read - s0));
    const T* new_k = static_cast<const T*>(new_keys) + (b * chunk * heads + k) * dim;
    const T* new_v = static_cast<const T*>(new_values) + (b * chunk * heads + k) * dim;
    for (int64_t s0 = 0; s0 < chunk; s0 += kKeys)
      block(tile, new_k + s0 * heads * dim, new_v + s0 * heads * dim, heads * dim,
            positions + b * length + s0, std::min(kKeys, chunk - s0));
    for (int64_t r = 0; r < tile.rows; ++r) {
      float inverse = tile.total[r] > 0.0f ? 1.0f / tile.total[r] : 0.0f;
      float* out = y + ((b * length + t0 + r / groups) * heads + k) * gh + (r % groups) * dim;
      for (int64_t h = 0; h < dim; ++h) out[h] = tile.acc[r * dim + h] * inverse;
    }
  }
};

ffi::Error prefill_attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer keys,
                             ffi::AnyBuffer values, ffi::Buffer<ffi::S32> held,
                             ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> rows,
                             ffi::AnyBuffer new_keys, ffi::AnyBuffer new_values, float scale,
                             float cap, int64_t window, ffi::ResultBuffer<ffi::F32> y) {
  auto type = keys.element_type();
  auto qd = q.dimensions(), kd = keys.dimensions(), hd = held.dimensions();
  auto nd = new_keys.dimensions(), pd = positions.dimensions();
  bool valid = memory_type_known(type) &&
               values.element_type() == type && new_keys.element_type() == type &&
               new_values.element_type() == type && qd.size() == 5 && kd.size() == 4 &&
               values.dimensions() == kd && hd.size() == 2 && pd.size() == 2 && nd.size() == 4 &&
               new_values.dimensions() == nd && qd[2] == kd[1] && qd[4] == kd[3] &&
               hd[0] == qd[0] && hd[1] <= kd[2] && pd[0] == qd[0] && pd[1] == qd[1] &&
               rows.element_count() == qd[0] && nd[0] == qd[0] &&
               (nd[1] == qd[1] || nd[1] == 0) && nd[2] == kd[1] && nd[3] == kd[3];
  if (!valid)
    return ffi::Error::InvalidArgument(
        "prefill_attention: shapes must be q [B, T, K, G, H] float32, memory keys and values "
        "[B', K, S, H] (float32, bfloat16 or float16), held [B, S' <= S], positions [B, T], "
        "rows [B], the chunk's keys and values [B, T or 0, K, H] in the memory's dtype");
  Prefill a;
  a.q = q.typed_data(), a.keys = keys.untyped_data(), a.values = values.untyped_data();
  a.new_keys = new_keys.untyped_data(), a.new_values = new_values.untyped_data();
  a.held = held.typed_data(), a.rows = rows.typed_data(), a.positions = positions.typed_data();
  a.length = qd[1], a.heads = qd[2], a.groups = qd[3], a.dim = qd[4];
  a.slots = kd[2], a.read = hd[1], a.chunk = nd[1];
  a.scale = scale, a.cap = cap, a.window = window, a.y = y->typed_data();
  for (int64_t b = 0; b < qd[0]; ++b)
    if (a.rows[b] < 0 || a.rows[b] >= kd[0])
      return ffi::Error::InvalidArgument("prefill_attention: a row index is out of range");
  int64_t tiles = (a.length + kQueries - 1) / kQueries;
  auto run = [a, type, tiles](int64_t task) {
    thread_local Tile tile;
    // the last tiles first: under causality they see the most keys, so the threads end together
    int64_t t0 = (tiles - 1 - task % tiles) * kQueries, bk = task / tiles;
    with_memory_type(type, [&](auto element) {
      a.task<decltype(element)>(bk / a.heads, bk % a.heads, t0, tile);
    });
  };
  parallel_chunks(pool, qd[0] * a.heads * tiles, run);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RuntimePrefillAttention, prefill_attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>() RUNTIME_ATTENTION_ATTRS);
