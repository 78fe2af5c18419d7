"""The runtime's own checkpoint format: one safetensors file keyed by our parameter paths.

What converters write (e.g. a Hugging Face model quantised to int8 once, so later loads need no
re-quantisation): `params.safetensors` with a float tensor per parameter named by its path
(`language_model/.../query/w`), or for int8 weights two tensors `<path>:int8` and
`<path>:scales`; beside it `config.yaml` (and any tokenizer files). The header metadata marks
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
            else:
                tensors[path] = np.asarray(leaf)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, directory / FILE, {**(metadata or {}), "format": FORMAT})
    return directory / FILE


def is_native(directory: Path) -> bool:
    return (Path(directory) / FILE).is_file()


def plan_native(directory: Path, config: ModelConfig):
    """The file and (module, param) -> {"": name} or {"int8": name, "scales": name}, checked."""
    f = SafetensorsFile(Path(directory) / FILE)
    if f.metadata.get("format") != FORMAT:
        raise CheckpointError(f"{f.path}: not a {FORMAT} file (metadata {f.metadata})")
    shapes = logical_shapes(config)
    problems, found = [], {}
    for name in f.keys():
        path, _, part = name.partition(":")
        module, _, param = path.rpartition("/")
        if (module, param) not in shapes or part not in ("", "int8", "scales"):
            problems.append(f"{name}: not a parameter of the model")
            continue
        found.setdefault((module, param), {})[part] = name
    for key, full in shapes.items():
        parts = found.get(key)
        where = "/".join(key)
        if parts is None:
            problems.append(f"{where}: missing")
        elif set(parts) not in ({""}, {"int8", "scales"}):
            problems.append(f"{where}: needs either one float tensor or :int8 with :scales, "
                            f"found {sorted(parts)}")
        else:
            view = quantized_leaf(key, f.get(parts["int8"]), f.get(parts["scales"])) \
                if "int8" in parts else f.get(parts[""])
            if bad := leaf_problem(where, key[1], view, full):
                problems.append(bad)
    if problems:
        raise _report(f"checkpoint {f.path} does not match the model config", problems)
    return f, found


def lazy_native(directory: Path, config: ModelConfig) -> dict:
    """(module, param) -> LazyParam (or QuantizedWeight8bit of them) over params.safetensors."""
    f, found = plan_native(directory, config)

    def lazy(name: str) -> LazyParam:
        def read(index):
            part = np.asarray(f.get(name)[as_slices(normalize(index, f.shape(name)))])
            BYTES_READ.add(part.nbytes)
            return part
        return LazyParam(f.shape(name), f.dtype(name), read)

    return {key: quantized_leaf(key, lazy(parts["int8"]), lazy(parts["scales"]))
            if "int8" in parts else lazy(parts[""]) for key, parts in found.items()}
