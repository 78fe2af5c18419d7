"""Hugging Face checkpoints against transformers fixtures (tests/fixtures/hf, made by
scripts/make_hf_fixtures.py): logits, greedy tokens, int8 at load, conversion, errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, single_device_mesh
from runtime.checkpoint import lazy
from runtime.checkpoint.hf_config import config_from_hf, read_hf_config
from runtime.checkpoint.load import load_params
from runtime.checkpoint.safetensors_io import SafetensorsFile, save_safetensors
from runtime.engine import build_engine
from runtime.errors import CheckpointError, ConfigError
from runtime.models import build_model
from runtime.quant import QuantizedWeight8bit
from runtime.request import Request
from runtime.memory import empty_kv

FIXTURES = ROOT / "tests" / "fixtures" / "hf"
FAMILIES = ["llama", "llama3", "mistral", "mixtral", "mixtral_fused"]


def expected(name):
    return np.load(FIXTURES / name / "expected.npz")


def forward(config, params, ids):
    length = ids.shape[1]
    kv = empty_kv(config, 1, length, jnp.float32)
    logits, _, _ = jax.jit(build_model(config).apply)(params, jnp.asarray(ids), kv, kv,
                                                     jnp.arange(length)[None])
    return np.asarray(logits)


def relative_error(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers_on_a_long_prompt(name):
    config = read_hf_config(FIXTURES / name)
    params = load_params(FIXTURES / name, config)
    want = expected(name)
    assert want["long_ids"].shape[1] >= 300
    got = forward(config, params, want["long_ids"])
    assert relative_error(got, want["long_logits"]) < 1e-4
    prompt = want["prompt_1"][None]
    assert relative_error(forward(config, params, prompt)[0], want["prompt_logits_1"]) < 1e-4


@pytest.mark.parametrize("name", ["llama", "mixtral_fused", "mamba2"])
def test_transposed_weights_read_a_chunk_at_a_time_equal_the_whole(monkeypatch, name):
    """[out, in] weights (fused expert halves, Mamba-2's projections too) read a row at a time
    and transposed by XLA on the host (lazy.copy_transposed: big tensors) equal numpy's whole
    transposes."""
    config = read_hf_config(FIXTURES / name)
    want = load_params(FIXTURES / name, config)
    monkeypatch.setattr(lazy, "TRANSPOSE_CHUNK_BYTES", 1)
    monkeypatch.setattr(lazy, "XLA_TRANSPOSE_BYTES", 0)
    got = load_params(FIXTURES / name, config)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_the_long_prompt_exercises_window_and_rope_scaling():
    """The features those fixtures exist for are really on in the converted configs."""
    assert read_hf_config(FIXTURES / "mistral").sliding_window == 48
    assert read_hf_config(FIXTURES / "mistral").key_size * 8 != 64  # head_dim != hidden/heads
    llama3 = read_hf_config(FIXTURES / "llama3")
    assert llama3.rope_scaling_factor == 8.0 and llama3.tie_embeddings
    mixtral = read_hf_config(FIXTURES / "mixtral")
    assert (mixtral.num_experts, mixtral.num_selected_experts, mixtral.moe_renormalize) == \
        (8, 2, True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "llama3", "mistral", "mixtral"])
def test_greedy_tokens_match_generate_in_a_batch(name):
    config = read_hf_config(FIXTURES / name)
    engine = build_engine(config, load_params(FIXTURES / name, config),
                          single_device_mesh(), slots=3, cache_length=64)
    want = expected(name)
    prompts = [tuple(want[f"prompt_{i}"].tolist()) for i in range(3)]
    results = engine.generate([Request(p, max_new_tokens=40) for p in prompts])
    for i, result in enumerate(results):
        assert result.output_ids == want[f"greedy_{i}"].tolist(), f"prompt {i}"


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_int8_at_load_stays_close(name):
    config = read_hf_config(FIXTURES / name)
    params = load_params(FIXTURES / name, config, quantize_to="int8")
    layer = "language_model/transformer/layers/decoder_layer/"
    ffn = "moe/linear" if config.num_experts else "mlp/linear"
    assert isinstance(params[layer + ffn]["w"], QuantizedWeight8bit)
    assert not isinstance(params[layer + "router"]["w"] if config.num_experts else
                          params["language_model/in_out_embed"]["embeddings"],
                          QuantizedWeight8bit)
    want = expected(name)
    got = forward(config, params, want["long_ids"])[0]
    reference = want["long_logits"][0]
    agreement = np.mean(got.argmax(-1) == reference.argmax(-1))
    # per position: the largest logit error relative to that position's largest logit
    errors = np.abs(got - reference).max(-1) / np.abs(reference).max(-1)
    print(f"{name} int8 over {len(errors)} positions: top-1 agreement {agreement:.3f}, logit "
          f"error median {np.median(errors):.4f} max {errors.max():.4f}")
    # A rare routing flip (Mixtral) moves one position a lot; typical positions stay close.
    assert agreement >= 0.9 and np.median(errors) < 0.05


def test_converted_int8_checkpoint_loads_without_requantising(tmp_path):
    out = tmp_path / "mixtral-int8"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_checkpoint.py"),
                           "--checkpoint", str(FIXTURES / "mixtral"), "--output", str(out),
                           "--quantize", "int8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    config = read_hf_config(FIXTURES / "mixtral")
    quantized_at_load = load_params(FIXTURES / "mixtral", config, quantize_to="int8")
    stored = load_params(out, config)
    for module, leaves in quantized_at_load.items():
        for param, leaf in leaves.items():
            for a, b in zip(jax.tree.leaves(leaf), jax.tree.leaves(stored[module][param])):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (out / "config.yaml").is_file()


def _copy_fixture(tmp_path, name="llama"):
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target


def test_unmapped_missing_and_misshapen_tensors_are_listed_together(tmp_path):
    folder = _copy_fixture(tmp_path)
    source = SafetensorsFile(folder / "model.safetensors")
    tensors = {k: np.array(source.get(k)) for k in source.keys()}
    del source
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 64), np.float32)
    save_safetensors(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_params(folder, read_hf_config(folder))
    message = str(error.value)
    assert "(4 problems)" in message  # the misshapen tensor also leaves its slice unfilled
    assert "model.layers.0.self_attn.q_proj.bias (model.safetensors): no parameter" in message
    assert "decoder_layer/mlp/linear_v/w: not filled (1 of 2 slices missing, first at [1])" \
        in message
    assert "model.layers.0.self_attn.k_proj.weight (model.safetensors): [8, 64] gives [64, 8]" \
        in message
    assert "multi_head_attention/key/w: not filled (1 of 2 slices missing, first at [0])" \
        in message


def test_sharded_index_and_missing_shard(tmp_path):
    folder = _copy_fixture(tmp_path)
    source = SafetensorsFile(folder / "model.safetensors")
    names = sorted(source.keys())
    halves = {"model-00001-of-00002.safetensors": names[:10],
              "model-00002-of-00002.safetensors": names[10:]}
    for file, part in halves.items():
        save_safetensors({n: np.array(source.get(n)) for n in part}, folder / file)
    del source
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, part in halves.items() for n in part}}))
    config = read_hf_config(folder)
    want = expected("llama")
    got = forward(config, load_params(folder, config), want["prompt_0"][None])
    assert relative_error(got[0], want["prompt_logits_0"]) < 1e-4
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: listed in the "
                                              "index but missing"):
        load_params(folder, config)


def test_truncated_safetensors_is_named(tmp_path):
    folder = _copy_fixture(tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:200_000])
    with pytest.raises(CheckpointError, match="model.safetensors: tensor .* does not fit its "
                                              "byte range"):
        load_params(folder, read_hf_config(folder))


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'; "
                                             "supported: LlamaForCausalLM"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"hidden_act": "relu"}, "unsupported hidden_act 'relu'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "unsupported rope type"),
])
def test_unsupported_configs_are_refused(change, message):
    hf = json.loads((FIXTURES / "llama" / "config.json").read_text())
    hf.update(change)
    with pytest.raises(ConfigError, match=message):
        config_from_hf(hf)


def test_old_style_rope_keys_are_read():
    hf = json.loads((FIXTURES / "llama3" / "config.json").read_text())
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    hf["rope_scaling"] = dict(rope, type=rope.pop("rope_type"))
    assert config_from_hf(hf) == read_hf_config(FIXTURES / "llama3")


@pytest.mark.slow
def test_hub_download_uses_the_local_cache_offline(tmp_path):
    """--hf-repo resolves a cached snapshot without the network (tests cannot reach the Hub)."""
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(FIXTURES / "llama", repo / "snapshots" / commit)
    (repo / "snapshots" / commit / "expected.npz").unlink()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    want = expected("llama")
    prompt = " ".join(map(str, want["prompt_0"].tolist()))
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), "--hf-repo",
                           "tiny-org/tiny-llama", "--prompt-ids", prompt, "--temperature", "0",
                           "--max-new-tokens", "12", "--json"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output_ids"] == want["greedy_0"][:12].tolist()
    missing = subprocess.run([sys.executable, str(ROOT / "run.py"), "--hf-repo", "tiny-org/none",
                              "--prompt-ids", "5"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("error: --hf-repo tiny-org/none")


def test_tokenizer_json_through_the_tokenizers_library(tmp_path):
    """Llama 3 ships only tokenizer.json: a byte-level BPE read by `tokenizers`."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, decoders, trainers

    from runtime.tokenizer import find_tokenizer, load_tokenizer

    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50 + ["héllo 日本"],
                            trainer)
    bpe.save(str(tmp_path / "tokenizer.json"))
    assert find_tokenizer(tmp_path) == tmp_path / "tokenizer.json"
    tokenizer = load_tokenizer(tmp_path / "tokenizer.json")
    ids = tokenizer.encode("the lazy fox, héllo 日本")
    assert 0 not in ids  # no post-processor: no special token added
    assert tokenizer.decode(ids) == "the lazy fox, héllo 日本"
    assert tokenizer.vocab_size == bpe.get_vocab_size()
