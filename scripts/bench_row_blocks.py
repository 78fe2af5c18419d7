#!/usr/bin/env python3
"""Group-wise int8 products on this machine's default device, two ways, interleaved in one
process: the batched dot over the scale row blocks (partial sums [M, R, O] scaled and summed)
against one dot over the exactly dequantised weight (what layout.row_blocks_dequantised picks
on the CPU).

  python scripts/bench_row_blocks.py                     SmolLM-135M's FFN shapes, groups of 64
  python scripts/bench_row_blocks.py --shape 576x1536 --group-size 64 --rows 1,4,16

A chain of `--layers` pairs of products (x @ W_up [I, O], then @ W_down [O, I]), each layer with
its own weights, is one jitted program per form and row count; reported: the best of
`--repeats` calls, in ms per chain and us per product. Both forms are checked against the
float64 product first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from runtime import products  # noqa: E402
from runtime.quant import dequantize, quantize_grouped  # noqa: E402

FORMS = ("row-blocked", "dequantised")


def product(form: str, x, w):
    """x [M, I] @ the int8 weight w [I, O] (R row blocks) -> float32 [M, O]."""
    weight = w.weight.reshape(w.row_blocks, -1, w.weight.shape[-1])  # [R, I/R, O]
    if form == "dequantised":
        return products._dequantised_product("...ri,rio->...ro", x, weight, w.scales[:, None])
    partial = jnp.einsum("mri,rio->mro", x.reshape(x.shape[0], w.row_blocks, -1), weight
                         .astype(x.dtype), preferred_element_type=jnp.float32)  # [M, R, O]
    return jnp.sum(partial * w.scales.astype(jnp.float32), axis=1)


def chain(form: str, x, layers):
    for up, down in layers:
        x = product(form, product(form, x, up), down)
    return x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="576x1536")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    rows_in, out = map(int, args.shape.split("x"))
    rng = np.random.default_rng(0)
    host = [(quantize_grouped(rng.normal(size=(rows_in, out)).astype(np.float32), args.group_size),
             quantize_grouped(rng.normal(size=(out, rows_in)).astype(np.float32), args.group_size))
            for _ in range(args.layers)]
    layers = jax.tree.map(jnp.asarray, host)
    print(f"{jax.devices()[0].device_kind}, {args.layers} layers of {rows_in}x{out} and back, "
          f"int8 in groups of {args.group_size}")
    for m in map(int, args.rows.split(",")):
        x = rng.normal(size=(m, rows_in)).astype(np.float32)
        want = x.astype(np.float64)
        for up, down in host[:1]:
            want = want @ dequantize(up) @ dequantize(down)
        programs = {form: jax.jit(lambda x, layers, form=form: chain(form, x, layers))
                    for form in FORMS}
        for form, run in programs.items():
            got = np.asarray(chain(form, jnp.asarray(x), layers[:1]), np.float64)
            assert np.allclose(got, want, rtol=1e-4, atol=1e-3 * np.abs(want).max()), form
            run(jnp.asarray(x), layers).block_until_ready()
        best = {form: float("inf") for form in FORMS}
        for _ in range(args.repeats):  # the forms interleaved: load changes hit both
            for form, run in programs.items():
                start = time.perf_counter()
                run(jnp.asarray(x), layers).block_until_ready()
                best[form] = min(best[form], time.perf_counter() - start)
        line = ", ".join(f"{form} {t * 1e3:.2f} ms ({t * 1e6 / (2 * args.layers):.0f} us)"
                         for form, t in best.items())
        print(f"rows {m}: {line}; ratio {best['row-blocked'] / best['dequantised']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
