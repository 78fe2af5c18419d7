"""Batch jobs against hostile input (issue 19): a poisoned record becomes that record's error
record and the job always finishes; outputs that cannot be resumed are refused before anything
runs; interrupts finish or stop cleanly; hypothesis drives the record parser and the writer."""

from __future__ import annotations

import errno
import json
import os
import signal
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batch_helpers import start_batch_job, wait_for_records
from runtime import batch
from runtime.batch import RecordWriter, parse_job, record_key, recover_output, run_job
from runtime.checkpoint.grok_ckpt import write_ckpt0
from runtime.config import save_config
from runtime.errors import RuntimeInputError
from runtime.request import Request

GREEDY = Request((), max_new_tokens=4, temperature=0.0)
# Records that crashed the process on every resume before (issue 19, class 1), as raw JSONL.
POISONED = [
    '{"id": "big-k", "prompt_ids": [5, 6], "top_k": 1099511627776}',
    '{"id": "digits", "prompt_ids": [5, 6], "temperature": ' + "9" * 400 + "}",
    '{"id": "inf", "prompt_ids": [5, 6], "temperature": 1e400}',
    '{"id": "\\ud800", "prompt_ids": [5, 6]}',
    '{"id": "lone", "prompt": "abc\\udc80"}',
    '{"id": "bool", "prompt_ids": [5, 6], "max_new_tokens": true}',
    '{"id": "tiny-p", "prompt_ids": [5, 6], "top_p": 1e-50}',
    '{"id": "huge-id", "prompt_ids": [5, 1180591620717411303424]}',
    "[" * 100_000 + "]" * 100_000,
]


def good_records(count: int) -> list[str]:
    return [json.dumps({"id": f"ok{i}", "prompt_ids": [3 + i, 4 + i, 5],
                        "max_new_tokens": 2 + i % 3}) for i in range(count)]


def mixed_lines(count: int) -> list[str]:
    good, lines = good_records(count), []
    for i, line in enumerate(good):
        lines.append(line)
        if i < len(POISONED):
            lines.append(POISONED[i])
    return lines


def records_of(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_poisoned_records_are_error_records_and_the_job_finishes(engine3, tmp_path):
    source = tmp_path / "in.jsonl"
    lines = mixed_lines(12)
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    summary = run_job(engine3, None, source, out, GREEDY)
    records = records_of(out)
    assert sorted(r["line"] for r in records) == list(range(1, len(lines) + 1))  # each once
    errors = [r for r in records if r["finish_reason"] == "error"]
    assert len(errors) == len(POISONED) == summary.errors
    assert all(r["error"].startswith(f"line {r['line']}") and "\n" not in r["error"]
               for r in errors)
    good = {r["id"] for r in records if r["finish_reason"] != "error"}
    assert good == {f"ok{i}" for i in range(12)}
    assert recover_output(out) == {record_key(r["id"], r["line"]) if r["id"] is not None
                                   else f"line:{r['line']}" for r in records}


def test_outputs_that_cannot_be_resumed_are_refused(tmp_path):
    (tmp_path / "folder").mkdir()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path, words in ((tmp_path / "folder", "a folder"),
                        (fifo, "not a regular file"),
                        (tmp_path / "missing" / "out.jsonl", "does not exist")):
        with pytest.raises(RuntimeInputError, match=words):
            recover_output(path)  # the FIFO: refused, not read (which would block)
    foreign = tmp_path / "latin1.jsonl"
    foreign.write_bytes(b'{"id": "a", "line": 1}\n\xff\xfe not utf-8\n')
    with pytest.raises(RuntimeInputError, match="line 2 is not a record of this job"):
        recover_output(foreign)


def test_a_full_disk_is_one_error_and_keeps_what_was_written(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    writer = RecordWriter(out)
    writer.write({"id": "a", "line": 1})

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(batch.os, "write", full)
    with pytest.raises(RuntimeInputError, match="No space left on device.*kept.*resume"):
        writer.write({"id": "b", "line": 2})
    monkeypatch.undo()
    writer.close()
    assert recover_output(out) == {record_key("a", 1)}


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**80, 2**80) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8)
FIELD = st.sampled_from(sorted(batch.FIELDS) + ["other"])


@given(record=st.dictionaries(FIELD, JSON, max_size=6), raw=st.text(max_size=30))
def test_fuzzed_records_parse_to_a_job_and_always_write(record, raw, tmp_path_factory):
    """Any record (and any line of text): parse_job gives a Job, with an error naming its line
    or a request; the record written for it reads back as the same key."""
    for line, text in ((1, json.dumps(record)), (2, raw)):
        job = parse_job(line, text, None, GREEDY, {})
        assert (job.error is None) != (job.request is None)
        assert job.error is None or job.error.startswith(f"line {line}")
    out = tmp_path_factory.mktemp("fuzz") / "out.jsonl"
    writer = RecordWriter(out)
    writer.write({"id": job.id, "line": job.line, "text": raw, "error": job.error})
    writer.close()
    assert recover_output(out) == {job.key}


# --- signals and kills on the command line ------------------------------------------------------

def _checkpoint(tmp_path, config, params):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    write_ckpt0(params, directory, config)
    save_config(config, directory / "config.yaml")
    return directory


@pytest.mark.slow
def test_kill_term_and_double_interrupt_loop_with_poisoned_records(config, params, tmp_path):
    """SIGKILL, SIGTERM (finishes what is in flight), SIGINT twice (stops at once, one line),
    then a run to the end: every line exactly once, poisoned ones as error records, no torn
    line left behind."""
    directory = _checkpoint(tmp_path, config, params)
    lines = mixed_lines(30)
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"

    killed = start_batch_job(directory, source, out, 2, 8)
    wait_for_records(out, 4, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()

    written = out.read_bytes().count(b"\n")
    termed = start_batch_job(directory, source, out, 2, 8)
    wait_for_records(out, written + 3, termed)
    termed.send_signal(signal.SIGTERM)
    _, stderr = termed.communicate(timeout=120)
    assert termed.returncode == 130 and "Traceback" not in stderr, stderr
    assert "interrupted (SIGTERM)" in stderr

    written = out.read_bytes().count(b"\n")
    twice = start_batch_job(directory, source, out, 2, 8)
    wait_for_records(out, written + 2, twice)
    twice.send_signal(signal.SIGINT)
    time.sleep(0.05)
    twice.send_signal(signal.SIGINT)
    _, stderr = twice.communicate(timeout=120)
    assert twice.returncode == 130 and "Traceback" not in stderr, stderr

    finished = start_batch_job(directory, source, out, 2, 8)
    _, stderr = finished.communicate(timeout=300)
    assert finished.returncode == 0, stderr
    records = records_of(out)  # every line parses: nothing torn is left
    assert sorted(r["line"] for r in records) == list(range(1, len(lines) + 1))
    errors = {r["line"] for r in records if r["finish_reason"] == "error"}
    poisoned = {i + 1 for i, line in enumerate(lines) if line in POISONED}
    assert errors == poisoned
