"""Hugging Face checkpoints (Llama 2/3, Mistral, Mixtral, Mamba-2): config.json and safetensors.

`config_from_hf` turns a config.json into a ModelConfig (the transformer families are presets of
the one model: pre-norm only, SiLU-gated FFN, untied or tied head, no soft cap, ...; Mamba-2 is
architecture "mamba2", see mamba2.py). `read_hf` fills the parameter tree from the safetensors
shards through `HF_RULES` (or `MAMBA2_RULES`), a declarative table from tensor names to our
parameter paths with a named transform each. Every tensor must match one
rule and every parameter must be filled; shapes are checked against the abstract parameter tree
from the file headers before any data is read; all problems are reported together.

Tensors are read lazily (memory-mapped) and each parameter is assembled, optionally quantised
and handed to `place` (e.g. put on its devices) before the next one is read, so host memory
holds about one stacked parameter at a time, never the whole checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np

from runtime.checkpoint.generation_config import eos_ids, read_generation_config
from runtime.checkpoint.lazy import BYTES_READ, LazyParam, as_slices, normalize
from runtime.checkpoint.params_tree import format_shape, logical_shapes
from runtime.checkpoint.safetensors_io import SafetensorsFile
from runtime.config import ModelConfig, config_from_dict
from runtime.errors import CheckpointError, ConfigError
from runtime.paths import MAMBA_STACKED, STACKED

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
                           "Mamba2ForCausalLM")
LAYER = STACKED
MAMBA_LAYER = MAMBA_STACKED
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


def config_from_hf(hf: dict, source: str = "config.json",
                   generation: Optional[dict] = None) -> ModelConfig:
    """config.json (and generation_config.json's values, for the end ids) -> ModelConfig."""
    generation = generation or {}
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
        hf = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    return config_from_hf(hf, source=str(path), generation=read_generation_config(directory))


# ---------------------------------------------------------------------------------------------
# tensor names -> parameter paths

def _transpose(a):  # HF Linear stores [out, in]; ours is [in, out]
    return np.swapaxes(a, -1, -2)


def _first_half_transposed(a):  # fused gate_up_proj [E, 2F, D]: gate rows first
    return _transpose(a[..., :a.shape[-2] // 2, :])


def _second_half_transposed(a):
    return _transpose(a[..., a.shape[-2] // 2:, :])


def _halve_rows_then_transpose(shape):
    return (*shape[:-2], shape[-1], shape[-2] // 2)


TRANSFORMS = {  # name -> (array function, source shape -> result shape)
    "copy": (lambda a: a, lambda s: tuple(s)),
    "transpose": (_transpose, lambda s: (*s[:-2], s[-1], s[-2])),
    "gate_half": (_first_half_transposed, _halve_rows_then_transpose),
    "up_half": (_second_half_transposed, _halve_rows_then_transpose),
}


class Rule(NamedTuple):
    pattern: str  # full-match regex; (?P<layer>) and (?P<expert>) pick the stacked position
    module: str
    param: str
    transform: str


_L = r"model\.layers\.(?P<layer>\d+)\."
HF_RULES = (
    Rule(r"model\.embed_tokens\.weight", "language_model/in_out_embed", "embeddings", "copy"),
    Rule(r"model\.norm\.weight", "language_model/rms_norm", "scale", "copy"),
    Rule(r"lm_head\.weight", "language_model/unembed", "w", "transpose"),
    Rule(_L + r"self_attn\.q_proj\.weight", LAYER + "multi_head_attention/query", "w", "transpose"),
    Rule(_L + r"self_attn\.k_proj\.weight", LAYER + "multi_head_attention/key", "w", "transpose"),
    Rule(_L + r"self_attn\.v_proj\.weight", LAYER + "multi_head_attention/value", "w", "transpose"),
    Rule(_L + r"self_attn\.o_proj\.weight", LAYER + "multi_head_attention/linear", "w",
         "transpose"),
    Rule(_L + r"input_layernorm\.weight", LAYER + "rms_norm", "scale", "copy"),
    Rule(_L + r"post_attention_layernorm\.weight", LAYER + "rms_norm_2", "scale", "copy"),
    # dense FFN (Llama, Mistral)
    Rule(_L + r"mlp\.gate_proj\.weight", LAYER + "mlp/linear", "w", "transpose"),
    Rule(_L + r"mlp\.up_proj\.weight", LAYER + "mlp/linear_v", "w", "transpose"),
    Rule(_L + r"mlp\.down_proj\.weight", LAYER + "mlp/linear_1", "w", "transpose"),
    # Mixtral, one tensor per expert (the layout of the released checkpoints)
    Rule(_L + r"block_sparse_moe\.gate\.weight", LAYER + "router", "w", "transpose"),
    Rule(_L + r"block_sparse_moe\.experts\.(?P<expert>\d+)\.w1\.weight", LAYER + "moe/linear",
         "w", "transpose"),
    Rule(_L + r"block_sparse_moe\.experts\.(?P<expert>\d+)\.w3\.weight", LAYER + "moe/linear_v",
         "w", "transpose"),
    Rule(_L + r"block_sparse_moe\.experts\.(?P<expert>\d+)\.w2\.weight", LAYER + "moe/linear_1",
         "w", "transpose"),
    # Mixtral, fused experts (transformers >= 5 in memory): gate_up_proj [E, 2F, D] holds the
    # gate rows then the up rows; down_proj [E, D, F]
    Rule(_L + r"mlp\.gate\.weight", LAYER + "router", "w", "transpose"),
    Rule(_L + r"mlp\.experts\.gate_up_proj", LAYER + "moe/linear", "w", "gate_half"),
    Rule(_L + r"mlp\.experts\.gate_up_proj", LAYER + "moe/linear_v", "w", "up_half"),
    Rule(_L + r"mlp\.experts\.down_proj", LAYER + "moe/linear_1", "w", "transpose"),
)
# Mamba2ForCausalLM: in_proj [2I + 2GN + H, D] holds the z, x, B, C, dt rows in that order, and
# the depthwise conv1d [I + 2GN, 1, W] (and its bias) the x, B, C channels: row-slicing
# transforms (see mamba2_transforms) give each part its own parameter.
_M = r"backbone\.layers\.(?P<layer>\d+)\.mixer\."
MAMBA2_RULES = (
    Rule(r"backbone\.embeddings?\.weight", "language_model/in_out_embed", "embeddings", "copy"),
    Rule(r"backbone\.norm_f\.weight", "language_model/rms_norm", "scale", "copy"),
    Rule(r"lm_head\.weight", "language_model/unembed", "w", "transpose"),
    Rule(r"backbone\.layers\.(?P<layer>\d+)\.norm\.weight", MAMBA_LAYER + "rms_norm", "scale",
         "copy"),
    *(Rule(_M + r"in_proj\.weight", MAMBA_LAYER + f"mixer/in_proj_{part}", "w", f"in_proj_{part}")
      for part in ("z", "x", "b", "c", "dt")),
    *(Rule(_M + r"conv1d\.weight", MAMBA_LAYER + f"mixer/conv_{part}", "w", f"conv_{part}")
      for part in ("x", "b", "c")),
    *(Rule(_M + r"conv1d\.bias", MAMBA_LAYER + f"mixer/conv_{part}", "b", f"conv_bias_{part}")
      for part in ("x", "b", "c")),
    Rule(_M + r"dt_bias", MAMBA_LAYER + "mixer", "dt_bias", "copy"),
    Rule(_M + r"A_log", MAMBA_LAYER + "mixer", "a_log", "copy"),
    Rule(_M + r"D", MAMBA_LAYER + "mixer", "d", "copy"),
    Rule(_M + r"norm\.weight", MAMBA_LAYER + "mixer/gated_rms_norm", "scale", "copy"),
    Rule(_M + r"out_proj\.weight", MAMBA_LAYER + "mixer/out_proj", "w", "transpose"),
)
IGNORED = (r".*rotary_emb\.inv_freq",)  # buffers some exporters save; recomputed from config


def mamba2_transforms(config: ModelConfig) -> dict:
    """The Mamba-2 row slices of in_proj and conv1d for this config's sizes (a source of any
    other size is passed through whole, so that its shape is reported as not matching)."""
    inner = config.ssm_heads * config.ssm_head_dim
    bc = config.ssm_groups * config.ssm_state_size
    in_proj = dict(z=(0, inner), x=(inner, 2 * inner), b=(2 * inner, 2 * inner + bc),
                   c=(2 * inner + bc, 2 * inner + 2 * bc),
                   dt=(2 * inner + 2 * bc, 2 * inner + 2 * bc + config.ssm_heads))
    conv = dict(x=(0, inner), b=(inner, inner + bc), c=(inner + bc, inner + 2 * bc))
    rows, channels = 2 * inner + 2 * bc + config.ssm_heads, inner + 2 * bc
    table = {}
    for part, (start, stop) in in_proj.items():  # [rows, D] -> [D, stop - start]
        table[f"in_proj_{part}"] = (
            lambda a, start=start, stop=stop: _transpose(a[start:stop]),
            lambda s, n=stop - start: (s[1], n) if len(s) == 2 and s[0] == rows
            else (*s[:-2], s[-1], s[-2]))
    for part, (start, stop) in conv.items():  # [channels, 1, W] -> [W, stop - start]
        table[f"conv_{part}"] = (
            lambda a, start=start, stop=stop: _transpose(a[start:stop, 0, :]),
            lambda s, n=stop - start: (s[2], n) if len(s) == 3 and s[:2] == (channels, 1)
            else tuple(s))
        table[f"conv_bias_{part}"] = (
            lambda a, start=start, stop=stop: a[start:stop],
            lambda s, n=stop - start: (n,) if tuple(s) == (channels,) else tuple(s))
    return table


def transforms_for(config: ModelConfig) -> dict:
    return {**TRANSFORMS, **mamba2_transforms(config)} if config.architecture == "mamba2" \
        else TRANSFORMS


def rules_for(config: ModelConfig) -> tuple:
    return MAMBA2_RULES if config.architecture == "mamba2" else HF_RULES


class Piece(NamedTuple):
    file: SafetensorsFile
    name: str
    transform: str
    index: tuple  # position in the stacked parameter: (), (layer,) or (layer, expert)


def _shards(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index} is not a safetensors index (no weight_map)") \
                from None
        files = sorted({directory / f for f in weight_map.values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} holds no *.safetensors files")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{missing[0]}: listed in the index but missing")
    return files


def _stack_depth(module: str, param: str) -> int:
    """Leading stacked axes of a parameter: layers, and experts for the MoE weights."""
    if module.startswith(MAMBA_LAYER):
        return 1
    if not module.startswith(LAYER):
        return 0
    return 2 if module.startswith(LAYER + "moe/") else 1


def plan_hf(directory: Path, config: ModelConfig) -> dict:
    """(module, param) -> [Piece]: where every parameter comes from, all checked on headers."""
    shapes = logical_shapes(config)
    files = [SafetensorsFile(path) for path in _shards(Path(directory))]
    rules_table, transforms = rules_for(config), transforms_for(config)
    plan: dict = {key: [] for key in shapes}
    problems = []
    for f in files:
        for name in f.keys():
            if any(re.fullmatch(p, name) for p in IGNORED):
                continue
            if name == "lm_head.weight" and config.tie_embeddings:
                continue  # some exporters save the tied head too
            rules = [(r, m) for r in rules_table if (m := re.fullmatch(r.pattern, name))]
            if not rules:
                problems.append(f"{name} ({f.path.name}): no parameter of the model takes it")
                continue
            for rule, match in rules:
                key = (rule.module, rule.param)
                if key not in shapes:
                    problems.append(f"{name}: maps to {rule.module}/{rule.param}, which this "
                                    f"config does not have")
                    continue
                groups = match.groupdict()
                index = tuple(int(groups[g]) for g in ("layer", "expert") if groups.get(g))
                depth = _stack_depth(*key)
                full = shapes[key]
                want = full[len(index):]
                got = transforms[rule.transform][1](tuple(f.shape(name)))
                if any(i >= n for i, n in zip(index, full)):
                    problems.append(f"{name}: index {list(index)} beyond {format_shape(full)} of "
                                    f"{rule.module}/{rule.param}")
                elif tuple(got) != tuple(want) or len(index) > depth:
                    problems.append(f"{name} ({f.path.name}): {format_shape(f.shape(name))} gives "
                                    f"{format_shape(got)}, {rule.module}/{rule.param} needs "
                                    f"{format_shape(want)}")
                else:
                    plan[key].append(Piece(f, name, rule.transform, index))
    for key, pieces in plan.items():
        depth = _stack_depth(*key)
        full = shapes[key]
        covered = np.zeros(full[:depth], dtype=np.int32)
        for piece in pieces:
            covered[piece.index] += 1
        where = "/".join(key)
        if (covered == 0).any():
            first = tuple(int(i) for i in np.argwhere(covered == 0)[0])
            problems.append(f"{where}: not filled ({int((covered == 0).sum())} of "
                            f"{covered.size} slices missing, first at {list(first)})")
        if (covered > 1).any():
            problems.append(f"{where}: filled more than once (duplicate tensors)")
    if problems:
        count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
        raise CheckpointError("\n  ".join([f"checkpoint {directory} does not match the model "
                                           f"config ({count}):"] + problems))
    return plan


def _lazy_param(full: tuple, pieces: list, transforms: dict = TRANSFORMS) -> LazyParam:
    """Any slice of one stacked parameter, assembled from the pieces it touches."""
    dtypes = {p.file.dtype(p.name) for p in pieces}
    dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.float32)

    def read(index) -> np.ndarray:
        ranges = normalize(index, full)
        out = np.empty(tuple(len(r) for r in ranges), dtype)
        for piece in pieces:
            k = len(piece.index)
            if not all(i in r for i, r in zip(piece.index, ranges)):
                continue
            where = tuple(i - r.start for i, r in zip(piece.index, ranges))
            view = transforms[piece.transform][0](piece.file.get(piece.name))  # no copy yet
            part = view[as_slices(ranges[k:])]  # the memory map reads only these bytes
            out[where] = part
            BYTES_READ.add(part.nbytes)
        return out

    return LazyParam(full, dtype, read)


def lazy_hf(directory: Path, config: ModelConfig) -> dict:
    """(module, param) -> LazyParam, every check done on the headers."""
    shapes, transforms = logical_shapes(config), transforms_for(config)
    return {key: _lazy_param(shapes[key], pieces, transforms)
            for key, pieces in plan_hf(Path(directory), config).items()}


def read_hf(directory: Path, config: ModelConfig,
            place: Callable[[str, object], object] = lambda path, leaf: leaf,
            progress: bool = False) -> dict:
    """The parameter tree from a HF folder (host arrays), one parameter at a time via `place`."""
    params: dict = {}
    items = list(lazy_hf(directory, config).items())
    if progress:
        try:
            from tqdm import tqdm
            items = tqdm(items, desc="loading", unit="param")
        except ImportError:
            pass
    for (module, param), lazy in items:
        params.setdefault(module, {})[param] = place(f"{module}/{param}", lazy.read(None))
    return params
