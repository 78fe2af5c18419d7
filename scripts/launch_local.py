#!/usr/bin/env python3
"""Start N processes of one command on this machine, as N hosts would run it (for testing).

  python scripts/launch_local.py --processes 2 --devices-per-process 4 -- \\
      python run.py --checkpoint DIR --prompt-ids "5 6 7" --temperature 0 --json

Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (which run.py
reads), JAX_PLATFORMS=cpu and that many simulated CPU devices; collectives go over gloo.
Process 0's output is passed through; the others' goes to --log-dir. If one process fails, the
others are stopped; the exit status is the first failure's (0 when all succeed).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=4)
    p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="where processes 1..N-1 write their output (default: discarded)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command given (put it after --)")
    port = args.port or free_port()
    procs = []
    for rank in range(args.processes):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES=str(args.processes), JAX_PROCESS_ID=str(rank),
                   JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count="
                             f"{args.devices_per_process}")
        if rank == 0:
            out = None
        elif args.log_dir is not None:
            args.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(args.log_dir / f"process-{rank}.log", "w")
        else:
            out = subprocess.DEVNULL
        procs.append(subprocess.Popen(command, env=env, stdout=out,
                                      stderr=subprocess.STDOUT if rank else None))
    status = 0
    try:
        while any(proc.poll() is None for proc in procs):
            failed = [proc.returncode for proc in procs if proc.returncode not in (None, 0)]
            if failed:
                status = failed[0]
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        status = 130
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        proc.wait()
    return status or next((p.returncode for p in procs if p.returncode), 0)


if __name__ == "__main__":
    sys.exit(main())
