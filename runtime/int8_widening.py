"""int8 products on the CPU that widen their weight a block at a time inside a loop, so the
float32 temporary is one cache-sized block instead of the whole weight (why: layout.widening_in_blocks).

Shape glossary: M rows, I input width, O output width, R scale row blocks, kb input rows per
block, ob output rows per block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from runtime.quant import QuantizedWeight8bit, TransposedWeight

# An int8 weight is widened and multiplied in blocks of input rows of about this many float32
# bytes (see layout.widening_in_blocks).
WIDEN_BLOCK_BYTES = 4 << 20
# ... for products of at most this many rows (decode); a prefill's matmul outweighs the
# widening, and accumulating its larger partial products block by block costs more.
WIDEN_BLOCKS_MAX_ROWS = 64


def widening_block_rows(rows_in: int, out: int, row_blocks: int) -> int:
    """Input rows kb widened per loop step: within WIDEN_BLOCK_BYTES of float32, either dividing
    one scale row block (large blocks, e.g. Grok-1's R = 8) or a whole number of them (groups of
    64 rows: one group per step would be thousands of steps per decode step)."""
    per_scale = rows_in // row_blocks
    kb = per_scale
    while kb > 8 and kb % 2 == 0 and kb * out * 4 > WIDEN_BLOCK_BYTES:
        kb //= 2
    if kb == per_scale:
        for groups in range(row_blocks, 0, -1):
            if row_blocks % groups == 0 and groups * per_scale * out * 4 <= WIDEN_BLOCK_BYTES:
                return groups * per_scale
    return kb


def blocked_int8_linear(x: jax.Array, w: QuantizedWeight8bit) -> jax.Array:
    """x [..., I] @ dequantised w [I, O] -> float32 [..., O], widening one block of kb input
    rows at a time inside a loop; a block lies within one scale row block, or spans whole ones
    (then widened and scaled together, exactly, in float32)."""
    rows_in, out = w.weight.shape
    per_scale = rows_in // w.row_blocks  # input rows per scale row block
    kb = widening_block_rows(rows_in, out, w.row_blocks)
    groups = kb // per_scale  # scale row blocks per block of rows (0: within one)
    lead = x.shape[:-1]
    flat = x.reshape(-1, rows_in)  # [M, I]
    scales = w.scales.astype(jnp.float32)  # [R, O]

    def block(i, acc):
        start = i * kb
        # The barrier keeps the block's widening inside the loop (XLA would otherwise hoist
        # one conversion of the whole weight out of it).
        rows, values = jax.lax.optimization_barrier(
            (jax.lax.dynamic_slice_in_dim(flat, start, kb, axis=1),
             jax.lax.dynamic_slice_in_dim(w.weight, start, kb, axis=0)))  # [M, kb], [kb, O]
        if groups > 1:
            scale = jax.lax.dynamic_slice_in_dim(scales, start // per_scale, groups, axis=0)
            widened = values.astype(jnp.float32).reshape(groups, per_scale, out)
            if flat.shape[0] == 1:  # one row: per-group partial sums [1, g, O], then scaled
                partial = jnp.einsum("mgi,gio->mgo", rows.astype(jnp.float32).reshape(
                    1, groups, per_scale), widened, preferred_element_type=jnp.float32)
                return acc + jnp.sum(partial * scale, axis=1)
            # several rows: XLA:CPU's batched dots are slow past one row (BENCHMARKS.md,
            # "Group-wise int8"): the block dequantised exactly in float32, one dot
            dequantised = (widened * scale[:, None, :]).reshape(kb, out)  # [kb, O]
            return acc + jnp.dot(rows.astype(jnp.float32), dequantised,
                                 preferred_element_type=jnp.float32)
        product = jnp.dot(rows, values.astype(x.dtype), preferred_element_type=jnp.float32)
        if w.row_blocks == 1:
            return acc + product  # [M, O]; the one scale row is applied after the loop
        scale = jax.lax.dynamic_index_in_dim(scales, start // per_scale, keepdims=False)
        return acc + product * scale

    acc = jax.lax.fori_loop(0, rows_in // kb, block,
                            jnp.zeros((flat.shape[0], out), jnp.float32))
    if w.row_blocks == 1:
        acc = acc * scales[0]
    return acc.reshape(*lead, out)


def blocked_transposed_int8_linear(x: jax.Array, w: TransposedWeight) -> jax.Array:
    """x [..., I] @ (dequantised w.weight_t [O, I])^T -> float32 [..., O] on the CPU, widening
    (and scaling, exactly in float32) one block of output rows at a time inside a loop, for
    the reason of widening_in_blocks: the int8 tied head of a Llama-3.2-1B shape, widened whole,
    is a 1 GB float32 temporary on every step."""
    out, rows_in = w.weight_t.shape
    groups = w.scales.shape[0]
    ob = max(1, min(out, WIDEN_BLOCK_BYTES // (rows_in * 4)))  # output rows per block
    flat = x.reshape(-1, rows_in).astype(jnp.float32)  # [M, I]

    def product(start, size):  # -> [M, size]
        values, scales = jax.lax.optimization_barrier(
            (jax.lax.dynamic_slice_in_dim(w.weight_t, start, size, axis=0),
             jax.lax.dynamic_slice_in_dim(w.scales, start, size, axis=1)))  # [size, I], [R, size]
        dequantised = (values.astype(jnp.float32).reshape(size, groups, rows_in // groups)
                       * scales.T.astype(jnp.float32)[:, :, None]).reshape(size, rows_in)
        return jnp.einsum("mi,oi->mo", flat, dequantised, preferred_element_type=jnp.float32)

    def block(i, acc):
        return jax.lax.dynamic_update_slice_in_dim(acc, product(i * ob, ob), i * ob, axis=1)

    full = out // ob * ob
    acc = jax.lax.fori_loop(0, out // ob, block, jnp.zeros((flat.shape[0], out), jnp.float32))
    if full < out:  # the last, shorter block
        acc = jax.lax.dynamic_update_slice_in_dim(acc, product(full, out - full), full, axis=1)
    return acc.reshape(*x.shape[:-1], out)
