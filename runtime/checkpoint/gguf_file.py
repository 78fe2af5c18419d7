"""A GGUF file (llama.cpp's format) opened with the `gguf` package: metadata and memory-mapped
tensors, every malformation a one-line CheckpointError naming the file (and the tensor), and its
metadata as a ModelConfig (through hf_config, as the config.json the converter read).

Families: general.architecture "llama" (Llama 1-3, Mistral: a llama with a sliding window,
Mixtral: a llama with experts); others are refused naming the architecture.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from runtime.checkpoint import hf_config
from runtime.config import ModelConfig
from runtime.errors import CheckpointError, ConfigError

MAGIC = b"GGUF"
ARCHITECTURES = ("llama",)


def is_gguf(path: Path) -> bool:
    """A file that starts with GGUF's magic (whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _reader_class():
    import gguf

    class CheckedReader(gguf.GGUFReader):
        """GGUFReader whose tensor table is checked before the package maps it: an unknown type
        code or data past the end of the file is named by its tensor (the package would fail
        on the first with an anonymous enum error, on the second with a reshape error)."""

        def _get(self, offset, dtype, count=1, override_order=None):
            # the package's _get, slicing a plain ndarray view of the map: a memmap slice runs
            # Python (__array_finalize__) each time, and the header takes one or two per
            # vocabulary entry (most of a big vocabulary's header; BENCHMARKS.md, "Loading on
            # every core"). The tensors' data are such views too.
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            dtype, count = np.dtype(dtype), int(count)
            values = plain[offset:offset + dtype.itemsize * count].view(dtype)[:count]
            order = self.byte_order if override_order is None else override_order
            return values.view(values.dtype.newbyteorder(order))

        def _build_tensors(self, start_offs, fields):
            known = {int(t) for t in gguf.GGMLQuantizationType}
            size = len(self.data)
            for field in fields:
                _, name, _, dims, raw_type, offset = field.parts
                name = bytes(name).decode("utf-8", "replace")
                code = int(raw_type[0])
                if code not in known:
                    raise CheckpointError(f"tensor {name}: unknown GGML type code {code}")
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(code)]
                count = int(np.prod(dims.astype(object)))
                if int(dims[0]) % block:
                    raise CheckpointError(f"tensor {name}: {int(dims[0])} values per row is "
                                          f"not a whole number of {block}-value blocks")
                end = int(start_offs) + int(offset[0]) + count // block * type_size
                if end > size:
                    raise CheckpointError(f"tensor {name}: data ends at byte {end}, past the "
                                          f"end of the file ({size} bytes): truncated?")
            return super()._build_tensors(start_offs, fields)

    return CheckedReader


@functools.lru_cache(maxsize=4)
def _open(path: str, mtime: float, size: int):
    try:
        return _reader_class()(path, "r")
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, OSError,
            TypeError) as e:  # the package's own checks, or reads past the end of the map
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable GGUF file ({first[:200]}; truncated or "
                              f"corrupt?)") from None


def open_gguf(path):
    """The file's GGUFReader (memory-mapped; cached per path, size and modification time, so
    the config, tokenizer and weights share one parse)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    return _open(str(path), stat.st_mtime, stat.st_size)


_MISSING = object()


def meta(reader, key: str, default=_MISSING, kind=None):
    """Metadata value `key` (arrays as lists); `kind` (a type or tuple) is checked."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise CheckpointError(f"{reader.data.filename}: metadata {key} is missing")
        return default
    try:
        value = field.contents()
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{reader.data.filename}: metadata {key} cannot be read "
                              f"({type(e).__name__})") from None
    if kind is not None and not (isinstance(value, kind) and not
                                 (isinstance(value, bool) and kind in (int, float))):
        raise CheckpointError(f"{reader.data.filename}: metadata {key} has the wrong type "
                              f"({type(value).__name__})")
    return value


def architecture(reader) -> str:
    arch = meta(reader, "general.architecture", kind=str)
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{reader.data.filename}: unsupported GGUF architecture {arch!r}; "
                              f"supported: {', '.join(ARCHITECTURES)} (Llama, Mistral, Mixtral)")
    return arch


def _number(reader, key: str, default=_MISSING):
    value = meta(reader, key, default, (int, float))
    # float32 metadata (1e-5 stored as 9.99999975e-06): the shortest decimal that is the same
    # float32, i.e. the value the converter read from config.json
    return float(str(np.float32(value))) if isinstance(value, float) else value


def _hf_fields(reader, arch: str) -> dict:
    """The config.json fields the metadata gives, under config.json's names."""
    a = arch + "."
    tokens = meta(reader, "tokenizer.ggml.tokens", None, list)
    vocab = _number(reader, a + "vocab_size", None) or (len(tokens) if tokens else None)
    if vocab is None:
        raise CheckpointError(f"{reader.data.filename}: neither {a}vocab_size nor "
                              f"tokenizer.ggml.tokens gives the vocabulary size")
    hidden = _number(reader, a + "embedding_length")
    heads = _number(reader, a + "attention.head_count")
    experts = _number(reader, a + "expert_count", 0)
    window = _number(reader, a + "attention.sliding_window", None)
    names = {n for t in reader.tensors for n in [t.name]}
    fields = dict(
        architectures=["MixtralForCausalLM" if experts else
                       "MistralForCausalLM" if window else "LlamaForCausalLM"],
        hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=_number(reader, a + "attention.head_count_kv", heads),
        head_dim=_number(reader, a + "attention.key_length", None),
        intermediate_size=_number(reader, a + "expert_feed_forward_length", None) if experts
        else None, num_hidden_layers=_number(reader, a + "block_count"), vocab_size=vocab,
        max_position_embeddings=_number(reader, a + "context_length", 4096),
        rms_norm_eps=_number(reader, a + "attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=_number(reader, a + "rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in names, sliding_window=window,
        bos_token_id=_number(reader, "tokenizer.ggml.bos_token_id", None),
        pad_token_id=_number(reader, "tokenizer.ggml.padding_token_id", None))
    fields["intermediate_size"] = fields["intermediate_size"] or \
        _number(reader, a + "feed_forward_length")
    if experts:
        fields.update(num_local_experts=experts,
                      num_experts_per_tok=_number(reader, a + "expert_used_count", 2))
    # end ids: EOS, then the end-of-turn / end-of-message ids instruct models stop at
    ends = [_number(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    fields["eos_token_id"] = list(dict.fromkeys(i for i in ends if i is not None)) or None
    return {k: v for k, v in fields.items() if v is not None}


# Llama 3.x files carry their RoPE scaling as this tensor: a divisor per frequency [H/2]
ROPE_FREQS = "rope_freqs.weight"


def _check_rope(reader, arch: str, fields: dict) -> tuple:
    """Only the RoPE the model has: over the whole head, plain or with Llama-3 scaling given as
    the rope_freqs tensor (returned: its factors, () when absent); GGUF's linear/YaRN scaling
    types are refused by name."""
    path, a = reader.data.filename, arch + "."
    scaling = meta(reader, a + "rope.scaling.type", "none", str)
    if scaling != "none":
        raise CheckpointError(f"{path}: {a}rope.scaling.type {scaling!r} is not supported "
                              f"(only unscaled RoPE and rope_freqs factors are read from GGUF)")
    head_dim = fields.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"]
    rope_dim = _number(reader, a + "rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise CheckpointError(f"{path}: {a}rope.dimension_count {rope_dim} is not the head size "
                              f"{head_dim} (partial RoPE is not supported)")
    tensor = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    if tensor is None:
        return ()
    if tensor.tensor_type.name != "F32" or tuple(int(n) for n in tensor.shape) != (head_dim // 2,):
        raise CheckpointError(f"{path}: tensor {ROPE_FREQS} must be F32 [{head_dim // 2}] "
                              f"(one factor per RoPE frequency), got "
                              f"{tensor.tensor_type.name} {[int(n) for n in tensor.shape]}")
    return tuple(float(f) for f in np.asarray(tensor.data, np.float32).reshape(-1))


def gguf_config(path) -> ModelConfig:
    """The model config a GGUF file's metadata describes; errors name the file and key."""
    reader = open_gguf(path)
    arch = architecture(reader)
    fields = _hf_fields(reader, arch)
    factors = _check_rope(reader, arch, fields)
    try:
        config = hf_config.config_from_hf(fields, source=f"{path} (GGUF metadata)")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    try:
        return config.replace(rope_freq_factors=factors) if factors else config
    except ConfigError as e:
        raise CheckpointError(f"{path}: tensor {ROPE_FREQS}: {e}") from None
