"""The engine side of the server: one thread (on every process of a multi-host run) that runs
the scheduler over the requests HTTP hands it, between decode steps (continuous batching).

Process 0 holds the queue. Once per scheduler step every process learns, by one broadcast, how
many requests wait, which clients left and whether to drain (`_sync`): then every process
admits, stops and finishes the same requests at the same steps, in lockstep, and each
admission itself goes out by broadcast as batch jobs' records do. JAX's runtime is the only
transport. Single-process, the broadcasts are no-ops.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import threading
import time
from typing import Callable, Optional

from runtime.distributed import broadcast_json, is_leader, multi_process, synchronized
from runtime.request import Completion, Request, request_from_json, request_to_json
from runtime.scheduler import Scheduler
from runtime.stop_strings import StopStrings

IDLE_POLL = 0.05  # s: multi-host, how often the idle leader tells the others "nothing yet"


@dataclasses.dataclass
class Job:
    """One sample (choice) of one HTTP request, queued or in flight."""
    key: str  # "<request id>/<choice>"
    request: Request
    stop: tuple[str, ...]
    # called on the worker thread with ("token", token, logprob entry or None, time),
    # ("done", Completion) or ("error", message); must hand the event over thread-safely
    sink: Callable[[tuple], None]
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    last: Optional[float] = None  # when its last token came
    logprob: Optional[tuple] = None  # the entry of the token about to be reported


class Worker:
    def __init__(self, engine, tokenizer, metrics=None, max_queue: int = 256):
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self.leader = is_leader()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.queue: collections.deque[Job] = collections.deque()  # leader: waiting for a slot
        self.jobs: dict[str, Job] = {}  # leader: queued or in flight
        self.cancel_requested: set[str] = set()  # leader: clients gone, not yet announced
        self.stop_requested = False  # leader: drain, then end
        self.cancelled: set[str] = set()  # every process: stop these at their next token
        self.stopping = False
        self.waiting = 0  # every process: requests announced as waiting, not yet admitted
        self.failed: Optional[str] = None  # the engine's error, when it stopped on one
        self.stops = StopStrings(tokenizer)
        self.scheduler: Optional[Scheduler] = None

    # --- called by HTTP handlers (process 0, any thread) ---------------------------------------

    def submit(self, jobs: list[Job]) -> bool:
        """Queue the jobs (all or none); False when the queue is full or the server drains."""
        with self.lock:
            if self.stop_requested or self.failed \
                    or len(self.queue) + len(jobs) > self.max_queue:
                return False
            self.queue.extend(jobs)
            self.jobs.update((job.key, job) for job in jobs)
            self._gauge("queue_length", len(self.queue))
        self.wake.set()
        return True

    def cancel(self, keys) -> None:
        """The client left: its jobs stop at their next step (queued ones at admission)."""
        with self.lock:
            self.cancel_requested.update(key for key in keys if key in self.jobs)
        self.wake.set()

    def stop(self) -> None:
        """Drain: take no more requests, finish those queued and in flight, end run()."""
        with self.lock:
            self.stop_requested = True
        self.wake.set()

    # --- the worker thread (every process) ------------------------------------------------------

    def run(self) -> None:
        try:
            while self._wait_for_work():
                self.scheduler = Scheduler(self.engine, self._arrivals(), self._on_token,
                                           admit=lambda: self.waiting > 0,
                                           on_step=self._sync, on_logprob=self._on_logprob)
                for key, completion in self.scheduler.run():
                    self._finished(key, completion)
                self._gauge("slots_busy", 0)
        except Exception as error:  # noqa: BLE001 - every waiting client must hear of it
            self._fail(f"the engine stopped: {type(error).__name__}: {error}")

    def _wait_for_work(self) -> bool:
        """Idle: return True once a request waits, False once asked to stop with none left."""
        while True:
            if self.leader:
                self.wake.wait(IDLE_POLL if multi_process() else None)
                self.wake.clear()
            self._sync()
            if self.waiting:
                return True
            if self.stopping:
                return False

    def _sync(self) -> None:
        """Once per step on every process: the leader's arrivals, cancellations and drain."""
        state = None
        if self.leader:
            with self.lock:
                state = {"waiting": len(self.queue), "cancel": sorted(self.cancel_requested),
                         "stop": self.stop_requested}
                self.cancel_requested.clear()
            if self.scheduler is not None:
                self._gauge("slots_busy", int(self.scheduler.holding().sum()))
        state = broadcast_json(state)
        self.waiting, self.stopping = state["waiting"], state["stop"]
        self.cancelled.update(state["cancel"])

    def _arrivals(self):
        """(key, request) of the queued jobs, one per admission the scheduler asks for (it asks
        only while `waiting` says one is there)."""
        def queued():
            while True:
                with self.lock:
                    job = self.queue.popleft()
                    self._gauge("queue_length", len(self.queue))
                yield _encode(job)

        same = lambda message: message  # noqa: E731 - messages are JSON already
        for message in synchronized(queued() if self.leader else None, same, same):
            self.waiting -= 1
            key, request = message["key"], request_from_json(message["request"])
            self.stops.add(key, tuple(message["stop"]))
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(len(request.prompt_ids))
            yield key, request

    def _on_logprob(self, key: str, entry: tuple) -> None:
        job = self.jobs.get(key) if self.leader else None
        if job is not None:
            job.logprob = entry

    def _on_token(self, key: str, token: int) -> bool:
        job = self.jobs.get(key) if self.leader else None
        if job is not None:
            now = time.monotonic()
            if self.metrics is not None:
                self.metrics.generated_tokens.inc()
                (self.metrics.ttft if job.last is None else self.metrics.itl).observe(
                    now - (job.arrived if job.last is None else job.last))
            job.last = now
            job.sink(("token", token, job.logprob, now))
            job.logprob = None
        return key in self.cancelled or self.stops.reached(key, token)

    def _finished(self, key: str, completion: Completion) -> None:
        self.stops.finished(key)
        self.cancelled.discard(key)
        if self.leader:
            with self.lock:
                job = self.jobs.pop(key, None)
            if job is not None:
                job.sink(("done", completion))

    def _fail(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        with self.lock:
            self.failed = message
            jobs, self.jobs = list(self.jobs.values()), {}
            self.queue.clear()
        for job in jobs:
            job.sink(("error", message))

    def _gauge(self, name: str, value: int) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).set(value)


def _encode(job: Job) -> dict:
    return {"key": job.key, "request": request_to_json(job.request), "stop": list(job.stop)}
