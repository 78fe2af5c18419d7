"""GGUF tensors -> the parameter tree, lazily, slice by slice from the memory-mapped file.

GGUF stores a matrix as rows of ne0 values (numpy shape [out, in], torch's Linear layout); ours
is [in, out], so matrices are read transposed. Types: F32 / F16 / BF16 are read as floats;
Q8_0 (blocks of 32 values along a row, one fp16 scale `d` then 32 int8 `qs`) is exactly a
QuantizedWeight8bit with R = in / 32 row blocks: int8 values as stored, fp16 scales kept fp16
(bf16 would round them), so weight * scale is the file's own dequantisation, bit for bit. The
embedding table in Q8_0 is a QuantizedEmbedding ([V, D] int8, scales [D/32, V]); a Q8_0 tensor
that feeds a parameter the model keeps float (the router) is dequantised to float32 (exact:
an int8 times an fp16 has at most 19 significant bits). Other types are refused by name.

llama.cpp's converter permutes the rows of q/k (LlamaModel.permute: each head's rows
[2, hd/2] -> [hd/2, 2], interleaving the halves for its RoPE); reading undoes it row by row.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple, Optional

import ml_dtypes
import numpy as np

from runtime.checkpoint.gguf_file import architecture, open_gguf
from runtime.checkpoint.lazy import BYTES_READ, LazyParam, normalize
from runtime.checkpoint.params_tree import format_shape, logical_shapes
from runtime.config import ModelConfig
from runtime.errors import CheckpointError, problem_report
from runtime.paths import EMBEDDINGS, STACKED, quantized_kind
from runtime.quant import QuantizedEmbedding, QuantizedWeight8bit

FLOATS = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16)}
Q8_BLOCK, Q8_BYTES = 32, 34  # values per Q8_0 block; bytes per block (fp16 d + 32 int8)
LATER = ("Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "Q5_0", "Q5_1", "Q8_K")


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


class Source:
    """One GGUF tensor as natural arrays [..., rows, cols] (its numpy layout; rows are output
    features), with the q/k row order undone; reads touch only the requested bytes."""

    def __init__(self, tensor, kind: str, rows_order: Optional[np.ndarray]):
        self.name, self.kind, self.order = tensor.name, kind, rows_order
        self.shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # numpy order
        data = tensor.data
        self.data = data.view(FLOATS["BF16"]) if kind == "BF16" else data

    def _rows(self, lead: tuple, rows: range, cols: slice) -> np.ndarray:
        """data[lead..., natural rows of HF rows `rows`, cols]."""
        if self.order is None:
            part = self.data[lead + (slice(rows.start, rows.stop), cols)]
        else:
            want = self.order[rows.start:rows.stop]
            low, high = int(want.min()), int(want.max()) + 1  # whole heads: one span
            part = self.data[lead + (slice(low, high), cols)][..., want - low, :]
        BYTES_READ.add(part.nbytes)
        return part

    def floats(self, lead: tuple, rows: range, cols: range) -> np.ndarray:
        """Values [..., rows, cols]: as stored for floats, float32 for Q8_0 (exact)."""
        if self.kind != "Q8_0":
            return np.asarray(self._rows(lead, rows, slice(cols.start, cols.stop)))
        values, scales, first = self.q8(lead, rows, cols)
        wide = values.astype(np.float32) * np.repeat(scales.astype(np.float32), Q8_BLOCK, -1)
        return wide[..., first:first + len(cols)]

    def q8(self, lead: tuple, rows: range, cols: range):
        """(int8 values [..., rows, whole blocks], fp16 scales [..., rows, blocks], offset of
        cols.start in the values) for the blocks that cols touch."""
        b0, b1 = cols.start // Q8_BLOCK, -(-cols.stop // Q8_BLOCK)
        raw = np.ascontiguousarray(self._rows(lead, rows, slice(b0 * Q8_BYTES, b1 * Q8_BYTES)))
        blocks = raw.reshape(*raw.shape[:-1], b1 - b0, Q8_BYTES)
        scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
        values = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
        return values.reshape(*raw.shape[:-1], -1), scales, cols.start - b0 * Q8_BLOCK


class Piece(NamedTuple):
    source: Source
    index: tuple  # stacked position: (), (layer,) or (layer, expert)
    layout: str


def _kind(tensor) -> str:
    return tensor.tensor_type.name


def _type_problem(tensor) -> Optional[str]:
    kind = _kind(tensor)
    if kind in FLOATS or kind == "Q8_0":
        return None
    later = " (int4 and K-quant GGUF types are a later step of issue 23)" if kind in LATER else ""
    return f"tensor {tensor.name}: GGML type {kind} is not supported; supported: F32, F16, " \
           f"BF16, Q8_0{later}"


def _rope_order(rule: Rule, shape: tuple, config: ModelConfig) -> Optional[np.ndarray]:
    if not rule.rope:
        return None
    heads = config.num_q_heads if rule.rope == "q" else config.num_kv_heads
    return rope_rows(shape[-2], heads) if shape[-2] % (2 * heads) == 0 else None


def _ours(shape: tuple, layout: str) -> tuple:
    return (*shape[:-2], shape[-1], shape[-2]) if layout == "matrix" else tuple(shape)


def _plan_tensor(tensor, config, shapes, plan, problems) -> None:
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
    if bad := _type_problem(tensor):
        problems.append(bad)
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


def _split(piece: Piece, ranges: tuple):
    """(lead index into the tensor, HF rows, cols) of our trailing ranges for one piece."""
    *lead, a, b = ranges
    lead = tuple(slice(r.start, r.stop) for r in lead)
    return (lead, b, a) if piece.layout == "matrix" else (lead, a, b)


def _assemble(full: tuple, dtype, pieces: list, part) -> LazyParam:
    """A LazyParam of shape `full` filled, for any slice, from the pieces it touches; `part`
    (piece, trailing ranges) -> that piece's block in our layout."""
    def read(index) -> np.ndarray:
        ranges = normalize(index, full)
        out = np.empty(tuple(len(r) for r in ranges), dtype)
        for piece in pieces:
            k = len(piece.index)
            if all(i in r for i, r in zip(piece.index, ranges)):
                where = tuple(i - r.start for i, r in zip(piece.index, ranges))
                out[where] = part(piece, ranges[k:])
        return out

    return LazyParam(full, np.dtype(dtype), read)


def _float_part(piece: Piece, ranges: tuple) -> np.ndarray:
    if piece.layout == "vector":  # norms: always a float type (checked in the plan)
        part = np.asarray(piece.source.data[ranges[0].start:ranges[0].stop])
        BYTES_READ.add(part.nbytes)
        return part
    lead, rows, cols = _split(piece, ranges)
    block = piece.source.floats(lead, rows, cols)
    return np.swapaxes(block, -1, -2) if piece.layout == "matrix" else block


def _q8_values(piece: Piece, ranges: tuple) -> np.ndarray:
    lead, rows, cols = _split(piece, ranges)
    values, _, first = piece.source.q8(lead, rows, cols)
    values = values[..., first:first + len(cols)]
    return np.swapaxes(values, -1, -2) if piece.layout == "matrix" else values


def _q8_scales(piece: Piece, ranges: tuple) -> np.ndarray:
    *lead, blocks, rows = ranges  # scales [..., R, out] (a table's: [R, V])
    cols = range(blocks.start * Q8_BLOCK, blocks.stop * Q8_BLOCK)
    _, scales, _ = piece.source.q8(tuple(slice(r.start, r.stop) for r in lead), rows, cols)
    return np.swapaxes(scales, -1, -2)


def _lazy(path: str, full: tuple, pieces: list, config: ModelConfig):
    kinds = {p.source.kind for p in pieces}
    target = quantized_kind(path, config) or ("embedding" if path == "/".join(EMBEDDINGS)
                                              else None)
    if kinds == {"Q8_0"} and target and full[-1 if target == "embedding" else -2] % Q8_BLOCK == 0:
        scales = (full[1] // Q8_BLOCK, full[0]) if target == "embedding" else \
            (*full[:-2], full[-2] // Q8_BLOCK, full[-1])
        kind = QuantizedEmbedding if target == "embedding" else QuantizedWeight8bit
        return kind(_assemble(full, np.int8, pieces, _q8_values),
                    _assemble(scales, np.float16, pieces, _q8_scales))
    dtype = FLOATS[kinds.pop()] if len(kinds) == 1 and kinds <= set(FLOATS) else np.float32
    return _assemble(full, dtype, pieces, _float_part)


def lazy_gguf(path: Path, config: ModelConfig) -> dict:
    """(module, param) -> LazyParam, or QuantizedWeight8bit / QuantizedEmbedding of them for
    Q8_0 weights; every check done on the tensor table."""
    shapes = logical_shapes(config)
    return {key: _lazy("/".join(key), shapes[key], pieces, config)
            for key, pieces in plan_gguf(Path(path), config).items()}
