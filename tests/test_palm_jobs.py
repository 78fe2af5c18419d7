"""Palm files (issue 22) through the runtime's jobs like every other family: a batch job, and a
batch job on two processes (process 0 reads and writes, the jobs reach process 1 by
broadcast), each giving the fixture's own greedy loop's ids and text."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "palm_aft"
FACTS = json.loads((FIXTURE / "expected.json").read_text())["run"]


def batch_command(tmp_path, *launcher):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"id": "a", "prompt": FACTS["prompt"]}) + "\n"
                      + json.dumps({"id": "b", "prompt_ids": FACTS["prompt_ids"]}) + "\n")
    command = [*launcher, sys.executable, str(ROOT / "run.py"), "batch", "--checkpoint",
               str(FIXTURE / "s8.bin"), "--tokenizer", str(FIXTURE / "encoder.bin"),
               "--input", str(source), "--output", str(out), "--slots", "2", "--temperature",
               "0", "--max-new-tokens", str(len(FACTS["output_ids"])),
               "--no-compilation-cache"]
    return command, out


def check_records(out) -> None:
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(records) == ["a", "b"]
    for record in records.values():
        assert record["output_ids"] == FACTS["output_ids"]
        assert record["text"] == FACTS["text"]


@pytest.mark.slow
def test_batch_job_gives_the_fixture_greedy_loop(tmp_path):
    command, out = batch_command(tmp_path)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    check_records(out)


@pytest.mark.slow
def test_batch_job_on_two_processes(tmp_path):
    launcher = [sys.executable, str(ROOT / "scripts" / "launch_local.py"), "--processes", "2",
                "--devices-per-process", "2", "--"]
    command, out = batch_command(tmp_path, *launcher)
    done = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stderr
    check_records(out)
