"""Config files against hostile values (issue 19): config.json and config.yaml fields of any
JSON type end in one ConfigError naming the file (and the field where the type is wrong), never
another exception; hypothesis drives both readers from the fixtures' real configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.checkpoint.hf_config import config_from_hf, read_hf_config
from runtime.config import config_from_dict, load_config
from runtime.errors import ConfigError, RuntimeInputError
from runtime.tokenizer import sentencepiece_adds_bos

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6)


def hf_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


@pytest.mark.parametrize("change, culprit", [
    ({"hidden_act": ["silu"]}, "hidden_act must be a string"),
    ({"rope_theta": "abc"}, "rope_theta must be a finite number"),
    ({"num_attention_heads": 0}, "config.json"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers must be an integer"),
    ({"architectures": "LlamaForCausalLM"}, "architectures must be a list of strings"),
    ({"rope_scaling": [1, 2]}, "rope_scaling must be an object"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": "x"}}, "config.json"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
])
def test_wrong_types_in_config_json_are_named(change, culprit):
    with pytest.raises(ConfigError, match=culprit) as error:
        config_from_hf({**hf_config("llama"), **change})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("text", ["[1, 2]", '"text"', "[" * 100_000, b"\xff\xfe{}"])
def test_a_config_json_that_is_not_an_object_is_named(tmp_path, text):
    (tmp_path / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match="config.json"):
        read_hf_config(tmp_path)


@pytest.mark.parametrize("text, culprit", [("{", "not readable JSON"), ("[]", "JSON object"),
                                           ('{"add_bos_token": "false"}', "true or false")])
def test_a_broken_tokenizer_config_is_named(tmp_path, text, culprit):
    (tmp_path / "tokenizer_config.json").write_text(text)
    with pytest.raises(RuntimeInputError, match=culprit):
        sentencepiece_adds_bos(tmp_path)


@given(name=st.sampled_from(["llama", "mixtral", "mamba2"]), data=st.data())
def test_fuzzed_config_json_is_a_config_or_one_config_error(name, data):
    base = hf_config(name)
    keys = st.sampled_from(sorted(base) + ["rope_scaling", "head_dim", "sliding_window",
                                           "eos_token_id", "bos_token_id", "time_step_limit"])
    changes = data.draw(st.dictionaries(keys, JSON, min_size=1, max_size=3))
    try:
        config = config_from_hf({**base, **changes})
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert config.num_layers >= 1 and config.vocab_size >= 1  # validated like any config


@given(data=st.data())
def test_fuzzed_config_yaml_fields_are_a_config_or_one_config_error(data):
    base = dataclasses.asdict(load_config("tiny-test"))
    changes = data.draw(st.dictionaries(st.sampled_from(sorted(base)), JSON, min_size=1,
                                        max_size=3))
    try:
        config_from_dict({**base, **changes})
    except ConfigError:
        pass


def test_junk_key_lists_are_capped():
    base = dataclasses.asdict(load_config("tiny-test"))
    junk = {f"junk{i}": i for i in range(200_000)}
    with pytest.raises(ConfigError) as error:
        config_from_dict({**base, **junk}, source="config.yaml")
    message = str(error.value)
    assert message.endswith("... and 199980 more") and len(message) < 1000
