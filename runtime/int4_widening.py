"""int4 products that unpack their packed codes a block of whole groups at a time inside a
loop: few rows on the CPU (why: layout.widening_in_blocks), so a decode step reads the packed
bytes only and its float32 temporary is one cache-sized block; and the dequantised blocks
that many-row products multiply, so no float copy of a whole weight is ever built.

Shape glossary: M rows, I input width, O output width, G groups, n input rows per group,
gb groups per block, P = I / 2 packed rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from runtime.int8_mins import min_term
from runtime.quant4 import QuantizedWeight4bit

# Few-row products unpack blocks of about this many float32 bytes, fewer than int8's
# WIDEN_BLOCK_BYTES: a weight that fit one such block (a loop of one step) ran 8x slower than
# in blocks of 1 MiB or less (BENCHMARKS.md, "int4 weights (CPU decode)").
UNPACK_BLOCK_BYTES = 512 << 10


def cache_block_groups(groups: int, rows_per_group: int, out: int,
                       block_bytes: int | None = None) -> int:
    """gb: the most groups dividing G whose float32 block [gb * n, O] fits block_bytes
    (None: few-row products' UNPACK_BLOCK_BYTES; one group when even one does not)."""
    block_bytes = UNPACK_BLOCK_BYTES if block_bytes is None else block_bytes
    return max(g for g in range(1, groups + 1) if groups % g == 0
               and (g == 1 or g * rows_per_group * out * 4 <= block_bytes))


def nibble_halves(packed: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
    """packed uint8 [gb * n/2, O] -> the codes of each group's first and second n/2 rows, its
    low and high nibbles: uint8 [gb, n/2, O] each (quant4's block layout; no interleaving)."""
    grouped = packed.reshape(groups, -1, packed.shape[-1])  # [gb, n/2, O]
    return grouped & 15, grouped >> 4


def input_halves(x: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
    """x [M, gb * n] -> the inputs the low and the high nibbles multiply: [M, gb * n/2] each."""
    paired = x.reshape(x.shape[0], groups, 2, -1)  # [M, gb, 2, n/2]
    return paired[:, :, 0].reshape(x.shape[0], -1), paired[:, :, 1].reshape(x.shape[0], -1)


def loop_over_groups(x: jax.Array, w: QuantizedWeight4bit, block_groups: int,
                     product) -> jax.Array:
    """Sum over blocks of `block_groups` groups of product(x rows [M, gb * n], packed
    [gb * n/2, O], scales [gb, O]) -> float32 [M, O], one block per step of a loop; x [M, I]."""
    packed_rows, out = w.packed.shape
    rows = 2 * packed_rows // w.groups * block_groups  # input rows per block

    def block(i, acc):
        # The barrier keeps the block's unpacking inside the loop (XLA would otherwise hoist
        # one conversion of the whole weight out of it).
        inputs, packed, scales = jax.lax.optimization_barrier(
            (jax.lax.dynamic_slice_in_dim(x, i * rows, rows, axis=1),
             jax.lax.dynamic_slice_in_dim(w.packed, i * (rows // 2), rows // 2, axis=0),
             jax.lax.dynamic_slice_in_dim(w.scales, i * block_groups, block_groups, axis=0)))
        return acc + product(inputs, packed, scales)

    return jax.lax.fori_loop(0, w.groups // block_groups, block,
                             jnp.zeros((x.shape[0], out), jnp.float32))


def blocked_int4_linear(x: jax.Array, w: QuantizedWeight4bit) -> jax.Array:
    """x [..., I] @ the dequantised 2-D int4 weight -> float32 [..., O] on the CPU: each block
    of whole groups split into its nibble halves, each half's codes (minus 8 when symmetric)
    scaled in float32 inside the loop (exact: a 4-bit code times a scale of at most 11
    significant bits) and multiplied by the inputs it pairs with; the mins through the group
    sums of x. Halves, not one block of unpacked rows: XLA:CPU's concatenation of the halves
    was many times slower (BENCHMARKS.md, "int4 weights (CPU decode)")."""
    packed_rows, out = w.packed.shape
    rows_in = 2 * packed_rows
    flat = x.reshape(-1, rows_in).astype(jnp.float32)  # [M, I]: widening bf16 is exact
    block_groups = cache_block_groups(w.groups, rows_in // w.groups, out)
    shift = 8.0 if w.mins is None else 0.0

    def product(inputs, packed, scales):  # [M, gb * n], [gb * n/2, O], [gb, O] -> [M, O]
        scale = scales.astype(jnp.float32)[:, None, :]  # [gb, 1, O]
        return sum(jnp.dot(half, ((codes.astype(jnp.float32) - shift) * scale).reshape(-1, out),
                           preferred_element_type=jnp.float32)
                   for half, codes in zip(input_halves(inputs, block_groups),
                                          nibble_halves(packed, block_groups)))

    acc = loop_over_groups(flat, w, block_groups, product)
    if w.mins is not None:
        acc = acc + min_term(flat, w.mins)
    return acc.reshape(*x.shape[:-1], out)


def int8_rounded(x: jax.Array, groups: int) -> jax.Array:
    """x [..., I] rounded to int8 per group of I / `groups` inputs (layout.INT8_ACTIVATIONS):
    codes round(x * 127 / max|x|), times max|x| / 127; what the CPU panel kernel multiplies
    (cpu_panels.cc, quantize_rows), in x's dtype. A group of zeros stays zero."""
    grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], groups, -1)  # [..., G, I/G]
    peak = jnp.max(jnp.abs(grouped), axis=-1, keepdims=True)
    inverse = jnp.where(peak > 0, 127.0 / jnp.where(peak > 0, peak, 1.0), 0.0)
    codes = jnp.round(grouped * inverse)  # half to even, as the kernel's nearbyint
    return (codes * (peak / 127.0)).reshape(x.shape).astype(x.dtype)
