"""Mamba-2 decode state: per layer and slot, a convolution state and an SSM state, plus positions.

Shapes: L layers, B slots, W convolution width, I = H * P inner width, G groups, N state size,
H heads, P head dim.

Unlike KV memory its size does not depend on the context length: a row's whole past is folded
into the last W - 1 convolution inputs and the [H, P, N] state. `positions[b]` counts the tokens
row b has consumed (the engine reads nothing else). The SSM state is float32 whatever the
activation dtype (it accumulates over the whole context); the convolution state holds
activations (in_proj outputs) in the activation dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from runtime.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SSMMemory:
    conv_x: jax.Array  # [L, B, W-1, I]    last W-1 inputs of the x channels of the convolution
    conv_b: jax.Array  # [L, B, W-1, G*N]  ... of the B channels
    conv_c: jax.Array  # [L, B, W-1, G*N]  ... of the C channels
    ssm: jax.Array  # [L, B, H, P, N] float32
    positions: jax.Array  # [B] int32

    @property
    def slots(self) -> int:
        return self.ssm.shape[1]


def init_ssm_memory(config: ModelConfig, slots: int, length: int | None = None) -> SSMMemory:
    """Zeroed state for `slots` rows; `length` (the engine's cache length) does not matter."""
    del length  # constant in the context length
    c = config
    layers, history = c.num_layers, c.ssm_conv_kernel - 1
    dtype = jnp.dtype(c.dtype)
    inner, bc = c.ssm_heads * c.ssm_head_dim, c.ssm_groups * c.ssm_state_size
    return SSMMemory(
        conv_x=jnp.zeros((layers, slots, history, inner), dtype),
        conv_b=jnp.zeros((layers, slots, history, bc), dtype),
        conv_c=jnp.zeros((layers, slots, history, bc), dtype),
        ssm=jnp.zeros((layers, slots, c.ssm_heads, c.ssm_head_dim, c.ssm_state_size), jnp.float32),
        positions=jnp.zeros((slots,), jnp.int32))


def ssm_memory_specs(config: ModelConfig, slots: int, mesh: Mesh) -> SSMMemory:
    """Slots over `data` (when they divide), heads over `model` (when they divide): the x
    convolution channels are whole heads then. B/C channels are shared by the heads of a group
    and replicated, as are their projections."""
    def fits(axis, size):
        return axis in mesh.shape and size % mesh.shape[axis] == 0

    rows = "data" if fits("data", slots) else None
    heads = "model" if fits("model", config.ssm_heads) else None
    shared = PartitionSpec(None, rows, None, None)
    return SSMMemory(conv_x=PartitionSpec(None, rows, None, heads), conv_b=shared, conv_c=shared,
                     ssm=PartitionSpec(None, rows, heads, None, None),
                     positions=PartitionSpec(rows))


def write_ssm_slots(memory: SSMMemory, fresh: SSMMemory, slots) -> SSMMemory:
    """Rows of `fresh` (n rows) into `slots` [n] of `memory`; out-of-range slots are dropped."""
    put = lambda whole, rows: whole.at[:, slots].set(rows.astype(whole.dtype), mode="drop")  # noqa
    return SSMMemory(conv_x=put(memory.conv_x, fresh.conv_x),
                     conv_b=put(memory.conv_b, fresh.conv_b),
                     conv_c=put(memory.conv_c, fresh.conv_c),
                     ssm=put(memory.ssm, fresh.ssm),
                     positions=memory.positions.at[slots].set(fresh.positions, mode="drop"))


def read_ssm_slots(memory: SSMMemory, slots) -> SSMMemory:
    """The rows `slots` [n] of `memory` (a chunk's working copy, put back by write_ssm_slots)."""
    take = lambda whole: whole[:, slots]  # noqa: E731
    return SSMMemory(conv_x=take(memory.conv_x), conv_b=take(memory.conv_b),
                     conv_c=take(memory.conv_c), ssm=take(memory.ssm),
                     positions=memory.positions[slots])


def ssm_memory_bytes(config: ModelConfig, slots: int = 1, length: int | None = None) -> int:
    """Bytes of the state of `slots` rows, from the shapes (whatever `length`)."""
    shapes = jax.eval_shape(lambda: init_ssm_memory(config, slots, length))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))
