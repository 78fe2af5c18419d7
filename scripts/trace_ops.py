#!/usr/bin/env python3
"""Where a decode step's time goes, from a profiler trace of bench_runtime.py: per operation of
the compiled step (XLA's thunks, e.g. each FFI kernel call and each fusion), and the host's own
time per token (the Python dispatch of the step, before it waits for the device).

  BENCH_PROFILE_DIR=/tmp/prof XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true \\
      python scripts/bench_runtime.py '{"job": "engine", "model": {...}, "cases": [[1, 64]], ...}'
  python scripts/trace_ops.py /tmp/prof [--top 20]

The trace (Perfetto JSON that jax.profiler writes next to its xplane file) covers a few traced
decode steps (3; BENCH_TRACE_STEPS=N for more); an operation's time per step is its total over
the trace divided by the traced tokens. Those tokens are counted as the dispatches
(`decode_async` calls, or `decode_block` calls times their steps: the k bench_runtime.py wrote
beside the trace, or --block). Host time per token: the dispatch calls' durations less the
waits for device results inside them (numpy reads of the step's tokens: decode_block reads its
block's at its end), divided by the tokens; it still counts a dispatch that waits for the step
before it to release the memory it reuses, so it is an upper bound. XLA:CPU thunks only show
with its traceme option on, as in the command above. Operation times overlap across XLA's
threads: they add up to more than the step's wall time.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
from pathlib import Path

DISPATCH = ("decode_async", "decode_block")  # the engine's step dispatch (Python functions)
STEPS_FILE = "decode_steps_per_dispatch"  # bench_runtime.py writes it beside each trace
WAIT = "$numpy asarray"  # a read of device results: the host waits for the device


def newest_trace(folder: Path) -> Path:
    """The newest Perfetto trace under `folder`."""
    traces = sorted(folder.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise SystemExit(f"trace_ops: no perfetto_trace.json.gz under {folder}")
    return traces[-1]


def steps_per_dispatch(trace: Path, folder: Path) -> int:
    """The k of the trace's decode_block calls, as bench_runtime.py wrote it beside the trace
    (in a folder between the trace and `folder`); 1 where it wrote none."""
    for parent in trace.parents:
        written = parent / STEPS_FILE
        if written.is_file():
            return int(written.read_text())
        if parent == folder:
            break
    return 1


def load_events(folder: Path, trace: Path = None) -> list[dict]:
    """The complete ('X') events of `trace`, default the newest Perfetto trace under `folder`."""
    data = json.loads(gzip.decompress((trace or newest_trace(folder)).read_bytes()))
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def summary(events: list[dict], block: int = 1) -> dict:
    """{"tokens", "host_us_per_token", "ops": [(name, us per token, calls per token)]}."""
    dispatches = [e for e in events
                  if e["name"].startswith("$") and e["name"].split()[-1] in DISPATCH]
    tokens = sum(block if e["name"].endswith("decode_block") else 1 for e in dispatches)
    if not tokens:
        raise SystemExit("trace_ops: no decode_async / decode_block calls in the trace")
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        if not e["name"].startswith("$"):  # Python frames start with '$'
            total[e["name"]] += e["dur"]
            calls[e["name"]] += 1
    waits = [e for e in events if e["name"] == WAIT]
    host = sum(d["dur"] - sum(w["dur"] for w in waits if w["tid"] == d["tid"]
                              and d["ts"] <= w["ts"] <= w["ts"] + w["dur"] <= d["ts"] + d["dur"])
               for d in dispatches)
    ops = [(name, us / tokens, calls[name] / tokens) for name, us in total.most_common()
           if not name.startswith(("ThunkExecutor", "PjitFunction", "CommonPjRt"))]
    return {"tokens": tokens, "host_us_per_token": host / tokens, "ops": ops}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="BENCH_PROFILE_DIR of the run (searched below)")
    p.add_argument("--top", type=int, default=20, help="operations listed")
    p.add_argument("--block", type=int, default=None,
                   help="decode steps per decode_block call (default: as bench_runtime.py "
                        "wrote it beside the trace, else 1)")
    args = p.parse_args(argv)
    trace = newest_trace(args.folder)
    block = args.block or steps_per_dispatch(trace, args.folder)
    result = summary(load_events(args.folder, trace), block)
    print(f"tokens traced: {result['tokens']}; host dispatch time per token: "
          f"{result['host_us_per_token']:.0f} us")
    print("| operation | us per token | calls per token | us per call |")
    print("| --- | --- | --- | --- |")
    for name, us, per in result["ops"][:args.top]:
        print(f"| {name[:60]} | {us:.0f} | {per:.1f} | {us / per:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
