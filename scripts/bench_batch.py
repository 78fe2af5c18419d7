#!/usr/bin/env python3
"""Throughput of a batch job with many slots against the same prompts run one at a time.

  python scripts/bench_batch.py --checkpoint checkpoints/demo --prompts 256 --slots 32

Both runs go through the same engine code (Engine.serve, continuous batching) on the same
weights in the same process; only the slot count differs. Prompts are windows of the
checkpoint's held-out text (heldout.txt) when there is one, else random token ids; generation is
greedy with a fixed number of new tokens, EOS ignored, so both runs do identical work.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from runtime.checkpoint.load import default_config, load_params  # noqa: E402
from runtime.config import load_config  # noqa: E402
from runtime.engine import Engine, bucket_length, build_engine  # noqa: E402
from runtime.request import Request  # noqa: E402
from runtime.sharding import make_mesh  # noqa: E402
from runtime.tokenizer import find_tokenizer, load_tokenizer  # noqa: E402


def prompts_for(folder: Path, config, count: int, rng) -> list[tuple[int, ...]]:
    tokenizer_path = find_tokenizer(folder)
    heldout = folder / "heldout.txt"
    if tokenizer_path and heldout.is_file():
        ids = load_tokenizer(tokenizer_path).encode(heldout.read_text())
        starts = rng.integers(0, len(ids) - 64, count)
        return [tuple(ids[s:s + int(rng.integers(8, 48))]) for s in starts]
    return [tuple(rng.integers(3, config.vocab_size, int(rng.integers(8, 48))).tolist())
            for _ in range(count)]


def run(engine: Engine, requests) -> tuple[float, int]:
    start = time.perf_counter()
    done = [c for _, c in engine.serve(enumerate(requests))]
    return time.perf_counter() - start, sum(len(c.output_ids) for c in done)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/demo"))
    p.add_argument("--config", default=None)
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    folder = args.checkpoint
    config = load_config(args.config) if args.config else \
        default_config(folder) or load_config(folder / "config.yaml")
    config = config.replace(eos_token=None)  # identical work in both runs
    params = load_params(folder, config)
    rng = np.random.default_rng(0)
    requests = [Request(p, max_new_tokens=args.new_tokens, temperature=0.0)
                for p in prompts_for(folder, config, args.prompts, rng)]
    cache = max(len(r.prompt_ids) for r in requests) + args.new_tokens
    mesh = make_mesh({"model": 1})
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {args.prompts} prompts, "
          f"{args.new_tokens} new tokens each, cache {cache}")
    results = {}
    for slots in (args.slots, 1):
        engine = build_engine(config, params, mesh, slots=slots, cache_length=cache)
        # compile first: one short request per prefill bucket, and the decode step
        buckets = {bucket_length(len(r.prompt_ids), cache): r for r in requests}
        run(engine, [dataclasses.replace(r, max_new_tokens=2) for r in buckets.values()])
        seconds, tokens = run(engine, requests)
        results[slots] = seconds
        print(f"slots={slots:3d}: {seconds:7.1f} s, {args.prompts / seconds:7.2f} records/s, "
              f"{tokens / seconds:8.1f} generated tokens/s")
    print(f"ratio (slots={args.slots} vs one at a time): {results[1] / results[args.slots]:.1f}x")


if __name__ == "__main__":
    main()
