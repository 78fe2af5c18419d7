"""How an engine stores the transformer's layer matmul weights for its products (chosen by
layout.Layout): as read ([..., I, O]), transposed (TransposedWeight [..., O, I]) or, for the CPU
kernels, in column panels (TiledWeight [..., O/64, 64 I]). Each transform maps the stacked tree
(STACKED modules, [L, I, O] leaves) or the unrolled one (UNROLLED, [I, O] leaves, expert
weights `w_<e>` included); tiling also takes the output head (tied or not); norms stay as
they are.

Shape glossary: L layers, I input width, O output width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from runtime import cpu_kernels, layout, six_bit
from runtime.layer_types import LayersByType, merged
from runtime.stacked_weights import in_panels
from runtime.paths import EMBEDDINGS, MATMUL_LEAF, ROOT, STACKED, UNROLLED
from runtime.quant import (QuantizedEmbedding, QuantizedWeight8bit, TiledWeight,
                           embedding_tileable, tiled, tiled_embedding, transposed)
from runtime.quant4 import (QuantizedWeight4bit, TiledEmbedding4, TiledWeight4,
                            super_scaled_panels, table_fits_int4, tiled4, tiled_embedding4)
from runtime.sharding import leaf_spec, shardings
from runtime.super_scales import super_scaled_on_device, table_groups

UNEMBED = f"{ROOT}/unembed"  # the untied output head's module


def _mapped_matmul_weights(params, prefix: str, chosen, transform, exact: bool = False) -> dict:
    """The modules under `prefix` (or, `exact`, that module only) with each matmul weight (`w`,
    `w_<e>`) that `chosen(leaf)` replaced by `transform(leaf)`."""
    return {module: {name: transform(leaf) if MATMUL_LEAF.fullmatch(name) and chosen(leaf)
                     else leaf for name, leaf in leaves.items()}
            if (module == prefix if exact else module.startswith(prefix)) else leaves
            for module, leaves in params.items()}


def _transposed_matmul_weights(params, prefix: str, ndim: int, quantized: bool) -> dict:
    """The modules under `prefix` with each float matmul weight of `ndim` dimensions stored
    transposed as TransposedWeight, and with `quantized` its int8 ones too."""
    def chosen(leaf):
        if isinstance(leaf, QuantizedWeight8bit):
            return quantized and leaf.weight.ndim == ndim
        # A QuantizedWeight4bit is neither, so it stays [P, O]: its bytes pair rows i and
        # i + n/2 of a group, and its products unpack whole row groups (products.py).
        return isinstance(leaf, jax.Array) and leaf.ndim == ndim and \
            jnp.issubdtype(leaf.dtype, jnp.floating)

    return _mapped_matmul_weights(params, prefix, chosen, transposed)


def transpose_layer_weights(params, quantized: bool = False) -> dict:
    """The unrolled tree (unstack_layers) with each layer's float matmul weight (`w`, `w_<e>`
    [I, O]) stored transposed, as TransposedWeight [O, I], and with `quantized` its int8 ones
    too, and an int8 untied head (`unembed/w` [D, V] as [V, D]): the layout of a one-slot
    float32 engine on the CPU (float weights only) and of GPU engines (all). On an H200 the
    int8 head [V, D] through pallas_gemv took 170 us against 303 for XLA's [D, V] product
    (Llama-8B's; BENCHMARKS.md, "GPU"); float heads stay [D, V], which cuBLAS and the CPU
    read at their rate."""
    params = _transposed_matmul_weights(params, UNROLLED, 2, quantized)
    if not quantized:
        return params
    return _mapped_matmul_weights(
        params, UNEMBED, lambda leaf: isinstance(leaf, QuantizedWeight8bit)
        and leaf.weight.ndim == 2, transposed, exact=True)


def transpose_stacked_weights(params) -> dict:
    """The stacked tree with each layer's float matmul weight stack (`w` [L, I, O]) stored as
    TransposedWeight [L, O, I]: the layout of a scanned one-device CPU engine with several slots,
    whose layer scan hands the stacks to the float32 transposed kernel (layout.Layout.choose)."""
    return _transposed_matmul_weights(params, STACKED, 3, quantized=False)


def stacks_of_one_type(params, unrolled: bool, layer_views: bool, mesh) -> dict:
    """The stacked tree with each stack of several types (layer_types.LayersByType) merged
    into one int8 stack (layer_types.merged, jitted onto `mesh` under the partition rules),
    unless the engine keeps it: `unrolled` (each layer takes its own weight), or scanned with
    `layer_views` a stack [L, I, O] (a product switches on the layer's type; a scan slices
    expert stacks, and a plain one every stack)."""
    def merge(path: str, leaf):
        if unrolled or (layer_views and leaf.ndim == 3):
            return leaf
        placed = shardings(leaf_spec(path, jax.eval_shape(merged, leaf), mesh), mesh)
        return jax.jit(merged, out_shardings=placed)(leaf)

    return {module: {name: merge(f"{module}/{name}", leaf) if isinstance(leaf, LayersByType)
                     else leaf for name, leaf in leaves.items()}
            for module, leaves in params.items()}


def table_holds_int4(params) -> bool:
    """Whether the tied table is an int8 one holding int4 codes (quant4.table_fits_int4: a GGUF
    Q4_0 table), which tile_weights then stores in int4 panels. Asked of concrete params,
    before tile_weights is traced."""
    module, name = EMBEDDINGS
    return table_fits_int4(params.get(module, {}).get(name))


def tile_weights(params, unrolled: bool, kinds: str, int4_table: bool = False) -> dict:
    """The stacked tree (or with `unrolled` the unrolled one) with each matmul weight of a layer
    ([L, I, O] stacks, [I, O] unrolled) and of the untied head (`unembed/w` [D, V]) that
    quant.tileable admits stored as TiledWeight (int4 ones quant4.tileable4 admits as
    TiledWeight4), and the tied table as TiledEmbedding (with `int4_table`, an int8 one holding
    int4 codes as TiledEmbedding4: table_holds_int4): the quantised ones (int8, int4) for
    `kinds` "quantized", float32 ones too for "all" (layout.tiled_chosen). The layout of a
    one-device CPU engine, whose panel kernel reads them in memory order (stacks in place in a
    layer scan). MoE expert stacks [L, E, I, O] stay as they are (their decode gathers the
    routed experts' rows)."""
    ndim = 2 if unrolled else 3

    def chosen(leaf):
        return in_panels(leaf, kinds)

    def panels_of(leaf):
        if isinstance(leaf, LayersByType):  # each type's stack in its own panels
            return LayersByType([panels_of(stack) for stack in leaf.stacks], leaf.kinds)
        return tiled4(leaf) if isinstance(leaf, QuantizedWeight4bit) else tiled(leaf)

    params = _mapped_matmul_weights(params, UNROLLED if unrolled else STACKED,
                                    lambda leaf: chosen(leaf) and np.ndim(leaf) == ndim, panels_of)
    params = _mapped_matmul_weights(params, UNEMBED, chosen, panels_of, exact=True)
    module, name = EMBEDDINGS
    table = params.get(module, {}).get(name)
    if table is None:  # a tree of other modules (prepared_params.by_module)
        return params
    if int4_table:  # a GGUF Q4_0 table (table_holds_int4): half the int8 head's bytes
        params = {**params, module: {**params[module], name: tiled_embedding4(table)}}
    elif embedding_tileable(table) and (kinds == "all" or isinstance(table, QuantizedEmbedding)):
        params = {**params, module: {**params[module], name: tiled_embedding(table)}}
    return params


def _super_scaled(leaf):
    if isinstance(leaf, LayersByType):
        return LayersByType([_super_scaled(stack) for stack in leaf.stacks], leaf.kinds)
    if isinstance(leaf, TiledWeight4) and not isinstance(leaf, TiledEmbedding4):
        return super_scaled_panels(leaf)  # a Q4_0 table's f16 scales stay as they are
    if isinstance(leaf, TiledWeight) and leaf.tiles.dtype == jnp.int8:
        return type(leaf)(leaf.tiles, super_scaled_on_device(leaf.scales, np.int8),
                          super_scaled_on_device(leaf.mins))  # Q5_K's, as Q4_K's
    return leaf


def super_scaled_tables(params) -> dict:
    """The prepared tree with the float32 scale tables of its panel weights super-scaled where
    exact (super_scales.py: GGUF Q4_K's and Q5_K's scales and mins; Q6_K's), the tied
    table's included. Concrete params, after tile_weights."""
    return {module: {name: _super_scaled(leaf) for name, leaf in leaves.items()}
            for module, leaves in params.items()}


def _six_bit(leaf):
    if isinstance(leaf, LayersByType):
        return LayersByType([_six_bit(stack) for stack in leaf.stacks], leaf.kinds)
    if isinstance(leaf, TiledWeight) and leaf.scales is not None \
            and six_bit.fits(leaf.tiles, table_groups(leaf.scales)):
        tiles = jax.device_put(six_bit.packed(np.asarray(leaf.tiles)), leaf.tiles.sharding)
        return type(leaf)(tiles, leaf.scales, leaf.mins)
    return leaf


def packs_six_bit() -> bool:
    """Whether compact_panels packs int8 codes of six bits (layout.SIX_BIT_PANELS): where the
    kernel multiplies them, but not where int8 activations take AMX tiles (int8 panels only)."""
    return layout.SIX_BIT_PANELS and cpu_kernels.six_bit_panels() \
        and not (layout.INT8_ACTIVATIONS and cpu_kernels.amx_tiles())


def compact_panels(params) -> dict:
    """The prepared tree's panel weights compacted where exact: scale tables super-scaled
    (super_scaled_tables; layout.SUPER_SCALED_TABLES), int8 codes of six bits packed
    (six_bit.py; packs_six_bit). After tile_weights."""
    if layout.SUPER_SCALED_TABLES:
        params = super_scaled_tables(params)
    if not packs_six_bit():
        return params
    return {module: {name: _six_bit(leaf) for name, leaf in leaves.items()}
            for module, leaves in params.items()}


def _two_byte_float(leaf) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.floating) \
        and leaf.dtype.itemsize == 2


def holds_2_byte_floats(params) -> bool:
    """Whether a plain parameter leaf of `params` is a 2-byte float (F16 / BF16 as stored)."""
    return any(_two_byte_float(leaf) for leaves in params.values() for leaf in leaves.values())


def widened_floats(params, dtype):
    """The plain 2-byte float leaves of `params` (weights no panel took, norms, routers) widened
    to `dtype`: a checkpoint's F16 / BF16 weights kept as stored for the panels
    (cpu_kernels.panels_read_2_byte_floats) would otherwise be widened by XLA on every step."""
    return {module: {name: leaf.astype(dtype) if _two_byte_float(leaf) else leaf
                     for name, leaf in leaves.items()} for module, leaves in params.items()}
