"""What one device holds: its shard of every parameter (`param_plan`) and of the decode memory
(`kv_device_bytes`), on a *paper mesh*.

The partition specs come from the partition rules themselves (sharding.leaf_spec,
memory.memory_specs, ssm_memory.ssm_memory_specs) evaluated on a `PaperMesh`: an object with
only the axis sizes, so no devices are needed. A device's shard of a leaf is its shape with every
sharded dimension divided by the size of its mesh axis (replicated dimensions count fully); the
rules only shard dimensions that divide evenly, so every device holds the same bytes and "per
device" is one number.

Mamba-2 and Palm configs (architectures "mamba2", "palm") hold a decode state constant in the
cache length (ssm_memory.py, models/palm.py's running sums) in place of KV memory: its shapes and
specs are the model's own (new_memory, memory_specs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from runtime.config import ModelConfig
from runtime.errors import ShardingError
from runtime.memory import kv_dtype, kv_shape, memory_length, memory_specs
from runtime.quant import QuantizedWeight8bit
from runtime.quant4 import QuantizedWeight4bit
from runtime.sharding import MESH_AXES, leaf_spec, param_path
from runtime.models import build_model

from runtime.planning.panel_forms import held_in_panels
from runtime.planning.weights import abstract_weights, is_quantized

# Parameter groups of the table, in table order: (label, path regex).
GROUPS = (
    ("embeddings", re.compile(r"/in_out_embed/|/embed_proj/")),
    ("attention", re.compile(r"/multi_head_attention/")),
    ("experts (MoE)", re.compile(r"/moe/")),
    ("ffn", re.compile(r"/mlp/")),
    ("mamba mixers", re.compile(r"/mamba_layer/mixer/")),
    ("palm blocks", re.compile(r"/aod_block/")),
    ("norms + router", re.compile(r"/rms_norm(_\d)?/|/router/")),
    ("output head", re.compile(r"/unembed(_in)?/")),
)


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


def shard_shape(shape: Sequence[int], spec, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """A device's block of an array of `shape` under PartitionSpec `spec` on a mesh of `sizes`."""
    entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    out = []
    for dim, entry in zip(shape, entries):
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        split = math.prod(sizes.get(n, 1) for n in names)
        out.append(-(-dim // split))
    return tuple(out)


def nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def is_ssm(config: ModelConfig) -> bool:
    """Whether the model keeps a constant-size state per slot instead of KV memory."""
    return config.architecture in ("mamba2", "palm")


def state_label(config: ModelConfig) -> str:
    """What the plan calls such a state."""
    return "running sums" if config.architecture == "palm" else "SSM state"


# --- parameters -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LeafPlan:
    path: str
    group: str
    logical_bytes: int  # the whole parameter (weight + scales), stored once
    device_bytes: int  # what one device holds
    elements_per_device: int  # logical weight elements one device holds (scales not counted)
    shape: tuple = ()  # the logical weight shape
    # R of an int8 weight, G of an int4 one (its products are int8 ones over G row blocks,
    # products.py), None for a float one
    row_blocks: Optional[int] = None
    input_split: int = 1  # how many ways the rules split the weight's input dim [..., I, O]
    in_panels: bool = False  # read in place by one CPU device's panel kernels (panel_forms)


def group_of(path: str) -> str:
    return next((label for label, pattern in GROUPS if pattern.search(path)), "other")


def _parts(leaf, spec) -> list:
    """(array, spec) of each stored part of a leaf: the weight (int4: packed codes) first."""
    if isinstance(leaf, QuantizedWeight8bit):
        return [(leaf.weight, spec.weight), (leaf.scales, spec.scales)] + \
            ([(leaf.mins, spec.mins)] if leaf.mins is not None else [])
    if isinstance(leaf, QuantizedWeight4bit):
        return [(leaf.packed, spec.packed), (leaf.scales, spec.scales)] + \
            ([(leaf.mins, spec.mins)] if leaf.mins is not None else [])
    return [(leaf, spec)]


def _leaf_plan(path: str, leaf, mesh: PaperMesh, sizes: Mapping[str, int],
               in_panels: bool = False) -> LeafPlan:
    spec = leaf_spec(path, leaf, mesh)  # the partition rules; raises ShardingError
    parts = _parts(leaf, spec)
    weight, weight_spec = parts[0]
    weight_shard = shard_shape(weight.shape, weight_spec, sizes)
    packing = 2 if isinstance(leaf, QuantizedWeight4bit) else 1  # logical rows per stored row
    return LeafPlan(
        path, group_of(path),
        logical_bytes=sum(nbytes(a.shape, a.dtype) for a, _ in parts),
        device_bytes=sum(nbytes(shard_shape(a.shape, s, sizes), a.dtype) for a, s in parts),
        elements_per_device=math.prod(weight_shard) * packing,
        shape=tuple(leaf.shape),
        row_blocks=leaf.scales.shape[-2] if is_quantized(leaf) else None,
        input_split=(weight.shape[-2] // weight_shard[-2] if len(weight.shape) >= 2 else 1),
        in_panels=in_panels)


@functools.lru_cache(maxsize=64)
def param_plan(config: ModelConfig, weight_format: str, float_dtype: Optional[str],
               mesh_key: tuple, int8_group_size: Optional[int] = None,
               int4_group_size: Optional[int] = None,
               stored_tables: Optional[tuple] = None,
               panel_bytes: Optional[tuple] = None,
               cpu_panels: bool = False) -> tuple[LeafPlan, ...]:
    """A LeafPlan per parameter of `config` stored in `weight_format` on a mesh of
    dict(mesh_key); on a mesh of one device, the parameters `panel_bytes` names ((path,
    bytes), ...: panel_forms.panel_bytes) at those bytes and, with `cpu_panels` (one CPU
    device's panel kernels will hold the weights), those they read in place marked so."""
    sizes = dict(mesh_key)
    mesh = PaperMesh(sizes)
    tree = abstract_weights(config, weight_format, float_dtype, int8_group_size,
                            int4_group_size, stored_tables)
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]
    one = mesh.size == 1
    floats = config.dtype == "float32"  # float weights in panels too (layout.tiled_chosen)
    plans = [_leaf_plan(path, leaf, mesh, sizes,
                        one and cpu_panels and held_in_panels(path, leaf, floats))
             for path, leaf in ((param_path(keys), leaf) for keys, leaf in leaves)]
    held = dict(panel_bytes or ()) if one else {}
    return tuple(dataclasses.replace(p, logical_bytes=held[p.path], device_bytes=held[p.path])
                 if p.path in held else p for p in plans)


# --- decode memory --------------------------------------------------------------------------------

def ssm_state_device_bytes(config: ModelConfig, slots: int, sizes: Mapping[str, int]) -> int:
    """A constant-size decode state (is_ssm) on one device under the model's memory_specs
    (slots over data, heads over model): Mamba-2's convolution and SSM states, Palm's running
    sums, positions; any cache length."""
    model = build_model(config)
    shapes = jax.eval_shape(lambda: model.new_memory(slots, None))
    specs = model.memory_specs(slots, PaperMesh(sizes))
    return sum(nbytes(shard_shape(leaf.shape, spec, sizes), leaf.dtype) for leaf, spec in
               zip(jax.tree.leaves(shapes), jax.tree.leaves(
                   specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))))


def kv_device_bytes(config: ModelConfig, slots: int, cache_length: int,
                    sizes: Mapping[str, int]) -> int:
    """KV memory of one device under memory.memory_specs: keys + values [L, B, K, S, H] in the
    memory's dtype (kv_dtype; slots over data, kv heads over model, else head dim, else replicated)
    and positions [B] int32; K as the engine stores them (make_plan passes the config with
    kv_heads.py's copies). (Mamba-2: its decode state, see ssm_state_device_bytes.)"""
    if is_ssm(config):
        return ssm_state_device_bytes(config, slots, sizes)
    specs = memory_specs(config, slots, PaperMesh(sizes))
    shape = kv_shape(config, slots, memory_length(config, cache_length))
    return (2 * nbytes(shard_shape(shape, specs.keys, sizes), kv_dtype(config))
            + nbytes(shard_shape((slots,), specs.positions, sizes), np.int32))


def kv_logical_bytes(config: ModelConfig, slots: int, cache_length: int) -> int:
    if is_ssm(config):
        shapes = jax.eval_shape(lambda: build_model(config).new_memory(slots, None))
        return sum(nbytes(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(shapes))
    return 2 * nbytes(kv_shape(config, slots, memory_length(config, cache_length)),
                      kv_dtype(config)) + 4 * slots
