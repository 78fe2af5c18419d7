"""Model config: presets, strict YAML/JSON loading, validation errors naming the culprit."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from runtime.config import (ModelConfig, config_from_dict, load_config, preset_names,
                            read_config_file, save_config)
from runtime.errors import ConfigError, RuntimeInputError

SPEC = Path(__file__).resolve().parents[2] / "shared/spec/grok-1.md"

TINY = {  # an independent, valid config written out in full
    "vocab_size": 256, "sequence_len": 64, "emb_size": 32, "key_size": 8, "num_q_heads": 4,
    "num_kv_heads": 2, "num_layers": 3, "widening_factor": 2, "num_experts": 4,
    "num_selected_experts": 2, "attn_output_multiplier": 1 / math.sqrt(8),
    "embedding_multiplier_scale": math.sqrt(32), "output_multiplier_scale": 1 / math.sqrt(3),
}


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert isinstance(excinfo.value, RuntimeInputError)
    return message


def test_grok1_preset_values():
    c = load_config("grok-1")
    assert isinstance(c, ModelConfig)
    assert (c.vocab_size, c.emb_size, c.num_layers, c.sequence_len) == (131072, 6144, 64, 8192)
    assert (c.num_q_heads, c.num_kv_heads, c.key_size) == (48, 8, 128)
    assert (c.num_experts, c.num_selected_experts, c.widening_factor) == (8, 2, 8)
    assert (c.pad_token, c.bos_token, c.eos_token) == (0, 1, 2)
    assert c.q_per_kv == 6
    # ffn_size: int(8 * 6144) * 2 // 3 = 32768, already a multiple of 8
    assert c.ffn_size == 32768
    assert c.embedding_multiplier_scale == pytest.approx(math.sqrt(6144), rel=1e-15)
    assert c.attn_output_multiplier == pytest.approx(1 / math.sqrt(128), rel=1e-15)
    assert c.output_multiplier_scale == pytest.approx(1 / math.sqrt(3), rel=1e-15)
    assert c.rope_base == 10000.0 and c.norm_eps == pytest.approx(1e-5) and c.attn_logit_cap == 30
    assert c.dtype == "bfloat16"


def test_grok1_preset_matches_spec_table():
    if not SPEC.is_file():
        pytest.skip(f"spec not found at {SPEC}")
    table = {}
    for line in SPEC.read_text().splitlines():
        cells = [x.strip() for x in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2:
            table[cells[0].split()[0]] = cells[1]
    c = load_config("grok-1")
    number = lambda text: float(re.match(r"[0-9.]+", text).group())  # noqa: E731
    assert number(table["vocab_size"]) == c.vocab_size
    assert number(table["emb_size"]) == c.emb_size
    assert number(table["num_layers"]) == c.num_layers
    assert number(table["sequence_len"]) == c.sequence_len
    assert table["num_q_heads"].replace(" ", "") == f"{c.num_q_heads}/{c.num_kv_heads}/{c.key_size}"
    assert table["num_experts"].replace(" ", "") == f"{c.num_experts}/{c.num_selected_experts}"
    assert number(table["widening_factor"]) == c.widening_factor
    assert table["widening_factor"].endswith(str(c.ffn_size))
    for field in ("embedding_multiplier_scale", "output_multiplier_scale", "attn_output_multiplier"):
        assert number(table[field]) == pytest.approx(getattr(c, field), rel=1e-12), field


def test_preset_names_and_tiny_test():
    names = preset_names()
    assert {"grok-1", "tiny-test"} <= set(names)
    assert names == sorted(names)
    tiny = load_config("tiny-test")
    assert tiny.num_q_heads % tiny.num_kv_heads == 0
    assert tiny.ffn_size % 8 == 0 and tiny.ffn_size >= int(tiny.widening_factor * tiny.emb_size) * 2 // 3


def test_unknown_preset_lists_available():
    with pytest.raises(ConfigError) as e:
        load_config("grok-2-does-not-exist")
    message = one_line_error(e)
    assert "grok-2-does-not-exist" in message
    for name in preset_names():
        assert name in message


def test_overrides():
    c = load_config("tiny-test", num_layers=2, dtype="bfloat16")
    assert (c.num_layers, c.dtype) == (2, "bfloat16")
    assert load_config("tiny-test").num_layers != 2
    with pytest.raises(ConfigError, match="bogus_field"):
        load_config("tiny-test", bogus_field=1)


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_files_load(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_text(json.dumps(TINY) if suffix == ".json" else yaml.safe_dump(TINY))
    c = load_config(str(path))
    assert c == ModelConfig(**TINY)
    assert c.num_layers == 3 and c.dtype == "bfloat16"  # the default
    assert read_config_file(path) == c


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "extra.yaml"
    path.write_text(yaml.safe_dump({**TINY, "num_heads": 8}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = one_line_error(e)
    assert "num_heads" in message and str(path) in message


def test_non_string_yaml_key_is_a_config_error(tmp_path):
    path = tmp_path / "boolkey.yaml"
    path.write_text(yaml.safe_dump(TINY) + "no: 3\n")  # YAML 1.1 reads the key `no` as False
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in one_line_error(e)


def test_missing_key_names_key_and_file(tmp_path):
    values = dict(TINY)
    del values["num_kv_heads"]
    path = tmp_path / "missing.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = one_line_error(e)
    assert "num_kv_heads" in message and str(path) in message


@pytest.mark.parametrize("changes, field", [
    ({"num_q_heads": 5}, "num_q_heads"),
    ({"num_selected_experts": 5}, "num_selected_experts"),
    ({"key_size": 7}, "key_size"),
    ({"emb_size": -32}, "emb_size"),
    ({"num_layers": 0}, "num_layers"),
    ({"vocab_size": -1}, "vocab_size"),
    ({"widening_factor": -2.0}, "widening_factor"),
    ({"norm_eps": float("nan")}, "norm_eps"),
    ({"dtype": "float16"}, "dtype"),
    ({"kv_dtype": "int8"}, "kv_dtype"),
    ({"kv_dtype": "bfloat16", "architecture": "mamba2"}, "kv_dtype"),
    ({"eos_token": 256}, "eos_token"),
    ({"pad_token": -1}, "pad_token"),
    ({"num_layers": 2.5}, "num_layers"),
])
def test_impossible_values_name_the_field(changes, field, tmp_path):
    with pytest.raises(ConfigError) as e:
        config_from_dict({**TINY, **changes}, source="my-source")
    message = one_line_error(e)
    assert field in message and "my-source" in message
    # the same through a file names the file
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = one_line_error(e)
    assert field in message and str(path) in message
    # and through replace on a valid config
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**TINY).replace(**changes)


def test_valid_boundaries_pass():
    c = config_from_dict({**TINY, "num_selected_experts": 4, "eos_token": 255, "num_kv_heads": 4})
    assert (c.num_selected_experts, c.eos_token, c.q_per_kv) == (4, 255, 1)


@pytest.mark.parametrize("name, text", [
    ("broken.yaml", "vocab_size: [1, 2\nemb_size: {\n"),
    ("tabs.yaml", "vocab_size: 1\n\tkey_size: 2\n"),
    ("broken.json", '{"vocab_size": 1,, }'),
])
def test_invalid_syntax_is_one_line_naming_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in one_line_error(e)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", ""])
def test_non_mapping_file(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in one_line_error(e)


def test_binary_file_is_a_config_error(tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in one_line_error(e)


def test_missing_path_is_config_error(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "nope.yaml" in one_line_error(e)


@pytest.mark.parametrize("preset", ["grok-1", "tiny-test"])
def test_save_load_round_trip(tmp_path, preset):
    c = load_config(preset)
    path = tmp_path / "saved.yaml"
    save_config(c, path)
    again = load_config(str(path))
    assert again == c
    assert again.to_dict() == c.to_dict()
    # fields survive with their exact float values
    assert again.embedding_multiplier_scale == c.embedding_multiplier_scale
    changed = c.replace(num_layers=5, norm_eps=1e-6)
    save_config(changed, path)
    assert load_config(path) == changed != c


def test_replace_unknown_field_raises():
    c = load_config("tiny-test")
    with pytest.raises(ConfigError) as e:
        c.replace(num_layer=3)
    assert "num_layer" in one_line_error(e)
    assert c.replace(num_layers=3).num_layers == 3


def test_config_is_frozen():
    c = load_config("tiny-test")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.num_layers = 1
    assert c.num_layers == load_config("tiny-test").num_layers
    assert hash(c) == hash(load_config("tiny-test"))


def test_kv_dtype_flag_applies_to_transformers_only():
    """--kv-dtype (with_dtypes): the KV memory's dtype apart from the activations'; a model
    that keeps a state instead of keys and values refuses it in one line naming the flag."""
    from runtime.config import with_dtypes
    c = with_dtypes(ModelConfig(**TINY), "float32", "bfloat16")
    assert (c.dtype, c.kv_dtype) == ("float32", "bfloat16")
    assert with_dtypes(c, None, None) == c
    with pytest.raises(ConfigError) as e:
        with_dtypes(ModelConfig(**{**TINY, "architecture": "mamba2"}), None, "bfloat16")
    assert "--kv-dtype" in one_line_error(e) and "mamba2" in one_line_error(e)
