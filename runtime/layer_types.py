"""Stacked layer weights whose layers differ in type, each layer kept in its own.

GGUF Q4_K_M files store ffn_down and attn_v (Mixtral: ffn_down_exps) in Q6_K in some layers
(the first and last eighth, every third between) and in Q4_K in the others. One stack
[L, I, O] holds one type, so such a stack is int8 in groups of 16 with float32 scales and
mins: exact, but the Q4_K layers at about three times their bytes. LayersByType holds one stack
per type (an int4 stack of the Q4_K layers, an int8 one of the Q6_K layers) and which stack
each layer is in.

The GGUF reader makes them for the loader (layout.layer_types_kept), on any mesh. An unrolled
engine gives each layer its own weight (layer_of); a scanned one with layer views (one CPU
device) switches on the layer's type (switched_product, from products.linear); an engine whose
scan slices the stack merges it on its mesh (merged, models/stored_weights.stacks_of_one_type)
into the one int8 stack the reader makes otherwise, bit for bit: exact, an int4 layer's codes
with its scales and mins (int8_mins.py), at more bytes than its own stack's.

Shape glossary: L layers, L_k layers of type k, I input width, O output width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from runtime.quant import LayerOfStack, QuantizedWeight8bit
from runtime.quant4 import QuantizedWeight4bit, as_int8


class LayersByType:
    """A stacked matmul weight [L, I, O] as `stacks` (stacks[k]: the layers of type k, in
    order, [L_k, ...] in any stored form) and `kinds` (layer l's stack, a tuple of L ints)."""

    def __init__(self, stacks, kinds):
        self.stacks = tuple(stacks)
        self.kinds = tuple(int(k) for k in kinds)

    @property
    def positions(self) -> tuple:
        """Layer l's index in its stack stacks[kinds[l]]."""
        return tuple(self.kinds[:layer].count(kind) for layer, kind in enumerate(self.kinds))

    @property
    def shape(self):  # the logical [L, I, O], which Haiku's get_parameter checks
        return (len(self.kinds), *self.stacks[0].shape[1:])

    @property
    def ndim(self):
        return len(self.shape)

    def __repr__(self):
        return f"LayersByType({self.stacks!r}, kinds={self.kinds})"


def _flatten_with_keys(typed: LayersByType):
    # GetAttrKey: dropped from parameter paths (sharding.param_path), as dataclass fields are
    keys = [jax.tree_util.GetAttrKey(f"stack_{k}") for k in range(len(typed.stacks))]
    return list(zip(keys, typed.stacks)), typed.kinds


jax.tree_util.register_pytree_with_keys(
    LayersByType, _flatten_with_keys, lambda kinds, stacks: LayersByType(stacks, kinds),
    lambda typed: (typed.stacks, typed.kinds))


def expanded(leaves) -> list:
    """`leaves` with each LayersByType replaced by its stacks."""
    return [stack for leaf in leaves
            for stack in (leaf.stacks if isinstance(leaf, LayersByType) else (leaf,))]


def layer_of(leaf, layer: int):
    """Layer `layer` (a Python int) of a stacked leaf [L, ...], a LayersByType included."""
    if isinstance(leaf, LayersByType):
        leaf, layer = leaf.stacks[leaf.kinds[layer]], leaf.positions[layer]
    return jax.tree.map(lambda a: a[layer], leaf)


def switched_product(x: jax.Array, view: LayerOfStack, product):
    """product(x, layer) for layer view.index of a LayersByType (a scan's counter): a switch on
    the layer's type, whose branch passes its stack's layer as a view (LayerOfStack, which the
    CPU kernels read in place) or, an int4 stack not in panels, sliced out."""
    typed = view.stack
    kind = jnp.asarray(typed.kinds, jnp.int32)[view.index]
    position = jnp.asarray(typed.positions, jnp.int32)[view.index]

    def branch(stack):
        def run(x, position):
            layer = LayerOfStack(stack, position)
            return product(x, layer.layer() if isinstance(stack, QuantizedWeight4bit) else layer)
        return run
    return jax.lax.switch(kind, [branch(stack) for stack in typed.stacks], x, position)


def _one_dtype(tables) -> jnp.dtype:
    dtypes = {jnp.dtype(table.dtype) for table in tables}
    return dtypes.pop() if len(dtypes) == 1 else jnp.dtype(jnp.float32)


def merged(typed: LayersByType) -> QuantizedWeight8bit:
    """The one int8 stack [L, I, O] of `typed`, exact: int8 in the finest group of its stacks,
    each layer's values (int4 ones as quant4.as_int8 gives them: the GGUF reader's int8 values
    of Q4_0, Q4_K) with its scales repeated over the finer groups, and mins where a stack has
    them (zero in the layers of the others); scales (mins) in the stacks' one dtype, else
    float32. Where the stacks are as the GGUF reader loads single
    types, what it makes of the mixed stack itself. jax.numpy: jit it (on a mesh)."""
    stacks = [as_int8(stack) if isinstance(stack, QuantizedWeight4bit) else stack
              for stack in typed.stacks]
    group = min(s.weight.shape[-2] // s.scales.shape[-2] for s in stacks)
    dtype = _one_dtype([s.scales for s in stacks])
    with_mins = [s.mins for s in stacks if s.mins is not None]
    mins_dtype = _one_dtype(with_mins)
    weights, scales, mins = [], [], []
    for kind, position in zip(typed.kinds, typed.positions):
        layer = layer_of(stacks[kind], position)
        repeat = layer.weight.shape[-2] // layer.scales.shape[-2] // group
        weights.append(layer.weight)
        scales.append(jnp.repeat(layer.scales.astype(dtype), repeat, axis=-2))
        mins.append(jnp.zeros(scales[-1].shape, mins_dtype) if layer.mins is None
                    else jnp.repeat(layer.mins.astype(mins_dtype), repeat, axis=-2))
    return QuantizedWeight8bit(jnp.stack(weights), jnp.stack(scales),
                               jnp.stack(mins) if with_mins else None)
