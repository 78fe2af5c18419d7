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

Reading is lazy: `plan_ckpt0` indexes every file (its pickle opcodes only, a few KB; see
ckpt0_index) and checks it, giving per parameter a list of pieces whose arrays are still in the
files. `lazy_ckpt0` makes each parameter a LazyParam over its pieces (checkpoint/load.py reads
or places them: the one read path), and `read_ckpt0_slice` reads one slice of one planned
parameter; both touch only the bytes of each layer file that a slice needs (what a host reading
only its own devices' shards wants).
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from runtime.checkpoint.ckpt0_arrays import CALL_COST, LazyArray, normalize_index
from runtime.checkpoint.ckpt0_index import lazy_pickle
from runtime.checkpoint.lazy import BYTES_READ, LazyParam
from runtime.checkpoint.params_tree import (FLOAT_DTYPES, SCALE_DTYPE, format_shape,
                                            logical_shapes, tree_problems)
from runtime.checkpoint.safe_pickle import QuantizedWeight8bitRecord, _reconstruct
from runtime.config import ModelConfig
from runtime.errors import CheckpointError, problem_report
from runtime.paths import STACKED
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
OUR_LAYER_MODULE = STACKED.rstrip("/")
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
    return problem_report(summary, problems, CheckpointError)


def _check_layer_count(ckpt: Path, config: ModelConfig) -> None:
    """The config's num_layers against the files on disk, before the file table (a list per
    layer) is built: a config claiming 10^9 layers must not allocate for them."""
    files = sum(1 for p in ckpt.iterdir() if TENSOR_FILE.fullmatch(p.name))
    layers = (files - len(GLOBAL_PARAMS)) / len(LAYER_PARAMS)
    if files and config.num_layers > max(layers, 0) + 1:
        raise CheckpointError(f"config num_layers {config.num_layers} needs "
                              f"{len(GLOBAL_PARAMS) + len(LAYER_PARAMS) * config.num_layers} "
                              f"files; {ckpt} holds {files} (about {int(layers)} layers)")


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


class Ckpt0Piece(NamedTuple):
    """One file's share of a parameter, not read yet."""
    index: tuple  # position on the stacked leading axis: (layer,), or () outside the layers
    leaf: object  # LazyArray, or QuantizedWeight8bit of LazyArray weight and scales
    entry: FileEntry  # the file it lives in


def _type_name(value) -> str:
    return "ndarray" if isinstance(value, LazyArray) else type(value).__name__


def _check_leaf(obj, param: str, expected: tuple):
    """A file's indexed content as a lazy leaf (LazyArray or QuantizedWeight8bit of LazyArrays),
    or a string saying what's wrong. Reads no array data."""
    if isinstance(obj, LazyArray):
        if obj.dtype not in FLOAT_DTYPES:
            return f"expected a float array {format_shape(expected)}, got {obj.dtype} {format_shape(obj.shape)}"
        if obj.shape != expected:
            return f"expected {format_shape(expected)}, got {format_shape(obj.shape)}"
        return obj
    if isinstance(obj, QuantizedWeight8bitRecord):
        weight, scales = getattr(obj, "weight", None), getattr(obj, "scales", None)
        if param != "w":  # only matmul weights may be int8; norms and embeddings are float
            return f"expected a float array {format_shape(expected)}, got a QuantizedWeight8bit"
        if not isinstance(weight, LazyArray) or not isinstance(scales, LazyArray):
            return (f"QuantizedWeight8bit fields must be arrays, got {_type_name(weight)} and "
                    f"{_type_name(scales)}")
        if weight.dtype != np.int8 or scales.dtype != SCALE_DTYPE:
            return (f"expected int8 weight and bfloat16 scales, got {weight.dtype} and "
                    f"{scales.dtype}")
        if weight.shape != expected:
            return f"expected {format_shape(expected)}, got {format_shape(weight.shape)}"
        bad = check_quantized_shapes(weight.shape, scales.shape)
        if bad:
            return bad
        return QuantizedWeight8bit(weight, scales)
    return f"expected an ndarray or QuantizedWeight8bit, got a {_type_name(obj)}"


def _kind(leaf) -> str:
    """What all layers of one stacked parameter must agree on."""
    if isinstance(leaf, QuantizedWeight8bit):
        return f"QuantizedWeight8bit with {leaf.row_blocks} scale row blocks"
    return "float array"



def plan_ckpt0(directory, config: ModelConfig) -> dict:
    """(module, param) -> [Ckpt0Piece]: where every parameter of a `ckpt-0` lives, all checked.

    Stacked layer parameters get one piece per layer, in layer order (piece l has index (l,)); the
    others one piece with index (). Each file is indexed, not loaded: only its pickle opcodes are
    read (a few KB), and the arrays stay in the files as LazyArrays. Does every check loading
    does (missing, foreign, corrupt and extra files; shapes; dtypes; kinds; scale row blocks
    consistent across layers) and raises one CheckpointError listing every problem.
    """
    ckpt = _checkpoint_dir(directory)
    _check_layer_count(ckpt, config)
    table, shapes = _table_and_shapes(config)
    problems = []

    names = {e.file_name for e in table}
    present = sorted(p.name for p in ckpt.iterdir() if TENSOR_FILE.fullmatch(p.name))
    if not present:
        raise CheckpointError(f"checkpoint directory {ckpt} holds no tensor{{i:05d}}_000 files")

    pieces = {key: [] for key in shapes}
    first = {}  # (module, param) -> (entry, kind) of the first layer file indexed
    for entry in table:
        key = (entry.module, entry.param)
        path = ckpt / entry.file_name
        if not path.is_file():
            problems.append(f"{entry.tag}: missing")
            continue
        try:
            obj = lazy_pickle(path, label=entry.tag)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        leaf = _check_leaf(obj, entry.param, _fileformat_shape(entry, shapes))
        if isinstance(leaf, str):
            problems.append(f"{entry.tag}: {leaf}")
            continue
        if entry.layer is None:
            pieces[key].append(Ckpt0Piece((), leaf, entry))
            continue
        kind = _kind(leaf)
        if key not in first:
            first[key] = (entry, kind)
        ref, ref_kind = first[key]
        if kind != ref_kind:
            problems.append(f"{entry.tag}: holds a {kind}, but {ref.file_name} (layer {ref.layer}) "
                            f"holds a {ref_kind}")
            continue
        pieces[key].append(Ckpt0Piece((entry.layer,), leaf, entry))

    for name in present:
        if name not in names:
            problems.append(f"{name}: not part of a {config.num_layers}-layer Grok-1 checkpoint "
                            f"(tensor00000_{HOST:03d} .. {table[-1].file_name})")
    if problems:
        raise _report(f"checkpoint {ckpt} does not match the model config", problems)
    return {key: sorted(found, key=lambda piece: piece.index) for key, found in pieces.items()}


def _plan_layout(plan_entry):
    """(pieces, stacked, quantized, full weight shape, full scales shape or None) of a plan entry."""
    pieces = list(plan_entry)
    if not pieces:
        raise ValueError("an empty plan entry")
    stacked = pieces[0].index != ()
    if stacked and [p.index for p in pieces] != [(layer,) for layer in range(len(pieces))]:
        raise ValueError("a stacked plan entry needs one piece per layer, in layer order")
    leaf = pieces[0].leaf
    lead = (len(pieces),) if stacked else ()
    if isinstance(leaf, QuantizedWeight8bit):
        return pieces, stacked, True, lead + leaf.weight.shape, lead + leaf.scales.shape
    return pieces, stacked, False, lead + leaf.shape, None


def lazy_ckpt0(directory, config: ModelConfig) -> dict:
    """(module, param) -> LazyParam (or QuantizedWeight8bit of two) over the planned files
    (plan_ckpt0): stacked layer parameters [L, ...], int8 files as int8 weight and bf16 scales,
    float files widened to float32 (exact). A slice reads only its bytes of each layer file."""
    lazies = {}
    for key, entry in plan_ckpt0(directory, config).items():
        pieces, stacked, quantized, shape, scales_shape = _plan_layout(entry)
        lazies[key] = QuantizedWeight8bit(
            _lazy_part(pieces, stacked, "weight", shape, np.int8),
            _lazy_part(pieces, stacked, "scales", scales_shape, SCALE_DTYPE)) if quantized \
            else _lazy_part(pieces, stacked, None, shape, np.float32)
    return lazies


def _lazy_part(pieces, stacked: bool, part, shape: tuple, dtype) -> LazyParam:
    def read(index) -> np.ndarray:
        data = _read_stacked(pieces, stacked, part, normalize_index(tuple(index or ()), shape),
                             dtype, CALL_COST)
        BYTES_READ.add(data.nbytes)
        return data
    return LazyParam(shape, np.dtype(dtype), read)


def _scales_dims(weight_dims: tuple, weight_shape: tuple, row_blocks: int) -> tuple:
    """The scales index matching a weight index (normalize_index form) of a QuantizedWeight8bit."""
    *lead, rows, cols = weight_dims
    block = weight_shape[-2] // row_blocks
    if isinstance(rows, int):
        return (*lead, rows // block, cols)
    if rows.step < 0:
        raise ValueError("a negative step on the input dimension of a QuantizedWeight8bit is not "
                         "supported (its scale row blocks would not follow)")
    if len(rows) == 0:
        return (*lead, range(0), cols)
    return (*lead, range(rows[0] // block, rows[-1] // block + 1), cols)


def _read_stacked(pieces, stacked: bool, part, dims: tuple, dtype, call_cost: int) -> np.ndarray:
    """`dims` of one (weight, scales or array) part of a plan entry, layer by layer."""
    def read(piece, inner):
        leaf = piece.leaf if part is None else getattr(piece.leaf, part)
        return leaf.read_dims(inner, call_cost=call_cost)

    if not stacked:
        return np.asarray(read(pieces[0], dims), dtype=dtype)
    layers, inner = dims[0], dims[1:]
    if isinstance(layers, int):
        return np.asarray(read(pieces[layers], inner), dtype=dtype)
    out = None
    for j, layer in enumerate(layers):
        got = read(pieces[layer], inner)
        if out is None:
            out = np.empty((len(layers), *got.shape), dtype)
        out[j] = got
    if out is None:  # no layers selected: the shape the other dims would give
        out = np.empty((0, *(len(d) for d in inner if not isinstance(d, int))), dtype)
    return out


def read_ckpt0_slice(plan_entry, index, *, call_cost: int = CALL_COST):
    """Exactly `param[index]` of one planned parameter, reading only the bytes it needs.

    `plan_entry` is plan_ckpt0(...)[(module, param)]; `index` a tuple of ints and slices (and at
    most one '...') over the parameter as lazy_ckpt0 gives it: [L, ...] for layer parameters.
    Float parameters come back as float32 numpy arrays, equal to load_params(...)[module][param]
    [index]. Each layer file is read with positioned reads of only the byte runs the slice
    covers (a run is widened over a gap only when one read call costs more than the gap; see
    ckpt0_arrays.CALL_COST).

    A QuantizedWeight8bit comes back as QuantizedWeight8bit(weight[index], scales[sidx]) of numpy
    arrays, where `sidx` is `index` on the leading dims (layers, experts) and on the last (output)
    dim, and on the scales' row-block dim R:
      - all R rows when the weight's input dim I is taken whole;
      - else the contiguous rows covering the selected input rows: from block first // (I/R) to
        block last // (I/R) inclusive (so slicing I at multiples of I/R gives a valid
        QuantizedWeight8bit whose rows j use scale row j // (I/R) as before; in general weight row
        j of the slice uses scale row (i_j // (I/R)) - (first // (I/R)), i_j its original row);
      - an int on I picks the one scale row of that input row (both dims are dropped).
    A negative step on I is refused.
    """
    pieces, stacked, quantized, shape, scales_shape = _plan_layout(plan_entry)
    dims = normalize_index(index, shape)
    if not quantized:
        return _read_stacked(pieces, stacked, None, dims, np.float32, call_cost)
    scales_dims = _scales_dims(dims, shape, scales_shape[-2])
    weight = _read_stacked(pieces, stacked, "weight", dims, np.int8, call_cost)
    scales = _read_stacked(pieces, stacked, "scales", scales_dims, SCALE_DTYPE, call_cost)
    return QuantizedWeight8bit(weight, scales)


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
