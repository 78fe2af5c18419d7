"""Grok-1 family decoder in Haiku: the math, top to bottom.

Shape glossary (einsum letters and shape comments):
  B batch rows, T query length, S cache length, D model width (emb_size), N query heads,
  K kv heads, G query heads per kv head (N = K * G), H head dim (key_size), E experts,
  F expert ffn width, V vocab, L layers, M routed (token, expert) pairs, R scale row blocks.

Weights are float32 arrays or QuantizedWeight8bit (see quant.py); every matmul goes through the
helpers of products.py. Attention is attention.py. Activations are in `config.dtype`; norms,
RoPE, attention logits/softmax and the router run in float32, as in the reference. Layers run under hk.layer_stack (a scan over stacked
per-layer parameters and KV memory) so compile time does not grow with depth.

Parameter paths (the one path language of partition rules, readers and error messages):
  language_model/in_out_embed/embeddings                         [V, D]
  language_model/rms_norm/scale                                  [D]      final norm
  language_model/transformer/layers/decoder_layer/<module>/<param>  [L, ...] stacked layers:
    multi_head_attention/{query,key,value,linear}/w, rms_norm{,_1,_2,_3}/scale, router/w,
    moe/{linear,linear_v,linear_1}/w  [L, E, ...] (MoE), or mlp/{linear,linear_v,linear_1}/w (dense)
  language_model/unembed/w                                       [D, V]   untied output head only

Family features are config fields (see config.py): sandwich norms (rms_norm_1/_3 exist only with
them), dense or MoE FFN, gate renormalisation, activation, tied head, soft cap, sliding window,
Llama-3 RoPE scaling; block options: bias-free LayerNorm instead of RMSNorm (the norms are then
named layer_norm*), parallel attention + FFN from one norm (PaLM, GPT-J: rms_norm_2 is absent),
per-head QK-norm (multi_head_attention/{query,key}_norm/scale [L, H]), an ungated FFN (no
linear_v), and recursion: the one layer stack applied `recursion_steps` times (each application
has its own keys/values: the memory holds L x recursion_steps layers).
"""

from __future__ import annotations

import functools
import math

import haiku as hk
import jax
import jax.numpy as jnp

from runtime import cpu_kernels, layout
from runtime.config import ModelConfig
from runtime.expert_groups import group_tile, run_grouped, run_sorted
from runtime.memory import KVMemory, empty_kv, init_memory, write_kv_slots
from runtime.memory import memory_specs as kv_memory_specs
from runtime.models.api import Model
from runtime.models.attention import MultiHeadAttention, write_rows
from runtime.models.layer_scan import layer_scan
from runtime.models.memory_steps import chunk_step_fn, windowed_step_fn
from runtime.models.layers import F32, embedding_table, matmul_weight, norm, output_logits
from runtime.layer_types import layer_of
from runtime.paths import STACKED, UNROLLED
from runtime.products import (grouped_linears, linear, linears, per_tile_linear,
                              switched_tile_linear, switched_tiles)
from runtime.tables import embedding_rows

ACTIVATIONS = {"gelu_tanh": functools.partial(jax.nn.gelu, approximate=True), "silu": jax.nn.silu,
               "relu_squared": lambda a: jnp.square(jax.nn.relu(a))}  # Primer / Nemotron


def _expert_weights(name: str, shape: list[int]) -> list:
    """The E weights of `<scope>/<name>` [E, I, O] as E separate parameters w_0 .. w_{E-1}
    [I, O] (the unrolled model's layout, see unstack_layers)."""
    with hk.name_scope(name):
        stddev = 1.0 / math.sqrt(shape[-2])
        return [hk.get_parameter(f"w_{e}", shape[1:], F32,
                                 init=hk.initializers.TruncatedNormal(stddev))
                for e in range(shape[0])]


class MixtureOfExperts(hk.Module):
    """Top-k routed experts; each token is multiplied only by the weights of its own experts."""

    def __init__(self, config: ModelConfig, split_experts: bool = False, name: str = "moe"):
        super().__init__(name=name)
        self.c = config
        self.split_experts = split_experts  # one buffer per expert: <weight>/w_<e> [I, O]

    def __call__(self, x, gates, experts):
        # x [B, T, D]; gates, experts [B, T, k]: router probability and index of each choice
        c = self.c
        width, ffn, top = c.emb_size, c.ffn_size, c.num_selected_experts
        weight = _expert_weights if self.split_experts else matmul_weight
        w_in = weight("linear", [c.num_experts, width, ffn])
        w_gate = weight("linear_v", [c.num_experts, width, ffn]) if c.gated_ffn else None
        w_out = weight("linear_1", [c.num_experts, ffn, width])

        tokens = x.reshape(-1, width)  # [B*T, D]
        choice = experts.reshape(-1)  # [M], M = B*T*k, token-major
        rows = jnp.repeat(tokens, top, axis=0)  # [M, D]: row m is token m // k
        grouped = None
        # experts in panels: one kernel call from two tokens on, each hit expert read once
        grouping = tokens.shape[0] > 1 if layout.GROUPED_EXPERTS_FROM_TWO_TOKENS \
            else choice.shape[0] > c.num_experts
        if grouping and self.split_experts and layout.GROUPED_EXPERTS_IN_KERNEL:
            grouped = run_sorted(rows, choice, c.num_experts, functools.partial(
                _grouped_expert_ffn, c, (w_in, w_gate, w_out)))  # [M, D] or None
        if grouped is not None:
            out = grouped
        elif choice.shape[0] > c.num_experts:  # prefill, batched decode: group pairs by expert
            pick = (lambda w, e: w[e]) if self.split_experts else \
                (lambda w, e: jax.tree.map(lambda a: a[e], w))

            def expert_ffn(e, rows):  # rows [t, D] -> [t, D], expert e's weights only
                # The barrier ties the weights to this tile: XLA would otherwise hoist an int8
                # weight's conversion out of the tile loop as a separate, slow full-size
                # conversion, run even for experts with no tile (BENCHMARKS.md, "int8
                # widening on XLA:CPU").
                (w_e, v_e, o_e), rows = jax.lax.optimization_barrier(
                    ((pick(w_in, e), None if w_gate is None else pick(w_gate, e),
                      pick(w_out, e)), rows))
                hidden = ACTIVATIONS[c.activation](linear(rows, w_e))  # [t, F]
                if v_e is not None:
                    hidden = hidden * linear(rows, v_e)
                return linear(hidden, o_e)

            tile = group_tile(choice.shape[0], c.num_experts)
            out = run_grouped(rows, choice, c.num_experts, tile, expert_ffn, width)  # [M, D]
        else:  # few pairs (batch-1 decode): one row per pair, with its expert's weights
            out = _few_pairs(c, rows[:, None], choice, (w_in, w_gate, w_out),
                             self.split_experts)  # [M, 1, D]
        out = out.reshape(*gates.shape, width).astype(F32)  # [B, T, k, D]
        return jnp.einsum("btkd,btk->btd", out, gates).astype(x.dtype)


def _expert_ffn(c: ModelConfig, w_in, w_gate, w_out, rows):
    """One expert's FFN on its rows [t, D] -> [t, D]: gate and up in one kernel call where they
    are in panels (products.linears)."""
    act = ACTIVATIONS[c.activation]
    if w_gate is None:
        return linear(act(linear(rows, w_in)), w_out)
    gate, up = linears(rows, [w_in, w_gate])
    return linear(act(gate) * up, w_out)


def _grouped_expert_ffn(c: ModelConfig, weights, rows, sizes):
    """The expert FFN of rows [M, D] sorted by expert (expert e's the next sizes[e]) with split
    experts in panels: gate and up of every expert in one kernel call, then down in another,
    each expert's rows at their exact count (products.grouped_linears) -> [M, D]; None where
    the kernel does not take the weights (the tile loop of run_grouped then runs)."""
    w_in, w_gate, w_out = weights
    act = ACTIVATIONS[c.activation]
    first = grouped_linears(rows, sizes, [[w_in[e]] + ([] if w_gate is None else [w_gate[e]])
                                          for e in range(c.num_experts)])
    if first is None:
        return None
    hidden = act(first[0]) if w_gate is None else act(first[0]) * first[1]  # [M, F]
    out = grouped_linears(hidden, sizes, [[w_out[e]] for e in range(c.num_experts)])
    return None if out is None else out[0]


def _few_pairs(c: ModelConfig, rows, choice, weights, split_experts: bool):
    """The expert FFN of each routed pair at batch-1 decode: rows [M, 1, D], choice [M] ->
    [M, 1, D]. Split experts (one buffer each): each pair's whole FFN in one switch to its
    expert's buffers (layout.EXPERT_FFN_IN_ONE_SWITCH), else a switch per matmul; stacked
    experts: the routed experts' weights gathered per pair."""
    w_in, w_gate, w_out = weights
    if split_experts and layout.EXPERT_FFN_IN_ONE_SWITCH:
        return switched_tiles(rows, [functools.partial(
            _expert_ffn, c, w_in[e], None if w_gate is None else w_gate[e], w_out[e])
            for e in range(c.num_experts)], choice)
    if split_experts:  # each pair's matmul reads its expert's own buffer
        matmul = lambda t, w: switched_tile_linear(t, w, choice)  # noqa: E731
    else:  # the routed experts only, gathered per pair
        matmul = lambda t, w: per_tile_linear(  # noqa: E731
            t, jax.tree.map(lambda a: a[choice], w))
    hidden = ACTIVATIONS[c.activation](matmul(rows, w_in))  # [M, 1, F]
    if w_gate is not None:
        hidden = hidden * matmul(rows, w_gate)
    return matmul(hidden, w_out)  # [M, 1, D]


class FeedForward(hk.Module):
    """Dense FFN: act(x @ linear) * (x @ linear_v) @ linear_1, or act(x @ linear) @ linear_1
    when not gated."""

    def __init__(self, config: ModelConfig, name: str = "mlp"):
        super().__init__(name=name)
        self.c = config

    def __call__(self, x):  # [B, T, D]
        c = self.c
        if c.gated_ffn:  # gate and up in one kernel call where they are in panels
            gate, up = linears(x, [matmul_weight("linear", [c.emb_size, c.ffn_size]),
                                   matmul_weight("linear_v", [c.emb_size, c.ffn_size])])
            hidden = ACTIVATIONS[c.activation](gate) * up  # [B, T, F]
        else:
            hidden = ACTIVATIONS[c.activation](
                linear(x, matmul_weight("linear", [c.emb_size, c.ffn_size])))
        return linear(hidden, matmul_weight("linear_1", [c.ffn_size, c.emb_size]))


class DecoderLayer(hk.Module):
    def __init__(self, config: ModelConfig, split_experts: bool = False,
                 name: str = "decoder_layer"):
        super().__init__(name=name)
        self.c = config
        self.split_experts = split_experts

    def __call__(self, x, keys, values, positions, window=None, in_place=False, rows=None,
                 lengths=None):
        c = self.c
        normed = norm(c)(x)
        attn, keys, values = MultiHeadAttention(c)(normed, keys, values, positions, window,
                                                   in_place, rows, lengths)
        if c.sandwich_norms:
            attn = norm(c, "_1")(attn)
        if c.parallel_block:  # the FFN reads the same normalised input; one residual add
            return x + attn + self._ffn(normed), keys, values
        h = x + attn
        return h + self._ffn(norm(c, "_2")(h)), keys, values

    @hk.transparent  # a helper method, not a name scope: parameters stay under decoder_layer/
    def _ffn(self, normed):
        c = self.c
        if c.is_moe:
            router = matmul_weight("router", [c.emb_size, c.num_experts])
            probs = jax.nn.softmax(linear(normed.astype(F32), router), axis=-1)  # [B, T, E]
            gates, experts = jax.lax.top_k(probs, c.num_selected_experts)  # [B, T, k]
            if c.moe_renormalize:
                gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
            ffn = MixtureOfExperts(c, self.split_experts)(normed, gates, experts)
        else:
            ffn = FeedForward(c)(normed)
        return norm(c, "_3")(ffn) if c.sandwich_norms else ffn


class Transformer(hk.Module):
    def __init__(self, config: ModelConfig, unrolled: bool = False, name: str = "transformer",
                 layer_views: bool = False):
        super().__init__(name=name)
        self.c = config
        self.unrolled = unrolled
        self.layer_views = layer_views  # scanned: layer_scan (weights read in place)

    def __call__(self, x, keys, values, positions, window=None, in_place=False, rows=None,
                 lengths=None):
        # x [B, T, D]; keys, values [L * R, B, K, S, H] (R recursion steps; per layer: a tuple
        # of L * R arrays [B, K, S, H]), read only; positions [B, T]; window, rows, lengths:
        # see MultiHeadAttention. Returns x and this chunk's keys, values [L * R, B, T, K, H];
        # with in_place (unrolled layers over per-layer arrays only), the updated memory arrays.
        c = self.c
        if in_place and not self.unrolled:
            raise ValueError("in_place needs the unrolled layers (one memory array per layer)")

        def layer(x, layer_keys, layer_values):
            x, layer_keys, layer_values = DecoderLayer(c)(x, layer_keys, layer_values,
                                                          positions, window, False, rows)
            return x, (layer_keys, layer_values)

        new_keys, new_values = [], []
        for step in range(c.recursion_steps):
            # Every step runs the same parameters: later steps re-enter the first stack's name.
            name = "layers" if step == 0 else hk.experimental.force_name(
                f"{self.module_name}/layers")
            mine = slice(step * c.num_layers, (step + 1) * c.num_layers)
            if self.unrolled:
                x, step_keys, step_values = self._unrolled(x, keys[mine], values[mine],
                                                           positions, step, window, in_place,
                                                           rows, lengths)
            else:
                # a decode step's memory read in place by the attention kernel, not sliced
                memory_views = self.layer_views and cpu_kernels.decode_attention_usable(
                    x.shape[1], keys.dtype, x.dtype)
                stack = layer_scan(c.num_layers, name, memory_views) if self.layer_views \
                    else hk.layer_stack(c.num_layers, with_per_layer_inputs=True, name=name)
                x, (step_keys, step_values) = stack(layer)(x, keys[mine], values[mine])
            new_keys.append(step_keys)
            new_values.append(step_values)
        if in_place:  # tuples of per-layer arrays, all steps in order
            return x, sum(new_keys, ()), sum(new_values, ())
        if c.recursion_steps == 1:
            return x, new_keys[0], new_values[0]
        return x, jnp.concatenate(new_keys), jnp.concatenate(new_values)


    @hk.transparent  # a helper method, not a name scope: parameters stay under transformer/
    def _unrolled(self, x, keys, values, positions, step: int, window=None, in_place=False,
                  rows=None, lengths=None):
        """The layers one after another, each its own module over its own parameter buffers
        (`layer_{i}`, see unstack_layers). XLA:CPU copies a scan's slice of a stacked weight
        before every matmul it feeds (the decode then moves each weight three times); separate
        buffers feed the matmuls directly. Compile time grows with depth, unlike the scan."""
        new_keys, new_values = [], []
        for i in range(self.c.num_layers):
            name = f"layer_{i}" if step == 0 else hk.experimental.force_name(
                f"{self.module_name}/layer_{i}")  # later recursion steps reuse the parameters
            x, layer_keys, layer_values = DecoderLayer(self.c, split_experts=True, name=name)(
                x, keys[i], values[i], positions, window, in_place, rows, lengths)
            new_keys.append(layer_keys)
            new_values.append(layer_values)
        if in_place:
            return x, tuple(new_keys), tuple(new_values)
        return x, jnp.stack(new_keys), jnp.stack(new_values)



def unstack_layers(params, config: ModelConfig) -> dict:
    """The stacked parameter tree -> one buffer per layer, as the unrolled model reads it:
    STACKED + module [L, ...] becomes language_model/transformer/layer_{i}/module [...], and an
    expert weight moe/<name>/w [L, E, I, O] becomes moe/<name>/w_<e> [I, O], one per expert."""
    out = {}
    for module, leaves in params.items():
        if not module.startswith(STACKED):
            out[module] = leaves
            continue
        for i in range(config.num_layers):
            name = f"{UNROLLED}{i}/{module[len(STACKED):]}"
            layer = {param: layer_of(leaf, i) for param, leaf in leaves.items()}
            if "/moe/" in module:
                layer = {f"w_{e}": jax.tree.map(lambda a, e=e: a[e], layer["w"])
                         for e in range(config.num_experts)}
            out[name] = layer
    return out


class LanguageModel(hk.Module):
    def __init__(self, config: ModelConfig, unrolled: bool = False,
                 name: str = "language_model", layer_views: bool = False):
        super().__init__(name=name)
        self.c = config
        self.unrolled = unrolled
        self.layer_views = layer_views

    def __call__(self, tokens, keys, values, positions, output_index=None, window=None,
                 in_place=False, rows=None, lengths=None):
        """tokens [B, T] at absolute positions [B, T]; keys/values [L * R, B, K, S, H]: the
        memory before this chunk (read only).

        Returns float32 logits [B, T, V] (or [B, V] at output_index [B] only) and this chunk's
        keys/values [L * R, B, T, K, H], for the caller to write (see write_rows); with
        in_place (unrolled layers, per-layer memory arrays), the memory with the chunk written.
        With rows [B], the memory holds more rows and the chunk continues these; lengths [B]:
        with in_place, the tokens of each row to write (see MultiHeadAttention).
        """
        c = self.c
        dtype = jnp.dtype(c.dtype)
        embeddings = embedding_table(c)
        x = (embedding_rows(embeddings, tokens).astype(dtype)
             * c.embedding_multiplier_scale).astype(dtype)
        x, keys, values = Transformer(c, self.unrolled, layer_views=self.layer_views)(
            x, keys, values, positions, window, in_place, rows, lengths)  # [B, T, D]
        x = norm(c)(x)
        logits = output_logits(c, x, embeddings, output_index)
        return logits * c.output_multiplier_scale, keys, values


def _transformed(config: ModelConfig, unrolled: bool, layer_views: bool = False):
    """The Haiku forward of LanguageModel (scanned or unrolled layers), without an rng."""
    def forward(tokens, keys, values, positions, output_index=None, window=None,
                in_place=False, rows=None, lengths=None):
        return LanguageModel(config, unrolled, layer_views=layer_views)(
            tokens, keys, values, positions, output_index, window, in_place, rows, lengths)
    return hk.without_apply_rng(hk.transform(forward))


def _prefill_fn(config: ModelConfig, transformed):
    def prefill(params, tokens, lengths):
        """Prompts tokens [n, T] from position 0: attention over the prompt only (T x T), the
        chunk's keys/values are the fresh memory."""
        rows, length = tokens.shape
        empty = empty_kv(config, rows, 0)
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
        logits, keys, values = transformed.apply(params, tokens, empty, empty, positions,
                                                 jnp.maximum(lengths - 1, 0))
        # chunk [L, n, T, K, H] -> memory layout [L, n, K, T, H]
        return logits, KVMemory(keys.transpose(0, 1, 3, 2, 4), values.transpose(0, 1, 3, 2, 4),
                                lengths)
    return prefill


def _all_logits_fn(config: ModelConfig, transformed):
    def all_logits(params, tokens, lengths):
        """Logits [n, T, V] of prompts tokens [n, T] at every position (no memory kept)."""
        del lengths  # causal: padding after a prompt does not change its positions' logits
        rows, length = tokens.shape
        empty = empty_kv(config, rows, 0)
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (rows, length))
        return transformed.apply(params, tokens, empty, empty, positions)[0]
    return all_logits


def build_transformer(config: ModelConfig, unroll_layers: bool = False,
                      layer_views: bool = False) -> Model:
    """unroll_layers: run the layers one by one over per-layer parameter buffers (prepare_params
    makes them) instead of a scan over the stacked ones: faster matmuls on XLA:CPU, compile
    time growing with depth. Parameters stay stacked everywhere else (init, readers, rules).
    layer_views (scanned): the scan hands the layers views of their stacked matmul weights,
    which the CPU kernels read in place (layer_scan.py)."""
    transformed = _transformed(config, unroll_layers, layer_views and not unroll_layers)
    stacked = _transformed(config, False) if unroll_layers else transformed  # init's layout

    @jax.jit
    def init(rng):
        # A one-token dummy batch: parameter shapes do not depend on it. Jitted: eager Haiku
        # init of a layer stack dispatches op by op and is slow.
        kv = empty_kv(config, 1, 1, F32)
        return stacked.init(rng, jnp.zeros((1, 1), jnp.int32), kv, kv,
                            jnp.zeros((1, 1), jnp.int32))

    def apply(params, tokens, keys, values, positions, output_index=None):
        """Forward over tokens [B, T] at positions [B, T] (consecutive per row) -> logits and
        keys/values [L * R, B, K, S, H] with the chunk written at each row's positions."""
        logits, new_keys, new_values = transformed.apply(params, tokens, keys, values, positions,
                                                         output_index)
        return (logits, write_rows(keys, new_keys, positions[:, 0]),
                write_rows(values, new_values, positions[:, 0]))

    windowed_step = windowed_step_fn(transformed)

    def step(params, memory: KVMemory, tokens, lengths):
        return windowed_step(params, memory, tokens, lengths, memory.length)

    return Model(config, init, apply,
                 # unrolled layers read (and write) one memory array per layer
                 new_memory=lambda rows, length: init_memory(config, rows, length,
                                                             per_layer=unroll_layers),
                 memory_specs=lambda rows, mesh: kv_memory_specs(config, rows, mesh,
                                                                 per_layer=unroll_layers),
                 step=step, write_slots=write_kv_slots, chunk_step=chunk_step_fn(config, transformed),
                 prefill=_prefill_fn(config, transformed),
                 all_logits=_all_logits_fn(config, transformed),
                 windowed_step=windowed_step,
                 prepare_params=functools.partial(unstack_layers, config=config)
                 if unroll_layers else lambda params: params)
