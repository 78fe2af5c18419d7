"""Palm checkpoints (github SrijanSriv211/Palm): one `torch.save` file (`s1000.bin`) of
{"model": state_dict, "optimizers": [...], "hyperparams": {...}, "device", "stats"}, read with
torch_zip.py (no torch, nothing executed). Only "model" is read, and only as each parameter is
placed; "optimizers" and "stats" stay unread references. The config comes from "hyperparams".

Tensor names (an `_orig_mod.` prefix from torch.compile is dropped) -> parameter paths (see
models/palm.py), torch's linear weights [out, in] transposed to our [in, out]:
  embed.0.weight [V, R]        -> in_out_embed/embeddings [V, R]
  embed.1.w1 [D, R]            -> embed_proj/w [R, D]
  blocks.{i}.qkv.w1 [R, D]     -> palm/layers/aod_block/qkv_in/w [i, D, R]
  blocks.{i}.qkv.w2 [3Q, R]    -> .../query, key, value/w [i, R, Q] (rows in that order)
  blocks.{i}.c_proj.w1 [R, Q]  -> .../proj_in/w [i, Q, R]
  blocks.{i}.c_proj.w2 [2D, R] -> .../proj_u, proj_g/w [i, R, D] (u first, the gate second)
  unembed.w1 [R, D]            -> unembed_in/w [D, R]
  unembed.w2 [V, R]            -> unembed/w [R, V]
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np

from runtime.checkpoint.lazy import LazyParam, as_slices, normalize
from runtime.checkpoint.params_tree import FLOAT_DTYPES, logical_shapes, tree_problems
from runtime.checkpoint.torch_zip import TensorRef, load_torch_zip
from runtime.config import ModelConfig
from runtime.errors import CheckpointError, ConfigError, problem_report
from runtime.paths import PALM_STACKED, ROOT

HYPERPARAMS = ("vocab_size", "block_size", "n_layer", "d_layer", "n_head", "n_embd", "d_rank",
               "d_qkv")
PREFIX = "_orig_mod."  # what torch.compile puts before every name
# Palm's rotary: angular frequencies from 1 down to 1/1024 (its Rotary module)
ROTARY_BASE = 1024.0
# torch's F.rms_norm without eps uses the machine epsilon of its input: float32's here
NORM_EPS = float(np.finfo(np.float32).eps)


class Part(NamedTuple):
    """Our parameter (module, param) [layer, in, out] (or [in, out], or as stored) is fed by
    rows [first, first + count) of a torch tensor, transposed (or taken as it is)."""
    module: str
    param: str
    first: int  # in multiples of count (the part's index along the torch rows)
    transpose: bool = True


def _table(c: ModelConfig) -> dict[str, tuple[list[int], list[Part]]]:
    """Torch name (`{i}` for the block) -> (its expected shape, the parts it fills)."""
    v, d, r, q = c.vocab_size, c.emb_size, c.low_rank, c.num_q_heads * c.key_size
    block = PALM_STACKED
    return {
        "embed.0.weight": ([v, r], [Part(f"{ROOT}/in_out_embed", "embeddings", 0, False)]),
        "embed.1.w1": ([d, r], [Part(f"{ROOT}/embed_proj", "w", 0)]),
        "blocks.{i}.qkv.w1": ([r, d], [Part(block + "qkv_in", "w", 0)]),
        "blocks.{i}.qkv.w2": ([3 * q, r], [Part(block + name, "w", j) for j, name in
                                           enumerate(("query", "key", "value"))]),
        "blocks.{i}.c_proj.w1": ([r, q], [Part(block + "proj_in", "w", 0)]),
        "blocks.{i}.c_proj.w2": ([2 * d, r], [Part(block + "proj_u", "w", 0),
                                              Part(block + "proj_g", "w", 1)]),
        "unembed.w1": ([r, d], [Part(f"{ROOT}/unembed_in", "w", 0)]),
        "unembed.w2": ([v, r], [Part(f"{ROOT}/unembed", "w", 0)]),
    }


def read_palm_file(path: Path) -> tuple[dict, dict]:
    """(hyperparams, state dict {name without the compile prefix: TensorRef}) of a Palm file,
    its structure checked; one CheckpointError naming the file otherwise."""
    top = load_torch_zip(path)
    if not isinstance(top, dict) or not {"model", "hyperparams"} <= set(top):
        found = sorted(map(str, top))[:8] if isinstance(top, dict) else type(top).__name__
        raise CheckpointError(f"{path} is a torch.save file but not a Palm checkpoint: "
                              f"expected a dict with 'model' and 'hyperparams', got {found}")
    model, hyper = top["model"], top["hyperparams"]
    if not isinstance(model, dict) or not isinstance(hyper, dict):
        raise CheckpointError(f"{path}: 'model' and 'hyperparams' must be dicts")
    state: dict = {}
    for name, ref in model.items():
        if not isinstance(name, str) or not isinstance(ref, TensorRef):
            raise CheckpointError(f"{path}: model entry {name!r:.60} is not a named tensor")
        plain = name[len(PREFIX):] if name.startswith(PREFIX) else name
        if plain in state:
            raise CheckpointError(f"{path}: tensor {plain} given twice (with and without "
                                  f"{PREFIX!r})")
        state[plain] = ref
    return hyper, state


def palm_config(path: Path) -> ModelConfig:
    """The ModelConfig of a Palm checkpoint, from its "hyperparams" (the model's Config)."""
    hyper, _ = read_palm_file(path)
    return config_from_hyperparams(hyper, f"{path}: hyperparams")


def config_from_hyperparams(hyper: Mapping, source: str) -> ModelConfig:
    missing = [k for k in HYPERPARAMS if k not in hyper]
    unknown = sorted(str(k) for k in hyper if k not in HYPERPARAMS)
    bad = [f"{k} = {hyper[k]!r:.40}" for k in HYPERPARAMS if k in hyper and not (
        isinstance(hyper[k], int) and not isinstance(hyper[k], bool) and hyper[k] >= 1)]
    if missing or unknown or bad:
        raise CheckpointError(f"{source}: " + "; ".join(
            part for part in (missing and f"missing {', '.join(missing)}",
                              unknown and f"unknown {', '.join(unknown)}",
                              bad and f"not positive integers: {', '.join(bad)}") if part))
    if hyper["d_qkv"] % hyper["n_head"]:
        raise CheckpointError(f"{source}: d_qkv ({hyper['d_qkv']}) is not a multiple of "
                              f"n_head ({hyper['n_head']})")
    try:
        return ModelConfig(
            vocab_size=hyper["vocab_size"], sequence_len=hyper["block_size"],
            emb_size=hyper["n_embd"], key_size=hyper["d_qkv"] // hyper["n_head"],
            num_q_heads=hyper["n_head"], num_kv_heads=hyper["n_head"],
            num_layers=hyper["n_layer"], widening_factor=1.0, num_experts=0,
            num_selected_experts=0, attn_output_multiplier=1.0, embedding_multiplier_scale=1.0,
            output_multiplier_scale=1.0, attn_logit_cap=None, architecture="palm",
            low_rank=hyper["d_rank"], block_repeats=hyper["d_layer"], rope_base=ROTARY_BASE,
            norm_eps=NORM_EPS, tie_embeddings=False, sandwich_norms=False, dtype="float32",
            pad_token=0, eos_token=None, bos_token=None)
    except ConfigError as e:  # e.g. a head dim (d_qkv / n_head) that is not a multiple of 4
        raise CheckpointError(f"{source}: {e}") from None


def _match(name: str, table: dict, layers: int):
    """(table key, block index or None) of a torch name, or None when nothing takes it."""
    if name in table:
        return name, None
    found = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    key = found and "blocks.{i}." + found.group(2)
    if key in table and int(found.group(1)) < layers and str(int(found.group(1))) == \
            found.group(1):
        return key, int(found.group(1))
    return None


def _check(path: Path, state: dict, table: dict, config: ModelConfig) -> dict:
    """{(table key, block or None): TensorRef} of the state dict; every problem listed."""
    problems, matched, seen = [], {}, set()
    for name, ref in state.items():
        hit = _match(name, table, config.num_layers)
        if hit is None:
            problems.append(f"{name}: no parameter takes it")
            continue
        seen.add(hit)
        shape = table[hit[0]][0]
        if list(ref.shape) != shape:
            problems.append(f"{name}: {list(ref.shape)}, the config needs {shape}")
        elif ref.dtype not in FLOAT_DTYPES:
            problems.append(f"{name}: dtype {ref.dtype.name}, expected float32, bfloat16 or "
                            f"float16")
        else:
            matched[hit] = ref
    for key in table:
        blocks = range(config.num_layers) if "{i}" in key else [None]
        problems += [f"{key.format(i=i)}: missing" for i in blocks if (key, i) not in seen]
    if problems:
        raise problem_report(f"checkpoint {path} does not match the config", problems,
                             CheckpointError)
    return matched


def _part_reader(ref: TensorRef, part: Part, rows: int):
    """index over our [in, out] (or the stored shape) -> the values from the torch tensor."""
    if not part.transpose:
        return lambda index: ref.read(as_slices(normalize(index, ref.shape)))

    def read(index):
        ins, outs = normalize(index, (ref.shape[1], rows))
        first = part.first * rows
        return ref.read((slice(first + outs.start, first + outs.stop),
                         slice(ins.start, ins.stop))).T
    return read


def _stacked(readers: list, shape: tuple, dtype) -> LazyParam:
    """One LazyParam [L, ...] from a reader per block."""
    def read(index):
        ranges = normalize(index, shape)
        rest = as_slices(ranges[1:])
        return np.stack([readers[i](rest) for i in ranges[0]]) if len(ranges[0]) else \
            np.zeros([len(r) for r in ranges], dtype)
    return LazyParam(shape, dtype, read)


def lazy_palm(path: Path, config: ModelConfig) -> dict:
    """(module, param) -> LazyParam of a Palm checkpoint for `config` (nothing read yet)."""
    path = Path(path)
    _, state = read_palm_file(path)
    table = _table(config)
    matched = _check(path, state, table, config)
    out: dict = {}
    for key, (shape, parts) in table.items():
        rows = shape[0] // len(parts)
        own = [shape[1], rows]  # [in, out] of each part, transposed
        for part in parts:
            if "{i}" not in key:
                ref = matched[key, None]
                out[part.module, part.param] = LazyParam(
                    tuple(own if part.transpose else ref.shape), ref.dtype,
                    _part_reader(ref, part, rows))
                continue
            refs = [matched[key, i] for i in range(config.num_layers)]
            out[part.module, part.param] = _stacked(
                [_part_reader(ref, part, rows) for ref in refs], (config.num_layers, *own),
                refs[0].dtype)
    # the table against the model's own tree: a mismatch here is a bug of the table
    problems = tree_problems(_nested(out), logical_shapes(config))
    if problems:
        raise problem_report(f"Palm reader for {path}", problems, CheckpointError)
    return out


def _nested(flat: dict) -> dict:
    tree: dict = {}
    for (module, param), leaf in flat.items():
        tree.setdefault(module, {})[param] = leaf
    return tree
