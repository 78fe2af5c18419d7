"""Palm (github SrijanSriv211/Palm, runtime/models/palm.py) against torch (fixtures written by
scripts/make_palm_aft_fixtures.py: its own torch re-statement, checkpoint files exactly as Palm
saves them, a tokenizer file) and the numpy re-statement tests/reference_palm_numpy.py;
decode state, chunked prefill, engine slots, int8, the plan, the partition rules, and files
that must be refused without running anything."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import palm_helpers as writer
import reference_palm_numpy as reference
from conftest import ROOT, run_on_8_devices, single_device_mesh
from runtime.checkpoint.lazy import BYTES_READ
from runtime.checkpoint.load import default_config, detect_format, load_params
from runtime.checkpoint.palm_ckpt import config_from_hyperparams, lazy_palm, palm_config
from runtime.config import ModelConfig, load_config
from runtime.engine import build_engine
from runtime.errors import CheckpointError, ConfigError, RuntimeInputError
from runtime.models import build_model
from runtime.models.palm import SumMemory, sum_memory_bytes
from runtime.planning import PaperMesh, make_plan
from runtime.quant import QuantizedWeight8bit
from runtime.request import Request
from runtime.sharding import param_specs
from runtime.parameter_shapes import abstract_params

FIXTURE = ROOT / "tests" / "fixtures" / "palm_aft"
CKPT = FIXTURE / "s8.bin"
BLOCK = "language_model/palm/layers/aod_block/"


@pytest.fixture(scope="module")
def palm():
    config = palm_config(CKPT)
    with np.load(FIXTURE / "expected.npz") as z:
        expected = dict(z)
    with np.load(FIXTURE / "weights.npz") as z:
        weights = dict(z)
    facts = json.loads((FIXTURE / "expected.json").read_text())
    return SimpleNamespace(config=config, params=load_params(CKPT, config), expected=expected,
                           weights=weights, facts=facts, hyper=facts["hyperparams"],
                           model=build_model(config))


def relative_error(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def logits_of(model, params, ids):
    return np.asarray(jax.jit(model.all_logits)(params, jnp.asarray([ids], jnp.int32), None))[0]


# --- config and file ----------------------------------------------------------------------------

def test_config_comes_from_hyperparams(palm):
    c = palm.config
    assert detect_format(CKPT) == "palm" and default_config(CKPT) == c
    assert (c.architecture, c.vocab_size, c.sequence_len, c.num_layers, c.block_repeats,
            c.num_q_heads, c.emb_size, c.low_rank, c.key_size) == ("palm", 320, 64, 2, 2, 4, 32,
                                                                   16, 8)
    assert c.norm_eps == np.finfo(np.float32).eps and not c.tie_embeddings
    default = dict(vocab_size=8192, block_size=1024, n_layer=4, d_layer=4, n_head=16,
                   n_embd=256, d_rank=64, d_qkv=1024)  # Palm's Config defaults
    assert config_from_hyperparams(default, "x") == load_config("palm")


@pytest.mark.parametrize("change, message", [
    (dict(d_qkv=30), "d_qkv (30) is not a multiple of n_head (4)"),
    (dict(d_qkv=24), "key_size must be a multiple of 4"),  # head dim 6
    (dict(n_layer=0), "not positive integers: n_layer = 0"),
    (dict(dropout=0.1), "unknown dropout"),
])
def test_bad_hyperparams_are_one_line(palm, change, message):
    with pytest.raises(CheckpointError) as error:
        config_from_hyperparams({**palm.hyper, **change}, "s8.bin: hyperparams")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_palm_fields_belong_to_palm():
    with pytest.raises(ConfigError, match="block_repeats is a field of architecture palm"):
        load_config("tiny-test", block_repeats=2)
    with pytest.raises(ConfigError, match="low_rank must be a positive integer"):
        load_config("palm", low_rank=None)


# --- the math against torch and the numpy reference ----------------------------------------------

def test_numpy_reference_matches_torch(palm):
    for i in range(3):
        got = reference.forward(palm.weights, palm.hyper, palm.expected[f"prompt_{i}"])[0]
        assert relative_error(got, palm.expected[f"logits_{i}"]) < 1e-5


def test_logits_match_torch_for_every_saved_form(palm):
    """s8.bin, the torch.compile-prefixed and the bfloat16 copies: float32 within 1e-4 of
    torch's logits at every position (measured: ~2e-7), bf16 weights within bf16's error."""
    compiled = load_params(FIXTURE / "s8_compiled.bin", palm.config)
    bf16 = load_params(FIXTURE / "s8_bf16.bin", palm.config)
    assert bf16[BLOCK + "query"]["w"].dtype.name == "bfloat16"
    jax.tree.map(np.testing.assert_array_equal, compiled, palm.params)
    for i in range(3):
        ids, want = palm.expected[f"prompt_{i}"], palm.expected[f"logits_{i}"]
        error = relative_error(logits_of(palm.model, palm.params, ids), want)
        print(f"prompt {i}: float32 logits relative error {error:.2e}")
        assert error < 1e-4
        assert relative_error(logits_of(palm.model, bf16, ids), want) < 0.05


@pytest.mark.parametrize("recursion, repeats", [(2, 2), (2, 1)])
def test_recursion_orders_match_the_reference(tmp_path, recursion, repeats):
    """Each block `block_repeats` times in a row (b1 b1 b2 b2), the whole stack
    `recursion_steps` times (b1 b2 b1 b2): both, against the reference, on a written file."""
    hyper = dict(vocab_size=64, block_size=32, n_layer=2, d_layer=repeats, n_head=2, n_embd=16,
                 d_rank=8, d_qkv=16)
    weights = reference.random_weights(hyper, seed=recursion + repeats, scale=4.0)
    path = writer.write_palm(tmp_path / "r.bin", weights, hyper)
    config = palm_config(path).replace(recursion_steps=recursion)
    ids = [3, 9, 27, 17, 51, 25, 11]
    got = logits_of(build_model(config), load_params(path, config), ids)
    want = reference.forward(weights, {**hyper, "recursion": recursion}, ids)[0]
    assert relative_error(got, want) < 1e-4  # float32 through 8 strongly mixing applications
    other = reference.forward(weights, {**hyper, "recursion": 1, "d_layer": recursion *
                                        repeats}, ids)[0]
    assert relative_error(got, other) > 1e-3  # the order matters


# --- decode state, chunked prefill, engine slots ------------------------------------------------

def test_decode_state_equals_recomputation(palm):
    """Prefill 6 tokens, then decode the rest one by one: every step's logits equal the full
    forward's, and the running sums equal the reference's (idle row 1 keeps its state)."""
    model, ids = palm.model, palm.expected["prompt_2"]
    step = jax.jit(model.step)
    tokens = np.zeros((2, 6), np.int32)
    tokens[:, :] = ids[:6]
    logits, memory = jax.jit(model.prefill)(palm.params, jnp.asarray(tokens),
                                            jnp.array([6, 6]))
    full = logits_of(model, palm.params, ids)
    before = np.asarray(memory.sums)
    for t in range(6, len(ids)):
        logits, memory = step(palm.params, memory, jnp.asarray([[ids[t]], [0]]),
                              jnp.array([1, 0]))
        assert relative_error(np.asarray(logits)[0], full[t]) < 1e-5, t
    assert memory.positions.tolist() == [len(ids), 6]
    np.testing.assert_array_equal(np.asarray(memory.sums)[:, 1], before[:, 1])
    states = reference.forward(palm.weights, palm.hyper, ids)[1]
    np.testing.assert_allclose(np.asarray(memory.sums)[:, 0], np.stack(states), rtol=1e-5,
                               atol=1e-5)


def test_chunked_prefill_equals_prefill_at_once(palm):
    """A 29-token prompt in chunks of 8 (the last one partial) into slot 2 of 3 equals the
    whole prompt at once; the other slots are untouched."""
    model, ids = palm.model, palm.expected["prompt_2"]
    whole_logits, whole = jax.jit(model.prefill)(palm.params, jnp.asarray([ids]),
                                                 jnp.array([len(ids)]))
    memory = SumMemory(jnp.full((4, 3, 4, 8), 7.0), jnp.array([5, 9, 3], jnp.int32))
    chunk = jax.jit(model.chunk_step)
    for start in range(0, len(ids), 8):
        part = np.zeros((1, 8), np.int32)
        piece = ids[start:start + 8]
        part[0, :len(piece)] = piece
        logits, memory = chunk(palm.params, memory, jnp.asarray(part), jnp.array([len(piece)]),
                               jnp.array([2]), jnp.array([start]))
    assert relative_error(logits, np.asarray(whole_logits)) < 1e-5
    np.testing.assert_allclose(np.asarray(memory.sums)[:, 2], np.asarray(whole.sums)[:, 0],
                               rtol=1e-5, atol=1e-6)
    assert memory.positions.tolist() == [5, 9, len(ids)]
    assert (np.asarray(memory.sums)[:, :2] == 7.0).all()


def test_greedy_through_the_engine_slots(palm):
    """Four prompts through two slots, chunked prefill of 16 tokens: 32 greedy tokens each
    equal torch's greedy loop."""
    engine = build_engine(palm.config, palm.params, single_device_mesh(), slots=2,
                          prefill_chunk=16)
    run = palm.facts["run"]
    prompts = [tuple(palm.expected[f"prompt_{i}"].tolist()) for i in range(3)]
    prompts.append(tuple(run["prompt_ids"]))
    results = engine.generate([Request(p, max_new_tokens=32) for p in prompts])
    for i in range(3):
        assert results[i].output_ids == palm.expected[f"greedy_{i}"].tolist(), i
    assert results[3].output_ids == run["output_ids"]
    # prompt log-probabilities (scoring) read all_logits: torch's, log-softmaxed
    logits = palm.expected["logits_0"].astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    scored = engine.prompt_logprobs(prompts[0])
    assert scored[0] == (None, ())
    np.testing.assert_allclose([s[0] for s in scored[1:]],
                               [log_probs[t, prompts[0][t + 1]] for t in range(len(scored) - 1)],
                               atol=1e-5)


def test_state_is_constant_in_the_context_length(palm):
    for length in (64, 1 << 20):
        shapes = jax.eval_shape(lambda: palm.model.new_memory(3, length))
        assert sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)) == \
            sum_memory_bytes(palm.config, 3) == 4 * 3 * (2 * 2 * 4 * 8 + 1)


# --- int8, plan, sharding ------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [64, 0])  # grouped rows, one scale per channel
def test_int8_at_load_stays_close(palm, group_size):
    params = load_params(CKPT, palm.config, quantize_to="int8", int8_group_size=group_size)
    for name in ("qkv_in", "query", "key", "value", "proj_in", "proj_u", "proj_g"):
        assert isinstance(params[BLOCK + name]["w"], QuantizedWeight8bit), name
    for name in ("embed_proj", "unembed_in", "unembed"):
        assert isinstance(params[f"language_model/{name}"]["w"], QuantizedWeight8bit), name
    assert not isinstance(params["language_model/in_out_embed"]["embeddings"],
                          QuantizedWeight8bit)  # gathered, not multiplied
    ids = palm.expected["prompt_2"]
    got, want = logits_of(palm.model, params, ids), palm.expected["logits_2"]
    agreement = np.mean(got.argmax(-1) == want.argmax(-1))
    error = relative_error(got, want)
    print(f"palm int8 (group {group_size}): top-1 agreement {agreement:.3f}, logit error "
          f"{error:.4f}")
    assert agreement >= 0.8 and error < 0.05


def test_plan_and_partition_rules(palm):
    plan = make_plan(palm.config, {"data": 1, "model": 4}, "int8", slots=2, cache_length=64)
    table = plan.table()
    assert "running sums (2 slot(s), any length)" in table and "palm blocks" in table
    assert "palm_working_set" in table
    assert plan.kv_logical_bytes == sum_memory_bytes(palm.config, 2)
    specs = param_specs(abstract_params(palm.config), PaperMesh({"data": 1, "model": 4}))
    assert tuple(specs[BLOCK + "query"]["w"]) == (None, None, "model")
    assert tuple(specs[BLOCK + "proj_in"]["w"]) == (None, "model", None)
    assert tuple(palm.model.memory_specs(2, PaperMesh({"data": 2, "model": 4})).sums) == \
        (None, "data", "model", None)


# --- the tokenizer --------------------------------------------------------------------------------

def test_tokenizer_encodes_and_decodes_as_the_encoder(palm):
    from runtime.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(FIXTURE / "encoder.bin")
    assert tokenizer.vocab_size == 320
    for text, ids, decoded in zip(palm.facts["texts"], palm.facts["ids"],
                                  palm.facts["decoded"]):
        assert tokenizer.encode(text) == ids
        assert tokenizer.decode(ids) == decoded
    assert tokenizer.decode([72, 105, 999]) == "Hi\ufffd"  # an id the file lacks


def _reduce_payload(marker: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    return pickle.dumps({"pattern": "x", "special": {}, "vocab": Payload()}, protocol=4)


@pytest.mark.parametrize("kind", ["reduce", "foreign", "truncated", "not a vocab"])
def test_hostile_tokenizers_are_refused(tmp_path, kind):
    from runtime.minbpe import MinBPETokenizer
    marker = tmp_path / "ran"
    good = (FIXTURE / "encoder.bin").read_bytes()
    data = {"reduce": _reduce_payload(marker), "foreign": pickle.dumps(SimpleNamespace(a=1)),
            "truncated": good[:len(good) // 2],
            "not a vocab": pickle.dumps({"pattern": "x", "special": {}, "vocab": {0: "a"}})}[kind]
    path = tmp_path / "encoder.bin"
    path.write_bytes(data)
    with pytest.raises(RuntimeInputError) as error:
        MinBPETokenizer(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


# --- hostile checkpoint files -------------------------------------------------------------------

def _variant(tmp_path: Path, kind: str, marker: Path) -> Path:
    path = tmp_path / f"{kind.replace(' ', '_')}.bin"
    good = CKPT.read_bytes()
    tensor = writer.op_tensor("0", "FloatStorage", 4, [2, 2])
    if kind == "truncated zip":
        path.write_bytes(good[:len(good) * 2 // 3])
    elif kind == "reduce payload":
        payload = writer.op_global("posix", "system") + writer.op_tuple(
            [writer.op_str(f"touch {marker}")]) + pickle.REDUCE
        writer.write_zip(path, b"\x80\x02" + payload + pickle.STOP, {})
    elif kind == "unknown global":
        nn = writer.op_global("torch.nn.modules.linear", "Linear") + pickle.EMPTY_TUPLE + \
            pickle.REDUCE
        writer.write_zip(path, b"\x80\x02" + nn + pickle.STOP, {})
    elif kind == "storage past member":
        writer.write_zip(path, b"\x80\x02" + tensor + pickle.STOP, {"0": b"\0" * 12})
    elif kind == "tensor past storage":
        wide = writer.op_tensor("0", "FloatStorage", 4, [2, 2], stride=[3, 1])
        writer.write_zip(path, b"\x80\x02" + wide + pickle.STOP, {"0": b"\0" * 16})
    elif kind == "compressed member":
        writer.write_zip(path, b"\x80\x02" + tensor + pickle.STOP, {"0": b"\0" * 16},
                         compress=True)
    return path


@pytest.mark.parametrize("kind, message", [
    ("truncated zip", "not a readable zip archive"),
    ("reduce payload", "references posix.system"),
    ("unknown global", "references torch.nn.modules.linear.Linear"),
    ("storage past member", "runs past its zip member (12 bytes)"),
    ("tensor past storage", "runs past its storage data/0 (4 elements)"),
    ("compressed member", "is compressed"),
])
def test_hostile_checkpoints_are_refused_and_nothing_runs(tmp_path, palm, kind, message):
    marker = tmp_path / "ran"
    path = _variant(tmp_path, kind, marker)
    with pytest.raises(CheckpointError) as error:
        lazy_palm(path, palm.config)
    text = str(error.value)
    assert message in text and str(path) in text and "\n" not in text, text
    assert not marker.exists()


def test_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.bin"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint of a known format"):
        detect_format(path)
    with zipfile.ZipFile(tmp_path / "other.bin", "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="expected one <name>/data.pkl"):
        lazy_palm(tmp_path / "other.bin", load_config("palm"))


def test_mismatches_are_listed_together(palm, tmp_path):
    weights = dict(palm.weights)
    weights["blocks.0.extra"] = np.zeros(3, np.float32)
    del weights["unembed.w1"]
    weights["embed.1.w1"] = np.zeros((5, 16), np.float32)
    path = writer.write_palm(tmp_path / "m.bin", weights, palm.hyper)
    with pytest.raises(CheckpointError) as error:
        lazy_palm(path, palm.config.replace(num_layers=3))
    text = str(error.value)
    for problem in ("blocks.0.extra: no parameter takes it", "unembed.w1: missing",
                    "blocks.2.qkv.w1: missing", "(7 problems)",
                    "embed.1.w1: [5, 16], the config needs [32, 16]"):
        assert problem in text, text


def test_optimizer_state_is_never_read(palm):
    before = BYTES_READ.bytes
    load_params(CKPT, palm.config)
    model_bytes = sum(v.nbytes for v in palm.weights.values())
    assert BYTES_READ.bytes - before == model_bytes  # a third of what the file holds
    assert CKPT.stat().st_size > 2 * model_bytes


# --- run.py --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_run_py_prints_the_fixture_greedy_ids_and_text(palm):
    run = palm.facts["run"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "--checkpoint", str(CKPT), "--tokenizer",
         str(FIXTURE / "encoder.bin"), "--prompt", run["prompt"], "--max-new-tokens", "32",
         "--temperature", "0", "--json"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["prompt_ids"] == run["prompt_ids"]
    assert record["output_ids"] == run["output_ids"]
    assert record["text"] == run["text"]


def test_model_config_rejects_mismatched_heads():
    with pytest.raises(ConfigError, match="num_kv_heads .* must equal num_q_heads"):
        ModelConfig(**{**load_config("palm").to_dict(), "num_kv_heads": 8})


SHARDED = """
import json, sys
import numpy as np
sys.path.insert(0, {root!r})
from runtime.checkpoint.load import load_params_on_mesh
from runtime.checkpoint.palm_ckpt import palm_config
from runtime.engine import build_engine
from runtime.request import Request
from runtime.sharding import make_mesh
config = palm_config({ckpt!r})
mesh = make_mesh({{"data": 2, "model": 4}})
params = load_params_on_mesh({ckpt!r}, config, mesh, quantize_to={quantize!r})
engine = build_engine(config, params, mesh, slots=2, prefill_chunk=16)
split = params["language_model/palm/layers/aod_block/query"]["w"]
split = getattr(split, "weight", split).sharding.shard_shape((2, 16, 32))[-1]
out = engine.generate([Request(tuple(p), max_new_tokens=32) for p in {prompts!r}])
print(json.dumps({{"tokens": [o.output_ids for o in out], "columns": split}}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_sharded_over_eight_devices_gives_the_same_tokens(palm, quantize):
    """Heads over model=4, slots over data=2 (8 CPU devices): the fixture's greedy tokens,
    with float and int8 weights."""
    prompts = [palm.expected[f"prompt_{i}"].tolist() for i in range(3)]
    code = SHARDED.format(root=str(ROOT), ckpt=str(CKPT), quantize=quantize, prompts=prompts)
    result = json.loads(run_on_8_devices("-c", code, timeout=300))
    assert result["columns"] == 32 // 4  # the query columns: one head per device
    assert result["tokens"] == [palm.expected[f"greedy_{i}"].tolist() for i in range(3)]
