"""Parameters placed on the mesh and prepared in the engine's layout (build_engine): KV heads
copied, layers unstacked into per-layer buffers, weights transposed or put in panels
(models/stored_weights.py), their tables compacted.

The preparing program makes a second copy of every weight it re-lays out. Over the whole tree
at once, a load peaked at twice the parameters (a 3.4 GB GGUF file: 6.6 GB of anonymous
memory); with `consume`, parameters of PREPARE_BY_MODULE_BYTES or more are prepared a module at
a time, each module's loaded arrays deleted once prepared, so the peak is the parameters plus
the largest module (BENCHMARKS.md, "GGUF loading").
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from runtime import layout as layouts
from runtime.kv_heads import copy_kv_heads
from runtime.layout import Layout
from runtime.models import Model
from runtime.planning.plan import PREPARE_BY_MODULE_BYTES
from runtime.models.stored_weights import (compact_panels, holds_2_byte_floats,
                                           stacks_of_one_type, table_holds_int4, tile_weights,
                                           transpose_layer_weights, transpose_stacked_weights,
                                           widened_floats)
from runtime.quant import QuantizedEmbedding, with_row_scales
from runtime.sharding import param_specs, shardings


def prepared_params(model: Model, params, mesh: Mesh, layout: Layout, stored_kv_heads: int,
                    consume: bool = False):
    """Stacked `params` placed on `mesh` in `layout`: KV heads copied, layers unstacked into
    per-layer buffers (each keeping its stacked parent's sharding), weights transposed or
    tiled. consume: the caller's arrays may be deleted as they are prepared."""
    params = stacks_of_one_type(params, layout.unrolled, layout.layer_views, mesh)
    params = jax.device_put(params, shardings(param_specs(params, mesh), mesh))
    if layout.kv_copies > 1:
        params = copy_kv_heads(params, stored_kv_heads, layout.kv_copies, mesh)

    int4_table = bool(layout.tiled) and layouts.INT4_TABLE_IN_PANELS and table_holds_int4(params)
    widen = layouts.widen_floats_at_load(model.config)  # 2-byte floats that no panel took
    widen = widen if widen is not None and holds_2_byte_floats(params) else None

    def prepare(params):  # module by module: each output module reads its own input module
        if layout.unrolled:
            params = model.prepare_params(params)
        if layout.transposed and layout.unrolled:
            params = transpose_layer_weights(params, quantized=layout.transposed == "all")
        elif layout.transposed:
            params = transpose_stacked_weights(params)
        if layout.tiled:
            params = tile_weights(params, layout.unrolled, layout.tiled, int4_table)
        return widened_floats(params, widen) if widen else params

    if layout.unrolled or layout.transposed or layout.tiled or widen:
        params = by_module(prepare, params) if consume and tree_bytes(params) \
            >= PREPARE_BY_MODULE_BYTES else jax.jit(prepare)(params)
    if layout.tiled:  # tables super-scaled, int8 codes of six bits packed, where exact
        params = compact_panels(params)
    if layouts.head_row_scales():  # an int8 table not tiled: row scales for its head's kernel
        params = {module: {name: with_row_scales(leaf) if isinstance(leaf, QuantizedEmbedding)
                           else leaf for name, leaf in leaves.items()}
                  for module, leaves in params.items()}
    return params


def tree_bytes(params) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(params))


def by_module(prepare, params: dict) -> dict:
    """prepare(params) run on one module {name: leaves} at a time, each module's arrays deleted
    once its prepared copy exists (donating them would not free them: XLA frees a donated
    buffer only where an output reuses it, and a re-laid-out array's cannot)."""
    step, out = jax.jit(prepare), {}
    for module, leaves in params.items():
        done = jax.block_until_ready(step({module: leaves}))
        kept = {id(leaf) for leaf in jax.tree.leaves(done)}  # passed through as they are
        for leaf in jax.tree.leaves(leaves):
            if id(leaf) not in kept:
                leaf.delete()
        out.update(done)
    return out
