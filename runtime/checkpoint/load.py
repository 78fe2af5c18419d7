"""One entry point for every checkpoint format: detect it, find its config, read it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

from runtime.checkpoint import grok_ckpt, hf, native
from runtime.config import ModelConfig
from runtime.errors import CheckpointError
from runtime.quant import QuantizedWeight8bit, quantize

FORMATS = ("ckpt-0 (Grok-1)", "Hugging Face (config.json + *.safetensors)",
           f"native ({native.FILE} + config.yaml)")


def detect_format(directory: Path) -> str:
    directory = Path(directory)
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
    """The config a checkpoint carries (HF config.json), if its format has one."""
    if detect_format(directory) == "hf":
        return hf.read_hf_config(directory)
    return None


# Weights that --quantize int8 stores as int8 with per-output-channel scales. The router (tiny,
# and routing is sensitive), norms and embeddings (gathered, not multiplied) stay float.
QUANTIZABLE = re.compile(r"/(multi_head_attention|mlp|moe)/[^/]+/w$|^language_model/unembed/w$")
QUANTIZE_CHOICES = ("int8",)


def load_params(directory: Path, config: ModelConfig, quantize_to: Optional[str] = None,
                place: Callable[[str, object], object] = lambda path, leaf: leaf,
                progress: bool = False) -> dict:
    """Read any supported checkpoint into the parameter tree, each leaf through `place`.

    quantize_to="int8" quantises the float matmul weights (QUANTIZABLE) as they are read;
    weights already in int8 stay as they are.
    """
    if quantize_to not in (None,) + QUANTIZE_CHOICES:
        raise CheckpointError(f"--quantize {quantize_to!r}: supported: "
                              f"{', '.join(QUANTIZE_CHOICES)}")

    def finish(path: str, leaf):
        if quantize_to == "int8" and not isinstance(leaf, QuantizedWeight8bit) \
                and QUANTIZABLE.search(path):
            leaf = quantize(leaf)
        return place(path, leaf)

    kind = detect_format(directory)
    if kind == "hf":
        return hf.read_hf(directory, config, finish, progress)
    if kind == "native":
        return native.read_native(directory, config, finish)
    params = grok_ckpt.read_ckpt0(directory, config, progress=progress)
    return {m: {p: finish(f"{m}/{p}", leaf) for p, leaf in leaves.items()}
            for m, leaves in params.items()}
