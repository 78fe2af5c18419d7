"""GGUF tensors -> the parameter tree, lazily, slice by slice from the memory-mapped file.

GGUF stores a matrix as rows of ne0 values (numpy shape [out, in], torch's Linear layout); ours
is [in, out], so matrices are read transposed, and a quantised tensor's blocks run along our
input rows. F32 / F16 / BF16 are read as floats. Quantised types (gguf_quants.py) load as the
runtime's own quantised leaves, reading only the bytes of the blocks a slice touches: Q8_0,
Q5_0, Q6_K, and with mins Q5_1 and Q5_K, as QuantizedWeight8bit (R = in / 32, or in / 16 for
Q6_K), Q4_0, Q4_1, Q4_K as QuantizedWeight4bit in groups of 32 and Q3_K, Q2_K in groups of 16,
all bit for bit the file's own dequantisation. The embedding table is a QuantizedEmbedding ([V, D] int8, scales [D/group,
V], mins for the asymmetric types). A layer stack of mixed types (Q4_K_M files: Q6_K in
some layers) is one stack per type (layer_types.LayersByType) where the loader asks for it,
else int8 in the finest group present, exact too.
A quantised tensor that feeds a parameter the model keeps float (the router) is dequantised to
float32 as gguf-py does it. Other types are refused, naming a tensor and its type.

llama.cpp's converter permutes the rows of q/k (LlamaModel.permute: each head's rows
[2, hd/2] -> [hd/2, 2], interleaving the halves for its RoPE); reading undoes it row by row.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from runtime.checkpoint.gguf_file import ROPE_FREQS, architecture, open_gguf
from runtime.checkpoint.gguf_source import FLOATS, Source
from runtime.checkpoint.gguf_quants import TYPES
from runtime.checkpoint.lazy import BYTES_READ, LazyParam, host_empty, normalize
from runtime.checkpoint.params_tree import format_shape, logical_shapes
from runtime.config import ModelConfig
from runtime.errors import CheckpointError, problem_report
from runtime.layer_types import LayersByType
from runtime.paths import EMBEDDINGS, STACKED, quantized_kind
from runtime.quant import QuantizedEmbedding, QuantizedWeight8bit
from runtime.quant4 import QuantizedWeight4bit

SUPPORTED = ", ".join([*FLOATS, *TYPES])


class Rule(NamedTuple):
    pattern: str  # full match; (?P<layer>) and (?P<expert>) give the stacked position
    module: str
    param: str
    layout: str  # "vector", "matrix" ([out, in] -> [in, out]) or "table" ([V, D] as it is)
    rope: str = ""  # "q" / "k": rows permuted by the converter


_B = r"blk\.(?P<layer>\d+)\."
_A, _M = STACKED + "multi_head_attention/", STACKED
RULES = (
    Rule(r"token_embd\.weight", *EMBEDDINGS, "table"),
    Rule(r"output_norm\.weight", "language_model/rms_norm", "scale", "vector"),
    Rule(r"output\.weight", "language_model/unembed", "w", "matrix"),
    Rule(_B + r"attn_norm\.weight", _M + "rms_norm", "scale", "vector"),
    Rule(_B + r"ffn_norm\.weight", _M + "rms_norm_2", "scale", "vector"),
    Rule(_B + r"attn_q\.weight", _A + "query", "w", "matrix", "q"),
    Rule(_B + r"attn_k\.weight", _A + "key", "w", "matrix", "k"),
    Rule(_B + r"attn_v\.weight", _A + "value", "w", "matrix"),
    Rule(_B + r"attn_output\.weight", _A + "linear", "w", "matrix"),
    Rule(_B + r"ffn_gate\.weight", _M + "mlp/linear", "w", "matrix"),
    Rule(_B + r"ffn_up\.weight", _M + "mlp/linear_v", "w", "matrix"),
    Rule(_B + r"ffn_down\.weight", _M + "mlp/linear_1", "w", "matrix"),
    Rule(_B + r"ffn_gate_inp\.weight", _M + "router", "w", "matrix"),
    # experts stacked [E, out, in] (current converter), or one tensor per expert (older files)
    Rule(_B + r"ffn_gate_exps\.weight", _M + "moe/linear", "w", "matrix"),
    Rule(_B + r"ffn_up_exps\.weight", _M + "moe/linear_v", "w", "matrix"),
    Rule(_B + r"ffn_down_exps\.weight", _M + "moe/linear_1", "w", "matrix"),
    Rule(_B + r"ffn_gate\.(?P<expert>\d+)\.weight", _M + "moe/linear", "w", "matrix"),
    Rule(_B + r"ffn_up\.(?P<expert>\d+)\.weight", _M + "moe/linear_v", "w", "matrix"),
    Rule(_B + r"ffn_down\.(?P<expert>\d+)\.weight", _M + "moe/linear_1", "w", "matrix"),
)


def rope_rows(rows: int, heads: int) -> np.ndarray:
    """GGUF row of each Hugging Face row of a q/k weight: the inverse of the converter's
    permute(w, heads) = w.reshape(heads, 2, hd/2, in).swapaxes(1, 2): HF row h*hd + t*hd/2 + j
    is GGUF row h*hd + 2j + t."""
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(rows)


class Piece(NamedTuple):
    source: Source
    index: tuple  # stacked position: (), (layer,) or (layer, expert)
    layout: str


def _kind(tensor) -> str:
    return tensor.tensor_type.name


def _check_types(path: Path, tensors) -> None:
    """One line for every tensor of a type the reader cannot load: the first named, the
    others counted by type."""
    bad = [t for t in tensors if _kind(t) not in FLOATS and _kind(t) not in TYPES]
    if bad:
        counts = Counter(_kind(t) for t in bad[1:])
        more = f" (and {len(bad) - 1} more: " + ", ".join(
            f"{n} {k}" for k, n in counts.items()) + ")" if len(bad) > 1 else ""
        raise CheckpointError(f"{path}: tensor {bad[0].name} has GGML type {_kind(bad[0])}, "
                              f"which is not supported{more}; supported: {SUPPORTED}")


def _rope_order(rule: Rule, shape: tuple, config: ModelConfig) -> Optional[np.ndarray]:
    if not rule.rope:
        return None
    heads = config.num_q_heads if rule.rope == "q" else config.num_kv_heads
    return rope_rows(shape[-2], heads) if shape[-2] % (2 * heads) == 0 else None


def _ours(shape: tuple, layout: str) -> tuple:
    return (*shape[:-2], shape[-1], shape[-2]) if layout == "matrix" else tuple(shape)


def _plan_tensor(tensor, config, shapes, plan, problems) -> None:
    if tensor.name == ROPE_FREQS:  # not a parameter: the config's rope_freq_factors
        return
    rules = [(r, m) for r in RULES if (m := re.fullmatch(r.pattern, tensor.name))]
    if not rules:
        problems.append(f"tensor {tensor.name}: no parameter of the model takes it")
        return
    rule, match = rules[0]
    key = (rule.module, rule.param)
    if key not in shapes:
        problems.append(f"tensor {tensor.name}: maps to {'/'.join(key)}, which this config "
                        f"does not have")
        return
    if rule.layout == "vector" and _kind(tensor) not in FLOATS:
        problems.append(f"tensor {tensor.name}: a norm stored as {_kind(tensor)}; expected "
                        f"F32, F16 or BF16")
        return
    groups = match.groupdict()
    index = tuple(int(groups[g]) for g in ("layer", "expert") if groups.get(g))
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    full = shapes[key]
    if any(i >= n for i, n in zip(index, full)) or _ours(shape, rule.layout) != full[len(index):]:
        problems.append(f"tensor {tensor.name}: {format_shape(shape)} at {list(index)} does not "
                        f"fit {'/'.join(key)} {format_shape(full)}")
        return
    source = Source(tensor, _kind(tensor), _rope_order(rule, shape, config))
    plan[key].append(Piece(source, index, rule.layout))


def _depth(module: str) -> int:
    return 0 if not module.startswith(STACKED) else 2 if module.startswith(STACKED + "moe/") \
        else 1


def plan_gguf(path: Path, config: ModelConfig) -> dict:
    """(module, param) -> [Piece]: every tensor placed and every parameter filled exactly
    once, checked on the tensor table before any data is read; all problems together."""
    reader = open_gguf(path)
    architecture(reader)
    shapes = logical_shapes(config)
    plan: dict = {key: [] for key in shapes}
    problems: list[str] = []
    _check_types(path, reader.tensors)
    for tensor in reader.tensors:
        _plan_tensor(tensor, config, shapes, plan, problems)
    for key, pieces in plan.items():
        depth = _depth(key[0])
        covered = np.zeros(shapes[key][:depth], dtype=np.int64)
        for piece in pieces:  # a stacked-experts tensor covers all experts of its layer
            covered[piece.index] += 1
        if (covered == 0).any():
            problems.append(f"{'/'.join(key)}: not filled ({int((covered == 0).sum())} of "
                            f"{covered.size} slices missing)")
        if (covered > 1).any():
            problems.append(f"{'/'.join(key)}: filled more than once (duplicate tensors)")
    if problems:
        raise problem_report(f"{path} does not match the model config", problems,
                             CheckpointError)
    return plan


def _natural(piece: Piece, ranges: tuple, values: bool = True):
    """(lead slices, natural rows, elements along the row) of our trailing ranges for one
    piece: a values layout is [..., I, O] (matrix) or [V, D] (table), a scales layout
    [..., R, O] or [R, V] (the elements are then the R)."""
    *lead, a, b = ranges
    lead = tuple(slice(r.start, r.stop) for r in lead)
    return (lead, a, b) if values and piece.layout != "matrix" else (lead, b, a)


def _transposed(piece: Piece, values: bool = True) -> bool:
    """Whether a natural block [..., rows, elements] is transposed in our layout (_natural's
    inverse)."""
    return not (values and piece.layout != "matrix")


def _oriented(block: np.ndarray, piece: Piece, values: bool = True) -> np.ndarray:
    """A natural block [..., rows, elements] in our layout."""
    return np.swapaxes(block, -1, -2) if _transposed(piece, values) else block


def _assemble(full: tuple, dtype, pieces: list, part) -> LazyParam:
    """A LazyParam of shape `full` filled, for any slice, from the pieces it touches; `part`
    (piece, trailing ranges, out) writes that piece's block in our layout into out."""
    def read(index) -> np.ndarray:
        ranges = normalize(index, full)
        out = host_empty(tuple(len(r) for r in ranges), dtype)
        for piece in pieces if out.size else ():
            k = len(piece.index)
            if all(i in r for i, r in zip(piece.index, ranges)):
                where = tuple(i - r.start for i, r in zip(piece.index, ranges))
                part(piece, ranges[k:], out[where])
        return out

    return LazyParam(full, np.dtype(dtype), read)


def _float_part(piece: Piece, ranges: tuple, out: np.ndarray) -> None:
    if piece.layout == "vector":  # norms: always a float type (checked in the plan)
        part = np.asarray(piece.source.data[ranges[0].start:ranges[0].stop])
        BYTES_READ.add(part.nbytes)
        out[...] = part
        return
    piece.source.floats(*_natural(piece, ranges), out, _transposed(piece))


def _block_part(name: str, values: bool):
    """part(piece, ranges, out) of _assemble reading the blocks' part `name` as stored."""
    def part(piece: Piece, ranges: tuple, out: np.ndarray) -> None:
        piece.source.part(name, *_natural(piece, ranges, values), out, _transposed(piece, values))
    return part


def _groups(elems: range, per: int) -> range:
    return range(elems.start // per, -(-elems.stop // per))


def _int8_values(piece: Piece, ranges: tuple, out: np.ndarray) -> None:
    """part() of an int8 leaf's values: a piece's int8 values as stored."""
    piece.source.part("values", *_natural(piece, ranges), out, _transposed(piece))


def _int8_groupwise(name: str, group: int, dtype):
    """part() of an int8 leaf's scales or mins (`name`) in groups of `group`: a piece's own,
    each repeated for the groups it spans (Q8_0's 32 values as two groups of 16 beside Q6_K);
    zeros for the mins of a piece that has none."""
    def part(piece: Piece, ranges: tuple, out: np.ndarray) -> None:
        lead, rows, groups = _natural(piece, ranges, values=False)
        kind = piece.source.type
        if name not in kind.parts:
            out[...] = 0
            return
        repeat = kind.group // group
        own = _groups(groups, repeat)
        values = np.repeat(piece.source.part(name, lead, rows, own), repeat, axis=-1)
        first = groups.start - own.start * repeat
        out[...] = _oriented(values[..., first:first + len(groups)].astype(dtype), piece, False)
    return part


def _one_dtype(types: list, name: str):
    """The dtype of the types' `name` parts where they share one, else float32."""
    dtypes = {t.parts[name].dtype for t in types if name in t.parts}
    return dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)


def leaf_layout(types: list, table: bool) -> tuple:
    """(int4 or int8, rows per scale, scales' dtype, mins' dtype or None) of a leaf of these
    types (module docstring of gguf_quants): int4 for one int4 type's matrices; else int8 in
    the finest group of the types present, with mins where one has them (int8_mins.py)."""
    if len(types) == 1 and (kind := types[0]).loads_as == "int4" and not table:
        return ("int4", kind.group, kind.parts["scales"].dtype,
                kind.parts["mins"].dtype if "mins" in kind.parts else None)
    mins = _one_dtype(types, "mins") if any("mins" in t.parts for t in types) else None
    return "int8", min(t.group for t in types), _one_dtype(types, "scales"), mins


def _quantized_leaf(full: tuple, pieces: list, table: bool):
    """The int4 or int8 leaf of quantised pieces as leaf_layout says: exact, the file's own
    values."""
    types = list({p.source.kind: p.source.type for p in pieces}.values())
    fmt, group, dtype, mins_dtype = leaf_layout(types, table)
    if fmt == "int4":
        scales = (*full[:-2], full[-2] // group, full[-1])
        mins = None if mins_dtype is None else \
            _assemble(scales, mins_dtype, pieces, _block_part("mins", False))
        return QuantizedWeight4bit(
            _assemble((*full[:-2], full[-2] // 2, full[-1]), np.uint8, pieces,
                      _block_part("packed", True)),
            _assemble(scales, dtype, pieces, _block_part("scales", False)), mins)
    scales = (full[1] // group, full[0]) if table else (*full[:-2], full[-2] // group, full[-1])
    mins = None if mins_dtype is None else \
        _assemble(scales, mins_dtype, pieces, _int8_groupwise("mins", group, mins_dtype))
    return (QuantizedEmbedding if table else QuantizedWeight8bit)(
        _assemble(full, np.int8, pieces, _int8_values),
        _assemble(scales, dtype, pieces, _int8_groupwise("scales", group, dtype)), mins)


def _target(path: str, config: ModelConfig) -> Optional[str]:
    return quantized_kind(path, config) or ("embedding" if path == "/".join(EMBEDDINGS)
                                            else None)


def _by_type(full: tuple, pieces: list) -> LayersByType:
    """A layer stack ([L, I, O], experts [L, E, I, O]) of several quantised types, one a layer,
    as one stack per type (sorted by name), each as _quantized_leaf makes it, and the type of
    each layer."""
    names = sorted({p.source.kind for p in pieces})
    kinds = [0] * full[0]
    for piece in pieces:
        kinds[piece.index[0]] = names.index(piece.source.kind)
    layers = [[layer for layer, k in enumerate(kinds) if k == kind] for kind in range(len(names))]
    return LayersByType([_quantized_leaf(
        (len(layers[kind]), *full[1:]),
        [Piece(p.source, (layers[kind].index(p.index[0]), *p.index[1:]), p.layout)
         for p in pieces
         if p.source.kind == name], False) for kind, name in enumerate(names)], kinds)


def _typed(path: str, full: tuple, pieces: list, config: ModelConfig) -> bool:
    """Whether a quantised leaf is a layer stack ([L, I, O], experts [L, E, I, O]) of types
    that load in different forms (int4 and int8, groups, scale dtypes, int4 with mins or
    without), one type a layer: one stack per type (_by_type). Int8 types of one group and
    scale dtype (Q5_0 and Q8_0; Q5_1 beside them, with its mins zero in their layers) make one
    int8 stack of their bytes."""
    if _target(path, config) != "weight" or len(full) not in (3, 4) \
            or not path.startswith(STACKED) or any(p.source.type is None for p in pieces):
        return False
    forms = {(t.loads_as, t.group, t.parts["scales"].dtype,
              t.loads_as == "int4" and "mins" in t.parts)
             for t in {p.source.kind: p.source.type for p in pieces}.values()}
    return len(forms) > 1 and len({(p.index[0], p.source.kind) for p in pieces}) == full[0]


def _lazy(path: str, full: tuple, pieces: list, config: ModelConfig, by_type: bool):
    kinds = {p.source.kind for p in pieces}
    target = _target(path, config)
    if target and all(kind in TYPES for kind in kinds):
        if by_type:
            return _by_type(full, pieces)
        return _quantized_leaf(full, pieces, target == "embedding")
    dtype = FLOATS[kinds.pop()] if len(kinds) == 1 and kinds <= set(FLOATS) else np.float32
    return _assemble(full, dtype, pieces, _float_part)


def lazy_gguf(path: Path, config: ModelConfig, layer_types: bool = False) -> dict:
    """(module, param) -> LazyParam, or QuantizedWeight8bit / QuantizedEmbedding /
    QuantizedWeight4bit of them for quantised tensors; every check done on the tensor table.
    layer_types: a layer stack of several types as a LayersByType of one stack per type
    (layer_types.py), else one int8 stack. Every type loads exactly (gguf_quants.py)."""
    shapes = logical_shapes(config)
    plan = plan_gguf(Path(path), config)
    return {key: _lazy("/".join(key), shapes[key], pieces, config,
                       layer_types and _typed("/".join(key), shapes[key], pieces, config))
            for key, pieces in plan.items()}


def weight_format(path: Path) -> str:
    """The planner's weight format of a GGUF file: that of the bulk of its tensor bytes
    (int8 for the types gguf_quants loads as int8, int4 for Q4_0 / Q4_1 / Q4_K,
    float32 for F32, bfloat16 for the 2-byte floats); header only."""
    totals: dict = {}
    for tensor in open_gguf(path).tensors:
        kind = _kind(tensor)
        if kind in TYPES or kind in FLOATS:  # others: refused when the weights are read
            fmt = ("int4" if TYPES[kind].loads_as == "int4" else "int8") if kind in TYPES \
                else "float32" if kind == "F32" else "bfloat16"
            totals[fmt] = totals.get(fmt, 0) + int(tensor.n_bytes)
    return max(totals, key=totals.get) if totals else "float32"


def stored_tables(path: Path, config: ModelConfig) -> tuple:
    """((parameter path, (int8 or int4, rows per scale, scales' dtype name, mins' dtype name or
    None, a table)), ...): how each parameter the loader holds quantised loads (_lazy,
    leaf_layout), for the memory plan. Header only."""
    tables = {}
    for name, table, ((_, kinds),) in stored_stacks(path, config, layer_types=False):
        fmt, group, dtype, mins = leaf_layout([TYPES[kind] for kind in kinds], table)
        tables[name] = (fmt, group, dtype.name, None if mins is None else mins.name, table)
    return tuple(sorted(tables.items()))


def stored_stacks(path: Path, config: ModelConfig, layer_types: bool) -> tuple:
    """((parameter path, a table, ((shape, type names), ...)), ...): each parameter the loader
    holds quantised, as the stacks it loads (lazy_gguf): with `layer_types` one per type of a
    stack of several (_typed: [L_k, ...] each), else one of all its types. Header only."""
    shapes, out = logical_shapes(config), []
    for key, pieces in plan_gguf(path, config).items():
        name, kinds, full = "/".join(key), {piece.source.kind for piece in pieces}, shapes[key]
        target = _target(name, config)
        if not target or not kinds <= TYPES.keys():
            continue
        if layer_types and _typed(name, full, pieces, config):
            layers = {kind: len({p.index[0] for p in pieces if p.source.kind == kind})
                      for kind in kinds}
            stacks = tuple(((layers[kind], *full[1:]), (kind,)) for kind in sorted(kinds))
        else:
            stacks = ((tuple(full), tuple(sorted(kinds))),)
        out.append((name, target == "embedding", stacks))
    return tuple(out)
