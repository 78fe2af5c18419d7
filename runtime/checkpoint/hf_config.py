"""Hugging Face config.json (and generation_config.json's end ids) -> ModelConfig.

The transformer families (Llama 2/3, Mistral, Mixtral) are presets of the one model: pre-norm
only, SiLU-gated FFN, untied or tied head, no soft cap, ...; Mamba-2 is architecture "mamba2"
(models/mamba2.py). Unknown architectures and values are refused naming the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from runtime.checkpoint.generation_config import eos_ids, read_generation_config
from runtime.config import ModelConfig, config_from_dict
from runtime.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
                           "Mamba2ForCausalLM")
# Mamba-2 has no position embeddings and its state is constant in size: sequence_len only bounds
# prompt + output (and the prompt bucket a memory plan assumes); a config file can raise it.
MAMBA2_SEQUENCE_LEN = 1 << 16
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


# ---------------------------------------------------------------------------------------------
# config.json -> ModelConfig

def _first(value):
    return value[0] if isinstance(value, list) and value else value


def _eos_fields(hf: dict, generation: dict, source: str) -> dict:
    """eos_token and extra_eos_tokens from config.json's and generation_config.json's end ids."""
    ids = eos_ids(hf, generation, source)
    return {"eos_token": ids[0] if ids else None, "extra_eos_tokens": tuple(ids[1:])}


# The config.json fields read here, by the JSON type they must have (null: as if absent).
FIELD_TYPES = {
    "an integer": ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers",
                   "vocab_size", "max_position_embeddings", "num_key_value_heads", "head_dim",
                   "num_local_experts", "num_experts_per_tok", "sliding_window", "num_heads",
                   "state_size", "n_groups", "conv_kernel", "chunk_size"),
    "a finite number": ("rms_norm_eps", "rope_theta", "layer_norm_epsilon", "expand"),
    "a string": ("hidden_act",),
    "true or false": ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_bias",
                      "rms_norm", "use_conv_bias", "residual_in_fp32"),
    "an object": ("rope_scaling", "rope_parameters"),
    "a list of strings": ("architectures",),
}


def _has_type(value, wanted: str) -> bool:
    if wanted == "an integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if wanted == "a finite number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value)
    if wanted == "a list of strings":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, {"a string": str, "true or false": bool, "an object": dict}[wanted])


def _check_field_types(hf, source: str) -> None:
    """config.json is an object whose fields have the JSON types this reader converts: each
    problem named by its field, before any conversion can fail less clearly."""
    if not isinstance(hf, dict):
        raise ConfigError(f"{source}: expected a JSON object of config fields, got "
                          f"{type(hf).__name__}")
    for wanted, names in FIELD_TYPES.items():
        for name in names:
            value = hf.get(name)
            if value is not None and not _has_type(value, wanted):
                raise ConfigError(f"{source}: {name} must be {wanted}, got "
                                  f"{_short(value)}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_from_hf(hf: dict, source: str = "config.json",
                   generation: Optional[dict] = None) -> ModelConfig:
    """config.json (and generation_config.json's values, for the end ids) -> ModelConfig; any
    value that cannot be read is a ConfigError naming the file."""
    _check_field_types(hf, source)
    try:
        return _config_from_hf(hf, source, generation or {})
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError,
            ZeroDivisionError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{source}: missing or invalid value ({type(e).__name__}: "
                          f"{_short(str(e))})") from None


def _config_from_hf(hf: dict, source: str, generation: dict) -> ModelConfig:
    architectures = hf.get("architectures") or []
    arch = architectures[0] if architectures else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"{source}: unsupported architecture {arch!r}; supported: "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    if arch == "Mamba2ForCausalLM":
        return mamba2_config_from_hf(hf, source, generation)
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConfigError(f"{source}: {flag}=true is not supported (no bias parameters)")
    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ConfigError(f"{source}: unsupported hidden_act {act!r}; supported: "
                          f"{', '.join(ACTIVATIONS)}")
    try:
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or hidden // heads)
        ffn = int(hf["intermediate_size"])
        layers, vocab = int(hf["num_hidden_layers"]), int(hf["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: missing or invalid {e}") from None
    moe = arch == "MixtralForCausalLM"
    # transformers >= 5 nests rope_theta and the scaling in rope_parameters
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    fields = dict(
        vocab_size=vocab, sequence_len=int(hf.get("max_position_embeddings", 4096)),
        emb_size=hidden, key_size=head_dim, num_q_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads), num_layers=layers,
        widening_factor=ffn / hidden, intermediate_size=ffn,
        num_experts=int(hf.get("num_local_experts", 8)) if moe else 0,
        num_selected_experts=int(hf.get("num_experts_per_tok", 2)) if moe else 0,
        moe_renormalize=moe,
        attn_output_multiplier=head_dim ** -0.5, embedding_multiplier_scale=1.0,
        output_multiplier_scale=1.0, attn_logit_cap=None, sandwich_norms=False,
        activation=ACTIVATIONS[act], tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        pad_token=int(_first(hf.get("pad_token_id")) or 0), **_eos_fields(hf, generation, source),
        bos_token=_first(hf.get("bos_token_id")),
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        sliding_window=hf.get("sliding_window") if arch != "LlamaForCausalLM" else None,
        dtype="float32")
    if rope_type == "llama3":
        fields.update(rope_scaling_factor=float(rope["factor"]),
                      rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]),
                      rope_original_max_len=int(rope["original_max_position_embeddings"]))
    elif rope_type != "default":
        raise ConfigError(f"{source}: unsupported rope type {rope_type!r} (default, llama3)")
    return config_from_dict(fields, source=source)


def mamba2_config_from_hf(hf: dict, source: str = "config.json",
                          generation: Optional[dict] = None) -> ModelConfig:
    """A transformers Mamba2Config (its defaults where a key is absent) as a ModelConfig.

    The transformer fields the dataclass requires get neutral placeholders (key_size 2, one
    query/kv head, no experts, multipliers 1, no soft cap): mamba2.py reads none of them.
    """
    generation = generation or {}
    if hf.get("use_bias"):
        raise ConfigError(f"{source}: use_bias=true is not supported (in_proj/out_proj have no "
                          f"bias parameters)")
    if hf.get("rms_norm", True) is not True:
        raise ConfigError(f"{source}: rms_norm=false (LayerNorm blocks) is not supported")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: unsupported hidden_act {act!r} for Mamba-2; supported: silu")
    try:
        hidden, heads = int(hf["hidden_size"]), int(hf["num_heads"])
        head_dim, expand = int(hf.get("head_dim", 64)), hf.get("expand", 2)
        layers, vocab = int(hf["num_hidden_layers"]), int(hf["vocab_size"])
        # transformers 5 writes an infinite limit as {"__float__": "Infinity"}
        limit = [float(v["__float__"] if isinstance(v, dict) else v)
                 for v in (hf.get("time_step_limit") or (0.0, float("inf")))]
        dt_min, dt_max = limit
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: missing or invalid {e}") from None
    if hidden * expand != heads * head_dim:
        raise ConfigError(f"{source}: hidden_size * expand ({hidden} * {expand}) must equal "
                          f"num_heads * head_dim ({heads} * {head_dim})")
    placeholders = dict(key_size=2, num_q_heads=1, num_kv_heads=1, widening_factor=1.0,
                        num_experts=0, num_selected_experts=0, attn_output_multiplier=1.0,
                        embedding_multiplier_scale=1.0, output_multiplier_scale=1.0,
                        attn_logit_cap=None, sandwich_norms=False)
    fields = dict(
        placeholders, architecture="mamba2", vocab_size=vocab,
        sequence_len=MAMBA2_SEQUENCE_LEN, emb_size=hidden, num_layers=layers,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        pad_token=int(_first(hf.get("pad_token_id")) or 0), **_eos_fields(hf, generation, source),
        bos_token=_first(hf.get("bos_token_id")),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        ssm_state_size=hf.get("state_size", 128), ssm_heads=heads, ssm_head_dim=head_dim,
        ssm_groups=hf.get("n_groups", 8), ssm_conv_kernel=hf.get("conv_kernel", 4),
        ssm_chunk_size=hf.get("chunk_size", 256),
        ssm_conv_bias=bool(hf.get("use_conv_bias", True)),
        ssm_dt_min=dt_min, ssm_dt_max=None if dt_max == float("inf") else dt_max,
        ssm_residual_in_fp32=bool(hf.get("residual_in_fp32", True)), dtype="float32")
    return config_from_dict(fields, source=source)


def read_hf_config(directory: Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path} is not a JSON config ({type(e).__name__})") from None
    return config_from_hf(hf, source=str(path), generation=read_generation_config(directory))
