"""A Pallas (Triton) kernel for few-row products against int8 weights stored [O, I] on GPUs.

Why: at decode a product streams its whole int8 weight for 1-16 rows of activations, so its
speed is the weight's bytes over HBM bandwidth. XLA's GPU kernel for one row of
`transposed_linear` (products.py) streamed int8 at about 1.2 TB/s on an H200 (~4.8 TB/s
peak). This kernel reads each weight byte once in wide contiguous tiles, widens it in
registers, multiplies it by the rows and applies each scale group's scale to float32 partial
sums, never materialising a dequantised weight. Measured on an H200 (JAX 0.11.2, bf16 x,
groups of 64): Llama-8B's gate/up [14336, 4096] at 1 row in 28 us against XLA's 38 us, its
int8 head [128256, 4096] in 170 us (3.2 TB/s) against 303 us; at 8 rows 33 us against 48 us.

Shapes: x [B, I] (B <= 16, bf16 or f32), weight_t int8 [O, I], scales [R, O] (bf16, f16 or
f32), G = I / R input values per scale group; y [B, O] float32 with
y[b, o] = sum_i x[b, i] * weight_t[o, i] * scales[i // G, o].

Design: a grid (O / BO, S): program (j, s) owns outputs j*BO .. j*BO+BO-1 and the s-th of S
contiguous splits of I (S > 1 adds float32 partials [S, B, O], summed after the call, so
that narrow weights still occupy every SM). The weight is viewed [O, I / C, C] in chunks of C
input values (a power of two dividing G), so a chunk never straddles two groups; the program
loops over its split NC chunks (BI = NC * C values) at a time:
- rows variant (few rows): a tile [BO, NC, C] int8 is widened to float32, multiplied by each
  row's [NC, C] and summed over C -> [BO, NC] per row, scaled by the chunks' scales [BO, NC]
  and summed over NC into a float32 accumulator [BO] per row. NC > 1 only when C = G (each
  chunk is one group); else NC = 1 and the chunk's group is (chunk * C) // G.
- dot variant: x padded to 16 rows (Triton's dot needs 16), each chunk a dot
  [16, C] x [C, BO] (bf16 on tensor cores for bf16 x, IEEE float32 for f32 x) -> [16, BO],
  scaled by its group's scale row and accumulated.
Partial output blocks (O % BO != 0) load their weight and scale rows masked and write into an
output padded to a multiple of BO, sliced after. I needs no mask: BI and C are powers of two
dividing I (a requested block_in too large for I is lowered to the largest that divides).

`supported` is the shape and dtype check products.py asks (layout.int8_gemv_in_pallas says
where: GPUs); tests run the kernel in Pallas interpret mode on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MAX_ROWS = 16
DOT_ROWS = 16  # Triton's dot needs at least 16 rows: the dot variant pads x to this
SCALE_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
X_DTYPES = (jnp.bfloat16, jnp.float32)
MIN_GROUP = 16  # I / R must be a multiple of this (the smallest chunk a load vectorises)
# Default splitting of I aims for at least this many programs: 2 per SM of an H100/H200 (132).
TARGET_PROGRAMS = 264
MIN_SPLIT_VALUES = 1024  # ... while each split keeps at least this many input values
DEFAULT_WARPS = 4


@dataclasses.dataclass(frozen=True)
class Plan:
    """A kernel configuration for one product (see the module docstring for the symbols)."""
    block_out: int  # BO, a power of two
    chunk: int  # C, a power of two dividing G
    chunks: int  # NC chunks per loop step (BI = NC * C); > 1 only when C == G
    group: int  # G = I / R
    splits: int  # S
    dot: bool  # the dot variant (x padded to 16 rows)


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides n and is at most cap."""
    return math.gcd(n & -n, 1 << (max(cap, 1).bit_length() - 1))


def _is_pow2(n) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


def supported(rows: int, weight_t, scales, x_dtype=None) -> bool:
    """Whether the kernel computes this product (shapes and dtypes only, any backend)."""
    if getattr(weight_t, "ndim", 0) != 2 or scales is None or scales.ndim != 2:
        return False
    out, inp = weight_t.shape
    groups = scales.shape[0]
    if weight_t.dtype != jnp.int8 or scales.dtype not in SCALE_DTYPES:
        return False
    if x_dtype is not None and jnp.dtype(x_dtype) not in X_DTYPES:
        return False
    if not 1 <= rows <= MAX_ROWS or scales.shape[1] != out or out < 1 or groups < 1:
        return False
    return inp % groups == 0 and (inp // groups) % MIN_GROUP == 0


def plan(rows: int, out: int, inp: int, groups: int, *, block_out=None, block_in=None,
         use_dot=None, split_in=None) -> Plan:
    """The configuration for x [rows, inp] times weight_t [out, inp] with `groups` scale rows;
    None arguments take defaults (the rows variant up to 4 rows, the dot variant above; the
    blocks that were fastest over Llama-8B's shapes on an H200, scripts/bench_pallas_gemv.py)."""
    dot = rows > 4 if use_dot is None else bool(use_dot)
    block_out = block_out or (32 if dot else 16)
    block_in = block_in or (256 if dot else 1024)
    if not (_is_pow2(block_out) and _is_pow2(block_in)) or (dot and block_out < 16):
        raise ValueError(f"blocks must be powers of two (dot: BO >= 16), got {block_out}, "
                         f"{block_in}")
    group = inp // groups
    chunk = _pow2_divisor(group, block_in)  # [C] never straddles a group
    total = inp // chunk  # chunks in I
    splits = split_in or _default_splits(-(-out // block_out), total, groups, chunk)
    if not _is_pow2(splits) or total % splits or (groups > 1 and groups % splits):
        raise ValueError(f"split_in={splits} must be a power of two dividing I's {total} "
                         f"chunks and its {groups} groups")
    chunks = 1
    if chunk == group:  # several whole groups per step, dividing the split's chunks
        chunks = _pow2_divisor(total // splits, block_in // chunk)
    return Plan(block_out, chunk, chunks, group, splits, dot)


def _default_splits(programs: int, total: int, groups: int, chunk: int) -> int:
    """Splits of I that bring the grid to TARGET_PROGRAMS, keeping groups whole."""
    splits = 1
    while (programs * splits < TARGET_PROGRAMS and total % (2 * splits) == 0
           and (groups == 1 or groups % (2 * splits) == 0)
           and total // (2 * splits) * chunk >= MIN_SPLIT_VALUES):
        splits *= 2
    return splits


def _load(view, mask):
    """A tile from a ref view; rows past O (mask False) read as 0."""
    return view[...] if mask is None else plgpu.load(view, mask=mask, other=0)


def _out_mask(out: int, block_out: int):
    """[BO] bool: which of this program's outputs exist (None when every block is full)."""
    if out % block_out == 0:
        return None
    return pl.program_id(0) * block_out + jnp.arange(block_out, dtype=jnp.int32) < out


def _rows_kernel(x_ref, w_ref, s_ref, o_ref, *, p: Plan, rows: int, out: int):
    """The rows variant. x_ref [B, K, C], w_ref int8 [BO, K, C] (K = I / (S C) chunks of
    this split), s_ref [R / S or 1, BO], o_ref float32 [B, BO]."""
    bo, nc, c = p.block_out, p.chunks, p.chunk
    mask = _out_mask(out, bo)
    w_mask = None if mask is None else mask[:, None, None]  # [BO, 1, 1]
    s_mask = None if mask is None else mask[None, :]  # [1, BO]

    def step(k, accs):
        w = _load(w_ref.at[:, pl.ds(k * nc, nc), :], w_mask).astype(jnp.float32)  # [BO, NC, C]
        if c == p.group:  # NC whole groups: scale rows k*NC .. k*NC+NC-1
            s_rows = pl.ds(k * nc, nc)
        else:  # one chunk inside group (k C) // G
            s_rows = pl.ds(jax.lax.div(k * c, p.group), 1)
        s = _load(s_ref.at[s_rows, :], s_mask).astype(jnp.float32).T  # [BO, NC]
        new = []
        for b in range(rows):
            xb = x_ref[b, pl.ds(k * nc, nc), :].astype(jnp.float32)  # [NC, C]
            part = jnp.sum(w * xb[None], axis=2)  # [BO, NC]
            new.append(accs[b] + jnp.sum(part * s, axis=1))  # [BO]
        return tuple(new)

    steps = w_ref.shape[1] // nc
    zeros = tuple(jnp.zeros((bo,), jnp.float32) for _ in range(rows))
    accs = jax.lax.fori_loop(0, steps, step, zeros)
    for b in range(rows):
        o_ref[b, :] = accs[b]


def _dot_kernel(x_ref, w_ref, s_ref, o_ref, *, p: Plan, out: int):
    """The dot variant. x_ref [16, K, C], w_ref int8 [BO, K, C], s_ref [R / S or 1, BO],
    o_ref float32 [16, BO]."""
    bo, nc, c = p.block_out, p.chunks, p.chunk
    mask = _out_mask(out, bo)
    w_mask = None if mask is None else mask[:, None]  # [BO, 1]
    s_mask = None if mask is None else mask[None, :]  # [1, BO]
    dtype = x_ref.dtype
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None

    def step(k, acc):
        for i in range(nc):
            chunk = k * nc + i
            w = _load(w_ref.at[:, chunk, :], w_mask).astype(dtype)  # [BO, C]
            xc = x_ref[:, chunk, :]  # [16, C]
            part = jax.lax.dot_general(xc, w, (((1,), (1,)), ((), ())), precision=precision,
                                       preferred_element_type=jnp.float32)  # [16, BO]
            s_row = pl.ds(jax.lax.div(chunk * c, p.group), 1)
            s = _load(s_ref.at[s_row, :], s_mask).astype(jnp.float32)  # [1, BO]
            acc = acc + part * s
        return acc

    steps = w_ref.shape[1] // nc
    o_ref[...] = jax.lax.fori_loop(0, steps, step, jnp.zeros((DOT_ROWS, bo), jnp.float32))


def int8_gemv(x, weight_t, scales, *, interpret=False, block_out=None, block_in=None,
              use_dot=None, split_in=None, num_warps=None, num_stages=None):
    """x [B, I] times the int8 weight (weight_t [O, I], scales [R, O]) -> float32 [B, O].
    Blocks, variant and splits as in `plan`; num_warps, num_stages go to Triton."""
    rows, inp = x.shape
    out = weight_t.shape[0]
    groups = scales.shape[0]
    if not supported(rows, weight_t, scales, x.dtype) or weight_t.shape[1] != inp:
        raise ValueError(f"int8_gemv does not take x {x.shape} {x.dtype}, weight_t "
                         f"{weight_t.shape} {weight_t.dtype}, scales {scales.shape} {scales.dtype}")
    p = plan(rows, out, inp, groups, block_out=block_out, block_in=block_in, use_dot=use_dot,
             split_in=split_in)
    bo, c, splits = p.block_out, p.chunk, p.splits
    blocks = -(-out // bo)
    total = inp // c
    if p.dot:
        x = jnp.pad(x, ((0, DOT_ROWS - rows), (0, 0)))  # [16, I]
        kernel = functools.partial(_dot_kernel, p=p, out=out)
    else:
        kernel = functools.partial(_rows_kernel, p=p, rows=rows, out=out)
    bx = x.shape[0]
    x3 = x.reshape(bx, total, c)  # [B, I / C, C]
    w3 = weight_t.reshape(out, total, c)  # [O, I / C, C]
    if groups > 1:
        s_spec = pl.BlockSpec((groups // splits, bo), lambda j, s: (s, j))
    else:
        s_spec = pl.BlockSpec((1, bo), lambda j, s: (0, j))
    # Triton's parameters always: without them, GPU Pallas lowers through Mosaic GPU when
    # jax_pallas_use_mosaic_gpu is set (the kernel is written for the Triton lowering)
    params = plgpu.CompilerParams(num_warps=num_warps or DEFAULT_WARPS, num_stages=num_stages)
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits * bx, blocks * bo), jnp.float32),
        grid=(blocks, splits),
        in_specs=[pl.BlockSpec((bx, total // splits, c), lambda j, s: (0, s, 0)),
                  pl.BlockSpec((bo, total // splits, c), lambda j, s: (j, s, 0)),
                  s_spec],
        out_specs=pl.BlockSpec((bx, bo), lambda j, s: (s, j)),
        compiler_params=params,
        interpret=interpret,
        name="int8_gemv",
    )(x3, w3, scales)  # [S * B, O padded]
    y = y.reshape(splits, bx, blocks * bo)
    y = y[0] if splits == 1 else jnp.sum(y, axis=0)
    return y[:rows, :out]

