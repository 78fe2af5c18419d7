"""Multi-host runs on JAX's own multi-controller runtime: every host runs the same program.

Process 0 (the leader) reads prompts, settings and batch inputs and writes results; the other
processes receive the same inputs through `broadcast_*` (a JAX collective, so there is no
second network stack), feed identical inputs into the same jitted steps, and print nothing.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Iterable, Iterator, TypeVar

import jax
import numpy as np

T = TypeVar("T")


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Return once process 0's coordinator accepts TCP connections; raise after `timeout` s."""
    from runtime.errors import RuntimeInputError
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RuntimeInputError(f"--coordinator {address!r}: expected HOST:PORT")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RuntimeInputError(f"cannot reach the coordinator at {address} within "
                                        f"{timeout:g} s ({e.strerror or e}); is process 0 "
                                        f"running, and is the port open?") from None
            time.sleep(0.5)


def check_process_flags(coordinator, num_processes, process_id) -> None:
    """The multi-host flags agree with each other, before anything starts."""
    from runtime.errors import RuntimeInputError
    if coordinator is None and (num_processes is not None or process_id is not None):
        raise RuntimeInputError("--num-processes/--process-id need --coordinator HOST:PORT "
                                "(process 0's address)")
    if coordinator is not None and (num_processes is None or process_id is None):
        raise RuntimeInputError(f"--coordinator {coordinator}: give --num-processes N and "
                                f"--process-id 0..N-1 too")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise RuntimeInputError(f"--process-id {process_id}: must be in [0, {num_processes}) "
                                f"for --num-processes {num_processes}")


def start_deadline(seconds: float, message: str) -> threading.Timer:
    """After `seconds`, print `error: message` and exit with status 2 (cancel() the returned
    timer when done in time). JAX's coordination service aborts the whole process (SIGABRT and a
    C++ stack) a few seconds after its own timeout when peers never join, or when the
    coordinator's port answers but is not a JAX coordinator; this ends it first, in one line.
    Nothing has been loaded or written yet at that point, so nothing is lost."""
    def expire():
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        os._exit(2)
    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer


def is_leader() -> bool:
    return jax.process_index() == 0


def multi_process() -> bool:
    return jax.process_count() > 1


def broadcast_bytes(data: bytes | None) -> bytes:
    """The leader's bytes on every process (others pass anything, e.g. None)."""
    if not multi_process():
        return data
    from jax.experimental.multihost_utils import broadcast_one_to_all
    length = np.array([len(data) if is_leader() else 0], np.int64)
    length = int(np.asarray(broadcast_one_to_all(length))[0])
    if length == 0:
        return b""
    buffer = np.frombuffer(data, np.uint8) if is_leader() else np.zeros(length, np.uint8)
    return bytes(np.asarray(broadcast_one_to_all(buffer)))


def broadcast_json(value):
    """The leader's JSON-serialisable value on every process."""
    if not multi_process():
        return value
    data = json.dumps(value).encode() if is_leader() else None
    return json.loads(broadcast_bytes(data).decode())


_END = "__end__"


def synchronized(items: Iterable[T] | None, encode, decode) -> Iterator[T]:
    """Iterate the leader's items on every process, one broadcast per item, in lockstep.

    The leader passes the real iterable; the others pass None and receive each item. Items are
    only read from the leader's iterable when asked for, so a lazy source stays lazy.
    """
    if not multi_process():
        yield from items
        return
    source = iter(items) if is_leader() else None
    while True:
        if is_leader():
            item = next(source, _END)
            message = _END if item is _END else encode(item)
        else:
            message = None
        message = broadcast_json(message)
        if message == _END:
            return
        yield decode(message)


def synchronized_flag(value: bool) -> bool:
    """The leader's boolean on every process (e.g. 'keep going' after Ctrl-C on the leader)."""
    return bool(broadcast_json(bool(value))) if multi_process() else value
