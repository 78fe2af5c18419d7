"""What the stacked layer parameters hold, for the layout's choices (layout.py): the bytes per
layer a scan would copy out, which matmul weights go into panels, and MoE expert stacks that
would. Reads the parameter tree only: no platform, no constants of the layout."""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from runtime.config import ModelConfig
from runtime.layer_types import LayersByType, expanded
from runtime.paths import MATMUL_LEAF, STACKED
from runtime.quant import QuantizedWeight8bit, tileable
from runtime.quant4 import tileable4


def matmul_stacks(params) -> list:
    """The stacked layers' matmul weights ([L, I, O], MoE experts [L, E, I, O]), any kind; a
    stack of several types (layer_types.LayersByType) as its stacks, one per type."""
    return expanded([leaf for module, tree in params.items() if module.startswith(STACKED)
                     for name, leaf in tree.items() if MATMUL_LEAF.fullmatch(name)])


def stacked_layer_bytes(params, config: ModelConfig, tiled: Optional[str] = None) -> float:
    """Parameter bytes of one layer of the stacked layer parameters (STACKED); with `tiled`
    (layout.tiled_chosen's kinds), less the matmul stacks stored in panels, which a scan reads
    in place (what it would copy out per layer: MoE expert stacks, norms, weights not in
    panels)."""
    leaves = [leaf for module, tree in params.items() if module.startswith(STACKED)
              for name, weight in tree.items()
              if not (tiled and np.ndim(weight) == 3 and MATMUL_LEAF.fullmatch(name)
                      and in_panels(weight, tiled))
              for leaf in jax.tree.leaves(weight)]
    return sum(leaf.nbytes for leaf in leaves) / config.num_layers


def experts_in_panels_unrolled(params, tiled: Optional[str]) -> bool:
    """Whether an MoE model's expert stacks [L, E, I, O] all go into panels once its layers
    unroll (split per expert; `tiled` as layout.tiled_chosen), as the grouped kernel call
    needs: however small they are, since a scan keeps them out of the panel kernels
    (BENCHMARKS.md, "Small experts unrolled")."""
    experts = [leaf for leaf in matmul_stacks(params) if np.ndim(leaf) == 4]
    return bool(tiled and experts) and all(in_panels(leaf, tiled) for leaf in experts)


def in_panels(weight, kinds: str) -> bool:
    """Whether models/stored_weights.tile_weights stores a matmul weight in panels for `kinds`
    (layout.tiled_chosen): int4 and int8 ones (O a multiple of 64), float32 ones too for
    "all"; a stack of several types where each of its stacks is."""
    if isinstance(weight, LayersByType):
        return all(in_panels(stack, kinds) for stack in weight.stacks)
    return tileable4(weight) or (tileable(weight) and (kinds == "all" or isinstance(
        weight, QuantizedWeight8bit)))
