"""Device mesh, regex partition rules, and placement of parameters on the mesh.

The rules map every parameter path (see paths.py and models/transformer.py) to logical axis names per dimension. Logical
names resolve to mesh axes by name; an axis the mesh lacks means "replicated". Every parameter
must match exactly one rule: a miss or a double match raises ShardingError naming the path.
For a QuantizedWeight8bit the rule describes the int8 weight; each scales dimension follows the
weight's dimension of the same size (so column-parallel scales shard with the output channels,
row-block scales of row-parallel weights are replicated). For a QuantizedWeight4bit the rule
describes the packed codes [..., I/2, O]; scales and mins [..., G, O] follow it dimension by
dimension, their groups split with the packed rows (whole groups per device: replicating
Grok-1's row-parallel int4 scales would cost 13 GB per device); where the groups do not divide
over the mesh axis, the rows are not split.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from runtime.errors import ShardingError
from runtime.layer_types import LayersByType
from runtime.quant import QuantizedEmbedding, QuantizedWeight8bit
from runtime.quant4 import QuantizedWeight4bit

MESH_AXES = ("data", "expert", "model")  # allowed --mesh axis names, outermost first

# (regex on the parameter path, logical axis per dimension). "layers" is the stacked layer axis,
# never sharded: the layer scan walks it.
PARTITION_RULES: tuple[tuple[str, tuple], ...] = (
    (r"^language_model/in_out_embed/embeddings$", (None, "model")),
    (r"^language_model/(rms|layer)_norm/scale$", (None,)),
    (r"/decoder_layer/(rms|layer)_norm(_[123])?/scale$", ("layers", None)),
    (r"/decoder_layer/multi_head_attention/(query|key)_norm/scale$", ("layers", None)),
    (r"/decoder_layer/multi_head_attention/(query|key|value)/w$", ("layers", None, "model")),
    (r"/decoder_layer/multi_head_attention/linear/w$", ("layers", "model", None)),
    (r"/decoder_layer/router/w$", ("layers", None, None)),
    (r"/decoder_layer/moe/(linear|linear_v)/w$", ("layers", "expert", None, "model")),
    (r"/decoder_layer/moe/linear_1/w$", ("layers", "expert", "model", None)),
    (r"/decoder_layer/mlp/(linear|linear_v)/w$", ("layers", None, "model")),
    (r"/decoder_layer/mlp/linear_1/w$", ("layers", "model", None)),
    (r"^language_model/unembed/w$", (None, "model")),
    # Mamba-2 (runtime/mamba2.py; embeddings, final norm and unembed share the rules above).
    # Heads over `model`: in_proj_z/x columns and the x convolution channels are I = H * P, whole
    # heads when H divides; out_proj is row-parallel. B/C (G * N channels, shared by the heads
    # of a group) are small and replicated, like their convolution.
    (r"/mamba_layer/rms_norm/scale$", ("layers", None)),
    (r"/mamba_layer/mixer/in_proj_(z|x|dt)/w$", ("layers", None, "model")),
    (r"/mamba_layer/mixer/in_proj_(b|c)/w$", ("layers", None, None)),
    (r"/mamba_layer/mixer/conv_x/w$", ("layers", None, "model")),
    (r"/mamba_layer/mixer/conv_x/b$", ("layers", "model")),
    (r"/mamba_layer/mixer/conv_(b|c)/w$", ("layers", None, None)),
    (r"/mamba_layer/mixer/conv_(b|c)/b$", ("layers", None)),
    (r"/mamba_layer/mixer/(dt_bias|a_log|d)$", ("layers", "model")),
    (r"/mamba_layer/mixer/gated_rms_norm/scale$", ("layers", "model")),
    (r"/mamba_layer/mixer/out_proj/w$", ("layers", "model", None)),
    # Palm (models/palm.py; its low-rank table [V, R] and unembed [R, V] share the rules above).
    # Heads over `model`: query/key/value columns are whole heads when N divides, the running
    # sums follow them, proj_in is row-parallel. The rank-R factors on the D side are small
    # and replicated.
    (r"^language_model/(embed_proj|unembed_in)/w$", (None, None)),
    (r"/aod_block/(qkv_in|proj_u|proj_g)/w$", ("layers", None, None)),
    (r"/aod_block/(query|key|value)/w$", ("layers", None, "model")),
    (r"/aod_block/proj_in/w$", ("layers", "model", None)),
)


def parse_mesh_flag(text: str) -> dict[str, int]:
    """'data=1,model=8' -> {'data': 1, 'model': 8}; errors name the flag and the bad part."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ShardingError(f"--mesh {text!r}: expected AXIS=SIZE with AXIS in "
                                f"{', '.join(MESH_AXES)}, got {part!r}")
        if name in sizes:
            raise ShardingError(f"--mesh {text!r}: axis {name!r} given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            sizes[name] = 0
        if sizes[name] < 1:
            raise ShardingError(f"--mesh {text!r}: size of {name!r} must be a positive integer")
    if not sizes:
        raise ShardingError(f"--mesh {text!r}: no axes given")
    return sizes


def make_mesh(sizes: Mapping[str, int], devices: Sequence | None = None) -> Mesh:
    """Axes in MESH_AXES order, outermost first. Devices are ordered by host, so with several
    hosts the outer axes (data, expert) span hosts and the inner model axis stays within one
    host's fast interconnect whenever model <= devices per host (a hybrid mesh)."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id)) \
        if devices is None else list(devices)
    needed = math.prod(sizes.values())
    if needed > len(devices):
        raise ShardingError(f"mesh {format_mesh(sizes)} needs {needed} devices, "
                            f"only {len(devices)} available")
    names = tuple(a for a in MESH_AXES if a in sizes)
    grid = np.array(devices[:needed], dtype=object).reshape([sizes[a] for a in names])
    return Mesh(grid, names)


def format_mesh(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{a}={sizes[a]}" for a in MESH_AXES if a in sizes)


def param_path(keys) -> str:
    """Key path of a params-dict leaf -> 'module/param' (QuantizedWeight8bit fields dropped)."""
    return "/".join(str(getattr(k, "key")) for k in keys if hasattr(k, "key"))


def _rule_for(path: str, rank: int):
    matches = [spec for pattern, spec in PARTITION_RULES if re.search(pattern, path)]
    if not matches:
        raise ShardingError(f"parameter {path} matches no partition rule")
    if len(matches) > 1:
        raise ShardingError(f"parameter {path} matches {len(matches)} partition rules")
    if len(matches[0]) != rank:
        raise ShardingError(f"parameter {path}: partition rule has {len(matches[0])} axes, "
                            f"parameter has rank {rank}")
    return matches[0]


def _mesh_spec(logical: tuple, shape: tuple, mesh: Mesh, path: str) -> PartitionSpec:
    axes = []
    for dim, name in zip(shape, logical):
        if name is None or name not in mesh.shape:
            axes.append(None)
            continue
        if dim % mesh.shape[name]:
            raise ShardingError(f"parameter {path}: dimension of size {dim} cannot be split over "
                                f"mesh axis {name!r} of size {mesh.shape[name]}")
        axes.append(name)
    return PartitionSpec(*axes)


def leaf_spec(path: str, leaf, mesh: Mesh):
    """PartitionSpec of one parameter (a QuantizedWeight8bit of specs for an int8 weight)."""
    if isinstance(leaf, LayersByType):
        return LayersByType([leaf_spec(path, stack, mesh) for stack in leaf.stacks], leaf.kinds)
    if isinstance(leaf, QuantizedEmbedding):  # scales [R, V] are small: replicated
        logical = _rule_for(path, len(leaf.weight.shape))
        replicated = PartitionSpec(None, None)
        return QuantizedEmbedding(_mesh_spec(logical, leaf.weight.shape, mesh, path), replicated,
                                  None if leaf.mins is None else replicated,
                                  None if leaf.row_scales is None else replicated)
    if isinstance(leaf, QuantizedWeight8bit):
        logical = _rule_for(path, len(leaf.weight.shape))
        scales_logical = tuple(name if s == w else None for name, s, w in
                               zip(logical, leaf.scales.shape, leaf.weight.shape))
        scales = _mesh_spec(scales_logical, leaf.scales.shape, mesh, path + " (scales)")
        return QuantizedWeight8bit(_mesh_spec(logical, leaf.weight.shape, mesh, path), scales,
                                   None if leaf.mins is None else scales)  # mins: as scales
    if isinstance(leaf, QuantizedWeight4bit):
        return _int4_spec(path, leaf, mesh)
    return _mesh_spec(_rule_for(path, len(leaf.shape)), leaf.shape, mesh, path)


def _int4_spec(path: str, leaf: QuantizedWeight4bit, mesh: Mesh) -> QuantizedWeight4bit:
    packed = leaf.packed.shape  # [..., P, O]
    logical = _rule_for(path, len(packed))
    rows_axis = logical[-2]
    groups = leaf.scales.shape[-2]
    whole_groups = rows_axis is None or rows_axis not in mesh.shape \
        or groups % mesh.shape[rows_axis] == 0
    if not whole_groups:  # a shard would cut a group: rows replicated (tiny weights only;
        logical = (*logical[:-2], None, logical[-1])  # Grok-1's split into whole groups)
    scales = _mesh_spec(logical, leaf.scales.shape, mesh, path + " (scales)")
    return QuantizedWeight4bit(_mesh_spec(logical, packed, mesh, path), scales,
                               None if leaf.mins is None else scales)


def param_specs(params, mesh: Mesh):
    """Tree of PartitionSpec mirroring params (QuantizedWeight8bit leaves get one per field)."""
    return jax.tree_util.tree_map_with_path(
        lambda keys, leaf: leaf_spec(param_path(keys), leaf, mesh), params,
        is_leaf=lambda x: isinstance(x, (QuantizedWeight8bit, QuantizedWeight4bit)))


def place_leaf(path: str, leaf, mesh: Mesh):
    """Put one parameter on its devices under the partition rules (host copy can go after)."""
    return jax.device_put(leaf, shardings(leaf_spec(path, leaf, mesh), mesh))


def shardings(specs, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def place_params(params, mesh: Mesh):
    """Put every parameter on the mesh under the partition rules."""
    return jax.device_put(params, shardings(param_specs(params, mesh), mesh))


def default_mesh_sizes(abstract, n_devices: int, n_processes: int = 1) -> dict[str, int]:
    """All devices on `model` if every model-sharded dimension allows it, else the largest
    divisor of the device count that does. One process leaves the other devices idle (--mesh can
    use them for data); several processes put the remaining factor on `data` so that every
    process takes part (each then holds whole replicas)."""
    for size in sorted((d for d in range(1, n_devices + 1) if n_devices % d == 0), reverse=True):
        if n_processes > 1 and size % (n_devices // n_processes) and \
                (n_devices // n_processes) % size:
            continue  # keep the model axis within hosts or spanning whole hosts
        try:
            param_specs(abstract, make_mesh({"data": 1, "model": size}, jax.devices()[:size]))
        except ShardingError:
            continue
        return {"data": n_devices // size if n_processes > 1 else 1, "model": size}
    return {"data": n_devices if n_processes > 1 else 1, "model": 1}
