"""KV heads stored several times over when the mesh's model axis has more devices than the model
has KV heads (the rule Megatron-LM and vLLM follow for tensor parallelism beyond the KV heads).

Shape glossary: L layers, D model width, K kv heads, N query heads, H head dim, m model axis,
r copies of each KV head, R scale row blocks.

The query heads are split over `model` (whole heads), so each device needs the KV heads of its
own query heads. When m does not divide K, the KV memory cannot be split by heads; it was split
by head dim instead (memory.memory_specs), and XLA:SPMD then gathered each layer's whole KV
memory onto every device on every decode step to multiply it with head-split queries ("Involuntary
full rematerialization"; BENCHMARKS.md, "KV heads gathered when the model axis outnumbers them").

Storing each KV head r times (K' = K r = lcm(K, m) heads, head k' a copy of head k' // r) makes
the memory split by heads again: a device holds the KV heads of its own query heads and decode
moves nothing between devices for attention. Query head j still reads a copy of KV head j // G
(G = N / K): j // (G / r) // r = j // G. The cost is memory: each device holds K' / m heads
instead of K / m of a head's width, r times the KV bytes (planning/shards.py counts them), and
the K/V projections compute r times the (small) columns.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from runtime.config import ModelConfig
from runtime.layer_types import LayersByType
from runtime.paths import STACKED
from runtime.quant import QuantizedWeight8bit
from runtime.quant4 import QuantizedWeight4bit
from runtime.sharding import leaf_spec, shardings

# The KV projections in the stacked parameter tree: w [L, D, K * H] (int8: scales [L, R, K * H]).
KV_PROJECTIONS = tuple(f"{STACKED}multi_head_attention/{p}"
                       for p in ("key", "value"))


def kv_head_copies(config: ModelConfig, model_axis: int) -> int:
    """r: how many times each KV head is stored on a mesh whose model axis has `model_axis`
    devices. 1 when m divides K (or m is 1), and where copies would not help: other
    architectures, or query heads the copies cannot split evenly (N not a multiple of
    lcm(K, m))."""
    heads, model_axis = config.num_kv_heads, max(model_axis, 1)
    if config.architecture != "transformer" or heads % model_axis == 0:
        return 1
    stored = math.lcm(heads, model_axis)
    if config.num_q_heads % stored:
        return 1
    return stored // heads


def with_kv_head_copies(config: ModelConfig, copies: int) -> ModelConfig:
    """The config the engine runs: K * copies KV heads (the same model)."""
    return config if copies == 1 else config.replace(num_kv_heads=config.num_kv_heads * copies)


def _repeat_heads(a, heads: int, copies: int):
    """[..., K * H] -> [..., K * copies * H], each head's H columns repeated in place."""
    *lead, width = a.shape
    split = jnp.reshape(a, (*lead, heads, width // heads))
    return jnp.repeat(split, copies, axis=-2).reshape(*lead, width * copies)


def copy_kv_heads(params: dict, heads: int, copies: int, mesh=None) -> dict:
    """The stacked parameter tree of a model with `heads` KV heads, with each KV projection's
    heads stored `copies` times (for with_kv_head_copies); the other leaves are the same
    objects. With a mesh, the new projections are computed and placed on it under the
    partition rules."""
    if copies == 1:
        return params

    def widened(leaf):
        if isinstance(leaf, (QuantizedWeight8bit, QuantizedWeight4bit, LayersByType)):
            # every part (values, scales, mins) is per output column: each repeated alike
            return jax.tree.map(lambda a: _repeat_heads(a, heads, copies), leaf)
        return _repeat_heads(leaf, heads, copies)

    out = dict(params)
    for module in KV_PROJECTIONS:
        if module not in params:
            continue
        weight = params[module]["w"]
        if mesh is None:
            out[module] = {"w": widened(weight)}
            continue
        placed = shardings(leaf_spec(f"{module}/w", jax.eval_shape(widened, weight), mesh), mesh)
        out[module] = {"w": jax.jit(widened, out_shardings=placed)(weight)}
    return out


def memory_split_by_heads(config: ModelConfig, model_axis: int) -> bool:
    """Whether the engine's KV memory splits by heads over a model axis of this size (with the
    copies above). False: it splits by head dim, and XLA gathers each layer's whole KV memory
    onto every device at every decode step (Grok-1's 48 query heads on model=32, checked on 32
    simulated devices)."""
    if config.architecture != "transformer" or model_axis <= 1:
        return True
    stored = with_kv_head_copies(config, kv_head_copies(config, model_axis)).num_kv_heads
    return stored % model_axis == 0


def head_splitting_meshes(config: ModelConfig, sizes: dict) -> list[dict]:
    """The same devices with a smaller model axis over which the KV memory splits by heads, the
    factor moved onto `expert` (MoE models whose experts it divides) or else `data`: largest
    model axis first. The caller checks the partition rules and the memory."""
    model = sizes.get("model", 1)
    out = []
    for smaller in range(model - 1, 0, -1):
        if model % smaller or not memory_split_by_heads(config, smaller):
            continue
        factor = model // smaller
        expert = sizes.get("expert", 1) * factor
        axis = "expert" if config.is_moe and config.num_experts % expert == 0 else "data"
        out.append({**sizes, "model": smaller, axis: sizes.get(axis, 1) * factor})
    return out
