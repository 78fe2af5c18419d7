// A chunk's keys (or values) written into a KV memory in place: memory [L, B, K, S, H] (or one
// layer's [B, K, S, H]) aliased to the result, chunk [L, n, T, K, H] (or [n, T, K, H]) in its
// dtype, chunk row i into memory row rows[i], its token t into slot slots[i, t] (out of range:
// dropped). XLA:CPU widens a bfloat16 update to float32, so the scatter converted and copied the
// whole memory each decode step (a 2,048-token SmolLM step took twice as long,
// BENCHMARKS.md, "KV memory dtypes"); this copies only the chunk's rows.
#include <cstring>

#include "cpu_kernels.h"

namespace {

ffi::Error write_kv(ffi::AnyBuffer memory, ffi::AnyBuffer chunk, ffi::Buffer<ffi::S32> rows,
                    ffi::Buffer<ffi::S32> slots, ffi::Result<ffi::AnyBuffer> out) {
  auto md = memory.dimensions(), cd = chunk.dimensions(), sd = slots.dimensions();
  bool stacked = md.size() == 5;
  int64_t layers = stacked ? md[0] : 1, lead = stacked ? 1 : 0;
  bool valid = memory.element_type() == chunk.element_type() &&
               out->element_type() == memory.element_type() &&
               (md.size() == 4 || md.size() == 5) && cd.size() == md.size() &&
               (!stacked || cd[0] == md[0]) && sd.size() == 2 &&
               rows.element_count() == cd[lead] && sd[0] == cd[lead] && sd[1] == cd[lead + 1] &&
               cd[lead + 2] == md[lead + 1] && cd[lead + 3] == md[lead + 3];
  if (!valid)
    return ffi::Error::InvalidArgument(
        "write_kv: shapes must be memory [L, B, K, S, H] (or [B, K, S, H]), the chunk [L, n, T, "
        "K, H] (or [n, T, K, H]) in its dtype, rows [n], slots [n, T]");
  int64_t memory_rows = md[lead], heads = md[lead + 1], size = md[lead + 2];
  int64_t dim = md[lead + 3], n = cd[lead], length = cd[lead + 1];
  int64_t bytes = ffi::ByteWidth(memory.element_type()) * dim;  // one head's key
  char* to = static_cast<char*>(out->untyped_data());
  if (to != memory.untyped_data())  // not aliased after all: the result starts as the memory
    std::memcpy(to, memory.untyped_data(), memory.size_bytes());
  const char* from = static_cast<const char*>(chunk.untyped_data());
  for (int64_t l = 0; l < layers; ++l)
    for (int64_t i = 0; i < n; ++i) {
      int64_t row = rows.typed_data()[i];
      for (int64_t t = 0; t < length; ++t) {
        int64_t slot = slots.typed_data()[i * length + t];
        if (row < 0 || row >= memory_rows || slot < 0 || slot >= size) continue;
        for (int64_t k = 0; k < heads; ++k)
          std::memcpy(to + (((l * memory_rows + row) * heads + k) * size + slot) * bytes,
                      from + (((l * n + i) * length + t) * heads + k) * bytes, bytes);
      }
    }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RuntimeWriteKV, write_kv,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());
