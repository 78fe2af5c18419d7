"""Model configuration: one frozen dataclass, named presets in configs/, strict file loading.

Field names follow the Grok-1 reference so that its config reads unchanged. Presets are plain YAML
files in `configs/`, looked up by exact name; any other value of `--config` is a path to a YAML or
JSON file with the same field names. Unknown keys and impossible values raise ConfigError.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from runtime.errors import ConfigError, listed

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
ACTIVATION_DTYPES = ("float32", "bfloat16")
KV_DTYPES = ("float32", "bfloat16", "float16")  # --kv-dtype
ACTIVATIONS = ("gelu_tanh", "silu", "relu_squared")
ARCHITECTURES = ("transformer", "mamba2", "palm")
NORM_TYPES = ("rms", "layer")


# --quantize int8: input rows per int8 scale (--int8-group-size; 0 = one scale per output
# channel), chosen by measurement (BENCHMARKS.md, "Group-wise int8").
DEFAULT_INT8_GROUP_SIZE = 64
# --prefill-chunk: prompts longer than this are prefilled in chunks of this many tokens between
# the other rows' decode steps (scheduler.py): a long newcomer delays each step by one chunk,
# not by its whole prompt (BENCHMARKS.md, "Chunked prefill"). 0: whole prompts.
DEFAULT_PREFILL_CHUNK = 512

@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    sequence_len: int
    emb_size: int
    key_size: int
    num_q_heads: int
    num_kv_heads: int
    num_layers: int
    widening_factor: float
    num_experts: int
    num_selected_experts: int
    attn_output_multiplier: float
    embedding_multiplier_scale: float
    output_multiplier_scale: float
    pad_token: int = 0  # fills prompt buckets; never attended to
    eos_token: Optional[int] = 2  # None: generation stops only at a length limit
    # further end ids: generation stops at any of them too (Llama-3 instruct lists several:
    # <|end_of_text|>, <|eom_id|>, <|eot_id|>); see eos_tokens
    extra_eos_tokens: tuple = ()
    bos_token: Optional[int] = 1
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    attn_logit_cap: Optional[float] = 30.0  # tanh soft cap cap * tanh(x / cap); None = off
    dtype: str = "bfloat16"  # activation dtype; weights keep their own (float32 or int8)
    # KV memory dtype (None: the activation dtype): a 2-byte one under float32 activations halves
    # the memory a slot's context holds and the bytes a decode step's attention reads
    kv_dtype: Optional[str] = None
    # Family features beyond Grok-1 (defaults are Grok-1's):
    activation: str = "gelu_tanh"  # of the gated FFN: act(x @ linear) * (x @ linear_v)
    sandwich_norms: bool = True  # also normalise the attention and FFN outputs (Grok-1)
    tie_embeddings: bool = True  # output head = embeddings^T; else its own unembed/w [D, V]
    intermediate_size: Optional[int] = None  # FFN width F; None derives it from widening_factor
    moe_renormalize: bool = False  # renormalise the top-k gates to sum to 1 (Mixtral)
    sliding_window: Optional[int] = None  # a query sees keys less than this many positions back
    # Llama-3 RoPE frequency scaling (None = off), as in Meta's / HF's "llama3" rope type
    rope_scaling_factor: Optional[float] = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    # Per-frequency divisors of the RoPE inverse frequencies [key_size / 2] (a GGUF file's
    # rope_freqs tensor: llama.cpp's form of Llama-3 scaling); () = none
    rope_freq_factors: tuple = ()
    # Block options (PaLM and later checkpoints):
    norm_type: str = "rms"  # "rms" (RMSNorm) or "layer" (bias-free LayerNorm: centred, scaled)
    parallel_block: bool = False  # x + attn(norm(x)) + ffn(norm(x)): one norm, one residual add
    qk_norm: bool = False  # RMSNorm over the head dim of each query and key head, before RoPE
    gated_ffn: bool = True  # act(x W) * (x V) then W_1; False: act(x W) W_1 (no linear_v)
    recursion_steps: int = 1  # the layer stack is applied this many times (shared weights)
    # Architecture: "transformer" (everything above), "mamba2" (state-space layers; the
    # attention/FFN fields are then unused and the ssm_* fields below describe the mixer) or
    # "palm" (models/palm.py: heads, key_size, rope_base and the Palm fields below).
    architecture: str = "transformer"
    ssm_state_size: int = 128  # N: state size per head
    ssm_heads: int = 1  # number of SSM heads; intermediate width I = ssm_heads * ssm_head_dim
    ssm_head_dim: int = 64  # P
    ssm_groups: int = 1  # G: B/C projections shared by ssm_heads / G heads each
    ssm_conv_kernel: int = 4  # W: causal depthwise convolution width
    ssm_chunk_size: int = 256  # chunk length of the SSD prefill algorithm
    ssm_conv_bias: bool = True  # the depthwise convolution has a bias per channel
    ssm_dt_min: float = 0.0  # time-step limit: dt = softplus(...) clamped to [min, max]
    ssm_dt_max: Optional[float] = None  # None: no upper limit (HF time_step_limit (0, inf))
    ssm_residual_in_fp32: bool = True  # the residual stream stays float32 with bf16 activations
    ssm_norm_before_gate: bool = False  # norm(y) * silu(z); False: norm(y * silu(z)) (Mamba-2)
    # Palm (architecture "palm", models/palm.py): Attention On Detail blocks over factorized
    # linears of rank low_rank (its d_rank; None for every other family), each of the
    # num_layers blocks applied block_repeats times in a row (its d_layer: b1 b1 b2 b2)
    # before the next; recursion_steps still repeats the whole stack (b1 b2 b1 b2).
    low_rank: Optional[int] = None
    block_repeats: int = 1

    def __post_init__(self):
        for name in ("extra_eos_tokens", "rope_freq_factors"):  # lists, as YAML/JSON give them
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = list(_problems(self))
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    @property
    def ffn_size(self) -> int:
        """FFN hidden width F: given, or as the Grok-1 reference derives it (2/3 of the widened
        width, rounded up to a multiple of 8)."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        size = int(self.widening_factor * self.emb_size) * 2 // 3
        return size + (-size) % 8

    @property
    def eos_tokens(self) -> tuple[int, ...]:
        """Every id that ends a generated sequence: eos_token, then extra_eos_tokens."""
        first = () if self.eos_token is None else (self.eos_token,)
        return first + tuple(t for t in self.extra_eos_tokens if t not in first)

    @property
    def q_per_kv(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def replace(self, **changes: Any) -> "ModelConfig":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown config field(s): {listed(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 \
        and math.isfinite(value)


def _problems(c: ModelConfig):
    """Every problem of a config, one message each, in a fixed order."""
    for group in (_size_problems, _ssm_problems, _choice_problems, _shape_problems,
                  _palm_problems, _token_problems):
        yield from group(c)


def _size_problems(c: ModelConfig):
    for name in ("vocab_size", "sequence_len", "emb_size", "key_size", "num_q_heads",
                 "num_kv_heads", "num_layers", "rope_original_max_len"):
        value = getattr(c, name)
        if not _positive_int(value):
            yield f"{name} must be a positive integer, got {value!r}"
    for name in ("num_experts", "num_selected_experts"):  # 0 experts: a dense FFN
        value = getattr(c, name)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            yield f"{name} must be an integer >= 0, got {value!r}"
    for name in ("widening_factor", "attn_output_multiplier", "embedding_multiplier_scale",
                 "output_multiplier_scale", "rope_base", "norm_eps", "rope_low_freq_factor",
                 "rope_high_freq_factor"):
        value = getattr(c, name)
        if not _positive_number(value):
            yield f"{name} must be a positive finite number, got {value!r}"
    yield from _rope_factor_problems(c)
    for name in ("attn_logit_cap", "rope_scaling_factor"):
        value = getattr(c, name)
        if value is not None and not _positive_number(value):
            yield f"{name} must be a positive finite number or null, got {value!r}"
    for name in ("intermediate_size", "sliding_window"):
        value = getattr(c, name)
        if value is not None and not _positive_int(value):
            yield f"{name} must be a positive integer or null, got {value!r}"


def _ssm_problems(c: ModelConfig):
    for name in ("ssm_state_size", "ssm_heads", "ssm_head_dim", "ssm_groups", "ssm_conv_kernel",
                 "ssm_chunk_size", "recursion_steps"):
        value = getattr(c, name)
        if not _positive_int(value):
            yield f"{name} must be a positive integer, got {value!r}"
    if _positive_int(c.ssm_heads) and _positive_int(c.ssm_groups) and c.ssm_heads % c.ssm_groups:
        yield f"ssm_heads ({c.ssm_heads}) must be a multiple of ssm_groups ({c.ssm_groups})"
    if _positive_int(c.ssm_conv_kernel) and c.ssm_conv_kernel < 2:
        yield f"ssm_conv_kernel must be at least 2 (a convolution state), got {c.ssm_conv_kernel}"
    for name in ("ssm_conv_bias", "ssm_residual_in_fp32", "ssm_norm_before_gate"):
        if not isinstance(getattr(c, name), bool):
            yield f"{name} must be true or false, got {getattr(c, name)!r}"
    dt_min_ok = isinstance(c.ssm_dt_min, (int, float)) and not isinstance(c.ssm_dt_min, bool) \
        and math.isfinite(c.ssm_dt_min) and c.ssm_dt_min >= 0
    if not dt_min_ok:
        yield f"ssm_dt_min must be a finite number >= 0, got {c.ssm_dt_min!r}"
    if c.ssm_dt_max is not None:
        if not _positive_number(c.ssm_dt_max):
            yield f"ssm_dt_max must be a positive finite number or null, got {c.ssm_dt_max!r}"
        elif dt_min_ok and c.ssm_dt_max <= c.ssm_dt_min:
            yield f"ssm_dt_max ({c.ssm_dt_max}) must exceed ssm_dt_min ({c.ssm_dt_min})"


def _choice_problems(c: ModelConfig):
    for name, allowed in (("architecture", ARCHITECTURES), ("norm_type", NORM_TYPES)):
        if getattr(c, name) not in allowed:
            yield f"{name} must be one of {', '.join(allowed)}, got {getattr(c, name)!r}"
    for name in ("sandwich_norms", "tie_embeddings", "moe_renormalize", "parallel_block",
                 "qk_norm", "gated_ffn"):
        if not isinstance(getattr(c, name), bool):
            yield f"{name} must be true or false, got {getattr(c, name)!r}"


def _shape_problems(c: ModelConfig):
    if _positive_int(c.num_q_heads) and _positive_int(c.num_kv_heads) \
            and c.num_q_heads % c.num_kv_heads:
        yield (f"num_q_heads ({c.num_q_heads}) must be a multiple of num_kv_heads "
               f"({c.num_kv_heads})")
    if isinstance(c.key_size, int) and c.key_size % 2:
        yield f"key_size must be even for rotary embeddings, got {c.key_size}"
    if isinstance(c.num_selected_experts, int) and isinstance(c.num_experts, int):
        if c.num_selected_experts > c.num_experts:
            yield (f"num_selected_experts ({c.num_selected_experts}) exceeds num_experts "
                   f"({c.num_experts})")
        elif c.num_experts > 0 and c.num_selected_experts < 1:
            yield "num_selected_experts must be >= 1 when num_experts > 0"


def _palm_problems(c: ModelConfig):
    if not _positive_int(c.block_repeats):
        yield f"block_repeats must be a positive integer, got {c.block_repeats!r}"
    if c.architecture != "palm":
        if c.low_rank is not None:
            yield f"low_rank is a field of architecture palm only, got {c.low_rank!r}"
        if c.block_repeats != 1:
            yield f"block_repeats is a field of architecture palm only, got {c.block_repeats!r}"
        return
    if not _positive_int(c.low_rank):
        yield f"low_rank must be a positive integer for architecture palm, got {c.low_rank!r}"
    if isinstance(c.key_size, int) and c.key_size % 4:
        # half the head rotates at H/4 frequencies, the other half at zero frequency
        yield f"key_size must be a multiple of 4 for Palm's rotary, got {c.key_size}"
    if c.num_kv_heads != c.num_q_heads:
        yield (f"num_kv_heads ({c.num_kv_heads}) must equal num_q_heads ({c.num_q_heads}) "
               f"for architecture palm")


def _rope_factor_problems(c: ModelConfig):
    factors = c.rope_freq_factors
    if not isinstance(factors, tuple) or not all(map(_positive_number, factors)):
        yield f"rope_freq_factors must be a list of positive finite numbers, got {factors!r}"
    elif factors and isinstance(c.key_size, int) and len(factors) != c.key_size // 2:
        yield (f"rope_freq_factors has {len(factors)} values; the head size {c.key_size} has "
               f"{c.key_size // 2} RoPE frequencies")
    elif factors and c.rope_scaling_factor is not None:
        yield "rope_freq_factors and rope_scaling_factor are two forms of one scaling: set one"


def _token_problems(c: ModelConfig):
    vocab = c.vocab_size if isinstance(c.vocab_size, int) else 0
    for name in ("pad_token", "eos_token", "bos_token"):
        value = getattr(c, name)
        if value is None and name != "pad_token":
            continue
        if not isinstance(value, int) or not 0 <= value < vocab:
            yield f"{name} must be a token id in [0, vocab_size), got {value!r}"
    if not isinstance(c.extra_eos_tokens, tuple):
        yield f"extra_eos_tokens must be a list of token ids, got {c.extra_eos_tokens!r}"
    else:
        for value in c.extra_eos_tokens:
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab:
                yield f"extra_eos_tokens: {value!r} is not a token id in [0, vocab_size)"
    if c.dtype not in ACTIVATION_DTYPES:
        yield f"dtype must be one of {', '.join(ACTIVATION_DTYPES)}, got {c.dtype!r}"
    if c.kv_dtype is not None and c.kv_dtype not in KV_DTYPES:
        yield f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {c.kv_dtype!r}"
    elif c.kv_dtype is not None and c.architecture != "transformer":
        # Mamba-2 keeps a state, Palm a float32 sum: neither has keys and values
        yield f"kv_dtype is a field of architecture transformer only (no KV memory in " \
              f"{c.architecture!r}), got {c.kv_dtype!r}"
    if c.activation not in ACTIVATIONS:
        yield f"activation must be one of {', '.join(ACTIVATIONS)}, got {c.activation!r}"


def with_dtypes(config: ModelConfig, dtype: Optional[str],
                kv_dtype: Optional[str]) -> ModelConfig:
    """config with the flags --dtype and --kv-dtype applied (None: the config's)."""
    if dtype:
        config = config.replace(dtype=dtype)
    if kv_dtype:
        if config.architecture != "transformer":
            raise ConfigError(f"--kv-dtype: architecture {config.architecture!r} keeps no KV "
                              f"memory (a constant-size state instead)")
        config = config.replace(kv_dtype=kv_dtype)
    return config


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def config_from_dict(values: Mapping[str, Any], source: str = "config") -> ModelConfig:
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: expected a mapping of config fields, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(str(k) for k in set(values) - set(fields))  # YAML keys may be bool/int
    if unknown:
        raise ConfigError(f"{source}: unknown config key(s): {listed(unknown)}")
    missing = sorted(n for n, f in fields.items()
                     if f.default is dataclasses.MISSING and n not in values)
    if missing:
        raise ConfigError(f"{source}: missing config key(s): {listed(missing)}")
    try:
        return ModelConfig(**values)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def read_config_file(path: Path) -> ModelConfig:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:] or 'YAML'}: {first}") \
            from None
    return config_from_dict(values, source=str(path))


def load_config(name_or_path: str | Path, **overrides: Any) -> ModelConfig:
    """A preset by exact name (configs/NAME.yaml), else a YAML/JSON file path; then overrides."""
    name = str(name_or_path)
    path = Path(name)
    if path.is_file():
        config = read_config_file(path)
    elif (PRESET_DIR / f"{name}.yaml").is_file() and "/" not in name:
        config = read_config_file(PRESET_DIR / f"{name}.yaml")
    else:
        raise ConfigError(f"--config {name!r} is neither a preset ({', '.join(preset_names())}) "
                          f"nor an existing YAML/JSON file")
    return config.replace(**overrides) if overrides else config


def save_config(config: ModelConfig, path: Path) -> None:
    values = config.to_dict()
    for name in ("extra_eos_tokens", "rope_freq_factors"):  # plain YAML, no tuple tag
        values[name] = list(values[name])
    path.write_text(yaml.safe_dump(values, sort_keys=False))
