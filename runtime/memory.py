"""KV memory: preallocated keys/values for every layer and batch slot, plus per-row positions.

Shapes: L layers, B slots, S cache length, K kv heads, H head dim.
`positions[b]` is the number of tokens already written to row b: both the RoPE position and the
write offset of its next token. Slots past a row's position hold stale data that attention masks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from runtime.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVMemory:
    keys: jax.Array  # [L, B, S, K, H]
    values: jax.Array  # [L, B, S, K, H]
    positions: jax.Array  # [B] int32

    @property
    def slots(self) -> int:
        return self.keys.shape[1]

    @property
    def length(self) -> int:
        return self.keys.shape[2]


def memory_layers(config: ModelConfig) -> int:
    """Layers with their own keys/values: each recursion step over the shared stack has its own."""
    return config.num_layers * config.recursion_steps


def init_memory(config: ModelConfig, slots: int, length: int | None = None) -> KVMemory:
    length = config.sequence_len if length is None else length
    shape = (memory_layers(config), slots, length, config.num_kv_heads, config.key_size)
    dtype = jnp.dtype(config.dtype)
    return KVMemory(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                    jnp.zeros((slots,), jnp.int32))


def memory_specs(config: ModelConfig, slots: int, mesh: Mesh) -> KVMemory:
    """Slots over `data` (when they divide), kv heads over `model` (else head dim, else none)."""
    def fits(axis, size):
        return axis in mesh.shape and size % mesh.shape[axis] == 0

    batch = "data" if fits("data", slots) else None
    heads = "model" if fits("model", config.num_kv_heads) else None
    dim = "model" if heads is None and fits("model", config.key_size) else None
    kv = PartitionSpec(None, batch, None, heads, dim)
    return KVMemory(kv, kv, PartitionSpec(batch))


def write_kv_slots(memory: KVMemory, fresh: KVMemory, slots) -> KVMemory:
    """Rows of `fresh` (n rows of T <= S tokens, from position 0) into `slots` [n] of `memory`;
    out-of-range slots (padding rows) are dropped."""
    length = fresh.keys.shape[2]
    return KVMemory(memory.keys.at[:, slots, :length].set(fresh.keys, mode="drop"),
                    memory.values.at[:, slots, :length].set(fresh.values, mode="drop"),
                    memory.positions.at[slots].set(fresh.positions, mode="drop"))


def memory_bytes(config: ModelConfig, slots: int, length: int | None = None) -> int:
    length = config.sequence_len if length is None else length
    return (2 * memory_layers(config) * slots * length * config.num_kv_heads * config.key_size
            * jnp.dtype(config.dtype).itemsize)
