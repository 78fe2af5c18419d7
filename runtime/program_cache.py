"""Programs kept across processes: the engine's jitted steps serialised with jax.export, and the
abstract parameter tree, in a directory next to JAX's persistent compilation cache.

Why: JAX's compilation cache skips XLA's compile, but every start still traces the model in
Python and lowers it to StableHLO before it can even look the compiled program up, most of a
cached start. A program stored here is loaded instead: deserialising it and wrapping it in a
one-call jit costs far less, and XLA's compile then hits the compilation cache
(BENCHMARKS.md, "Program cache start-up").

Keys: the program's name, a digest of the runtime's own source files (any code change is a new
key: a stale program is never run), the JAX and jaxlib versions, the devices, and each
argument's tree structure, shape, dtype and sharding, plus static arguments. The files are
jax.export's flatbuffer serialisation (StableHLO bytecode and shardings), read by
jax.export.deserialize: no pickle, nothing in them is executed as Python. A file that does not
load is reported on stderr, traced afresh and replaced; any other failure falls back to the
plain jitted function for the rest of the run.

Single-process only: a multi-process run builds its programs the normal way (the serialised
shardings name one process's view of the devices).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from runtime import cpu_kernels, layout

RUNTIME_DIR = Path(__file__).resolve().parent
_active: Optional["ProgramCache"] = None


def source_digest() -> str:
    """sha256 over the runtime package's sources (Python and C++; paths and contents), the JAX
    versions and whether the CPU kernels are in use: the part of every key that says "the same
    code"."""
    digest = hashlib.sha256(f"jax {jax.__version__} jaxlib {jax.lib.__version__}".encode())
    # Programs calling the FFI kernels run only where they are registered (built, here)
    kernels = layout.decode_products_in_ffi_kernels() and cpu_kernels.available()
    digest.update(f"cpu kernels {kernels}".encode())
    # a numerics choice read while tracing (run.py --int8-activations)
    digest.update(f"int4 int8 activations {layout.INT8_ACTIVATIONS}".encode())
    for path in sorted([*RUNTIME_DIR.rglob("*.py"), *RUNTIME_DIR.rglob("*.cc"),
                       *RUNTIME_DIR.rglob("*.h")]):
        digest.update(str(path.relative_to(RUNTIME_DIR)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _dtype(leaf) -> np.dtype:
    return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.result_type(leaf)


def _leaf_signature(leaf) -> str:
    sharding = getattr(leaf, "sharding", None)
    return f"{np.shape(leaf)}:{_dtype(leaf)}:{sharding if sharding else 'host'}"


class ProgramCache:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.source = source_digest()
        self.devices = ",".join(f"{d.platform}:{d.device_kind}:{d.id}" for d in jax.devices())
        self.loaded = 0  # programs deserialised (tests and logs read these counters)
        self.exported = 0

    def _path(self, kind: str, *parts: str) -> Path:
        key = hashlib.sha256("\n".join((kind, self.source, self.devices) + parts).encode())
        return self.directory / f"{kind}-{key.hexdigest()[:32]}"

    def _write(self, path: Path, data: bytes) -> None:
        """Atomically (a reader never sees half a file), best effort (a read-only or full disk
        only costs the next start its tracing)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.partial")
            partial.write_bytes(data)
            os.replace(partial, path)
        except OSError as error:
            print(f"[program cache] not stored ({error})", file=sys.stderr)

    # --- abstract parameter trees -------------------------------------------------------------

    def abstract_params(self, config, build: Callable[[], dict]) -> dict:
        """{module: {name: ShapeDtypeStruct}} for config: stored as JSON, else build() and
        store it."""
        path = self._path("params", repr(config)).with_suffix(".json")
        try:
            stored = json.loads(path.read_text())
            return {module: {name: jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
                             for name, (shape, dtype) in leaves.items()}
                    for module, leaves in stored.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        tree = build()
        self._write(path, json.dumps(
            {module: {name: [list(leaf.shape), np.dtype(leaf.dtype).name]
                      for name, leaf in leaves.items()} for module, leaves in tree.items()}
        ).encode())
        return tree

    # --- programs ----------------------------------------------------------------------------

    def wrap(self, name: str, identity: str, jitted, in_shardings: Sequence,
             out_structure: Callable, donate_argnums: Sequence[int] = (),
             static_argnums: Sequence[int] = (), compiler_options: Optional[dict] = None):
        """A callable with jitted's signature that runs the stored program for these argument
        shapes (exporting and storing it on first use).

        identity: everything the traced function depends on besides its arguments and the
        runtime's source (the model config, the engine's settings); in_shardings: one sharding
        (or a tree of them matching the argument) per dynamic argument, as given to jax.jit;
        out_structure(dynamic_args) -> the output's treedef (the program returns flat leaves);
        compiler_options: XLA options the program is compiled with (jitted itself must have
        none: it is traced inside the exporting jit)."""
        return _CachedProgram(self, f"{name}\n{identity}", jitted, list(in_shardings),
                              out_structure, set(donate_argnums), set(static_argnums),
                              compiler_options)


class _CachedProgram:
    def __init__(self, cache: ProgramCache, name, jitted, in_shardings, out_structure, donate,
                 static, compiler_options=None):
        self.cache, self.name, self.jitted = cache, name, jitted
        self.compiler_options = compiler_options
        self.in_shardings, self.out_structure = in_shardings, out_structure
        self.donate, self.static = donate, static
        self.label = name.split("\n")[0]
        self.programs: dict = {}  # in-process key -> (program, output treedef)
        self.broken = False

    def __call__(self, *args):
        if self.broken:
            return self.jitted(*args)
        dynamic = [a for i, a in enumerate(args) if i not in self.static]
        static = tuple(a for i, a in enumerate(args) if i in self.static)
        leaves, treedef = jax.tree.flatten(dynamic)
        # Every decode step comes through here: look up by hashable objects; the file key's
        # strings are only built when a program is not loaded yet.
        key = (treedef, tuple((leaf.shape, leaf.dtype, getattr(leaf, "sharding", None))
                              for leaf in leaves), static)
        entry = self.programs.get(key)
        if entry is None:
            signature = (str(treedef), ";".join(_leaf_signature(leaf) for leaf in leaves),
                         repr(static))
            try:
                program = self._load_or_export(args, dynamic, leaves, treedef, signature)
            except Exception as error:  # noqa: BLE001 - any failure: the normal jit path
                print(f"[program cache] {self.label}: {type(error).__name__}: {error}; "
                      f"tracing instead", file=sys.stderr)
                self.broken = True
                return self.jitted(*args)
            entry = self.programs[key] = (program, self.out_structure(dynamic))
        program, out_treedef = entry
        return jax.tree.unflatten(out_treedef, program(*leaves))

    def _flat_shardings(self, dynamic) -> list:
        """One sharding per leaf, from the per-argument (prefix) shardings."""
        out = []
        for arg, sharding in zip(dynamic, self.in_shardings):
            if isinstance(sharding, jax.sharding.Sharding):
                out.extend([sharding] * len(jax.tree.leaves(arg)))
            else:
                out.extend(jax.tree.leaves(sharding))
        return out

    def _load_or_export(self, args, dynamic, leaves, treedef, signature):
        path = self.cache._path("program", self.name, *signature)
        # leaves of donated arguments, in flat order
        dynamic_index = [i for i in range(len(args)) if i not in self.static]
        donated, position = [], 0
        for index, arg in zip(dynamic_index, dynamic):
            count = len(jax.tree.leaves(arg))
            if index in self.donate:
                donated.extend(range(position, position + count))
            position += count
        label = self.label
        exported = None
        if path.exists():
            try:
                exported = jax.export.deserialize(bytearray(path.read_bytes()))
                self.cache.loaded += 1
                print(f"[program cache] {label}: loaded {path.name} (not traced)",
                      file=sys.stderr)
            except Exception as error:  # noqa: BLE001 - a damaged file: trace and replace it
                print(f"[program cache] {label}: {path.name} unreadable ({type(error).__name__})"
                      f"; tracing instead", file=sys.stderr)
        if exported is None:
            exported = self._export(args, leaves, treedef, dynamic)
            self.cache._write(path, bytes(exported.serialize()))
            self.cache.exported += 1
            print(f"[program cache] {label}: traced, stored as {path.name}", file=sys.stderr)
        return jax.jit(exported.call, donate_argnums=tuple(donated),
                       compiler_options=self.compiler_options)

    def _export(self, args, leaves, treedef, dynamic):
        static_values = {i: a for i, a in enumerate(args) if i in self.static}

        def flat(*flat_leaves):
            rebuilt = iter(jax.tree.unflatten(treedef, flat_leaves))
            full = [static_values[i] if i in static_values else next(rebuilt)
                    for i in range(len(args))]
            return jax.tree.leaves(self.jitted(*full))

        shardings = self._flat_shardings(dynamic)
        specs = [jax.ShapeDtypeStruct(np.shape(leaf), _dtype(leaf), sharding=sharding)
                 for leaf, sharding in zip(leaves, shardings)]
        # the CPU kernels' custom calls (jax.export refuses custom calls it does not know)
        checks = [jax.export.DisabledSafetyCheck.custom_call(name) for name in cpu_kernels.TARGETS]
        return jax.export.export(jax.jit(flat, in_shardings=tuple(shardings)),
                                 disabled_checks=checks)(*specs)


def _import_lapack() -> None:
    for module in ("scipy.linalg.cython_blas", "scipy.linalg.cython_lapack"):
        try:
            importlib.import_module(module)
        except ImportError:
            return


def activate(directory: Optional[Path]) -> Optional[ProgramCache]:
    """Make `directory` the process's program cache (None: none); single-process runs only."""
    global _active
    _active = ProgramCache(directory) if directory is not None and jax.process_count() == 1 \
        else None
    if _active is not None and layout.lapack_preload():
        # Calling a deserialised program on the CPU first registers LAPACK's kernels, which
        # imports SciPy's LAPACK bindings (slow; BENCHMARKS.md, "Program cache start-up");
        # import them now, in the background, while the checkpoint is read.
        threading.Thread(target=_import_lapack, daemon=True).start()
    return _active


def active() -> Optional[ProgramCache]:
    return _active
