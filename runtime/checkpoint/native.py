"""The runtime's own checkpoint format: one safetensors file keyed by our parameter paths.

What converters write (e.g. a Hugging Face model quantised to int8 once, so later loads need no
re-quantisation): `params.safetensors` with a float tensor per parameter named by its path
(`language_model/.../query/w`), or for int8 weights two tensors `<path>:int8` and
`<path>:scales` (bf16 or f16), for int4 weights `<path>:int4` (uint8 codes packed two per
byte, quant4.py) with `<path>:scales` (and `<path>:mins` for the asymmetric form); beside it
`config.yaml` (and any tokenizer files). The header metadata marks
the format, so a foreign file is refused by name rather than misread.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.checkpoint.lazy import BYTES_READ, LazyParam, as_slices, normalize
from runtime.checkpoint.params_tree import (leaf_problem, logical_shapes, quantized_leaf,
                                            tree_problems)
from runtime.checkpoint.safetensors_io import SafetensorsFile, save_safetensors
from runtime.config import ModelConfig
from runtime.errors import CheckpointError, problem_report
from runtime.quant import QuantizedWeight8bit
from runtime.quant4 import QuantizedWeight4bit

FILE = "params.safetensors"
FORMAT = "haiku-runtime-params-v1"


def _report(summary: str, problems: list[str]) -> CheckpointError:
    return problem_report(summary, problems, CheckpointError)


def write_native(params, directory: Path, config: ModelConfig,
                 metadata: dict[str, str] | None = None) -> Path:
    """params.safetensors in `directory`; `metadata` (e.g. the converter's int8 group size, for
    the record: the scales' shapes carry the layout) joins the header's."""
    problems = tree_problems(params, logical_shapes(config))
    if problems:
        raise _report("params do not match the model config", problems)
    tensors = {}
    for module, leaves in params.items():
        for param, leaf in leaves.items():
            path = f"{module}/{param}"
            if isinstance(leaf, QuantizedWeight8bit):
                tensors[path + ":int8"] = np.asarray(leaf.weight)
                tensors[path + ":scales"] = np.asarray(leaf.scales)
            elif isinstance(leaf, QuantizedWeight4bit):
                tensors[path + ":int4"] = np.asarray(leaf.packed)
                tensors[path + ":scales"] = np.asarray(leaf.scales)
                if leaf.mins is not None:
                    tensors[path + ":mins"] = np.asarray(leaf.mins)
            else:
                tensors[path] = np.asarray(leaf)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, directory / FILE, {**(metadata or {}), "format": FORMAT})
    return directory / FILE


def is_native(directory: Path) -> bool:
    return (Path(directory) / FILE).is_file()


# The tensor sets one parameter may have: float, int8, int4 symmetric, int4 asymmetric.
PART_SETS = ({""}, {"int8", "scales"}, {"int4", "scales"}, {"int4", "scales", "mins"})
PARTS = frozenset().union(*PART_SETS)


def _stored_leaf(key, parts: dict, get):
    """The leaf a parameter's tensors make (get: tensor name -> array or lazy view)."""
    if "int4" in parts:
        return QuantizedWeight4bit(get(parts["int4"]), get(parts["scales"]),
                                   get(parts["mins"]) if "mins" in parts else None)
    if "int8" in parts:
        return quantized_leaf(key, get(parts["int8"]), get(parts["scales"]))
    return get(parts[""])


def plan_native(directory: Path, config: ModelConfig):
    """The file and (module, param) -> {part: tensor name} (one of PART_SETS), checked."""
    f = SafetensorsFile(Path(directory) / FILE)
    if f.metadata.get("format") != FORMAT:
        raise CheckpointError(f"{f.path}: not a {FORMAT} file (metadata {f.metadata})")
    shapes = logical_shapes(config)
    problems, found = [], {}
    for name in f.keys():
        path, _, part = name.partition(":")
        module, _, param = path.rpartition("/")
        if (module, param) not in shapes or part not in PARTS:
            problems.append(f"{name}: not a parameter of the model")
            continue
        found.setdefault((module, param), {})[part] = name
    for key, full in shapes.items():
        parts = found.get(key)
        where = "/".join(key)
        if parts is None:
            problems.append(f"{where}: missing")
        elif set(parts) not in PART_SETS:
            problems.append(f"{where}: needs one float tensor, :int8 with :scales, or :int4 "
                            f"with :scales (and :mins), found {sorted(parts)}")
        else:
            view = _stored_leaf(key, parts, f.get)
            if bad := leaf_problem(where, key[1], view, full):
                problems.append(bad)
    if problems:
        raise _report(f"checkpoint {f.path} does not match the model config", problems)
    return f, found


def lazy_native(directory: Path, config: ModelConfig) -> dict:
    """(module, param) -> LazyParam (or QuantizedWeight8bit / QuantizedWeight4bit of them)
    over params.safetensors."""
    f, found = plan_native(directory, config)

    def lazy(name: str) -> LazyParam:
        def read(index):
            part = np.asarray(f.get(name)[as_slices(normalize(index, f.shape(name)))])
            BYTES_READ.add(part.nbytes)
            return part
        return LazyParam(f.shape(name), f.dtype(name), read)

    return {key: _stored_leaf(key, parts, lazy) for key, parts in found.items()}
