"""Few-row products on XLA:CPU as FFI custom calls (cpu_kernels.cc): a decode product streams its
int8 or float32 weight once, widening in registers, where XLA:CPU's dot needs the int8 weight
widened into a float32 buffer first (int8_widening) and a scanned layer's weight copied out
of its stack (BENCHMARKS.md, "CPU kernels").

The library is compiled on first use with the machine's C++ compiler (-O3 -march=native) into
a cache folder keyed by the source, jaxlib and the CPU (native_build.py), then registered with
XLA. Without a compiler, or with RUNTIME_CPU_KERNELS=0, `available()` is False and the products
keep their XLA forms; a failed build says so on stderr once.

Shape glossary: M rows, I input width, O output width, R scale row blocks.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from runtime import layout, native_build, six_bit
from runtime.quant import PANEL, PANEL_FLOATS
from runtime.super_scales import is_super_scaled

SOURCES = [Path(__file__).with_name(name)
           for name in ("cpu_kernels.h", "cpu_kernels.cc", "cpu_panels.cc", "cpu_panels_int8_x.h",
                        "cpu_panels_int8_x_avx2.h", "cpu_panels_int8_x_many_rows.h",
                        "cpu_panels_x24.h", "cpu_panels_x24_avx2.h",
                        "cpu_panels_many_rows.h", "cpu_panels_amx.h", "cpu_panels_six.h",
                        "cpu_panels_six_float_x.h", "cpu_attention.h",
                        "cpu_attention.cc", "cpu_prefill_attention.cc", "cpu_greedy.cc",
                        "cpu_kv_write.cc")]
TARGETS = {  # FFI target name -> exported handler symbol
    "runtime_int8_rows": "RuntimeInt8Rows",
    "runtime_f32_rows": "RuntimeF32Rows",
    "runtime_panels_of_one_x": "RuntimePanelsOfOneX",
    "runtime_panels_of_one_x_int8_x": "RuntimePanelsOfOneXInt8X",
    "runtime_grouped_panels": "RuntimeGroupedPanels",
    "runtime_grouped_panels_int8_x": "RuntimeGroupedPanelsInt8X",
    "runtime_int8_transposed": "RuntimeInt8Transposed",
    "runtime_int8_transposed_row_scales": "RuntimeInt8TransposedRowScales",
    "runtime_f32_transposed": "RuntimeF32Transposed",
    "runtime_int4_rows": "RuntimeInt4Rows",
    "runtime_decode_attention": "RuntimeDecodeAttention",
    "runtime_prefill_attention": "RuntimePrefillAttention",
    "runtime_greedy_tokens": "RuntimeGreedyTokens",
    "runtime_write_kv": "RuntimeWriteKV",
}

# Scale dtypes the int8 kernels read as stored (the int4 kernel takes float32 tables).
SCALE_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)
# Products of at most this many rows go through the kernels (decode); more rows are
# compute-bound, where XLA's blocked GEMM is the better kernel. Float32 [I, O] weights only for
# one row: at 8 rows XLA's own GEMM was faster; float32 [O, I] up to MAX_ROWS, on par with
# XLA's dot at 16 rows and reading a stacked weight in place; float32 in panels (quant.TiledWeight)
# up to MAX_ROWS, faster than the transposed kernel there (BENCHMARKS.md, "CPU kernels", "Scanned
# layers read in place", "Weights in reading order").
MAX_ROWS = layout.KERNEL_MAX_ROWS
FLOAT_MAX_ROWS = 1


@functools.lru_cache(maxsize=None)
def _library():
    """The built and registered kernel library, or None (see available)."""
    if os.environ.get("RUNTIME_CPU_KERNELS", "1") == "0":
        return None

    def register(library) -> None:
        for name, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform="cpu")

    return native_build.optional_library(
        "cpu_kernels", SOURCES, "the CPU kernels",
        "CPU kernels unavailable, using XLA's products", jaxlib.__version__,
        (f"-I{jax.ffi.include_dir()}",), register)


def amx_tiles() -> bool:
    """Whether panel products of many rows under int8 activations take this CPU's AMX tiles
    (cpu_panels_amx.h: built where the compiler targets AMX, used where Linux grants the tiles'
    state and RUNTIME_KERNEL_AMX is not 0)."""
    library = _library()
    return library is not None and bool(library.RuntimeAmxTiles())


def int4_digits() -> bool:
    """Whether int4 products under float x take x rounded to 24 bits as three int8 digits on the
    integer dots (cpu_panels_x24.h): a build with AVX512-VNNI or AVX2, RUNTIME_KERNEL_INT4_X24
    not 0. False without the kernels."""
    return bool(_library_value("RuntimeInt4Digits"))


def six_bit_panels() -> bool:
    """Whether the panel kernel multiplies six-bit panels (six_bit.py, cpu_panels_six.h): a
    build with AVX512-VBMI, VNNI and BW. False without the kernels."""
    return bool(_library_value("RuntimeSixBitPanels"))


def prefetch_bytes(float_stream: bool = False) -> int:
    """How far ahead (bytes) the kernels ask the cache for their weight streams: 2048, or 0 on
    AMD CPUs for float streams (`float_stream`: float weights and the KV memory) and, on Zen 4
    (family 19h, AVX-512 builds), for quantized ones too, where the hardware prefetcher did
    better alone. RUNTIME_KERNEL_PREFETCH overrides. 0 without the kernels."""
    return _library_value("RuntimeKernelFloatPrefetchBytes" if float_stream
                          else "RuntimeKernelPrefetchBytes")


def table_blocks_ahead() -> int:
    """How many scale blocks ahead the kernels ask for a scale table's rows: 6;
    RUNTIME_KERNEL_TABLE_AHEAD overrides, RUNTIME_KERNEL_PREFETCH_TABLES=0 turns it off (0). 0
    without the kernels."""
    return _library_value("RuntimeKernelTableAhead")


def _library_value(symbol: str) -> int:
    """What the library's int64 query `symbol` answers in this process; 0 without the kernels."""
    library = _library()
    if library is None:
        return 0
    query = getattr(library, symbol)
    query.restype = ctypes.c_int64
    return int(query())


def available() -> bool:
    """Whether the kernels are built and registered with XLA (CPU backend only)."""
    return _library() is not None


def _call(target: str, x: jax.Array, weight: jax.Array, *tables: jax.Array, out: int,
          layer=None) -> jax.Array:
    """One custom call: x [..., I], the weight and its tables -> float32 [..., O]. The int8 and
    float32 kernels also take the layer to read of a stacked weight and tables ([L, ...]; a
    traced int32 scalar) or 0 for unstacked ones."""
    if not available():
        raise RuntimeError("the CPU kernels are not available (see the message above)")
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)  # [M, I]
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((flat.shape[0], out), jnp.float32))
    # scale tables go as stored where the kernels read that dtype (no float32 copy per call)
    tables = [table if table.dtype in SCALE_DTYPES else table.astype(jnp.float32)
              for table in tables]
    if target != "runtime_int4_rows":
        tables.append(jnp.asarray(0 if layer is None else layer, jnp.int32))
    return call(flat, weight, *tables).reshape(*lead, out)


def rows_linear(x: jax.Array, weight: jax.Array, scales=None, layer=None) -> jax.Array:
    """x [..., I] @ weight [I, O] (int8 with scales [R, O], or float32 without) -> float32
    [..., O]; with `layer`, weight [L, I, O] and scales [L, R, O] are stacks, read at it."""
    out = weight.shape[-1]
    if scales is None:
        scales = jnp.ones((*weight.shape[:-2], 1, out), jnp.float32)
    target = "runtime_int8_rows" if weight.dtype == jnp.int8 else "runtime_f32_rows"
    return _call(target, x, weight, scales, out=out, layer=layer)


def tiled_linear(x: jax.Array, tiles: jax.Array, scales=None, layer=None) -> jax.Array:
    """x [..., I] @ a weight [I, O] stored in column panels (quant.TiledWeight: tiles
    [O/64, 64 I], int8 with scales [R, O], or float32 without) -> float32 [..., O]; with
    `layer`, stacks [L, O/64, 64 I] and [L, R, O] read at it."""
    return tiled_linears(x, [(tiles, scales)], layer)[0]


def tiled_linears(x: jax.Array, weights, layer=None, int8_x: bool = False) -> list:
    """[x @ w for w in weights] in one call, each weight in column panels given as (tiles,
    scales[, mins]) (quant.TiledWeight: int8 with scales [R, O] and mins [R, O] or None, or
    float32 with None; quant4.TiledWeight4: uint8 [O/64, 32 I], scales [G, O], mins or None);
    tables of either kind may be super-scaled (super_scales.py);
    with `layer`, stacks [L, ...] read at it -> float32 [..., O] each. The products of one x (a
    layer's query, key and value) stream their panels in turn and share one handoff to the
    threads (BENCHMARKS.md, "Products of one x in one call"). With int8_x, the int4 weights
    multiply x rounded to int8 per group (their groups a multiple of 8 rows; cpu_panels.cc,
    int4_panel_rows_int8_x)."""
    if not available():
        raise RuntimeError("the CPU kernels are not available (see the message above)")
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)  # [M, I]
    target = "runtime_panels_of_one_x_int8_x" if int8_x else "runtime_panels_of_one_x"
    call = jax.ffi.ffi_call(target, _panel_results(flat.shape[0], weights))
    outs = call(flat, jnp.asarray(0 if layer is None else layer, jnp.int32),
                *_panel_arguments(weights))
    return [y.reshape(*lead, y.shape[-1]) for y in outs]


def grouped_panel_linears(x: jax.Array, sizes: jax.Array, experts, int8_x: bool = False) -> list:
    """Rows grouped by expert through their own experts' weights in one call: x [M, I] sorted
    so that expert e owns the next sizes[e] rows (int32 [E]), experts[e] the K weights of
    expert e in panels as tiled_linears takes them -> K float32 [M, O_k] (rows past the groups
    zero). Each expert multiplies exactly its rows, no padded tiles (cpu_panels.cc,
    grouped_panels)."""
    if not available():
        raise RuntimeError("the CPU kernels are not available (see the message above)")
    flat = x.astype(jnp.float32)
    target = "runtime_grouped_panels_int8_x" if int8_x else "runtime_grouped_panels"
    call = jax.ffi.ffi_call(target, _panel_results(flat.shape[0], experts[0]))
    return call(flat, sizes.astype(jnp.int32), jnp.asarray(0, jnp.int32),  # layer: 2-D weights
                *[a for weights in experts for a in _panel_arguments(weights)])


def _panel_results(rows: int, weights) -> list:
    """The float32 [M, O] result of each panel weight (tiles, scales[, mins])."""
    return [jax.ShapeDtypeStruct((rows, tiles.shape[-2] * PANEL), jnp.float32)
            for tiles, *_ in weights]


def _panel_arguments(weights) -> list:
    """A panel call's (tiles, scales, mins) triple per weight: float32 weights' scales ones,
    tables in a dtype the kernel reads, mins empty where a weight has none."""
    operands = []
    for tiles, scales, *mins in weights:
        if scales is None:
            scales = jnp.ones((*tiles.shape[:-2], 1, tiles.shape[-2] * PANEL), jnp.float32)
        tables = [scales, *(m for m in mins if m is not None)]
        tables = [t if t.dtype in SCALE_DTYPES or is_super_scaled(t)
                  else t.astype(jnp.float32) for t in tables]
        operands += [tiles, *tables] + ([] if len(tables) == 2 else [jnp.zeros((0,), jnp.float32)])
    return operands


def transposed_linear(x: jax.Array, weight_t: jax.Array, scales=None, layer=None,
                      row_scales=None) -> jax.Array:
    """x [..., I] @ (weight_t [O, I])^T (int8 with scales [R, O], or float32 without) ->
    float32 [..., O]; with `layer`, stacks [L, O, I] and [L, R, O] read at it. An int8 weight's
    scales may come as row_scales [O, R] instead (the same table, one row per output row),
    which the kernel reads in one stream with the weight."""
    if row_scales is not None:
        return _call("runtime_int8_transposed_row_scales", x, weight_t, row_scales,
                     out=weight_t.shape[-2], layer=layer)
    out = weight_t.shape[-2]
    if scales is None:
        scales = jnp.ones((*weight_t.shape[:-2], 1, out), jnp.float32)
    target = "runtime_int8_transposed" if weight_t.dtype == jnp.int8 else "runtime_f32_transposed"
    return _call(target, x, weight_t, scales, out=out, layer=layer)


def int4_rows_linear(x: jax.Array, packed: jax.Array, scales: jax.Array, mins=None) -> jax.Array:
    """x [..., I] @ the int4 weight (packed uint8 [I/2, O] in quant4's layout, scales [G, O],
    mins [G, O] or None: symmetric codes 0..15 around 8) -> float32 [..., O]."""
    scales = scales.astype(jnp.float32)
    offsets = -8 * scales if mins is None else mins.astype(jnp.float32)  # code * scale + offset
    return _call("runtime_int4_rows", x, packed, scales, offsets, out=packed.shape[-1])


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """numpy's argmax of each row of logits [B, V] (the first maximum, or the row's first NaN)
    in the kernel (cpu_greedy.cc) -> [B] int32."""
    if not available():
        raise RuntimeError("the CPU kernels are not available (see the message above)")
    call = jax.ffi.ffi_call("runtime_greedy_tokens",
                            jax.ShapeDtypeStruct(logits.shape[:1], jnp.int32))
    return call(logits.astype(jnp.float32))


def greedy_usable() -> bool:
    """Whether greedy sampling's argmax goes through the kernel: the CPU with one device (the
    logits whole on it), the kernels built."""
    return layout.decode_products_in_ffi_kernels() and available()


def decode_attention(q: jax.Array, keys: jax.Array, values: jax.Array, held: jax.Array,
                     positions: jax.Array, new_keys: jax.Array, new_values: jax.Array, *,
                     scale: float, cap=None, window=None, layer=None, rows=None) -> jax.Array:
    """One query token per row over a KV memory read in place (cpu_attention.cc): q [B, K, G,
    H] against the memory keys/values [B', K, S, H] (stacks [L, ...] read at `layer`; float32
    or bfloat16), of which the first S' slots hold positions held [B, S'] (negative: empty),
    then the chunk's own new_keys/new_values [B, T, K, H] (T 0 or 1, the memory's dtype) at
    positions [B]. Logits scale * q.k, capped at `cap` (cap tanh(l / cap)), keys `window` or
    more positions back unseen; rows [B]: each query row's memory row (default b) -> float32
    [B, K, G, H]."""
    return _attention_call("runtime_decode_attention", q, keys, values,
                           jnp.asarray(0 if layer is None else layer, jnp.int32),
                           held.astype(jnp.int32), positions.astype(jnp.int32), rows=rows,
                           chunk=(new_keys, new_values), scale=scale, cap=cap, window=window)


# the KV memory dtypes the attention kernels read (cpu_attention.h's with_memory_type)
MEMORY_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def decode_attention_usable(queries: int, memory_dtype, activation_dtype) -> bool:
    """Whether decode attention goes through the kernel (layout.DECODE_ATTENTION_IN_KERNEL):
    one query per row, float32 activations, a float32, bfloat16 or float16 memory, one CPU
    device, the kernels built."""
    return layout.DECODE_ATTENTION_IN_KERNEL and queries == 1 \
        and activation_dtype == jnp.float32 \
        and memory_dtype in MEMORY_DTYPES \
        and layout.decode_products_in_ffi_kernels() and available()


def prefill_attention(q: jax.Array, positions: jax.Array, keys: jax.Array, values: jax.Array,
                      held: jax.Array, new_keys: jax.Array, new_values: jax.Array, *,
                      scale: float, cap=None, window=None, rows=None) -> jax.Array:
    """The queries of a prompt or chunk over a KV memory and their own keys
    (cpu_prefill_attention.cc): q [B, T, K, G, H] at positions [B, T], the memory keys/values
    [B', K, S, H] (float32, bfloat16 or float16) whose first S' slots of row rows[b] (default
    b) hold positions held [B, S'] (negative: empty), then the chunk's own new_keys/new_values
    [B, T or 0, K, H] (the memory's dtype) at the queries' positions. Causal by position,
    logits scale * q.k capped at `cap`, keys `window` or more positions back unseen ->
    float32 [B, T, K, G, H] (0 for a query that sees no key), as models/blockwise.py."""
    return _attention_call("runtime_prefill_attention", q, keys, values,
                           held.astype(jnp.int32), positions.astype(jnp.int32), rows=rows,
                           chunk=(new_keys, new_values), scale=scale, cap=cap, window=window)


def _attention_call(target: str, q, *operands, rows, chunk, scale, cap, window) -> jax.Array:
    """An attention kernel's call: (q as float32, operands..., rows [B] (default b), the chunk's
    keys and values) with the scale, cap and window attributes -> float32 in q's shape."""
    if not available():
        raise RuntimeError("the CPU kernels are not available (see the message above)")
    rows = jnp.arange(q.shape[0], dtype=jnp.int32) if rows is None else rows
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q.astype(jnp.float32), *operands, rows.astype(jnp.int32), *chunk,
                scale=np.float32(scale), cap=np.float32(0.0 if cap is None else cap),
                window=np.int64(0 if window is None else window))


def write_kv(memory: jax.Array, chunk: jax.Array, rows: jax.Array,
             slots: jax.Array) -> jax.Array:
    """memory [L, B, K, S, H] (or [B, K, S, H]) with chunk [L, n, T, K, H] (or [n, T, K, H])
    written in place (cpu_kv_write.cc): row i into memory row rows[i] [n], token t into slot
    slots[i, t] [n, T]; out-of-range rows and slots dropped."""
    call = jax.ffi.ffi_call("runtime_write_kv", jax.ShapeDtypeStruct(memory.shape, memory.dtype),
                            input_output_aliases={0: 0})
    return call(memory, chunk.astype(memory.dtype), rows.astype(jnp.int32),
                slots.astype(jnp.int32))


def write_kv_usable(memory_dtype) -> bool:
    """Whether the KV memory's writes (a decode step's token, a prompt's rows) go through
    write_kv: a bfloat16 memory (XLA:CPU widens its scatter to float32, copying the whole
    memory), one CPU device, the kernels built."""
    return memory_dtype == jnp.bfloat16 and layout.decode_products_in_ffi_kernels() \
        and available()


def prefill_attention_usable(queries: int, keys: int, memory_dtype, activation_dtype) -> bool:
    """Whether the attention of `queries` queries per row over at most `keys` keys goes
    through the kernel instead of XLA (models/blockwise.py or the dense path): where
    layout.prefill_attention_in_kernel says, under float32 activations, over a float32,
    bfloat16 or float16 memory, the kernels built."""
    return layout.prefill_attention_in_kernel(queries, keys) \
        and activation_dtype == jnp.float32 \
        and memory_dtype in MEMORY_DTYPES and available()


def _applies(rows: int, weight: jax.Array, stacked: bool = False) -> bool:
    """What every kernel needs: a 2-D weight (a stack of them where `stacked`), at most
    MAX_ROWS rows, one CPU device (layout.decode_products_in_ffi_kernels), the kernels built."""
    return weight.ndim == 2 + stacked and rows <= MAX_ROWS \
        and layout.decode_products_in_ffi_kernels() and available()


def int4_usable(rows: int, packed: jax.Array, groups: int) -> bool:
    """Whether an int4 product of `rows` rows goes through the kernel: groups of a multiple of
    4 rows, and _applies."""
    return packed.ndim == 2 and (2 * packed.shape[0] // groups) % 4 == 0 and _applies(rows, packed)


def int4_panels_usable(rows: int, tiles: jax.Array, stacked: bool = False, groups: int = 1,
                       int8_x: bool = False) -> bool:
    """Whether a product of `rows` rows with int4 panels (a stack of them where `stacked`) goes
    through the panel kernel: at most layout.INT4_PANEL_MAX_ROWS rows, and _applies; with
    int8_x, groups of a multiple of 8 input rows and any number of rows (prefill too: integer
    dots outrun XLA's float32 GEMM, BENCHMARKS.md, "int8 activations")."""
    rows_per_group = 2 * (tiles.shape[-1] // PANEL) // groups
    if int8_x:
        return tiles.dtype == jnp.uint8 and rows_per_group % 8 == 0 and _applies(1, tiles, stacked)
    return tiles.dtype == jnp.uint8 and rows <= layout.INT4_PANEL_MAX_ROWS \
        and _applies(1, tiles, stacked)


def panels_read_2_byte_floats(config) -> bool:
    """Whether a checkpoint's 2-byte float matmul weights may stay 2-byte at load: where an
    engine of `config` stores float weights in panels (float32 activations, a transformer, one
    CPU device, the kernels built), whose kernel widens them as it reads them."""
    return layout.TILED_WEIGHTS and config.dtype == "float32" \
        and config.architecture == "transformer" and layout.decode_products_in_ffi_kernels() \
        and available()


def usable(rows: int, weight: jax.Array, transposed: bool, row_blocks: int = 1,
           stacked: bool = False, tiled: bool = False, int8_x: bool = False) -> bool:
    """Whether a product of `rows` rows with this int8 or float32 weight (a stack [L, ...] of
    them where `stacked`) goes through a kernel: float32 [I, O] for at most FLOAT_MAX_ROWS rows
    (transposed: MAX_ROWS; in panels: layout.PANEL_MAX_ROWS), (transposed) I/R a multiple of 8,
    and _applies. int8 panels under int8_x: any number of rows (prompts too), x blocks
    (layout.int8_x_block) of a multiple of 4 rows."""
    six = tiled and weight.dtype == jnp.uint8  # six-bit int8 codes (six_bit.py)
    if weight.dtype not in (jnp.int8, jnp.float32) and not six \
            and not (tiled and weight.dtype in PANEL_FLOATS):
        return False  # 2-byte floats: in panels only
    if int8_x and tiled and weight.dtype in (jnp.int8, jnp.uint8):
        inputs = weight.shape[-1] // (six_bit.ROW_BYTES if six else PANEL)
        return layout.int8_x_block(inputs, row_blocks) % 4 == 0 \
            and _applies(1, weight, stacked)
    if tiled:
        return rows <= layout.PANEL_MAX_ROWS and _applies(1, weight, stacked)
    if weight.dtype == jnp.float32 and rows > FLOAT_MAX_ROWS and not transposed:
        return False
    if transposed and (weight.shape[-1] // row_blocks) % 8:
        return False
    return _applies(rows, weight, stacked)
