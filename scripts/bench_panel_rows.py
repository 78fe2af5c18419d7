#!/usr/bin/env python3
"""Products of many x rows with weights in panels (quant.TiledWeight, quant4.TiledWeight4)
through the CPU panel kernel, and, with --xla, against XLA's path for the same weight in
panels (the weight copied out of its panels, then XLA's dot: what runs past the kernel's row
caps, layout.PANEL_MAX_ROWS).

  python scripts/bench_panel_rows.py                       [576, 1536], 1-256 rows
  python scripts/bench_panel_rows.py --shape 2048,4096 --kinds int4 --rows 16,64
  python scripts/bench_panel_rows.py --rows 256,512,1024 --xla

Random weights: float32, int8 with scales in blocks of 32 rows, int4 (symmetric) in groups of
32, fp16 scales. Each form computes x [M, I] @ W over a ring of 8 weights (so a call streams
its weight from memory unless M makes it compute-bound), 40 calls a round, the least of 5
rounds kept. RUNTIME_KERNEL_MANY_ROWS=N (cpu_panels_many_rows.h) is the kernel's A/B.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import cpu_kernels, layout  # noqa: E402
from runtime.products import linear  # noqa: E402
from runtime.quant import QuantizedWeight8bit, tiled  # noqa: E402
from runtime.quant4 import QuantizedWeight4bit, tiled4  # noqa: E402

RING, CALLS, ROUNDS, BLOCK = 8, 40, 5, 32


def _panel_caps(rows: int) -> None:
    """The rows the panel kernel takes, every kind (layout's caps; 0: XLA's path)."""
    layout.PANEL_MAX_ROWS = layout.INT4_PANEL_MAX_ROWS = rows


def _weight(kind: str, inputs: int, outputs: int, rng):
    """One random weight of `kind` in panels."""
    scales = jnp.asarray(rng.random((inputs // BLOCK, outputs)) + 0.5, jnp.float16)
    if kind in ("f32", "f16", "bf16"):
        dtype = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16}[kind]
        return tiled(jnp.asarray(rng.standard_normal((inputs, outputs), dtype=np.float32), dtype))
    if kind == "int8":
        codes = rng.integers(-127, 128, (inputs, outputs), dtype=np.int8)
        return tiled(QuantizedWeight8bit(jnp.asarray(codes), scales))
    packed = rng.integers(0, 256, (inputs // 2, outputs), dtype=np.uint8)
    return tiled4(QuantizedWeight4bit(jnp.asarray(packed), scales))


def _seconds(product, x, weights) -> float:
    """The least mean time per call over ROUNDS rounds of CALLS calls around the ring."""
    for w in weights:
        product(x, w).block_until_ready()
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for k in range(CALLS):
            y = product(x, weights[k % len(weights)])
        y.block_until_ready()
        best = min(best, (time.perf_counter() - start) / CALLS)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="576,1536", help="I,O of the weight")
    p.add_argument("--kinds", default="f32,int8,int4")
    p.add_argument("--rows", default="1,8,16,32,64,256", help="row counts M, comma-separated")
    p.add_argument("--xla", action="store_true", help="also XLA's path for the weight in panels")
    args = p.parse_args(argv)
    if not cpu_kernels.available():
        print("the CPU kernels are not available on this machine", file=sys.stderr)
        return 1
    inputs, outputs = (int(v) for v in args.shape.split(","))
    rng = np.random.default_rng(0)
    _panel_caps(1 << 30)  # past every row count: the kernel
    kernel = jax.jit(lambda x, w: linear(x, w))
    for kind in args.kinds.split(","):
        weights = [_weight(kind, inputs, outputs, rng) for _ in range(RING)]
        for rows in (int(m) for m in args.rows.split(",")):
            x = jnp.asarray(rng.standard_normal((rows, inputs), dtype=np.float32))
            flops = 2 * rows * inputs * outputs
            seconds = _seconds(kernel, x, weights)
            line = (f"{kind} [{inputs}, {outputs}] M={rows}: kernel {seconds * 1e6:.0f} us "
                    f"({flops / seconds / 1e9:.0f} GFLOP/s)")
            if args.xla:
                _panel_caps(0)
                through_xla = jax.jit(lambda x, w: linear(x, w))
                want = np.asarray(through_xla(x, weights[0]))  # traced now: XLA's path
                _panel_caps(1 << 30)
                error = np.abs(np.asarray(kernel(x, weights[0])) - want).max()
                if error > 1e-4 * np.abs(want).max():
                    print(f"{kind} M={rows}: the kernel is off XLA's product by {error:.3g}",
                          file=sys.stderr)
                    return 1
                xla = _seconds(through_xla, x, weights)
                line += f", XLA {xla * 1e6:.0f} us ({flops / xla / 1e9:.0f} GFLOP/s)"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
