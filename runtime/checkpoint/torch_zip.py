"""Read a `torch.save` file (torch's zip format) without torch and without running anything.

The archive holds one top folder `<name>/` with `data.pkl` (the saved object, a protocol-2
pickle), `data/<key>` (one member per storage: its raw bytes, stored uncompressed),
`byteorder` and a few version members. `data.pkl` names each storage by a persistent id
("storage", <torch.XStorage>, key, location, numel) and rebuilds each tensor with
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, meta])`.

`TorchUnpickler` resolves exactly the globals a checkpoint needs, to stand-ins of ours: the
tensor rebuilds (a `TensorRef`: storage, offset, shape, stride; no bytes read), the storage
types (their dtype only), `collections.OrderedDict`. Any other global is refused when it is
named, before an opcode could call it. Storages are checked against their zip members and
tensors against their storages as they are met; a tensor's bytes are read (memory-mapped, only
the slice asked for) when a reader asks, so state nobody asks for (optimizer moments) is never
read.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from runtime.checkpoint.lazy import BYTES_READ
from runtime.checkpoint.safe_pickle import corrupt_message, reading
from runtime.errors import CheckpointError

# torch's legacy storage classes (what a persistent id names) -> the dtype of their elements
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
}
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip member's local file header (30 bytes)


class StorageType(NamedTuple):
    """What `torch.<name>Storage` resolves to: not callable, only its dtype."""
    name: str
    dtype: np.dtype


class Storage(NamedTuple):
    """One storage: `numel` elements of `dtype` at byte `start` of the file (its zip member)."""
    path: Path
    member: str
    dtype: np.dtype
    numel: int
    start: int


class TensorRef(NamedTuple):
    """A tensor as the pickle describes it; `read` fetches (a slice of) its values."""
    storage: Storage
    offset: int  # in elements of the storage
    shape: tuple
    stride: tuple

    @property
    def dtype(self) -> np.dtype:
        return self.storage.dtype

    def read(self, index=None) -> np.ndarray:
        """The tensor's values (the slice `index` of them), copied out of the file."""
        s = self.storage
        if not s.numel or not math.prod(self.shape):  # nothing to map
            return np.zeros(self.shape, s.dtype)[tuple(index or ())]
        flat = np.memmap(s.path, dtype=s.dtype, mode="r", offset=s.start, shape=(s.numel,))
        item = s.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.shape,
                                               [st * item for st in self.stride], writeable=False)
        out = np.array(view[tuple(index or ())])
        BYTES_READ.add(out.nbytes)
        return out


def _is_ints(value, rank=None) -> bool:
    return isinstance(value, tuple) and (rank is None or len(value) == rank) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None,
                    metadata=None):
    """Stand-in of torch._utils._rebuild_tensor_v2: a TensorRef, checked against its storage
    (requires_grad, hooks and metadata say nothing about the values)."""
    del requires_grad, hooks, metadata
    if not isinstance(storage, Storage):
        raise ValueError(f"a tensor rebuilt from a {type(storage).__name__}, not a storage")
    if not (_is_ints((offset,)) and _is_ints(size) and _is_ints(stride, len(size))):
        raise ValueError(f"a tensor with offset {offset!r}, size {size!r}, stride {stride!r}")
    last = offset + sum((n - 1) * st for n, st in zip(size, stride)) if all(size) else offset - 1
    if last >= storage.numel:
        raise CheckpointError(
            f"refusing to load {storage.path}: a tensor of shape {list(size)} at offset "
            f"{offset} runs past its storage {storage.member} ({storage.numel} elements)")
    return TensorRef(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    """Stand-in of torch._utils._rebuild_parameter(_with_state): the tensor itself."""
    del requires_grad, hooks, state
    if not isinstance(data, TensorRef):
        raise ValueError(f"a parameter rebuilt from a {type(data).__name__}, not a tensor")
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class TorchUnpickler(pickle.Unpickler):
    """Unpickles data.pkl into plain containers, numbers, strings and TensorRefs only."""

    def __init__(self, file, path: Path, members: dict):
        super().__init__(file)
        self._path = path
        self._members = members  # storage key -> (byte offset of its data, size)
        self._storages: dict = {}

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name, STORAGE_DTYPES[name])
        raise CheckpointError(f"refusing to load {self._path}: it references {module}.{name}, "
                              f"which a checkpoint never needs")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], StorageType) and isinstance(pid[2], str)
                and _is_ints((pid[4],))):
            raise pickle.UnpicklingError(f"a persistent id that is not a storage: {pid!r:.80}")
        _, kind, key, _, numel = pid
        if key not in self._members:
            raise CheckpointError(f"refusing to load {self._path}: storage {key!r} has no zip "
                                  f"member data/{key}")
        start, size = self._members[key]
        if numel * kind.dtype.itemsize > size:
            raise CheckpointError(
                f"refusing to load {self._path}: storage data/{key} of {numel} {kind.name} "
                f"elements ({numel * kind.dtype.itemsize} bytes) runs past its zip member "
                f"({size} bytes)")
        storage = Storage(self._path, f"data/{key}", kind.dtype, numel, start)
        # one storage may back several tensors, always with the same type
        if self._storages.setdefault(key, storage) != storage:
            raise pickle.UnpicklingError(f"storage {key!r} named with two types")
        return storage


def _top_folder(names: list[str], path: Path) -> str:
    tops = [n[:-len("data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(tops) != 1:
        raise CheckpointError(f"{path} is a zip archive but not a torch.save checkpoint "
                              f"(expected one <name>/data.pkl, found {len(tops)})")
    return tops[0]


def _member_start(f, info: zipfile.ZipInfo, file_size: int, path: Path) -> int:
    """Byte offset of a stored member's data (after its local header), checked to fit."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"refusing to load {path}: member {info.filename} is compressed "
                              f"(torch.save stores storages uncompressed)")
    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER.size)
    fields = _LOCAL_HEADER.unpack(header) if len(header) == _LOCAL_HEADER.size else None
    if fields is None or fields[0] != b"PK\x03\x04":
        raise CheckpointError(f"{corrupt_message(str(path))}: member {info.filename} has no "
                              f"local header")
    start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
    if start + info.file_size > file_size:
        raise CheckpointError(f"{corrupt_message(str(path))}: member {info.filename} runs "
                              f"past the end of the file")
    return start


def is_torch_zip(path: Path) -> bool:
    """Whether `path` is a file that starts like a zip archive (torch.save's format)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def load_torch_zip(path: str | Path):
    """The object a torch.save file holds, with each tensor a TensorRef (nothing read yet)."""
    path = Path(path)
    label = str(path)
    with reading(label):
        try:
            pickled, members = _archive(path)
        except zipfile.BadZipFile as e:  # also a member whose bytes fail their CRC
            raise CheckpointError(f"{corrupt_message(label)}: not a readable zip archive "
                                  f"({e})") from None
        stream = io.BytesIO(pickled)
        obj = TorchUnpickler(stream, path, members).load()
        if stream.read(1):
            raise CheckpointError(f"{corrupt_message(label)}: unexpected bytes after the end "
                                  f"of data.pkl")
    return obj


def _archive(path: Path) -> tuple[bytes, dict]:
    """data.pkl's bytes and the storage members: key -> (byte offset of its data, size)."""
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        names = archive.namelist()
        top = _top_folder(names, path)
        order = archive.read(top + "byteorder") if top + "byteorder" in names else b"little"
        if order != b"little":
            raise CheckpointError(f"refusing to load {path}: byte order {order[:16]!r} "
                                  f"(only little-endian storages are read)")
        size = os.fstat(f.fileno()).st_size
        members = {info.filename[len(top + "data/"):]: (_member_start(f, info, size, path),
                                                         info.file_size)
                   for info in archive.infolist() if info.filename.startswith(top + "data/")}
        return archive.read(top + "data.pkl"), members


def tensor_bytes(ref: TensorRef) -> int:
    return math.prod(ref.shape) * ref.dtype.itemsize
