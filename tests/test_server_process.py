"""`run.py serve` as users start it: a subprocess that drains on SIGTERM, and a 2-process
multi-host server (process 0 answers HTTP, admissions and cancellations reach process 1 by
broadcast) whose greedy tokens equal transformers'. Loopback only; every test ends itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from conftest import ROOT, free_port, xla_flags

HF_LLAMA = ROOT / "tests" / "fixtures" / "hf" / "llama"


def wait_healthy(url: str, processes, log, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert all(p.poll() is None for p in processes), log()
        assert time.monotonic() < deadline, log()
        time.sleep(0.3)


def stream_lines(url: str, body: dict, out: list, stop_after=None) -> None:
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out.append(line[6:])
                    if stop_after is not None and len(out) >= stop_after:
                        return  # drop the connection mid-stream


@pytest.mark.slow
def test_sigterm_drains_the_streams_in_flight_then_exits(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.err"
    with open(log, "w") as err:
        server = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "serve", "--port",
                                   str(port), "--slots", "2", "--no-compilation-cache"],
                                  stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_healthy(url, [server], log.read_text)
        lines: list = []
        body = {"prompt": "Return the", "max_tokens": 60, "temperature": 0.7, "seed": 3,
                "logit_bias": {"2": -100}}  # no EOS: all 60 tokens
        client = threading.Thread(target=stream_lines, args=(url, body, lines))
        client.start()
        while len(lines) < 2:
            time.sleep(0.01)
        server.send_signal(signal.SIGTERM)
        client.join(120)
        assert lines[-1] == "[DONE]"
        reasons = [c["finish_reason"] for c in (json.loads(x)["choices"][0]
                                                 for x in lines[:-1])]
        assert reasons[-1] == "length"
        assert server.wait(60) == 0, log.read_text()[-2000:]
        with pytest.raises(httpx.TransportError):  # no longer listening
            httpx.get(f"{url}/health", timeout=5)
        assert "draining" in log.read_text()
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.slow
def test_two_process_server_matches_transformers_and_cancels_in_lockstep(tmp_path):
    expected = np.load(HF_LLAMA / "expected.npz")
    coordinator, port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    processes, logs = [], [tmp_path / f"p{rank}.err" for rank in range(2)]
    for rank in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{coordinator}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank), JAX_PLATFORMS="cpu",
                   XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"))
        with open(logs[rank], "w") as err:
            processes.append(subprocess.Popen(
                [sys.executable, str(ROOT / "run.py"), "serve", "--checkpoint", str(HF_LLAMA),
                 "--port", str(port), "--slots", "2", "--cache-length", "64",
                 "--no-compilation-cache"], env=env, stdout=subprocess.DEVNULL, stderr=err))
    tail = lambda: "\n".join(p.read_text()[-1500:] for p in logs)  # noqa: E731
    try:
        wait_healthy(url, processes, tail)
        dropped: list = []
        stream_lines(url, {"prompt": [5, 6, 7], "max_tokens": 40, "temperature": 0.9,
                           "seed": 1}, dropped, stop_after=2)  # a client that leaves
        for i in range(3):
            prompt = expected[f"prompt_{i}"].tolist()
            got = httpx.post(f"{url}/v1/completions", timeout=120, json={
                "prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 0}).json()
            tokens = got["choices"][0]["logprobs"]["tokens"]
            assert len(tokens) == got["usage"]["completion_tokens"] == 12
            # without a tokenizer, the logprobs' tokens are the ids
            assert [int(t) for t in tokens] == expected[f"greedy_{i}"][:12].tolist()
        processes[0].send_signal(signal.SIGTERM)
        for process in processes:
            assert process.wait(120) == 0, tail()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
