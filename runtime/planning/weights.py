"""The parameter tree of a weight format, without allocating (`abstract_weights`), and which
format a loaded tree is stored in (`weight_format_of`).

float32 / bfloat16 store every parameter in that dtype; int8 is what --quantize int8 makes
(QUANTIZABLE weights in groups of rows, a tied embedding table as a QuantizedEmbedding);
int4 is what --quantize int4 makes (QUANTIZABLE weights as symmetric QuantizedWeight4bit(uint8
[..., I/2, O] packed codes, f16 scales [..., G, O]), no mins; the tied table as int8 makes it);
grok-int8 is the released Grok-1 checkpoint's layout (GROK_INT8_ROW_BLOCKS). Int8 weights are
QuantizedWeight8bit(int8 [..., I, O], bf16 scales [..., R, O]), R scale row blocks.
"""

from __future__ import annotations

import functools
import re
from typing import Optional

import jax
import ml_dtypes
import numpy as np

from runtime.config import DEFAULT_INT8_GROUP_SIZE, ModelConfig
from runtime.errors import RuntimeInputError
from runtime.paths import QUANTIZABLE, quantized_kind
from runtime.quant import QuantizedEmbedding, QuantizedWeight8bit, row_blocks_for
from runtime.quant4 import SCALE_DTYPE as INT4_SCALE_DTYPE, DEFAULT_GROUP_SIZE, \
    QuantizedWeight4bit, groups_for
from runtime.sharding import param_path

WEIGHT_FORMATS = ("float32", "bfloat16", "int8", "int4", "grok-int8")
FLOAT_FORMATS = ("float32", "bfloat16")
QUANTIZED_FORMATS = ("int8", "int4")  # what --quantize makes (a tied table: int8 in both)
SCALE_DTYPE = np.dtype(ml_dtypes.bfloat16)  # scales of int8 weights (quant.quantize's default)
QUANTIZED_LEAVES = (QuantizedWeight8bit, QuantizedWeight4bit)  # one leaf each in the plans


def is_quantized(leaf) -> bool:
    """The is_leaf of tree walks that count or describe quantised weights as one leaf each."""
    return isinstance(leaf, QUANTIZED_LEAVES)

# The released Grok-1 checkpoint: which weights are int8, and their scale row blocks R.
GROK_INT8_ROW_BLOCKS = (
    (re.compile(r"/multi_head_attention/(query|key|value)/w$"), 1),
    (re.compile(r"/moe/(linear|linear_v)/w$"), 1),
    (re.compile(r"/multi_head_attention/linear/w$"), 8),
    (re.compile(r"/moe/linear_1/w$"), 8),
)


def check_format(weight_format: str) -> None:
    if weight_format not in WEIGHT_FORMATS:
        raise RuntimeInputError(f"weight format {weight_format!r}: expected one of "
                                f"{', '.join(WEIGHT_FORMATS)}")


def _grok_row_blocks(path: str) -> Optional[int]:
    return next((r for pattern, r in GROK_INT8_ROW_BLOCKS if pattern.search(path)), None)


def _row_blocks(path: str, weight_format: str, rows: int, group_size: int) -> Optional[int]:
    """R of an int8 matmul weight with `rows` input rows in this format, None for a float leaf."""
    if weight_format == "grok-int8":
        return _grok_row_blocks(path)
    if weight_format == "int8":
        return row_blocks_for(rows, group_size) if QUANTIZABLE.search(path) else None
    return None


@functools.lru_cache(maxsize=8)
def cached_abstract_params(config: ModelConfig):
    """model.abstract_params(config), kept for the plans of the same config."""
    from runtime.parameter_shapes import abstract_params
    return abstract_params(config)


def _float_dtype(weight_format: str, float_dtype: Optional[str]) -> np.dtype:
    """The dtype of the float leaves: the format's own for a float format, else `float_dtype`
    (default float32)."""
    if weight_format in FLOAT_FORMATS:
        if float_dtype not in (None, weight_format):
            raise RuntimeInputError(f"weight format {weight_format}: float_dtype must be "
                                    f"{weight_format} or omitted, got {float_dtype!r}")
        float_dtype = weight_format
    dtype = np.dtype(float_dtype or "float32")
    if dtype.name not in FLOAT_FORMATS:
        raise RuntimeInputError(f"float dtype {dtype.name!r}: expected one of "
                                f"{', '.join(FLOAT_FORMATS)}")
    return dtype


def _tables(shape: tuple, layout: tuple) -> tuple:
    """(scales, mins or None) of shape `shape` as a layout (_quantized) says."""
    mins = None if layout[3] is None else jax.ShapeDtypeStruct(shape, np.dtype(layout[3]))
    return jax.ShapeDtypeStruct(shape, np.dtype(layout[2])), mins


def _quantized(path: str, leaf, layout: tuple):
    """A quantised parameter laid out as `layout` = (int8 or int4, rows per scale, scales'
    dtype name, mins' dtype name or None, a table): what --quantize makes (_quantize_layout) or
    a checkpoint's own types load (stored_tables); a table is int8."""
    fmt, rows, *_, is_table = layout
    if is_table:
        vocab, width = leaf.shape
        table, mins = _tables((row_blocks_for(width, rows), vocab), layout)
        return QuantizedEmbedding(jax.ShapeDtypeStruct(leaf.shape, np.dtype(np.int8)), table,
                                  mins)
    *lead, inputs, outputs = leaf.shape
    if fmt == "int4":
        if inputs % 2:
            raise RuntimeInputError(f"weight format int4: parameter {path} has {inputs} input "
                                    f"rows, not an even number")
        table, mins = _tables((*lead, groups_for(inputs, rows), outputs), layout)
        return QuantizedWeight4bit(
            jax.ShapeDtypeStruct((*lead, inputs // 2, outputs), np.dtype(np.uint8)), table, mins)
    table, mins = _tables((*lead, row_blocks_for(inputs, rows), outputs), layout)
    return QuantizedWeight8bit(jax.ShapeDtypeStruct(leaf.shape, np.dtype(np.int8)), table, mins)


def _quantize_layout(path: str, leaf, config: ModelConfig, weight_format: str,
                     group_size: int, int4_group_size: int) -> Optional[tuple]:
    """_quantized's layout of a parameter in `weight_format` (--quantize's: int4 f16 scales, int8
    bf16, no mins), None for a float one."""
    if weight_format == "int4" and QUANTIZABLE.search(path):
        return ("int4", int4_group_size, np.dtype(INT4_SCALE_DTYPE).name, None, False)
    if weight_format in QUANTIZED_FORMATS and quantized_kind(path, config) == "embedding":
        return ("int8", group_size, SCALE_DTYPE.name, None, True)
    blocks = _row_blocks(path, weight_format, leaf.shape[-2] if leaf.ndim >= 2 else 1,
                         group_size)
    if blocks is None:
        return None
    inputs = leaf.shape[-2]
    if inputs % blocks:
        raise RuntimeInputError(f"weight format {weight_format}: parameter {path} has "
                                f"{inputs} input rows, not divisible into {blocks} scale blocks")
    return ("int8", inputs // blocks, SCALE_DTYPE.name, None, False)


def _abstract_leaf(path: str, leaf, config: ModelConfig, weight_format: str,
                   float_dtype: np.dtype, group_size: int, int4_group_size: int,
                   stored: Optional[dict] = None):
    """One parameter as stored in `weight_format`, or as `stored` (path -> stored_tables
    layout) says for the weights a checkpoint holds quantised."""
    layout = (stored or {}).get(path) or _quantize_layout(
        path, leaf, config, weight_format, group_size, int4_group_size)
    return jax.ShapeDtypeStruct(leaf.shape, float_dtype) if layout is None \
        else _quantized(path, leaf, layout)


def abstract_weights(config: ModelConfig, weight_format: str, float_dtype: Optional[str] = None,
                     int8_group_size: Optional[int] = None,
                     int4_group_size: Optional[int] = None,
                     stored_tables: Optional[tuple] = None):
    """The parameter tree as stored in `weight_format`, without allocating: ShapeDtypeStruct
    leaves, and QuantizedWeight8bit(int8 [..., I, O], bf16 scales [..., R, O]) for int8 ones.

    float32 / bfloat16: every parameter in that dtype. int8: what --quantize int8 makes, the
    QUANTIZABLE weights in groups of int8_group_size rows (default: the loader's) and a tied
    embedding table as a QuantizedEmbedding. int4: those weights as QuantizedWeight4bit in
    groups of int4_group_size rows (default: the loader's), the tied table as int8. grok-int8:
    the released Grok-1 layout: attention query/key/value and moe linear/linear_v with R = 1,
    attention linear and moe linear_1 with R = 8. The other leaves of the quantised formats are
    `float_dtype` (default float32; bfloat16 for a bf16 Hugging Face checkpoint quantised at
    load). stored_tables: ((path, (int8 or int4, rows per scale, scales' dtype, mins' dtype
    or None, a table)), ...) for the weights a checkpoint holds quantised in its own types,
    planned as they load (a GGUF file's: gguf_reader.stored_tables).
    """
    check_format(weight_format)
    dtype = _float_dtype(weight_format, float_dtype)
    stored = dict(stored_tables or ())
    group_size = DEFAULT_INT8_GROUP_SIZE if int8_group_size is None else int8_group_size
    int4_groups = DEFAULT_GROUP_SIZE if int4_group_size is None else int4_group_size
    return jax.tree_util.tree_map_with_path(
        lambda keys, leaf: _abstract_leaf(param_path(keys), leaf, config, weight_format, dtype,
                                          group_size, int4_groups, stored),
        cached_abstract_params(config))


def default_weight_format(checkpoint_kind: Optional[str], quantize: Optional[str] = None,
                          checkpoint=None, floats_widened: bool = False) -> str:
    """The format to plan for before reading a checkpoint: the released Grok-1 (ckpt-0) is
    grok-int8 (--quantize int8 leaves its int8 weights as they are; int4 re-quantises them); a
    GGUF file or a Hugging Face folder without --quantize is the format of the bulk of its
    bytes (its headers say), 2-byte floats as bfloat16 unless `floats_widened` (the loader
    widens them to float32: app_memory.planned_weight_format); others are what --quantize
    makes (int8, int4), else float32 (an upper bound)."""
    if checkpoint_kind == "ckpt-0":
        return "int4" if quantize == "int4" else "grok-int8"
    if quantize in QUANTIZED_FORMATS:
        return quantize
    stored = "float32"
    if checkpoint_kind == "gguf" and checkpoint is not None:
        from runtime.checkpoint.gguf_reader import weight_format
        stored = weight_format(checkpoint)
    elif checkpoint_kind == "hf" and checkpoint is not None:
        from runtime.checkpoint.hf import stored_float_format
        stored = stored_float_format(checkpoint)
    return "float32" if stored == "bfloat16" and floats_widened else stored


def weight_format_of(params) -> str:
    """The format a (real or abstract) parameter tree is stored in, for planning what is loaded:
    int4 when it has int4 weights, grok-int8 when its int8 weights have the released Grok-1's
    row blocks, int8 for other int8 trees (--quantize int8, any group size), else its float
    dtype."""
    leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
    if any(isinstance(leaf, QuantizedWeight4bit) for _, leaf in leaves):
        return "int4"
    quantized = {param_path(k): leaf.scales.shape[-2] for k, leaf in leaves
                 if isinstance(leaf, QuantizedWeight8bit)}
    if quantized:
        grok = all(_grok_row_blocks(path) == rows for path, rows in quantized.items())
        return "grok-int8" if grok else "int8"
    dtypes = {np.dtype(leaf.dtype).name for _, leaf in leaves}
    return "bfloat16" if dtypes == {"bfloat16"} else "float32"
