#!/usr/bin/env python3
"""Serving benchmark: `run.py serve` under 1, 8 and 32 concurrent streaming clients.

For each concurrency C, starts the real server (a subprocess on a free loopback port, --slots C,
or --slots N for all with --slots) and runs C clients that each send the same fixed number of
streaming /v1/completions requests back to back. Per request: time to first token (first
text chunk), the gaps between chunks (inter-token latency), tokens (usage). Reported: requests/s,
output tokens/s, TTFT and inter-token p50/p99. The reference is the same engine without HTTP:
the same requests through Engine.serve in this process (C slots), so the ratio is what the
server's HTTP, SSE and threading cost on top of the engine with the same slot count.

  python scripts/bench_serving.py [--checkpoint DIR] [--clients 1 8 32] [--requests-per-client 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else 0.0


async def one_request(http, url: str, body: dict) -> dict:
    start = time.perf_counter()
    times, usage = [], None
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("text") for c in chunk["choices"]):
                times.append(time.perf_counter())
    return {"ttft": times[0] - start if times else None,
            "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": usage["completion_tokens"], "seconds": time.perf_counter() - start}


async def run_clients(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    import httpx
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as http:
        async def client(index: int):
            out = []
            for r in range(per_client):
                body = {"prompt": "Return the", "max_tokens": max_tokens, "temperature": 0.8,
                        "seed": index * 1000 + r, "stream": True, "logit_bias": {"2": -100},
                        "stream_options": {"include_usage": True}}
                out.append(await one_request(http, url, body))
            return out
        start = time.perf_counter()
        results = [r for batch in await asyncio.gather(*(client(i) for i in range(clients)))
                   for r in batch]
        seconds = time.perf_counter() - start
    gaps = [g for r in results for g in r["gaps"]]
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "seconds": seconds,
            "requests_per_s": len(results) / seconds, "tokens_per_s": tokens / seconds,
            "ttft_p50_ms": 1e3 * percentile(ttfts, 0.5), "ttft_p99_ms": 1e3 * percentile(ttfts, 0.99),
            "itl_p50_ms": 1e3 * percentile(gaps, 0.5), "itl_p99_ms": 1e3 * percentile(gaps, 0.99)}


def serve_and_measure(args, slots: int, clients: int) -> dict:
    """`run.py serve --slots slots` in a subprocess, warmed, then `clients` clients."""
    import httpx
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, str(ROOT / "run.py"), "serve", "--port", str(port), "--slots",
               str(slots)] + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
    server = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        asyncio.run(run_clients(url, clients, 1, args.max_tokens))  # compile its buckets
        row = asyncio.run(run_clients(url, clients, args.requests_per_client, args.max_tokens))
    finally:
        server.terminate()
        server.wait(120)
    return {"slots": slots, **row}


def engine_reference(checkpoint, slots: int, clients: int, per_client: int,
                     max_tokens: int) -> float:
    """Output tokens/s of the same requests through Engine.serve in-process, `slots` slots."""
    from runtime.app import load_engine, open_model
    from runtime.cli import parse_args
    from runtime.request import Request
    argv = ["--slots", str(slots)] + (["--checkpoint", str(checkpoint)] if checkpoint else [])
    args = parse_args(argv)
    opened = open_model(args)
    engine = load_engine(args, opened, slots, None)
    prompt = tuple(opened.tokenizer.encode("Return the"))
    requests = [Request(prompt, max_new_tokens=max_tokens, temperature=0.8, seed=i,
                        logit_bias=((2, -100.0),)) for i in range(clients * per_client)]
    engine.generate(requests)  # compile every shape the timed run meets
    start = time.perf_counter()
    done = engine.generate(requests)
    return sum(len(c.output_ids) for c in done) / (time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--slots", type=int, default=None,
                   help="the server's slots for every row (default: the row's client count)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    rows = []
    for clients in args.clients:
        row = serve_and_measure(args, args.slots or clients, clients)
        row["engine_tokens_per_s"] = engine_reference(args.checkpoint, args.slots or clients,
                                                      clients, args.requests_per_client,
                                                      args.max_tokens)
        row["vs_engine"] = row["tokens_per_s"] / row["engine_tokens_per_s"]
        rows.append(row)
    print("| slots | clients | requests | req/s | tok/s | engine tok/s | ratio | TTFT p50 / p99 ms | "
          "ITL p50 / p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['slots']} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | "
              f"{r['tokens_per_s']:.0f} | {r['engine_tokens_per_s']:.0f} | {r['vs_engine']:.2f} | "
              f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
              f"{r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
