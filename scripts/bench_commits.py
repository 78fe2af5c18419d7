#!/usr/bin/env python3
"""Prefill and decode speed of two commits of this repository, interleaved A/B through the
engine: did a change (a refactor, a kernel) move the times?

  python scripts/bench_commits.py BEFORE [AFTER] [--rounds 3] [--batches 1,8] [--json out.json]

AFTER defaults to the working tree. Each commit is checked out once into a temporary git
worktree; every (round, commit, model) is one fresh process of that tree's
scripts/bench_runtime.py, rounds alternating the commits so that drift of the machine hits
both alike. Each commit keeps its best round per phase (scripts/bench.py's best_of_rounds).
Models: the demo checkpoint (float32, its layers scanned) and a Llama-3.2-1B shape with random
weights (float32 and int8 groups of 64: layers unrolled, weights transposed at one slot).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench import best_of_rounds  # noqa: E402
from bench_int8_groups import LLAMA_1B  # noqa: E402

MODELS = {
    "demo float32": {"config": "demo", "checkpoint": "checkpoints/demo"},
    "llama-1B float32": {"hf_config": LLAMA_1B},
    "llama-1B int8 g64": {"hf_config": LLAMA_1B, "weights": "int8", "int8_group_size": 64},
}


def engine_job(tree: Path, model: dict, cases, steps: int) -> list[dict]:
    """One engine job of `tree`'s bench_runtime.py (run from `tree`, importing its runtime)."""
    job = {"job": "engine", "model": model, "cases": cases, "decode_steps": steps,
           "repeats": 3}
    done = subprocess.run([sys.executable, "scripts/bench_runtime.py", json.dumps(job)],
                          cwd=tree, stdout=subprocess.PIPE, text=True, timeout=3600)
    lines = [l for l in done.stdout.splitlines() if l.startswith("BENCH_RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{tree}: engine job failed (exit {done.returncode})")
    return json.loads(lines[-1][len("BENCH_RESULT "):])["rows"]


def worktree(revision: str, parent: Path) -> Path:
    path = parent / revision.replace("/", "_")
    subprocess.run(["git", "worktree", "add", "--detach", str(path), revision], cwd=ROOT,
                   check=True, capture_output=True)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before")
    p.add_argument("after", nargs="?", default=None, help="default: the working tree")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    cases = [[int(b), args.prompt] for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        trees = {args.before: worktree(args.before, Path(scratch))}
        trees[args.after or "working tree"] = worktree(args.after, Path(scratch)) \
            if args.after else ROOT
        try:
            results = compare(trees, args.models.split(","), cases, args)
        finally:
            for label, tree in trees.items():
                if tree != ROOT:
                    subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                                   capture_output=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def compare(trees: dict, models: list[str], cases, args) -> dict:
    rounds = {(label, model): [] for label in trees for model in models}
    for _ in range(args.rounds):
        for model in models:
            for label, tree in trees.items():
                rounds[label, model].append(engine_job(tree, MODELS[model], cases, args.steps))
    results = {}
    for model in models:
        for label in trees:
            rows = results[f"{model} @ {label}"] = best_of_rounds(rounds[label, model])
            for row in rows:
                print(f"{model:18s} {label:14s} B={row['batch']:<3d} decode "
                      f"{row['decode_step_s'] * 1e3:7.2f} ms/step  prefill "
                      f"{row['prefill_tokens_per_s']:7.0f} tok/s", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
