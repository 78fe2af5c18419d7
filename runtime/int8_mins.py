"""Int8 weights with mins: GGUF's asymmetric types loaded exactly.

Q5_K and Q5_1 store a value as scale * q + min (q in 0..31; Q2_K q in 0..3; Q4_K and Q4_1, q
in 0..15, where they load as int8: tables, and layers of a stack of mixed types). They load as int8 codes q
with `scales` and `mins` [..., R, O] per group (QuantizedWeight8bit.mins; TransposedWeight,
TiledWeight and the tables carry them alike), never quantised again. A product multiplies the
codes as any int8 weight's, through every kernel and layout, and adds the mins' term: each
group's sum of inputs times its min (the form of GGUF's own asymmetric dot products).

Shape glossary: R groups, I input width, O output width (V for a tied head), N tiles, T rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from runtime.quant import LayerOfStack, QuantizedWeight8bit, TiledWeight, TransposedWeight
from runtime.super_scales import float_table, scale_columns

INT8_FORMS = (QuantizedWeight8bit, TransposedWeight, TiledWeight)  # tables: subclasses


def mins_of(w):
    """The mins [..., R, O] of an int8 weight in any stored form (a layer of a stack: that
    layer's [R, O]; panels' maybe super-scaled, super_scales.py), else None: symmetric, float,
    or int4 (whose products add their own)."""
    if isinstance(w, LayerOfStack):
        mins = mins_of(w.stack)
        return None if mins is None else jax.lax.dynamic_index_in_dim(mins, w.index,
                                                                      keepdims=False)
    return w.mins if isinstance(w, INT8_FORMS) else None


def without_mins(w):
    """The weight (or layer view) without its mins: its codes times its scales."""
    if isinstance(w, LayerOfStack):
        return LayerOfStack(without_mins(w.stack), w.index)
    return dataclasses.replace(w, mins=None)


def min_term(x: jax.Array, mins: jax.Array, spec: str = "...r,ro->...o") -> jax.Array:
    """Each group's sum of x [..., I] (R groups of I / R) contracted with the mins by `spec`
    (x's sums [..., R] first; the mins [R, O] by default, or super-scaled) -> float32 [..., O]."""
    mins = float_table(mins)
    groups = mins.shape[-2]
    sums = jnp.sum(x.astype(jnp.float32).reshape(*x.shape[:-1], groups, -1), axis=-1)
    return jnp.einsum(spec, sums, mins.astype(jnp.float32), preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST)


def table_row_mins(mins: jax.Array, tokens: jax.Array) -> jax.Array:
    """A table's mins [R, V] (or super-scaled) at tokens [...] -> float32 [..., R, 1], to add
    to its grouped rows [..., R, D / R]."""
    return scale_columns(mins, tokens)[..., None]
