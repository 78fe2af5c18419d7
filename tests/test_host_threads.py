"""Loading's chunks on the host threads (runtime/host_threads.py): every chunk runs once, on
several threads where there are several; the first failing chunk's error reaches the caller
after every started chunk has ended; a chunk's own chunks run inline; a GGUF tensor read in
chunks on two threads equals the same read on one."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from runtime import host_threads
from runtime.checkpoint import gguf_source


def test_every_chunk_runs_once_on_the_pool(monkeypatch):
    monkeypatch.setenv("RUNTIME_HOST_THREADS", "3")
    seen, names = [], set()

    def run(index):
        time.sleep(0.01)  # long enough for the other threads to take chunks
        seen.append(index)
        names.add(threading.current_thread().name)

    host_threads.each_chunk(run, 12)
    assert sorted(seen) == list(range(12))
    assert len(names) > 1 and all(name.startswith("host-chunks") for name in names)


def test_one_thread_or_one_chunk_runs_inline(monkeypatch):
    names = []
    run = lambda index: names.append(threading.current_thread().name)  # noqa: E731
    monkeypatch.setenv("RUNTIME_HOST_THREADS", "4")
    host_threads.each_chunk(run, 1)
    monkeypatch.setenv("RUNTIME_HOST_THREADS", "1")
    host_threads.each_chunk(run, 3)
    assert names == [threading.current_thread().name] * 4


def test_the_first_error_is_raised_after_the_started_chunks_end(monkeypatch):
    monkeypatch.setenv("RUNTIME_HOST_THREADS", "2")
    ended = []

    def run(index):
        if index in (3, 5):
            raise ValueError(f"chunk {index}")
        time.sleep(0.02)
        ended.append(index)

    with pytest.raises(ValueError, match="chunk 3"):
        host_threads.each_chunk(run, 40)
    count = len(ended)
    time.sleep(0.1)
    assert len(ended) == count < 40  # nothing ran after the call, the rest were dropped


def test_chunks_of_a_chunk_run_in_its_thread(monkeypatch):
    monkeypatch.setenv("RUNTIME_HOST_THREADS", "2")
    inner = []

    def outer(index):
        me = threading.current_thread().name
        host_threads.each_chunk(lambda j: inner.append(threading.current_thread().name == me), 3)

    host_threads.each_chunk(outer, 2)
    assert inner == [True] * 6


@pytest.mark.parametrize("transposed", [False, True])
def test_a_chunked_read_on_two_threads_equals_one(monkeypatch, transposed):
    monkeypatch.setattr(gguf_source, "READ_CHUNK_BYTES", 1000)  # many chunks
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((300, 70)).astype(np.float32)

    def read():
        return gguf_source._fill((), range(5, 290), 70 * 4, None, transposed, 70, np.float32,
                                 lambda sub: rows[sub.start:sub.stop])

    monkeypatch.setenv("RUNTIME_HOST_THREADS", "1")
    one = read()
    monkeypatch.setenv("RUNTIME_HOST_THREADS", "2")
    np.testing.assert_array_equal(read(), one)
    np.testing.assert_array_equal(one, rows[5:290].T if transposed else rows[5:290])


def test_a_forked_child_gets_its_own_pool(monkeypatch):
    import os
    monkeypatch.setenv("RUNTIME_HOST_THREADS", "2")
    host_threads.each_chunk(lambda index: None, 2)  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # the child: its chunks must run (on the parent's pool they would never)
        done = []
        host_threads.each_chunk(done.append, 4)
        os._exit(0 if sorted(done) == [0, 1, 2, 3] else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail("the forked child's chunks never ran")


def test_a_thread_count_not_a_number_is_a_one_line_error(monkeypatch, tmp_path):
    from runtime.errors import RuntimeInputError
    for bad in ("two", "-1", "1.5"):
        monkeypatch.setenv("RUNTIME_HOST_THREADS", bad)
        with pytest.raises(RuntimeInputError, match=f"RUNTIME_HOST_THREADS='{bad}'"):
            host_threads.each_chunk(lambda index: None, 2)
