"""A scan over stacked layers whose matmul weights are read in place by the CPU kernels.

hk.layer_stack scans over the stacked parameters: each iteration's slice of every stacked
weight is an operand XLA:CPU copies out of its stack before the operation that takes it (a
custom call or a dot), so a scanned decode step moves each weight three times: read and written
by the copy, read again by the product. Here the body gets layer i's 2-D matmul weights as
LayerOfStack views (the whole stack and i); products.linear hands the stack and i to the CPU
kernel, which reads layer i where it lies. Every other parameter (row-major int8 weights too,
see _viewed) is sliced as the plain scan does; a view a product's kernel does not take is
sliced in the body.
Measured on a float32 SmolLM-135M: BENCHMARKS.md, "Scanned layers read in place".

Parameters keep hk.layer_stack's names and layout (`<scope>/<name>/<layer module>/...`, [L, ...]
leaves): the two are interchangeable on the same checkpoint, and the engine's layout
(layout.layer_views_chosen) picks this one.

Shape glossary: L layers; I input width, O output width of a matmul weight.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

from runtime.layer_types import LayersByType
from runtime.paths import MATMUL_LEAF
from runtime.quant import LayerOfStack, TiledWeight, TransposedWeight
from runtime.quant4 import TiledWeight4


def _viewed(name: str, leaf) -> bool:
    """A stacked 2-D float matmul weight [L, I, O], TransposedWeight [L, O, I], TiledWeight
    [L, O/64, 64 I] or TiledWeight4 (products.linear takes their views). Row-major int8 stacks
    are sliced: their kernel reads a slice's copy in cache faster than the stack from memory,
    and a view's slice, taken inside the body, ran slower than the scan's own. A stack of
    several types (layer_types.LayersByType) is always viewed: a scan cannot slice it."""
    if isinstance(leaf, LayersByType):
        return bool(MATMUL_LEAF.fullmatch(name))
    if isinstance(leaf, (TiledWeight, TiledWeight4)):
        return bool(MATMUL_LEAF.fullmatch(name)) and leaf.tiles.ndim == 3
    stack = leaf.weight_t if isinstance(leaf, TransposedWeight) and leaf.scales is None else leaf
    return bool(MATMUL_LEAF.fullmatch(name)) and isinstance(stack, jax.Array) \
        and stack.ndim == 3 and jnp.issubdtype(stack.dtype, jnp.floating)


def _split(params):
    """(the stacked matmul weights, everything else): the scan slices the second as its
    per-layer inputs, as hk.layer_stack slices all of them."""
    views = {module: {n: leaf for n, leaf in leaves.items() if _viewed(n, leaf)}
             for module, leaves in params.items()}
    sliced = {module: {n: leaf for n, leaf in leaves.items() if not _viewed(n, leaf)}
              for module, leaves in params.items()}
    return views, sliced


def _layer_params(views, sliced, index: jax.Array):
    """Layer `index`'s parameters: the matmul weights as LayerOfStack views of their stacks,
    the rest (`sliced`, already layer `index`'s) as they are."""
    return {module: {**{n: LayerOfStack(leaf, index) for n, leaf in views[module].items()},
                     **sliced[module]} for module in views}


def layer_scan(count: int, name, viewed_inputs: bool = False):
    """hk.layer_stack(count, with_per_layer_inputs=True, name=name) for inference: returns a
    function of `layer_fn` (x, *per_layer) -> (x, outputs) that runs it `count` times, each
    over its own parameters and per-layer inputs [L, ...], and returns (x, outputs [L, ...]).
    viewed_inputs: the layers get their per-layer inputs as LayerOfStack views (a decode
    step's KV memory, which the decode attention kernel reads in place), not sliced."""
    def stacked(layer_fn):
        def run(x, *per_layer):
            inner = hk.transform(layer_fn)

            def initial_params(rng, x, *per_layer):  # init: every layer's parameters, stacked
                keys = None if rng is None else jax.random.split(rng, count)

                def one(carry, inputs):
                    key, layer_inputs = inputs
                    params = inner.init(key, carry, *layer_inputs)
                    return inner.apply(params, None, carry, *layer_inputs)[0], params
                return jax.lax.scan(one, x, (keys, per_layer), length=count)[1]

            params = hk.lift(initial_params, allow_reuse=True, name=name)(
                hk.maybe_next_rng_key(), x, *per_layer)

            views, sliced = _split(params)

            def body(carry, inputs):
                index, layer_sliced, layer_inputs = inputs
                if viewed_inputs:
                    layer_inputs = tuple(LayerOfStack(stack, index) for stack in per_layer)
                return inner.apply(_layer_params(views, layer_sliced, index), None, carry,
                                   *layer_inputs)

            indices = jnp.arange(count, dtype=jnp.int32)
            scanned = None if viewed_inputs else per_layer
            return jax.lax.scan(body, x, (indices, sliced, scanned), length=count)
        return run
    return stacked
