#!/usr/bin/env python3
"""Batch-1 decode of one GGUF file against llama-bench in the same minutes: for files
`bench.py --peer llamacpp` cannot write (K-quants: llama-quantize makes them), on a VM whose
speed drifts 20-40% between minutes (BENCHMARKS.md, "Noise").

  python scripts/bench_vs_llama_bench.py /tmp/gguf/llama1b4-Q4_K_M.gguf \\
      --llama-bench /tmp/llsrc/build/bin/llama-bench --rounds 6

Our engine is built once (one slot, a 64-token prompt prefilled); then each round times 64
greedy decode steps here (bench_runtime.timed_decode: the median step of its decode blocks; the
context grows by each round's steps, a few hundred tokens more than llama-bench's by the end,
which costs ours a little attention) and then one llama-bench run (`-p 0 -n 64 -d 64 -r 1`,
the threads given). The first round warms both and is not counted. Reported: each round's
tokens/s and ratio, and the medians. Environment variables the kernels read once
(RUNTIME_KERNEL_*) are the A/B between processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import bench_runtime  # noqa: E402
from runtime.engine import build_engine  # noqa: E402

STEPS = 64


def llama_bench_tokens_per_s(binary: str, gguf: str, threads: int) -> float:
    """llama-bench's tg tokens/s for 64 tokens after 64 of context (its csv's avg_ts)."""
    env = dict(os.environ, LD_LIBRARY_PATH=str(Path(binary).parent))
    done = subprocess.run([binary, "-m", gguf, "-p", "0", "-n", str(STEPS), "-d", str(STEPS),
                           "-t", str(threads), "-r", "1", "-o", "csv"], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"llama-bench failed: {done.stderr.strip()[-300:]}")
    header, row = done.stdout.strip().splitlines()[-2:]
    return float(dict(zip(header.split(","), row.split(",")))["avg_ts"].strip('"'))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf", help="the GGUF file both run")
    p.add_argument("--llama-bench", required=True, help="the llama-bench binary")
    p.add_argument("--rounds", type=int, default=6, help="counted rounds (one more warms up)")
    p.add_argument("--threads", type=int, default=2, help="llama-bench's threads (-t)")
    p.add_argument("--int8-activations", action="store_true", help="ours under int8 x")
    args = p.parse_args(argv)
    spec = {"checkpoint": args.gguf, "name": Path(args.gguf).name,
            "int8_activations": args.int8_activations}
    cache = STEPS + (args.rounds + 1) * 2 * STEPS  # a round decodes 64 + one block (<= 64)
    config, _, params, mesh = bench_runtime.load_model(spec, cache)
    engine = build_engine(config, params, mesh, slots=1, cache_length=cache)
    request = bench_runtime.Request(tuple(range(3, 3 + STEPS)), max_new_tokens=1 << 20)
    tokens = np.asarray(engine.prefill_many([(0, request)]), np.int32).reshape(1)
    ours, theirs = [], []
    for r in range(args.rounds + 1):
        tokens, steps = bench_runtime.timed_decode(engine, tokens, STEPS)
        peer = llama_bench_tokens_per_s(args.llama_bench, args.gguf, args.threads)
        if r:
            ours.append(1 / statistics.median(steps))
            theirs.append(peer)
            print(f"round {r}: ours {ours[-1]:.1f} tok/s, llama.cpp {peer:.1f}, "
                  f"ratio {ours[-1] / peer:.2f}", flush=True)
    ratios = [a / b for a, b in zip(ours, theirs)]
    print(f"median: ours {statistics.median(ours):.1f} tok/s, llama.cpp "
          f"{statistics.median(theirs):.1f}, ratio {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
