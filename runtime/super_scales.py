"""Super-scaled scale tables: GGUF K-quants' own two-level form for the CPU panel kernels.

GGUF Q4_K and Q5_K store a weight's scales (and mins) per group of 32 rows as an f16
super-scale times a 6-bit sub-scale per block of 8 groups; Q6_K as an f16 times an int8 per
group of 16 rows. The reader loads their exact float32 products (4 bytes a group and column).
Held super-scaled, a table takes 1.25: per block of SUPER_GROUPS groups [..., G, O] ->
[..., G/8 * 10, O],

    rows 10b .. 10b+7:   the sub-scales of groups 8b .. 8b+7 (uint8 0..255, or int8 -128..127)
    rows 10b+8, 10b+9:   the block's f16 super-scales [O], as 2 O bytes (little-endian)

and group g's value is super * sub, the float32 product the reader made, bit for bit. The dtype
says the form: uint8 (unsigned subs: Q4_K's and Q5_K's mins, the super carrying the sign; Q4_K's
scales) or int8 (signed subs: Q6_K's scales; Q5_K's, an int8 weight's, with a negative super). The panel kernel reads them as they are (cpu_kernels.h, Scales); XLA paths
take float_table's float32 values.

Shape glossary: G groups (scale rows), O columns, B = G / 8 blocks.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from runtime import host_copies
from runtime.host_threads import each_chunk

SUPER_GROUPS = 8
SUPER_ROWS = SUPER_GROUPS + 2
# The sub-scales tried for a block's value of largest magnitude, the super-scale being that
# value over it: Q4_K's 6 bits, 63 down (the super carries the sign); for signed ones, Q6_K's
# quantiser gives the largest -128 (or 127): -128 up, then 127 down.
CANDIDATES = {np.dtype(np.uint8): [(1, k) for k in range(63, 0, -1)],
              np.dtype(np.int8): [(-1, k) for k in range(128, 0, -1)]
              + [(1, k) for k in range(127, 0, -1)]}
SUB_RANGE = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}
DECOMPOSED_BLOCKS = 1 << 15  # blocks decomposed at a time: 1 MB of float32


def _blocks(table: np.ndarray) -> np.ndarray:
    """[..., G, O] -> [B x O (and lead), 8]: each block's 8 values in a row."""
    *lead, groups, cols = table.shape
    grouped = table.reshape(*lead, groups // SUPER_GROUPS, SUPER_GROUPS, cols)
    return np.moveaxis(grouped, -2, -1).reshape(-1, SUPER_GROUPS)


def _by_gcd(blocks: np.ndarray, sub_dtype) -> tuple:
    """(f16 supers [N], subs [N, 8], solved [N]): each block as the greatest common divisor of
    its values (integers at the block's least exponent) times the quotients, where that divisor
    is an f16 and the quotients fit `sub_dtype` (unsigned: one sign, the super carrying it).
    Any other exact form's super is that divisor over an integer, so its subs are larger. One
    pass, where the search tries a sub-scale a pass (Q6_K's half blocks took up to 80)."""
    low, high = SUB_RANGE[np.dtype(sub_dtype)]
    finite = np.isfinite(blocks).all(axis=-1)
    mantissas, exponents = np.frexp(np.where(finite[:, None], blocks, 0))
    ints = (mantissas * (1 << 24)).astype(np.int64)  # exact: float32 holds 24 bits
    least = np.where(ints != 0, exponents, 1 << 30).min(axis=-1, keepdims=True)
    shift = np.where(ints != 0, exponents - least, 0)
    fits = finite & (shift.max(axis=-1) <= 38)  # below 2**62
    values = ints << np.where(fits[:, None], shift, 0)
    divisor = np.gcd.reduce(values, axis=-1)  # [N]; 0: a block of zeros
    quotients = values // np.maximum(divisor, 1)[:, None]
    # the super's sign: unsigned subs take the values' one; signed ones -, where a sub is 128
    # (Q6_K's d is negative where its largest sub-scale is -128)
    sign = np.where((quotients < 0).any(axis=-1) if low == 0 else quotients.max(axis=-1) > high,
                    -1, 1)
    subs = quotients * sign[:, None]
    wide = sign * np.ldexp(divisor.astype(np.float64), np.where(divisor > 0, least[:, 0], 0)
                           - 24)
    with np.errstate(over="ignore"):
        supers = wide.astype(np.float16)
    solved = fits & (supers.astype(np.float64) == wide) & (subs >= low).all(axis=-1) \
        & (subs <= high).all(axis=-1)
    subs = np.where(solved[:, None], subs, 0).astype(sub_dtype)
    solved &= np.all(supers.astype(np.float32)[:, None] * subs == blocks, axis=-1)
    return supers, subs, solved


def _search(blocks, todo, extreme, candidates, supers, subs) -> tuple:
    """Blocks `todo` (largest values `extreme`) whose super is the largest value over one of
    `candidates` (sign, sub), written into supers / subs; returns those left (todo, extreme)."""
    low, high = SUB_RANGE[subs.dtype]
    for sign, sub in candidates:
        if not len(todo):
            break
        with np.errstate(over="ignore"):
            candidate = (extreme / np.float32(sign * sub)).astype(np.float16)
        wide = candidate.astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            codes = np.rint(blocks[todo] / wide)
        exact = np.all((codes >= low) & (codes <= high) & (wide * codes == blocks[todo]), axis=-1)
        exact &= np.isfinite(wide[:, 0]) & (wide[:, 0] != 0)
        supers[todo[exact]], subs[todo[exact]] = candidate[exact], codes[exact]
        todo, extreme = todo[~exact], extreme[~exact]
    return todo, extreme


def _extremes(blocks: np.ndarray) -> np.ndarray:
    """Each block's value of largest magnitude (its first) [N]."""
    return np.take_along_axis(blocks, np.argmax(np.abs(blocks), axis=-1)[:, None], -1)[:, 0]


def _decomposed(blocks: np.ndarray, sub_dtype) -> Optional[tuple]:
    """(f16 supers [N], subs [N, 8]) with supers * subs == blocks exactly, else None. Most
    blocks' largest value has the largest sub (GGUF's quantisers scale so: Q4_K's 63, Q6_K's
    -128); the rest (half of Q6_K's blocks: 8 of its 16 groups) by the divisor (_by_gcd), then
    by the search of every sub for the largest value."""
    supers, subs = np.zeros(len(blocks), np.float16), np.zeros(blocks.shape, sub_dtype)
    candidates = CANDIDATES[np.dtype(sub_dtype)]
    firsts = 1 if np.dtype(sub_dtype) == np.uint8 else 2  # 63; -128 and -127
    solved = host_copies.super_scale_first_pass(blocks, sub_dtype, supers, subs)
    if solved is not None:  # the same pass in C++ (host_copies.py)
        todo = np.flatnonzero(~solved)
        extreme = _extremes(blocks[todo])
    else:
        extreme = _extremes(blocks)
        todo = np.flatnonzero(extreme != 0)  # all-zero blocks: super 0, subs 0
        todo, extreme = _search(blocks, todo, extreme[todo], candidates[:firsts], supers, subs)
    if len(todo):
        gcd_supers, gcd_subs, solved = _by_gcd(blocks[todo], sub_dtype)
        supers[todo[solved]], subs[todo[solved]] = gcd_supers[solved], gcd_subs[solved]
        todo, extreme = todo[~solved], extreme[~solved]
    todo, _ = _search(blocks, todo, extreme, candidates[firsts:], supers, subs)
    return None if len(todo) else (supers, subs)


class _NotExact(Exception):
    """A chunk of blocks with no exact super-scaled form (super_scaled stops there)."""


def super_scaled(table, sub_dtype=np.uint8) -> Optional[np.ndarray]:
    """A float32 table [..., G, O] super-scaled (module docstring) with `sub_dtype` sub-scales:
    [..., G/8 * 10, O]; None where G is not a multiple of 8 or a block is not an f16 times
    sub-scales exactly."""
    table = np.asarray(table)
    if table.dtype != np.float32 or table.ndim < 2 or table.shape[-2] % SUPER_GROUPS:
        return None
    blocks = _blocks(table)
    sample = blocks[::max(1, len(blocks) // 64)]  # a table not in the form fails here, cheaply
    if _decomposed(sample, sub_dtype) is None:
        return None
    supers, subs = np.empty(len(blocks), np.float16), np.empty(blocks.shape, sub_dtype)

    def decompose(chunk: int) -> None:  # temporaries in the caches; chunks on the host threads
        at = slice(chunk * DECOMPOSED_BLOCKS, (chunk + 1) * DECOMPOSED_BLOCKS)
        parts = _decomposed(blocks[at], sub_dtype)
        if parts is None:
            raise _NotExact  # the chunks not started are dropped
        supers[at], subs[at] = parts

    try:
        each_chunk(decompose, -(-len(blocks) // DECOMPOSED_BLOCKS))
    except _NotExact:
        return None
    *lead, groups, cols = table.shape
    count = groups // SUPER_GROUPS
    out = np.empty((*lead, count, SUPER_ROWS, cols), np.uint8)
    out[..., :SUPER_GROUPS, :] = np.moveaxis(
        subs.view(np.uint8).reshape(*lead, count, cols, SUPER_GROUPS), -1, -2)
    out[..., SUPER_GROUPS:, :] = supers.reshape(*lead, count, cols).view(np.uint8) \
        .reshape(*lead, count, 2, cols)
    return out.reshape(*lead, count * SUPER_ROWS, cols).view(sub_dtype)


def super_scaled_on_device(table, sub_dtype=np.uint8):
    """A concrete float32 table super-scaled where exact, on its own device; else as it is."""
    if table is None or table.dtype != jnp.float32:
        return table
    form = super_scaled(table, sub_dtype)
    return table if form is None else jax.device_put(form, table.sharding)


def is_super_scaled(table) -> bool:
    return table is not None and table.dtype in (jnp.uint8, jnp.int8)


def table_groups(table) -> int:
    """G of a scale (or min) table [..., G, O], stored as it is or super-scaled."""
    rows = table.shape[-2]
    return rows // SUPER_ROWS * SUPER_GROUPS if is_super_scaled(table) else rows


def float_table(table):
    """A table's values [..., G, O]: float32 for a super-scaled one, others as stored."""
    if not is_super_scaled(table):
        return table
    *lead, rows, cols = table.shape
    count = rows // SUPER_ROWS
    blocks = table.reshape(*lead, count, SUPER_ROWS, cols)
    raw = blocks[..., SUPER_GROUPS:, :]  # the f16 bytes, as uint8 whatever the table's dtype
    raw = raw if raw.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(raw, jnp.uint8)
    supers = jax.lax.bitcast_convert_type(raw.reshape(*lead, count, cols, 2), jnp.float16)
    subs = blocks[..., :SUPER_GROUPS, :].astype(jnp.float32)  # [..., B, 8, O]
    values = supers.astype(jnp.float32)[..., None, :] * subs
    return values.reshape(*lead, count * SUPER_GROUPS, cols)


def scale_columns(table, tokens: jax.Array) -> jax.Array:
    """A table [G, V]'s columns at tokens [...] -> float32 [..., G] (a tied table's scales for
    the rows a lookup gathers). A super-scaled table's column v takes its sub-scales from
    column v and its super-scale from bytes 2v, 2v + 1 of each block's two super rows."""
    if not is_super_scaled(table):
        return jnp.moveaxis(table[:, tokens], 0, -1).astype(jnp.float32)
    rows, cols = table.shape
    count, flat = rows // SUPER_ROWS, tokens.reshape(-1)  # [N]
    blocks = table.reshape(count, SUPER_ROWS, cols)
    subs = blocks[:, :SUPER_GROUPS, flat].astype(jnp.float32)  # [B, 8, N]
    raw = blocks[:, SUPER_GROUPS:, :].reshape(count, 2 * cols)
    raw = raw if raw.dtype == jnp.uint8 else jax.lax.bitcast_convert_type(raw, jnp.uint8)
    pairs = jnp.stack([raw[:, 2 * flat], raw[:, 2 * flat + 1]], axis=-1)  # [B, N, 2]
    supers = jax.lax.bitcast_convert_type(pairs, jnp.float16).astype(jnp.float32)  # [B, N]
    values = (supers[:, None, :] * subs).reshape(count * SUPER_GROUPS, -1)  # [G, N]
    return jnp.swapaxes(values, 0, 1).reshape(*tokens.shape, -1)
