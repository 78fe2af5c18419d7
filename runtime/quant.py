"""The int8 weight type and the matmul helpers that consume it.

Shape glossary: M rows (tokens or token-expert pairs), I input width, O output width,
R scale row blocks, G groups (experts).

A QuantizedWeight8bit holds int8 values `weight [..., I, O]` and `scales [..., R, O]`; scale row r
applies to the r-th contiguous block of I / R input rows (R = 1: one scale per output channel;
the released Grok-1 uses R = 8 for its row-parallel weights). The dequantised weight is
`weight[..., i, :] * scales[..., i // (I / R), :]`.

The helpers never build a dequantised copy: they multiply the activations by the int8 values
(upcast inside the matmul, which is exact: |q| <= 127 fits bf16 and float32) with float32
accumulation, then apply the scale of each row block to the float32 partial sums. This equals
the reference's float32 product `(q * s) @ x` up to float32 rounding order, and never rounds a
dequantised weight to bf16.
"""

from __future__ import annotations

import dataclasses
from typing import Union

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedWeight8bit:
    weight: jax.Array  # int8 [..., I, O]
    scales: jax.Array  # bf16 (or f32) [..., R, O]

    # Haiku's get_parameter checks `.shape` against the declared logical shape.
    @property
    def shape(self):
        return self.weight.shape

    @property
    def ndim(self):
        return len(self.weight.shape)

    @property
    def row_blocks(self) -> int:
        return self.scales.shape[-2]


Weight = Union[jax.Array, np.ndarray, QuantizedWeight8bit]


def check_quantized_shapes(weight_shape, scales_shape) -> str | None:
    """None when the scales fit the weight, else what is wrong (used by readers and quantize)."""
    if len(scales_shape) != len(weight_shape) or len(weight_shape) < 2:
        return f"scales rank {len(scales_shape)} does not match weight rank {len(weight_shape)}"
    if tuple(scales_shape[:-2]) != tuple(weight_shape[:-2]) or scales_shape[-1] != weight_shape[-1]:
        return f"scales {tuple(scales_shape)} do not fit weight {tuple(weight_shape)}"
    rows = scales_shape[-2]
    if rows < 1 or weight_shape[-2] % rows:
        return f"{rows} scale row blocks do not divide {weight_shape[-2]} input rows"
    return None


def quantize(w, row_blocks: int = 1, scale_dtype=ml_dtypes.bfloat16) -> QuantizedWeight8bit:
    """Symmetric per-output-channel int8 (per row block when row_blocks > 1), on the host.

    The scale is rounded to its storage dtype before the values are computed, so that
    dequantising with the stored scale reproduces exactly-representable weights bit for bit.
    """
    w = np.asarray(w, dtype=np.float32)
    *lead, rows, cols = w.shape
    if rows % row_blocks:
        raise ValueError(f"{row_blocks} row blocks do not divide {rows} input rows")
    blocks = w.reshape(*lead, row_blocks, rows // row_blocks, cols)
    amax = np.max(np.abs(blocks), axis=-2)  # [..., R, O]
    scales = (amax / 127.0).astype(scale_dtype)
    safe = np.where(scales.astype(np.float32) == 0, 1.0, scales.astype(np.float32))
    values = np.clip(np.rint(blocks / safe[..., None, :]), -127, 127).astype(np.int8)
    return QuantizedWeight8bit(values.reshape(w.shape), scales)


def quantize_on_device(w: jax.Array, row_blocks: int = 1,
                       scale_dtype=jnp.bfloat16) -> QuantizedWeight8bit:
    """quantize() in jax.numpy, bit for bit the same rounding, for weights already on a device
    (jit it): scripts/bench.py quantises random weights too large to round-trip through host
    numpy (a 4-layer Grok-1 slice is 80 GB in float32)."""
    w = w.astype(jnp.float32)
    *lead, rows, cols = w.shape
    blocks = w.reshape(*lead, row_blocks, rows // row_blocks, cols)
    scales = (jnp.max(jnp.abs(blocks), axis=-2) / jnp.float32(127.0)).astype(scale_dtype)
    stored = scales.astype(jnp.float32)
    safe = jnp.where(stored == 0, jnp.float32(1.0), stored)
    values = jnp.clip(jnp.rint(blocks / safe[..., None, :]), -127, 127).astype(jnp.int8)
    return QuantizedWeight8bit(values.reshape(w.shape), scales)


def dequantize(w: QuantizedWeight8bit) -> np.ndarray:
    """Float32 copy of a quantised weight: for tests and converters, never for the model."""
    weight = np.asarray(w.weight).astype(np.float32)
    scales = np.asarray(w.scales).astype(np.float32)
    rows = weight.shape[-2]
    return weight * np.repeat(scales, rows // scales.shape[-2], axis=-2)


def _blocked(x: jax.Array, rows: int) -> jax.Array:
    """[..., I] -> [..., R, I/R]."""
    return x.reshape(*x.shape[:-1], rows, x.shape[-1] // rows)


def linear(x: jax.Array, w: Weight, out_dtype=None) -> jax.Array:
    """x [..., I] @ w [I, O] -> [..., O] in out_dtype (default x.dtype), float32 accumulation."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if not isinstance(w, QuantizedWeight8bit):
        return jnp.einsum("...i,io->...o", x, w.astype(x.dtype),
                          preferred_element_type=jnp.float32).astype(out_dtype)
    rows = w.row_blocks
    if rows == 1:  # one scale per output channel: a plain matmul, scaled after
        # (written with a unit row-block axis, the matmul has a batch dimension, and XLA:CPU
        # then re-lays the weight out for every call inside a loop)
        product = jnp.einsum("...i,io->...o", x, w.weight.astype(x.dtype),
                             preferred_element_type=jnp.float32)  # [..., O]
        return (product * w.scales[0].astype(jnp.float32)).astype(out_dtype)
    weight = w.weight.reshape(rows, -1, w.weight.shape[-1]).astype(x.dtype)  # [R, I/R, O]
    partial = jnp.einsum("...ri,rio->...ro", _blocked(x, rows), weight,
                         preferred_element_type=jnp.float32)  # [..., R, O]
    return jnp.sum(partial * w.scales.astype(jnp.float32), axis=-2).astype(out_dtype)


def per_tile_linear(x: jax.Array, w: Weight) -> jax.Array:
    """Each tile of rows with its own weight: x [N, T, I], w [N, I, O] -> [N, T, O].

    The MoE layer gathers one expert's weight per tile of routed rows (a tile of 1 row at
    decode), so only the routed experts' weights are read and multiplied.
    """
    if not isinstance(w, QuantizedWeight8bit):
        return jnp.einsum("nti,nio->nto", x, w.astype(x.dtype),
                          preferred_element_type=jnp.float32).astype(x.dtype)
    rows = w.row_blocks
    n, _, out = w.weight.shape
    weight = w.weight.reshape(n, rows, -1, out).astype(x.dtype)  # [N, R, I/R, O]
    partial = jnp.einsum("ntri,nrio->ntro", _blocked(x, rows), weight,
                         preferred_element_type=jnp.float32)  # [N, T, R, O]
    scales = w.scales.astype(jnp.float32)[:, None]  # [N, 1, R, O]
    return jnp.sum(partial * scales, axis=-2).astype(x.dtype)


def switched_tile_linear(x: jax.Array, weights, tile_expert: jax.Array) -> jax.Array:
    """Each tile of rows with its expert's weight, from E separate weights: x [N, T, I],
    weights a sequence of E weights [I, O] (float or QuantizedWeight8bit), tile_expert [N]
    int32 -> [N, T, O].

    The same product as per_tile_linear(x, stacked[tile_expert]), computed by a loop over the
    tiles that switches to the chosen expert's branch, whose matmul reads that expert's own
    buffer. Gathering stacked[tile_expert] instead materialises a copy of a whole expert weight
    per tile before the matmul (XLA:CPU), which costs more than the matmul at decode.
    """
    branches = [lambda rows, w=w: linear(rows, w) for w in weights]

    def tile(carry, inputs):
        rows, expert = inputs
        return carry, jax.lax.switch(expert, branches, rows)

    return jax.lax.scan(tile, None, (x, tile_expert))[1]
