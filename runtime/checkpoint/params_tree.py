"""Checks of a parameter tree against the model's abstract tree, shared by readers and writers."""

from __future__ import annotations

from typing import Mapping

import ml_dtypes
import numpy as np

from runtime.config import ModelConfig
from runtime.parameter_shapes import abstract_params
from runtime.paths import EMBEDDINGS
from runtime.quant import QuantizedEmbedding, QuantizedWeight8bit, check_quantized_shapes
from runtime.quant4 import QuantizedWeight4bit, check_int4_shapes

FLOAT_DTYPES = frozenset(map(np.dtype, (np.float32, ml_dtypes.bfloat16, np.float16)))
SCALE_DTYPE = np.dtype(ml_dtypes.bfloat16)  # what --quantize int8 and the Grok-1 files store
# Scales a stored int8 or int4 leaf may have: float16 too, GGUF's (and quant4's) scale dtype.
STORED_SCALE_DTYPES = frozenset(map(np.dtype, (ml_dtypes.bfloat16, np.float16)))


def quantized_leaf(key: tuple[str, str], weight, scales) -> QuantizedWeight8bit:
    """The int8 leaf a reader found at (module, param): the embedding table's type, or a
    matmul weight's."""
    kind = QuantizedEmbedding if tuple(key) == EMBEDDINGS else QuantizedWeight8bit
    return kind(weight, scales)


def format_shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def logical_shapes(config: ModelConfig) -> dict[tuple[str, str], tuple]:
    """(module, param) -> logical shape, for every parameter of the model."""
    return {(module, param): tuple(leaf.shape)
            for module, leaves in abstract_params(config).items()
            for param, leaf in leaves.items()}


def int4_problem(where: str, param: str, leaf: QuantizedWeight4bit, full: tuple) -> str | None:
    """What is wrong with an int4 leaf, naming its part as the native format names its
    tensors (`<path>:int4`, `:scales`, `:mins`), or None."""
    if param != "w":
        return f"{where}: only matmul weights (w) may be QuantizedWeight4bit"
    packed, scales, mins = leaf.packed, leaf.scales, leaf.mins
    if np.dtype(packed.dtype) != np.uint8:
        return f"{where}:int4: expected uint8 packed codes, got {packed.dtype}"
    for part, name in ((scales, "scales"), (mins, "mins")):
        if part is not None and np.dtype(part.dtype) not in STORED_SCALE_DTYPES:
            return f"{where}:{name}: expected float16 or bfloat16, got {part.dtype}"
    if tuple(leaf.shape) != tuple(full):
        return (f"{where}:int4: expected {format_shape(full)} (packed "
                f"{format_shape((*full[:-2], full[-2] // 2, full[-1]))}), got packed "
                f"{format_shape(packed.shape)}")
    bad = check_int4_shapes(tuple(packed.shape), tuple(scales.shape),
                            None if mins is None else tuple(mins.shape))
    if bad:
        return f"{where}:{'mins' if bad.startswith('mins') else 'scales'}: {bad}"
    return None


def leaf_problem(where: str, param: str, leaf, full: tuple) -> str | None:
    """What is wrong with one leaf against its logical shape, or None."""
    if isinstance(leaf, QuantizedWeight4bit):
        return int4_problem(where, param, leaf, full)
    if isinstance(leaf, QuantizedWeight8bit):  # a QuantizedEmbedding too
        table = isinstance(leaf, QuantizedEmbedding)
        if table and tuple(where.rsplit("/", 1)) != EMBEDDINGS:
            return f"{where}: only the embedding table may be an int8 QuantizedEmbedding"
        if not table and param != "w":
            return f"{where}: only matmul weights (w) may be QuantizedWeight8bit"
        weight, scales = leaf.weight, leaf.scales
        if leaf.mins is not None:
            return (f"{where}: int8 with mins (GGUF Q2_K, Q4_1, Q4_K, Q5_1, Q5_K) has no "
                    f"stored form here: run the GGUF file itself")
        if np.dtype(weight.dtype) != np.int8 or \
                np.dtype(scales.dtype) not in STORED_SCALE_DTYPES:
            return (f"{where}: expected int8 weight and bfloat16 or float16 scales, got "
                    f"{weight.dtype} and {scales.dtype}")
        if tuple(weight.shape) != full:
            return f"{where}: expected {format_shape(full)}, got {format_shape(weight.shape)}"
        bad = _table_scales_problem(full, tuple(scales.shape)) if table else \
            check_quantized_shapes(tuple(weight.shape), tuple(scales.shape))
        return f"{where}: {bad}" if bad else None
    if not hasattr(leaf, "dtype"):
        return (f"{where}: expected an array, QuantizedWeight8bit or QuantizedWeight4bit, got "
                f"{type(leaf).__name__}")
    if np.dtype(leaf.dtype) not in FLOAT_DTYPES:
        return f"{where}: expected float32, bfloat16 or float16, got {leaf.dtype}"
    if tuple(leaf.shape) != full:
        return f"{where}: expected {format_shape(full)}, got {format_shape(leaf.shape)}"
    return None


def _table_scales_problem(full: tuple, scales_shape: tuple) -> str | None:
    """An int8 table [V, D] needs scales [R, V] with R dividing D."""
    vocab, width = full
    if len(scales_shape) != 2 or scales_shape[1] != vocab or scales_shape[0] < 1 \
            or width % scales_shape[0]:
        return (f"scales {format_shape(scales_shape)} do not fit the table: expected "
                f"[R, {vocab}] with R dividing {width}")
    return None


def tree_problems(params, shapes: Mapping[tuple[str, str], tuple]) -> list[str]:
    """Every mismatch between a params tree and the logical shapes: missing, extra, wrong."""
    if not isinstance(params, Mapping):
        return [f"expected a params dict {{module: {{param: leaf}}}}, got {type(params).__name__}"]
    problems = [f"{module}: expected a dict {{param: leaf}}, got {type(leaves).__name__}"
                for module, leaves in params.items() if not isinstance(leaves, Mapping)]
    for (module, param), full in shapes.items():
        leaves = params.get(module)
        leaf = leaves.get(param) if isinstance(leaves, Mapping) else None
        if leaf is None:
            problems.append(f"{module}/{param}: missing")
        elif bad := leaf_problem(f"{module}/{param}", param, leaf, full):
            problems.append(bad)
    for module, leaves in params.items():
        for param in leaves if isinstance(leaves, Mapping) else ():
            if (module, param) not in shapes:
                problems.append(f"{module}/{param}: not a parameter of the model")
    return problems
