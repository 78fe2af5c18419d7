"""One entry point for every checkpoint format: detect it, find its config, read it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
from jax.sharding import Mesh, NamedSharding

from runtime.checkpoint import (gguf_file, gguf_reader, grok_ckpt, hf, hf_config, native,
                                palm_ckpt, torch_zip)
from runtime.checkpoint.lazy import (BYTES_READ, LazyParam, as_slices, dequantized_lazy,
                                     normalize, place_lazy,
                                     quantized_embedding_lazy, quantized_int4_lazy,
                                     quantized_lazy, widened_lazy)
from runtime.config import DEFAULT_INT8_GROUP_SIZE, ModelConfig
from runtime import layout as layouts
from runtime.errors import CheckpointError
from runtime.layer_types import LayersByType
from runtime.quant import (QuantizedWeight8bit, dequantize, quantize_embedding,
                           quantize_grouped)
from runtime.quant4 import DEFAULT_GROUP_SIZE, QuantizedWeight4bit, quantize_int4
from runtime.paths import EMBEDDINGS, quantized_kind
from runtime.sharding import leaf_spec

FORMATS = ("ckpt-0 (Grok-1)", "Hugging Face (config.json + *.safetensors)",
           f"native ({native.FILE} + config.yaml)", "a Palm torch.save file (FILE.bin)",
           "a GGUF file (FILE.gguf)")


def detect_format(directory: Path) -> str:
    """The format of a checkpoint folder, or of a checkpoint file ("palm": a torch.save zip
    of SrijanSriv211/Palm, checkpoint/palm_ckpt.py; "gguf": llama.cpp's format, by its magic,
    checkpoint/gguf_reader.py)."""
    directory = Path(directory)
    if directory.is_file():
        if gguf_file.is_gguf(directory):
            return "gguf"
        if directory.suffix == ".gguf":
            raise CheckpointError(f"{directory} is named .gguf but does not start with GGUF's "
                                  f"magic bytes")
        if torch_zip.is_torch_zip(directory):
            return "palm"
        raise CheckpointError(f"{directory} is a file but not a checkpoint of a known format: "
                              f"a checkpoint file must be a GGUF file or a torch.save zip "
                              f"archive (Palm)")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    if native.is_native(directory):
        return "native"
    if (directory / "config.json").is_file() and (any(directory.glob("*.safetensors"))
                                                  or (directory / "model.safetensors.index.json")
                                                  .is_file()):
        return "hf"
    if (directory / grok_ckpt.CKPT_DIR).is_dir() or any(directory.glob("tensor*_000")):
        return "ckpt-0"
    raise CheckpointError(f"{directory} is not a checkpoint of a known format; expected one "
                          f"of: {'; '.join(FORMATS)}")


def default_config(directory: Path) -> Optional[ModelConfig]:
    """The config a checkpoint carries (HF config.json, a Palm file's hyperparams, a GGUF
    file's metadata), if its format has one."""
    kind = detect_format(directory)
    if kind == "hf":
        return hf_config.read_hf_config(directory)
    if kind == "palm":
        return palm_ckpt.palm_config(directory)
    if kind == "gguf":
        return gguf_file.gguf_config(directory)
    return None


QUANTIZE_CHOICES = ("int8", "int4")
QUANTIZED_TYPES = (QuantizedWeight8bit, QuantizedWeight4bit)  # stored quantised: kept as read


def quantized_int8(path: str, leaf, config: ModelConfig,
                   group_size: int = DEFAULT_INT8_GROUP_SIZE):
    """What --quantize int8 stores for the parameter `leaf` at `path`: int8 for a float
    quantizable weight or tied table, else the leaf as it is (int8 stays as it is)."""
    kind = None if isinstance(leaf, QUANTIZED_TYPES) else quantized_kind(path, config)
    if kind == "weight":
        return quantize_grouped(leaf, group_size)
    if kind == "embedding":
        return quantize_embedding(leaf, group_size)
    return leaf


def quantized_int4(path: str, leaf, config: ModelConfig, group_size: int = DEFAULT_GROUP_SIZE,
                   int8_group_size: int = DEFAULT_INT8_GROUP_SIZE):
    """What --quantize int4 stores for `leaf` at `path`: a float quantizable weight as
    symmetric int4 in groups of at most group_size rows. The tied table stays what int8 makes
    of it: it is the output head, the product whose errors every token's logits carry."""
    if _int8_weight(path, leaf, config):  # released Grok-1 is int8: int4 from its exact values
        leaf = dequantize(leaf)
    kind = None if isinstance(leaf, QUANTIZED_TYPES) else quantized_kind(path, config)
    if kind == "weight":
        return quantize_int4(_even_rows(path, leaf), group_size, symmetric=True)
    if kind == "embedding":
        return quantize_embedding(leaf, int8_group_size)
    return leaf


def _int8_weight(path: str, leaf, config: ModelConfig) -> bool:
    """An int8 matmul weight (not a table) that --quantize int4 re-quantises: a second rounding
    (int8 -> int4), measured in BENCHMARKS.md "int4 weights", but the only way to run an
    int8-only checkpoint such as released Grok-1 in int4's memory."""
    return type(leaf) is QuantizedWeight8bit and quantized_kind(path, config) == "weight"


def _even_rows(path: str, leaf):
    """The leaf, if int4 can pack its input rows [..., I, O] in pairs."""
    if len(leaf.shape) < 2 or leaf.shape[-2] % 2:
        raise CheckpointError(f"--quantize int4: {path} {list(leaf.shape)} needs an even "
                              f"number of input rows (its second-to-last dimension)")
    return leaf


def quantized_as(quantize_to: Optional[str], path: str, leaf, config: ModelConfig,
                 int8_group_size: int = DEFAULT_INT8_GROUP_SIZE,
                 group_size: int = DEFAULT_GROUP_SIZE):
    """The leaf as --quantize `quantize_to` (None, "int8", "int4") stores it."""
    if quantize_to == "int8":
        return quantized_int8(path, leaf, config, int8_group_size)
    if quantize_to == "int4":
        return quantized_int4(path, leaf, config, group_size, int8_group_size)
    return leaf


def _check_quantize(quantize_to: Optional[str], int8_group_size: int, group_size: int) -> None:
    if quantize_to not in (None,) + QUANTIZE_CHOICES:
        raise CheckpointError(f"--quantize {quantize_to!r}: supported: "
                              f"{', '.join(QUANTIZE_CHOICES)}")
    if not isinstance(int8_group_size, int) or int8_group_size < 0:
        raise CheckpointError(f"--int8-group-size {int8_group_size!r}: expected 0 (one scale "
                              f"per output channel) or a positive number of input rows")
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise CheckpointError(f"--group-size {group_size!r}: expected an even number of input "
                              f"rows, at least 2")


def lazy_params(directory: Path, config: ModelConfig, kind: Optional[str] = None,
                layer_types: bool = False) -> dict:
    """(module, param) -> LazyParam (or QuantizedWeight8bit of LazyParams) of any supported
    checkpoint: the one read path of every format, every check done on the headers.
    layer_types: a GGUF layer stack of several types as layer_types.LayersByType."""
    kind = kind or detect_format(directory)
    if kind == "gguf":
        return gguf_reader.lazy_gguf(directory, config, layer_types)
    return {"hf": hf.lazy_hf, "native": native.lazy_native, "ckpt-0": grok_ckpt.lazy_ckpt0,
            "palm": palm_ckpt.lazy_palm}[kind](directory, config)


def _materialised(leaf):
    """A lazy leaf read whole (host arrays)."""
    if isinstance(leaf, QuantizedWeight4bit):
        return QuantizedWeight4bit(*(None if part is None else _materialised(part)
                                     for part in (leaf.packed, leaf.scales, leaf.mins)))
    if isinstance(leaf, QuantizedWeight8bit):
        return type(leaf)(leaf.weight.read(None), leaf.scales.read(None),
                          None if leaf.mins is None else leaf.mins.read(None)) \
            if isinstance(leaf.weight, LazyParam) else leaf  # the same kind (table or weight)
    return leaf.read(None) if isinstance(leaf, LazyParam) else leaf


def load_params(directory: Path, config: ModelConfig, quantize_to: Optional[str] = None,
                place: Callable[[str, object], object] = lambda path, leaf: leaf,
                progress: bool = False, int8_group_size: int = DEFAULT_INT8_GROUP_SIZE,
                kind: Optional[str] = None, group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """Read any supported checkpoint into the parameter tree (host arrays), one parameter at a
    time, each leaf through `place` before the next is read. kind: the format (detect_format's
    name), when the caller knows it.

    quantize_to="int8" quantises the float matmul weights (QUANTIZABLE) and a tied embedding
    table as they are read, in groups of at most int8_group_size input rows (0: per output
    channel); weights already in int8 stay as they are. quantize_to="int4" stores those
    weights as symmetric int4 in groups of at most group_size rows (quantized_int4), the tied
    table as int8 does.
    """
    _check_quantize(quantize_to, int8_group_size, group_size)
    items = list(lazy_params(directory, config, kind).items())
    if progress:
        items = _param_progress(items)
    params: dict = {}
    for (module, param), lazy in items:
        path, leaf = f"{module}/{param}", _materialised(lazy)
        leaf = quantized_as(quantize_to, path, leaf, config, int8_group_size, group_size)
        params.setdefault(module, {})[param] = place(path, leaf)
    return params


def _param_progress(items):
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety, not a dependency
        return items
    return tqdm(items, desc="loading", unit="param")


def load_params_on_mesh(directory: Path, config: ModelConfig, mesh: Mesh,
                        quantize_to: Optional[str] = None, progress: bool = False,
                        widen_floats_to=None,
                        int8_group_size: int = DEFAULT_INT8_GROUP_SIZE,
                        kind: Optional[str] = None,
                        group_size: int = DEFAULT_GROUP_SIZE,
                        keep_matmul_floats: bool = False) -> dict:
    """Every parameter straight onto the mesh, each process reading only the slices its own
    devices hold, whatever the format. widen_floats_to (e.g. np.float32): float parameters
    stored narrower (bf16, f16) are widened to it as they are read (layout.widen_floats_at_load),
    but for matmul weights and the embedding table with keep_matmul_floats (the CPU panel kernel
    reads them as stored; the engine widens any it does not put in panels).
    quantize_to, int8_group_size and group_size as in load_params. kind: detect_format's
    answer when the caller already has it (it is not asked again). A GGUF layer stack of
    several types stays one stack per type where layout.layer_types_kept says so."""
    _check_quantize(quantize_to, int8_group_size, group_size)
    lazies = lazy_params(directory, config, kind,
                         quantize_to is None and layouts.layer_types_kept())
    items = [(f"{module}/{param}", key, lazy) for key, lazy in lazies.items()
             for module, param in [key]]
    if quantize_to == "int4":  # int8 matmul weights too (quantized_int4)
        items = [(path, key, dequantized_lazy(lazy) if _int8_weight(path, lazy, config)
                  and isinstance(lazy.weight, LazyParam) else lazy)
                 for path, key, lazy in items]
    if quantize_to is not None:
        quantizers = _lazy_quantizers(quantize_to, int8_group_size, group_size)
        items = [(path, key, quantizers[what](path, lazy)
                  if isinstance(lazy, LazyParam) and (what := quantized_kind(path, config))
                  else lazy) for path, key, lazy in items]
    if widen_floats_to is not None:
        def kept(path):  # as stored for the panel kernel: matmul weights and the table
            return keep_matmul_floats and bool(quantized_kind(path, config)
                                               or path == "/".join(EMBEDDINGS))
        items = [(path, key, widened_lazy(lazy, widen_floats_to)
                  if isinstance(lazy, LazyParam) and not kept(path) else lazy)
                 for path, key, lazy in items]
    specs = [leaf_spec(path, lazy, mesh) for path, _, lazy in items]
    bar = _byte_progress(sum(local_bytes(lazy, spec, mesh) for (_, _, lazy), spec
                             in zip(items, specs))) if progress else None
    params: dict = {}
    for ((_, (module, param), lazy), spec) in zip(items, specs):
        before = BYTES_READ.bytes
        params.setdefault(module, {})[param] = place_lazy(lazy, spec, mesh)
        if bar is not None:
            bar.update(BYTES_READ.bytes - before)
    if bar is not None:
        bar.close()
    return params


def _lazy_quantizers(quantize_to: str, int8_group_size: int, group_size: int) -> dict:
    """quantized_kind -> what makes its lazy quantised leaf (as quantized_as does eagerly)."""
    table = lambda path, lazy: quantized_embedding_lazy(lazy, int8_group_size)  # noqa: E731
    if quantize_to == "int4":
        return {"weight": lambda path, lazy: quantized_int4_lazy(_even_rows(path, lazy),
                                                                 group_size),
                "embedding": table}
    return {"weight": lambda path, lazy: quantized_lazy(lazy, int8_group_size),
            "embedding": table}


def local_bytes(lazy, spec, mesh: Mesh) -> int:
    """Bytes of the distinct slices this process's devices hold of one (lazy) parameter."""
    if isinstance(lazy, LayersByType):
        return sum(local_bytes(*pair, mesh) for pair in zip(lazy.stacks, spec.stacks))
    if isinstance(lazy, QuantizedWeight8bit):
        return sum(local_bytes(part, part_spec, mesh) for part, part_spec in
                   ((lazy.weight, spec.weight), (lazy.scales, spec.scales),
                    (lazy.mins, spec.mins)) if part is not None)
    if isinstance(lazy, QuantizedWeight4bit):
        return sum(local_bytes(part, part_spec, mesh) for part, part_spec in
                   ((lazy.packed, spec.packed), (lazy.scales, spec.scales),
                    (lazy.mins, spec.mins)) if part is not None)
    indices = NamedSharding(mesh, spec).addressable_devices_indices_map(lazy.shape).values()
    unique = {tuple((s.start, s.stop) for s in normalize_slices(i, lazy.shape)) for i in indices}
    return sum(int(np.prod([b - a for a, b in box])) for box in unique) * lazy.dtype.itemsize


def normalize_slices(index, shape):
    return as_slices(normalize(index, shape))


def _byte_progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # Bytes read from disk; quantising at load reads whole input rows, so it can pass the total.
    return tqdm(total=total, desc="loading", unit="B", unit_scale=True, unit_divisor=1000)
