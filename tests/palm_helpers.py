"""Writing torch.save-format zip files without torch, for tests: checkpoints of any Palm config
from numpy state dicts, and hostile variants (the opcodes are spelled out, so a test can put
any global, persistent id or tensor view into data.pkl)."""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


def op_str(text: str) -> bytes:
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def op_int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)


def op_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def op_tuple(items: list[bytes]) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def op_tensor(key: str, storage: str, numel: int, shape, stride=None, offset: int = 0) -> bytes:
    """torch._utils._rebuild_tensor_v2(storage `key`, offset, shape, stride, False, {})."""
    if stride is None:
        stride = [int(np.prod(shape[i + 1:])) for i in range(len(shape))]
    pid = op_tuple([op_str("storage"), op_global("torch", storage), op_str(key), op_str("cpu"),
                    op_int(numel)]) + pickle.BINPERSID
    hooks = op_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE + pickle.REDUCE
    return op_global("torch._utils", "_rebuild_tensor_v2") + op_tuple(
        [pid, op_int(offset), op_tuple([op_int(n) for n in shape]),
         op_tuple([op_int(s) for s in stride]), pickle.NEWFALSE, hooks]) + pickle.REDUCE


def op_dict(items: list[tuple[bytes, bytes]]) -> bytes:
    return pickle.EMPTY_DICT + pickle.MARK + b"".join(k + v for k, v in items) + pickle.SETITEMS


def palm_pickle(state: dict, hyper: dict, prefix: str = "") -> tuple[bytes, dict]:
    """data.pkl of {"model", "optimizers": [], "hyperparams", "device"} and the storages."""
    storages, model = {}, []
    for name, array in state.items():
        key = str(len(storages))
        storages[key] = np.ascontiguousarray(array)
        model.append((op_str(prefix + name), op_tensor(key, STORAGE_NAMES[array.dtype],
                                                       array.size, array.shape)))
    body = op_dict([(op_str("model"), op_global("collections", "OrderedDict")
                     + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.MARK
                     + b"".join(k + v for k, v in model) + pickle.SETITEMS),
                    (op_str("optimizers"), pickle.EMPTY_LIST),
                    (op_str("hyperparams"), op_dict([(op_str(k), op_int(v))
                                                     for k, v in hyper.items()])),
                    (op_str("device"), op_str("cpu"))])
    return pickle.PROTO + b"\x02" + body + pickle.STOP, storages


def write_zip(path: Path, pickled: bytes, storages: dict, top: str = "archive",
              compress: bool = False) -> Path:
    """A torch-style archive: top/data.pkl, top/byteorder, top/data/<key> (stored)."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{top}/data.pkl", pickled)
        z.writestr(f"{top}/byteorder", "little")
        for key, data in storages.items():
            raw = data.tobytes() if isinstance(data, np.ndarray) else data
            z.writestr(f"{top}/data/{key}", raw, compress_type=method)
        z.writestr(f"{top}/version", "3\n")
    return path


def write_palm(path: Path, state: dict, hyper: dict, prefix: str = "") -> Path:
    pickled, storages = palm_pickle(state, hyper, prefix)
    return write_zip(path, pickled, storages)
