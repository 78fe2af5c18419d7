"""Several decode steps per dispatch: a device loop of the engine's decode step that samples,
and stops rows on EOS / stop token ids / their length budget, on the device, buffering the
tokens [B, k] (issue 24: the host's dispatch and read-back per step cost more than half a
step on an H200).

Shape glossary: B slots, k steps per dispatch, NS stop ids per row, K = MAX_TOP_LOGPROBS.

A row that finishes inside the k steps becomes inactive for the rest of them (its position,
recurrent state and sampler history stay put, as any inactive row's do). The host replays the
same rule (`steps_taken`) to know how far each row's memory advanced, and accepts the tokens
one step at a time exactly as after single steps.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MIN_STOP_IDS = 8  # stop-id columns, a power of two from this: few compiled widths


def stop_arrays(stops: Sequence[Sequence[int]]) -> np.ndarray:
    """Each row's stop ids (EOS and the request's stop_token_ids) as [B, NS] int32, padded
    with -1 (never a token)."""
    width = MIN_STOP_IDS
    while width < max(map(len, stops), default=0):
        width *= 2
    ids = np.full((len(stops), width), -1, np.int32)
    for row, row_stops in enumerate(stops):
        ids[row, :len(row_stops)] = sorted(row_stops)
    return ids


def still_active(active, tokens, taken, stops, budgets):
    """active [B] after a step that sampled tokens [B] and made `taken` [B] tokens in the block
    so far (this one included): a stop id ends a row, and so does its budget [B] (tokens it
    may still output) once reached. Device (jnp) or host (np) arrays alike."""
    stopped = (tokens[:, None] == stops).any(axis=1)
    return active & ~stopped & (taken < budgets)


def steps_taken(tokens: np.ndarray, active: np.ndarray, stops: np.ndarray,
                budgets: np.ndarray) -> np.ndarray:
    """[B] int: the decode steps each row ran in a block that sampled tokens [B, k] (host
    arrays), starting from active [B]: how far its memory position moved."""
    taken = np.zeros(len(active), np.int64)
    for j in range(tokens.shape[1]):
        taken += active
        active = still_active(active, tokens[:, j], taken, stops, budgets)
    return taken


def decode_loop(step: Callable, params, memory, history, tokens, active, steps, settings,
                stops, budgets, k: int):
    """k calls of step(params, memory, history, tokens, active, steps, settings) -> (Sampled
    [B], memory, history) on the device, each fed the tokens of the one before; row r's
    sampling step index advances with each step it runs, as the host's would. Returns
    (Sampled with [B, k] leaves (logprobs [B, k], top ids [B, k, K]), memory, history)."""
    def body(carry, _):
        memory, history, tokens, active, steps, taken = carry
        sampled, memory, history = step(params, memory, history, tokens, active, steps,
                                        settings)
        taken = taken + active
        steps = steps + active
        after = still_active(active, sampled.tokens, taken, stops, budgets)
        return (memory, history, sampled.tokens, after, steps, taken), sampled

    start = (memory, history, tokens, active, steps, jnp.zeros_like(steps))
    (memory, history, *_), sampled = jax.lax.scan(body, start, None, length=k)
    # scan stacks along axis 0 ([k, B, ...]): rows first for the host
    return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), sampled), memory, history

