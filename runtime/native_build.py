"""C++ sources compiled on first use with the machine's compiler (-O3 -march=native) into a
cache folder keyed by the sources, a caller's extra key and the CPU: the CPU kernels
(cpu_kernels.py) and the loader's host copies (host_copies.py).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import sys
import platform as host_platform
import shutil
import subprocess
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("RUNTIME_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "grok-runtime")
    return Path(root)


def cpu_fingerprint() -> str:
    """-march=native code runs only on CPUs like the builder: key the cache by its flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return flags + host_platform.machine()


def library_path(stem: str, sources: list, key: str = "") -> Path:
    """Where the library of `sources` is cached: stem-<hash of sources, key and CPU>.so."""
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources) + key.encode()
                            + cpu_fingerprint().encode()).hexdigest()[:16]
    return cache_dir() / f"{stem}-{digest}.so"


def _compiled(process: subprocess.Popen, what: str, compiler: str) -> None:
    """Waits for a started compiler; RuntimeError naming `what` if it failed."""
    _, stderr = process.communicate()
    if process.returncode != 0:
        lines = (stderr.strip() or "no output").splitlines()
        raise RuntimeError(f"{compiler} failed on {what}: {lines[0]}")


def build(target: Path, sources: list, what: str, flags: tuple = ()) -> None:
    """Compiles the .cc files of `sources` into `target`, a file per core at once (BENCHMARKS.md,
    "The C++ sources built a file per core"), then one link; written aside, then renamed, so
    concurrent builders never load a half-written file (target's folder exists: _built_once).
    RuntimeError naming `what`."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    common = [compiler, "-O3", "-march=native", "-std=c++17", "-w", "-fPIC", *flags]
    # the largest first: the cores finish nearer together
    files = sorted((path for path in sources if path.suffix == ".cc"),
                   key=lambda path: -path.stat().st_size)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.stem}-") as scratch:
        objects = [os.path.join(scratch, f"{i}-{path.stem}.o") for i, path in enumerate(files)]
        running = []
        try:
            for path, obj in zip(files, objects):
                if len(running) >= (os.cpu_count() or 1):
                    _compiled(running.pop(0), what, compiler)
                running.append(subprocess.Popen([*common, "-c", str(path), "-o", obj],
                                                stderr=subprocess.PIPE, text=True))
            while running:
                _compiled(running.pop(0), what, compiler)
        finally:  # a failed file stops the others
            for command in running:
                command.kill()
                command.wait()
        partial = os.path.join(scratch, target.name)
        _compiled(subprocess.Popen([*common, "-shared", *objects, "-o", partial],
                                   stderr=subprocess.PIPE, text=True), what, compiler)
        os.replace(partial, target)


def _built_once(target: Path, sources: list, what: str, flags: tuple) -> None:
    """build() under a lock file beside `target`: processes starting together (a test
    session's workers, the hosts of a local multi-process job) build it once, the others wait
    and load it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            build(target, sources, what, flags)


def loaded_library(stem: str, sources: list, what: str, key: str = "", flags: tuple = ()):
    """The ctypes library of `sources`, built first where its cache has none (library_path,
    build); OSError or RuntimeError where it cannot be."""
    path = library_path(stem, sources, key)
    if not path.exists():
        _built_once(path, sources, what, flags)
    return ctypes.cdll.LoadLibrary(str(path))


def optional_library(stem: str, sources: list, what: str, unavailable: str, key: str = "",
                     flags: tuple = (), setup=lambda library: None):
    """loaded_library, then setup(library) (signatures, registrations); None where either
    fails, said once on stderr as `[runtime] <unavailable>: <why>`."""
    try:
        library = loaded_library(stem, sources, what, key, flags)
        setup(library)
    except (OSError, RuntimeError, AttributeError) as error:
        print(f"[runtime] {unavailable}: {error}", file=sys.stderr)
        return None
    return library
