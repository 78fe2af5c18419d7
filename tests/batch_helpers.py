"""Batch jobs as a user runs them: `run.py batch` in a subprocess, and waiting for its records
(the kill / interrupt / resume tests of test_batch.py and test_batch_hostile.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import ROOT


def start_batch_job(directory, source, out, slots: int, max_new_tokens: int):
    """`run.py batch` greedy over `source` into `out`, stdout and stderr captured."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "batch", "--checkpoint", str(directory),
         "--input", str(source), "--output", str(out), "--slots", str(slots),
         "--cache-length", "32", "--max-new-tokens", str(max_new_tokens), "--temperature", "0"],
        env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def wait_for_records(out, count: int, proc, limit: float = 240) -> None:
    """Return once `out` holds `count` lines; fail if the job ends or `limit` s pass first."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"the job did not reach {count} records (exit {proc.poll()})")
