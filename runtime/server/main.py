"""Starting and stopping the server: the engine's worker thread, uvicorn on process 0, and the
drain on SIGTERM / Ctrl-C (uvicorn stops accepting, the requests in flight and queued finish,
then the worker ends)."""

from __future__ import annotations

import contextlib
import errno
import signal
import socket
import sys
import threading
from typing import Optional

from runtime.distributed import is_leader
from runtime.errors import RuntimeInputError
from runtime.request import Request
from runtime.server.metrics import Metrics
from runtime.server.worker import Worker


def check_port(host: str, port: int) -> None:
    """A one-line error now, before the model loads, if the address cannot be served."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RuntimeInputError(f"--host {host}: cannot be resolved ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            why = "already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise RuntimeInputError(f"--host {host} --port {port}: {why}") from None


def warm_up(engine) -> None:
    """Compile the short-prompt prefill and the decode step before the first client comes:
    the prefill for every power-of-two count of newcomers up to the slots, with distinct
    prompts and with one prompt's n samples (a first request must not wait for a compile that
    its arrival with others happened to need)."""
    token = engine.config.bos_token if engine.config.bos_token is not None else 0
    rows = 1
    while True:
        count = min(rows, engine.slots)
        engine.generate([Request((token,), max_new_tokens=2, choice=c) for c in range(count)])
        if count > 1:
            vocab = engine.config.vocab_size
            engine.generate([Request((token, (c + 3) % vocab), max_new_tokens=2)
                             for c in range(count)])
        if count == engine.slots:
            return
        rows *= 2


class Server:
    """The worker thread and (on process 0) uvicorn; run() blocks until a signal drained it,
    start()/stop() run it in the background (tests)."""

    def __init__(self, engine, model, host: str = "127.0.0.1", port: int = 8000,
                 max_queue: int = 256):
        from runtime.server.http import create_app
        self.metrics = Metrics()
        self.metrics.slots.set(engine.slots)
        self.worker = Worker(engine, model.tokenizer, self.metrics, max_queue)
        self.thread = threading.Thread(target=self.worker.run, name="engine", daemon=True)
        self.host, self.port, self.model = host, port, model
        self.app = create_app(self.worker, model, self.metrics)
        self.uvicorn: Optional[object] = None

    def _uvicorn(self):
        import uvicorn
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level="warning",
                                lifespan="off", timeout_keep_alive=30)
        server = uvicorn.Server(config)
        # its owner stops it (run()'s signal handlers, or stop()): uvicorn's own would
        # re-raise the signal once it stops, before the worker could drain
        server.capture_signals = contextlib.nullcontext  # uvicorn >= 0.29
        server.install_signal_handlers = lambda: None  # older uvicorn
        self.uvicorn = server
        return server

    def run(self) -> int:
        """Serve until SIGINT / SIGTERM, then drain. Other processes run the worker only."""
        if not is_leader():  # follows process 0, which drains them all on its signal
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
            self.worker.run()
            return 1 if self.worker.failed else 0
        self.thread.start()
        print(f"[serve] listening on http://{self.host}:{self.port} (Ctrl-C or SIGTERM: "
              f"finish the requests in flight, then exit)", file=sys.stderr, flush=True)
        server = self._uvicorn()

        def on_signal(signum, frame):  # uvicorn's own handlers would re-raise it at the end
            if server.should_exit:
                server.force_exit = True  # a second one: close the connections at once
            server.should_exit = True
            print(f"[serve] {signal.Signals(signum).name}: draining, finishing the requests "
                  f"in flight (again to stop at once)", file=sys.stderr, flush=True)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT,
                                                                   signal.SIGTERM)}
        try:
            server.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.worker.stop()
        self.thread.join()
        return 1 if self.worker.failed else 0

    def start(self) -> "Server":
        self.thread.start()
        server = self._uvicorn()
        self.http_thread = threading.Thread(target=server.run, name="http", daemon=True)
        self.http_thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True
            self.http_thread.join(timeout)
        self.worker.stop()
        self.thread.join(timeout)
