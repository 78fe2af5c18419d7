#!/usr/bin/env python3
"""Few-row products with a large weight, written several ways, timed on this machine's default
device: which formulation a decode step should use for bf16 and int8 weights.

  python scripts/bench_products.py                      Llama-8B matrix shapes, rows 1 and 8
  python scripts/bench_products.py --shapes 512x1024 --rows 1 --json out.json

Per shape [I, O] and row count M, each formulation computes x [M, I] @ W [I, O] in float32
accumulation (int8: then times the per-channel scale), over a ring of weights whose bytes
together exceed the last-level cache, so every product streams its weight from memory:
  dot        einsum over [I, O] (the runtime's plain product; int8 widened inside it)
  dot_t      einsum over the transposed weight [O, I]
  reduce     multiply and sum over the input axis of [I, O] (a column reduction)
  reduce_t   multiply and sum over the input axis of [O, I] (a row reduction)
Reported: microseconds per product and the weight bytes it streams per second. Every
formulation is checked against the float64 product first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

FORMS = {
    "dot": lambda x, w: jnp.einsum("mi,io->mo", x, w.astype(x.dtype),
                                   preferred_element_type=jnp.float32),
    "dot_t": lambda x, w: jnp.einsum("mi,oi->mo", x, w.astype(x.dtype),
                                     preferred_element_type=jnp.float32),
    "reduce": lambda x, w: jnp.sum(x.astype(jnp.float32)[:, :, None]
                                   * w.astype(jnp.float32)[None], axis=1),
    "reduce_t": lambda x, w: jnp.sum(x.astype(jnp.float32)[:, None, :]
                                     * w.astype(jnp.float32)[None], axis=2),
}


def ring_size(weight_bytes: int, cache_bytes: int) -> int:
    """Weights in the ring: together at least 4x the cache, at least 2."""
    return max(2, -(-4 * cache_bytes // weight_bytes))


def time_form(form: str, x, weights, scale, repeats: int) -> float:
    """Median seconds of one product, over calls that each run the whole ring."""
    product = FORMS[form]

    @jax.jit
    def ring(x, weights, scale):
        total = jnp.zeros((x.shape[0], scale.shape[-1]), jnp.float32)
        for w in weights:  # independent products; the sum keeps each one live
            total = total + product(x, w) * scale
        return total

    jax.block_until_ready(ring(x, weights, scale))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(ring(x, weights, scale))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / len(weights)


def check(form: str, x, weight, scale, transposed: bool) -> float:
    """Relative error of one product against float64."""
    got = np.asarray(jax.jit(FORMS[form])(x, weight) * scale, np.float64)
    w = np.asarray(weight.astype(jnp.float32), np.float64)
    want = np.asarray(x.astype(jnp.float32), np.float64) @ (w.T if transposed else w) \
        * np.asarray(scale, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="4096x14336,14336x4096,4096x4096,4096x1024",
                   help="comma list of IxO weight shapes (default: Llama-8B's)")
    p.add_argument("--rows", default="1,8", help="comma list of row counts M")
    p.add_argument("--weights", default="bfloat16,int8")
    p.add_argument("--cache-mib", type=int, default=64, help="last-level cache to defeat")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows_out = []
    for shape in args.shapes.split(","):
        i, o = (int(n) for n in shape.split("x"))
        for kind in args.weights.split(","):
            itemsize = 1 if kind == "int8" else 2
            count = ring_size(i * o * itemsize, args.cache_mib << 20)
            key = jax.random.key(len(rows_out))
            keys = jax.random.split(key, count)
            if kind == "int8":  # drawn on the device: host-side drawing took longer than timing
                plain = [jax.random.randint(k, (i, o), -127, 128, jnp.int8) for k in keys]
                scale = jax.random.uniform(key, (o,), jnp.float32, 0.5, 1.5) / 127
            else:
                plain = [(jax.random.normal(k, (i, o), jnp.float32) / np.sqrt(i))
                         .astype(jnp.bfloat16) for k in keys]
                scale = jnp.ones((o,), jnp.float32)
            flipped = [jnp.asarray(w.T, copy=True) for w in plain]
            for m in (int(r) for r in args.rows.split(",")):
                x = jax.random.normal(jax.random.key(m), (m, i), jnp.bfloat16)
                for form in FORMS:
                    weights = flipped if form.endswith("_t") else plain
                    error = check(form, x, weights[0], scale, form.endswith("_t"))
                    seconds = time_form(form, x, weights, scale, args.repeats)
                    row = {"shape": [i, o], "weights": kind, "rows": m, "form": form,
                           "us": seconds * 1e6, "weight_gb_per_s": i * o * itemsize / seconds / 1e9,
                           "rel_error": error}
                    rows_out.append(row)
                    print(f"{i:>6}x{o:<6} {kind:8} M={m:<3} {form:9} {row['us']:9.1f} us "
                          f"{row['weight_gb_per_s']:8.0f} GB/s  err {error:.1e}", flush=True)
            del plain, flipped
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "rows": rows_out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
