"""End to end: `python run.py ...` as a user runs it, on a tiny int8+float checkpoint on disk.

Generated ids are compared with the independent numpy reference (tests/reference_numpy.py), never
with anything recorded from run.py. Subprocesses that can run side by side are started together
(and the numpy reference is computed while they run) to keep the file fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import reference_numpy
from conftest import LAYER, random_params, tiny_config, to_reference

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "run.py"
TIMEOUT = 300
PROMPTS = [(5, 6, 7), (40, 41, 42, 43, 44, 45)]
STEPS = 16


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def start(args, cwd: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(RUN), *map(str, args)], cwd=cwd, env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"run.py timed out after {TIMEOUT}s; stderr tail:\n{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def prompt_flags():
    return [a for p in PROMPTS for a in ("--prompt-ids", " ".join(map(str, p)))]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A 12-layer float32 tiny checkpoint with two int8 weights, and its config file."""
    from runtime.checkpoint.grok_ckpt import write_ckpt0
    from runtime.config import save_config
    from runtime.quant import QuantizedWeight8bit, quantize

    config = tiny_config()
    assert config.num_layers == 12 and config.dtype == "float32"
    params = random_params(config, seed=5)
    for module in ("multi_head_attention/linear", "moe/linear_1"):
        params[LAYER + module]["w"] = quantize(params[LAYER + module]["w"], row_blocks=8)
        assert isinstance(params[LAYER + module]["w"], QuantizedWeight8bit)
    directory = tmp_path_factory.mktemp("tiny-ckpt")
    write_ckpt0(params, directory, config)
    config_path = directory / "my-config.yaml"
    save_config(config, config_path)
    return directory, config_path, config, params


def expected_outputs(config, params) -> list[list[int]]:
    """Greedy ids from the numpy reference, cut where run.py stops: before the first EOS."""
    ref = to_reference(params)
    out = []
    for prompt in PROMPTS:
        ids = reference_numpy.greedy(ref, config, list(prompt), STEPS)
        if config.eos_token in ids:
            ids = ids[:ids.index(config.eos_token)]
        out.append(ids)
    return out


@pytest.fixture(scope="module")
def generations(ckpt, tmp_path_factory):
    """Both generating runs at once; the numpy reference is computed while they run."""
    directory, config_path, config, params = ckpt
    cwd = tmp_path_factory.mktemp("cwd")
    cache = tmp_path_factory.mktemp("jax-cache")  # never the user's ~/.cache
    common = ["--checkpoint", directory, "--config", config_path, *prompt_flags(),
              "--temperature", "0", "--max-new-tokens", STEPS]
    procs = {"json": start([*common, "--json"], cwd, LLM_RUNTIME_COMPILATION_CACHE=str(cache)),
             "one_slot": start([*common, "--mesh", "model=1", "--slots", "1"], cwd)}
    try:
        expected = expected_outputs(config, params)
    finally:
        results = {name: finish(p) for name, p in procs.items()}
    return results, expected, cache


def reference_logprobs(config, params, prompt, ids) -> np.ndarray:
    """The numpy reference's log-probabilities of ids [N] after prompt (one full forward)."""
    logits = reference_numpy.forward(to_reference(params), config,
                                     np.array([list(prompt) + list(ids)]))[0]
    logits = logits[len(prompt) - 1:len(prompt) - 1 + len(ids)].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return logp[np.arange(len(ids)), ids]


@pytest.mark.slow
def test_bf16_kv_memory_matches_numpy_reference(ckpt, tmp_path):
    """--kv-dtype bfloat16 under float32 activations: the greedy ids and their log-probabilities
    of the numpy reference whose keys and values are rounded to bf16, not those of float32 keys
    (which differ by more than the tolerance: the flag must reach the memory), and the [run]
    line says which memory it keeps."""
    directory, config_path, config, params = ckpt
    run = finish(start(["--checkpoint", directory, "--config", config_path, *prompt_flags(),
                        "--temperature", "0", "--max-new-tokens", STEPS, "--json", "--logprobs",
                        "--kv-dtype", "bfloat16"], tmp_path))
    assert_ok(run)
    assert "KV memory bfloat16" in run.stderr
    rounded = config.replace(kv_dtype="bfloat16")
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["output_ids"] for r in records] == expected_outputs(rounded, params)
    for prompt, record in zip(PROMPTS, records):
        got = np.array([entry["logprob"] for entry in record["logprobs"]])
        want = reference_logprobs(rounded, params, prompt, record["output_ids"])
        unrounded = reference_logprobs(config, params, prompt, record["output_ids"])
        np.testing.assert_allclose(got, want, atol=2e-4)
        assert np.abs(got - unrounded).max() > 1e-3


def assert_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}; stderr:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_json_greedy_matches_numpy_reference(generations):
    results, expected, _ = generations
    result = results["json"]
    assert_ok(result)
    lines = result.stdout.splitlines()
    assert len(lines) == 2, f"expected two JSON lines on stdout, got:\n{result.stdout}"
    records = [json.loads(line) for line in lines]
    for i, (record, prompt, want) in enumerate(zip(records, PROMPTS, expected)):
        assert record["index"] == i
        assert record["prompt"] is None
        assert record["prompt_ids"] == list(prompt)
        assert record["text"] is None  # no tokenizer anywhere near the checkpoint
        assert record["output_ids"] == want, f"prompt {i}"
        assert record["finish_reason"] == ("length" if len(want) == STEPS else "eos")
    assert "[run]" in result.stderr  # logs go to stderr, not stdout


def test_one_slot_continuous_batching_matches_reference(generations):
    """Two prompts through one slot, printed in the plain (non-JSON) format."""
    results, expected, _ = generations
    result = results["one_slot"]
    assert_ok(result)
    assert "model=1" in result.stderr and "1 slot(s)" in result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 * len(PROMPTS), result.stdout
    for i, (prompt, want) in enumerate(zip(PROMPTS, expected)):
        header, ids, footer = lines[3 * i: 3 * i + 3]
        assert header == f"--- prompt {i}: {list(prompt)!r}"
        assert [int(t) for t in ids.split()] == want, f"prompt {i}"
        reason = "length" if len(want) == STEPS else "eos"
        assert footer == f"[finish_reason: {reason}, {len(want)} tokens]"


def test_compiled_programs_go_to_the_cache_directory_given(generations):
    results, _, cache = generations
    assert_ok(results["json"])
    assert any(cache.iterdir()), "the persistent compilation cache stayed empty"
    assert "[program cache] prefill: traced, stored" in results["json"].stderr


def test_second_run_loads_the_stored_programs(ckpt, generations, tmp_path):
    """A second run on the same cache directory loads the traced programs (and the compiled
    ones) instead of tracing the model, and prints exactly the first run's output."""
    results, _, cache = generations
    directory, config_path, _, _ = ckpt
    again = finish(start(["--checkpoint", directory, "--config", config_path, *prompt_flags(),
                          "--temperature", "0", "--max-new-tokens", STEPS, "--json"], tmp_path,
                         LLM_RUNTIME_COMPILATION_CACHE=str(cache)))
    assert_ok(again)
    assert "[program cache] prefill: loaded" in again.stderr
    assert "[program cache] decode: loaded" in again.stderr
    assert "traced, stored" not in again.stderr
    assert again.stdout == results["json"].stdout


def test_compilation_cache_location(monkeypatch, tmp_path):
    from runtime import cli
    monkeypatch.delenv(cli.CACHE_ENV, raising=False)
    assert cli.compilation_cache_dir(cli.parse_args([])) is None  # under pytest: off by default
    monkeypatch.delenv("PYTEST_CURRENT_TEST")  # as a user runs it: on, under the cache home
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli.compilation_cache_dir(cli.parse_args([])) == tmp_path / "llm-runtime" / "jax"
    monkeypatch.setenv(cli.CACHE_ENV, "off")
    assert cli.compilation_cache_dir(cli.parse_args([])) is None
    assert cli.compilation_cache_dir(cli.parse_args(["--compilation-cache", "/tmp/c"])) == \
        Path("/tmp/c")
    assert cli.compilation_cache_dir(cli.parse_args(["--compilation-cache", "/tmp/c",
                                                     "--no-compilation-cache"])) is None
    assert cli.compilation_cache_dir(cli.parse_args(["batch", "--input", "i", "--output", "o",
                                                     "--compilation-cache", "off"])) is None


# ---------------------------------------------------------------------------------------------
# Errors: exit code 2, "error: ..." on stderr, no traceback. All fail before compiling, so they
# are started together and checked one by one.

DEMO_PRESENT = (ROOT / "checkpoints" / "demo" / "ckpt-0").is_dir()


def error_cases(directory: Path, config_path: Path, truncated: Path, tmp: Path) -> dict:
    ok = ["--checkpoint", directory, "--config", config_path]
    long_prompt = " ".join(str(10 + i % 200) for i in range(64))  # tiny-test sequence_len is 64
    cases = {
        # name: (argv, substrings the message must hold, one line only)
        "missing_checkpoint": (["--checkpoint", tmp / "nope", "--prompt-ids", "5"],
                               [str(tmp / "nope"), "no such file or directory"], True),
        "truncated_file": (["--checkpoint", truncated, "--config", config_path,
                            "--prompt-ids", "5 6 7"], ["tensor00005_000"], False),
        "unknown_preset": (["--checkpoint", directory, "--config", "no-such-preset",
                            "--prompt-ids", "5"], ["no-such-preset", "tiny-test"], True),
        "mesh_zero": ([*ok, "--prompt-ids", "5", "--mesh", "model=0"], ["--mesh", "'model'"], True),
        "mesh_unknown_axis": ([*ok, "--prompt-ids", "5", "--mesh", "foo=2"], ["--mesh", "foo"],
                              True),
        "mesh_too_big": ([*ok, "--prompt-ids", "5", "--mesh", "model=4096"],
                         ["needs 4096 devices"], True),
        "id_out_of_range": ([*ok, "--prompt-ids", "5 6", "--prompt-ids", "7 256 8"],
                            ["prompt 1", "256", "[0, 256)"], True),
        "not_integers": ([*ok, "--prompt-ids", "5 x 7"], ["--prompt-ids", "expected integers"],
                         True),
        "prompt_too_long": ([*ok, "--prompt-ids", long_prompt], ["64 tokens", "context of 64"],
                            True),
        "text_without_tokenizer": ([*ok, "--prompt", "hi"], ["--tokenizer"], True),
    }
    if not DEMO_PRESENT:
        cases["no_checkpoint_no_demo"] = (["--max-new-tokens", "8"], ["checkpoints/demo"], True)
    return cases


CASE_NAMES = ["missing_checkpoint", "truncated_file", "unknown_preset", "mesh_zero",
              "mesh_unknown_axis", "mesh_too_big", "id_out_of_range", "not_integers",
              "prompt_too_long", "text_without_tokenizer", "no_checkpoint_no_demo"]


@pytest.fixture(scope="module")
def error_runs(ckpt, tmp_path_factory):
    directory, config_path, _, _ = ckpt
    tmp = tmp_path_factory.mktemp("errors")
    truncated = tmp / "truncated"
    shutil.copytree(directory, truncated)
    victim = truncated / "ckpt-0" / "tensor00005_000"
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    cwd = tmp / "cwd"
    cwd.mkdir()
    cases = error_cases(directory, config_path, truncated, tmp)
    procs = {name: start(argv, cwd) for name, (argv, _, _) in cases.items()}
    return {name: (finish(p), cases[name][1], cases[name][2]) for name, p in procs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", CASE_NAMES)
def test_input_errors_are_one_clean_message(error_runs, name):
    if name == "no_checkpoint_no_demo" and DEMO_PRESENT:
        pytest.skip("checkpoints/demo exists: see test_demo_checkpoint_runs")
    result, needles, one_line = error_runs[name]
    assert result.returncode == 2, f"exit {result.returncode}; stderr:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    message = result.stderr[result.stderr.index("error: "):]
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert "\n" not in message.rstrip("\n"), message  # the error itself is one line
    if one_line:  # ... and nothing else was printed (failed before the [run] log line)
        assert result.stderr.splitlines() == errors, result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not DEMO_PRESENT, reason="no demo checkpoint in checkpoints/demo")
def test_demo_checkpoint_runs(tmp_path):
    result = finish(start(["--max-new-tokens", "8"], tmp_path))
    assert_ok(result)
    assert "finish_reason" in result.stdout and result.stdout.strip()


def _run(*argv, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_plan_for_grok1_without_a_checkpoint():
    fits = _run("--plan", "--plan-target", "h100x8", "--cache-length", "8192")
    assert fits.returncode == 0, fits.stderr
    assert "grok-1" in fits.stdout and "=> fits" in fits.stdout
    assert "experts (MoE)" in fits.stdout and "per device" in fits.stdout
    refused = _run("--plan", "--mesh", "model=1", "--device-memory", "80GB")
    assert refused.returncode == 2
    assert "DOES NOT FIT" in refused.stdout and "--mesh" in refused.stdout


def test_a_plan_that_does_not_fit_is_refused_before_loading(ckpt):
    directory, config_path, _, _ = ckpt
    done = _run("--checkpoint", directory, "--config", config_path, "--prompt-ids", "5 6",
                "--device-memory", "1MB")
    assert done.returncode == 2
    assert "nothing was loaded" in done.stderr and "what would fit" in done.stderr
    assert "[load" not in done.stderr and "Traceback" not in done.stderr


def test_checkpoint_flag_errors_come_before_jax_loads(tmp_path):
    """A wrong --checkpoint (or both checkpoint flags) fails at once: JAX is not imported
    (~1 s of a CPU's start) before the one-line error."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import run; "
            "print(run.main(sys.argv[2:]), 'jax' in sys.modules)")
    for argv in (["--checkpoint", tmp_path / "nope"],
                 ["--checkpoint", tmp_path, "--hf-repo", "org/model"],
                 ["batch", "--input", tmp_path / "i", "--output", tmp_path / "o",
                  "--checkpoint", tmp_path / "nope"]):
        done = subprocess.run([sys.executable, "-c", code, str(ROOT), *map(str, argv)],
                              capture_output=True, text=True, timeout=60, env=_env())
        assert done.stdout.split() == ["2", "False"], (argv, done.stdout, done.stderr)
        assert done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1
