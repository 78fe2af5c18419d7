#!/usr/bin/env python3
"""Decode products through the CPU FFI kernels (runtime/cpu_kernels.py) against the XLA forms
they replace (XLA's dot for float32, int8_widening's blocked widening, int4_widening's blocked
unpacking), and int4 panels with float x against x rounded to int8 (--int8-activations), on
this machine's default CPU device.

  python scripts/bench_cpu_kernels.py                 SmolLM-135M and Llama-1B matrix shapes
  python scripts/bench_cpu_kernels.py --rows 1,8 --json out.json

Per shape and row count M, both forms compute x [M, I] @ W over a ring of 8 weights (so each
call streams its weight from memory rather than cache), the forms alternating in 5 rounds;
the best round is kept. Reported: microseconds per product and the weight bytes it streams
per second. Every result is checked against the other form first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import cpu_kernels, int4_widening, int8_widening  # noqa: E402
from runtime.quant import QuantizedWeight8bit, TransposedWeight  # noqa: E402
from runtime.quant4 import QuantizedWeight4bit, tiled4  # noqa: E402

# (label, kind, I, O, scale rows R or int4 group size): [I, O] weights unless transposed
SHAPES = [
    ("smollm q/ffn-in int8 g64", "int8", 576, 1536, 9),
    ("smollm ffn-out int8 g64", "int8", 1536, 576, 24),
    ("smollm ffn-in int8 per channel", "int8", 576, 1536, 1),
    ("smollm head int8 g32 (transposed)", "int8_t", 576, 49152, 18),
    ("smollm ffn-in float32", "f32", 576, 1536, 1),
    ("smollm ffn-in int4 g32", "int4", 576, 1536, 32),
    ("smollm ffn-in int4 g32 panels, float x vs int8 x", "int4_x8", 576, 1536, 32),
    ("llama-1B ffn-in int8 g64", "int8", 2048, 8192, 32),
    ("llama-1B ffn-out int8 g64", "int8", 8192, 2048, 128),
    ("llama-1B ffn-in int4 g32", "int4", 2048, 8192, 32),
    ("llama-1B ffn-in int4 g32 panels, float x vs int8 x", "int4_x8", 2048, 8192, 32),
    ("llama-1B head int8 g64 (transposed)", "int8_t", 2048, 128256, 32),
    ("llama-1B head int8 per channel (transposed)", "int8_t", 2048, 128256, 1),
]
RING = 8


def _weights(kind: str, inputs: int, outputs: int, blocks: int, rng):
    if kind == "f32":
        return [jnp.asarray(rng.standard_normal((inputs, outputs), dtype=np.float32))
                for _ in range(RING)]
    if kind in ("int4", "int4_x8"):
        return [(tiled4 if kind == "int4_x8" else lambda w: w)(QuantizedWeight4bit(
            jnp.asarray(rng.integers(0, 256, (inputs // 2, outputs), dtype=np.uint8)),
            jnp.asarray(rng.random((inputs // blocks, outputs)) + 0.5, jnp.float16)))
            for _ in range(RING)]
    shape = (outputs, inputs) if kind == "int8_t" else (inputs, outputs)
    made = []
    for _ in range(RING):
        weight = jnp.asarray(rng.integers(-127, 128, shape, dtype=np.int8))
        scales = jnp.asarray(rng.random((blocks, outputs)) + 0.5, jnp.float32)
        made.append(TransposedWeight(weight, scales) if kind == "int8_t"
                    else QuantizedWeight8bit(weight, scales))
    return made


FORMS = {  # kind -> (XLA form, kernel form)
    "f32": (lambda x, w: jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST),
            lambda x, w: cpu_kernels.rows_linear(x, w)),
    "int8": (int8_widening.blocked_int8_linear,
             lambda x, w: cpu_kernels.rows_linear(x, w.weight, w.scales)),
    "int8_t": (int8_widening.blocked_transposed_int8_linear,
               lambda x, w: cpu_kernels.transposed_linear(x, w.weight_t, w.scales)),
    "int4": (int4_widening.blocked_int4_linear,
             lambda x, w: cpu_kernels.int4_rows_linear(x, w.packed, w.scales, w.mins)),
    # int4 panels (quant4.TiledWeight4) with float x, and with x rounded to int8 (VNNI dots:
    # run.py --int8-activations): the two agree within the rounding only
    "int4_x8": (lambda x, w: cpu_kernels.tiled_linears(x, [(w.tiles, w.scales, None)])[0],
                lambda x, w: cpu_kernels.tiled_linears(x, [(w.tiles, w.scales, None)],
                                                       int8_x=True)[0]),
}
AGREE = {"int4_x8": 2e-2}  # relative to the largest output; 1e-4 for the exact forms


def bench(kind: str, inputs: int, outputs: int, blocks: int, rows: int, rng) -> dict:
    weights = _weights(kind, inputs, outputs, blocks, rng)
    x = jnp.asarray(rng.standard_normal((rows, inputs), dtype=np.float32))
    forms = dict(zip(("xla", "kernel"), (jax.jit(f) for f in FORMS[kind])))
    first = [np.asarray(f(x, weights[0])) for f in forms.values()]
    scale = np.abs(first[0]).max()
    tolerance = AGREE.get(kind, 1e-4)
    np.testing.assert_allclose(first[1], first[0], rtol=tolerance, atol=tolerance * scale)
    best = {name: float("inf") for name in forms}
    for _ in range(5):
        for name, form in forms.items():
            start = time.perf_counter()
            for w in weights:
                form(x, w).block_until_ready()
            best[name] = min(best[name], (time.perf_counter() - start) / RING)
    weight_bytes = inputs * outputs * {"int4": 0.5, "int4_x8": 0.5, "f32": 4}.get(kind, 1)
    return {name: {"us": 1e6 * seconds, "GB_per_s": weight_bytes / seconds / 1e9}
            for name, seconds in best.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,8", help="row counts M, comma-separated")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if not cpu_kernels.available():
        print("the CPU kernels did not build here (see above)", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    results = []
    print("| product | M | XLA form us (GB/s) | kernel us (GB/s) | XLA / kernel |")
    print("| --- | --- | --- | --- | --- |")
    for rows in (int(r) for r in args.rows.split(",")):
        for label, kind, inputs, outputs, blocks in SHAPES:
            got = bench(kind, inputs, outputs, blocks, rows, rng)
            results.append({"product": label, "rows": rows, **got})
            xla, kernel = got["xla"], got["kernel"]
            print(f"| {label} | {rows} | {xla['us']:.0f} ({xla['GB_per_s']:.1f}) | "
                  f"{kernel['us']:.0f} ({kernel['GB_per_s']:.1f}) | "
                  f"{xla['us'] / kernel['us']:.2f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
