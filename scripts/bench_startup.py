#!/usr/bin/env python3
"""Time to a first token from a fresh process: `run.py` on each checkpoint (this tree, and
another tree's `run.py` with --baseline), llama.cpp's `llama-bench` (load and one token) beside
it on GGUF files, in alternating rounds (BENCHMARKS.md, "Loading on every core").

  python scripts/bench_startup.py --checkpoint a.gguf --checkpoint hf-folder \\
      [--baseline /tmp/old-tree] [--llama-bench path/to/llama-bench] [--rounds 2]

Per run: wall, user and system seconds and the peak RSS (GNU time), run.py's load line
(`[load p0] ... in N s`) and a digest of its output ids (the same before and after). The
caches stay warm: the kernels', the compilation and program caches, the page cache, and this
tree's prepared weights cache (RUNTIME_WEIGHTS_CACHE=0 in the environment times the read path
instead; BENCHMARKS.md, "Prepared weights cache").
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIME_FORMAT = "TIMES %e %U %S %M"


def timed(command: list, cwd: Path) -> tuple[str, dict]:
    """(combined output, {wall, user, sys, rss_gb}) of one command under GNU time."""
    done = subprocess.run(["/usr/bin/time", "-f", TIME_FORMAT, *command], cwd=cwd,
                          capture_output=True, text=True)
    output = done.stdout + done.stderr
    found = re.search(r"TIMES ([\d.]+) ([\d.]+) ([\d.]+) (\d+)", output)
    if done.returncode != 0 or found is None:
        sys.exit(f"error: {' '.join(command)} failed ({done.returncode}): "
                 f"{output.strip().splitlines()[-1:]}")
    wall, user, system, rss = found.groups()
    return output, dict(wall=float(wall), user=float(user), sys=float(system),
                        rss_gb=int(rss) / 1e6)


def run_py(tree: Path, checkpoint: str) -> dict:
    output, times = timed([sys.executable, "run.py", "--checkpoint", checkpoint, "--prompt-ids",
                           "1 2 3", "--max-new-tokens", "4", "--json"], tree)
    load = re.search(r"\[load p0\].* in ([\d.]+) s", output)
    ids = re.search(r'"output_ids": \[[\d, ]*\]', output)
    return dict(times, load=float(load.group(1)) if load else None,
                ids=hashlib.md5((ids.group(0) if ids else "").encode()).hexdigest()[:8])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", required=True)
    parser.add_argument("--baseline", type=Path, help="another tree (a git worktree) to run")
    parser.add_argument("--llama-bench", type=Path, help="llama.cpp's llama-bench binary")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    trees = [("this", ROOT)] + ([("baseline", args.baseline)] if args.baseline else [])
    for round_ in range(1, args.rounds + 1):
        for checkpoint in args.checkpoint:
            name = Path(checkpoint).name
            for label, tree in trees:
                r = run_py(tree, checkpoint)
                print(f"{name} r{round_} {label}: load {r['load']} s, wall {r['wall']} s, "
                      f"user {r['user']} s, sys {r['sys']} s, peak RSS {r['rss_gb']:.2f} GB, "
                      f"ids {r['ids']}", flush=True)
            if args.llama_bench and checkpoint.endswith(".gguf"):
                _, t = timed([str(args.llama_bench), "-m", checkpoint, "-p", "0", "-n", "1",
                              "-r", "1", "-t", "2"], ROOT)
                print(f"{name} r{round_} llama-bench: wall {t['wall']} s, user {t['user']} s, "
                      f"peak RSS {t['rss_gb']:.2f} GB", flush=True)


if __name__ == "__main__":
    main()
