"""Shared test helpers: tiny configs, random parameters, conversion to the numpy reference."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# One JAX compilation cache for the whole session, this process and the processes its tests
# start (run.py subprocesses, multi-process jobs): the suite compiles the same tiny programs
# many times over, and most of its time is compiling. Set through JAX's own environment
# variables, before jax is imported: run.py leaves JAX's settings alone under pytest unless a
# test names a cache directory, and a test that does (or scripts/bench.py, which sets these
# variables itself) gets its own. Entries are keyed by the program, so a hit is the same
# executable. Never the user's cache: a fresh directory, removed at exit. Under pytest-xdist the
# controller sets it before starting its workers, which inherit it and share it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="llm-runtime-test-jax-cache-")
    atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)
    os.environ.update({"JAX_COMPILATION_CACHE_DIR": _SESSION_CACHE,
                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})

# The suite starts ~110 Python processes (run.py, launchers, 8-device runs). Where the
# environment sets PYTHONDONTWRITEBYTECODE (this VM does), each compiled the runtime's sources
# again: ~0.35 s a process. The tests let them keep their bytecode (__pycache__ is ignored).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

# XLA:CPU's LLVM back end at its lowest optimisation level for the tests: the suite's time is
# mostly compiling tiny programs, and this cut a ladder case's CPU time by about 40%. The
# emitted code is slower, not different in value: XLA:CPU does not use fast-math, so LLVM may
# not reassociate float arithmetic, and the matmuls are library calls either way. Benchmarks and
# run.py outside pytest keep the defaults. TESTS_OPTIMIZED_XLA=1 keeps them under pytest too.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# And XLA:CPU's older elemental emitters for fusions instead of its MLIR fusion emitters: half
# the suite's compile time again (14:20 -> 9:05 on 2 cores). They may round a transcendental
# an ulp apart, so test_production_emitters.py runs the dtype ladder's numerically delicate
# cases with the emitters run.py uses (TESTS_XLA_FUSION_EMITTERS=1); run.py and the benchmarks
# keep them (no faster at run time there, and ~0.25 s a program faster to compile at -O2).
LEGACY_EMITTERS_FLAG = "--xla_cpu_use_fusion_emitters=false"
if os.environ.get("TESTS_OPTIMIZED_XLA") != "1":
    _fusion_emitters = os.environ.get("TESTS_XLA_FUSION_EMITTERS") == "1"
    _wanted = FAST_COMPILE_FLAGS.split() + ([] if _fusion_emitters else [LEGACY_EMITTERS_FLAG])
    # (a pytest subprocess asking for the emitters drops the flag its parent passed on)
    _flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
              if not (_fusion_emitters and f == LEGACY_EMITTERS_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in _wanted if f not in _flags])


def free_port() -> int:
    """A free TCP port on the loopback interface (for servers and coordinators tests start)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def xla_flags(*extra: str) -> str:
    """XLA_FLAGS for a subprocess: this session's flags plus `extra` (e.g. simulated devices)."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *extra]).strip()


def run_on_8_devices(*args, timeout: int) -> str:
    """Runs `python args...` (a test's script, or -c code) on 8 simulated CPU devices (the
    flag set before jax is imported there); asserts it succeeded; returns its last line."""
    import subprocess
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"),
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def python_in_fresh_process(code: str, unset: tuple = (), timeout: int = 300,
                            **settings) -> str:
    """`python -c code` in a fresh process (the kernels read their RUNTIME_KERNEL_* switches
    once a process) on the CPU, the repository its directory, `settings` in its environment and
    the variables starting with a prefix in `unset` removed; asserts it succeeded; its stdout."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if not (unset and k.startswith(tuple(unset)))}
    env.update({k: str(v) for k, v in settings.items()}, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def saved_in_fresh_process(module: str, function: str, path, unset: tuple = (),
                           **settings) -> dict:
    """The arrays tests/`module`.`function`(path) saves (np.savez) when run in a fresh process
    (python_in_fresh_process, with `unset` and `settings`)."""
    python_in_fresh_process(f"import sys; sys.path[:0] = ['tests', '.']; import {module} as t; "
                            f"t.{function}({str(path)!r})", unset, **settings)
    return dict(np.load(path))


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id (AuthenticAMD, GenuineIntel), or ""."""
    text = Path("/proc/cpuinfo").read_text()
    return next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("vendor_id")), "")


def cpu_family() -> int:
    """/proc/cpuinfo's cpu family (25 = 0x19: AMD Zen 3 and Zen 4; 26: Zen 5), or 0."""
    text = Path("/proc/cpuinfo").read_text()
    return next((int(line.split(":", 1)[1]) for line in text.splitlines()
                 if line.startswith("cpu family")), 0)


def cpu_has_avx512() -> bool:
    """Whether /proc/cpuinfo lists AVX-512 (the kernels build for the CPU they run on)."""
    return " avx512f" in Path("/proc/cpuinfo").read_text()


import reference_numpy  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402

# The fuzz tests of untrusted input (flags, requests, batch records, config files, safetensors
# headers): a bounded run by default; HYPOTHESIS_PROFILE=deep for a long search.
hypothesis_settings.register_profile("default", max_examples=200, deadline=None,
                                     database=None)
hypothesis_settings.register_profile("deep", max_examples=20_000, deadline=None)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

LAYER = "language_model/transformer/layers/decoder_layer/"
# numpy-reference layer key -> (runtime module path under LAYER, parameter name)
REFERENCE_NAMES = {
    "query": ("multi_head_attention/query", "w"), "key": ("multi_head_attention/key", "w"),
    "value": ("multi_head_attention/value", "w"), "linear": ("multi_head_attention/linear", "w"),
    "rms_norm": ("rms_norm", "scale"), "rms_norm_1": ("rms_norm_1", "scale"),
    "rms_norm_2": ("rms_norm_2", "scale"), "rms_norm_3": ("rms_norm_3", "scale"),
    "router": ("router", "w"), "moe_linear": ("moe/linear", "w"),
    "moe_linear_v": ("moe/linear_v", "w"), "moe_linear_1": ("moe/linear_1", "w"),
    "mlp_linear": ("mlp/linear", "w"), "mlp_linear_v": ("mlp/linear_v", "w"),
    "mlp_linear_1": ("mlp/linear_1", "w"),
    "query_norm": ("multi_head_attention/query_norm", "scale"),
    "key_norm": ("multi_head_attention/key_norm", "scale"),
}


def _runtime_module(module: str, norm_type: str) -> str:
    """Norm modules are named by kind: rms_norm* or layer_norm*."""
    return module.replace("rms_norm", "layer_norm") if norm_type == "layer" else module


def tiny_config(**changes):
    from runtime.config import load_config
    return load_config("tiny-test").replace(**changes)


def random_params(config, seed: int = 0, scale: float = 0.1) -> dict:
    """Runtime parameter tree (float32 numpy) drawn by the reference's own random_params."""
    ref = reference_numpy.random_params(config, np.random.default_rng(seed), scale)
    kind = config.norm_type
    params = {"language_model/in_out_embed": {"embeddings": ref["embeddings"]},
              "language_model/" + _runtime_module("rms_norm", kind): {"scale": ref["final_norm"]}}
    if "unembed" in ref:
        params["language_model/unembed"] = {"w": ref["unembed"]}
    for key, (module, name) in REFERENCE_NAMES.items():
        if key in ref["layers"][0]:
            params[LAYER + _runtime_module(module, kind)] = {
                name: np.stack([layer[key] for layer in ref["layers"]])}
    return params


def to_reference(params) -> dict:
    """Runtime parameter tree (float or int8 leaves) -> the reference's float32 layout."""
    from runtime.quant import QuantizedWeight8bit, dequantize

    def dense(leaf):
        return dequantize(leaf) if isinstance(leaf, QuantizedWeight8bit) \
            else np.asarray(leaf, np.float32)

    kind = "layer" if "language_model/layer_norm" in params else "rms"
    modules = {key: (LAYER + _runtime_module(module, kind), name)
               for key, (module, name) in REFERENCE_NAMES.items()}
    stacked = {key: dense(params[module][name])
               for key, (module, name) in modules.items() if module in params}
    layers = stacked["query"].shape[0]
    final_norm = params["language_model/" + _runtime_module("rms_norm", kind)]["scale"]
    reference = {"embeddings": dense(params["language_model/in_out_embed"]["embeddings"]),
                 "final_norm": dense(final_norm),
                 "layers": [{k: v[i] for k, v in stacked.items()} for i in range(layers)]}
    if "language_model/unembed" in params:
        reference["unembed"] = dense(params["language_model/unembed"]["w"])
    return reference


def leaf_kinds(params, *kinds) -> dict:
    """{type name: count} of a parameter tree's leaves, instances of `kinds` counted whole."""
    import jax
    names = [type(leaf).__name__ for leaf in jax.tree.leaves(
        params, is_leaf=lambda a: isinstance(a, kinds))]
    return {name: names.count(name) for name in set(names)}


def panel_engine_outputs(config, params, slots: int, unroll: bool, dtype: str, tiles: bool):
    """(greedy output ids of two requests, the engine) for an engine built with the weights in
    panels or not (layout.TILED_WEIGHTS): one request at a time on one slot, else together."""
    from runtime import layout
    from runtime.engine import build_engine
    from runtime.request import Request

    requests = [Request((5, 6, 7), max_new_tokens=8), Request(tuple(range(3, 12)),
                                                             max_new_tokens=6)]
    saved, layout.TILED_WEIGHTS = layout.TILED_WEIGHTS, tiles
    try:
        engine = build_engine(config.replace(dtype=dtype), params, single_device_mesh(),
                              slots=slots, cache_length=24, unroll_layers=unroll)
    finally:
        layout.TILED_WEIGHTS = saved
    if slots == 1:
        return [c.output_ids for r in requests for c in engine.generate([r])], engine
    return [c.output_ids for c in engine.generate(requests)], engine


def single_device_mesh():
    from runtime.sharding import make_mesh
    return make_mesh({"data": 1, "model": 1})


@pytest.fixture(scope="session")
def config():
    return tiny_config()


@pytest.fixture(scope="session")
def params(config):
    return random_params(config)


@pytest.fixture(scope="session")
def engine3(config, params):
    """3 slots, 32-token cache: shared so its programs compile once per session."""
    from runtime.engine import build_engine
    return build_engine(config, params, single_device_mesh(), slots=3, cache_length=32)


@pytest.fixture(scope="session")
def engine1(config, params):
    from runtime.engine import build_engine
    return build_engine(config, params, single_device_mesh(), slots=1, cache_length=32)
