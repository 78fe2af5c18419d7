"""Load the pickles of a released checkpoint without letting them run code.

A pickle is a small program: its GLOBAL opcodes import any callable by name and REDUCE calls it,
so `pickle.load` on a downloaded file can run anything. Checkpoint files only ever need numpy's
array reconstruction, dtypes (including ml_dtypes' bfloat16) and the reference's
`__main__.QuantizedWeight8bit` record. `RestrictedUnpickler` resolves exactly those names,
without importing anything, and refuses every other global when it is named, before any opcode
that could call it runs.
"""

from __future__ import annotations

import contextlib
import pickle
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from runtime.errors import CheckpointError

try:  # numpy 2 moved the private core package; the names inside are unchanged
    from numpy._core.multiarray import _reconstruct, scalar as _scalar
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar as _scalar

# Exact (module, name) globals a checkpoint may reference, for both numpy 1.x pickles (the
# released files) and numpy 2 pickles. They map to the live objects directly, so loading never
# imports a module by a name taken from the file (nor numpy.core's deprecation shim).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,  # 0-d values
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
_RECORD_NAME = "QuantizedWeight8bit"


class QuantizedWeight8bitRecord:
    """What a pickled `QuantizedWeight8bit` becomes: its two arrays and nothing else.

    The reference pickled a dataclass defined in its launch script (`__main__`), so its state is
    the instance dict {"weight": int8 [..., I, O], "scales": bf16 [..., R, O]}. The Grok-1 writer
    pickles this class under that global name; its default reduce then yields the same stream.
    """

    def __init__(self, weight, scales):
        self.weight = weight  # int8 [..., I, O]
        self.scales = scales  # bf16 [..., R, O]

    def __setstate__(self, state):
        # Only the two known fields: a crafted state must not set arbitrary attributes.
        if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            found = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{_RECORD_NAME} state must be a dict with keys weight and scales, "
                             f"got {found}")
        self.weight = state["weight"]
        self.scales = state["scales"]


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build only ndarrays, dtypes and QuantizedWeight8bitRecord."""

    def __init__(self, file, label: str):
        super().__init__(file)
        self._label = label  # how error messages name the file

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        # Where bfloat16 lives has moved between ml_dtypes releases; the type is the same.
        if name == "bfloat16" and module.startswith("ml_dtypes"):
            return ml_dtypes.bfloat16
        # The reference's class was pickled from `__main__`; the module says nothing we need.
        if name == _RECORD_NAME or name.endswith("." + _RECORD_NAME):
            return QuantizedWeight8bitRecord
        raise CheckpointError(f"refusing to load {self._label}: it references {module}.{name}, "
                              f"which a checkpoint never needs")


# What malformed bytes can make the unpickler (or numpy, rebuilding an array) raise; deep
# nesting (300k nested lists) ends in RecursionError, or RuntimeError from C code.
_CORRUPT = (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, OverflowError, MemoryError, struct.error, UnicodeDecodeError,
            RecursionError, RuntimeError)


def corrupt_message(label: str) -> str:
    return f"truncated or corrupt checkpoint file {label}"


@contextlib.contextmanager
def reading(label: str):
    """Turn whatever reading or unpickling one checkpoint file raises into one CheckpointError
    naming the file (CheckpointErrors pass through unchanged)."""
    try:
        yield
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {label}: {e.strerror or e}") from None
    except _CORRUPT as e:
        detail = (str(e).splitlines() or [""])[0]
        reason = f"{type(e).__name__}: {detail}" if detail else type(e).__name__
        raise CheckpointError(f"{corrupt_message(label)}: {reason}") from None


def load_file(path: str | Path, label: str | None = None):
    """Unpickle one checkpoint file with RestrictedUnpickler; any failure is one CheckpointError.

    `label` names the file in messages (default: its path). Returns an np.ndarray or a
    QuantizedWeight8bitRecord (or, for a foreign but harmless pickle, whatever the allowed
    globals build: callers check the type).
    """
    label = label or str(path)
    corrupt = corrupt_message(label)
    with reading(label), open(path, "rb") as f:
        head = f.read(2)
        # Every pickle of protocol >= 2 starts with PROTO n; the released files use 4.
        if len(head) < 2 or head[0] != pickle.PROTO[0] or not 2 <= head[1] <= 5:
            what = "it is empty" if not head else f"it starts with {head!r}"
            raise CheckpointError(f"{corrupt}: not a pickle ({what}); a foreign file?")
        f.seek(0)
        obj = RestrictedUnpickler(f, label).load()
        if f.read(1):
            raise CheckpointError(f"{corrupt}: unexpected bytes after the end of the pickle")
    return obj
