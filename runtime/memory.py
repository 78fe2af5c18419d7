"""KV memory: preallocated keys/values for every layer and batch slot, plus per-row positions.

Shapes: L layers, B slots, K kv heads, S cache length, H head dim.

Layout [L, B, K, S, H]: each (row, kv head) holds its S positions contiguously, the layout both
attention matmuls read (keys contracted over H, values over S) without re-laying a layer's
memory out every step; a decode step writes one [H] vector per (layer, row, head).

The keys (and values) are one stacked array [L, B, K, S, H] for the model that scans its layers,
or L separate arrays [B, K, S, H] ("per layer") for the model that runs them unrolled (the
engine's choice on the CPU). XLA has no views: a layer's slice of a stacked array that feeds a
matmul is a copy, and an array read by every layer and then updated in place got whole-array
copies on top (XLA:CPU: 3-4 copies of all the memory per decode step). Separate arrays feed the
attention matmuls as they are and each takes its one-token write in place.
`positions[b]` is the number of tokens already written to row b: the RoPE position of its next
token. Position p lives in slot p mod S: for most models S is the cache length and no position
reaches it (slots past a row's position hold stale data that attention masks); a sliding-window
model's memory is a ring of S = window slots (memory_length), so it stays at its window however
long the prompt: each write overwrites the one position no later query can see.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from runtime.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVMemory:
    keys: jax.Array | tuple  # [L, B, K, S, H], or per layer: L x [B, K, S, H]
    values: jax.Array | tuple  # as keys
    positions: jax.Array  # [B] int32

    @property
    def per_layer(self) -> bool:
        return isinstance(self.keys, (tuple, list))

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0] if self.per_layer else self.keys.shape[1]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.per_layer else self.keys.shape[3]


def memory_layers(config: ModelConfig) -> int:
    """Layers with their own keys/values: each recursion step over the shared stack has its own."""
    return config.num_layers * config.recursion_steps


def kv_shape(config: ModelConfig, slots: int, length: int) -> tuple[int, ...]:
    """[L, B, K, S, H] of the keys (and of the values)."""
    return (memory_layers(config), slots, config.num_kv_heads, length, config.key_size)


def kv_dtype(config: ModelConfig) -> jnp.dtype:
    """The keys' and values' dtype: config.kv_dtype, else the activation dtype."""
    return jnp.dtype(config.kv_dtype or config.dtype)


def empty_kv(config: ModelConfig, slots: int, length: int, dtype=None) -> jax.Array:
    """Zero keys (or values) [L, B, K, S, H], in the memory's dtype (kv_dtype) unless given: a
    prompt's own keys are rounded to it before its attention reads them, as decode reads them
    from the memory."""
    return jnp.zeros(kv_shape(config, slots, length), jnp.dtype(dtype or kv_dtype(config)))


def init_memory(config: ModelConfig, slots: int, length: int | None = None,
                per_layer: bool = False) -> KVMemory:
    length = config.sequence_len if length is None else length
    shape = kv_shape(config, slots, length)
    dtype = kv_dtype(config)

    def zeros():
        if per_layer:
            return tuple(jnp.zeros(shape[1:], dtype) for _ in range(shape[0]))
        return jnp.zeros(shape, dtype)

    return KVMemory(zeros(), zeros(), jnp.zeros((slots,), jnp.int32))


def memory_specs(config: ModelConfig, slots: int, mesh: Mesh,
                 per_layer: bool = False) -> KVMemory:
    """Slots over `data` (when they divide), kv heads over `model` (else head dim, else none)."""
    def fits(axis, size):
        return axis in mesh.shape and size % mesh.shape[axis] == 0

    batch = "data" if fits("data", slots) else None
    heads = "model" if fits("model", config.num_kv_heads) else None
    dim = "model" if heads is None and fits("model", config.key_size) else None
    if per_layer:
        kv = (PartitionSpec(batch, heads, None, dim),) * memory_layers(config)
    else:
        kv = PartitionSpec(None, batch, heads, None, dim)
    return KVMemory(kv, kv, PartitionSpec(batch))


def write_kv_slots(memory: KVMemory, fresh: KVMemory, slots) -> KVMemory:
    """Rows of `fresh` (stacked: n rows of T tokens, from position 0) into `slots` [n] of
    `memory` (stacked or per layer); out-of-range slots (padding rows) are dropped. A ring
    shorter than T takes each row's last S positions, each in its slot p mod S."""
    from runtime import cpu_kernels

    if fresh.length > memory.length:
        fresh = _last_positions(fresh, memory.length)
    length = fresh.length
    slots = jnp.asarray(slots, jnp.int32)
    columns = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (slots.shape[0], length))

    def write(cache, new):  # new [L, n, K, T, H]
        if cpu_kernels.write_kv_usable((cache[0] if memory.per_layer else cache).dtype):
            # in place (cpu_kernels.write_kv: XLA:CPU widens a bf16 update), [.., T, K, H]
            if memory.per_layer:
                return tuple(cpu_kernels.write_kv(layer, new[i].transpose(0, 2, 1, 3), slots,
                                                  columns) for i, layer in enumerate(cache))
            return cpu_kernels.write_kv(cache, new.transpose(0, 1, 3, 2, 4), slots, columns)
        if memory.per_layer:
            return tuple(layer.at[slots, :, :length].set(new[i], mode="drop")
                         for i, layer in enumerate(cache))
        return cache.at[:, slots, :, :length].set(new, mode="drop")

    return KVMemory(write(memory.keys, fresh.keys), write(memory.values, fresh.values),
                    memory.positions.at[slots].set(fresh.positions, mode="drop"))


def memory_length(config: ModelConfig, cache_length: int) -> int:
    """Slots per row for a context of cache_length tokens: a sliding-window model keeps only its
    window (a ring), every other model all of them."""
    if config.sliding_window is not None and config.sliding_window < cache_length:
        return config.sliding_window
    return cache_length


def held_positions(size: int, read: int, last):
    """[B, read] int32: the position in each of the first `read` slots of a memory of `size`
    slots whose rows have written up to positions last [B] (slot j holds the latest p <= last
    with p = j mod size); negative where nothing was written."""
    slots = jnp.arange(read, dtype=jnp.int32)
    return last[:, None] - jnp.mod(last[:, None] - slots, size)


def memory_bytes(config: ModelConfig, slots: int, length: int | None = None) -> int:
    length = memory_length(config, config.sequence_len if length is None else length)
    return 2 * math.prod(kv_shape(config, slots, length)) * kv_dtype(config).itemsize


def _last_positions(fresh: KVMemory, size: int) -> KVMemory:
    """Stacked `fresh` rows (from position 0, positions [n] tokens each) as rings of `size`
    slots: slot j holds the row's latest position p = j mod size (see held_positions)."""
    held = jnp.maximum(held_positions(size, size, fresh.positions - 1), 0)  # [n, S]
    index = held[None, :, None, :, None]  # [1, n, 1, S, 1] into [L, n, K, T, H]
    take = lambda a: jnp.take_along_axis(a, index, axis=3)  # noqa: E731
    return KVMemory(take(fresh.keys), take(fresh.values), fresh.positions)
