"""The matmul helpers every model calls: float, int8 (QuantizedWeight8bit, or TiledWeight for
the CPU kernel), int4 (QuantizedWeight4bit), transposed (TransposedWeight) and per-expert-tile
products (the embedding tables': tables.py).

Shape glossary: M rows (tokens or token-expert pairs), I input width, O output width,
R scale row blocks, N tiles, T rows per tile, E experts, V vocab, D model width.

The int8 helpers never build a dequantised copy of a whole weight: they multiply the
activations by the int8 values (upcast inside the matmul, which is exact: |q| <= 127 fits bf16
and float32) with float32 accumulation, then apply the scale of each row block to the float32
partial sums. This equals the reference's float32 product `(q * s) @ x` up to float32 rounding
order, and never rounds a dequantised weight to bf16. Which kernel a product takes on which
platform is decided by layout.py's kernel rules.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from runtime import cpu_kernels, int4_widening, int8_widening, layout, pallas_gemv, pallas_sharded
from runtime.int8_mins import min_term, mins_of, without_mins
from runtime.layer_types import LayersByType, switched_product
from runtime.quant import (LayerOfStack, QuantizedWeight8bit, TiledWeight, TransposedWeight,
                           Weight, untiled)
from runtime.quant4 import QuantizedWeight4bit, TiledWeight4, as_int8, untiled4
from runtime.super_scales import table_groups

def _blocked(x: jax.Array, rows: int) -> jax.Array:
    """[..., I] -> [..., R, I/R]."""
    return x.reshape(*x.shape[:-1], rows, x.shape[-1] // rows)


# A row-blocked product's float32 partial sums [..., R, O] are materialised; once they outgrow
# the dequantised weight (more rows than a scale block has input rows) and this many bytes,
# the weight is dequantised instead (a 2048-token prefill through Llama-8B's down projection
# in groups of 64: 7.5 GB of partials against a 235 MB float32 weight).
PARTIALS_MAX_BYTES = 4 << 20


def _row_blocked_product(spec: str, x: jax.Array, weight: jax.Array, scales: jax.Array,
                         rows: int, weight_scales: jax.Array) -> jax.Array:
    """The int8 product with R = `rows` scale row blocks: float32 [..., O].

    Few rows (decode): one batched matmul over the blocks (einsum `spec` of x [..., R, I/R] and
    the blocked weight, whose axes r, i are adjacent -> [..., R, O]), each block's float32
    partial sums scaled by its scale row (`scales`, broadcast to the partials) and summed.
    Many rows, and small weights on the CPU (layout.row_blocks_dequantised):
    _dequantised_product, with `weight_scales` broadcast to the blocked weight."""
    dtype = layout.row_block_dtype(x.dtype)
    partial_bytes = 4 * math.prod(x.shape[:-1]) * rows * scales.shape[-1]
    per_weight = x.shape[-2] if spec.startswith("nt") else math.prod(x.shape[:-1])
    if partial_bytes > max(PARTIALS_MAX_BYTES, 4 * weight.size) \
            or layout.row_blocks_dequantised(weight.size, per_weight):
        return _dequantised_product(spec, x.astype(dtype), weight, weight_scales)
    partial = jnp.einsum(spec, _blocked(x.astype(dtype), rows), weight.astype(dtype),
                         preferred_element_type=jnp.float32)  # [..., R, O]
    return jnp.sum(partial * scales.astype(jnp.float32), axis=-2)


def _dequantised_product(spec: str, x: jax.Array, weight: jax.Array,
                         weight_scales: jax.Array) -> jax.Array:
    """The product of `spec` (see _row_blocked_product) with the weight dequantised, as one
    plain matmul of x [..., I] (the r and i axes merged). Exact: q * s has at most 15
    significant bits (7 of q, 8 of a bf16 scale), so it is exact in float32, and for bf16
    activations it is the sum of two bf16 weights (its rounding to bf16 and the exact
    remainder), multiplied in bf16 with float32 accumulation rather than at float32 speed."""
    inputs, output = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    merged = w_axes.index("r")  # r and i are adjacent in the blocked weight
    plain = f"{x_axes.replace('r', '')},{w_axes.replace('r', '')}->{output.replace('r', '')}"
    dequantised = (weight.astype(jnp.float32) * weight_scales.astype(jnp.float32)).reshape(
        *weight.shape[:merged], -1, *weight.shape[merged + 2:])  # [..., I, ...]
    if x.dtype == jnp.float32:
        return jnp.einsum(plain, x, dequantised, preferred_element_type=jnp.float32,
                          precision=jax.lax.Precision.HIGHEST)
    high = dequantised.astype(x.dtype)
    low = (dequantised - high.astype(jnp.float32)).astype(x.dtype)
    return sum(jnp.einsum(plain, x, part, preferred_element_type=jnp.float32)
               for part in (high, low))


def kernel_product(x: jax.Array, w, transposed: bool, layer=None):
    """x [..., I] times w through cpu_kernels: a 2-D int8 weight with scales [R, O]
    (QuantizedWeight8bit or the QuantizedEmbedding table, TransposedWeight; TiledWeight and
    TiledWeight4 through the panel kernel) or a float32 one, [I, O] or (transposed) [O, I] -> float32 [..., O]; with `layer`, w is a
    stack of them [L, ...] read at that layer. None where the kernels do not apply (more rows,
    other devices, float weights under other activations)."""
    if isinstance(w, (TiledWeight, TiledWeight4)):
        panels = _panel_operands(x, w, layer)
        return None if panels is None else cpu_kernels.tiled_linears(
            x, [panels], layer, int8_x=layout.INT8_ACTIVATIONS)[0]
    if isinstance(w, QuantizedWeight8bit):
        weight, scales = w.weight, w.scales
    elif isinstance(w, TransposedWeight):
        weight, scales = w.weight_t, w.scales
    else:
        weight, scales = w, None
    if weight.dtype == jnp.float32 and x.dtype != jnp.float32:
        return None
    blocks = 1 if scales is None else scales.shape[-2]
    if not cpu_kernels.usable(math.prod(x.shape[:-1]), weight, transposed, blocks,
                              stacked=layer is not None):
        return None
    if transposed:  # an int8 table's row_scales, where the engine added them
        return cpu_kernels.transposed_linear(x, weight, scales, layer,
                                             getattr(w, "row_scales", None))
    return cpu_kernels.rows_linear(x, weight, scales, layer)


def _stack_kernel_product(x: jax.Array, w: LayerOfStack):
    """x [..., I] times layer w.index of w.stack, read in place by a CPU kernel: float32 [..., O],
    or None (the layer is then sliced out)."""
    return kernel_product(x, w.stack, isinstance(w.stack, TransposedWeight), w.index)


def transposed_linear(x: jax.Array, w: TransposedWeight) -> jax.Array:
    """x [..., I] @ (w.weight_t [O, I])^T -> float32 [..., O], int8 scaled as in linear()."""
    kernel = kernel_product(x, w, transposed=True)
    if kernel is not None:
        return kernel
    rows = math.prod(x.shape[:-1])
    if layout.int8_gemv_in_pallas() and pallas_gemv.supported(rows, w.weight_t, w.scales,
                                                                x.dtype):
        y = pallas_sharded.int8_gemv(x.reshape(rows, x.shape[-1]), w.weight_t, w.scales,
                                     layout.pallas_products_partitioned())
        return y.reshape(*x.shape[:-1], y.shape[-1])  # [..., O] float32
    if w.scales is None or w.scales.shape[-2] == 1:
        product = jnp.einsum("...i,oi->...o", x, w.weight_t.astype(x.dtype),
                             preferred_element_type=jnp.float32)  # [..., O]
        return product if w.scales is None else product * w.scales[0].astype(jnp.float32)
    rows = w.scales.shape[-2]
    out, rows_in = w.weight_t.shape
    weight = w.weight_t.reshape(out, rows, rows_in // rows)  # [O, R, I/R]
    return _row_blocked_product("...ri,ori->...ro", x, weight, w.scales, rows,
                                w.scales.T[:, :, None])  # scales as [O, R, 1]


def _int8_decode_product_on_cpu(x: jax.Array, w: QuantizedWeight8bit) -> bool:
    """A product int8_widening.blocked_int8_linear takes: few rows (decode), a weight larger
    than one block, layout.widening_in_blocks() (CPU, one device)."""
    return (w.weight.ndim == 2 and math.prod(x.shape[:-1]) <= int8_widening.WIDEN_BLOCKS_MAX_ROWS
            and w.weight.size * 4 > int8_widening.WIDEN_BLOCK_BYTES and layout.widening_in_blocks())


def _int4_as_int8(w: QuantizedWeight4bit) -> QuantizedWeight8bit:
    """The int8 weight (R = G row blocks) the int4 products multiply: quant4.as_int8 without
    its mins (the products add them by min_term)."""
    return without_mins(as_int8(w))


# A many-row int4 product (row-blocked partials past PARTIALS_MAX_BYTES) is dequantised in
# blocks of whole groups inside a loop, each at most an eighth of the float32 weight (the packed
# weight's own bytes) or WIDEN_BLOCK_BYTES: never a float copy of a large whole weight.
INT4_DEQUANTISED_BLOCKS = 8


def _int4_partials_too_large(rows: int, w: QuantizedWeight4bit) -> bool:
    """Whether the row-blocked product's float32 partials [rows, G, O] (all tiles) would
    outgrow PARTIALS_MAX_BYTES and the float32 weight, as in _row_blocked_product."""
    partial_bytes = 4 * rows * w.groups * w.packed.shape[-1]
    return partial_bytes > max(PARTIALS_MAX_BYTES, 8 * w.packed.size)


def _int4_dequantised_in_blocks(x: jax.Array, w: QuantizedWeight4bit) -> jax.Array:
    """x [..., I] @ the 2-D int4 weight (mins left out) -> float32 [..., O], for many rows:
    each block of groups dequantised exactly and multiplied as _dequantised_product does."""
    packed_rows, out = w.packed.shape
    groups = w.groups
    block_bytes = max(int8_widening.WIDEN_BLOCK_BYTES,
                      8 * w.packed.size // INT4_DEQUANTISED_BLOCKS)
    block_groups = int4_widening.cache_block_groups(groups, 2 * packed_rows // groups, out,
                                                    block_bytes)
    flat = x.reshape(-1, 2 * packed_rows).astype(layout.row_block_dtype(x.dtype))  # [M, I]
    shift = jnp.int8(8 if w.mins is None else 0)

    def product(inputs, packed, scales):  # [M, gb * n], [gb * n/2, O], [gb, O] -> [M, O]
        halves = zip(int4_widening.input_halves(inputs, block_groups),
                     int4_widening.nibble_halves(packed, block_groups))
        return sum(_dequantised_product("mri,rio->mro", half, codes.astype(jnp.int8) - shift,
                                        scales[:, None, :]) for half, codes in halves)

    product = int4_widening.loop_over_groups(flat, w, block_groups, product)
    return product.reshape(*x.shape[:-1], out)


def _int4_linear(x: jax.Array, w: QuantizedWeight4bit) -> jax.Array:
    """x [..., I] @ the 2-D int4 weight -> float32 [..., O]; never a float copy of the weight.
    Few rows on the CPU: the FFI kernel (cpu_kernels), or unpacked a block of groups at a time
    (int4_widening); else the int8 product of its codes (R = G row blocks, unpacked inside the program, where XLA:GPU fuses
    the unpacking into the dot), or for many rows dequantised a block at a time."""
    rows = math.prod(x.shape[:-1])
    if layout.INT8_ACTIVATIONS:  # the panel kernel's rounding (layout says why)
        x = int4_widening.int8_rounded(x, w.groups)
    if cpu_kernels.int4_usable(rows, w.packed, w.groups):
        return cpu_kernels.int4_rows_linear(x, w.packed, w.scales, w.mins)
    if rows <= int8_widening.WIDEN_BLOCKS_MAX_ROWS and layout.widening_in_blocks():
        return int4_widening.blocked_int4_linear(x, w)
    if _int4_partials_too_large(rows, w):
        product = _int4_dequantised_in_blocks(x, w)
    else:
        product = _int8_linear(x, _int4_as_int8(w))
    return product if w.mins is None else product + min_term(x, w.mins)


def _int8_scale_blocks(w):
    """R of an int8 matmul weight in any stored form (a layer of a stack too), else None."""
    w = w.stack if isinstance(w, LayerOfStack) else w
    if isinstance(w, QuantizedWeight8bit) or (isinstance(w, (TiledWeight, TransposedWeight))
                                              and w.scales is not None):
        return table_groups(w.scales)
    return None


def x_for_int8(x: jax.Array, w) -> jax.Array:
    """x as an int8 weight's product takes it under layout.INT8_ACTIVATIONS: rounded per
    layout.int8_x_block, here in XLA unless the panel kernel takes the product (it rounds x
    itself); unchanged otherwise."""
    blocks = _int8_scale_blocks(w)
    if not layout.INT8_ACTIVATIONS or blocks is None:
        return x
    stack, layer = (w.stack, w.index) if isinstance(w, LayerOfStack) else (w, None)
    if isinstance(stack, TiledWeight) and _panel_operands(x, stack, layer) is not None:
        return x
    return int4_widening.int8_rounded(x, x.shape[-1] // layout.int8_x_block(x.shape[-1], blocks))


def linear(x: jax.Array, w: Weight, out_dtype=None) -> jax.Array:
    """x [..., I] @ w [I, O] -> [..., O] in out_dtype (default x.dtype), float32 accumulation."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if isinstance(w, LayerOfStack) and isinstance(w.stack, LayersByType):  # per-layer types
        return switched_product(x, w, lambda x, layer: linear(x, layer, out_dtype))
    if (mins := mins_of(w)) is not None and not _in_panels(x, w):  # asymmetric int8 (panels:
        # the kernel adds the mins' term): the codes' product plus the mins'
        return (linear(x, without_mins(w), jnp.float32) + min_term(x, mins)).astype(out_dtype)
    x = x_for_int8(x, w)
    if isinstance(w, LayerOfStack):  # a scanned layer's weight: the kernel reads the stack
        kernel = _stack_kernel_product(x, w)
        if kernel is not None:
            return kernel.astype(out_dtype)
        w = w.layer()
    if isinstance(w, (TiledWeight, TiledWeight4)):  # the kernel's, or (prefill) row-major
        kernel = kernel_product(x, w, transposed=False)
        if kernel is not None:
            return kernel.astype(out_dtype)
        w = untiled4(w) if isinstance(w, TiledWeight4) else untiled(w)
    if isinstance(w, QuantizedWeight4bit):
        return _int4_linear(x, w).astype(out_dtype)
    if isinstance(w, TransposedWeight):
        return transposed_linear(x, w).astype(out_dtype)
    kernel = kernel_product(x, w, transposed=False)
    if kernel is not None:
        return kernel.astype(out_dtype)
    if not isinstance(w, QuantizedWeight8bit):
        if layout.single_bf16_row_doubled(x.shape, x.dtype, w.dtype):  # [1, I] twice -> [2, O] -> the first row
            pair = jnp.concatenate([x.reshape(1, -1)] * 2)
            return linear(pair, w, out_dtype)[:1].reshape(*x.shape[:-1], -1)
        return jnp.einsum("...i,io->...o", x, w.astype(x.dtype),
                          preferred_element_type=jnp.float32).astype(out_dtype)
    if _int8_decode_product_on_cpu(x, w):
        return int8_widening.blocked_int8_linear(x, w).astype(out_dtype)
    return _int8_linear(x, w).astype(out_dtype)


def linears(x: jax.Array, weights, out_dtype=None) -> list:
    """[linear(x, w, out_dtype) for w in weights], in one CPU kernel call where every weight is
    in panels (a layer's view of a stack of them, all at one layer) and the kernel takes it:
    the products of one x (query, key and value; an FFN's gate and up) then share one handoff
    to the threads and stream their panels in turn (layout.PANEL_PRODUCTS_SHARE_A_CALL)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    views = [(w.stack, w.index) if isinstance(w, LayerOfStack) else (w, None) for w in weights]
    operands = [_panel_operands(x, w, layer) for w, layer in views]
    if not layout.PANEL_PRODUCTS_SHARE_A_CALL or len(weights) < 2 or None in operands \
            or len({id(layer) for _, layer in views}) != 1:
        return [linear(x, w, out_dtype) for w in weights]
    products = cpu_kernels.tiled_linears(x, operands, views[0][1],
                                         int8_x=layout.INT8_ACTIVATIONS)
    return [product.astype(out_dtype) for product in products]


def grouped_linears(x: jax.Array, sizes: jax.Array, experts, out_dtype=None):
    """Rows grouped by expert, x [M, I] sorted so that expert e owns the next sizes[e] rows,
    times that expert's K weights experts[e] in one CPU kernel call -> K [M, O_k] in out_dtype
    (default x.dtype); None where a weight is not in panels the kernel takes."""
    one_row = jax.ShapeDtypeStruct((1, x.shape[-1]), x.dtype)  # the kernel takes any rows
    operands = [[_panel_operands(one_row, w) for w in weights] for weights in experts]
    if any(panels is None for weights in operands for panels in weights):
        return None
    products = cpu_kernels.grouped_panel_linears(x, sizes, operands,
                                                 int8_x=layout.INT8_ACTIVATIONS)
    return [product.astype(x.dtype if out_dtype is None else out_dtype) for product in products]


def _in_panels(x: jax.Array, w) -> bool:
    """Whether the panel kernel takes x times w (in panels, or a layer's view of a stack of
    them)."""
    w, layer = (w.stack, w.index) if isinstance(w, LayerOfStack) else (w, None)
    return _panel_operands(x, w, layer) is not None


def _panel_operands(x: jax.Array, w, layer=None):
    """(tiles, scales, mins) of a weight in panels (TiledWeight or TiledWeight4; with `layer`,
    a stack of them read at it) whose product with x the panel kernel takes; else None."""
    rows = math.prod(x.shape[:-1])
    if isinstance(w, TiledWeight4):
        usable = cpu_kernels.int4_panels_usable(rows, w.tiles, layer is not None,
                                                table_groups(w.scales), layout.INT8_ACTIVATIONS)
        return (w.tiles, w.scales, w.mins) if usable else None
    if not isinstance(w, TiledWeight) or (w.dtype != jnp.int8 and x.dtype != jnp.float32):
        return None  # float panels (float32 or 2-byte) take float32 x only
    blocks = 1 if w.scales is None else table_groups(w.scales)
    if not cpu_kernels.usable(rows, w.tiles, False, blocks, stacked=layer is not None, tiled=True,
                              int8_x=layout.INT8_ACTIVATIONS):
        return None
    return w.tiles, w.scales, w.mins  # int8 mins: the kernel adds their term


def _int8_linear(x: jax.Array, w: QuantizedWeight8bit) -> jax.Array:
    """x [..., I] @ the int8 weight [I, O] -> float32 [..., O], whole-weight products."""
    rows = w.row_blocks
    if rows == 1:  # one scale per output channel: a plain matmul, scaled after
        # (written with a unit row-block axis, the matmul has a batch dimension, and XLA:CPU
        # then re-lays the weight out for every call inside a loop)
        product = jnp.einsum("...i,io->...o", x, w.weight.astype(x.dtype),
                             preferred_element_type=jnp.float32)  # [..., O]
        return product * w.scales[0].astype(jnp.float32)
    weight = w.weight.reshape(rows, -1, w.weight.shape[-1])  # [R, I/R, O]
    return _row_blocked_product("...ri,rio->...ro", x, weight, w.scales, rows,
                                w.scales[:, None, :])  # scales as [R, 1, O]


def per_tile_linear(x: jax.Array, w: Weight) -> jax.Array:
    """Each tile of rows with its own weight: x [N, T, I], w [N, I, O] -> [N, T, O].

    The MoE layer gathers one expert's weight per tile of routed rows (a tile of 1 row at
    decode), so only the routed experts' weights are read and multiplied.
    """
    if isinstance(w, QuantizedWeight4bit):
        return _per_tile_int4(x, w).astype(x.dtype)
    if isinstance(w, QuantizedWeight8bit):
        product = _per_tile_int8(x_for_int8(x, w), without_mins(w))
        return (product if w.mins is None else product + min_term(x, w.mins, "ntr,nro->nto")) \
            .astype(x.dtype)
    return jnp.einsum("nti,nio->nto", x, w.astype(x.dtype),
                      preferred_element_type=jnp.float32).astype(x.dtype)


def _per_tile_int8(x: jax.Array, w: QuantizedWeight8bit) -> jax.Array:
    """per_tile_linear of an int8 weight [N, I, O]: float32 [N, T, O]."""
    rows = w.row_blocks
    n, _, out = w.weight.shape
    weight = w.weight.reshape(n, rows, -1, out)  # [N, R, I/R, O]
    return _row_blocked_product("ntri,nrio->ntro", x, weight, w.scales[:, None],  # [N, 1, R, O]
                                rows, w.scales[:, :, None, :])  # [N, R, 1, O]


def _per_tile_int4(x: jax.Array, w: QuantizedWeight4bit) -> jax.Array:
    """per_tile_linear of an int4 weight [N, P, O]: float32 [N, T, O]. On the CPU at decode,
    and for many rows, one tile at a time as _int4_linear (never a whole float weight); else
    the batched int8 product of the unpacked codes (GPUs, TPUs: one op for all tiles)."""
    tiles, rows, _ = x.shape
    if (rows <= int8_widening.WIDEN_BLOCKS_MAX_ROWS and layout.widening_in_blocks()) \
            or _int4_partials_too_large(tiles * rows, w):
        return jax.lax.map(lambda tile: _int4_linear(*tile), (x, w))  # each rounds its x
    if layout.INT8_ACTIVATIONS:  # as in _int4_linear
        x = int4_widening.int8_rounded(x, w.groups)
    product = _per_tile_int8(x, _int4_as_int8(w))
    return product if w.mins is None else product + min_term(x, w.mins, "ntg,ngo->nto")


def switched_tiles(x: jax.Array, branches, tile_expert: jax.Array) -> jax.Array:
    """Each tile of rows through its expert's function: x [N, T, I], branches a sequence of E
    functions [T, I] -> [T, O] (each reading its own expert's weights, never a gathered copy),
    tile_expert [N] int32 -> [N, T, O].

    A loop over the tiles that switches to the chosen expert's branch. Gathering
    stacked[tile_expert] instead materialises a copy of a whole expert weight per tile before
    the matmul (XLA:CPU; XLA:GPU too), which costs more than the matmul at decode.

    The loop is unrolled (N is at most E: the few pairs of a small decode batch). XLA:GPU runs
    a loop from the host, reading its condition back after every iteration; the switches
    themselves run on the device inside the step's CUDA graph. On the CPU, unrolled and looped
    ran alike (BENCHMARKS.md, "Expert weights at batch-1 MoE decode: switch, not gather").
    """
    def tile(carry, inputs):
        rows, expert = inputs
        return carry, jax.lax.switch(expert, list(branches), rows)

    return jax.lax.scan(tile, None, (x, tile_expert), unroll=True)[1]


def switched_tile_linear(x: jax.Array, weights, tile_expert: jax.Array) -> jax.Array:
    """switched_tiles of one product: x [N, T, I], weights a sequence of E weights [I, O]
    (float, int8 or int4), tile_expert [N] int32 -> [N, T, O]; the same product as
    per_tile_linear(x, stacked[tile_expert])."""
    return switched_tiles(x, [functools.partial(linear, w=w) for w in weights], tile_expert)
