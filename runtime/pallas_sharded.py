"""pallas_gemv's int8 product on a mesh: each device multiplies its own shard of the weight.

Why: XLA cannot partition a custom call. Handed a weight sharded over several devices, it
gathers the whole weight onto every device before the kernel runs (every layer, every step;
jax-ml/jax#32098 says the same of FFI calls), so a Grok-1 on eight GPUs would move its
weights between devices each step instead of reading its own. Wrapped in
jax.experimental.custom_partitioning, the partitioner asks `_partition` how to split it:

- weight_t [O, I] split along O (column-parallel: query/key/value, gate/up, the head): each
  device multiplies x by its rows and holds its slice of y [B, O];
- split along I (row-parallel: the attention output, down): each device multiplies its slice
  of x's inputs (and of the scale rows: R = 1 or R a multiple of the split), then the partial
  sums are added over the devices (one all-reduce of y [B, O] float32, as XLA's own
  row-parallel product does);
- rows of x split (a data axis) stay split.

Where the local shapes do not suit the kernel (pallas_gemv.supported), or the scale rows do
not split with I, the local product is XLA's (`_local_xla_product`), still on local shards
except for the scale rows' case, which keeps I whole (the weight gathered, as before).

Shapes: x [B, I], weight_t int8 [O, I], scales [R, O], G = I / R; y [B, O] float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from runtime import pallas_gemv

# Tests run the kernel in Pallas interpret mode on simulated CPU devices.
INTERPRET = False


def _local_xla_product(x, weight_t, scales):
    """XLA's exact product of x [B, I] and an int8 weight_t [O, I] with scales [R, O]: float32
    [B, O] (the partial sums of each scale group, scaled, summed)."""
    rows, inp = x.shape
    groups, out = scales.shape
    partial = jnp.einsum("brg,org->bro", x.reshape(rows, groups, inp // groups),
                         weight_t.reshape(out, groups, inp // groups).astype(x.dtype),
                         preferred_element_type=jnp.float32)  # [B, R, O]
    return jnp.sum(partial * scales.astype(jnp.float32), axis=1)


def _local_product(x, weight_t, scales):
    """One device's product: the kernel where it takes the local shapes, else XLA's."""
    if pallas_gemv.supported(x.shape[0], weight_t, scales, x.dtype):
        return pallas_gemv.int8_gemv(x, weight_t, scales, interpret=INTERPRET)
    return _local_xla_product(x, weight_t, scales)


@custom_partitioning
def _partitioned(x, weight_t, scales):
    return _local_product(x, weight_t, scales)


def _axes(sharding, ndim: int) -> tuple:
    """The mesh axes (None, a name or a tuple of names) of each of `ndim` dimensions."""
    spec = tuple(getattr(sharding, "spec", ()) or ())
    return spec + (None,) * (ndim - len(spec))


def _split_size(mesh, axes) -> int:
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    size = 1
    for name in names:
        size *= mesh.shape[name]
    return size


def _plan(mesh, arg_shapes):
    """(row axes of x, O axes, I axes, whether the scale rows split with I) for the operands'
    shardings; the I axes are dropped (I kept whole) where the scale rows cannot follow."""
    x, weight_t, scales = arg_shapes
    rows_axes = _axes(x.sharding, 2)[0]
    out_axes, in_axes = _axes(weight_t.sharding, 2)
    groups = scales.shape[0]
    split = _split_size(mesh, in_axes)
    scale_rows_split = split > 1 and groups > 1
    if scale_rows_split and groups % split:
        in_axes, scale_rows_split = None, False
    return rows_axes, out_axes, in_axes, scale_rows_split


def _infer(mesh, arg_shapes, result_shape):
    rows_axes, out_axes, _, _ = _plan(mesh, arg_shapes)
    return NamedSharding(mesh, PartitionSpec(rows_axes, out_axes))


def _partition(mesh, arg_shapes, result_shape):
    rows_axes, out_axes, in_axes, scale_rows_split = _plan(mesh, arg_shapes)

    def product(x, weight_t, scales):  # local shards
        y = _local_product(x, weight_t, scales)
        return y if in_axes is None else jax.lax.psum(y, in_axes)

    spec = lambda *axes: NamedSharding(mesh, PartitionSpec(*axes))  # noqa: E731
    operands = (spec(rows_axes, in_axes), spec(out_axes, in_axes),
                spec(in_axes if scale_rows_split else None, out_axes))
    return mesh, product, spec(rows_axes, out_axes), operands


_partitioned.def_partition(infer_sharding_from_operands=_infer, partition=_partition,
                           sharding_rule="b i, o i, r o -> b o")


def int8_gemv(x, weight_t, scales, partitioned: bool):
    """x [B, I] times the int8 weight (weight_t [O, I], scales [R, O]) -> float32 [B, O]
    through pallas_gemv, each device multiplying its own shard where `partitioned` (a mesh of
    several devices: layout.pallas_products_partitioned)."""
    if partitioned:
        return _partitioned(x, weight_t, scales)
    return pallas_gemv.int8_gemv(x, weight_t, scales, interpret=INTERPRET)
