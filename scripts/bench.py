#!/usr/bin/env python3
"""Inference benchmark: decode against the memory-bandwidth limit, prefill against the matmul
limit, compile and start-up times, and Hugging Face transformers on the same weights.

  python scripts/bench.py --config tiny-test --batch 1,8 --prompt-len 16 --decode-steps 8
  python scripts/bench.py --checkpoint DIR --batch 1,8,32 --prompt-len 128 --weights float32,int8
  python scripts/bench.py --config demo --peer hf --compile --json out.json
  python scripts/bench.py --suite cpu --json bench-cpu.json --markdown BENCHMARKS.md
  python scripts/bench.py --suite gpu --json bench-gpu.json --markdown BENCHMARKS.md
  python scripts/bench.py --report bench-gpu.json --markdown BENCHMARKS.md   (re-render only)
  python scripts/bench.py --hf-shape smollm-135m --weights float32,int8g0,int8 --quantize int4 \
      --group-size 32 --batch 1,16 --rounds 3     int4 weights (int4g32, int4a32) and others
  python scripts/bench.py --hf-shape smollm-135m --peer llamacpp --prompt-len 64 --rounds 3
      llama.cpp (scripts/bench_llamacpp.py) and the runtime on the same F32/Q8_0/Q4_0 GGUFs

Every measurement runs in a fresh process (scripts/bench_runtime.py for the runtime, through its
real Engine: prefill_many, then decode_async with one step run ahead as Engine.serve does;
scripts/bench_hf.py for transformers), one after another, so
each has the machine to itself and its own peak memory; with --rounds N (the CPU suite: 2) a
peer and the runtime alternate N times and each keeps its fastest round per phase. The
machine's limits are measured in the
same run: memory bandwidth (best of a jitted sum over 1 GiB) and the matmul peak (best of a jitted
square matmul per dtype). Derived per row:
  decode tokens/s per sequence (1 / median step time) and aggregate (batch / step time);
  bytes/step: analytic (runtime/benchmark.py: weights touched, routed experts only, KV over the
    whole cache length S, which the current decode reads); MBU = bytes/step x steps/s / bandwidth;
  prefill tokens/s and MFU = useful FLOPs / time / matmul peak; TTFT = prefill time of the batch;
  compile time cold and with the persistent compilation cache (two fresh processes, one cache).
With --json, the results so far are written after every measurement, so a run cut short (a lent
GPU's time running out) keeps what it measured; --report renders such a file again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_report  # noqa: E402

# Peer shapes (Hugging Face config.json fields): big enough that weights, not Python overhead,
# set the pace, small enough that the CPU suite runs in minutes on two cores.
LLAMA = dict(architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=1024,
             intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
             tie_word_embeddings=False)
MIXTRAL = dict(architectures=["MixtralForCausalLM"], vocab_size=32000, hidden_size=512,
               intermediate_size=1792, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
               max_position_embeddings=4096, sliding_window=None, rms_norm_eps=1e-5,
               tie_word_embeddings=False)
LLAMA_8B = dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
                intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                rope_theta=500000.0, tie_word_embeddings=False)
# A Llama-family model of ~135M parameters (SmolLM-135M's shape), tied embeddings.
SMOLLM_135M = dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=576,
                   intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5,
                   rope_theta=10000.0, tie_word_embeddings=True)
# Mixtral-8x7B's layers at full size (58.7M-weight experts), two of them: the bytes of a real
# MoE step, where MIXTRAL's 0.9M-weight experts measure per-call costs.
MIXTRAL_8X7B_2L = dict(MIXTRAL, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                       num_attention_heads=32, num_key_value_heads=8, rope_theta=1e6)
HF_SHAPES = {"llama": LLAMA, "mixtral": MIXTRAL, "llama-8b": LLAMA_8B,
             "smollm-135m": SMOLLM_135M, "mixtral-8x7b-2l": MIXTRAL_8X7B_2L}
GROK_SLICE = {"config": "grok-1", "overrides": {"num_layers": 4}, "name": "grok-1 x4 layers"}


PARTIAL_JSON: Path | None = None  # --json: rewritten after every measurement


def record(results: dict) -> None:
    """Write the results so far (a run cut short keeps what it measured)."""
    if PARTIAL_JSON is not None:
        PARTIAL_JSON.write_text(json.dumps(results, indent=1))


def worker(script: str, job: dict, timeout: int, env: dict | None = None,
           flags: tuple = ()) -> dict:
    """Run one job in a fresh process; its stderr (progress) passes through."""
    job = {**job, "spawned_at": time.time()}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *flags,
                           json.dumps(job)],
                          stdout=subprocess.PIPE, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    lines = [l for l in done.stdout.splitlines() if l.startswith("BENCH_RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{script} {job.get('job', '')} failed (exit {done.returncode})")
    return json.loads(lines[-1][len("BENCH_RESULT "):])


def engine_run(model: dict, cases, steps: int, cache_length=None, repeats: int = 3,
               timeout: int = 1800) -> dict:
    """One runtime engine job (scripts/bench_runtime.py; int4 weights: int4_job) in a fresh
    process."""
    job = {"job": "engine", "model": model, "cases": cases, "decode_steps": steps,
           "cache_length": cache_length, "repeats": repeats}
    if INT4_WEIGHTS.fullmatch(model.get("weights", "")):
        return worker("bench.py", job, timeout, flags=("--int4-job",))
    return worker("bench_runtime.py", job, timeout)


INT4_WEIGHTS = re.compile(r"int4([ga])(\d+)")  # symmetric (g) or asymmetric (a), group size


def int4_job(job: dict) -> dict:
    """bench_runtime's engine job with the matmul weights int4 (model "weights" int4g<N> or
    int4a<N>): random float32 weights drawn as bench_runtime draws them, quantised on the host
    by quant4.quantize_int4 in groups of N rows; a tied table int8 (its "int8_group_size"), as
    --quantize int4 stores it."""
    import numpy as np
    import bench_runtime
    from runtime.paths import quantized_kind
    from runtime.quant import quantize_embedding
    from runtime.quant4 import quantize_int4
    draw = bench_runtime.random_params

    def random_params(config, weights, seed, group_size, int8_table):
        kind, size = INT4_WEIGHTS.fullmatch(weights).groups()

        def convert(path, leaf):
            quantized = quantized_kind(path, config)
            if quantized == "weight":
                return quantize_int4(np.asarray(leaf), int(size), symmetric=kind == "g")
            if quantized == "embedding" and int8_table:
                return quantize_embedding(np.asarray(leaf), group_size)
            return leaf

        return {module: {name: convert(f"{module}/{name}", leaf) for name, leaf in leaves.items()}
                for module, leaves in draw(config, "float32", seed).items()}

    bench_runtime.random_params = random_params
    return bench_runtime.engine_job(job)


def weight_spec(token: str) -> dict | None:
    """A --weights entry as model spec fields: float32, bfloat16, int8 (as --quantize int8),
    int8g<N> (int8 in groups of N rows, 0: per channel), int4g<N> / int4a<N> (int4,
    symmetric / asymmetric, groups of N rows); None for anything else."""
    if token in ("float32", "bfloat16", "int8") or INT4_WEIGHTS.fullmatch(token):
        return {"weights": token}
    grouped = re.fullmatch(r"int8g(\d+)", token)
    return {"weights": "int8", "int8_group_size": int(grouped[1])} if grouped else None


def add_engine(results: dict, label: str, model: dict, out: dict) -> dict:
    """An engine job's results, recorded under `label`."""
    out.update(label=label, weights=model.get("weights", "float32"))
    results["engine"].append(out)
    record(results)
    return out


def engine(results: dict, label: str, model: dict, cases, steps: int, cache_length=None,
           repeats: int = 3, timeout: int = 1800) -> dict:
    """One engine job's rows added to results; a job that fails is logged and recorded under
    "failed", and the suite goes on (a lent GPU's run is one shot)."""
    try:
        out = engine_run(model, cases, steps, cache_length, repeats, timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"[bench] {label}: {error}", file=sys.stderr)
        results.setdefault("failed", []).append({"label": label, "model": model,
                                                 "error": str(error)})
        record(results)
        return {}
    return add_engine(results, label, model, out)


# A timed row's fields per phase, kept together from the round that ran that phase fastest.
PHASE_FIELDS = {
    "prefill_s": ("prefill_s", "prefill_tokens_per_s", "ttft_s", "prefill_compile_s",
                  "prefill_attention"),
    "decode_step_s": ("decode_step_s", "decode_step_mean_s", "decode_tokens_per_s_per_seq",
                      "decode_tokens_per_s", "decode_compile_s", "decode_attention"),
}


def best_of_rounds(rounds: list[list[dict]]) -> list[dict]:
    """Rows of the same cases (same order) timed in several rounds -> one row per case whose
    prefill fields come from the round with the least prefill time and decode fields from the
    round with the least step time; every round's two times are kept under "round_times"."""
    out = []
    for rows in zip(*rounds):
        row = dict(rows[0])
        for time_key, fields in PHASE_FIELDS.items():
            fastest = min(rows, key=lambda r: r[time_key])
            row.update({f: fastest[f] for f in fields if f in fastest})
        row["round_times"] = [{k: r[k] for k in PHASE_FIELDS} for r in rows]
        out.append(row)
    return out


def compile_probe(results: dict, label: str, model: dict, batch: int, prompt_len: int) -> None:
    """Two fresh processes sharing one empty cache directory: cold, then cached."""
    with tempfile.TemporaryDirectory(prefix="bench-jax-cache-") as cache:
        env = {"JAX_COMPILATION_CACHE_DIR": cache,
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
        job = {"job": "compile", "model": model, "batch": batch, "prompt_len": prompt_len}
        cold = worker("bench_runtime.py", job, 1800, env)
        cached = worker("bench_runtime.py", job, 1800, env)
    results["compile"].append({"label": label, "weights": model.get("weights", "float32"),
                               "batch": batch, "prompt_len": prompt_len, "cold": cold,
                               "cached": cached})
    record(results)


def peer(results: dict, family: str, hf_config: dict, folder: Path, batches, prompt_len: int,
         steps: int, device: str = "cpu", rounds: int = 1) -> None:
    """HF builds and saves random weights and is timed; the runtime loads that very folder and
    does the same work (float32 both sides on the CPU, bfloat16 on a GPU). With several
    rounds the two alternate (HF, runtime, HF, runtime, ...), so that a slow spell of a shared
    machine falls on both sides alike, and each side keeps its best round per phase."""
    weights = "float32" if device == "cpu" else "bfloat16"
    fields = {k: v for k, v in hf_config.items() if k != "architectures"}
    model = {"checkpoint": str(folder), "name": family, "weights": weights}
    hf_runs, our_runs = [], []
    for _ in range(rounds):
        hf_runs.append(worker("bench_hf.py", {
            "family": family, "hf_config": fields, "dir": str(folder), "batches": batches,
            "prompt_len": prompt_len, "decode_steps": steps, "device": device,
            "dtype": weights}, 3600))
        our_runs.append(engine_run(model, [[b, prompt_len] for b in batches], steps))
    hf = {**hf_runs[0], "rows": best_of_rounds([run["rows"] for run in hf_runs]),
          "rounds": rounds,
          "matmul_flops_per_s": max(run["matmul_flops_per_s"] for run in hf_runs)}
    ours = {**our_runs[0], "rows": best_of_rounds([run["rows"] for run in our_runs]),
            "rounds": rounds,
            "peak_memory_bytes": max(run["peak_memory_bytes"] for run in our_runs)}
    add_engine(results, f"{family} (HF weights)", model, ours)
    results["peers"].append({"family": family, "prompt_len": prompt_len, "hf": hf,
                             "runtime_index": results["engine"].index(ours)})
    record(results)


def runpy_first_token(cache_dir: str, timeout: int = 600) -> dict:
    """`python run.py` (demo checkpoint, default arguments) on a pseudo-terminal, so that it
    streams: seconds from spawning the process to its first generated text, and to its exit."""
    import pty
    import select

    from runtime.cli import DEFAULT_PROMPT
    master, slave = pty.openpty()
    env = {**os.environ, "LLM_RUNTIME_COMPILATION_CACHE": cache_dir}
    env.pop("PYTEST_CURRENT_TEST", None)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py")], stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=subprocess.DEVNULL, env=env, cwd=cache_dir)
    os.close(slave)
    text, first = "", None
    while time.perf_counter() - start < timeout:
        if not select.select([master], [], [], 1.0)[0]:
            if proc.poll() is not None:
                break
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        text += chunk.decode(errors="replace")
        if first is None and len(text.strip()) > len(DEFAULT_PROMPT):
            first = time.perf_counter() - start  # the prompt is echoed with the first token
    proc.wait(timeout=60)
    os.close(master)
    return {"first_token_s": first, "exit_s": time.perf_counter() - start,
            "returncode": proc.returncode}


def runpy_probe(results: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-runpy-cache-") as cache:
        results["runpy"] = {"first": runpy_first_token(cache), "second": runpy_first_token(cache)}
        results["runpy"]["cache_files"] = sum(len(f) for _, _, f in os.walk(cache))
    record(results)


# --- suites -------------------------------------------------------------------------------------

def cpu_suite(results: dict, args) -> None:
    steps, prompt = args.decode_steps or 16, 128
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
        llama, mixtral = Path(tmp) / "llama", Path(tmp) / "mixtral"
        rounds = args.rounds or 2
        peer(results, "llama", LLAMA, llama, [1, 16], prompt, steps, rounds=rounds)
        peer(results, "mixtral", MIXTRAL, mixtral, [1, 16], prompt, steps, rounds=rounds)
        for weights in ("bfloat16", "int8"):  # same Llama weights in the other formats
            engine(results, "llama (HF weights)", {"checkpoint": str(llama), "name": "llama",
                                                   "weights": weights},
                   [[1, prompt], [16, prompt]], steps)
        engine(results, "mixtral (HF weights)", {"checkpoint": str(mixtral), "name": "mixtral",
                                                 "weights": "int8"},
               [[1, prompt], [16, prompt]], steps)
        # A cache much longer than the prompt, as `run.py batch` allocates (sequence_len):
        # the decode reads all of it.
        engine(results, "llama (HF weights)", {"checkpoint": str(llama), "name": "llama",
                                               "weights": "float32"},
               [[16, prompt]], steps, cache_length=2048)
        compile_probe(results, "llama (HF weights)", {"checkpoint": str(llama), "name": "llama"},
                      1, prompt)
    compile_probe(results, "demo preset", {"config": "demo"}, 1, 16)
    runpy_probe(results)


def gpu_suite(results: dict, args) -> None:
    """Ordered by what the open targets need most: a lent GPU's time can end the run, and
    --json keeps whatever finished. Batch-1 decode first (MBU; int8 / bf16 with its A/B of
    pallas_gemv.py), then a 32k prompt (issue 20), MoE, k steps per dispatch, the rest."""
    steps = args.decode_steps or 32
    llama = {"hf_config": LLAMA_8B, "weights": "bfloat16", "name": "llama-8B shape"}
    engine(results, "llama-8B shape", {**llama, "weights": "int8"}, [[1, 128]], steps)
    engine(results, "llama-8B shape (XLA int8 products)",
           {**llama, "weights": "int8", "pallas_gemv": False,
            "name": "llama-8B shape XLA int8"}, [[1, 128]], steps)
    engine(results, "llama-8B shape", llama, [[1, 128]], steps)
    # 32k tokens through cuDNN's fused attention (layout.FUSED_ATTENTION)
    long_llama = {**llama, "overrides": {"sequence_len": 32768 + 64}}
    engine(results, "llama-8B shape", long_llama, [[1, 32768]], 8, repeats=1)
    engine(results, GROK_SLICE["name"], {**GROK_SLICE, "weights": "int8"}, [[1, 128]], steps)
    for weights in ("bfloat16", "int8"):  # k decode steps per dispatch (multistep.py)
        engine(results, "llama-8B shape (8 steps per dispatch)",
               {**llama, "weights": weights, "decode_steps": 8,
                "name": "llama-8B shape 8 steps"}, [[1, 128]], steps)
    for weights in ("bfloat16", "int8"):
        engine(results, "llama-8B shape", {**llama, "weights": weights}, [[32, 128]], steps)
    engine(results, "llama-8B shape", long_llama, [[1, 8192]], 8, repeats=2)
    engine(results, "llama-8B shape (blockwise attention)",
           {**long_llama, "fused_attention": False, "name": "llama-8B shape blockwise"},
           [[1, 8192]], 8, repeats=2)
    # A/Bs, batch-1 decode: weights in their stored [I, O] layout (GPU engines store the
    # layers' matmul weights transposed), the decode program under XLA's defaults (CUDA-graph
    # command buffers on: layout.GPU_DECODE_OPTIONS)
    engine(results, "llama-8B shape (weights [in, out])",
           {**llama, "weights": "int8", "transposed": False,
            "name": "llama-8B shape [in, out]"}, [[1, 128]], steps)
    engine(results, "llama-8B shape (XLA command buffers)",
           {**llama, "xla_default_decode": True, "name": "llama-8B shape command buffers"},
           [[1, 128]], steps)
    if torch_has_cuda():  # transformers on the same GPU, same weights, bfloat16
        with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
            peer(results, "llama", LLAMA, Path(tmp) / "llama", [1, 16], 128, steps, "cuda")
            peer(results, "mixtral", MIXTRAL, Path(tmp) / "mixtral", [1, 16], 128, steps, "cuda")
    compile_probe(results, "llama-8B shape", llama, 1, 128)
    runpy_probe(results)


def torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def custom(results: dict, args) -> None:
    if args.peer == "llamacpp":  # the runtime on llama.cpp's own files, nothing else
        llamacpp_peer(results, args)
        print(llamacpp_table(results), file=sys.stderr)
        return
    base = {"checkpoint": str(args.checkpoint)} if args.checkpoint else {"config": args.config}
    if args.checkpoint and args.config:
        base["config"] = args.config
    if args.hf_shape:
        base = {"hf_config": HF_SHAPES[args.hf_shape], "name": args.hf_shape}
    label = str(args.checkpoint or args.config or args.hf_shape)
    cases = [[b, p] for b in args.batch for p in args.prompt_len]
    steps = args.decode_steps or 16
    rounds = {weights: [] for weights in args.weights}
    for _ in range(args.rounds or 1):  # the formats interleaved, round after round
        for weights in args.weights:
            rounds[weights].append(engine_run({**base, **weight_spec(weights)}, cases, steps,
                                              args.cache_length, args.repeats))
    for weights, runs in rounds.items():
        model = {**base, **weight_spec(weights)}
        out = {**runs[0], "rows": best_of_rounds([run["rows"] for run in runs]),
               "rounds": len(runs)}
        add_engine(results, label, model, out)["weights"] = weights
        if args.compile:
            compile_probe(results, label, model, args.batch[0], args.prompt_len[0])
    if args.peer == "hf":
        with tempfile.TemporaryDirectory(prefix="bench-hf-") as tmp:
            peer(results, "llama", LLAMA, Path(tmp) / "llama", [1, 16], 128, steps,
                 rounds=args.rounds or 1)
            peer(results, "mixtral", MIXTRAL, Path(tmp) / "mixtral", [1, 16], 128, steps,
                 rounds=args.rounds or 1)
    if args.runpy:
        runpy_probe(results)
    print(weights_table(results), file=sys.stderr)


LLAMACPP_OURS = {"F32": "float32", "F16": "F16 as stored, float32 products",
                 "BF16": "BF16 as stored, float32 products", "Q8_0": "int8 (Q8_0 as stored)",
                 "Q4_0": "int4 (Q4_0 as stored)"}


def llamacpp_peer(results: dict, args) -> None:
    """llama.cpp (llama-cpp-python, from --llamacpp-path) and the runtime on the very same GGUF
    file per type (random weights of --hf-shape, written once into --gguf-dir), batch 1, in
    fresh processes alternating round after round (ours, llama.cpp, ours, ...), so a slow
    spell of the shared machine falls on both sides alike."""
    import bench_llamacpp
    folder = args.gguf_dir or Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    folder.mkdir(parents=True, exist_ok=True)
    hf = HF_SHAPES[args.hf_shape]
    files = {}
    for qtype in args.gguf_types:
        files[qtype] = folder / f"{args.hf_shape}-{qtype}.gguf"
        if not files[qtype].exists():  # random weights: any earlier file is as good
            bench_llamacpp.write_random_gguf(files[qtype], hf, qtype)
    prompt, steps = args.prompt_len[0], args.decode_steps or 16
    env = {"PYTHONPATH": os.pathsep.join([str(args.llamacpp_path),
                                          os.environ.get("PYTHONPATH", "")])}
    runs = {qtype: ([], [], []) for qtype in args.gguf_types}
    for _ in range(args.rounds or 3):
        for qtype, path in files.items():
            ours, peer_runs, ours_int8_x = runs[qtype]
            model = {"checkpoint": str(path), "name": f"{args.hf_shape} {qtype}"}
            ours.append(engine_run(model, [[1, prompt]], steps, repeats=args.repeats))
            if args.int8_activations and qtype != "F32":  # run.py --int8-activations
                ours_int8_x.append(engine_run(
                    {**model, "int8_activations": True, "name": f"{model['name']} int8 x"},
                    [[1, prompt]], steps, repeats=args.repeats))
            peer_runs.append(worker("bench_llamacpp.py", {
                "job": "decode", "path": str(path), "prompt_len": prompt,
                "decode_steps": steps, "threads": args.llamacpp_threads,
                "repeats": args.repeats}, 1800, env))
            if args.llama_bench:
                peer_runs[-1]["llama_bench"] = llama_bench(args.llama_bench, path, prompt,
                                                           steps, args.llamacpp_threads)
    for qtype, (ours, peer_runs, ours_int8_x) in runs.items():
        for label, mine in ((LLAMACPP_OURS[qtype], ours),
                            (f"{LLAMACPP_OURS[qtype]}, int8 activations", ours_int8_x)):
            if not mine:
                continue
            out = {**mine[0], "rows": best_of_rounds([run["rows"] for run in mine]),
                   "rounds": len(mine)}
            add_engine(results, f"{args.hf_shape} GGUF {qtype}", {"weights": "float32"}, out)
            out["weights"] = label
            results.setdefault("llamacpp", []).append({
                "gguf_type": qtype, "file": str(files[qtype]), "file_bytes":
                files[qtype].stat().st_size, "runtime_index": results["engine"].index(out),
                "runs": peer_runs})
        record(results)


def llama_bench(binary: Path, path: Path, prompt: int, steps: int, threads: int) -> dict:
    """llama.cpp's own llama-bench on the file: tokens/s of a `prompt`-token prefill (pp) and
    of `steps` decoded tokens (tg), each the mean of its 3 repetitions."""
    done = subprocess.run([str(binary), "-m", str(path), "-t", str(threads), "-p", str(prompt),
                           "-n", str(steps), "-r", "3", "-o", "json"], stdout=subprocess.PIPE,
                          text=True, timeout=600, check=True)
    tests = json.loads(done.stdout)
    return {("pp" if t["n_gen"] == 0 else "tg"): t["avg_ts"] for t in tests}


def llamacpp_table(results: dict) -> str:
    """A Markdown table per GGUF type: ms per decoded token at batch 1 (least and median over
    the rounds, each round's own median step), tok/s from the least, ours / llama.cpp, and our
    best tok/s over llama-bench's best tg: llama-bench decodes faster than the Python binding
    (172.5 against 150.3 tok/s, Q8_0 on an AMD VM), so that ratio is the one to quote."""
    lines = ["| GGUF file | ours | ours ms/token, min (median) | ours tok/s | llama.cpp ms/token, "
             "min (median) | llama.cpp tok/s | ours / llama.cpp (median) | llama-bench tg "
             "tok/s (pp), best round | ours / llama-bench tg |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for entry in results.get("llamacpp", []):
        run = results["engine"][entry["runtime_index"]]
        ours = [r["decode_step_s"] for r in run["rows"][0]["round_times"]]
        peer_steps = [r["rows"][0]["decode_step_s"] for r in entry["runs"]]
        mine, theirs = statistics.median(ours), statistics.median(peer_steps)
        benches = [r["llama_bench"] for r in entry["runs"] if "llama_bench" in r]
        best = max(benches, key=lambda b: b["tg"]) if benches else None
        bench_cell = f"{best['tg']:.1f} ({best['pp']:.0f})" if best else "not run"
        tg_ratio = f"{1 / min(ours) / best['tg']:.2f}" if best else "-"
        lines.append(f"| {entry['gguf_type']} ({entry['file_bytes'] / 1e6:.0f} MB) | "
                     f"{run['weights']} | {min(ours) * 1e3:.1f} ({mine * 1e3:.1f}) | "
                     f"{1 / min(ours):.1f} | {min(peer_steps) * 1e3:.1f} ({theirs * 1e3:.1f}) | "
                     f"{1 / min(peer_steps):.1f} | {mine / theirs:.2f} | {bench_cell} | "
                     f"{tg_ratio} |")
    return "\n".join(lines)


def weights_table(results: dict) -> str:
    """A Markdown table of the custom run's decode rows, one per weight format and batch:
    ms per step (least and median over the rounds), tokens/s, bytes per step, and the fraction
    of the bandwidth floor (those bytes at the run's measured bandwidth: MBU)."""
    bandwidth = results["peaks"]["bandwidth_bytes_per_s"]
    lines = ["| weights | B | ms/step, min (median) | tok/s | MB/step (weights + KV) | "
             "fraction of the bandwidth floor |", "| --- | --- | --- | --- | --- | --- |"]
    for run in results["engine"]:
        for row in run["rows"]:
            step = row["decode_step_s"]
            median = statistics.median(r["decode_step_s"] for r in row.get("round_times", [row]))
            total, kv = row["bytes_per_step"]["total"], row["bytes_per_step"]["kv"]
            lines.append(f"| {run['weights']} | {row['batch']} | {step * 1e3:.1f} "
                         f"({median * 1e3:.1f}) | {row['batch'] / step:.1f} | {total / 1e6:.1f} "
                         f"({(total - kv) / 1e6:.1f} + {kv / 1e6:.1f}) | "
                         f"{total / bandwidth / step:.0%} |")
    return "\n".join(lines)


def machine() -> dict:
    info = {"nproc": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_start": os.getloadavg()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in cpuinfo.splitlines()
                           if l.startswith("model name"))
        meminfo = Path("/proc/meminfo").read_text().splitlines()[0]
        info["memory_kib"] = int(meminfo.split()[1])
    except (OSError, StopIteration):
        pass
    try:
        import torch
        import transformers
        info.update(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    return info


def add_llamacpp_args(p) -> None:
    listed = lambda kind: lambda s: [kind(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--gguf-types", type=listed(str), default=["F32", "Q8_0", "Q4_0"],
                   help="--peer llamacpp: the GGUF types to write and time")
    p.add_argument("--gguf-dir", type=Path, default=None,
                   help="--peer llamacpp: keep (and reuse) the GGUF files here")
    p.add_argument("--llamacpp-path", type=Path,
                   default=Path(os.environ.get("LLAMACPP_PYTHONPATH", "/tmp/llamacpp")),
                   help="--peer llamacpp: the folder llama-cpp-python is installed in (pip "
                        "--target), put on the llama.cpp process's PYTHONPATH only")
    p.add_argument("--llama-bench", type=Path, default=None,
                   help="--peer llamacpp: also run this llama-bench binary on each file, each "
                        "round (its pp/tg tokens/s join the table)")
    p.add_argument("--int8-activations", action="store_true",
                   help="--peer llamacpp: on Q8_0 and Q4_0 files, also time ours with "
                        "run.py's --int8-activations (llama.cpp's own arithmetic for them)")
    p.add_argument("--llamacpp-threads", type=int, default=2,
                   help="--peer llamacpp: llama.cpp's threads")


def check_llamacpp_args(p, args) -> None:
    if args.peer == "llamacpp" and (args.suite or args.hf_shape is None):
        p.error("--peer llamacpp: give a Llama-family --hf-shape (Mixtral included; not "
                "--suite)")
    bad = [t for t in args.gguf_types if t not in LLAMACPP_OURS]
    if bad:
        p.error(f"--gguf-types {','.join(bad)}: not {', '.join(LLAMACPP_OURS)}")


def parse_args(argv=None):
    listed = lambda kind: lambda s: [kind(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=("cpu", "gpu"), default=None,
                   help="the published set (BENCHMARKS.md); ignores the model flags")
    p.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint folder")
    p.add_argument("--config", default=None, help="preset or YAML/JSON file (random weights "
                                                  "unless --checkpoint)")
    p.add_argument("--hf-shape", choices=sorted(HF_SHAPES), default=None,
                   help="random weights of a Hugging Face shape (instead of --config)")
    p.add_argument("--batch", type=listed(int), default=[1, 8, 32])
    p.add_argument("--prompt-len", type=listed(int), default=[128])
    p.add_argument("--weights", type=listed(str), default=None,
                   help="comma list of float32, bfloat16, int8 (default: float32 on CPU, "
                        "bfloat16,int8 elsewhere); also int8g<N> (int8 in groups of N rows, "
                        "0: per channel), int4g<N> / int4a<N> (int4 symmetric / asymmetric)")
    p.add_argument("--quantize", choices=("int4",), default=None,
                   help="add int4 weights in groups of --group-size rows to --weights")
    p.add_argument("--group-size", type=int, default=32, help="--quantize int4's group size")
    p.add_argument("--asymmetric", action="store_true",
                   help="--quantize int4: asymmetric only (default: symmetric and asymmetric)")
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode steps (16)")
    p.add_argument("--cache-length", type=int, default=None,
                   help="KV cache length (default: prompt + decode steps + 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed prefill repeats (best kept)")
    p.add_argument("--peer", choices=("hf", "llamacpp"), default=None,
                   help="hf: also time Hugging Face transformers (Llama and Mixtral shapes) on "
                        "the same weights; llamacpp: only llama.cpp and the runtime, batch-1 "
                        "decode on the same GGUF files of --hf-shape (--gguf-types)")
    add_llamacpp_args(p)
    p.add_argument("--rounds", type=int, default=None,
                   help="peer rounds, HF and runtime alternately, best round per phase kept "
                        "(default: 2 in the CPU suite, else 1); without --suite, each weight "
                        "format's engine runs are repeated as well, the formats interleaved")
    p.add_argument("--compile", action="store_true",
                   help="also measure compile time cold and with the persistent cache")
    p.add_argument("--runpy", action="store_true",
                   help="also time `python run.py` twice (first token, cold then cached)")
    p.add_argument("--bandwidth-mib", type=int, default=1024,
                   help="size of the array the bandwidth probe sums (MiB)")
    p.add_argument("--json", type=Path, default=None,
                   help="write all results here (rewritten after every measurement)")
    p.add_argument("--report", type=Path, default=None,
                   help="measure nothing: render the results a --json run wrote (also one cut "
                        "short) as text and, with --markdown, into that file")
    p.add_argument("--profile", type=Path, default=None,
                   help="a diagnostic: each runtime job writes its optimised prefill/decode "
                        "programs (XLA dumps) and a profiler trace of 3 decode steps here")
    p.add_argument("--markdown", type=Path, default=None,
                   help="write the report here (the tables between the markers of an existing "
                        "file are replaced; the text around them is kept)")
    args = p.parse_args(argv)
    if not args.suite and not args.report and not (args.config or args.checkpoint
                                                   or args.hf_shape):
        p.error("give --suite, --config, --checkpoint, --hf-shape or --report")
    if args.quantize:
        forms = "a" if args.asymmetric else "ga"
        args.weights = (args.weights or ["float32"]) + [f"int4{f}{args.group_size}" for f in forms]
    unknown = [w for w in args.weights or [] if weight_spec(w) is None]
    if unknown:
        p.error(f"--weights {','.join(unknown)}: not float32, bfloat16, int8, int8g<N>, "
                "int4g<N> or int4a<N>")
    check_llamacpp_args(p, args)
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds {args.rounds}: must be at least 1")
    return args


def report(results: dict, markdown: Path | None) -> None:
    bench_report.derive(results)
    print(bench_report.text(results))
    if markdown:
        bench_report.write_markdown(results, markdown)


def main(argv=None) -> int:
    global PARTIAL_JSON
    if argv is None and sys.argv[1:2] == ["--int4-job"]:  # engine_run's worker for int4
        print("BENCH_RESULT " + json.dumps(int4_job(json.loads(sys.argv[2]))), flush=True)
        return 0
    args = parse_args(argv)
    if args.report:  # render a saved run again; a run cut short lacks its closing fields
        unreadable = f"bench.py: --report {args.report}: not a results file written by --json"
        try:
            results = json.loads(args.report.read_text())
        except (OSError, ValueError) as error:
            sys.exit(f"{unreadable} ({type(error).__name__}: {error})")
        if not isinstance(results, dict) or not {"machine", "engine"} <= results.keys():
            sys.exit(f"{unreadable} (no 'machine' and 'engine' entries)")
        results.setdefault("seconds", None)
        results["machine"].setdefault("loadavg_end", [float("nan")])
        report(results, args.markdown)
        return 0
    started = time.time()
    PARTIAL_JSON = args.json
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        os.environ["BENCH_PROFILE_DIR"] = str(args.profile.resolve())  # the workers inherit it
    results = {"command": " ".join(["python", "scripts/bench.py", *sys.argv[1:]]),
               "machine": machine(), "peaks": None, "engine": [], "peers": [], "compile": [],
               "runpy": None}
    # The peaks worker, not this process, starts JAX's backend: on a GPU, a backend here would
    # hold most of the device's memory (XLA preallocates) while the workers run.
    peak_weights = None if args.weights is None else sorted(  # dtypes: int8 and int4 alike
        {w if w in ("float32", "bfloat16") else "int8" for w in args.weights})
    results["peaks"] = worker("bench_runtime.py", {"job": "peaks", "weights": peak_weights,
                                                   "suite": bool(args.suite),
                                                   "bandwidth_bytes": args.bandwidth_mib << 20},
                              600)
    results["machine"].update(results["peaks"].pop("jax"))
    if args.weights is None:
        args.weights = ["float32"] if results["machine"]["backend"] == "cpu" \
            else ["bfloat16", "int8"]
    record(results)
    {"cpu": cpu_suite, "gpu": gpu_suite, None: custom}[args.suite](results, args)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["seconds"] = time.time() - started
    report(results, args.markdown)
    record(results)  # with the derived metrics (MBU, MFU, ratios, targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
