"""Palm (github SrijanSriv211/Palm, a nanoGPT-based experiment) in Haiku: the math, top to
bottom. Attention On Detail blocks over factorized linears; no KV memory.

Shape glossary (einsum letters and shape comments):
  B batch rows, T tokens of this call, D model width (emb_size), V vocab, R rank of the
  factorized linears (low_rank), N heads, H head dim (key_size), Q = N * H, L distinct blocks,
  A block applications = recursion_steps x L x block_repeats.

  norm(x)          x / sqrt(mean(x^2) + eps) over the last axis, no parameter (torch's
                   F.rms_norm without a weight; eps = norm_eps, float32's machine epsilon)
  factorized(x)    x @ W_in [in, R], then relu(.)^2 when `act`, then @ W_out [R, out]
  embedding        table [V, R] rows, @ embed_proj [R, D] (full rank), then norm
  block            q, k, v = factorized(norm(x), act) split into N heads of H   [B, T, N, H]
                   q, k = rotary(norm(q)), rotary(norm(k))          (norm over H, per head)
                   y = relu(q) * (S + cumsum_t(sigmoid(k_t) * v_t))   an AFT-style causal
                   linear attention (arXiv 2105.14103): no softmax, no q.k product
                   u, g = factorized(y) split in two (no act)                 [B, T, D] each
                   x + u * silu(g)                        (no separate feed-forward network)
  head             norm, then factorized D -> V (no act)
  rotary           H/4 angular frequencies (1/rope_base) ** linspace(0, 1, H/4), then H/4
                   zeros, over the two halves of a head: y1 = x1 cos + x2 sin,
                   y2 = -x1 sin + x2 cos, at absolute positions from 0.

Order: per recursion step, each of the L blocks applied block_repeats times in a row (Palm's
d_layer: b1 b1 b2 b2); recursion_steps repeats that whole stack.

Decode state (SumMemory): S = the sum over consumed tokens of sigmoid(k) * v, per block
application and head, float32 [A, B, N, H]: a row's whole past, constant in the context length
(like Mamba-2's). A call of T tokens continues S with its cumulative sums, so a prompt can be
fed whole or in chunks; tokens past a row's lengths[b] add nothing (an idle row, length 0,
keeps its state bit for bit).

Matmuls go through products.linear (float32 or QuantizedWeight8bit weights) in `config.dtype`;
norms, rotary, the sums and the residual stream are float32.

Parameter paths (stacked blocks [L, ...]; the one path language of rules, readers, messages):
  language_model/in_out_embed/embeddings [V, R]       language_model/embed_proj/w [R, D]
  language_model/palm/layers/aod_block/qkv_in/w [L, D, R],
    .../{query,key,value}/w [L, R, Q] (the qkv linear's W_out, split so heads shard cleanly),
    .../proj_in/w [L, Q, R], .../proj_u/w, .../proj_g/w [L, R, D] (c_proj's W_out, split)
  language_model/unembed_in/w [D, R]                  language_model/unembed/w [R, V]
"""

from __future__ import annotations

import dataclasses
import math

import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from runtime.config import ModelConfig
from runtime.models.api import Model
from runtime.models.layers import matmul_weight
from runtime.products import linear
from runtime.tables import embedding_rows

F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SumMemory:
    sums: jax.Array  # [A, B, N, H] float32: sum of sigmoid(k) * v over each row's past
    positions: jax.Array  # [B] int32: tokens each row has consumed

    @property
    def slots(self) -> int:
        return self.sums.shape[1]


def applications(c: ModelConfig) -> int:
    """A: how many times a block runs per token (each with its own running sums)."""
    return c.recursion_steps * c.num_layers * c.block_repeats


def init_sum_memory(c: ModelConfig, slots: int, length: int | None = None) -> SumMemory:
    """Zeroed state for `slots` rows; `length` (the engine's cache length) does not matter."""
    del length  # constant in the context length
    return SumMemory(jnp.zeros((applications(c), slots, c.num_q_heads, c.key_size), F32),
                     jnp.zeros((slots,), jnp.int32))


def sum_memory_specs(c: ModelConfig, slots: int, mesh: Mesh) -> SumMemory:
    """Slots over `data` and heads over `model` where they divide (as the q/k/v columns)."""
    def fits(axis, size):
        return axis in mesh.shape and size % mesh.shape[axis] == 0

    rows = "data" if fits("data", slots) else None
    heads = "model" if fits("model", c.num_q_heads) else None
    return SumMemory(PartitionSpec(None, rows, heads, None), PartitionSpec(rows))


def write_sum_slots(memory: SumMemory, fresh: SumMemory, slots) -> SumMemory:
    """Rows of `fresh` (n rows) into `slots` [n] of `memory`; out-of-range slots are dropped."""
    return SumMemory(memory.sums.at[:, slots].set(fresh.sums, mode="drop"),
                     memory.positions.at[slots].set(fresh.positions, mode="drop"))


def norm(x, eps: float):
    """Parameter-free RMS norm over the last axis, in float32."""
    x = x.astype(F32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def rotary_tables(c: ModelConfig, positions):
    """cos, sin [B, T, 1, H/2] at positions [B, T]: H/4 frequencies, then H/4 zeros."""
    quarter = c.key_size // 4
    freqs = jnp.power(F32(1.0 / c.rope_base), jnp.linspace(0.0, 1.0, quarter, dtype=F32))
    freqs = jnp.concatenate([freqs, jnp.zeros((quarter,), F32)])  # [H/2]
    theta = positions.astype(F32)[..., None, None] * freqs  # [B, T, 1, H/2]
    return jnp.cos(theta), jnp.sin(theta)


def rotate(x, cos, sin):
    """x [B, T, N, H] float32, rotated by the tables of rotary_tables."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1)


def relu_squared(x):
    return jnp.square(jax.nn.relu(x))


def embedding_table(c: ModelConfig):
    """The low-rank token table `in_out_embed/embeddings` [V, R]."""
    with hk.name_scope("in_out_embed"):
        return hk.get_parameter("embeddings", [c.vocab_size, c.low_rank], F32,
                                init=hk.initializers.TruncatedNormal(1.0))


class AttentionOnDetail(hk.Module):
    def __init__(self, config: ModelConfig, name: str = "aod_block"):
        super().__init__(name=name)
        self.c = config

    def __call__(self, x, sums, cos, sin, consumed):
        # x [B, T, D] float32; sums [B, N, H] before this call; cos, sin [B, T, 1, H/2];
        # consumed [B, T]: which tokens the row takes. -> x, sums after the consumed tokens.
        c = self.c
        dtype = jnp.dtype(c.dtype)
        batch, length, width = x.shape
        heads, head_dim, rank = c.num_q_heads, c.key_size, c.low_rank
        inner = heads * head_dim
        eps = c.norm_eps
        low = relu_squared(linear(norm(x, eps).astype(dtype),
                                  matmul_weight("qkv_in", [width, rank]), out_dtype=F32))
        low = low.astype(dtype)  # [B, T, R]
        q, k, v = (linear(low, matmul_weight(name, [rank, inner]), out_dtype=F32)
                   .reshape(batch, length, heads, head_dim) for name in ("query", "key", "value"))
        q, k = rotate(norm(q, eps), cos, sin), rotate(norm(k, eps), cos, sin)  # [B, T, N, H]
        weighted = jnp.where(consumed[:, :, None, None], jax.nn.sigmoid(k) * v, 0.0)
        running = sums[:, None] + jnp.cumsum(weighted, axis=1)  # [B, T, N, H]
        y = (jax.nn.relu(q) * running).reshape(batch, length, inner).astype(dtype)
        low = linear(y, matmul_weight("proj_in", [inner, rank]))  # [B, T, R]
        u = linear(low, matmul_weight("proj_u", [rank, width]), out_dtype=F32)  # [B, T, D]
        g = linear(low, matmul_weight("proj_g", [rank, width]), out_dtype=F32)
        return x + u * jax.nn.silu(g), running[:, -1]


class Blocks(hk.Module):
    def __init__(self, config: ModelConfig, name: str = "palm"):
        super().__init__(name=name)
        self.c = config

    def __call__(self, x, sums, cos, sin, consumed):
        # x [B, T, D]; sums [A, B, N, H] in application order (step, block, repeat)
        c = self.c
        grouped = sums.reshape(c.recursion_steps, c.num_layers, c.block_repeats, *sums.shape[1:])

        def layer(x, layer_sums):  # layer_sums [block_repeats, B, N, H]
            block, out = AttentionOnDetail(c), []
            for r in range(c.block_repeats):  # one module: the repeats share its parameters
                x, new = block(x, layer_sums[r], cos, sin, consumed)
                out.append(new)
            return x, jnp.stack(out)

        steps = []
        for step in range(c.recursion_steps):
            # every step runs the same parameters: later steps re-enter the first stack's name
            name = "layers" if step == 0 else hk.experimental.force_name(
                f"{self.module_name}/layers")
            stack = hk.layer_stack(c.num_layers, with_per_layer_inputs=True, name=name)
            x, step_sums = stack(layer)(x, grouped[step])
            steps.append(step_sums)
        return x, jnp.stack(steps).reshape(sums.shape)


class LanguageModel(hk.Module):
    def __init__(self, config: ModelConfig, name: str = "language_model"):
        super().__init__(name=name)
        self.c = config

    def __call__(self, tokens, memory: SumMemory, lengths, output_index=None):
        """tokens [B, T], of which each row consumes its first lengths [B] after its state.

        Returns float32 logits [B, T, V] (or [B, V] at output_index [B] only) and the memory
        advanced by lengths tokens.
        """
        c = self.c
        dtype = jnp.dtype(c.dtype)
        length = tokens.shape[1]
        rows = embedding_rows(embedding_table(c), tokens).astype(dtype)  # [B, T, R]
        x = norm(linear(rows, matmul_weight("embed_proj", [c.low_rank, c.emb_size])),
                 c.norm_eps)  # [B, T, D]
        positions = memory.positions[:, None] + jnp.arange(length, dtype=jnp.int32)
        consumed = jnp.arange(length)[None, :] < lengths[:, None]  # [B, T]
        cos, sin = rotary_tables(c, positions)
        x, sums = Blocks(c)(x, memory.sums, cos, sin, consumed)  # [B, T, D]
        if output_index is not None:
            x = jnp.take_along_axis(x, output_index[:, None, None], axis=1)[:, 0]  # [B, D]
        low = linear(norm(x, c.norm_eps).astype(dtype),
                     matmul_weight("unembed_in", [c.emb_size, c.low_rank]))
        logits = linear(low, matmul_weight("unembed", [c.low_rank, c.vocab_size]), out_dtype=F32)
        return logits, SumMemory(sums, memory.positions + lengths)


def build_palm(config: ModelConfig) -> Model:
    """The Model (see models/api.py) of a Palm config: apply(params, tokens, memory, lengths,
    output_index=None) -> (logits, memory), and the family-neutral engine interface."""

    def forward(tokens, memory, lengths, output_index=None):
        return LanguageModel(config)(tokens, memory, lengths, output_index)

    transformed = hk.without_apply_rng(hk.transform(forward))

    @jax.jit
    def init(rng):
        # One token of one row: parameter shapes do not depend on it.
        return transformed.init(rng, jnp.zeros((1, 1), jnp.int32), init_sum_memory(config, 1),
                                jnp.ones((1,), jnp.int32))

    def step(params, memory: SumMemory, tokens, lengths):
        """Consume tokens [B, T] (the first lengths [B] of each row) after each row's state."""
        return transformed.apply(params, tokens, memory, lengths, jnp.maximum(lengths - 1, 0))

    def prefill(params, tokens, lengths):
        """Prompts from position 0: the sums start at zero, nothing is read."""
        return step(params, init_sum_memory(config, tokens.shape[0]), tokens, lengths)

    def chunk_step(params, memory: SumMemory, tokens, lengths, slots, starts, window=None):
        """A prompt chunk continuing rows slots [n] from positions starts [n] (see
        models/api.py): the rows' sums are gathered, zeroed where a new prompt starts, stepped
        and put back."""
        del window  # no memory positions to window
        new = (starts == 0)[None, :, None, None]
        rows = SumMemory(jnp.where(new, 0.0, memory.sums[:, slots]), starts.astype(jnp.int32))
        logits, rows = step(params, rows, tokens, lengths)
        return logits, write_sum_slots(memory, rows, slots)

    def all_logits(params, tokens, lengths=None):
        """Logits [n, T, V] of prompts tokens [n, T] at every position from 0 (lengths None:
        every token; causal, so padding after a prompt leaves its logits as they are)."""
        rows, length = tokens.shape
        lengths = jnp.full((rows,), length, jnp.int32) if lengths is None else lengths
        return transformed.apply(params, tokens, init_sum_memory(config, rows), lengths)[0]

    return Model(config, init, transformed.apply,
                 new_memory=lambda rows, length: init_sum_memory(config, rows, length),
                 memory_specs=lambda rows, mesh: sum_memory_specs(config, rows, mesh),
                 step=step, write_slots=write_sum_slots, chunk_step=chunk_step,
                 prefill=prefill, all_logits=all_logits)


def sum_memory_bytes(config: ModelConfig, slots: int = 1) -> int:
    """Bytes of the state of `slots` rows (whatever the cache length)."""
    return math.prod((applications(config), slots, config.num_q_heads, config.key_size)) * 4 \
        + 4 * slots
