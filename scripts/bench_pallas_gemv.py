#!/usr/bin/env python3
"""The Pallas int8 GEMV (runtime/pallas_gemv.py) against XLA's products, on a GPU.

  PYTHONPATH=. python3 scripts/bench_pallas_gemv.py --json pallas_gemv.json
  PYTHONPATH=. python3 scripts/bench_pallas_gemv.py --quick      CPU smoke run (interpret mode)

Per Llama-8B weight [O, I] (int8, scales [I/64, O] bf16 by default) and rows B in {1, 8}:
  pallas     int8_gemv under several block configurations (BO, BI, num_warps, variant)
  xla_int8   products.transposed_linear, the engine's current XLA form
  xla_bf16   einsum of x with a bf16 weight [O, I] (the reference for a 2-byte weight)
Each kernel is checked against xla_int8 (max relative error) before it is timed. A timing runs
one jitted program of N products, each with its own x and its own copy of the weight (the
copies together exceed the H200's 50 MB L2, so every product streams its weight from HBM),
and divides the median of its runs by N. Bytes per product: the int8 weight, its scales, x
and the float32 output. Every configuration is wrapped: a failure prints one line and the
sweep goes on. One JSON line per measurement; a markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from runtime import pallas_gemv

PEAK_BYTES_PER_S = 4.8e12  # H200 HBM3e
RING_BYTES = 1 << 30  # weight copies per timing: together this many bytes (4 to 64 copies)
PASSES = 10  # ring programs dispatched back to back per timed run
SHAPES = [  # name, O, I
    ("gate_up", 14336, 4096), ("down", 4096, 14336), ("qkv", 6144, 4096),
    ("q_o", 4096, 4096), ("k_v", 1024, 4096), ("head", 128256, 4096)]
SWEPT = ("gate_up", "down")  # every candidate runs on these; the others get the best few
QUICK_SHAPES = [("quick_a", 256, 512), ("quick_odd_o", 100, 512)]


def candidates(rows: int, quick: bool) -> list[dict]:
    """Kernel configurations to try for `rows` rows (keyword arguments of int8_gemv)."""
    if quick:
        return [{}, {"block_out": 16, "block_in": 128, "use_dot": rows > 1}]
    found = [{}]  # the defaults first
    if rows <= 4:
        found += [{"block_out": bo, "block_in": bi, "num_warps": nw, "use_dot": False}
                  for bo in (16, 32, 64, 128) for bi in (64, 256, 1024) for nw in (4, 8)]
        found += [{"block_out": 32, "block_in": 512, "num_warps": 4, "num_stages": ns,
                   "use_dot": False} for ns in (2, 4)]
    else:
        found += [{"block_out": bo, "block_in": bi, "num_warps": nw, "use_dot": True}
                  for bo in (32, 64, 128) for bi in (64, 256) for nw in (4, 8)]
        found += [{"block_out": bo, "block_in": 512, "num_warps": nw, "use_dot": False}
                  for bo, nw in ((32, 4), (64, 8))]
    return found


def emit(record: dict, log: list) -> None:
    log.append(record)
    print(json.dumps(record), flush=True)


def product_bytes(rows: int, out: int, inp: int, groups: int, x_bytes: int) -> int:
    return out * inp + groups * out * 2 + rows * inp * x_bytes + rows * out * 4


def time_ring(fn, xs, operands, repeats: int, passes: int) -> float:
    """Median seconds per product over `repeats` runs, each `passes` dispatches of one
    program of len(xs) products, waited for once (the host dispatches while the GPU runs)."""
    @jax.jit
    def ring(xs, operands):
        return [fn(x, *op) for x, op in zip(xs, operands)]

    jax.block_until_ready(ring(xs, operands))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready([ring(xs, operands) for _ in range(passes)])
        times.append((time.perf_counter() - start) / passes)
    return statistics.median(times) / len(xs)


def make_operands(out: int, inp: int, groups: int, copies: int, seed: int):
    """`copies` distinct int8 weights [O, I] with bf16 scales [R, O]."""
    make = jax.jit(lambda key: (
        jax.random.randint(key, (out, inp), -127, 128, jnp.int8),
        (jax.random.uniform(jax.random.fold_in(key, 1), (groups, out)) * 0.02
         ).astype(jnp.bfloat16)))
    return [make(jax.random.PRNGKey(seed + n)) for n in range(copies)]


def xla_int8(x, weight_t, scales):
    """XLA's form of the product (products.py takes the Pallas kernel on GPUs: not here)."""
    from runtime import layout
    from runtime.products import transposed_linear
    from runtime.quant import TransposedWeight
    layout.PALLAS_INT8_GEMV = False  # read while tracing: XLA's form is what gets compiled
    try:
        return transposed_linear(x, TransposedWeight(weight_t, scales))
    finally:
        layout.PALLAS_INT8_GEMV = True


def xla_bf16(x, weight_bf16):
    return jnp.einsum("bi,oi->bo", x, weight_bf16, preferred_element_type=jnp.float32)


def relative_error(y, ref) -> float:
    ref = ref.astype(jnp.float32)
    return float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))


def measure(base: dict, fn, xs, operands, size: int, repeats: int, log: list,
            ref=None, passes: int = PASSES) -> dict | None:
    """Checks (against ref) and times one implementation; one JSON line either way."""
    record = dict(base)
    try:
        if ref is not None:
            record["rel_err"] = relative_error(jax.jit(fn)(xs[0], *operands[0]), ref)
        seconds = time_ring(fn, xs, operands, repeats, passes)
        record.update(us=round(seconds * 1e6, 2), gbps=round(size / seconds / 1e9, 1),
                      frac_peak=round(size / seconds / PEAK_BYTES_PER_S, 3))
    except Exception as error:  # a lowering failure must not stop the sweep
        record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}" \
            if str(error) else type(error).__name__
        if "--trace" in sys.argv:
            traceback.print_exc()
    emit(record, log)
    return record if "us" in record else None


def bench_shape(name, out, inp, rows, args, configs, log) -> list:
    """All implementations for one shape and row count; the pallas records that ran."""
    groups = 1 if args.group == 0 else inp // args.group
    size_w = out * inp
    copies = 2 if args.quick else max(4, min(64, -(-RING_BYTES // size_w)))
    dtype = jnp.dtype(args.x_dtype)
    operands = make_operands(out, inp, groups, copies, seed=rows)
    xs = [jax.random.normal(jax.random.PRNGKey(1000 + n), (rows, inp), dtype)
          for n in range(copies)]
    size = product_bytes(rows, out, inp, groups, dtype.itemsize)
    base = {"shape": name, "O": out, "I": inp, "R": groups, "B": rows, "x": str(dtype),
            "copies": copies, "bytes": size}
    ref = None
    try:
        ref = jax.jit(xla_int8)(xs[0], *operands[0])
    except Exception as error:
        print(f"[{name} B={rows}] xla_int8 reference failed: {error}", flush=True)
    measure({**base, "impl": "xla_int8"}, xla_int8, xs, operands, size, args.repeats, log,
            passes=args.passes)
    if not args.quick:
        bf16 = [(w.astype(jnp.bfloat16),) for w, _ in operands]
        measure({**base, "impl": "xla_bf16", "bytes": size + size_w}, xla_bf16, xs, bf16,
                size + size_w, args.repeats, log, passes=args.passes)
        del bf16
    ran = []
    for config in configs:
        fn = _kernel(config, args.quick)
        record = measure({**base, "impl": "pallas", "config": config}, fn, xs, operands,
                         size, args.repeats, log, ref, args.passes)
        if record is not None:
            ran.append(record)
    return ran


def _kernel(config: dict, interpret: bool):
    def fn(x, weight_t, scales):
        return pallas_gemv.int8_gemv(x, weight_t, scales, interpret=interpret, **config)
    return fn


CHECKS = [  # rows, O, I, group (0: R = 1), x dtype, kernel arguments
    (1, 1000, 1024, 64, "bfloat16", {}), (3, 1000, 1024, 0, "float32", {"block_out": 64}),
    (8, 1000, 2048, 64, "float32", {}), (16, 1000, 2048, 128, "bfloat16", {"block_in": 512}),
    (2, 512, 1024, 128, "bfloat16", {"block_in": 32, "split_in": 2}),
    (8, 512, 1024, 64, "bfloat16", {"use_dot": False, "block_out": 128, "num_warps": 8})]


def check_kernel(quick: bool, log: list) -> None:
    """int8_gemv against a float64 numpy product on a few awkward shapes (O not a multiple
    of the block, R = 1, float32 x, I split), one JSON line each."""
    import numpy as np
    for rows, out, inp, group, x_dtype, config in CHECKS[:2] if quick else CHECKS:
        groups = 1 if group == 0 else inp // group
        record = {"impl": "check", "B": rows, "O": out, "I": inp, "R": groups, "x": x_dtype,
                  "config": config}
        try:
            rng = np.random.default_rng(rows)
            q = rng.integers(-127, 128, (out, inp), dtype=np.int8)
            s = jnp.asarray(rng.uniform(0.5, 2, (groups, out)) / 127, jnp.bfloat16)
            x = jnp.asarray(rng.standard_normal((rows, inp)), x_dtype)
            y = np.asarray(pallas_gemv.int8_gemv(x, jnp.asarray(q), s, interpret=quick,
                                                 **config))
            w = q.astype(np.float64) * np.repeat(np.asarray(s, np.float64), inp // groups, 0).T
            want = np.asarray(x.astype(jnp.float32), np.float64) @ w.T
            record["rel_err"] = float(np.max(np.abs(y - want)) / np.max(np.abs(want)))
            record["ok"] = record["rel_err"] < 1e-5
        except Exception as error:
            record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}" \
                if str(error) else type(error).__name__
        emit(record, log)


def best_configs(records: list, count: int) -> list[dict]:
    """The `count` configurations with the lowest summed time over the swept shapes."""
    totals = {}
    for record in records:
        if record.get("rel_err", 0) > 1e-2:
            continue
        key = json.dumps(record["config"], sort_keys=True)
        totals.setdefault(key, []).append(record["us"] / record["bytes"])
    shapes = max((len(v) for v in totals.values()), default=0)
    ranked = sorted((sum(v), k) for k, v in totals.items() if len(v) == shapes)
    return [json.loads(k) for _, k in ranked[:count]]


def table(log: list) -> str:
    """Markdown: per shape and rows, XLA's two forms, the default and the best kernel."""
    lines = ["| shape [O, I] | B | xla int8 us (GB/s) | xla bf16 us (GB/s) | pallas default us "
             "(GB/s) | pallas best us (GB/s, of peak) | best config |",
             "|---|---|---|---|---|---|---|"]
    keys = sorted({(r["shape"], r["O"], r["I"], r["B"]) for r in log if "shape" in r},
                  key=lambda k: (k[0], k[3]))

    def cell(r):
        if r is None:
            return "-"
        return "error" if "us" not in r else f"{r['us']} ({r['gbps']})"
    for shape, out, inp, rows in keys:
        mine = [r for r in log if r.get("shape") == shape and r["B"] == rows]
        pick = {impl: next((r for r in mine if r["impl"] == impl), None)
                for impl in ("xla_int8", "xla_bf16")}
        kernels = [r for r in mine if r["impl"] == "pallas" and "us" in r
                   and r.get("rel_err", 0) <= 1e-2]
        default = next((r for r in kernels if r["config"] == {}), None)
        best = min(kernels, key=lambda r: r["us"], default=None)
        best_cell = "error" if best is None else f"{best['us']} ({best['gbps']}, " \
            f"{best['frac_peak']:.0%})"
        lines.append(f"| {shape} [{out}, {inp}] | {rows} | {cell(pick['xla_int8'])} | "
                     f"{cell(pick['xla_bf16'])} | {cell(default)} | {best_cell} | "
                     f"{'' if best is None else json.dumps(best['config'])} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes in Pallas interpret mode (a CPU smoke run)")
    parser.add_argument("--json", help="write every measurement to this file")
    parser.add_argument("--rows", default="1,8", help="row counts B, comma-separated")
    parser.add_argument("--group", type=int, default=64,
                        help="input values per scale group (0: one scale per output, R = 1)")
    parser.add_argument("--x-dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--passes", type=int, default=PASSES,
                        help="ring programs dispatched per timed run")
    parser.add_argument("--sweep-all", action="store_true",
                        help="every candidate on every shape (default: on gate_up and down)")
    parser.add_argument("--top", type=int, default=4,
                        help="best configurations of the swept shapes run on the others")
    parser.add_argument("--trace", action="store_true", help="full tracebacks of failures")
    args = parser.parse_args()
    backend = jax.default_backend()
    print(f"# jax {jax.__version__}, backend {backend}, devices {jax.devices()}", flush=True)
    if args.quick:
        args.repeats, args.passes = 1, 1
    elif backend != "gpu":
        print("# not a GPU backend: the kernel lowers through Triton on GPUs only; "
              "use --quick for an interpret-mode smoke run", flush=True)
        return 2
    shapes = QUICK_SHAPES if args.quick else SHAPES
    log: list = []
    started = time.perf_counter()
    check_kernel(args.quick, log)
    for rows in (int(r) for r in args.rows.split(",")):
        configs = candidates(rows, args.quick)
        swept = []
        for name, out, inp in shapes:
            if args.quick or args.sweep_all or name in SWEPT:
                swept += bench_shape(name, out, inp, rows, args, configs, log)
        best = best_configs(swept, args.top)
        for name, out, inp in shapes:
            if not (args.quick or args.sweep_all or name in SWEPT):
                chosen = [{}] + [c for c in best if c != {}]
                bench_shape(name, out, inp, rows, args, chosen, log)
    print(f"# {time.perf_counter() - started:.0f} s", flush=True)
    print(table(log), flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"jax": jax.__version__, "backend": backend,
                       "device": str(jax.devices()[0]), "records": log}, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
