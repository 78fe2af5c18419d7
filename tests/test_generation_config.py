"""Every end id (config.json and generation_config.json lists), and generation_config.json's
sampling settings as run.py's defaults (flags win)."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, random_params, single_device_mesh, tiny_config
from runtime.checkpoint.generation_config import sampling_defaults
from runtime.checkpoint.hf_config import read_hf_config
from runtime.config import load_config, save_config
from runtime.engine import build_engine
from runtime.errors import ConfigError
from runtime.request import Request

LLAMA = ROOT / "tests" / "fixtures" / "hf" / "llama"


def _llama_copy(tmp_path, eos, generation=None):
    folder = tmp_path / "model"
    shutil.copytree(LLAMA, folder)
    config = json.loads((folder / "config.json").read_text())
    config["eos_token_id"] = eos
    (folder / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def test_every_eos_id_of_config_and_generation_config(tmp_path):
    """Llama-3.x instruct: config.json lists one or several ids, generation_config.json more."""
    folder = _llama_copy(tmp_path, [128 - 127, 8], {"eos_token_id": [8, 9, 300]})
    config = read_hf_config(folder)
    assert config.eos_token == 1 and config.eos_tokens == (1, 8, 9, 300)
    assert read_hf_config(_llama_copy(tmp_path / "b", 5)).eos_tokens == (5,)
    assert read_hf_config(_llama_copy(tmp_path / "c", None)).eos_tokens == ()


def test_bad_eos_ids_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="eos_token_id must be a token id"):
        read_hf_config(_llama_copy(tmp_path, ["x"]))
    with pytest.raises(ConfigError, match=r"extra_eos_tokens: 900 is not a token id"):
        read_hf_config(_llama_copy(tmp_path / "b", [1, 900]))  # vocab 512
    with pytest.raises(ConfigError, match="generation_config.json is not valid JSON"):
        folder = _llama_copy(tmp_path / "c", 1)
        (folder / "generation_config.json").write_text("{")
        read_hf_config(folder)


def test_extra_eos_tokens_round_trip_through_yaml(tmp_path):
    config = tiny_config(extra_eos_tokens=[7, 9])
    assert config.extra_eos_tokens == (7, 9) and config.eos_tokens == (2, 7, 9)
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_generation_stops_at_any_eos_id():
    """A free run's 5th token made an extra end id: the run stops there ("eos"), without it."""
    config = tiny_config()
    params = random_params(config)
    prompt = (40, 41, 42, 43, 44, 45, 46, 47, 48, 49)
    free_engine = build_engine(config.replace(eos_token=None), params, single_device_mesh(),
                               cache_length=32)
    free = free_engine.generate([Request(prompt, max_new_tokens=10)])[0].output_ids
    end = free[4]
    stopped = build_engine(config.replace(extra_eos_tokens=(end,)), params,
                           single_device_mesh(), cache_length=32)
    result = stopped.generate([Request(prompt, max_new_tokens=10)])[0]
    assert result.finish_reason == "eos"
    assert result.output_ids == free[:free.index(end)]


@pytest.mark.parametrize("generation,expected", [
    ({}, {}),
    ({"max_new_tokens": 17}, {"max_new_tokens": 17, "temperature": 0.0}),  # do_sample: false
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.9},
     {"temperature": 0.6, "top_p": 0.9}),
    ({"do_sample": True, "top_k": 20}, {"top_k": 20}),
])
def test_sampling_defaults_as_transformers_applies_them(generation, expected):
    assert sampling_defaults(generation) == expected


def test_bad_sampling_values_are_refused():
    with pytest.raises(ConfigError, match="invalid temperature"):
        sampling_defaults({"do_sample": True, "temperature": "hot"})
    with pytest.raises(ConfigError, match="max_new_tokens must be a positive integer"):
        sampling_defaults({"max_new_tokens": 0})


def _run_py(*args):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_run_py_takes_generation_config_defaults_and_flags_win(tmp_path):
    folder = _llama_copy(tmp_path, None, {"do_sample": False, "max_new_tokens": 3})
    out = _run_py("--checkpoint", str(folder), "--prompt-ids", "5 6 7", "--json")
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert len(record["output_ids"]) == 3  # generation_config.json's max_new_tokens
    flag = _run_py("--checkpoint", str(folder), "--prompt-ids", "5 6 7", "--json",
                   "--max-new-tokens", "5", "--temperature", "0")
    greedy = json.loads(flag.stdout)["output_ids"]
    assert len(greedy) == 5  # the flag wins
    assert greedy[:3] == record["output_ids"]  # do_sample false: the default run was greedy
    shown = _run_py("--checkpoint", str(folder), "--help").stdout
    assert "default: 3 (generation_config.json)" in " ".join(shown.split())
    assert "default: 0.95" in " ".join(_run_py("--help").stdout.split())  # built-in (demo)


def test_converted_checkpoint_keeps_end_ids_and_sampling_defaults(tmp_path):
    folder = _llama_copy(tmp_path, [1, 8], {"eos_token_id": 9, "do_sample": True,
                                            "temperature": 0.5})
    out = tmp_path / "converted"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_checkpoint.py"),
                           "--checkpoint", str(folder), "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert load_config(out / "config.yaml").eos_tokens == (1, 8, 9)
    generation = json.loads((out / "generation_config.json").read_text())
    assert sampling_defaults(generation) == {"temperature": 0.5}
