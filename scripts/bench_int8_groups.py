#!/usr/bin/env python3
"""Decode and prefill speed of int8 scale layouts, interleaved A/B through the engine: one
scale per output channel with the tied table float (the layout before group-wise scales),
the same with the table int8, and groups of 128 / 64 / 32 input rows with the table int8.

  python scripts/bench_int8_groups.py [--rounds 2] [--batches 1,8] [--json out.json]

Each (round, layout) is one fresh process of scripts/bench_runtime.py on a Llama-3.2-1B-shaped
model with random weights (tied 128256 x 2048 table: on such small models the table is half
of the bytes a step reads). Rounds interleave the layouts, and each layout keeps its best
round. Reported: ms per decode step, prefill tokens/s, the bytes a step reads (int8 values,
scales, float leaves) and those bytes per second. Numbers go to BENCHMARKS.md ("Group-wise
int8").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench import best_of_rounds, engine_run  # noqa: E402

LLAMA_1B = dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=2048,
                intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                rope_theta=500000.0, tie_word_embeddings=True)
LAYOUTS = {  # label -> (int8_group_size, int8_table)
    "per channel + float table": (0, False),
    "per channel": (0, True),
    "groups of 128": (128, True),
    "groups of 64": (64, True),
    "groups of 32": (32, True),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    cases = [[int(b), args.prompt] for b in args.batches.split(",")]
    labels = args.layouts.split(",")
    rounds: dict[str, list] = {label: [] for label in labels}
    for _ in range(args.rounds):
        for label in labels:
            group, table = LAYOUTS[label]
            spec = {"hf_config": LLAMA_1B,
                    "weights": "int8", "int8_group_size": group, "int8_table": table,
                    "name": f"llama-1B shape, int8 {label}"}
            rounds[label].append(engine_run(spec, cases, args.steps)["rows"])
    results = {}
    for label in labels:
        rows = best_of_rounds(rounds[label])
        results[label] = rows
        for row in rows:
            step_bytes = row["bytes_per_step"]["total"]
            print(f"{label:26s} B={row['batch']:<3d} decode {row['decode_step_s'] * 1e3:7.1f} "
                  f"ms/step ({step_bytes / 1e6:7.1f} MB read, "
                  f"{step_bytes / row['decode_step_s'] / 1e9:5.2f} GB/s)  prefill "
                  f"{row['prefill_tokens_per_s']:7.0f} tok/s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
