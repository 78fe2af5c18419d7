"""Stacked layer weights whose layers differ in type, each layer kept in its own.

GGUF Q4_K_M files store ffn_down and attn_v (Mixtral: ffn_down_exps) in Q6_K in some layers
(the first and last eighth, every third between) and in Q4_K in the others. One stack
[L, I, O] holds one type, so such a stack was int8 in groups of 16 with float32 scales: the Q4_K
layers quantised again (not the file's values) at about twice their bytes. LayersByType holds
one stack per type (an int4 stack of the Q4_K layers, an int8 one of the Q6_K layers, each
exact) and which stack each layer is in.

The GGUF reader makes them for the loader (layout.layer_types_kept), on any mesh. An unrolled
engine gives each layer its own weight (layer_of); a scanned one with layer views (one CPU
device) switches on the layer's type (switched_product, from products.linear); an engine whose
scan slices the stack merges it on its mesh (merged, models/stored_weights.stacks_of_one_type)
into the one int8 stack the reader makes otherwise, bit for bit.

Shape glossary: L layers, L_k layers of type k, I input width, O output width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from runtime.quant import (REQUANT_GROUP, LayerOfStack, QuantizedWeight8bit,
                           quantize_on_device)
from runtime.quant4 import QuantizedWeight4bit, as_int8, dequantize_int4


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


def _exact_int8(stack):
    """`stack` as int8 of its exact values where it has them (int8; symmetric int4 as codes
    - 8, as the GGUF reader loads Q4_0), else None."""
    if isinstance(stack, QuantizedWeight4bit):
        return None if stack.mins is not None else as_int8(stack)
    return stack


def merged(typed: LayersByType) -> QuantizedWeight8bit:
    """The one int8 stack [L, I, O] of `typed`: int8 in the finest group of its exact stacks
    (int8, symmetric int4; 32 rows when it has none), scales float32 (or the exact stacks' one
    scale dtype when all are); an exact stack's layers keep their values (scales repeated over
    the finer groups), the others (asymmetric int4) are quantised again from their float
    values (quant.quantize_on_device, exact). Where the stacks are as the GGUF reader loads
    single types, what it makes of the mixed stack itself. jax.numpy: jit it (on a mesh)."""
    exact = [_exact_int8(stack) for stack in typed.stacks]
    groups = [s.weight.shape[-2] // s.scales.shape[-2] for s in exact if s is not None]
    group = min(groups, default=REQUANT_GROUP)
    dtypes = {jnp.dtype(s.scales.dtype) for s in exact if s is not None}
    dtype = dtypes.pop() if len(dtypes) == 1 and None not in exact else jnp.dtype(jnp.float32)
    weights, scales = [], []
    for kind, position in zip(typed.kinds, typed.positions):
        layer = layer_of(typed.stacks[kind] if exact[kind] is None else exact[kind], position)
        if exact[kind] is None:  # [..., I, O] quantised again
            floats = dequantize_int4(layer, jnp)
            layer = quantize_on_device(floats, floats.shape[-2] // group, jnp.float32, True)
        repeat = layer.weight.shape[-2] // layer.scales.shape[-2] // group
        weights.append(layer.weight)
        scales.append(jnp.repeat(layer.scales.astype(dtype), repeat, axis=-2))
    return QuantizedWeight8bit(jnp.stack(weights), jnp.stack(scales))
