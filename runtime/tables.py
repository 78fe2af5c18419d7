"""The embedding tables: the lookup (embedding_rows) and the tied output head (tied_head), for
every stored form of a table: float, int8 (QuantizedEmbedding, with mins where GGUF's
asymmetric types load: int8_mins.py), in panels (TiledEmbedding) and int4 panels
(TiledEmbedding4).

Shape glossary: V vocab, D model width, R scale groups along D, W a panel row's values.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from runtime import int8_widening, layout, six_bit
from runtime.int8_mins import min_term, table_row_mins, without_mins
from runtime.products import kernel_product, linear, transposed_linear, x_for_int8
from runtime.quant import (PANEL, QuantizedEmbedding, TiledEmbedding, TiledWeight,
                           TransposedWeight)
from runtime.quant4 import TiledEmbedding4, TiledWeight4
from runtime.super_scales import scale_columns, table_groups


def embedding_rows(table, tokens: jax.Array) -> jax.Array:
    """The rows of an embedding table [V, D] (float, QuantizedEmbedding or TiledEmbedding) at
    tokens [...]: [..., D], float32 for an int8 table (dequantised exactly)."""
    if isinstance(table, TiledEmbedding4):
        return _int4_table_rows(table, tokens)
    if isinstance(table, TiledEmbedding):  # [..., D]
        values = six_bit.columns(table.tiles, tokens) if table.tiles.dtype == jnp.uint8 \
            else _table_columns(table.tiles, tokens)
        if table.scales is None:  # float32, or 2-byte floats widened (float32 activations)
            return values.astype(jnp.float32)
        values = values.astype(jnp.float32)
    elif isinstance(table, QuantizedEmbedding):
        values = table.weight[tokens].astype(jnp.float32)  # [..., D]
    else:
        return table[tokens]
    groups = table_groups(table.scales)  # [R, V]
    scale = scale_columns(table.scales, tokens)  # [..., R]
    blocked = values.reshape(*values.shape[:-1], groups, -1) * scale[..., None]
    if table.mins is not None:  # asymmetric (int8_mins.py)
        blocked = blocked + table_row_mins(table.mins, tokens)
    return blocked.reshape(values.shape)


def _table_columns(tiles: jax.Array, tokens: jax.Array) -> jax.Array:
    """A table stored as its head in panels, tiles [V/64, 64 W]: token v's W values, column
    v % 64 of panel v // 64 -> [..., W]."""
    panels, width = tiles.shape
    return tiles.reshape(panels, width // PANEL, PANEL)[tokens // PANEL, :, tokens % PANEL]


def _int4_table_rows(table: TiledEmbedding4, tokens: jax.Array) -> jax.Array:
    """embedding_rows of an int4 table: token v's D/2 bytes unpacked per group (low nibbles
    rows j, high ones j + n/2) -> float32 [..., D]."""
    packed = _table_columns(table.tiles, tokens)  # [..., P]
    groups = table.scales.shape[0]  # [G, V]
    grouped = packed.reshape(*packed.shape[:-1], groups, -1)  # [..., G, n/2]
    codes = jnp.concatenate([grouped & 15, grouped >> 4], axis=-1).astype(jnp.float32) - 8
    scale = jnp.moveaxis(table.scales[:, tokens], 0, -1).astype(jnp.float32)  # [..., G]
    return (codes * scale[..., None]).reshape(*packed.shape[:-1], -1)


def tied_head(x: jax.Array, table) -> jax.Array:
    """x [..., D] times an embedding table [V, D] transposed (the tied output head): float32
    [..., V]; an int8 table is read as its [D, V] head weight, stored transposed (or tiled)."""
    if isinstance(table, QuantizedEmbedding) and table.mins is not None:
        return tied_head(x, without_mins(table)) + min_term(x, table.mins, "...r,rv->...v")
    if isinstance(table, TiledEmbedding4):
        return linear(x, TiledWeight4(table.tiles, table.scales), out_dtype=jnp.float32)
    if isinstance(table, TiledEmbedding):  # its mins, if any, as any panel weight's
        return linear(x, TiledWeight(table.tiles, table.scales, table.mins),
                      out_dtype=jnp.float32)
    x = x_for_int8(x, table)  # an int8 table's head rounds x as any int8 weight's
    kernel = kernel_product(x, table, transposed=True)  # a table [V, D] is the head [D, V]
    if kernel is not None:
        return kernel
    if isinstance(table, QuantizedEmbedding):
        head = TransposedWeight(table.weight, table.scales)
        if math.prod(x.shape[:-1]) <= int8_widening.WIDEN_BLOCKS_MAX_ROWS \
                and layout.widening_in_blocks():
            return int8_widening.blocked_transposed_int8_linear(x, head)
        return transposed_linear(x, head)
    return jnp.einsum("...d,vd->...v", x, table.astype(x.dtype),
                      preferred_element_type=jnp.float32)
