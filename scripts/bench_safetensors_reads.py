#!/usr/bin/env python3
"""Read speed of safetensors tensors: this runtime's memory-mapped reader
(runtime/checkpoint/safetensors_io.py) against the `safetensors` package's
safe_open(..., framework="numpy"), on the same file, rounds interleaved.

  python scripts/bench_safetensors_reads.py [--mb 512] [--rounds 3] [--dir /tmp]

The file holds float32 and bf16 weights of 4096 columns. Timed per reader: every tensor whole,
and a quarter of each tensor's rows (the slice a 4-way row-sharded process reads). The page
cache is warm after the first round, so the numbers are the readers' own costs (parsing, copies),
not the disk's. Numbers go to BENCHMARKS.md ("safetensors reads").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.checkpoint.safetensors_io import SafetensorsFile, save_safetensors  # noqa: E402


def ours(path: Path, quarter: bool) -> int:
    f = SafetensorsFile(path)
    total = 0
    for name in f.keys():
        view = f.get(name)
        part = np.array(view[:view.shape[0] // 4] if quarter else view)  # copy out of the map
        total += part.nbytes
    return total


def package(path: Path, quarter: bool) -> int:
    from safetensors import safe_open
    total = 0
    with safe_open(str(path), framework="numpy") as f:
        for name in f.keys():
            if quarter:
                sliced = f.get_slice(name)
                part = sliced[:sliced.get_shape()[0] // 4]
            else:
                part = f.get_tensor(name)
            total += part.nbytes
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = max(1, args.mb * (1 << 20) // (4096 * 3 * 8))  # 8 tensors: 4 float32 + 4 bf16
    tensors = {f"w{i}": rng.standard_normal((rows, 4096), np.float32).astype(
        np.float32 if i % 2 else ml_dtypes.bfloat16) for i in range(8)}
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        path = Path(scratch) / "bench.safetensors"
        save_safetensors(tensors, path)
        size = path.stat().st_size
        best: dict = {}
        for _ in range(args.rounds):
            for quarter in (False, True):
                for label, reader in (("runtime", ours), ("safetensors", package)):
                    start = time.perf_counter()
                    read = reader(path, quarter)
                    seconds = time.perf_counter() - start
                    key = (label, "quarter rows" if quarter else "whole")
                    best[key] = min(best.get(key, (1e9, 0)), (seconds, read))
    print(f"file {size / 1e6:.0f} MB, best of {args.rounds} interleaved rounds")
    for (label, what), (seconds, read) in sorted(best.items(), key=lambda t: (t[0][1], t[0][0])):
        print(f"{what:13s} {label:12s} {read / 1e6:7.0f} MB in {seconds * 1e3:7.1f} ms "
              f"({read / seconds / 1e9:5.2f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
