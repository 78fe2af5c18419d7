"""Routed (token, expert) pairs grouped by expert, each group run through its own expert in tiles.

Shape glossary: M routed pairs, E experts, D input width, O output width, t tile rows.

The pairs are sorted by expert (a stable argsort), so expert e owns the contiguous rows
[start_e, start_e + size_e) of the sorted buffer. For each expert, a loop with a data-dependent
trip count (ceil(size_e / t)) runs the expert's whole FFN on one tile of t rows at a time,
reading that expert's weights and nothing else; rows of a last, partial tile that belong to the
next expert are computed but not kept. The work is the routed rows plus less than one tile per
hit expert, never the E x M rows of a dense product, and an expert that no pair chose costs
nothing.

This replaces a fixed grid of ceil(M / t) + E tiles that all ran, empty or not (up to twice the
routed work, and a whole copy of an expert's weights gathered or switched to per tile), and
`jax.lax.ragged_dot`, which XLA:CPU lowers to a product of every row with every expert.

Where a kernel takes every group at its exact size (the CPU panel kernel, experts in panels:
products.grouped_linears), `run_sorted` hands it the sorted rows and the group sizes instead:
no tiles, no rows of the next expert computed, no loop (BENCHMARKS.md, "MoE prompts in one
kernel call").
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

MIN_TILE = 8
MAX_TILE = 256


def group_tile(pairs: int, experts: int) -> int:
    """Rows per tile for `pairs` routed pairs over `experts`: the smallest power of two at least
    the mean group size (pairs / experts), within [MIN_TILE, MAX_TILE].

    On the CPU these sizes ran fastest for batched decode and for short and long prefills: a
    typical group fits one tile and each hit expert's weights are read once (BENCHMARKS.md,
    "Expert group tile sizes")."""
    tile = MIN_TILE
    while tile < pairs / experts and tile < MAX_TILE:
        tile *= 2
    return tile


def group_by_expert(choice: jax.Array, experts: int):
    """choice [M] expert of each pair -> (order [M] pair indices sorted by expert, starts [E]
    first sorted row of each expert, sizes [E] pairs per expert)."""
    sizes = jnp.zeros((experts,), jnp.int32).at[choice].add(1)  # [E]
    order = jnp.argsort(choice, stable=True).astype(jnp.int32)  # [M]
    return order, jnp.cumsum(sizes) - sizes, sizes


def run_sorted(rows: jax.Array, choice: jax.Array, experts: int,
               grouped_fn: Callable[[jax.Array, jax.Array], Optional[jax.Array]]):
    """Row m of rows [M, D] through expert choice[m] by grouped_fn(sorted rows [M, D], sizes
    [E]) -> [M, O] (expert e's rows the next sizes[e] of the sorted ones: a kernel that takes
    each group at its exact size); [M, O] in the original pair order, or None where grouped_fn
    gives None."""
    order, _, sizes = group_by_expert(choice, experts)
    out = grouped_fn(rows[order], sizes)
    return None if out is None else out[_inverse(order)]


def _inverse(order: jax.Array) -> jax.Array:
    """The permutation that undoes order [M]."""
    pairs = order.shape[0]
    return jnp.zeros((pairs,), jnp.int32).at[order].set(jnp.arange(pairs, dtype=jnp.int32))


def run_grouped(rows: jax.Array, choice: jax.Array, experts: int, tile: int,
                expert_fn: Callable[[int, jax.Array], jax.Array], out_width: int) -> jax.Array:
    """Row m of rows [M, D] through expert choice[m]: expert_fn(e, x [t, D]) -> [t, O];
    returns [M, O] in the original pair order (dtype of rows)."""
    pairs, width = rows.shape
    order, starts, sizes = group_by_expert(choice, experts)
    # One spare tile of zeros at the end: a last tile never reads or writes out of bounds
    # (dynamic slices would otherwise clamp their start and shift the rows).
    grouped = jnp.concatenate([rows[order], jnp.zeros((tile, width), rows.dtype)])  # [M+t, D]
    out = jnp.zeros((pairs + tile, out_width), rows.dtype)  # [M+t, O]
    lane = jnp.arange(tile)
    for e in range(experts):  # static: each expert's loop reads its own weights
        def one_tile(i, out, e=e):
            start = starts[e] + i * tile
            y = expert_fn(e, jax.lax.dynamic_slice_in_dim(grouped, start, tile)).astype(out.dtype)
            mine = (lane < sizes[e] - i * tile)[:, None]  # rows past the group: keep what is there
            kept = jnp.where(mine, y, jax.lax.dynamic_slice_in_dim(out, start, tile))
            return jax.lax.dynamic_update_slice_in_dim(out, kept, start, 0)

        out = jax.lax.fori_loop(0, (sizes[e] + tile - 1) // tile, one_tile, out)
    return out[_inverse(order)]  # [M, O]
