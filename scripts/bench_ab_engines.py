#!/usr/bin/env python3
"""A/B of engine variants in one process, their decode steps interleaved: for choices whose
effect is smaller than this VM's drift between processes (20-40%, BENCHMARKS.md, "Noise").

  python scripts/bench_ab_engines.py /tmp/gguf/smollm-135m-F32.gguf \\
      --variant "views=" --variant "scan=layout.LAYER_VIEWS_IN_SCAN=False" --rounds 8

Each variant is `name=VAR=VALUE,...`: environment variables, or `layout.NAME=VALUE` for a
module constant of runtime/layout.py, set while its engine is built and traced (both are read
when programs are traced) and restored after. Every engine gets the same random 64-token prompts
(one per slot: rows of one prompt would route alike through MoE layers); then the variants take
turns, `--steps` greedy decode steps each (all `--slots` rows), for `--rounds` rounds.
Reported per variant: the median over rounds of each round's median ms/step, and the least;
and whether the greedy tokens agree with the first variant's. With --prefill, the rounds time
the prompt's prefill into every slot instead (ms per prefill, and its first tokens compared):

  python scripts/bench_ab_engines.py /tmp/gguf/mixtral-F32.gguf --prefill --prompt-len 512 \
      --variant "grouped=" --variant "tiles=layout.GROUPED_EXPERTS_IN_KERNEL=False"
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_runtime  # noqa: E402
from runtime import layout  # noqa: E402
from runtime.engine import build_engine  # noqa: E402


def apply(settings: str) -> dict:
    """Sets a variant's settings; returns what to restore."""
    saved = {}
    for item in filter(None, settings.split(",")):
        key, value = item.split("=", 1)
        if key.startswith("layout."):
            name = key[len("layout."):]
            saved[key] = getattr(layout, name)
            setattr(layout, name, type(saved[key])(eval(value, {})) if value else None)
        else:
            saved[key] = os.environ.get(key)
            os.environ[key] = value
    return saved


def restore(saved: dict) -> None:
    for key, value in saved.items():
        if key.startswith("layout."):
            setattr(layout, key[len("layout."):], value)
        elif value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--variant", action="append", required=True, metavar="NAME=SETTINGS")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--slots", type=int, default=1, help="batch rows, all decoding")
    p.add_argument("--prefill", action="store_true", help="time prefills, not decode steps")
    args = p.parse_args()
    cache = args.prompt_len + args.steps * args.rounds + 8
    spec = {"checkpoint": args.checkpoint, "name": Path(args.checkpoint).stem}
    config, _, params, mesh = bench_runtime.load_model(spec, cache)
    rng = np.random.default_rng(0)
    prompts = [tuple(int(t) for t in rng.integers(3, config.vocab_size, args.prompt_len))
               for _ in range(args.slots)]
    engines = {}
    for variant in args.variant:
        name, settings = variant.split("=", 1)
        saved = apply(settings)
        engine = build_engine(config, params, mesh, slots=args.slots, cache_length=cache)
        first = engine.prefill_many([(slot, bench_runtime.Request(prompt, max_new_tokens=cache))
                                     for slot, prompt in enumerate(prompts)])
        tokens = np.asarray(first, np.int32)
        tokens = engine.decode(*bench_runtime.decode_inputs(tokens))  # compiles
        restore(saved)
        engines[name] = [engine, tokens, [], []]
    for _ in range(args.rounds):
        for name, state in engines.items():
            engine, tokens, medians, generated = state
            if args.prefill:
                start = time.perf_counter()
                first = engine.prefill_many([(slot, bench_runtime.Request(
                    prompt, max_new_tokens=cache)) for slot, prompt in enumerate(prompts)])
                medians.append(time.perf_counter() - start)
                generated.append(tuple(int(t) for t in first))
                continue
            tokens, times = bench_runtime.timed_decode(engine, tokens, args.steps)
            state[1] = tokens
            medians.append(statistics.median(times))
            generated.append(int(np.asarray(tokens)[0]))
    reference = next(iter(engines.values()))[3]
    for name, (_, _, medians, generated) in engines.items():
        unit = "ms/prefill" if args.prefill else "ms/step"
        print(f"{name:16s} median {statistics.median(medians) * 1e3:6.2f} {unit}, least "
              f"{min(medians) * 1e3:6.2f}; rounds "
              f"{' '.join(f'{m * 1e3:.1f}' for m in medians)}; tokens "
              f"{'same' if generated == reference else 'differ'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
