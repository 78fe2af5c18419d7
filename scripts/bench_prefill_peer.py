#!/usr/bin/env python3
"""Prompt prefill on the CPU against llama.cpp, the same GGUF file, the same run.

  python scripts/bench_prefill_peer.py /tmp/gguf/smollm-135m-F32.gguf \\
      --llama-bench /tmp/llsrc/build/bin/llama-bench --lengths 512,2048,8192 --rounds 2

Per prompt length and round, in fresh processes taking turns: the runtime with its attention
in the CPU kernel (cpu_prefill_attention.cc), the runtime with XLA's attention (the A/B), and
llama.cpp's llama-bench (`-p P -n 0`, flash attention on, as its fastest; --threads each).
With --int8-activations, also the runtime under run.py's --int8-activations (Q8_0, Q4_0).
Reported: prefill tokens/s per round and the best; ours / llama.cpp as throughput ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from bench import engine_run  # noqa: E402

COLUMNS = ("kernel", "xla", "llama.cpp")


def ours(path: Path, length: int, kernel: bool, int8_x: bool = False) -> float:
    spec = {"checkpoint": str(path), "name": f"{path.stem} {'kernel' if kernel else 'xla'}",
            "overrides": {"sequence_len": length + 64}, "prefill_kernel": kernel,
            "int8_activations": int8_x}
    out = engine_run(spec, [[1, length]], steps=2, cache_length=length + 3, repeats=1)
    return out["rows"][0]["prefill_tokens_per_s"]


def llamacpp(binary: Path, path: Path, length: int, threads: int) -> float:
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(
        [str(binary.parent), os.environ.get("LD_LIBRARY_PATH", "")]))
    done = subprocess.run([str(binary), "-m", str(path), "-t", str(threads), "-p", str(length),
                           "-n", "0", "-fa", "1", "-r", "1", "-o", "json"],
                          stdout=subprocess.PIPE, text=True, timeout=1800, check=True, env=env)
    return json.loads(done.stdout)[0]["avg_ts"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("--llama-bench", type=Path, required=True)
    p.add_argument("--lengths", default="512,2048,8192")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--int8-activations", action="store_true",
                   help="also ours with run.py's --int8-activations (Q8_0 and Q4_0 files), "
                        "kernel attention")
    args = p.parse_args(argv)
    columns = COLUMNS + (("int8 x",) if args.int8_activations else ())
    rows = []
    for length in [int(n) for n in args.lengths.split(",") if n]:
        rates = {name: [] for name in columns}
        for _ in range(args.rounds):
            rates["kernel"].append(ours(args.gguf, length, True))
            rates["xla"].append(ours(args.gguf, length, False))
            if args.int8_activations:
                rates["int8 x"].append(ours(args.gguf, length, True, int8_x=True))
            rates["llama.cpp"].append(llamacpp(args.llama_bench, args.gguf, length,
                                               args.threads))
            print(f"P={length}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()),
                  file=sys.stderr, flush=True)
        best = {name: max(values) for name, values in rates.items()}
        rows.append({"prompt": length, "rounds": rates, "best": best,
                     "over_llamacpp": {name: best[name] / best["llama.cpp"] for name in best
                                       if name != "llama.cpp"}})
    ours_names = [name for name in columns if name != "llama.cpp"]
    print("| prompt | ours, kernel (tok/s, rounds) | ours, XLA | llama.cpp (flash attention) | "
          + "".join(f"ours, {name} | " for name in columns[3:])
          + " | ".join(f"{name} / llama.cpp" for name in ours_names) + " |\n|"
          + " --- |" * (1 + len(columns) + len(ours_names)))
    for row in rows:
        cells = [", ".join(f"{v:.0f}" for v in row["rounds"][name]) for name in columns]
        ratios = [f"{row['over_llamacpp'][name]:.2f}" for name in ours_names]
        print(f"| {row['prompt']} | {' | '.join(cells)} | {' | '.join(ratios)} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
