"""The bytes a GGUF file's quantised weights take where one CPU device's panel kernels hold them,
from its header: the forms models/stored_weights.py makes (each layer stack of several types
kept one stack per type, layout.LAYER_TYPES_KEPT; tables of the K-quants super-scaled, 1.25
bytes a group and column rather than float32's 4, super_scales.py; int8 codes of six bits packed
in 3/4 of the bytes, six_bit.py; a tied table of int4 codes in int4 panels). Without them the
plan of a Q4_K_M file said 303 MiB where the engine held 194.5. And which weights (of any
checkpoint) those kernels read in place, of which the working set counts no converted copy
(held_in_panels).

Shape glossary: I input rows, O output columns (a table [V, D]: I = D, O = V), G = I / group.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np

from runtime.checkpoint.gguf_quants import CODE_RANGE, TYPES, two_level_tables
from runtime.config import ModelConfig
from runtime.models.stored_weights import UNEMBED, packs_six_bit
from runtime.paths import EMBEDDINGS, MATMUL_LEAF, STACKED
from runtime.quant import (PANEL, PANEL_FLOATS, QuantizedEmbedding, QuantizedWeight8bit,
                           embedding_tileable, tileable)
from runtime.quant4 import QuantizedWeight4bit, tileable4
from runtime.super_scales import SUPER_GROUPS, SUPER_ROWS

SIX_BIT_CODES, INT4_CODES = (-32, 31), (-8, 7)  # six_bit.LOW / HIGH; quant4.table_fits_int4


def panels_here(config: ModelConfig, mesh_sizes: Mapping[str, int], slots: int) -> bool:
    """Whether an engine of `slots` slots on this machine's one device, a mesh of one, stores its
    weights in panels (layout.tiled_chosen's conditions)."""
    from runtime import cpu_kernels, layout
    return math.prod(mesh_sizes.values()) == 1 and layout.TILED_WEIGHTS and \
        layout.kernels_take_decode(config, slots, cpu_kernels.available(), layout.PANEL_SLOTS)


def _within(kinds: tuple, codes: tuple) -> bool:
    return all(codes[0] <= CODE_RANGE[k][0] and CODE_RANGE[k][1] <= codes[1] for k in kinds)


def _table_bytes(lead: int, groups: int, cols: int, dtype, two_level: bool) -> int:
    """One scale (or min) table [lead, G, O]: super-scaled (compact_panels) where a float32
    one of K-quants, else as loaded."""
    if two_level and np.dtype(dtype) == np.float32 and groups % SUPER_GROUPS == 0:
        return lead * groups // SUPER_GROUPS * SUPER_ROWS * cols
    return lead * groups * cols * np.dtype(dtype).itemsize


def _in_panels(shape: tuple, table: bool) -> bool:
    """quant.tileable, tileable4, embedding_tileable: O (a table's V) a multiple of 64."""
    return (shape[0] if table else shape[-1]) % PANEL == 0


def _stack_bytes(shape: tuple, kinds: tuple, table: bool, compact: dict) -> int:
    """One stack of types `kinds` (gguf_reader.leaf_layout's form) as the panels hold it."""
    from runtime.checkpoint.gguf_reader import leaf_layout
    fmt, group, scales, mins = leaf_layout([TYPES[k] for k in kinds], table)
    if table:
        (cols, rows), lead = shape, 1
    else:
        *outer, rows, cols = shape
        lead = math.prod(outer)
    panels = _in_panels(shape, table)
    two_level = panels and compact["super_scaled"] and all(map(two_level_tables, kinds))
    int4_table = table and panels and compact["int4_table"] and mins is None \
        and group % 2 == 0 and _within(kinds, INT4_CODES)
    six = fmt == "int8" and not int4_table and panels and compact["six_bit"] \
        and rows % 4 == 0 and group % 4 == 0 and _within(kinds, SIX_BIT_CODES)
    codes = lead * rows * cols
    codes = codes // 2 if fmt == "int4" or int4_table else codes * 3 // 4 if six else codes
    tables = [scales] + ([] if mins is None else [mins])
    return codes + sum(_table_bytes(lead, rows // group, cols, dtype,
                                    two_level and not int4_table) for dtype in tables)


def compaction() -> dict:
    """Which of the compact forms this machine's engine makes (models/stored_weights)."""
    from runtime import layout
    return {"super_scaled": layout.SUPER_SCALED_TABLES, "six_bit": packs_six_bit(),
            "int4_table": layout.INT4_TABLE_IN_PANELS}


NOT_COMPACTED = {"super_scaled": False, "six_bit": False, "int4_table": False}


def panel_bytes(path: Path, config: ModelConfig, as_read: bool = False) -> tuple:
    """((parameter path, bytes), ...): each quantised parameter of a GGUF file as one CPU
    device's panels hold it (module docstring), or `as_read`, as the loader reads it before
    compact_panels (float32 K-quant tables, int8 codes unpacked). Header only."""
    from runtime import layout
    from runtime.checkpoint.gguf_reader import stored_stacks
    compact = NOT_COMPACTED if as_read else compaction()
    return tuple((name, sum(_stack_bytes(shape, kinds, table, compact) for shape, kinds in stacks))
                 for name, table, stacks in stored_stacks(path, config,
                                                          layout.layer_types_kept()))


def _float_panel(leaf, table: bool = False) -> bool:
    """An abstract float weight quant.tileable (a table: embedding_tileable) would admit: a
    panel dtype, O (V) a multiple of 64."""
    return not isinstance(leaf, (QuantizedWeight8bit, QuantizedWeight4bit)) and \
        np.dtype(leaf.dtype) in PANEL_FLOATS and len(leaf.shape) >= 2 and \
        leaf.shape[0 if table else -1] % PANEL == 0


def held_in_panels(path: str, leaf, floats: bool = False) -> bool:
    """Whether one CPU device's engine keeps an (abstract) parameter in panels its kernels read
    in place (models/stored_weights.tile_weights): a matmul weight of the layers or the untied
    head, or the tied table, O (V) a multiple of 64; quantised, or with `floats` (float32
    activations: layout.tiled_chosen's "all") float ones too."""
    module, name = path.rsplit("/", 1)
    if (module, name) == EMBEDDINGS:
        return embedding_tileable(leaf) if isinstance(leaf, QuantizedEmbedding) else \
            floats and _float_panel(leaf, table=True)
    return MATMUL_LEAF.fullmatch(name) is not None and \
        (path.startswith(STACKED) or module == UNEMBED) and \
        (tileable(leaf) or tileable4(leaf) or (floats and _float_panel(leaf)))
