"""Read and write the released Grok-1 checkpoint: `ckpt-0/tensor{i:05d}_000` pickles.

The reference saved its Haiku parameter tree leaf by leaf: file i holds leaf i of the tree
flattened with its keys sorted as strings, so layers come in the order 0, 1, 10, 11, ..., 2, 20,
... (all layers have the same shapes, so a numeric order would load silently wrong). One
declarative table, `reference_file_table`, maps every file to our parameter path; the reader and
the writer are both driven by it, and every file is checked against the model's abstract
parameter tree, with all problems reported together in one error.

Path languages (L layers; <sub> e.g. moe/linear, multi_head_attention/query, rms_norm_2):
  ours       language_model/transformer/layers/decoder_layer/<sub>/<param>  [L, ...] stacked
  reference  language_model/transformer/decoder_layer_<l>/<sub>/<param>     [...] one per layer
  both       language_model/in_out_embed/embeddings [V, D], language_model/rms_norm/scale [D]

Each file is a protocol-4 pickle of a float32 ndarray, or of `__main__.QuantizedWeight8bit` with
state {"weight": int8 [..., I, O], "scales": bf16 [..., R, O]}.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from runtime.checkpoint.params_tree import (FLOAT_DTYPES, SCALE_DTYPE, format_shape,
                                            logical_shapes, tree_problems)
from runtime.checkpoint.safe_pickle import QuantizedWeight8bitRecord, _reconstruct, load_file
from runtime.config import ModelConfig
from runtime.errors import CheckpointError
from runtime.quant import QuantizedWeight8bit, check_quantized_shapes

CKPT_DIR = "ckpt-0"
HOST = 0  # the public release was written by one host: only `_000` files exist
TENSOR_FILE = re.compile(r"tensor(\d+)_(\d+)")

# The table: parameters outside the layers, then those of every layer, as (module, param).
GLOBAL_PARAMS = (
    ("language_model/in_out_embed", "embeddings"),  # [V, D], tied with the output head
    ("language_model/rms_norm", "scale"),  # [D] final norm
)
LAYER_PARAMS = (
    ("moe/linear", "w"),  # [E, D, F]
    ("moe/linear_1", "w"),  # [E, F, D]
    ("moe/linear_v", "w"),  # [E, D, F]
    ("multi_head_attention/key", "w"),  # [D, K*H]
    ("multi_head_attention/linear", "w"),  # [N*H, D]
    ("multi_head_attention/query", "w"),  # [D, N*H]
    ("multi_head_attention/value", "w"),  # [D, K*H]
    ("rms_norm", "scale"),  # [D] pre-attention
    ("rms_norm_1", "scale"),  # [D] post-attention
    ("rms_norm_2", "scale"),  # [D] pre-MoE
    ("rms_norm_3", "scale"),  # [D] post-MoE
    ("router", "w"),  # [D, E]
)
OUR_LAYER_MODULE = "language_model/transformer/layers/decoder_layer"
REFERENCE_LAYER_MODULE = "language_model/transformer/decoder_layer_{}"

# Float files are widened to float32 (exact from bf16 and f16); the reference stores float32.


class FileEntry(NamedTuple):
    index: int  # i in tensor{i:05d}_000
    module: str  # our module path
    param: str
    layer: int | None  # position on our stacked leading axis; None outside the layers

    @property
    def file_name(self) -> str:
        return f"tensor{self.index:05d}_{HOST:03d}"

    @property
    def reference_path(self) -> str:
        """The leaf's path in the reference tree, as error messages name it."""
        if self.layer is None:
            return f"{self.module}/{self.param}"
        sub = self.module[len(OUR_LAYER_MODULE):]
        return f"{REFERENCE_LAYER_MODULE.format(self.layer)}{sub}/{self.param}"

    @property
    def tag(self) -> str:
        return f"{self.file_name} ({self.reference_path})"


def reference_file_table(config: ModelConfig) -> list[FileEntry]:
    """Every checkpoint file in order: (file_index, our_module_path, param_name, layer_or_None)."""
    rows = [(module, param, module, None) for module, param in GLOBAL_PARAMS]
    rows += [(f"{REFERENCE_LAYER_MODULE.format(layer)}/{sub}", param, f"{OUR_LAYER_MODULE}/{sub}",
              layer)
             for layer in range(config.num_layers) for sub, param in LAYER_PARAMS]
    # jax flattens the reference's {module: {param: leaf}} dict with sorted keys: by module path
    # as a string, then by parameter name. That sort is the file order.
    rows.sort(key=lambda row: (row[0], row[1]))
    return [FileEntry(i, ours, param, layer) for i, (_, param, ours, layer) in enumerate(rows)]


def _report(summary: str, problems: list[str]) -> CheckpointError:
    if len(problems) == 1:
        return CheckpointError(f"{summary}: {problems[0]}")
    count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
    return CheckpointError("\n  ".join([f"{summary} ({count}):"] + problems))


def _table_and_shapes(config: ModelConfig):
    """The file table and the logical shape of each (module, param), checked against each other."""
    shapes = logical_shapes(config)
    table = reference_file_table(config)
    covered = {(e.module, e.param) for e in table}
    if covered != set(shapes):
        unfilled = sorted("/".join(k) for k in set(shapes) - covered)
        unknown = sorted("/".join(k) for k in covered - set(shapes))
        raise CheckpointError(f"the Grok-1 file table does not match the model: parameters "
                              f"without a file: {unfilled or 'none'}; files for parameters the "
                              f"model lacks: {unknown or 'none'}")
    return table, shapes


def _fileformat_shape(entry: FileEntry, shapes) -> tuple:
    full = shapes[(entry.module, entry.param)]
    return full if entry.layer is None else full[1:]  # stacked params: drop L


# ---------------------------------------------------------------------------------------------
# Reading


def _checkpoint_dir(directory) -> Path:
    """The folder with the tensor files: `directory/ckpt-0`, or `directory` itself."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if (directory / CKPT_DIR).is_dir():
        return directory / CKPT_DIR
    if directory.name == CKPT_DIR or (directory / f"tensor00000_{HOST:03d}").exists():
        return directory
    raise CheckpointError(f"checkpoint directory {directory} holds no {CKPT_DIR}/ folder")


def _as_leaf(obj, param: str, expected: tuple):
    """A file's content as a float32 array or QuantizedWeight8bit, or a string saying what's wrong."""
    if type(obj) is np.ndarray:
        if obj.dtype not in FLOAT_DTYPES:
            return f"expected a float array {format_shape(expected)}, got {obj.dtype} {format_shape(obj.shape)}"
        if obj.shape != expected:
            return f"expected {format_shape(expected)}, got {format_shape(obj.shape)}"
        return obj.astype(np.float32)
    if isinstance(obj, QuantizedWeight8bitRecord):
        weight, scales = obj.weight, obj.scales
        if param != "w":  # only matmul weights may be int8; norms and embeddings are float
            return f"expected a float array {format_shape(expected)}, got a QuantizedWeight8bit"
        if type(weight) is not np.ndarray or type(scales) is not np.ndarray:
            return (f"QuantizedWeight8bit fields must be arrays, got {type(weight).__name__} and "
                    f"{type(scales).__name__}")
        if weight.dtype != np.int8 or scales.dtype != SCALE_DTYPE:
            return (f"expected int8 weight and bfloat16 scales, got {weight.dtype} and "
                    f"{scales.dtype}")
        if weight.shape != expected:
            return f"expected {format_shape(expected)}, got {format_shape(weight.shape)}"
        bad = check_quantized_shapes(weight.shape, scales.shape)
        if bad:
            return bad
        return QuantizedWeight8bit(weight, scales)
    return f"expected an ndarray or QuantizedWeight8bit, got a {type(obj).__name__}"


def _kind(leaf) -> str:
    """What all layers of one stacked parameter must agree on."""
    if isinstance(leaf, QuantizedWeight8bit):
        return f"QuantizedWeight8bit with {leaf.row_blocks} scale row blocks"
    return "float array"


def _empty_stack(leaf, layers: int):
    """Room for `layers` copies of `leaf` on a new leading axis, filled as files arrive."""
    if isinstance(leaf, QuantizedWeight8bit):
        return QuantizedWeight8bit(np.empty((layers, *leaf.weight.shape), np.int8),
                                   np.empty((layers, *leaf.scales.shape), SCALE_DTYPE))
    return np.empty((layers, *leaf.shape), np.float32)


def _progress(items, enabled: bool, total: int):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety, not a dependency
        return items
    return tqdm(items, total=total, desc="loading ckpt-0", unit="file")


def read_ckpt0(directory, config: ModelConfig, progress: bool = False) -> dict:
    """Load a Grok-1 `ckpt-0` into our Haiku params {module: {param: leaf}}.

    `directory` is the download folder (holding `ckpt-0/`) or the `ckpt-0` folder itself. Stacked
    layer parameters come back as numpy [L, ...]; int8 files as QuantizedWeight8bit(int8 [L, ...],
    bf16 [L, ..., R, O]); float files as float32. Files are loaded one at a time into
    preallocated stacks. Any mismatch with the model raises one CheckpointError listing them all.
    """
    ckpt = _checkpoint_dir(directory)
    table, shapes = _table_and_shapes(config)
    problems = []

    names = {e.file_name for e in table}
    present = sorted(p.name for p in ckpt.iterdir() if TENSOR_FILE.fullmatch(p.name))
    if not present:
        raise CheckpointError(f"checkpoint directory {ckpt} holds no tensor{{i:05d}}_000 files")

    leaves = {}  # (module, param) -> the leaf, or its stack being filled
    first = {}  # (module, param) -> (entry, kind) of the first layer file read
    for entry in _progress(table, progress, len(table)):
        key = (entry.module, entry.param)
        path = ckpt / entry.file_name
        if not path.is_file():
            problems.append(f"{entry.tag}: missing")
            continue
        try:
            obj = load_file(path, label=entry.tag)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        leaf = _as_leaf(obj, entry.param, _fileformat_shape(entry, shapes))
        del obj  # the file's arrays: at most one file's worth of pickled data is alive
        if isinstance(leaf, str):
            problems.append(f"{entry.tag}: {leaf}")
            continue
        if entry.layer is None:
            leaves[key] = leaf
            continue
        kind = _kind(leaf)
        if key not in first:
            first[key] = (entry, kind)
            leaves[key] = _empty_stack(leaf, shapes[key][0])
        ref, ref_kind = first[key]
        if kind != ref_kind:
            problems.append(f"{entry.tag}: holds a {kind}, but {ref.file_name} (layer {ref.layer}) "
                            f"holds a {ref_kind}")
            continue
        stack = leaves[key]
        if isinstance(stack, QuantizedWeight8bit):
            stack.weight[entry.layer] = leaf.weight
            stack.scales[entry.layer] = leaf.scales
        else:
            stack[entry.layer] = leaf

    for name in present:
        if name not in names:
            problems.append(f"{name}: not part of a {config.num_layers}-layer Grok-1 checkpoint "
                            f"(tensor00000_{HOST:03d} .. {table[-1].file_name})")
    if problems:
        raise _report(f"checkpoint {ckpt} does not match the model config", problems)

    params = {}
    for module, param in shapes:
        params.setdefault(module, {})[param] = leaves[(module, param)]
    return params


# ---------------------------------------------------------------------------------------------
# Writing


class _ReferencePickler(pickle._Pickler):
    """Pickles with the reference's global names: its numpy 1.x `numpy.core.multiarray` and
    `__main__.QuantizedWeight8bit`, so files load in the reference's own environment too.

    The pure-Python pickler is used because the C one insists that a global's name resolve to
    the very object being saved; only the names of these two globals change.
    """

    RENAMES = ((QuantizedWeight8bitRecord, "__main__", "QuantizedWeight8bit"),
               (_reconstruct, "numpy.core.multiarray", "_reconstruct"))

    def save_global(self, obj, name=None):
        for target, module, qualname in self.RENAMES:
            if obj is target:
                # The protocol-4 form of a global, as pickle itself writes it.
                self.save(module)
                self.save(qualname)
                self.write(pickle.STACK_GLOBAL)
                self.memoize(obj)
                return
        super().save_global(obj, name)


def _file_object(leaf, layer: int | None):
    """What one file pickles: a float32 ndarray or a QuantizedWeight8bitRecord of numpy arrays."""
    # Slice before converting, so a jax array is copied to the host one layer at a time.
    take = (lambda a: a) if layer is None else (lambda a: a[layer])
    if isinstance(leaf, QuantizedWeight8bit):
        return QuantizedWeight8bitRecord(
            np.ascontiguousarray(np.asarray(take(leaf.weight)), dtype=np.int8),
            np.ascontiguousarray(np.asarray(take(leaf.scales)), dtype=SCALE_DTYPE))
    return np.ascontiguousarray(np.asarray(take(leaf)), dtype=np.float32)


def write_ckpt0(params, directory, config: ModelConfig) -> Path:
    """Write our params (jax or numpy leaves) as `directory/ckpt-0/tensor{i:05d}_000`, exactly in
    the released format. Returns the ckpt-0 folder. Refuses a folder that already holds tensors.
    """
    table, shapes = _table_and_shapes(config)
    problems = tree_problems(params, shapes)
    if problems:
        raise _report("params do not match the model config", problems)
    ckpt = Path(directory) / CKPT_DIR
    ckpt.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in ckpt.iterdir() if TENSOR_FILE.fullmatch(p.name))
    if existing:
        raise CheckpointError(f"{ckpt} already holds checkpoint files ({existing[0]}, ...); "
                              f"write into an empty directory")
    for entry in table:
        obj = _file_object(params[entry.module][entry.param], entry.layer)
        # Write beside the target and rename, so a crash never leaves a short tensor file.
        partial = ckpt / f".{entry.file_name}.partial"
        with open(partial, "wb") as f:
            _ReferencePickler(f, protocol=4).dump(obj)
        os.replace(partial, ckpt / entry.file_name)
    return ckpt
