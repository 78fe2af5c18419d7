"""C++ sources compiled on first use with the machine's compiler (-O3 -march=native) into a
cache folder keyed by the sources, a caller's extra key and the CPU: the CPU kernels
(cpu_kernels.py) and the loader's host copies (host_copies.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import platform as host_platform
import shutil
import subprocess
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


def build(target: Path, sources: list, what: str, flags: tuple = ()) -> None:
    """Compiles the .cc files of `sources` into `target` (written aside, then renamed:
    concurrent builders never load a half-written file); RuntimeError naming `what` else."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    command = [compiler, "-O3", "-march=native", "-std=c++17", "-w", "-shared", "-fPIC", *flags,
               *(str(path) for path in sources if path.suffix == ".cc"), "-o", str(partial)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr.strip() or "no output").splitlines()
        raise RuntimeError(f"{compiler} failed on {what}: {lines[0]}")
    os.replace(partial, target)


def loaded_library(stem: str, sources: list, what: str, key: str = "", flags: tuple = ()):
    """The ctypes library of `sources`, built first where its cache has none (library_path,
    build); OSError or RuntimeError where it cannot be."""
    path = library_path(stem, sources, key)
    if not path.exists():
        build(path, sources, what, flags)
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
