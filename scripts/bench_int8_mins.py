#!/usr/bin/env python3
"""The cost of an int8 weight's mins in the CPU panel kernels (runtime/int8_mins.py): a
Q5_K-like weight in panels (codes 0..31, scales d * sc and mins -dmin * m per 32 rows, both
super-scaled as a one-device engine holds them) against the same codes without mins, and with
float32 mins, at a few row counts.

  python scripts/bench_int8_mins.py [--shape 2048,8192] [--rows 1,4,512]

Per form and row count: the best of 5 rounds of repeated jitted products, in ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.models.stored_weights import super_scaled_tables  # noqa: E402
from runtime.products import linear  # noqa: E402
from runtime.quant import QuantizedWeight8bit, tiled  # noqa: E402


def q5_k_like(rows: int, out: int, rng) -> QuantizedWeight8bit:
    """Codes 0..31; per 32 rows a scale d * sc and a min -dmin * m, d and dmin f16 per 256."""
    supers = (rows // 256, 1, out)
    d, dmin = (rng.uniform(2e-5, 4e-5, supers).astype(np.float16).astype(np.float32)
               for _ in range(2))
    sc, m = (rng.integers(0, 64, (rows // 256, 8, out)) for _ in range(2))
    return QuantizedWeight8bit(jnp.asarray(rng.integers(0, 32, (rows, out)), jnp.int8),
                               jnp.asarray((d * sc).reshape(rows // 32, out), jnp.float32),
                               jnp.asarray(-(dmin * m).reshape(rows // 32, out), jnp.float32))


def best_ms(product, x, w, calls: int) -> float:
    product(x, w).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            y = product(x, w)
        y.block_until_ready()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2048,8192", help="I,O (I a multiple of 256)")
    parser.add_argument("--rows", default="1,4,512")
    args = parser.parse_args()
    rows_in, out = (int(n) for n in args.shape.split(","))
    rng = np.random.default_rng(0)
    w = q5_k_like(rows_in, out, rng)
    forms = {"mins (super-scaled)": tiled(w),
             "no mins": tiled(QuantizedWeight8bit(w.weight, w.scales))}
    forms = {name: super_scaled_tables({"m": {"w": form}})["m"]["w"]
             for name, form in forms.items()}
    forms["float32 mins"] = dataclasses.replace(forms["mins (super-scaled)"], mins=w.mins)
    product = jax.jit(lambda x, w: linear(x, w, jnp.float32))
    for rows in (int(n) for n in args.rows.split(",")):
        x = jnp.asarray(rng.normal(0, 1, (rows, rows_in)), jnp.float32)
        times = {name: best_ms(product, x, form, 20 if rows < 100 else 3)
                 for name, form in forms.items()}
        print(f"rows {rows}: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in times.items()))


if __name__ == "__main__":
    main()
