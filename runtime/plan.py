"""Memory planning: the bytes each device will hold, computed before anything is loaded.

Shape glossary: L layers, B slots, S cache length, T largest prompt bucket (= S), K kv heads,
H head dim, N query heads, G = N / K, D model width, F ffn width, E experts, k selected experts,
V vocab, R scale row blocks; m, d, e: sizes of the mesh axes model, data, expert.

A plan needs no devices and no checkpoint: the parameter tree comes from `abstract_weights`
(model.abstract_params with the storage dtypes of a `weight_format`), and the partition specs
from the partition rules themselves (sharding.leaf_spec, memory.memory_specs) evaluated on a
*paper mesh*: an object with only the axis sizes. A device's shard of a leaf is its shape with
every sharded dimension divided by the size of its mesh axis (replicated dimensions count
fully); the rules only shard dimensions that divide evenly, so every device holds the same
bytes and "per device" is one number.

Per device = parameters + KV memory + working set, where the working set is an estimate
(see `working_set`): the larger of the transients of the two jitted programs (prefill of a full
S-token bucket, and one decode step) plus a fixed allowance for the XLA runtime.

Mamba-2 configs (architecture "mamba2") are planned the same way with their decode state
(ssm_memory.py: constant in the cache length) in place of KV memory and their own working set
(`mamba2_working_set`).

Capacity comes from the devices (`memory_stats()["bytes_limit"]`, reported by GPUs and TPUs),
from the caller (`--device-memory 80GB`, see `parse_bytes`), or from a TARGETS preset; the CPU
reports none, so without a given capacity nothing is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import textwrap
from typing import Mapping, Optional, Sequence

import jax
import ml_dtypes
import numpy as np

from runtime.config import DEFAULT_INT8_GROUP_SIZE, ModelConfig
from runtime.errors import RuntimeInputError, ShardingError
from runtime.kv_heads import (head_splitting_meshes, kv_head_copies, memory_split_by_heads,
                              with_kv_head_copies)
from runtime.memory import kv_shape, memory_layers, memory_specs
from runtime.paths import QUANTIZABLE, quantized_kind
from runtime.quant import (PARTIALS_MAX_BYTES, QuantizedEmbedding, QuantizedWeight8bit,
                           row_blocks_for)
from runtime.sharding import MESH_AXES, format_mesh, leaf_spec, param_path
from runtime.ssm_memory import init_ssm_memory, ssm_memory_bytes, ssm_memory_specs

WEIGHT_FORMATS = ("float32", "bfloat16", "int8", "grok-int8")
FLOAT_FORMATS = ("float32", "bfloat16")
SCALE_DTYPE = np.dtype(ml_dtypes.bfloat16)  # scales of int8 weights (quant.quantize's default)
GiB = 1 << 30
OVERHEAD_BYTES = 1 * GiB  # per device: XLA runtime, compiled programs, fragmentation, padding
MAX_MODEL_AXIS = 4096

# The released Grok-1 checkpoint: which weights are int8, and their scale row blocks R.
GROK_INT8_ROW_BLOCKS = (
    (re.compile(r"/multi_head_attention/(query|key|value)/w$"), 1),
    (re.compile(r"/moe/(linear|linear_v)/w$"), 1),
    (re.compile(r"/multi_head_attention/linear/w$"), 8),
    (re.compile(r"/moe/linear_1/w$"), 8),
)

# Parameter groups of the table, in table order: (label, path regex).
GROUPS = (
    ("embeddings", re.compile(r"/in_out_embed/")),
    ("attention", re.compile(r"/multi_head_attention/")),
    ("experts (MoE)", re.compile(r"/moe/")),
    ("ffn", re.compile(r"/mlp/")),
    ("mamba mixers", re.compile(r"/mamba_layer/mixer/")),
    ("norms + router", re.compile(r"/rms_norm(_\d)?/|/router/")),
    ("output head", re.compile(r"/unembed/")),
)


# --- sizes and flags ----------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1,
          "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str, flag: str = "--device-memory") -> int:
    """'80GB' -> 80 * 10**9, '16GiB' -> 16 * 2**30, '1.5TB', '512MiB', '1000000' (bytes).

    Decimal units (kB/KB, MB, GB, TB; a bare K/M/G/T means the same) and binary ones (KiB, MiB,
    GiB, TiB), case-insensitive, spaces allowed. Errors name the flag and its value.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise RuntimeInputError(f"{flag} {text!r}: expected a size such as 80GB, 16GiB, 1.5TB or "
                                f"a number of bytes")
    value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise RuntimeInputError(f"{flag} {text!r}: the size must be at least one byte")
    return int(value)


def format_bytes(n: Optional[float]) -> str:
    if n is None:
        return "unknown"
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{int(n)} B"


def check_mesh_sizes(sizes: Mapping[str, int]) -> dict[str, int]:
    out = {}
    for name, size in sizes.items():
        if name not in MESH_AXES:
            raise ShardingError(f"mesh axis {name!r} is not one of {', '.join(MESH_AXES)}")
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ShardingError(f"mesh axis {name!r}: size must be a positive integer, "
                                f"got {size!r}")
        out[name] = int(size)
    if not out:
        raise ShardingError("the mesh has no axes")
    return {a: out[a] for a in MESH_AXES if a in out}


class PaperMesh:
    """Only the axis sizes of a mesh: what the partition rules read (`mesh.shape[axis]`)."""

    def __init__(self, sizes: Mapping[str, int]):
        self.shape = check_mesh_sizes(sizes)
        self.axis_names = tuple(self.shape)
        self.size = math.prod(self.shape.values())


# --- the parameter tree of a weight format --------------------------------------------------------

def _check_format(weight_format: str) -> None:
    if weight_format not in WEIGHT_FORMATS:
        raise RuntimeInputError(f"weight format {weight_format!r}: expected one of "
                                f"{', '.join(WEIGHT_FORMATS)}")


def _row_blocks(path: str, weight_format: str, rows: int, group_size: int) -> Optional[int]:
    """R of an int8 matmul weight with `rows` input rows in this format, None for a float leaf."""
    if weight_format == "grok-int8":
        return next((r for pattern, r in GROK_INT8_ROW_BLOCKS if pattern.search(path)), None)
    if weight_format == "int8":
        return row_blocks_for(rows, group_size) if QUANTIZABLE.search(path) else None
    return None


@functools.lru_cache(maxsize=8)
def _abstract_params(config: ModelConfig):
    from runtime.model import abstract_params
    return abstract_params(config)


def abstract_weights(config: ModelConfig, weight_format: str, float_dtype: Optional[str] = None,
                     int8_group_size: Optional[int] = None):
    """The parameter tree as stored in `weight_format`, without allocating: ShapeDtypeStruct
    leaves, and QuantizedWeight8bit(int8 [..., I, O], bf16 scales [..., R, O]) for int8 ones.

    float32 / bfloat16: every parameter in that dtype. int8: what --quantize int8 makes, the
    QUANTIZABLE weights in groups of int8_group_size rows (default: the loader's) and a tied
    embedding table as a QuantizedEmbedding. grok-int8: the released Grok-1 layout: attention
    query/key/value and moe linear/linear_v with R = 1, attention linear and moe linear_1 with
    R = 8. The other leaves of the int8 formats are `float_dtype` (default float32; bfloat16
    for a bf16 Hugging Face checkpoint quantised at load).
    """
    _check_format(weight_format)
    if weight_format in FLOAT_FORMATS:
        if float_dtype not in (None, weight_format):
            raise RuntimeInputError(f"weight format {weight_format}: float_dtype must be "
                                    f"{weight_format} or omitted, got {float_dtype!r}")
        float_dtype = weight_format
    float_dtype = np.dtype(float_dtype or "float32")
    if float_dtype.name not in FLOAT_FORMATS:
        raise RuntimeInputError(f"float dtype {float_dtype.name!r}: expected one of "
                                f"{', '.join(FLOAT_FORMATS)}")

    group_size = DEFAULT_INT8_GROUP_SIZE if int8_group_size is None else int8_group_size

    def convert(keys, leaf):
        path = param_path(keys)
        if weight_format == "int8" and quantized_kind(path, config) == "embedding":
            vocab, width = leaf.shape
            return QuantizedEmbedding(
                jax.ShapeDtypeStruct(leaf.shape, np.dtype(np.int8)),
                jax.ShapeDtypeStruct((row_blocks_for(width, group_size), vocab), SCALE_DTYPE))
        rows = _row_blocks(path, weight_format, leaf.shape[-2] if leaf.ndim >= 2 else 1,
                           group_size)
        if rows is None:
            return jax.ShapeDtypeStruct(leaf.shape, float_dtype)
        *lead, inputs, outputs = leaf.shape
        if inputs % rows:
            raise RuntimeInputError(f"weight format {weight_format}: parameter {path} has "
                                    f"{inputs} input rows, not divisible into {rows} scale blocks")
        return QuantizedWeight8bit(jax.ShapeDtypeStruct(leaf.shape, np.dtype(np.int8)),
                                   jax.ShapeDtypeStruct((*lead, rows, outputs), SCALE_DTYPE))

    return jax.tree_util.tree_map_with_path(convert, _abstract_params(config))


def default_weight_format(checkpoint_kind: Optional[str], quantize: Optional[str] = None) -> str:
    """The format to plan for before reading a checkpoint: the released Grok-1 (ckpt-0) is
    grok-int8 (--quantize leaves int8 weights as they are); others are int8 with --quantize
    int8, else float32 (an upper bound for bf16 files: pass bfloat16 when they are)."""
    if checkpoint_kind == "ckpt-0":
        return "grok-int8"
    return "int8" if quantize == "int8" else "float32"


def weight_format_of(params) -> str:
    """The format a (real or abstract) parameter tree is stored in, for planning what is loaded:
    grok-int8 when its int8 weights have the released Grok-1's row blocks, int8 for other int8
    trees (--quantize int8, any group size), else its float dtype."""
    leaves = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, QuantizedWeight8bit))[0]
    quantized = {param_path(k): leaf.scales.shape[-2] for k, leaf in leaves
                 if isinstance(leaf, QuantizedWeight8bit)}
    if quantized:
        grok = all(next((r for pattern, r in GROK_INT8_ROW_BLOCKS if pattern.search(path)),
                        None) == rows for path, rows in quantized.items())
        return "grok-int8" if grok else "int8"
    dtypes = {np.dtype(leaf.dtype).name for _, leaf in leaves}
    return "bfloat16" if dtypes == {"bfloat16"} else "float32"


# --- per-device bytes -----------------------------------------------------------------------------

def shard_shape(shape: Sequence[int], spec, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """A device's block of an array of `shape` under PartitionSpec `spec` on a mesh of `sizes`."""
    entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    out = []
    for dim, entry in zip(shape, entries):
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        split = math.prod(sizes.get(n, 1) for n in names)
        out.append(-(-dim // split))
    return tuple(out)


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    path: str
    group: str
    logical_bytes: int  # the whole parameter (weight + scales), stored once
    device_bytes: int  # what one device holds
    elements_per_device: int  # weight elements one device holds (scales not counted)
    shape: tuple = ()  # the logical weight shape
    row_blocks: Optional[int] = None  # R of an int8 weight, None for a float one
    input_split: int = 1  # how many ways the rules split the weight's input dim [..., I, O]


def _group(path: str) -> str:
    return next((label for label, pattern in GROUPS if pattern.search(path)), "other")


@functools.lru_cache(maxsize=64)
def _param_plan(config: ModelConfig, weight_format: str, float_dtype: Optional[str],
                mesh_key: tuple, int8_group_size: Optional[int] = None) -> tuple[LeafPlan, ...]:
    sizes = dict(mesh_key)
    mesh = PaperMesh(sizes)
    tree = abstract_weights(config, weight_format, float_dtype, int8_group_size)
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, QuantizedWeight8bit))[0]
    plans = []
    for keys, leaf in leaves:
        path = param_path(keys)
        spec = leaf_spec(path, leaf, mesh)  # the partition rules; raises ShardingError
        parts = [(leaf.weight, spec.weight), (leaf.scales, spec.scales)] \
            if isinstance(leaf, QuantizedWeight8bit) else [(leaf, spec)]
        weight, weight_spec = parts[0]
        plans.append(LeafPlan(
            path, _group(path),
            logical_bytes=sum(_nbytes(a.shape, a.dtype) for a, _ in parts),
            device_bytes=sum(_nbytes(shard_shape(a.shape, s, sizes), a.dtype) for a, s in parts),
            elements_per_device=math.prod(shard_shape(weight.shape, weight_spec, sizes)),
            shape=tuple(weight.shape),
            row_blocks=leaf.scales.shape[-2] if isinstance(leaf, QuantizedWeight8bit) else None,
            input_split=(weight.shape[-2] // shard_shape(weight.shape, weight_spec, sizes)[-2]
                         if len(weight.shape) >= 2 else 1)))
    return tuple(plans)


def is_ssm(config: ModelConfig) -> bool:
    return config.architecture == "mamba2"


def ssm_state_device_bytes(config: ModelConfig, slots: int, sizes: Mapping[str, int]) -> int:
    """Mamba-2 decode state of one device under ssm_memory.ssm_memory_specs (slots over data,
    heads over model): convolution states, float32 SSM states, positions; any cache length."""
    shapes = jax.eval_shape(lambda: init_ssm_memory(config, slots))
    specs = ssm_memory_specs(config, slots, PaperMesh(sizes))
    return sum(_nbytes(shard_shape(leaf.shape, spec, sizes), leaf.dtype) for leaf, spec in
               zip(jax.tree.leaves(shapes), jax.tree.leaves(
                   specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))))


def kv_device_bytes(config: ModelConfig, slots: int, cache_length: int,
                    sizes: Mapping[str, int]) -> int:
    """KV memory of one device under memory.memory_specs: keys + values [L, B, K, S, H] in the
    activation dtype (slots over data, kv heads over model, else head dim, else replicated)
    and positions [B] int32; K as the engine stores them (make_plan passes the config with
    kv_heads.py's copies). (Mamba-2: its decode state, see ssm_state_device_bytes.)"""
    if is_ssm(config):
        return ssm_state_device_bytes(config, slots, sizes)
    specs = memory_specs(config, slots, PaperMesh(sizes))
    shape = kv_shape(config, slots, cache_length)
    return (2 * _nbytes(shard_shape(shape, specs.keys, sizes), config.dtype)
            + _nbytes(shard_shape((slots,), specs.positions, sizes), np.int32))


def kv_logical_bytes(config: ModelConfig, slots: int, cache_length: int) -> int:
    if is_ssm(config):
        return ssm_memory_bytes(config, slots)
    return 2 * _nbytes(kv_shape(config, slots, cache_length), config.dtype) + 4 * slots


def working_set(config: ModelConfig, sizes: Mapping[str, int], slots: int, cache_length: int,
                leaves: Sequence[LeafPlan], kv_bytes: int) -> dict[str, dict[str, int]]:
    """Transient bytes per device of the two jitted programs, by component: a conservative
    estimate that counts every buffer XLA may keep live at its full size (checked against XLA's
    own buffer assignment for the engine's programs on the tiny model in tests/test_plan.py;
    layout padding on TPU tiles and allocator fragmentation are left to the fixed overhead).

    Let A = activation itemsize, T = S = cache_length (a prompt bucket is at most the cache
    length), h = N / gcd(N, m) query heads per device (how XLA's partitioner splits the heads,
    also when m exceeds K: checked on simulated 8/16/32-device meshes), Fm = F / m,
    kv_split = the model split of the KV memory, Bd = B / d when d divides B, W = one layer's
    weights on a device in the activation dtype, Wh = the output head's shard in the
    activation dtype.

    prefill (one prompt, a full T bucket):
      bucket KV row   2 (k, v) x 2 (scan input + output) x L*T*K*H*A / kv_split
      attention       (4 + 4 + A) x h*T*T  one layer's float32 logits and exp, probs in A
      ffn             3 x rows*Fm x 4 + 2 x rows*D x 4, rows = T*k (MoE) or T (dense)
      row blocks      the largest dense int8 weight's float32 partials rows*R*O*4 (past 4 MiB
                      and its float32 size: that dequantised copy instead), or rows*I*A +
                      2 x rows*O*4 for a weight [I, O] whose R scale blocks do not align with
                      its input shards (R % m != 0, e.g. Grok-1's R = 8 on m = 16 or 32): its
                      input is regathered, and the blocks' float32 partial products summed
      activations     6 x T*D x 4          residual stream, norms, projections
      layer weights   2 x W                a layer's slice and its converted copy
      output head     Wh                   the head converted to the activation dtype
    decode (every slot, one token):
      layer KV slices 2 x (KV memory / L)  one layer's keys/values, re-laid out for the
                      attention matmuls (the new token is scattered into the donated memory
                      in place after the layer scan: no copy of the whole memory)
      attention       (4 + 4 + A) x Bd*h*S
      ffn, row blocks as above with rows = B*k (MoE) or B (dense)
      layer weights   2 x W; output head Wh
      logits          4 x B*V x 4          float32 logits, sampling sort and softmax

    Not counted (backend-specific, seen in XLA's CPU buffer assignment): the expert weights the
    MoE layer gathers per tile of routed rows (at most 2 x E tiles; XLA:CPU materialises their
    int8 -> float conversion) and bf16 to float32 copies (the whole KV memory in float32 during
    decode). Plans for CPU hosts with bf16 activations or large MoE prefills underestimate.
    """
    if is_ssm(config):
        return mamba2_working_set(config, sizes, slots, cache_length, leaves, kv_bytes)
    c = config
    m, d = sizes.get("model", 1), sizes.get("data", 1)
    act = np.dtype(c.dtype).itemsize
    f32 = 4
    t = s = cache_length
    k_sel = c.num_selected_experts if c.is_moe else 1
    heads = c.num_q_heads // math.gcd(c.num_q_heads, m)
    ffn_dev = c.ffn_size // m if c.ffn_size % m == 0 else c.ffn_size
    kv_spec = memory_specs(c, slots, PaperMesh(sizes)).keys
    kv_split = math.prod(sizes.get(n, 1) for n in (kv_spec[2], kv_spec[4]) if n is not None)
    slots_dev = slots // d if slots % d == 0 else slots
    layer_leaves = [x for x in leaves if "/transformer/layers/" in x.path]
    layer_weights = sum(x.elements_per_device for x in layer_leaves) // c.num_layers * act
    head = next((x for x in leaves if x.group == ("embeddings" if c.tie_embeddings
                                                  else "output head")), None)
    head_bytes = head.elements_per_device * act if head else 0

    def ffn(rows):
        return 3 * rows * ffn_dev * f32 + 2 * rows * c.emb_size * f32

    def row_blocks(tokens):
        worst = 0
        for x in leaves:
            if not x.row_blocks or x.row_blocks == 1:
                continue
            rows = tokens * k_sel if "/moe/" in x.path else tokens
            inputs, outputs = x.shape[-2], x.shape[-1]
            if "/layers/" in x.path and "/moe/" not in x.path:
                # a dense layer weight's float32 partials [rows, R, O], or past
                # PARTIALS_MAX_BYTES its dequantised copy (quant._row_blocked_product; O is
                # taken whole: an upper bound)
                partials = rows * x.row_blocks * outputs * f32
                dequantised = inputs // x.input_split * outputs * f32
                worst = max(worst, dequantised if partials > max(PARTIALS_MAX_BYTES,
                                                                 inputs * outputs * f32)
                            else partials)
            if x.input_split > 1 and x.row_blocks % x.input_split:
                worst = max(worst, rows * inputs * act + 2 * rows * outputs * f32)
        return worst

    attention = (2 * f32 + act) * heads
    prefill = {
        "bucket KV row": 2 * 2 * memory_layers(c) * t * c.num_kv_heads * c.key_size * act
        // kv_split,
        "attention": attention * t * t,
        "ffn": ffn(t * k_sel),
        "row blocks": row_blocks(t),
        "activations": 6 * t * c.emb_size * f32,
        "layer weights": 2 * layer_weights,
        "output head": head_bytes,
    }
    decode = {
        # The chunk is scattered into the donated memory in place; each layer's slice may be
        # re-laid out for the attention matmuls.
        "layer KV slices": 2 * kv_bytes // memory_layers(c),
        "attention": attention * slots_dev * s,
        "ffn": ffn(slots * k_sel),
        "row blocks": row_blocks(slots),
        "layer weights": 2 * layer_weights,
        "output head": head_bytes,
        "logits": 4 * slots * c.vocab_size * f32,
    }
    return {"prefill": prefill, "decode": decode}


def mamba2_working_set(config: ModelConfig, sizes: Mapping[str, int], slots: int,
                       cache_length: int, leaves: Sequence[LeafPlan],
                       state_bytes: int) -> dict[str, dict[str, int]]:
    """Transient bytes per device of Mamba-2's two jitted programs (mamba2.py), in the spirit of
    `working_set` (every buffer at full size, a conservative estimate; not checked against
    XLA's buffer assignment). T = cache_length (the largest prompt bucket), Q = min(chunk, T),
    hm = the model split of the heads (when it divides them), X = 2I + 2GN + H projection
    widths, Bd = B / d when d divides B, W = one layer's weights, Wh = the output head.

    prefill (one prompt, a full T bucket):
      bucket state    2 x (scan input + output) the state of one row
      projections     2 x T*X*4 / hm          z, x, B, C, dt and their convolved copies
      chunk products  3 x T*Q*H*4 / hm        one layer's decays and weights within chunks
      chunk states    2 x (T/Q + 1)*H*P*N*4 / hm
      activations     6 x T*D*4
      layer weights   2 x W;  output head Wh
    decode (every slot, one token):
      state copy      the state once more (the layer scan writes beside the donated one)
      layer state     2 x state / L
      projections     2 x Bd*X*4
      layer weights   2 x W; output head Wh; logits 4 x B*V*4
    """
    c = config
    m, d = sizes.get("model", 1), sizes.get("data", 1)
    act, f32 = np.dtype(c.dtype).itemsize, 4
    t = cache_length
    q = min(c.ssm_chunk_size, t)
    split = m if c.ssm_heads % m == 0 else 1
    inner, bc = c.ssm_heads * c.ssm_head_dim, c.ssm_groups * c.ssm_state_size
    widths = 2 * inner + 2 * bc + c.ssm_heads
    slots_dev = slots // d if slots % d == 0 else slots
    layer_leaves = [x for x in leaves if "/mamba/layers/" in x.path]
    layer_weights = sum(x.elements_per_device for x in layer_leaves) // c.num_layers * act
    head = next((x for x in leaves if x.group == ("embeddings" if c.tie_embeddings
                                                  else "output head")), None)
    head_bytes = head.elements_per_device * act if head else 0
    row_state = ssm_state_device_bytes(c, 1, sizes)
    prefill = {
        "bucket state": 2 * row_state,
        "projections": 2 * t * widths * f32 // split,
        "chunk products": 3 * t * q * c.ssm_heads * f32 // split,
        "chunk states": 2 * (-(-t // q) + 1) * inner * c.ssm_state_size * f32 // split,
        "activations": 6 * t * c.emb_size * f32,
        "layer weights": 2 * layer_weights,
        "output head": head_bytes,
    }
    decode = {
        "state copy": state_bytes,
        "layer state": 2 * state_bytes // c.num_layers,
        "projections": 2 * slots_dev * widths * f32,
        "layer weights": 2 * layer_weights,
        "output head": head_bytes,
        "logits": 4 * slots * c.vocab_size * f32,
    }
    return {"prefill": prefill, "decode": decode}


# --- the plan -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Suggestion:
    text: str
    changes: dict  # make_plan arguments that, replanned, fit (empty: advice only)


@dataclasses.dataclass(frozen=True)
class Plan:
    config: ModelConfig
    mesh_sizes: dict
    weight_format: str
    float_dtype: Optional[str]
    slots: int
    cache_length: int
    device_memory_bytes: Optional[int]
    device_kind: str
    overhead_bytes: int
    label: Optional[str]
    capacity_source: str
    leaves: tuple  # LeafPlan per parameter
    kv_bytes: int
    kv_logical_bytes: int
    transients: dict  # {"prefill": {component: bytes}, "decode": {...}}
    int8_group_size: Optional[int] = None  # of the int8 format (None: the loader's default)

    @property
    def devices(self) -> int:
        return math.prod(self.mesh_sizes.values())

    @property
    def param_bytes(self) -> int:
        return sum(x.device_bytes for x in self.leaves)

    @property
    def param_logical_bytes(self) -> int:
        return sum(x.logical_bytes for x in self.leaves)

    @property
    def parameter_count(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(_abstract_params(self.config)))

    def group_bytes(self) -> dict[str, tuple[int, int]]:
        """Group label -> (whole-model bytes, per-device bytes), in table order."""
        out = {}
        for label in [g for g, _ in GROUPS] + ["other"]:
            members = [x for x in self.leaves if x.group == label]
            if members:
                out[label] = (sum(x.logical_bytes for x in members),
                              sum(x.device_bytes for x in members))
        return out

    @property
    def prefill_bytes(self) -> int:
        return sum(self.transients["prefill"].values())

    @property
    def decode_bytes(self) -> int:
        return sum(self.transients["decode"].values())

    @property
    def working_bytes(self) -> int:
        return max(self.prefill_bytes, self.decode_bytes) + self.overhead_bytes

    @property
    def total_bytes(self) -> int:
        """Per device (every device holds the same shapes; this is also the maximum)."""
        return self.param_bytes + self.kv_bytes + self.working_bytes

    @property
    def headroom(self) -> Optional[int]:
        if self.device_memory_bytes is None:
            return None
        return self.device_memory_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        """True when the total fits the capacity, or the capacity is unknown."""
        return self.headroom is None or self.headroom >= 0

    @property
    def inputs(self) -> dict:
        """The make_plan arguments of this plan (replan with changes: make_plan(**{...}))."""
        return dict(config=self.config, mesh_sizes=dict(self.mesh_sizes),
                    weight_format=self.weight_format, slots=self.slots,
                    cache_length=self.cache_length, device_memory_bytes=self.device_memory_bytes,
                    device_kind=self.device_kind, float_dtype=self.float_dtype,
                    overhead_bytes=self.overhead_bytes, label=self.label,
                    capacity_source=self.capacity_source, int8_group_size=self.int8_group_size)

    def replan(self, **changes) -> "Plan":
        return make_plan(**{**self.inputs, **changes})

    # --- text ---

    def _weights_text(self) -> str:
        if self.weight_format in FLOAT_FORMATS:
            return self.weight_format
        rest = self.float_dtype or "float32"
        return f"{self.weight_format} (int8 + bf16 scales; other parameters {rest})"

    def table(self) -> str:
        c = self.config
        name = self.label or "model"
        rows: list[tuple[str, str, str]] = []
        rows.append(("parameters", "", ""))
        groups = self.group_bytes()
        for label, (whole, device) in groups.items():
            rows.append((f"  {label}", format_bytes(whole), format_bytes(device)))
        if c.tie_embeddings and "output head" not in groups:
            rows.append(("  output head", "tied to embeddings", ""))
        rows.append(("  all parameters", format_bytes(self.param_logical_bytes),
                     format_bytes(self.param_bytes)))
        memory = f"SSM state ({self.slots} slot(s), any length)" if is_ssm(c) else \
            f"KV memory ({self.slots} x {self.cache_length}, {c.dtype})"
        rows.append((memory, format_bytes(self.kv_logical_bytes), format_bytes(self.kv_bytes)))
        rows.append(("working set (estimate, [1])", "", format_bytes(self.working_bytes)))
        rows.append(("total per device", "", format_bytes(self.total_bytes)))
        rows.append(("device capacity", "", format_bytes(self.device_memory_bytes)))
        if self.device_memory_bytes is None:
            verdict = "not checked (capacity unknown)"
        else:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            rows.append(("headroom", "", format_bytes(self.headroom)))
        width = max(len(r[0]) for r in rows) + 2
        count = self.parameter_count
        lines = [
            f"memory plan: {name}, " + (f"{count / 1e9:.2f}B parameters" if count >= 10**8
                                        else f"{count:,} parameters"),
            f"  mesh {format_mesh(self.mesh_sizes)}: {self.devices} x {self.device_kind}, "
            f"capacity {format_bytes(self.device_memory_bytes)} each ({self.capacity_source})",
            f"  weights {self._weights_text()}; activations {c.dtype}",
            f"  {self.slots} slot(s) x cache length {self.cache_length} "
            f"(sequence_len {c.sequence_len})",
            "",
            f"{'':<{width}}{'whole model':>18}{'per device':>14}",
        ]
        for label, whole, device in rows:
            lines.append(f"{label:<{width}}{whole:>18}{device:>14}")
        lines.append(f"=> {verdict}")
        lines += self._kv_split_note()
        parts = lambda d: ", ".join(f"{k} {format_bytes(v)}" for k, v in d.items() if v)  # noqa
        notes = [
            f"[1] max(prefill of one {self.cache_length}-token bucket "
            f"{format_bytes(self.prefill_bytes)}, decode step {format_bytes(self.decode_bytes)}) "
            f"+ {format_bytes(self.overhead_bytes)} fixed XLA/runtime overhead; a conservative "
            f"estimate (runtime/plan.py {'mamba2_' if is_ssm(c) else ''}working_set)"
            + (": Mamba-2, state instead of KV memory" if is_ssm(c) else ":"),
        ] + ([] if is_ssm(c) else [
            "prefill = 4 x L*T*K*H*A / kv_split + (8 + A) x h*T*T + ffn(T*k) + rb(T*k) "
            "+ 6 x T*D x 4 + 2 x W + Wh",
            "decode = KV + 2 x KV / L + (8 + A) x B*h*S + ffn(B*k) + rb(B*k) + 2 x W + Wh "
            "+ 4 x B*V x 4",
            "ffn(r) = 3 x r*F/m x 4 + 2 x r*D x 4; rb(r) = r*I*A + 2 x r*O*4 for the largest "
            "int8 weight [I,O] whose R scale blocks straddle its shards (else 0); T = S = cache "
            "length; A = activation bytes; h = N / gcd(N, m) heads per device; W, Wh = one "
            "layer's weights, the output head, per device in the activation dtype",
        ]) + [
            f"prefill: {parts(self.transients['prefill'])}",
            f"decode: {parts(self.transients['decode'])}",
        ]
        lines.append("")
        for i, note in enumerate(notes):
            lines += textwrap.wrap(note, width=100, initial_indent="" if i == 0 else "    ",
                                   subsequent_indent="    ", break_on_hyphens=False)
        return "\n".join(lines)

    def _kv_split_note(self) -> list[str]:
        """A warning when the KV memory splits by head dim on this mesh, with the first mesh of
        the same devices that splits it by heads and fits (kv_heads.py)."""
        model = self.mesh_sizes.get("model", 1)
        if memory_split_by_heads(self.config, model):
            return []
        text = (f"note: {self.config.num_q_heads} query heads over {self.config.num_kv_heads} KV "
                f"heads do not split by heads over model={model}: the KV memory splits by head "
                f"dim, and XLA gathers each layer's KV memory onto every device at every decode "
                f"step")
        for sizes in head_splitting_meshes(self.config, dict(self.mesh_sizes)):
            try:
                other = self.replan(mesh_sizes=sizes)
            except ShardingError:
                continue
            if other.device_memory_bytes is None or other.fits:
                text += (f"; --mesh {format_mesh(sizes)} splits it by heads "
                         f"({format_bytes(other.total_bytes)} per device)")
                break
        return textwrap.wrap(text, width=100, subsequent_indent="    ")

    # --- what would fit ---

    def suggested_changes(self) -> list[Suggestion]:
        """Computed alternatives that fit (each carries its make_plan changes); [] when this
        plan fits or the capacity is unknown."""
        if self.fits:
            return []
        out: list[Suggestion] = []
        floor = self.replan(slots=1, cache_length=1)
        if not floor.fits:
            out.append(Suggestion(
                f"even 1 slot x cache length 1 needs {format_bytes(floor.total_bytes)} per device "
                f"({format_bytes(self.param_bytes)} of {self.weight_format} parameters): fewer "
                f"slots or a shorter cache cannot make this fit", {}))

        model = smallest_model_axis(self)
        current = self.mesh_sizes.get("model", 1)
        if model is not None:
            plan = self.replan(mesh_sizes={**self.mesh_sizes, "model": model})
            out.append(Suggestion(
                f"more devices on the model axis: --mesh {format_mesh(plan.mesh_sizes)} "
                f"({plan.devices} devices) needs {format_bytes(plan.total_bytes)} per device",
                {"mesh_sizes": plan.mesh_sizes}))
        else:
            out.append(Suggestion(
                f"no model-axis size from {current * 2} to {MAX_MODEL_AXIS} (powers of two the "
                f"parameter shapes divide by) fits {self.weight_format} weights", {}))

        if self.weight_format in FLOAT_FORMATS:
            # --quantize int8 keeps the other parameters in the checkpoint's float dtype
            int8 = self.replan(weight_format="int8", float_dtype=self.weight_format)
            if int8.fits:
                out.append(Suggestion(
                    f"int8 weights (--quantize int8): {format_bytes(int8.total_bytes)} per device "
                    f"on the same mesh",
                    {"weight_format": "int8", "float_dtype": self.weight_format}))
            else:
                model = smallest_model_axis(int8)
                if model is not None:
                    plan = int8.replan(mesh_sizes={**self.mesh_sizes, "model": model})
                    out.append(Suggestion(
                        f"int8 weights (--quantize int8) with --mesh "
                        f"{format_mesh(plan.mesh_sizes)} ({plan.devices} devices): "
                        f"{format_bytes(plan.total_bytes)} per device",
                        {"weight_format": "int8", "float_dtype": self.weight_format,
                         "mesh_sizes": plan.mesh_sizes}))

        length = largest_fitting(lambda n: self.replan(cache_length=n).fits,
                                 1, self.cache_length - 1)
        if length is not None:
            length = _round_length(length)
            plan = self.replan(cache_length=length)
            what = "a shorter context" if is_ssm(self.config) else "a shorter KV memory"
            out.append(Suggestion(
                f"{what}: --cache-length {length} (sequence_len is "
                f"{self.config.sequence_len}; prompt + output must fit in it) needs "
                f"{format_bytes(plan.total_bytes)} per device", {"cache_length": length}))

        slots = largest_slots(self)
        if slots is not None:
            plan = self.replan(slots=slots)
            out.append(Suggestion(
                f"fewer slots: --slots {slots} needs {format_bytes(plan.total_bytes)} per device",
                {"slots": slots}))
        return out

    def suggestions(self) -> list[str]:
        return [s.text for s in self.suggested_changes()]


def _round_length(n: int) -> int:
    """A tidy cache length <= n: a multiple of 256 (or 16, for short ones) when possible."""
    for step in (256, 16):
        if n >= step:
            return n - n % step
    return n


def largest_fitting(fits, low: int, high: int) -> Optional[int]:
    """The largest n in [low, high] with fits(n), for fits monotone (True up to some n)."""
    if high < low or not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def largest_slots(plan: Plan) -> Optional[int]:
    """The largest slot count below the plan's that fits (same mesh, cache length). Memory grows
    with the slots except where a count the data axis divides shards its KV memory: searched
    over all counts and over multiples of the data size, the larger wins."""
    data = plan.mesh_sizes.get("data", 1)
    fits = lambda n: plan.replan(slots=n).fits  # noqa: E731
    found = [largest_fitting(fits, 1, plan.slots - 1)]
    if data > 1:
        multiple = largest_fitting(lambda j: fits(j * data), 1, (plan.slots - 1) // data)
        found.append(None if multiple is None else multiple * data)
    found = [n for n in found if n is not None]
    return max(found) if found else None


def smallest_model_axis(plan: Plan, limit: int = MAX_MODEL_AXIS) -> Optional[int]:
    """The smallest power-of-two model-axis size above the plan's, up to `limit`, that the
    partition rules can split the parameters over and that fits (other axes unchanged)."""
    size = plan.mesh_sizes.get("model", 1) * 2
    while size <= limit:
        try:
            candidate = plan.replan(mesh_sizes={**plan.mesh_sizes, "model": size})
        except ShardingError:
            candidate = None
        if candidate is not None and candidate.fits:
            return size
        size *= 2
    return None


def make_plan(config: ModelConfig, mesh_sizes: Mapping[str, int], weight_format: str,
              slots: int, cache_length: Optional[int] = None,
              device_memory_bytes: Optional[int] = None, device_kind: str = "device", *,
              float_dtype: Optional[str] = None, overhead_bytes: int = OVERHEAD_BYTES,
              label: Optional[str] = None, capacity_source: Optional[str] = None,
              int8_group_size: Optional[int] = None) -> Plan:
    """Bytes per device of `config` on a mesh of `mesh_sizes` (no devices needed), with
    parameters stored in `weight_format`, KV memory for `slots` x `cache_length` (default
    sequence_len), and a working-set estimate. Raises ShardingError when the partition rules
    cannot split a parameter over the mesh, RuntimeInputError for impossible inputs."""
    sizes = check_mesh_sizes(mesh_sizes)
    _check_format(weight_format)
    cache_length = config.sequence_len if cache_length is None else cache_length
    if not isinstance(slots, int) or slots < 1:
        raise RuntimeInputError(f"--slots {slots!r}: must be a positive integer")
    if not isinstance(cache_length, int) or not 1 <= cache_length <= config.sequence_len:
        raise RuntimeInputError(f"--cache-length {cache_length!r}: must be in [1, sequence_len "
                                f"{config.sequence_len}]")
    if device_memory_bytes is not None and device_memory_bytes < 1:
        raise RuntimeInputError(f"device memory {device_memory_bytes!r}: must be positive")
    leaves = _param_plan(config, weight_format, float_dtype, tuple(sizes.items()),
                         int8_group_size)  # the rules hold
    # what the engine holds: KV heads copied when the model axis outnumbers them (kv_heads.py)
    served = with_kv_head_copies(config, kv_head_copies(config, sizes.get("model", 1)))
    if served is not config:
        leaves = _param_plan(served, weight_format, float_dtype, tuple(sizes.items()),
                             int8_group_size)
    kv = kv_device_bytes(served, slots, cache_length, sizes)
    if capacity_source is None:
        capacity_source = "unknown" if device_memory_bytes is None else "given"
    return Plan(config=config, mesh_sizes=sizes, weight_format=weight_format,
                float_dtype=float_dtype, slots=slots, cache_length=cache_length,
                device_memory_bytes=device_memory_bytes, device_kind=device_kind,
                overhead_bytes=overhead_bytes, label=label, capacity_source=capacity_source,
                leaves=leaves, kv_bytes=kv,
                kv_logical_bytes=kv_logical_bytes(config, slots, cache_length),
                transients=working_set(served, sizes, slots, cache_length, leaves, kv),
                int8_group_size=int8_group_size)


def check_plan(plan: Plan) -> Plan:
    """Refuse a plan that does not fit: RuntimeInputError with the table and suggestions."""
    if plan.fits:
        return plan
    lines = [f"this configuration needs {format_bytes(plan.total_bytes)} per device but each "
             f"device has {format_bytes(plan.device_memory_bytes)} "
             f"(short by {format_bytes(-plan.headroom)}); nothing was loaded.", "",
             plan.table(), "", "what would fit:"]
    lines += [f"  - {s}" for s in plan.suggestions()] or ["  (nothing found)"]
    raise RuntimeInputError("\n".join(lines))


# --- capacity -------------------------------------------------------------------------------------

def device_capacity(devices: Optional[Sequence] = None) -> tuple[Optional[int], str]:
    """(bytes_limit of the smallest device, or None when any reports none, as the CPU does;
    the device kind)."""
    devices = list(jax.devices() if devices is None else devices)
    kind = getattr(devices[0], "device_kind", devices[0].platform) if devices else "device"
    limits = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001 - backends without memory stats raise or return None
            stats = None
        if not stats or not stats.get("bytes_limit"):
            return None, kind
        limits.append(int(stats["bytes_limit"]))
    return (min(limits) if limits else None), kind


@dataclasses.dataclass(frozen=True)
class Target:
    """A machine to plan for without having it."""
    name: str
    description: str
    mesh_sizes: dict
    device_memory_bytes: int
    device_kind: str
    note: str


TARGETS = {
    # 80 GB HBM3 per GPU, of which CUDA leaves about 79.1 GiB; JAX's allocator takes 75 % of it
    # unless XLA_PYTHON_CLIENT_MEM_FRACTION is raised (e.g. to .95), and bytes_limit reports
    # what it took. 80 * 10**9 bytes (74.5 GiB) is a conservative stand-in for the raised limit.
    "h100x8": Target("h100x8", "8 x NVIDIA H100 80GB", {"data": 1, "model": 8}, 80 * 10**9,
                     "NVIDIA H100 80GB", "80 * 10**9 bytes, below the ~79 GiB a GPU has; JAX "
                     "takes that much with XLA_PYTHON_CLIENT_MEM_FRACTION=.95"),
    # TPU v5e: 16 GiB HBM per chip, 32 chips; all 32 on the model axis (the rules
    # split every sharded Grok-1 dimension by 32; the KV memory splits its head dim, which
    # decode gathers every step: the plan's note names expert=2,model=16 instead).
    "v5e-32": Target("v5e-32", "TPU v5e-32", {"data": 1, "model": 32}, 16 * GiB,
                     "TPU v5 lite", "16 GiB HBM per chip"),
}


def plan_for_target(config: ModelConfig, target: str | Target, weight_format: str, slots: int,
                    cache_length: Optional[int] = None, **kwargs) -> Plan:
    target = TARGETS[target] if isinstance(target, str) else target
    return make_plan(config, target.mesh_sizes, weight_format, slots, cache_length,
                     device_memory_bytes=target.device_memory_bytes,
                     device_kind=target.device_kind,
                     capacity_source=target.note, **kwargs)
