"""The transformer's steps over its KV memory that write a chunk into it: a decode step (or any
chunk at each row's position) over the whole batch, and a prompt chunk continuing chosen rows
(chunked prefill). Built over the Haiku forward (transformer._transformed) by build_transformer.

Shape glossary: B memory rows, n chunk rows, T / C chunk tokens, L layers, K kv heads, S slots,
H head dim, V vocab.
"""

from __future__ import annotations

import jax.numpy as jnp

from runtime.config import ModelConfig
from runtime.memory import KVMemory
from runtime.models.attention import write_rows


def windowed_step_fn(transformed):
    def windowed_step(params, memory: KVMemory, tokens, lengths, window: int):
        """Consume tokens [B, T] (the first lengths [B] of each row) at each row's position,
        attending over memory positions < window only (a static slice: decode reads the
        filled part of the memory, not all S); the chunk is written into the whole memory."""
        positions = memory.positions[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
        output_index = jnp.maximum(lengths - 1, 0)
        if memory.per_layer and tokens.shape[1] == 1:
            # decode: each layer writes its own array, then reads it (in place). A longer
            # chunk is read before it is written, so that a ring keeps what its queries see.
            logits, keys, values = transformed.apply(params, tokens, memory.keys, memory.values,
                                                     positions, output_index, window, True)
            return logits, KVMemory(keys, values, memory.positions + lengths)
        logits, new_keys, new_values = transformed.apply(
            params, tokens, memory.keys, memory.values, positions, output_index, window)
        starts = memory.positions
        return logits, KVMemory(write_rows(memory.keys, new_keys, starts, lengths),
                                write_rows(memory.values, new_values, starts, lengths),
                                memory.positions + lengths)
    return windowed_step


def chunk_step_fn(config: ModelConfig, transformed):
    def chunk_step(params, memory: KVMemory, tokens, lengths, slots, starts, window=None):
        """Continue the prompts of memory rows slots [n] with tokens [n, C] (the first
        lengths [n] of each) from positions starts [n]: 0 starts a new prompt (what the slot
        held is not seen). Attention reads memory positions < window only (static; None: all)
        of those rows, each layer gathering its n rows (no copy of a row's whole memory); the
        other rows are untouched. -> (logits [n, V] at each row's last token, memory)."""
        positions = starts[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)
        # unrolled layers: each writes the chunk into its own array, then reads it. Read first,
        # XLA:CPU copied every layer's array twice a chunk (BENCHMARKS.md, "Prompt chunks of
        # unrolled engines written in place"). A ring keeps read-then-write: written first,
        # the chunk would overwrite what its own queries see.
        in_place = memory.per_layer and not (config.sliding_window is not None
                                             and config.sliding_window <= memory.length)
        logits, keys, values = transformed.apply(
            params, tokens, memory.keys, memory.values, positions, jnp.maximum(lengths - 1, 0),
            window, in_place, slots, lengths if in_place else None)
        if not in_place:  # the chunk's keys and values [L, n, C, K, H], written now
            keys = write_rows(memory.keys, keys, starts, lengths, slots)
            values = write_rows(memory.values, values, starts, lengths, slots)
        return logits, KVMemory(keys, values,
                                memory.positions.at[slots].set(starts + lengths, mode="drop"))
    return chunk_step
