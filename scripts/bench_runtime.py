#!/usr/bin/env python3
"""The runtime's side of scripts/bench.py: one measurement job per fresh process.

  python scripts/bench_runtime.py '{"job": "peaks"}'               memory bandwidth, matmul peaks
  python scripts/bench_runtime.py '{"job": "engine", "model": ...}' prefill/decode through Engine
  python scripts/bench_runtime.py '{"job": "compile", "model": ...}' compile times, first token

Prints `BENCH_RESULT {json}` as its last stdout line; progress goes to stderr. A fresh process per
job keeps peak memory per model honest, and lets the compile job start with nothing compiled (the
persistent compilation cache is switched on for it through JAX's environment variables).

A model spec: {"config": preset or file, "checkpoint": dir (instead of random weights),
"overrides": {config fields}, "weights": "float32" | "bfloat16" | "int8" (as --quantize int8;
"int8_group_size": N, default the runtime's; "int8_table": false keeps a tied table float),
"dtype": activation dtype for int8 weights (default float32 on CPU, bfloat16 on accelerators), "seed": 0, "unroll":
true | false (the engine's layers unrolled or scanned; default: the engine's own choice),
"transposed": true | false (the layers' matmul weights stored [O, I] or as stored; default:
the engine's own choice), "xla_default_decode": true (the decode program without layout.GPU_DECODE_OPTIONS),
"dense_attention": true (long prompts attend densely, not blockwise), "attention_block": N (their
block size), "prefill_kernel": false (prompts attend through XLA, not the CPU kernel), "int8_activations":
true (int4 weights multiply x rounded to int8, as run.py --int8-activations), "layer_types": false
(a GGUF layer stack of several types as one int8 stack, not one stack per type),
"prefill_chunk": N (prompts longer than N prefilled in chunks of N, as the scheduler feeds
them; default 0: whole prompts)}; or
"hf_config": a Hugging Face config.json as a dict (a Llama-8B shape) instead of "config".
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# bench.py --profile DIR: this process's optimised prefill/decode programs go to DIR/<pid>/ (set
# before JAX starts its backend), and measure() traces a few decode steps into DIR/trace-*.
PROFILE_DIR = os.environ.get("BENCH_PROFILE_DIR")
if PROFILE_DIR:
    os.environ["XLA_FLAGS"] = " ".join([
        os.environ.get("XLA_FLAGS", ""), f"--xla_dump_to={PROFILE_DIR}/{os.getpid()}",
        "--xla_dump_hlo_as_text", "--xla_dump_hlo_module_re=jit__(decode|prefill)_fn"])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from runtime.benchmark import (decode_bytes, decode_flops, memory_bytes_read,  # noqa: E402
                               prefill_flops)
from runtime.checkpoint.hf_config import config_from_hf  # noqa: E402
from runtime.checkpoint.load import (default_config, load_params_on_mesh,  # noqa: E402
                                     quantized_kind)
from runtime.config import DEFAULT_INT8_GROUP_SIZE, load_config  # noqa: E402
from runtime.cpu_kernels import (int4_digits, panels_read_2_byte_floats,  # noqa: E402
                                 prefetch_bytes, table_blocks_ahead)
from runtime.engine import Engine, build_engine  # noqa: E402
from runtime.layout import CPU_FLOAT32_OPTIONS  # noqa: E402
from runtime.parameter_shapes import abstract_params  # noqa: E402
from runtime.models import build_model  # noqa: E402
from runtime import layout as runtime_layout  # noqa: E402
from runtime.quant import QuantizedEmbedding, quantize_on_device, row_blocks_for  # noqa: E402
from runtime.request import Request  # noqa: E402
from runtime.sampling_state import neutral_rows  # noqa: E402
from runtime.sharding import default_mesh_sizes, make_mesh, place_params  # noqa: E402


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def best_time(fn, *args, repeats: int) -> float:
    """Fastest of `repeats` calls after one warm-up (which compiles): the least disturbed run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


# --- peaks --------------------------------------------------------------------------------------

def peak_dtypes(job: dict, cpu: bool) -> list[str]:
    """The activation dtypes whose matmul peak a run needs: both for a suite, else those of
    job["weights"] (default: float32 on a CPU, bfloat16 and int8 elsewhere), int8 weights
    computing in float32 on a CPU and bfloat16 elsewhere."""
    if job.get("suite"):
        return ["float32", "bfloat16"]
    weights = job.get("weights") or (["float32"] if cpu else ["bfloat16", "int8"])
    return sorted({("float32" if cpu else "bfloat16") if w == "int8" else w for w in weights})


def peaks(job: dict) -> dict:
    """Memory bandwidth (a jitted sum over a 1 GiB float32 array, far larger than any cache:
    reads it once; a copy would also pay for page-faulting its fresh output) and the matmul
    peak (square, per dtype); and what JAX runs on (the parent never starts a backend)."""
    cpu = jax.default_backend() == "cpu"
    array = jnp.ones((job.get("bandwidth_bytes", 1 << 30) // 4,), jnp.float32)
    seconds = best_time(jax.jit(jnp.sum), array, repeats=5 if cpu else 20)
    out = {"bandwidth_bytes_per_s": array.nbytes / seconds,
           "bandwidth_probe": f"sum over {array.nbytes / 2**30:.2g} GiB f32",
           "matmul_flops_per_s": {}}
    if not cpu:  # accelerators: a scaled copy (read + write) can beat a reduction's rate
        seconds = best_time(jax.jit(lambda a: a * 2), array, repeats=20)
        if 2 * array.nbytes / seconds > out["bandwidth_bytes_per_s"]:
            out["bandwidth_bytes_per_s"] = 2 * array.nbytes / seconds
            out["bandwidth_probe"] = f"scaled copy of {array.nbytes / 2**30:.2g} GiB f32 " \
                                     f"(read + write)"
    del array
    size = job.get("matmul_size") or (2048 if cpu else 8192)
    for dtype in peak_dtypes(job, cpu):
        a = jnp.ones((size, size), dtype)
        # XLA's defaults, and the options the engine compiles float32 programs with on the CPU
        # (its Eigen kernels, not YNNPACK): the peak is the faster, so MFU stays <= 100%.
        options = [None] + ([CPU_FLOAT32_OPTIONS] if cpu and dtype == "float32" else [])
        out["matmul_flops_per_s"][dtype] = max(2 * size ** 3 / best_time(
            jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32),
                    compiler_options=chosen), a, a, repeats=5 if cpu else 20)
            for chosen in options)
    out["matmul_size"] = size
    # The rate a lone matrix-vector product streams a weight far larger than any cache: what a
    # batch-1 decode's matmuls can reach on this machine (on a 2-core CPU, well below the sum's).
    rows = job.get("matvec_size") or (8192 if cpu else 16384)
    dtype = jnp.float32 if cpu else jnp.bfloat16
    weight, vector = jnp.ones((rows, rows), dtype), jnp.ones((1, rows), dtype)
    seconds = best_time(jax.jit(lambda v, w: v @ w), vector, weight, repeats=5 if cpu else 20)
    out["matvec_bytes_per_s"] = weight.nbytes / seconds
    out["matvec_probe"] = f"[1, {rows}] x [{rows}, {rows}] {jnp.dtype(dtype).name}"
    out["jax"] = {"jax": jax.__version__, "backend": jax.default_backend(),
                  "device": jax.devices()[0].device_kind, "device_count": jax.device_count()}
    return out


# --- models -------------------------------------------------------------------------------------

def activation_dtype(spec: dict) -> str:
    weights = spec.get("weights", "float32")
    if weights in ("float32", "bfloat16"):
        return weights
    return spec.get("dtype") or ("float32" if jax.default_backend() == "cpu" else "bfloat16")


def model_config(spec: dict, cache_length: int):
    if spec.get("checkpoint"):
        folder = Path(spec["checkpoint"])
        config = load_config(spec["config"]) if spec.get("config") else \
            default_config(folder) or load_config(folder / "config.yaml")
    elif spec.get("hf_config"):  # a shape given as a Hugging Face config.json
        config = config_from_hf(spec["hf_config"])
    else:
        config = load_config(spec["config"])
    config = config.replace(**spec.get("overrides", {}), dtype=activation_dtype(spec))
    if config.sequence_len < cache_length:  # only a limit: longer caches need a larger one
        config = config.replace(sequence_len=cache_length)
    return config


def random_params(config, weights: str, seed: int, group_size: int = DEFAULT_INT8_GROUP_SIZE,
                  int8_table: bool = True):
    """Random weights drawn on the device straight into the stored format, by one jitted
    program (compiled once, not once per leaf): float leaves in the activation dtype (float32
    for float32 weights), int8 for what --quantize int8 --int8-group-size `group_size`
    quantises (the matmul weights, and with `int8_table` a tied embedding table), drawn and
    quantised one layer at a time so that a large model (a Grok-1 slice) never holds more
    than one layer of a weight in float32. Normal with standard deviation 1/sqrt(fan-in) (the
    embeddings 1/sqrt(D)); norm scales 1."""
    float_dtype = jnp.float32 if weights == "float32" else jnp.dtype(config.dtype)
    abstract = abstract_params(config)

    def int8(w):  # [..., I, O]
        return quantize_on_device(w, row_blocks_for(w.shape[-2], group_size))

    def draw(key, shape, path):
        if path.endswith("/scale") or len(shape) < 2:
            return jnp.ones(shape, float_dtype)
        std = 1.0 / math.sqrt(config.emb_size if "embeddings" in path else shape[-2])
        normal = lambda k, s: jax.random.normal(k, s, jnp.float32) * std  # noqa: E731
        kind = quantized_kind(path, config) if weights == "int8" else None
        if kind == "embedding" and int8_table:
            head = int8(normal(key, shape).T)  # [D, V]
            return QuantizedEmbedding(head.weight.T, head.scales)
        if kind != "weight":
            return normal(key, shape).astype(float_dtype)
        if len(shape) == 2:
            return int8(normal(key, shape))
        return jax.lax.map(lambda k: int8(normal(k, shape[1:])),
                           jax.random.split(key, shape[0]))  # [L, ...]: a layer at a time

    @jax.jit
    def make(key):
        return {module: {name: draw(jax.random.fold_in(key, 1000 * i + j), tuple(leaf.shape),
                                    f"{module}/{name}")
                         for j, (name, leaf) in enumerate(sorted(leaves.items()))}
                for i, (module, leaves) in enumerate(sorted(abstract.items()))}

    # RBG keys: threefry's unrolled rounds take seconds to compile on a CPU, RBG a fraction
    return make(jax.random.key(seed, impl="rbg"))


def load_model(spec: dict, cache_length: int):
    """(config, model, params placed on the mesh, mesh) for a spec; params from the checkpoint
    (int8 quantised at load as run.py --quantize int8 does) or random."""
    config = model_config(spec, cache_length)
    weights = spec.get("weights", "float32")
    if spec.get("xla_default_decode"):  # an A/B of layout.GPU_DECODE_OPTIONS
        runtime_layout.GPU_DECODE_OPTIONS = None
    if spec.get("dense_attention"):  # an A/B of blockwise attention for long prompts
        runtime_layout.BLOCKWISE_MIN_LENGTH = 1 << 62
    if spec.get("dense_attention") or spec.get("prefill_kernel") is False:  # XLA's paths
        runtime_layout.PREFILL_ATTENTION_IN_KERNEL = False
    if spec.get("pallas_gemv") is False:  # an A/B of pallas_gemv.py's int8 GEMV on GPUs
        runtime_layout.PALLAS_INT8_GEMV = False
    if spec.get("fused_attention") is False:  # an A/B of cuDNN's prompt attention on GPUs
        runtime_layout.FUSED_ATTENTION = None
    if spec.get("int8_activations"):  # run.py --int8-activations (int4 weights)
        runtime_layout.INT8_ACTIVATIONS = True
    if spec.get("layer_types") is False:  # an A/B of layer_types.py (one int8 stack instead)
        runtime_layout.LAYER_TYPES_KEPT = False
    if spec.get("attention_block"):  # an A/B of its block size
        runtime_layout.ATTENTION_BLOCK = spec["attention_block"]
    mesh = make_mesh(default_mesh_sizes(abstract_params(config), jax.device_count()))
    start = time.perf_counter()
    if spec.get("checkpoint"):  # read as run.py reads it (2-byte floats widened on the CPU)
        widen = None if weights == "bfloat16" else runtime_layout.widen_floats_at_load(config)
        params = load_params_on_mesh(Path(spec["checkpoint"]), config, mesh,
                                     quantize_to="int8" if weights == "int8" else None,
                                     widen_floats_to=widen,
                                     keep_matmul_floats=panels_read_2_byte_floats(config),
                                     int8_group_size=spec.get("int8_group_size",
                                                              DEFAULT_INT8_GROUP_SIZE))
        if weights == "bfloat16":
            params = jax.tree.map(lambda a: np.asarray(a).astype(jnp.bfloat16), params)
    else:
        params = random_params(config, weights, spec.get("seed", 0),
                               spec.get("int8_group_size", DEFAULT_INT8_GROUP_SIZE),
                               spec.get("int8_table", True))
    params = jax.block_until_ready(place_params(params, mesh))  # once; Engine then reuses it
    log(f"{config_label(spec)} {weights}: parameters ready in {time.perf_counter() - start:.1f} s")
    return config, build_model(config), params, mesh


def config_label(spec: dict) -> str:
    return spec.get("name") or spec.get("checkpoint") or spec.get("config")


def peak_memory() -> dict:
    """Device peak (accelerators report it), else the process's maximum resident set."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return {"peak_memory_bytes": stats["peak_bytes_in_use"], "peak_memory_source": "device"}
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_memory_source": "host maxrss"}


# --- one (batch, prompt length) through the engine ----------------------------------------------

def decode_inputs(tokens) -> tuple:
    """Engine.decode's arguments for all rows active and greedy: tokens, active, steps,
    settings."""
    batch = len(tokens)
    return (np.asarray(tokens, np.int32), np.ones(batch, bool), np.zeros(batch, np.int32),
            neutral_rows(batch))


def prefill(engine: Engine, admitted, chunked: bool) -> list[int]:
    """The first tokens of the admitted (slot, request) pairs: prefilled together, or with
    `chunked` each prompt fed in the engine's chunks (as the scheduler feeds a long one)."""
    if not chunked:
        return engine.prefill_many(admitted)
    firsts = []
    for slot, request in admitted:
        fed, first = 0, None
        while first is None:
            fed, first = engine.prefill_chunk(slot, request, fed)
        firsts.append(int(first.tokens[0]))
    return firsts


def measure(engine: Engine, batch: int, prompt_len: int, steps: int, repeats: int, rng,
            tag: str = "", chunked: bool = False) -> dict:
    vocab = engine.config.vocab_size
    prompts = rng.integers(3, vocab, (batch, prompt_len))
    admitted = [(i, Request(tuple(int(t) for t in row), max_new_tokens=steps + 1))
                for i, row in enumerate(prompts)]
    start = time.perf_counter()
    first = prefill(engine, admitted, chunked)  # compiles the prefill program(s)
    prefill_first = time.perf_counter() - start
    prefill_times = []
    for _ in range(repeats):  # the same prompts into the same slots again: identical work
        start = time.perf_counter()
        first = prefill(engine, admitted, chunked)
        prefill_times.append(time.perf_counter() - start)

    tokens = np.asarray(first, np.int32)
    start = time.perf_counter()
    tokens = engine.decode(*decode_inputs(tokens))  # compiles
    decode_first = time.perf_counter() - start
    # How much of the memory a step attends over: all of it, unless the engine reads a window
    # over the filled part (then the window it picks now, at the first timed step).
    window = getattr(engine, "_decode_window", lambda active: None)(np.ones(batch, bool))
    tokens, step_times = timed_decode(engine, tokens, steps)
    if PROFILE_DIR:
        tokens = trace_decode(engine, tokens, f"{PROFILE_DIR}/trace-{tag}-b{batch}-p{prompt_len}")
    prefill_s, decode_s = min(prefill_times), statistics.median(step_times)
    return {"batch": batch, "prompt_len": prompt_len, "cache_length": engine.cache_length,
            "kv_read_length": window or engine.cache_length,
            "decode_steps": steps, "steps_per_dispatch": engine.decode_steps,
            "prefill_s": prefill_s, "ttft_s": prefill_s,
            "prefill_tokens_per_s": batch * prompt_len / prefill_s,
            "prefill_compile_s": max(prefill_first - prefill_s, 0.0),
            "decode_step_s": decode_s, "decode_step_mean_s": statistics.fmean(step_times),
            "decode_tokens_per_s_per_seq": 1.0 / decode_s,
            "decode_tokens_per_s": batch / decode_s,
            "decode_compile_s": max(decode_first - decode_s, 0.0)}


def timed_decode(engine: Engine, tokens, steps: int) -> tuple[np.ndarray, list[float]]:
    """`steps` greedy decode steps as the engine serves them: k per dispatch (multistep.py)
    when it takes several, else one at a time dispatched one ahead; seconds per step."""
    if engine.decode_steps > 1:
        return decode_blocks(engine, tokens, steps)
    return decode_ahead(engine, tokens, steps)


def decode_blocks(engine: Engine, tokens, steps: int) -> tuple[np.ndarray, list[float]]:
    """At least `steps` greedy decode steps through Engine.decode_block, k per dispatch (no
    stops, budgets past the run): the last tokens and each block's seconds / k, after one
    compiling block."""
    batch, k = len(tokens), engine.decode_steps
    active, settings = np.ones(batch, bool), neutral_rows(batch)
    stops, budgets = [[] for _ in range(batch)], np.full(batch, 1 << 20, np.int32)
    step_times = []
    for block in range(1 + -(-steps // k)):
        start = time.perf_counter()
        sampled = engine.decode_block(tokens, active, np.zeros(batch, np.int32), settings,
                                      stops, budgets)
        tokens = np.asarray(sampled.tokens[:, -1], np.int32)
        if block:  # the first compiles
            step_times.append((time.perf_counter() - start) / k)
    return tokens, step_times


def decode_ahead(engine: Engine, tokens, steps: int) -> tuple[np.ndarray, list[float]]:
    """`steps` greedy decode steps, tokens fed back as Engine.serve runs a generation: each
    step is dispatched from the previous step's tokens on the device before the host reads
    those. Returns the last tokens read and the seconds between consecutive reads (one step
    each in the steady state); one more step than `steps` is dispatched, the one run ahead."""
    inputs = decode_inputs(tokens)[1:]
    pending = engine.decode_async(tokens, *inputs).tokens
    step_times = []
    for _ in range(steps):
        start = time.perf_counter()
        ahead = engine.decode_async(pending, *inputs).tokens
        tokens = np.asarray(pending)
        pending = ahead
        step_times.append(time.perf_counter() - start)
    return np.asarray(pending), step_times


def trace_steps() -> int:
    """The decode steps a profiler trace covers: BENCH_TRACE_STEPS, default 3."""
    text = os.environ.get("BENCH_TRACE_STEPS", "3")
    if not text.isdigit() or int(text) < 1:
        raise SystemExit(f"bench_runtime: BENCH_TRACE_STEPS must be a positive integer, "
                         f"not {text!r}")
    return int(text)


def trace_decode(engine: Engine, tokens, folder: str):
    """A profiler trace (Perfetto JSON included) of trace_steps() decode steps; returns the
    tokens. A diagnostic only: a profiler that fails to start is reported, not fatal."""
    steps = trace_steps()
    from trace_ops import STEPS_FILE  # trace_ops.py counts k tokens a block
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / STEPS_FILE).write_text(f"{engine.decode_steps}\n")
    try:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            tokens, _ = timed_decode(engine, tokens, steps)
    except Exception as error:  # noqa: BLE001 (the measurement stands without the trace)
        log(f"profiler trace failed: {type(error).__name__}: {error}")
    return tokens


def engine_job(job: dict) -> dict:
    """job["cases"]: [[batch, prompt_len], ...]; each gets an engine with a cache of
    job["cache_length"] (default prompt + decode steps + 1: what the run fills)."""
    spec, steps = job["model"], job["decode_steps"]
    extra = 1 + (spec.get("decode_steps") or 0)  # multi-step: the compiling block too
    cases = [(b, p, job.get("cache_length") or p + steps + extra) for b, p in job["cases"]]
    config, model, params, mesh = load_model(spec, max(s for _, _, s in cases))
    rng = np.random.default_rng(spec.get("seed", 0))
    rows = []
    for batch, prompt_len, cache_length in cases:
        engine = build_engine(model.config, params, mesh, slots=batch, cache_length=cache_length,
                              unroll_layers=spec.get("unroll"),
                              transpose_weights=spec.get("transposed"),
                              prefill_chunk=spec.get("prefill_chunk", 0),
                              decode_steps=spec.get("decode_steps"))
        tag = re.sub(r"[^A-Za-z0-9.]+", "_", f"{config_label(spec)}-{spec.get('weights')}")
        row = measure(engine, batch, prompt_len, steps, job.get("repeats", 3), rng, tag,
                      chunked=bool(engine.chunk_size) and prompt_len > engine.chunk_size)
        # the engine's own tree (panels, super-scaled tables), not the loaded one
        row["bytes_per_step"] = decode_bytes(model, engine.params, batch, row["kv_read_length"])
        row["engine_param_bytes"] = sum(x.nbytes for x in jax.tree.leaves(engine.params))
        del engine  # frees its KV memory before the next one is allocated
        # what an attention over the filled part only would read (mean filled length)
        row["kv_filled_bytes"] = memory_bytes_read(model, batch, prompt_len + steps // 2 + 1)
        row["prefill_flops"] = prefill_flops(config, params, batch, prompt_len)
        row["decode_flops"] = decode_flops(config, params, batch, row["kv_read_length"])
        rows.append(row)
        log(f"{config_label(spec)} {spec.get('weights', 'float32')} B={batch} P={prompt_len} "
            f"S={cache_length}: prefill {row['prefill_tokens_per_s']:.0f} tok/s, decode "
            f"{row['decode_tokens_per_s']:.1f} tok/s ({row['decode_step_s'] * 1e3:.1f} ms/step)")
    backend = jax.default_backend()
    return {"rows": rows, "platform": backend, "dtype": config.dtype,
            "param_bytes": sum(x.nbytes for x in jax.tree.leaves(params)), **peak_memory(),
            **({"kernel_prefetch_bytes": prefetch_bytes(), "int4_digits": int4_digits(),
                "kernel_table_blocks_ahead": table_blocks_ahead()}
               if backend == "cpu" else {})}


def compile_job(job: dict) -> dict:
    """Compile times of the prefill and decode programs and the time to the first token from
    the process start (job["spawned_at"], the parent's clock). The parent runs this twice with
    one cache directory: cold, then with the persistent compilation cache filled."""
    spec, batch, prompt_len = job["model"], job["batch"], job["prompt_len"]
    _, model, params, mesh = load_model(spec, prompt_len + 3)
    engine = build_engine(model.config, params, mesh, slots=batch, cache_length=prompt_len + 3)
    prompts = np.random.default_rng(0).integers(3, model.config.vocab_size, (batch, prompt_len))
    admitted = [(i, Request(tuple(int(t) for t in row))) for i, row in enumerate(prompts)]
    times = {}
    for name, call in (("prefill", lambda: engine.prefill_many(admitted)),
                       ("decode", lambda: engine.decode(*decode_inputs(np.zeros(batch))))):
        start = time.perf_counter()
        call()  # compiles (or loads from the cache), then runs
        times[name] = time.perf_counter() - start
        if name == "prefill":
            first_token = time.time() - job["spawned_at"]
        start = time.perf_counter()
        call()
        times[name] -= time.perf_counter() - start  # minus one warm call: the compile alone
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
    return {"prefill_compile_s": times["prefill"], "decode_compile_s": times["decode"],
            "first_token_from_start_s": first_token,
            "process_s": time.time() - job["spawned_at"],
            "cache_entries": len(os.listdir(cache)) if os.path.isdir(cache) else 0}


def main() -> None:
    job = json.loads(sys.argv[1])
    result = {"peaks": peaks, "engine": engine_job, "compile": compile_job}[job["job"]](job)
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
