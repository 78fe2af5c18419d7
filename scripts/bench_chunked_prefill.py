#!/usr/bin/env python3
"""Streams under a long newcomer: inter-token latency with and without chunked prefill.

  python scripts/bench_chunked_prefill.py [--long 8192] [--chunks 0,512] [--rounds 2]

configs/long-context-test.yaml (4 dense layers, D 256, random float32 weights), 5 slots: four
short prompts (16 tokens) stream greedily; once each has 8 tokens, a prompt of --long tokens
arrives. For each --prefill-chunk setting (0: the whole prompt at once), one warm-up pass (every
program compiled), then --rounds timed passes of the same scenario, interleaved. Reports, over the
short streams' gaps while the long prompt is being prefilled: p50/p99/max inter-token latency,
and the long request's time to first token. Numbers go to BENCHMARKS.md ("Chunked prefill").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402

from bench_runtime import load_model  # noqa: E402
from runtime.engine import build_engine  # noqa: E402
from runtime.request import Request  # noqa: E402

SHORT, ARRIVES_AFTER = 16, 8  # short prompt tokens; their tokens before the long one


def scenario(engine, long_len: int, rng) -> dict:
    """One pass: the gaps between consecutive tokens of each short stream, marked by whether the
    long prompt was still being prefilled, and the long request's time to its first token."""
    vocab = engine.config.vocab_size
    prompts = [tuple(int(t) for t in rng.integers(3, vocab, SHORT)) for _ in range(4)]
    long_prompt = tuple(int(t) for t in rng.integers(3, vocab, long_len))
    streamed = {k: [] for k in range(4)}
    state = {"arrived": None, "first": None}

    pulled = []

    def requests():
        for key, prompt in enumerate(prompts):
            pulled.append(key)
            yield key, Request(prompt, max_new_tokens=10_000)
        state["arrived"] = time.perf_counter()
        yield "long", Request(long_prompt, max_new_tokens=2)

    def on_token(key, token):
        now = time.perf_counter()
        if key == "long":
            if state["first"] is None:
                state["first"] = now
            return None
        streamed[key].append(now)
        # stop each short stream a few tokens after the long one has started decoding
        return state["first"] is not None and now - state["first"] > 0.05

    def arrived() -> bool:  # the long request waits until the short streams are under way
        return len(pulled) < 4 or min(len(s) for s in streamed.values()) >= ARRIVES_AFTER

    for _ in engine.serve(requests(), on_token, arrived):
        pass
    gaps_during, gaps_before = [], []
    for times in streamed.values():
        for a, b in zip(times, times[1:]):
            during = state["arrived"] is not None and state["first"] is not None and \
                b > state["arrived"] and a < state["first"]
            (gaps_during if during else gaps_before).append(b - a)
    return {"during": gaps_during, "before": gaps_before,
            "ttft_s": state["first"] - state["arrived"]}


def summary(gaps: list[float]) -> dict:
    if not gaps:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None, "n": 0}
    ms = np.array(gaps) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()), "n": len(gaps)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--long", type=int, default=8192)
    p.add_argument("--chunks", default="0,512")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    cache = args.long + 64
    config, _, params, mesh = load_model({"config": "long-context-test"}, cache)
    engines = {int(c): build_engine(config, params, mesh, slots=5, cache_length=cache,
                                    prefill_chunk=int(c)) for c in args.chunks.split(",")}
    rng = np.random.default_rng(0)
    for chunk, engine in engines.items():  # warm-up: compiles every program the pass needs
        scenario(engine, args.long, rng)
        print(f"chunk {chunk}: warmed up", file=sys.stderr, flush=True)
    rows = []
    for round_ in range(args.rounds):
        for chunk, engine in engines.items():
            out = scenario(engine, args.long, rng)
            row = {"chunk": chunk, "round": round_, "long": args.long,
                   "ttft_s": out["ttft_s"], "during": summary(out["during"]),
                   "before": summary(out["before"])}
            rows.append(row)
            d, b = row["during"], row["before"]
            print(f"chunk {chunk:5d} round {round_}: long TTFT {out['ttft_s']:.2f} s; short "
                  f"streams while it prefills: ITL p50 {d['p50_ms']:.1f} ms, p99 "
                  f"{d['p99_ms']:.1f} ms, max {d['max_ms']:.1f} ms ({d['n']} gaps); before it "
                  f"arrived: p50 {b['p50_ms']:.1f} ms", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
