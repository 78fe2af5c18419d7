#!/usr/bin/env python3
"""Weights in column panels for the CPU kernels (quant.TiledWeight) against the layouts they
replace, on SmolLM-135M's shapes (30 layers; D 576, 9 / 3 heads of 64, FFN 1536, vocab 49152):

- layers: a scan over 30 stacked layers of the seven matmul weights, x of --rows rows: int8 in
  groups of 64 rows, row-major stacks as hk.layer_stack hands them over (XLA copies each
  layer's slice out, the row kernel reads the copy) against panels read in place at the scan's
  layer; float32 read in place row-major (the one-slot layout before panels) or transposed
  [L, O, I] (the several-slot one) against panels;
- head: the int8 tied head [D, V] in groups of 32, the [V, D] table through the transposed
  kernel with row scales against the [D, V] head in panels.

  python scripts/bench_tiled_weights.py [--rounds 5] [--rows 1]

The forms alternate within each round (this VM drifts 20-40% between processes); reported: the
median over rounds of each round's median, in ms and weight GB/s. Results are compared first
(within float32 rounding).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import cpu_kernels  # noqa: E402
from runtime.quant import QuantizedWeight8bit, tiled, transposed  # noqa: E402

LAYERS, WIDTH, VOCAB = 30, 576, 49152
SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def _scan(product):
    """f(x [M, D], weights) through the 30 layers' seven products, each output cut or tiled
    to the next input width (the values do not matter, the reads do)."""
    def body(weights, x, layer):
        y = x
        for w in weights:
            rows = w.shape[-2]
            xin = y[:, :rows] if y.shape[1] >= rows else jnp.tile(y, (1, 3))[:, :rows]
            y = jnp.tanh(product(xin, w, layer) * 1e-4) + 1.0  # contracting: rounding not amplified
        return y[:, :WIDTH], None
    return jax.jit(lambda x, weights: jax.lax.scan(
        lambda x, layer: body(weights, x, layer), x, jnp.arange(LAYERS, dtype=jnp.int32))[0])


def _row_major(x, w, layer):
    """A row-major stack: sliced by the scan as hk.layer_stack does (int8: XLA copies the
    slice) or read in place (float32, the one-slot layout before tiling)."""
    if isinstance(w, QuantizedWeight8bit):
        return cpu_kernels.rows_linear(x, w.weight[layer], w.scales[layer])
    return cpu_kernels.rows_linear(x, w, layer=layer)


def _tiled(x, w, layer):
    return cpu_kernels.tiled_linear(x, w.tiles, w.scales, layer)


def _transposed(x, w, layer):  # w [L, O, I]: its logical rows are w.shape[-1]
    return cpu_kernels.transposed_linear(x, w.weight_t, layer=layer)


def _layer_forms(rng, int8: bool):
    """(weight bytes, {form: (function, weights)}) of the 30 layers."""
    if int8:
        stacks = [QuantizedWeight8bit(
            jnp.asarray(rng.integers(-127, 128, (LAYERS, i, o), dtype=np.int8)),
            jnp.asarray(rng.random((LAYERS, i // 64, o)) + 0.5, jnp.float32))
            for i, o in SHAPES]
    else:
        stacks = [jnp.asarray(rng.standard_normal((LAYERS, i, o), dtype=np.float32))
                  for i, o in SHAPES]
    nbytes = sum(np.prod(w.shape) * (1 if int8 else 4) for w in stacks)
    forms = {"row-major": (_scan(_row_major), stacks)}
    if not int8:
        forms["transposed"] = (_scan(_transposed), [transposed(w) for w in stacks])
    forms["panels"] = (_scan(_tiled), [tiled(w) for w in stacks])
    return nbytes, forms


def _head_forms(rng):
    """(weight bytes, forms) of the int8 tied head: [V, D] table with row scales [V, R],
    against the head [D, V] tiled."""
    table = jnp.asarray(rng.integers(-127, 128, (VOCAB, WIDTH), dtype=np.int8))  # [V, D]
    scales = jnp.asarray(rng.random((WIDTH // 32, VOCAB)) + 0.5, jnp.float32)  # [R, V]
    transposed = jax.jit(lambda x, w: cpu_kernels.transposed_linear(x, w[0], row_scales=w[1]))
    return table.size, {
        "transposed": (transposed, (table, scales.T.copy())),
        "panels": (jax.jit(lambda x, w: _tiled(x, w, None)),
                  tiled(QuantizedWeight8bit(table.T.copy(), scales)))}


def _time(forms, x, rounds: int, steps: int = 10) -> dict:
    outputs = [np.asarray(f(x, weights)) for f, weights in forms.values()]
    for other in outputs[1:]:
        np.testing.assert_allclose(other, outputs[0], rtol=1e-4,
                                   atol=1e-4 * np.abs(outputs[0]).max())
    medians = {name: [] for name in forms}
    for _ in range(rounds):
        for name, (form, weights) in forms.items():
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                form(x, weights).block_until_ready()
                times.append(time.perf_counter() - start)
            medians[name].append(statistics.median(times))
    return {name: statistics.median(values) for name, values in medians.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rows", type=int, default=1)
    args = p.parse_args(argv)
    if not cpu_kernels.available():
        print("the CPU kernels did not build here (see above)", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.rows, WIDTH), dtype=np.float32))
    print("| product | form | ms | weight GB/s |")
    print("| --- | --- | --- | --- |")
    for label, (nbytes, forms) in (("30 layers int8 g64", _layer_forms(rng, True)),
                                   ("30 layers float32", _layer_forms(rng, False)),
                                   ("head int8 g32", _head_forms(rng))):
        for name, seconds in _time(forms, x, args.rounds).items():
            print(f"| {label} | {name} | {1e3 * seconds:.2f} | {nbytes / seconds / 1e9:.1f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
