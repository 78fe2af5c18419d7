"""Chunks of host-side loading work spread over the CPU's cores.

Loading decodes, transposes and repacks checkpoint data chunk by chunk in numpy and in XLA's
host programs, which release the GIL for their array work: one thread had loaded a 2 GB GGUF
file on one core of two (BENCHMARKS.md, "Loading on every core"). Chunks run on one shared
pool of host threads; a call from one of its own threads runs inline (it would otherwise
wait on the pool it occupies). RUNTIME_HOST_THREADS sets the count (1: all inline).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
from typing import Callable

from runtime.errors import RuntimeInputError

_in_pool = threading.local()


def host_threads() -> int:
    """Threads the chunks take: RUNTIME_HOST_THREADS, else the cores this process may use."""
    setting = os.environ.get("RUNTIME_HOST_THREADS", "").strip()
    if setting:
        if not setting.isdigit():
            raise RuntimeInputError(f"RUNTIME_HOST_THREADS={setting!r}: not a whole number "
                                    "of threads")
        return max(1, int(setting))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def _pool(threads: int, pid: int) -> concurrent.futures.ThreadPoolExecutor:
    """The pool of `threads` threads of process `pid`: a forked child has none of its parent's
    threads, and would wait forever on the parent's pool."""
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="host-chunks",
                                                 initializer=_mark_pool_thread)


def _mark_pool_thread() -> None:
    _in_pool.active = True


def each_chunk(run: Callable[[int], None], count: int) -> None:
    """run(0), ..., run(count - 1), on the host threads where there are several; returns when
    all have ended. The first error (in chunk order) is raised once every started chunk has
    ended and those not started are dropped, so no chunk writes after the call."""
    threads = host_threads()
    if count <= 1 or threads == 1 or getattr(_in_pool, "active", False):
        for index in range(count):
            run(index)
        return
    futures = [_pool(threads, os.getpid()).submit(run, index) for index in range(count)]
    try:
        for future in futures:
            future.result()
    except BaseException:
        for future in futures:
            future.cancel()
        concurrent.futures.wait(futures)
        raise
