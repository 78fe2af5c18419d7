"""Stacked layer weights whose layers differ in type, each layer kept in its own.

GGUF Q4_K_M files store ffn_down and attn_v (Mixtral: ffn_down_exps) in Q6_K in some layers
(the first and last eighth, every third between) and in Q4_K in the others. One stack
[L, I, O] holds one type, so such a stack was int8 in groups of 16 with float32 scales: the Q4_K
layers quantised again (not the file's values) at about twice their bytes. LayersByType holds
one stack per type (an int4 stack of the Q4_K layers, an int8 one of the Q6_K layers, each
exact) and which stack each layer is in.

The GGUF reader makes them for the loader of a one-device CPU mesh (layout.layer_types_kept).
An unrolled engine gives each layer its own weight (layer_of); a scanned one with layer views
switches on the layer's type (switched_product, from products.linear); an engine whose scan
slices the stack merges it (merged, models/stored_weights.stacks_of_one_type) into the one int8
stack the reader makes otherwise, bit for bit.

Shape glossary: L layers, L_k layers of type k, I input width, O output width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from runtime.quant import REQUANT_GROUP, LayerOfStack, QuantizedWeight8bit, quantize
from runtime.quant4 import QuantizedWeight4bit, dequantize_int4, unpacked_codes


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


def _as_int8(stack):
    """An int8 stack of `stack`'s exact values where it has them (int8; symmetric int4 as
    codes - 8, as the GGUF reader loads Q4_0), else None; host numpy."""
    stack = jax.tree.map(np.asarray, stack)
    if isinstance(stack, QuantizedWeight4bit):
        if stack.mins is not None:
            return None
        codes = unpacked_codes(stack.packed, stack.groups, np).astype(np.int8)
        return QuantizedWeight8bit(codes - np.int8(8), stack.scales)
    return stack


def merged(typed: LayersByType) -> QuantizedWeight8bit:
    """The one int8 stack [L, I, O] of `typed`: int8 in the finest group of its exact stacks
    (int8, symmetric int4; 32 rows when it has none), scales float32 (or the exact stacks' one
    scale dtype when all are); an exact stack's layers keep their values (scales repeated over
    the finer groups), the others (asymmetric int4) are quantised again from their float
    values. Host numpy. Where the stacks are as the GGUF reader loads single types, what it
    makes of the mixed stack itself."""
    exact = [_as_int8(stack) for stack in typed.stacks]
    groups = [s.weight.shape[-2] // s.row_blocks for s in exact if s is not None]
    group = min(groups, default=REQUANT_GROUP)
    dtypes = {np.dtype(s.scales.dtype) for s in exact if s is not None}
    dtype = dtypes.pop() if len(dtypes) == 1 and None not in exact else np.dtype(np.float32)
    layers = []
    for kind, position in zip(typed.kinds, typed.positions):
        stack = exact[kind]
        if stack is not None:
            weight, scales = stack.weight[position], stack.scales[position]
            repeat = weight.shape[-2] // scales.shape[-2] // group
            layers.append((weight, np.repeat(scales.astype(dtype), repeat, axis=-2)))
        else:
            floats = dequantize_int4(layer_of(typed.stacks[kind], position))  # [..., I, O]
            again = quantize(floats, floats.shape[-2] // group, np.float32)
            layers.append((again.weight, again.scales))
    return QuantizedWeight8bit(np.stack([w for w, _ in layers]),
                               np.stack([s for _, s in layers]))


def merged_layer_types(params, chosen=lambda leaf: True) -> dict:
    """`params` with each LayersByType that `chosen` picks merged (merged)."""
    return {module: {name: merged(leaf) if isinstance(leaf, LayersByType) and chosen(leaf)
                     else leaf for name, leaf in leaves.items()}
            for module, leaves in params.items()}
