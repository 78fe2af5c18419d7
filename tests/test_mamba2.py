"""Mamba-2 (runtime/mamba2.py) against transformers fixtures and the independent numpy reference.

Fixtures (tests/fixtures/hf/mamba2*, made by scripts/make_mamba2_fixtures.py): `mamba2` has
n_groups 1 and transformers' own expected logits and greedy tokens; `mamba2_groups` has
n_groups 2 and expected values from tests/reference_mamba2_numpy.py (a token-by-token scan of
the recurrence with a per-group gated norm). The subprocess runs (8 simulated devices, run.py,
run.py batch, two processes under the multi-host launcher) are started together by the first
test so that they overlap the in-process ones.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_mamba2_numpy as reference
from conftest import ROOT, single_device_mesh, xla_flags
from runtime.checkpoint.hf_config import config_from_hf, read_hf_config
from runtime.checkpoint.load import load_params
from runtime.checkpoint.safetensors_io import SafetensorsFile, save_safetensors
from runtime.config import ModelConfig
from runtime.engine import build_engine
from runtime.errors import CheckpointError, ConfigError
from runtime.parameter_shapes import abstract_params
from runtime.models import build_model
from runtime.planning import make_plan
from runtime.quant import QuantizedEmbedding, QuantizedWeight8bit
from runtime.request import Request
from runtime.sharding import make_mesh, param_specs
from runtime.ssm_memory import ssm_memory_bytes

FIXTURES = ROOT / "tests" / "fixtures" / "hf"
MIXER = "language_model/mamba/layers/mamba_layer/mixer/"
TIMEOUT = 400


@functools.lru_cache(maxsize=None)
def fixture(name):
    """(config, params, expected arrays, jitted apply) of a fixture, loaded once."""
    config = read_hf_config(FIXTURES / name)
    model = build_model(config)
    expected = np.load(FIXTURES / name / "expected.npz")
    return config, load_params(FIXTURES / name, config), expected, jax.jit(model.apply)


def forward(name, ids, params=None, config=None):
    """Logits [T, V] of one unpadded row, from fresh state."""
    default_config, default_params, _, apply = fixture(name)
    if config is not None:
        apply = jax.jit(build_model(config).apply)
    config = config or default_config
    model = build_model(config)
    logits, _ = apply(params or default_params, jnp.asarray(ids)[None], model.new_memory(1, 0),
                      jnp.array([len(ids)]))
    return np.asarray(logits)[0]


def hf_tensors(folder):
    """The checkpoint's tensors by their Hugging Face names, and its config.json."""
    source = SafetensorsFile(folder / "model.safetensors")
    tensors = {k: np.array(source.get(k)) for k in source.keys()}
    return tensors, json.loads((folder / "config.json").read_text())


def relative_error(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


# --- subprocess runs, started together -------------------------------------------------------

def _env(**extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", **extra)


def _run_py(*args):
    return [sys.executable, str(ROOT / "run.py"), *map(str, args)]


def _ids(array):
    return " ".join(map(str, array.tolist()))


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Every subprocess run of this file, started at once; each test waits for its own."""
    tmp = tmp_path_factory.mktemp("mamba2-runs")
    hf, groups = (np.load(FIXTURES / n / "expected.npz") for n in ("mamba2", "mamba2_groups"))
    batch_in = tmp / "in.jsonl"
    batch_in.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "a", "prompt_ids": groups["prompt_0"].tolist()},
        {"id": "b", "prompt_ids": groups["prompt_2"].tolist(), "max_new_tokens": 40},
        {"id": "c", "prompt_ids": groups["prompt_1"].tolist(), "max_new_tokens": 3}]) + "{bad\n")
    specs = {
        "sharded": ([sys.executable, str(ROOT / "tests" / "sharded_mamba2_run.py")],
                    _env(XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"))),
        "generate": (_run_py("--checkpoint", FIXTURES / "mamba2", "--prompt-ids", "5 6 7",
                             "--prompt-ids", _ids(hf["prompt_1"]), "--max-new-tokens", 64,
                             "--temperature", 0, "--json"), _env()),
        "batch": (_run_py("batch", "--checkpoint", FIXTURES / "mamba2_groups", "--input",
                          batch_in, "--output", tmp / "out.jsonl", "--slots", 2,
                          "--temperature", 0, "--max-new-tokens", 64), _env()),
        "plan": (_run_py("--plan", "--checkpoint", FIXTURES / "mamba2", "--slots", 4,
                         "--cache-length", 32768), _env()),
        "multihost": ([sys.executable, str(ROOT / "scripts" / "launch_local.py"), "--processes",
                       "2", "--devices-per-process", "2", "--", *_run_py(
                           "--checkpoint", FIXTURES / "mamba2", "--prompt-ids",
                           _ids(hf["prompt_0"]), "--prompt-ids", _ids(hf["prompt_2"]),
                           "--max-new-tokens", 32, "--temperature", 0, "--json")], _env()),
    }
    procs = {name: subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, (command, env) in specs.items()}
    yield procs, tmp
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def finish(launched, name) -> subprocess.CompletedProcess:
    proc = launched[0][name]
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{name} timed out after {TIMEOUT}s; stderr tail:\n{err[-2000:]}")
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}; stderr:\n{err[-3000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# --- fixtures and configs ----------------------------------------------------------------------

def test_fixture_configs_convert(launched):
    """(Requests `launched` first, so the subprocess runs overlap everything below.)"""
    one, two = read_hf_config(FIXTURES / "mamba2"), read_hf_config(FIXTURES / "mamba2_groups")
    assert (one.architecture, one.ssm_heads, one.ssm_head_dim, one.ssm_state_size,
            one.ssm_groups, one.ssm_conv_kernel, one.ssm_chunk_size) == \
        ("mamba2", 8, 16, 16, 1, 4, 16)
    assert one.tie_embeddings and not two.tie_embeddings and two.ssm_groups == 2
    assert (one.ssm_dt_min, one.ssm_dt_max, one.ssm_conv_bias, one.ssm_residual_in_fp32) == \
        (0.0, None, True, True)
    assert one.eos_token is None and one.emb_size == 64 and one.num_layers == 2
    # the prompts span several chunks and end inside one
    assert fixture("mamba2")[2]["long_ids"].shape[1] % one.ssm_chunk_size
    assert fixture("mamba2")[2]["long_ids"].shape[1] > 4 * one.ssm_chunk_size


def test_partition_rules_shard_heads_and_replicate_groups():
    """Every Mamba-2 parameter matches exactly one rule (param_specs raises otherwise)."""
    config = read_hf_config(FIXTURES / "mamba2_groups")
    specs = param_specs(abstract_params(config), make_mesh({"data": 1, "model": 1}))
    assert sum(len(leaves) for leaves in specs.values()) == 20
    layer = "language_model/mamba/layers/mamba_layer/"
    want = {MIXER + "in_proj_x": (None, None, "model"), MIXER + "in_proj_dt": (None, None, "model"),
            MIXER + "in_proj_b": (None, None, None), MIXER + "conv_x": (None, None, "model"),
            MIXER + "conv_c": (None, None, None), MIXER + "out_proj": (None, "model", None),
            layer + "rms_norm": (None, None), "language_model/unembed": (None, "model")}
    for module, spec in want.items():
        leaves = specs[module]
        assert tuple(leaves["w" if "w" in leaves else "scale"]) == spec, module
    assert tuple(specs[MIXER[:-1]]["a_log"]) == (None, "model")


@pytest.mark.parametrize("change, message", [
    (dict(ssm_heads=6, ssm_groups=4), "ssm_heads \\(6\\) must be a multiple of ssm_groups"),
    (dict(ssm_conv_kernel=1), "ssm_conv_kernel must be at least 2"),
    (dict(ssm_state_size=0), "ssm_state_size must be a positive integer"),
    (dict(ssm_dt_min=0.5, ssm_dt_max=0.1), "ssm_dt_max \\(0.1\\) must exceed ssm_dt_min"),
    (dict(ssm_dt_min=-1.0), "ssm_dt_min must be a finite number >= 0"),
    (dict(ssm_conv_bias="yes"), "ssm_conv_bias must be true or false"),
])
def test_bad_ssm_fields_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        read_hf_config(FIXTURES / "mamba2").replace(**change)


@pytest.mark.parametrize("change, message", [
    ({"use_bias": True}, "use_bias=true is not supported"),
    ({"rms_norm": False}, "rms_norm=false"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu' for Mamba-2"),
    ({"num_heads": 4}, "hidden_size \\* expand \\(64 \\* 2\\) must equal num_heads \\* head_dim "
                       "\\(4 \\* 16\\)"),
    ({"n_groups": 3}, "ssm_heads \\(8\\) must be a multiple of ssm_groups \\(3\\)"),
])
def test_unsupported_hf_configs_are_refused(change, message):
    hf = json.loads((FIXTURES / "mamba2" / "config.json").read_text())
    hf.update(change)
    with pytest.raises(ConfigError, match=message):
        config_from_hf(hf)


def test_time_step_limit_is_read():
    hf = json.loads((FIXTURES / "mamba2" / "config.json").read_text())
    hf["time_step_limit"] = [0.001, 0.25]
    config = config_from_hf(hf)
    assert (config.ssm_dt_min, config.ssm_dt_max) == (0.001, 0.25)


# --- logits ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_logits_match_transformers():
    config, _, want, _ = fixture("mamba2")
    got = forward("mamba2", want["long_ids"][0])
    error = relative_error(got, want["long_logits"][0])
    print(f"mamba2 vs transformers over {got.shape[0]} positions: max abs "
          f"{np.abs(got - want['long_logits'][0]).max():.3g}, relative {error:.3g}")
    assert error < 1e-5


@pytest.mark.parametrize("name", ["mamba2", "mamba2_groups"])
def test_logits_match_the_numpy_reference(name):
    """The sequential scan of the recurrence (per-group gated norm) against the chunked
    prefill: with n_groups 2 this is the only trustworthy reference."""
    _, _, want, _ = fixture(name)
    ids = want["long_ids"][0]
    tensors, hf_config = hf_tensors(FIXTURES / name)
    ref = reference.forward(tensors, hf_config, ids)[0]
    got = forward(name, ids)
    error = relative_error(got, ref)
    print(f"{name} vs numpy reference over {len(ids)} positions: max abs "
          f"{np.abs(got - ref).max():.3g}, relative {error:.3g}")
    assert error < 1e-5
    if name == "mamba2_groups":
        assert relative_error(got, want["long_logits"][0]) < 1e-5


def test_options_match_the_reference_on_random_weights(tmp_path):
    """A time-step limit that clamps, no convolution bias, the norm before the gate, 4 groups
    and chunks of 7 (6 chunks, the last one partial; a prompt within one chunk is run.py's
    "5 6 7" below): random weights written as a Hugging Face folder, read by the loader."""
    hf = json.loads((FIXTURES / "mamba2_groups" / "config.json").read_text())
    hf.update(n_groups=4, use_conv_bias=False, time_step_limit=[0.02, 0.2], chunk_size=7,
              tie_word_embeddings=True, num_hidden_layers=3)
    tensors = reference.random_weights(hf, np.random.default_rng(5))
    save_safetensors(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    config = read_hf_config(tmp_path).replace(ssm_norm_before_gate=True)
    assert not config.ssm_conv_bias and config.ssm_dt_max == 0.2
    params = load_params(tmp_path, config)
    assert not any(k.endswith("conv_x") and "b" in v for k, v in params.items())
    ids = np.random.default_rng(6).integers(0, 512, 40)
    ref = reference.forward(tensors, dict(hf, norm_before_gate=True), ids)[0]
    got = forward("mamba2_groups", ids, params=params, config=config)
    assert relative_error(got, ref) < 1e-5
    loose = reference.forward(tensors, dict(hf, norm_before_gate=True, time_step_limit=None),
                              ids)[0]
    assert relative_error(loose, ref) > 1e-2  # the limit does clamp


# --- decode ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_prefill_then_decode_equals_recomputation_and_idle_rows_keep_their_state():
    """Two rows of one right-padded bucket: row 0 consumes T tokens, row 1 T - 1; then a decode
    step feeds row 1 its T-th token while row 0 is idle (length 0). Row 1 then equals row 0
    (logits and state), row 0's state is unchanged bit for bit, and row 0's logits are
    transformers' for those T tokens."""
    config, params, want, _ = fixture("mamba2_groups")
    model = build_model(config)
    step = jax.jit(model.step)
    t = 37  # two chunks of 16 and a part
    tokens = np.zeros((2, 48), np.int32)
    tokens[:, :t] = want["long_ids"][0, :t]
    tokens[1, t - 1] = 0  # row 1 must not see its T-th token yet
    logits, memory = step(params, model.new_memory(2, 0), jnp.asarray(tokens),
                          jnp.array([t, t - 1]))
    before = jax.tree.map(np.asarray, memory)
    logits_1, after = step(params, memory, jnp.asarray([[0], [want["long_ids"][0, t - 1]]]),
                           jnp.array([0, 1]))
    after = jax.tree.map(np.asarray, after)

    assert after.positions.tolist() == [t, t]
    for field in ("conv_x", "conv_b", "conv_c", "ssm"):
        np.testing.assert_array_equal(getattr(after, field)[:, 0], getattr(before, field)[:, 0])
        np.testing.assert_allclose(getattr(after, field)[:, 1], getattr(before, field)[:, 0],
                                   rtol=1e-5, atol=1e-6, err_msg=field)
    assert relative_error(np.asarray(logits_1)[1], np.asarray(logits)[0]) < 1e-5

    assert relative_error(np.asarray(logits)[0], want["long_logits"][0, t - 1]) < 1e-5


@pytest.mark.slow
def test_greedy_tokens_match_generate_with_continuous_batching():
    """Three prompts of 7, 23 and 41 tokens through two slots: the first stops after 20 tokens
    and the third takes its slot while the second is mid-decode; 64 greedy tokens each equal
    transformers' generate() token for token."""
    config, params, want, _ = fixture("mamba2")
    engine = build_engine(config, params, single_device_mesh(), slots=2)
    prompts = [tuple(want[f"prompt_{i}"].tolist()) for i in range(3)]
    results = engine.generate([Request(prompts[0], max_new_tokens=20),
                               Request(prompts[1], max_new_tokens=64),
                               Request(prompts[2], max_new_tokens=64)])
    assert results[0].output_ids == want["greedy_0"][:20].tolist()
    for i in (1, 2):
        assert len(results[i].output_ids) == 64
        assert results[i].output_ids == want[f"greedy_{i}"].tolist(), f"prompt {i}"


def test_state_is_constant_in_the_context_length():
    """Decode memory per sequence: the same bytes for a 1k and a 32k context (from the memory
    pytree's shapes), here and for a mamba2-2.7b-sized config."""
    big = ModelConfig(vocab_size=50288, sequence_len=1 << 16, emb_size=2560, key_size=2,
                      num_q_heads=1, num_kv_heads=1, num_layers=64, widening_factor=1.0,
                      num_experts=0, num_selected_experts=0, attn_output_multiplier=1.0,
                      embedding_multiplier_scale=1.0, output_multiplier_scale=1.0,
                      attn_logit_cap=None, architecture="mamba2", ssm_heads=80,
                      ssm_head_dim=64, ssm_state_size=128, ssm_groups=1, ssm_conv_kernel=4,
                      dtype="bfloat16")
    for config in (fixture("mamba2")[0], big):
        model = build_model(config)
        sizes = {}
        for length in (1024, 32768):
            shapes = jax.eval_shape(lambda: model.new_memory(1, length))
            sizes[length] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))
        inner = config.ssm_heads * config.ssm_head_dim
        bc = config.ssm_groups * config.ssm_state_size
        formula = config.num_layers * ((config.ssm_conv_kernel - 1) * (inner + 2 * bc)
                                       * jnp.dtype(config.dtype).itemsize
                                       + inner * config.ssm_state_size * 4) + 4
        print(f"{config.num_layers} layers, D {config.emb_size}: decode state per sequence "
              f"{sizes[1024]} bytes at 1k, {sizes[32768]} at 32k ({sizes[1024] / 2**20:.2f} MiB)")
        assert sizes[1024] == sizes[32768] == formula == ssm_memory_bytes(config, 1, 32768)
    # The memory plan counts the same state whatever the cache length, split over the mesh.
    plans = [make_plan(big, {"data": 2, "model": 8}, "bfloat16", slots=8, cache_length=n)
             for n in (1024, 32768)]
    assert plans[0].kv_bytes == plans[1].kv_bytes
    assert plans[0].kv_logical_bytes == 8 * ssm_memory_bytes(big, 1)
    assert "SSM state (8 slot(s), any length)" in plans[1].table()


def test_int8_at_load_stays_close():
    config, _, want, _ = fixture("mamba2")
    params = load_params(FIXTURES / "mamba2", config, quantize_to="int8")
    for name in ("in_proj_z", "in_proj_x", "in_proj_b", "in_proj_c", "in_proj_dt", "out_proj"):
        assert isinstance(params[MIXER + name]["w"], QuantizedWeight8bit), name
    assert not isinstance(params[MIXER + "conv_x"]["w"], QuantizedWeight8bit)
    # the tied table is the output head too: int8, grouped along its width
    assert isinstance(params["language_model/in_out_embed"]["embeddings"], QuantizedEmbedding)
    got = forward("mamba2", want["long_ids"][0], params=params)
    reference_logits = want["long_logits"][0]
    agreement = np.mean(got.argmax(-1) == reference_logits.argmax(-1))
    errors = np.abs(got - reference_logits).max(-1) / np.abs(reference_logits).max(-1)
    print(f"mamba2 int8 over {len(errors)} positions: top-1 agreement {agreement:.3f}, logit "
          f"error median {np.median(errors):.4f} max {errors.max():.4f}")
    assert agreement >= 0.9 and np.median(errors) < 0.05


# --- checkpoint errors -------------------------------------------------------------------------

def test_unmapped_missing_and_misshapen_tensors_are_listed_together(tmp_path):
    folder = tmp_path / "mamba2"
    shutil.copytree(FIXTURES / "mamba2", folder)
    tensors, _ = hf_tensors(folder)
    tensors["backbone.layers.0.mixer.in_proj.bias"] = np.zeros(8, np.float32)
    del tensors["backbone.layers.1.mixer.dt_bias"]
    tensors["backbone.layers.0.mixer.conv1d.weight"] = np.zeros((160, 1, 3), np.float32)
    save_safetensors(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_params(folder, read_hf_config(folder))
    message = str(error.value)
    assert "(8 problems)" in message, message  # the conv1d weight fails all three parts
    assert "backbone.layers.0.mixer.in_proj.bias (model.safetensors): no parameter" in message
    assert "mamba_layer/mixer/dt_bias: not filled (1 of 2 slices missing, first at [1])" \
        in message
    assert "backbone.layers.0.mixer.conv1d.weight (model.safetensors): [160, 1, 3] gives " \
        "[3, 128], language_model/mamba/layers/mamba_layer/mixer/conv_x/w needs [4, 128]" \
        in message
    for part in ("x", "b", "c"):
        assert f"mixer/conv_{part}/w: not filled (1 of 2 slices missing, first at [0])" \
            in message


# --- sharded, CLI, batch, multi-host (subprocesses) ---------------------------------------------

@pytest.mark.slow  # 8 simulated devices in a subprocess: in the full suite only
def test_sharded_equals_single_device_on_8_devices(launched):
    results = json.loads(finish(launched, "sharded").stdout.strip().splitlines()[-1])
    assert results.pop("default_mesh") == {"data": 1, "model": 8}
    assert sorted(results) == ["mamba2 data=2,model=4", "mamba2_groups model=8"]
    for mesh, result in results.items():
        assert result["heads_split"] == result["state_heads_split"] == int(mesh[-1]), mesh
        assert result["logit_error"] < 1e-5, mesh
        assert result["tokens"] == result["expected"], mesh


@pytest.mark.slow
def test_run_py_generates_the_fixture_tokens(launched):
    done = finish(launched, "generate")
    records = [json.loads(line) for line in done.stdout.splitlines()]
    _, _, want, _ = fixture("mamba2")
    tensors, hf_config = hf_tensors(FIXTURES / "mamba2")
    assert records[0]["output_ids"] == reference.greedy(tensors, hf_config, [5, 6, 7], 64)[0]
    assert records[1]["output_ids"] == want["greedy_1"].tolist()
    assert [r["finish_reason"] for r in records] == ["length", "length"]


@pytest.mark.slow
def test_batch_job_matches_the_reference(launched):
    finish(launched, "batch")
    _, _, want, _ = fixture("mamba2_groups")
    records = {r["line"]: r for r in map(json.loads,
                                         (launched[1] / "out.jsonl").read_text().splitlines())}
    assert sorted(records) == [1, 2, 3, 4]
    assert records[1]["output_ids"] == want["greedy_0"].tolist()
    assert records[2]["output_ids"] == want["greedy_2"][:40].tolist()
    assert records[3]["output_ids"] == want["greedy_1"][:3].tolist()
    assert records[4]["finish_reason"] == "error"


@pytest.mark.slow
def test_two_processes_under_the_multihost_launcher(launched):
    done = finish(launched, "multihost")
    assert "2 process(es)" in done.stderr and "model=4" in done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stdout
    _, _, want, _ = fixture("mamba2")
    for line, i in zip(lines, (0, 2)):
        assert json.loads(line)["output_ids"] == want[f"greedy_{i}"][:32].tolist()


@pytest.mark.slow
def test_plan_of_a_mamba2_checkpoint(launched):
    """`run.py --plan` on a Mamba-2 checkpoint: its state instead of KV memory."""
    assert "SSM state (4 slot(s), any length)" in finish(launched, "plan").stdout
