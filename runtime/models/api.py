"""Model: the family-neutral interface the engine runs (each family's build function returns
one: models/transformer.py for the transformers, models/mamba2.py for Mamba-2)."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from runtime.config import ModelConfig


class Model(NamedTuple):
    """Pure functions of the model for one config.

    `apply` is the family's own forward; the engine uses only the family-neutral rest:
    memory (KVMemory here, the SSM state for Mamba-2) is a pytree with `positions` [B], the
    number of tokens each row has consumed.
    """
    config: ModelConfig
    init: Callable  # (rng) -> params
    apply: Callable  # (params, tokens, keys, values, positions, output_index=None) -> ...
    new_memory: Callable  # (rows, length) -> zeroed memory for `rows` rows of `length` tokens
    memory_specs: Callable  # (rows, mesh) -> the memory's PartitionSpecs (same pytree)
    step: Callable  # (params, memory, tokens [B, T], lengths [B]) -> (logits [B, V], memory)
    write_slots: Callable  # (memory, fresh, slots [n]) -> memory with fresh's n rows in slots
    # (params, memory, tokens [n, C], lengths [n], slots [n], starts [n], window=None) ->
    # (logits [n, V], memory): a prompt chunk continuing memory rows `slots` from positions
    # `starts` (0: a new prompt), the other rows untouched (chunked prefill). None: whole
    # prompts only.
    chunk_step: Optional[Callable] = None
    # (params, tokens [n, T], lengths [n]) -> (logits [n, V], fresh memory of n rows x T tokens):
    # a shortcut for `step` on new memory that skips reading it; None: the engine runs `step`.
    prefill: Optional[Callable] = None
    # (params, memory, tokens, lengths, window) -> as `step`, reading only the first `window`
    # (static) memory positions: every row's position must be below it. None: not supported.
    windowed_step: Optional[Callable] = None
    # (params, tokens [n, T], lengths [n]) -> float32 logits [n, T, V] at every position of
    # prompts from position 0 (prompt log-probabilities for scoring); None: not supported.
    all_logits: Optional[Callable] = None
    # (params in the stacked layout init and the readers produce) -> the tree `apply` reads:
    # the same tree, or one buffer per layer for a model built with unroll_layers=True.
    prepare_params: Callable = lambda params: params
