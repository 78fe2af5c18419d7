"""Hugging Face checkpoints (Llama 2/3, Mistral, Mixtral, Mamba-2): their safetensors shards
(their config.json: hf_config.py).

`lazy_hf` maps the parameter tree onto the safetensors
shards through `HF_RULES` (or `MAMBA2_RULES`), a declarative table from tensor names to our
parameter paths with a named transform each. Every tensor must match one
rule and every parameter must be filled; shapes are checked against the abstract parameter tree
from the file headers before any data is read; all problems are reported together.

Tensors are read lazily (memory-mapped) and each parameter is assembled, optionally quantised
and handed to `place` (e.g. put on its devices) before the next one is read, so host memory
holds about one stacked parameter at a time, never the whole checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from runtime.checkpoint.lazy import (BYTES_READ, LazyParam, as_slices, copy_transposed,
                                     host_empty, normalize)
from runtime.checkpoint.params_tree import format_shape, logical_shapes
from runtime.checkpoint.safetensors_io import NAMES, SafetensorsFile
from runtime.config import ModelConfig
from runtime.errors import CheckpointError, problem_report
from runtime.paths import MAMBA_STACKED, STACKED

LAYER = STACKED
MAMBA_LAYER = MAMBA_STACKED

# ---------------------------------------------------------------------------------------------
# tensor names -> parameter paths

def _transpose(a):  # HF Linear stores [out, in]; ours is [in, out]
    return np.swapaxes(a, -1, -2)


def _first_half_transposed(a):  # fused gate_up_proj [E, 2F, D]: gate rows first
    return _transpose(a[..., :a.shape[-2] // 2, :])


def _second_half_transposed(a):
    return _transpose(a[..., a.shape[-2] // 2:, :])


def _halve_rows_then_transpose(shape):
    return (*shape[:-2], shape[-1], shape[-2] // 2)


TRANSFORMS = {  # name -> (array function, source shape -> result shape)
    "copy": (lambda a: a, lambda s: tuple(s)),
    "transpose": (_transpose, lambda s: (*s[:-2], s[-1], s[-2])),
    "gate_half": (_first_half_transposed, _halve_rows_then_transpose),
    "up_half": (_second_half_transposed, _halve_rows_then_transpose),
}


class Rule(NamedTuple):
    pattern: str  # full-match regex; (?P<layer>) and (?P<expert>) pick the stacked position
    module: str
    param: str
    transform: str


_L = r"model\.layers\.(?P<layer>\d+)\."
HF_RULES = (
    Rule(r"model\.embed_tokens\.weight", "language_model/in_out_embed", "embeddings", "copy"),
    Rule(r"model\.norm\.weight", "language_model/rms_norm", "scale", "copy"),
    Rule(r"lm_head\.weight", "language_model/unembed", "w", "transpose"),
    Rule(_L + r"self_attn\.q_proj\.weight", LAYER + "multi_head_attention/query", "w", "transpose"),
    Rule(_L + r"self_attn\.k_proj\.weight", LAYER + "multi_head_attention/key", "w", "transpose"),
    Rule(_L + r"self_attn\.v_proj\.weight", LAYER + "multi_head_attention/value", "w", "transpose"),
    Rule(_L + r"self_attn\.o_proj\.weight", LAYER + "multi_head_attention/linear", "w",
         "transpose"),
    Rule(_L + r"input_layernorm\.weight", LAYER + "rms_norm", "scale", "copy"),
    Rule(_L + r"post_attention_layernorm\.weight", LAYER + "rms_norm_2", "scale", "copy"),
    # dense FFN (Llama, Mistral)
    Rule(_L + r"mlp\.gate_proj\.weight", LAYER + "mlp/linear", "w", "transpose"),
    Rule(_L + r"mlp\.up_proj\.weight", LAYER + "mlp/linear_v", "w", "transpose"),
    Rule(_L + r"mlp\.down_proj\.weight", LAYER + "mlp/linear_1", "w", "transpose"),
    # Mixtral, one tensor per expert (the layout of the released checkpoints)
    Rule(_L + r"block_sparse_moe\.gate\.weight", LAYER + "router", "w", "transpose"),
    Rule(_L + r"block_sparse_moe\.experts\.(?P<expert>\d+)\.w1\.weight", LAYER + "moe/linear",
         "w", "transpose"),
    Rule(_L + r"block_sparse_moe\.experts\.(?P<expert>\d+)\.w3\.weight", LAYER + "moe/linear_v",
         "w", "transpose"),
    Rule(_L + r"block_sparse_moe\.experts\.(?P<expert>\d+)\.w2\.weight", LAYER + "moe/linear_1",
         "w", "transpose"),
    # Mixtral, fused experts (transformers >= 5 in memory): gate_up_proj [E, 2F, D] holds the
    # gate rows then the up rows; down_proj [E, D, F]
    Rule(_L + r"mlp\.gate\.weight", LAYER + "router", "w", "transpose"),
    Rule(_L + r"mlp\.experts\.gate_up_proj", LAYER + "moe/linear", "w", "gate_half"),
    Rule(_L + r"mlp\.experts\.gate_up_proj", LAYER + "moe/linear_v", "w", "up_half"),
    Rule(_L + r"mlp\.experts\.down_proj", LAYER + "moe/linear_1", "w", "transpose"),
)
# Mamba2ForCausalLM: in_proj [2I + 2GN + H, D] holds the z, x, B, C, dt rows in that order, and
# the depthwise conv1d [I + 2GN, 1, W] (and its bias) the x, B, C channels: row-slicing
# transforms (see mamba2_transforms) give each part its own parameter.
_M = r"backbone\.layers\.(?P<layer>\d+)\.mixer\."
MAMBA2_RULES = (
    Rule(r"backbone\.embeddings?\.weight", "language_model/in_out_embed", "embeddings", "copy"),
    Rule(r"backbone\.norm_f\.weight", "language_model/rms_norm", "scale", "copy"),
    Rule(r"lm_head\.weight", "language_model/unembed", "w", "transpose"),
    Rule(r"backbone\.layers\.(?P<layer>\d+)\.norm\.weight", MAMBA_LAYER + "rms_norm", "scale",
         "copy"),
    *(Rule(_M + r"in_proj\.weight", MAMBA_LAYER + f"mixer/in_proj_{part}", "w", f"in_proj_{part}")
      for part in ("z", "x", "b", "c", "dt")),
    *(Rule(_M + r"conv1d\.weight", MAMBA_LAYER + f"mixer/conv_{part}", "w", f"conv_{part}")
      for part in ("x", "b", "c")),
    *(Rule(_M + r"conv1d\.bias", MAMBA_LAYER + f"mixer/conv_{part}", "b", f"conv_bias_{part}")
      for part in ("x", "b", "c")),
    Rule(_M + r"dt_bias", MAMBA_LAYER + "mixer", "dt_bias", "copy"),
    Rule(_M + r"A_log", MAMBA_LAYER + "mixer", "a_log", "copy"),
    Rule(_M + r"D", MAMBA_LAYER + "mixer", "d", "copy"),
    Rule(_M + r"norm\.weight", MAMBA_LAYER + "mixer/gated_rms_norm", "scale", "copy"),
    Rule(_M + r"out_proj\.weight", MAMBA_LAYER + "mixer/out_proj", "w", "transpose"),
)
IGNORED = (r".*rotary_emb\.inv_freq",)  # buffers some exporters save; recomputed from config


def mamba2_transforms(config: ModelConfig) -> dict:
    """The Mamba-2 row slices of in_proj and conv1d for this config's sizes (a source of any
    other size is passed through whole, so that its shape is reported as not matching)."""
    inner = config.ssm_heads * config.ssm_head_dim
    bc = config.ssm_groups * config.ssm_state_size
    in_proj = dict(z=(0, inner), x=(inner, 2 * inner), b=(2 * inner, 2 * inner + bc),
                   c=(2 * inner + bc, 2 * inner + 2 * bc),
                   dt=(2 * inner + 2 * bc, 2 * inner + 2 * bc + config.ssm_heads))
    conv = dict(x=(0, inner), b=(inner, inner + bc), c=(inner + bc, inner + 2 * bc))
    rows, channels = 2 * inner + 2 * bc + config.ssm_heads, inner + 2 * bc
    table = {}
    for part, (start, stop) in in_proj.items():  # [rows, D] -> [D, stop - start]
        table[f"in_proj_{part}"] = (
            lambda a, start=start, stop=stop: _transpose(a[start:stop]),
            lambda s, n=stop - start: (s[1], n) if len(s) == 2 and s[0] == rows
            else (*s[:-2], s[-1], s[-2]))
    for part, (start, stop) in conv.items():  # [channels, 1, W] -> [W, stop - start]
        table[f"conv_{part}"] = (
            lambda a, start=start, stop=stop: _transpose(a[start:stop, 0, :]),
            lambda s, n=stop - start: (s[2], n) if len(s) == 3 and s[:2] == (channels, 1)
            else tuple(s))
        table[f"conv_bias_{part}"] = (
            lambda a, start=start, stop=stop: a[start:stop],
            lambda s, n=stop - start: (n,) if tuple(s) == (channels,) else tuple(s))
    return table


def transforms_for(config: ModelConfig) -> dict:
    return {**TRANSFORMS, **mamba2_transforms(config)} if config.architecture == "mamba2" \
        else TRANSFORMS


def rules_for(config: ModelConfig) -> tuple:
    return MAMBA2_RULES if config.architecture == "mamba2" else HF_RULES


class Piece(NamedTuple):
    file: SafetensorsFile
    name: str
    transform: str
    index: tuple  # position in the stacked parameter: (), (layer,) or (layer, expert)


FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")  # what a float parameter may be stored as


def _shards(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({directory / name for name in _weight_map_files(index)})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} holds no *.safetensors files")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{missing[0]}: listed in the index but missing")
    return files


def _weight_map_files(index: Path) -> set[str]:
    """The shard file names an index's weight_map names: plain file names inside the folder
    (a path that leaves it, absolute or through "..", is refused)."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{index} is not a safetensors index (no weight_map)") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {index}: {e.strerror}") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: weight_map is a {type(weight_map).__name__}, not an "
                              f"object of tensor name -> file name")
    names = set()
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name or Path(name).is_absolute() \
                or ".." in Path(name).parts or "\\" in name:
            raise CheckpointError(f"{index}: weight_map[{tensor!r}] = {name!r} is not a file "
                                  f"name inside the checkpoint folder")
        names.add(name)
    return names


def _stack_depth(module: str, param: str) -> int:
    """Leading stacked axes of a parameter: layers, and experts for the MoE weights."""
    if module.startswith(MAMBA_LAYER):
        return 1
    if not module.startswith(LAYER):
        return 0
    return 2 if module.startswith(LAYER + "moe/") else 1


LAYER_INDEX = re.compile(r"(?:model|backbone)\.layers\.(\d+)\.")


def _check_layer_count(directory: Path, files: list, config: ModelConfig) -> None:
    """num_hidden_layers against the layers the shards hold, before anything is allocated per
    layer (a config.json claiming 10^9 layers)."""
    layers = {int(m.group(1)) for f in files for name in f.keys()
              if (m := LAYER_INDEX.match(name))}
    if config.num_layers > len(layers):
        raise CheckpointError(f"{directory}: config num_layers {config.num_layers}, but its "
                              f"safetensors hold {len(layers)} layers")


def plan_hf(directory: Path, config: ModelConfig) -> dict:
    """(module, param) -> [Piece]: where every parameter comes from, all checked on headers."""
    files = [SafetensorsFile(path) for path in _shards(Path(directory))]
    _check_layer_count(directory, files, config)
    shapes = logical_shapes(config)
    rules_table, transforms = rules_for(config), transforms_for(config)
    plan: dict = {key: [] for key in shapes}
    problems = []
    for f in files:
        for name in f.keys():
            if any(re.fullmatch(p, name) for p in IGNORED):
                continue
            if name == "lm_head.weight" and config.tie_embeddings:
                continue  # some exporters save the tied head too
            rules = [(r, m) for r in rules_table if (m := re.fullmatch(r.pattern, name))]
            if not rules:
                problems.append(f"{name} ({f.path.name}): no parameter of the model takes it")
                continue
            for rule, match in rules:
                key = (rule.module, rule.param)
                if key not in shapes:
                    problems.append(f"{name}: maps to {rule.module}/{rule.param}, which this "
                                    f"config does not have")
                    continue
                groups = match.groupdict()
                index = tuple(int(groups[g]) for g in ("layer", "expert") if groups.get(g))
                depth = _stack_depth(*key)
                full = shapes[key]
                want = full[len(index):]
                got = transforms[rule.transform][1](tuple(f.shape(name)))
                if any(i >= n for i, n in zip(index, full)):
                    problems.append(f"{name}: index {list(index)} beyond {format_shape(full)} of "
                                    f"{rule.module}/{rule.param}")
                elif tuple(got) != tuple(want) or len(index) > depth:
                    problems.append(f"{name} ({f.path.name}): {format_shape(f.shape(name))} gives "
                                    f"{format_shape(got)}, {rule.module}/{rule.param} needs "
                                    f"{format_shape(want)}")
                elif NAMES[f.dtype(name)] not in FLOAT_DTYPES:
                    problems.append(f"{name} ({f.path.name}): stored as {NAMES[f.dtype(name)]}, "
                                    f"{rule.module}/{rule.param} needs a float type "
                                    f"({', '.join(FLOAT_DTYPES)})")
                else:
                    plan[key].append(Piece(f, name, rule.transform, index))
    for key, pieces in plan.items():
        depth = _stack_depth(*key)
        full = shapes[key]
        covered = np.zeros(full[:depth], dtype=np.int32)
        for piece in pieces:
            covered[piece.index] += 1
        where = "/".join(key)
        if (covered == 0).any():
            first = tuple(int(i) for i in np.argwhere(covered == 0)[0])
            problems.append(f"{where}: not filled ({int((covered == 0).sum())} of "
                            f"{covered.size} slices missing, first at {list(first)})")
        if (covered > 1).any():
            problems.append(f"{where}: filled more than once (duplicate tensors)")
    if problems:
        raise problem_report(f"checkpoint {directory} does not match the model config",
                             problems, CheckpointError)
    return plan


def _lazy_param(full: tuple, pieces: list, transforms: dict = TRANSFORMS) -> LazyParam:
    """Any slice of one stacked parameter, assembled from the pieces it touches."""
    dtypes = {p.file.dtype(p.name) for p in pieces}
    dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)

    def read(index) -> np.ndarray:
        ranges = normalize(index, full)
        out = host_empty(tuple(len(r) for r in ranges), dtype)
        for piece in pieces:
            k = len(piece.index)
            if not all(i in r for i, r in zip(piece.index, ranges)):
                continue
            where = tuple(i - r.start for i, r in zip(piece.index, ranges))
            view = transforms[piece.transform][0](piece.file.get(piece.name))  # no copy yet
            part = view[as_slices(ranges[k:])]  # the memory map reads only these bytes
            natural = np.swapaxes(part, -1, -2) if part.ndim >= 2 else part
            if part.strides[-1] != part.itemsize and natural.strides[-1] == part.itemsize:
                copy_transposed(out[where], natural)  # [out, in] rows, read in file order
            else:
                out[where] = part
            BYTES_READ.add(part.nbytes)
        return out

    return LazyParam(full, dtype, read)


def lazy_hf(directory: Path, config: ModelConfig) -> dict:
    """(module, param) -> LazyParam, every check done on the headers."""
    shapes, transforms = logical_shapes(config), transforms_for(config)
    return {key: _lazy_param(shapes[key], pieces, transforms)
            for key, pieces in plan_hf(Path(directory), config).items()}


def stored_float_format(directory: Path) -> str:
    """The planner's weight format of a Hugging Face checkpoint's floats: bfloat16 when the
    bulk of its tensor bytes are 2-byte floats (bf16, f16), else float32; headers only."""
    totals = {"bfloat16": 0, "float32": 0}
    for path in _shards(Path(directory)):
        f = SafetensorsFile(path)
        for name in f.keys():
            dtype = np.dtype(f.dtype(name))
            two_byte = dtype in (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
            totals["bfloat16" if two_byte else "float32"] += \
                dtype.itemsize * int(np.prod(f.shape(name)))
    return max(totals, key=totals.get)
