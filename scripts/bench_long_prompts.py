#!/usr/bin/env python3
"""Long-prompt prefill: the CPU attention kernel, XLA's blockwise and dense paths, same model.

  python scripts/bench_long_prompts.py [--kernel 4096,16384,32768] [--lengths 4096,16384,32768]
      [--dense 4096,16384] [--chunked 4096,16384,32768]

One fresh process of scripts/bench_runtime.py per (path, prompt length) on configs/
long-context-test.yaml (4 layers, D 256, 8 query / 2 KV heads, random weights, batch 1):
prefill tokens/s (best of 2 repeats) and the process's peak resident memory. Paths: the whole
prompt at once, attended in the CPU kernel (--kernel, cpu_prefill_attention.cc), blockwise
through XLA (--lengths) or densely (--dense: its [T, T] logits per head do not fit 24 GB at
32k), and chunked prefill with the kernel (--chunked: chunks of layout.PREFILL_CHUNK, as the
scheduler feeds a long prompt). Numbers go to BENCHMARKS.md ("Long prompts").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

sys.path.insert(0, str(ROOT))

from bench import engine_run  # noqa: E402
from runtime.layout import PREFILL_CHUNK  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernel", default="4096,16384,32768",
                   help="lengths whose attention runs in the CPU kernel (the default path)")
    p.add_argument("--lengths", default="4096,16384,32768",
                   help="lengths attended blockwise through XLA (the kernel off)")
    p.add_argument("--dense", default="4096,16384")
    p.add_argument("--blocks", default="", help="block sizes to A/B (default: the layout's)")
    p.add_argument("--chunked", default="4096,16384,32768",
                   help="lengths also prefilled in chunks of layout.PREFILL_CHUNK")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    blocks = [int(b) for b in args.blocks.split(",") if b] or [None]
    runs = [("kernel", int(n), None) for n in args.kernel.split(",") if n] + \
        [(f"blockwise{f' b={b}' if b else ''}", int(n), b)
            for n in args.lengths.split(",") if n for b in blocks] + \
        [("dense", int(n), None) for n in args.dense.split(",") if n] + \
        [("chunked", int(n), None) for n in args.chunked.split(",") if n]
    rows = []
    for path, length, block in runs * args.rounds:  # rounds interleave every case
        spec = {"config": "long-context-test", "dense_attention": path == "dense",
                "prefill_kernel": path in ("kernel", "chunked"),
                "attention_block": block, "name": f"long-context-test {path}",
                "prefill_chunk": PREFILL_CHUNK if path == "chunked" else 0}
        out = engine_run(spec, [[1, length]], steps=2, cache_length=length + 3, repeats=2)
        row = out["rows"][0]
        rows.append({"path": path, "prompt": length, "prefill_tok_s": row["prefill_tokens_per_s"],
                     "prefill_s": row["prefill_s"], "peak_gb": out["peak_memory_bytes"] / 1e9})
        print(f"{path:14s} P={length:6d}: prefill {row['prefill_tokens_per_s']:7.0f} tok/s "
              f"({row['prefill_s']:.2f} s), peak resident {out['peak_memory_bytes'] / 1e9:.2f} GB",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
