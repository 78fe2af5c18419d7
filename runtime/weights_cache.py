"""Prepared weights kept across processes: one CPU device's engine parameters (panels,
compacted tables) in a file per checkpoint, mapped back by a later start instead of read,
decoded and prepared again.

Why: a GGUF file's start spent most of its time making the engine's forms (decoding blocks,
panels, super-scaled tables), each a fresh copy the kernel then faulted in; llama.cpp maps its
file and uses the blocks as they are (BENCHMARKS.md, "Prepared weights cache"). Mapped here,
each leaf starts on a 4096-byte boundary, and XLA's CPU client holds such a host buffer as it
is: the engine's parameters are the file's pages (copy-on-write, so nothing can write the file).

Keys: the runtime's source digest (program_cache.source_digest: code, JAX versions, kernels,
--int8-activations), the CPU's features (native_build.cpu_fingerprint: six-bit panels), the
checkpoint's files (paths, sizes, modification times), the model config, the mesh, the slots,
the loading flags and the RUNTIME_* environment. A file is JSON (the tree, the layout, each
leaf's dtype, shape, sharding and offset) and raw bytes: nothing in it is executed, every
node type and dtype is checked against an allowlist, and a file that does not check is
reported in one line and replaced by a fresh load.

Only single-process runs on one CPU device; off with RUNTIME_WEIGHTS_CACHE=0 or
--no-compilation-cache (it lives in the compilation cache's directory). Entries are evicted
least recently used beyond RUNTIME_WEIGHTS_CACHE_GB (default 64), and one is not written
where it would leave the disk under 10% (or 2 GiB) free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from runtime import native_build, program_cache
from runtime.engine import Engine, model_for
from runtime.errors import RuntimeInputError
from runtime.layer_types import LayersByType
from runtime.layout import Layout
from runtime.quant import (QuantizedEmbedding, QuantizedWeight8bit, TiledEmbedding, TiledWeight,
                           TransposedWeight)
from runtime.quant4 import QuantizedWeight4bit, TiledEmbedding4, TiledWeight4

MAGIC = b"LLMRTWC1"
ALIGNMENT = 4096  # each leaf's offset: page-aligned, so the mapped pages are the leaf
MAX_HEADER_BYTES = 64 << 20
NODE_TYPES = {cls.__name__: cls for cls in (
    QuantizedWeight8bit, QuantizedEmbedding, TransposedWeight, TiledWeight, TiledEmbedding,
    QuantizedWeight4bit, TiledWeight4, TiledEmbedding4)}
DTYPES = {name: np.dtype(t) for name, t in (
    ("float32", np.float32), ("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16),
    ("int8", np.int8), ("uint8", np.uint8), ("int32", np.int32), ("uint32", np.uint32))}
SIZE_ENV = "RUNTIME_WEIGHTS_CACHE_GB"
SWITCH_ENV = "RUNTIME_WEIGHTS_CACHE"  # 0: off
FLAGS = ("quantize", "int8_group_size", "group_size", "int8_activations")  # run.py's, keyed
SUBDIRECTORY = "llm-runtime-weights"
MIN_FREE_BYTES, MIN_FREE_FRACTION = 2 << 30, 0.1  # of the disk, left free after a write


class NotCacheable(Exception):
    """A tree this cache has no form for (a node type or dtype outside its allowlists)."""


def _checkpoint_identity(checkpoint: Path) -> list:
    """(relative path, size, modification time) of the checkpoint's files: a changed file is
    a new key."""
    checkpoint = Path(checkpoint).resolve()
    files = [checkpoint] if checkpoint.is_file() else sorted(
        p for p in checkpoint.rglob("*") if p.is_file())
    identity = []
    for path in files:
        stat = path.stat()
        identity.append([str(path.relative_to(checkpoint.parent)), stat.st_size,
                         stat.st_mtime_ns])
    return [str(checkpoint)] + identity


def cache_key(source: str, checkpoint: Path, config, mesh: Mesh, slots: int, flags: dict) -> str:
    """The key of one engine's prepared weights (see the module's docstring); source:
    program_cache.source_digest()."""
    environment = sorted((k, v) for k, v in os.environ.items()
                         if k.startswith("RUNTIME_") and k not in (SIZE_ENV, SWITCH_ENV))
    parts = {"source": source, "cpu": native_build.cpu_fingerprint(),
             "checkpoint": _checkpoint_identity(checkpoint), "config": repr(config),
             "mesh": dict(mesh.shape), "slots": slots, "flags": flags, "env": environment}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def eligible(mesh: Mesh) -> bool:
    """Whether an engine on `mesh` can keep its weights here: one process, one CPU device."""
    return jax.process_count() == 1 and mesh.devices.size == 1 \
        and mesh.devices.flat[0].platform == "cpu"


# --- the tree as JSON ------------------------------------------------------------------------

def _spec_json(sharding) -> Optional[list]:
    if not isinstance(sharding, NamedSharding):
        return None
    return [list(axis) if isinstance(axis, tuple) else axis for axis in sharding.spec]


def _encoded(node, leaves: list):
    """The JSON form of a parameter tree node; its arrays appended to `leaves`."""
    if node is None:
        return None
    if isinstance(node, dict):
        return {"dict": {str(k): _encoded(v, leaves) for k, v in node.items()}}
    if isinstance(node, LayersByType):
        return {"type": "LayersByType", "kinds": list(node.kinds),
                "stacks": [_encoded(stack, leaves) for stack in node.stacks]}
    if type(node).__name__ in NODE_TYPES and type(node) is NODE_TYPES[type(node).__name__]:
        return {"type": type(node).__name__,
                "fields": {f.name: _encoded(getattr(node, f.name), leaves)
                           for f in dataclasses.fields(node)}}
    if isinstance(node, jax.Array):
        if node.dtype.name not in DTYPES:
            raise NotCacheable(f"a leaf of dtype {node.dtype.name}")
        leaves.append(node)
        return {"leaf": len(leaves) - 1}
    raise NotCacheable(f"a node of type {type(node).__name__}")


def _decoded(form, arrays: list):
    """The tree `form` (_encoded) describes, its leaves taken from `arrays`."""
    if form is None:
        return None
    if not isinstance(form, dict):
        raise ValueError(f"node {form!r:.40}: not an object")
    if "dict" in form:
        return {str(k): _decoded(v, arrays) for k, v in dict(form["dict"]).items()}
    if "leaf" in form:
        return arrays[int(form["leaf"])]
    kind = form.get("type")
    if kind == "LayersByType":
        return LayersByType([_decoded(s, arrays) for s in form["stacks"]],
                            [int(k) for k in form["kinds"]])
    if kind not in NODE_TYPES:
        raise ValueError(f"node type {kind!r}: not one this cache writes")
    cls = NODE_TYPES[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    fields = dict(form["fields"])
    if set(fields) != names:
        raise ValueError(f"{kind} fields {sorted(fields)}: expected {sorted(names)}")
    return cls(**{name: _decoded(value, arrays) for name, value in fields.items()})


# --- files -----------------------------------------------------------------------------------

def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def _write_entry(path: Path, layout: Layout, params, owner: dict) -> None:
    """The file for `params` under `layout` at `path`: MAGIC, the header's offset and length
    (8 bytes each), the leaves from ALIGNMENT on (each at an aligned offset), the header
    (JSON) after them. Written beside it, then renamed: readers see a whole file or none."""
    leaves: list = []
    tree = _encoded(params, leaves)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            entries, offset = [], ALIGNMENT
            for leaf in leaves:
                f.seek(offset)
                f.write(np.ascontiguousarray(np.asarray(leaf)).reshape(-1).view(np.uint8))
                entries.append({"dtype": leaf.dtype.name, "shape": list(leaf.shape),
                                "spec": _spec_json(leaf.sharding), "offset": offset})
                offset = _aligned(offset + leaf.nbytes)
            header = json.dumps({"layout": dataclasses.asdict(layout), "tree": tree,
                                 "leaves": entries, "owner": owner}).encode()
            f.seek(offset)
            f.write(header)
            f.seek(0)
            f.write(MAGIC + offset.to_bytes(8, "little") + len(header).to_bytes(8, "little"))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _drop_stale(directory: Path, owner: dict) -> None:
    """Remove the entries of the same checkpoint written by other runtime code (owner: the
    checkpoint's path and the source digest): no start of this code maps them again."""
    for path in directory.glob("weights-*"):
        try:
            theirs = _read_header(path).get("owner") or {}
        except (OSError, ValueError, AttributeError):
            continue  # (a file being written, or damaged: its own load says so)
        if theirs.get("checkpoint") == owner["checkpoint"] and \
                theirs.get("source") != owner["source"]:
            path.unlink(missing_ok=True)


def _make_room(directory: Path, needed: int, limit: float) -> Optional[str]:
    """Evict the least recently used entries until `needed` more bytes fit `limit`; None, or
    why the entry should not be written (over the limit, or the disk would be too full)."""
    if needed > limit:
        return f"{needed / 2**30:.1f} GiB is over {SIZE_ENV}"
    entries = sorted(directory.glob("weights-*"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in entries)
    while entries and total + needed > limit:
        oldest = entries.pop(0)
        total -= oldest.stat().st_size
        oldest.unlink(missing_ok=True)
    disk = shutil.disk_usage(directory)
    if disk.free - needed < max(MIN_FREE_BYTES, disk.total * MIN_FREE_FRACTION):
        return f"{needed / 2**30:.1f} GiB would leave the disk under {MIN_FREE_FRACTION:.0%} free"
    return None


def store(directory: Path, key: str, layout: Layout, params, limit: float,
          owner: dict) -> Optional[Path]:
    """Write `params` (an engine's, prepared under `layout`) as the entry for `key`; the
    entry's path, or None where it was not written (said on stderr, one line). limit: the
    cache's bytes (_make_room); owner: the checkpoint's path and the source digest
    (_drop_stale)."""
    path = Path(directory) / f"weights-{key}"
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        _drop_stale(Path(directory), owner)
        why = _make_room(Path(directory), ALIGNMENT + sum(
            _aligned(leaf.nbytes) for leaf in jax.tree.leaves(params)), limit)
        if why is None:
            _write_entry(path, layout, params, owner)
            return path
    except (NotCacheable, OSError) as e:
        why = str(e)
    print(f"[weights cache] not stored: {why}", file=sys.stderr)
    return None


def _read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        start = f.read(len(MAGIC) + 16)
        if len(start) < len(MAGIC) + 16 or start[:len(MAGIC)] != MAGIC:
            raise ValueError("not a weights cache file")
        offset = int.from_bytes(start[len(MAGIC):len(MAGIC) + 8], "little")
        length = int.from_bytes(start[len(MAGIC) + 8:], "little")
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"a header of {length} bytes")
        f.seek(offset)
        header = f.read(length)
        if len(header) != length:
            raise ValueError("truncated")
        return json.loads(header)


def _mapped_leaves(path: Path, entries: list, mesh: Mesh) -> list:
    """Each leaf entry as a jax.Array on the mesh's device holding the mapped file's pages."""
    mapped = np.memmap(path, np.uint8, mode="c")  # copy-on-write: the file is never written
    arrays = []
    for entry in entries:
        dtype = DTYPES[str(entry["dtype"])]
        shape = tuple(int(d) for d in entry["shape"])
        offset = int(entry["offset"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset % ALIGNMENT or min(shape, default=0) < 0 or offset + nbytes > mapped.size:
            raise ValueError(f"leaf at {offset} of {nbytes} bytes: outside the file")
        spec = entry["spec"]
        sharding = NamedSharding(mesh, PartitionSpec(*[
            tuple(a) if isinstance(a, list) else a for a in spec])) if spec is not None \
            else jax.sharding.SingleDeviceSharding(mesh.devices.flat[0])
        value = mapped[offset:offset + nbytes].view(dtype).reshape(shape)
        arrays.append(jax.device_put(value, sharding))
    return arrays


def load(directory: Path, key: str, mesh: Mesh) -> Optional[tuple]:
    """(layout, params) of the entry for `key`, or None where there is none; an entry that
    does not check is said on stderr (one line) and removed."""
    path = Path(directory) / f"weights-{key}"
    if not path.is_file():
        return None
    try:
        header = _read_header(path)
        layout = Layout(**{f.name: header["layout"][f.name] for f in dataclasses.fields(Layout)})
        params = _decoded(header["tree"], _mapped_leaves(path, header["leaves"], mesh))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        print(f"[weights cache] {path}: {e}; loading the checkpoint instead", file=sys.stderr)
        path.unlink(missing_ok=True)
        return None
    os.utime(path)  # recently used (eviction order)
    return layout, params


class Entry:
    """One run's engine in the cache at `directory` (entry_for): engine() maps it back where
    it is there, store() keeps a freshly built one."""

    def __init__(self, directory: Path, key: str, config, mesh: Mesh, limit: float,
                 owner: dict):
        self.directory, self.key, self.config, self.mesh = Path(directory), key, config, mesh
        self.limit, self.owner = limit, owner

    def engine(self, slots: int, cache_length, prefill_chunk, decode_steps) -> Optional[Engine]:
        start = time.perf_counter()
        kept = load(self.directory, self.key, self.mesh)
        if kept is None:
            return None
        layout, params = kept
        print(f"[load p0] prepared weights mapped from {self.directory / f'weights-{self.key}'} "
              f"({_bytes(params) / 1e9:.3f} GB) in {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
        return Engine(model_for(self.config, self.mesh, layout), params, self.mesh, layout,
                      slots, cache_length, prefill_chunk, decode_steps)

    def store(self, engine: Engine) -> None:
        path = store(self.directory, self.key, engine.layout, engine.params, self.limit,
                     self.owner)
        if path is not None:
            print(f"[weights cache] stored the prepared weights ({_bytes(engine.params) / 1e9:.3f}"
                  f" GB) as {path}; the next start maps them ({SWITCH_ENV}=0: off)",
                  file=sys.stderr)


def entry_for(cache_directory: Optional[Path], args, checkpoint, config, mesh: Mesh,
              slots: int) -> Optional[Entry]:
    """This run's Entry, or None where the cache is off (no compilation cache directory,
    RUNTIME_WEIGHTS_CACHE=0) or the engine is not eligible()."""
    if cache_directory is None or os.environ.get(SWITCH_ENV, "1") == "0" or not eligible(mesh):
        return None
    try:
        limit = float(os.environ.get(SIZE_ENV, "64")) * (1 << 30)
    except ValueError:
        limit = float("nan")
    if not 0 <= limit < float("inf"):
        raise RuntimeInputError(f"{SIZE_ENV}={os.environ[SIZE_ENV]!r}: not a number of GB")
    flags = {name: getattr(args, name, None) for name in FLAGS}
    active = program_cache.active()  # (run.py's: its digest already read the sources)
    source = active.source if active is not None else program_cache.source_digest()
    owner = {"checkpoint": str(Path(checkpoint).resolve()), "source": source}
    return Entry(Path(cache_directory) / SUBDIRECTORY,
                 cache_key(source, checkpoint, config, mesh, slots, flags), config, mesh, limit,
                 owner)


def _bytes(params) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(params))
