"""PaLM-style model (parallel block, multi-query, bias-free LayerNorm, SwiGLU, tied embeddings)
against the public palm-pytorch implementation (fixture from scripts/make_palm_fixtures.py) and
the numpy reference; through the engine, run.py, and a batch job on two processes."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_numpy
from conftest import ROOT, single_device_mesh, to_reference
from runtime.checkpoint.load import load_params
from runtime.config import load_config
from runtime.engine import build_engine
from runtime.models import build_model
from runtime.request import Request
from runtime.memory import empty_kv
from test_multihost import launch

FIXTURE = ROOT / "tests" / "fixtures" / "palm"
PROMPTS = 3


@pytest.fixture(scope="module")
def palm():
    config = load_config(FIXTURE / "config.yaml")
    with np.load(FIXTURE / "expected.npz", allow_pickle=False) as z:
        expected = dict(z)
    return config, load_params(FIXTURE, config), expected


def forward(config, params, tokens):
    kv = empty_kv(config, 1, len(tokens), jnp.float32)
    positions = jnp.arange(len(tokens))[None]
    logits, _, _ = jax.jit(build_model(config).apply)(params, jnp.asarray(tokens)[None], kv, kv,
                                                      positions)
    return np.asarray(logits[0])


def test_config_is_palm_shaped(palm):
    config, params, _ = palm
    assert config.parallel_block and config.norm_type == "layer" and config.num_kv_heads == 1
    layer = "language_model/transformer/layers/decoder_layer/"
    assert layer + "layer_norm" in params and layer + "layer_norm_2" not in params
    assert params[layer + "multi_head_attention/key"]["w"].shape == (3, 64, 16)  # one kv head


def test_logits_match_palm_pytorch_and_the_numpy_reference(palm):
    config, params, expected = palm
    got = forward(config, params, expected["prompt"])
    want = expected["logits"]
    assert got.shape == want.shape == (96, 256)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 1e-4 * scale
    reference = reference_numpy.forward(to_reference(params), config, expected["prompt"][None])[0]
    assert np.abs(reference - want).max() < 1e-4 * scale  # the reference agrees independently
    assert want.std() > 1.0  # far from uniform: the comparison has teeth


@pytest.mark.slow
def test_greedy_in_slots_matches_palm_pytorch(palm):
    config, params, expected = palm
    prompts = [tuple(expected[f"prompt_{i}"].tolist()) for i in range(PROMPTS)]
    steps = len(expected["greedy_0"])
    # two slots for three prompts: continuous batching, a slot reused mid-run
    engine = build_engine(config, params, single_device_mesh(), slots=2,
                          cache_length=64)
    results = engine.generate([Request(p, max_new_tokens=steps) for p in prompts])
    for i, result in enumerate(results):
        assert result.output_ids == expected[f"greedy_{i}"].tolist(), i


def test_int8_weights_agree_on_most_tokens(palm):
    config, _, expected = palm
    params = load_params(FIXTURE, config, quantize_to="int8")
    got = forward(config, params, expected["prompt"])
    agree = np.mean(got.argmax(-1) == expected["logits"].argmax(-1))
    assert agree > 0.9, agree


@pytest.mark.slow
def test_run_py_greedy_matches_palm_pytorch(palm):
    _, _, expected = palm
    prompt = " ".join(map(str, expected["prompt_1"].tolist()))
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), "--checkpoint", str(FIXTURE),
                           "--prompt-ids", prompt, "--temperature", "0", "--max-new-tokens",
                           "20", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["output_ids"] == expected["greedy_1"][:20].tolist()


@pytest.mark.slow
def test_batch_job_on_two_processes_matches_palm_pytorch(palm, tmp_path):
    """Sharded over 2 processes x 2 devices (model axis 4) by the multi-host launcher."""
    _, _, expected = palm
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt_ids": expected[f"prompt_{i}"].tolist()})
                              + "\n" for i in range(PROMPTS)))
    out = tmp_path / "out.jsonl"
    done = launch("batch", "--checkpoint", FIXTURE, "--input", source, "--output", out,
                  "--slots", "2", "--temperature", "0", "--max-new-tokens", "24",
                  "--cache-length", "48")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "model=4" in done.stderr
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    for i in range(PROMPTS):
        assert records[i]["output_ids"] == expected[f"greedy_{i}"][:24].tolist(), i
