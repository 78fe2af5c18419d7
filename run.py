#!/usr/bin/env python3
"""Sample from a language-model checkpoint: flags -> config, mesh, checkpoint, generate.

  python run.py                                   # the demo checkpoint in checkpoints/demo
  python run.py --checkpoint DIR --prompt "..."   # DIR holds ckpt-0/ and tokenizer.model
  python run.py --checkpoint DIR --config FILE --prompt-ids "5 6 7" --temperature 0 --json
  python run.py batch --input prompts.jsonl --output results.jsonl [--checkpoint DIR ...]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DEMO_CHECKPOINT = ROOT / "checkpoints" / "demo"
DEFAULT_PROMPT = "Return the"  # docstrings often start so: the demo model was trained on them
CACHE_ENV = "LLM_RUNTIME_COMPILATION_CACHE"  # a directory, or "off"


def _env_int(name: str):
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def compilation_cache_dir(args) -> Path | None:
    """Where compiled programs persist between runs: --compilation-cache DIR, else
    $LLM_RUNTIME_COMPILATION_CACHE (a directory, or "off"), else ~/.cache/llm-runtime/jax
    ($XDG_CACHE_HOME respected). None (off) with --no-compilation-cache, and by default under
    pytest, so that test runs never fill the user's cache (a test that wants it names a
    directory)."""
    if args.no_compilation_cache:
        return None
    chosen = args.compilation_cache or os.environ.get(CACHE_ENV)
    if chosen:
        return None if chosen.lower() in ("off", "0", "none") else Path(chosen).expanduser()
    if "PYTEST_CURRENT_TEST" in os.environ:
        return None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llm-runtime" / "jax"


def enable_compilation_cache(args) -> None:
    """Turn on JAX's persistent compilation cache: a second run of the same model loads its
    prefill and decode programs instead of compiling them (seconds on a CPU, minutes for
    Grok-1 on accelerators). Entries are keyed by the program, the JAX version and the devices,
    so a stale entry is never used."""
    directory = compilation_cache_dir(args)
    if directory is None:
        return
    import jax
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # JAX's defaults skip programs that compile in under a second, which is every CPU program
    # of a small model; a cache hit is one file read, so keep them all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def enable_program_cache(args) -> None:
    """With the compilation cache, keep the traced programs too (runtime/program_cache.py): a
    later start loads them instead of tracing the model. After init_distributed: it asks how
    many processes there are (single-process runs only)."""
    directory = compilation_cache_dir(args)
    if directory is not None:
        from runtime import program_cache
        program_cache.activate(directory / "llm-runtime-programs")


def init_distributed(args) -> None:
    """Join the JAX multi-controller runtime when asked to (flags, environment, or cluster)."""
    if not (args.distributed or args.coordinator or args.num_processes):
        return
    import jax

    # Native collective libraries (gloo) print connection chatter on file descriptor 1; send the
    # descriptor to stderr and keep Python's stdout on the real one, so --json stays clean.
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(real_stdout, "w", buffering=1)

    from runtime.errors import RuntimeInputError
    if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS",
                                                                       "cpu") == "cpu":
        # CPU-only multi-process runs need a collectives backend; gloo ships with jaxlib.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {} if args.distributed and not args.coordinator else dict(
        coordinator_address=args.coordinator, num_processes=args.num_processes,
        process_id=args.process_id)
    if args.coordinator and args.process_id:
        # JAX aborts the whole process (no exception) when the coordinator never answers; probe
        # it first so that an unreachable coordinator is a one-line error.
        from runtime.distributed import wait_for_coordinator
        wait_for_coordinator(args.coordinator, args.init_timeout)
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=args.init_timeout,
                                   heartbeat_timeout_seconds=args.heartbeat_timeout)
    except Exception as e:  # jax raises RuntimeError/ValueError/XlaRuntimeError here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeInputError(f"multi-host start failed (coordinator {args.coordinator or 'auto'}"
                                f", {args.num_processes} processes, this is process "
                                f"{args.process_id}, waited up to {args.init_timeout} s): "
                                f"{first}") from None


# Sampling defaults where neither a flag nor the checkpoint's generation_config.json sets one.
BUILTIN_SAMPLING = {"max_new_tokens": 64, "temperature": 0.8, "top_p": 0.95, "top_k": 0}


def checkpoint_sampling(checkpoint: Path) -> dict:
    """The sampling defaults a checkpoint's generation_config.json sets (see
    runtime/checkpoint/generation_config.py); {} when it has none."""
    from runtime.checkpoint.generation_config import read_generation_config, sampling_defaults
    folder = _next_to(checkpoint, "generation_config.json")
    return sampling_defaults(read_generation_config(folder.parent), str(folder)) if folder else {}


def help_sampling_defaults(prog: str, argv) -> tuple[dict, dict]:
    """(defaults, where each came from) for --help: the built-in ones, overridden by the
    generation_config.json of the --checkpoint on the command line (or of the demo)."""
    pre = argparse.ArgumentParser(prog=prog, add_help=False)
    pre.add_argument("--checkpoint", type=Path, default=None)
    checkpoint = pre.parse_known_args(argv)[0].checkpoint or DEMO_CHECKPOINT
    try:
        found = checkpoint_sampling(checkpoint) if checkpoint.is_dir() else {}
    except Exception:  # noqa: BLE001 - a bad file is reported when the model opens, not in --help
        found = {}
    return {**BUILTIN_SAMPLING, **found}, {key: " (generation_config.json)" for key in found}


def fill_sampling_defaults(args, checkpoint: Path) -> None:
    """Sampling flags not given take the checkpoint's generation_config.json values, else the
    built-in defaults: flags win."""
    values = {**BUILTIN_SAMPLING, **checkpoint_sampling(checkpoint)}
    for key, value in values.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def group_size(text: str) -> int:
    """--int8-group-size: 0 or a positive integer (argparse reports anything else)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 (one scale per output channel) or a "
                                         f"positive number of input rows, got {text!r}")
    return value


def add_model_args(p: argparse.ArgumentParser, argv=()) -> None:
    from runtime.config import DEFAULT_INT8_GROUP_SIZE
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a Grok-1 download (with ckpt-0/) or its ckpt-0 folder, a Hugging Face "
                        "model folder (config.json + *.safetensors), or a converted checkpoint; "
                        "default: the demo checkpoint in checkpoints/demo")
    p.add_argument("--hf-repo", default=None, metavar="ORG/NAME",
                   help="download a Hugging Face model (only the files the runtime reads; "
                        "resumable; a cached copy works offline) and use it as --checkpoint")
    p.add_argument("--revision", default=None, help="with --hf-repo: branch, tag or commit")
    p.add_argument("--config", default=None,
                   help="preset name (see configs/) or YAML/JSON file; default: config.yaml next "
                        "to the checkpoint, else its config.json (Hugging Face), else grok-1")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.model (SentencePiece) or tokenizer.json; default: the one "
                        "next to the checkpoint")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="store float matmul weights (and a tied embedding table) as int8 at load")
    p.add_argument("--int8-group-size", type=group_size, default=DEFAULT_INT8_GROUP_SIZE,
                   metavar="N",
                   help="with --quantize int8: one scale per output channel and group of at "
                        "most N input rows; 0 = one scale per output channel (default: "
                        f"{DEFAULT_INT8_GROUP_SIZE})")
    defaults, origin = help_sampling_defaults(p.prog, argv)
    shown = lambda key: f"default: {defaults[key]}{origin.get(key, '')}"  # noqa: E731
    p.add_argument("--max-new-tokens", type=int, default=None, help=shown("max_new_tokens"))
    p.add_argument("--temperature", type=float, default=None,
                   help=f"0 = greedy; {shown('temperature')}")
    p.add_argument("--top-p", type=float, default=None, help=shown("top_p"))
    p.add_argument("--top-k", type=int, default=None, help=f"0 = off; {shown('top_k')}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", default=None,
                   help="mesh axis sizes, e.g. data=1,model=8 (default: all local devices on "
                        "model where the shapes allow)")
    p.add_argument("--cache-length", type=int, default=None,
                   help="KV memory length per slot (default: for prompts given on the command "
                        "line, longest prompt + max new tokens; for batch jobs, sequence_len)")
    p.add_argument("--plan", action="store_true",
                   help="print the per-device memory plan (parameters, KV memory, working set) "
                        "and exit without loading; works without a checkpoint (grok-1 preset)")
    p.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="memory per device for the plan, e.g. 80GB or 16GiB (default: what the "
                        "devices report; the CPU reports nothing, so nothing is refused)")
    p.add_argument("--plan-target", default=None, choices=("h100x8", "v5e-32"),
                   help="with --plan: plan for that machine (its mesh and memory)")
    p.add_argument("--weight-format", default=None,
                   choices=("float32", "bfloat16", "int8", "grok-int8"),
                   help="with --plan and no checkpoint: how the weights are stored (default "
                        "grok-int8, the released Grok-1)")
    p.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                   metavar="HOST:PORT",
                   help="multi-host: address of process 0's coordinator (also "
                        "$JAX_COORDINATOR_ADDRESS); every host runs this same command")
    p.add_argument("--num-processes", type=int,
                   default=_env_int("JAX_NUM_PROCESSES"), help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"),
                   help="multi-host: this process's rank, 0..N-1")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host with the cluster detected by JAX (TPU pod slices, SLURM, ...)")
    p.add_argument("--init-timeout", type=int, default=120,
                   help="seconds to wait for all processes to join (then fail with an error)")
    p.add_argument("--heartbeat-timeout", type=int, default=60,
                   help="seconds after which a silent process counts as dead (the others stop)")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help=f"persistent compilation cache directory (default: ${CACHE_ENV}, else "
                        f"~/.cache/llm-runtime/jax); a second run of the same model skips "
                        f"compiling, and (single process) tracing: the traced programs are "
                        f"kept in its llm-runtime-programs/")
    p.add_argument("--no-compilation-cache", action="store_true",
                   help="compile everything afresh and store nothing")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="activation dtype (default: the config's; for Hugging Face checkpoints "
                        "bfloat16 on accelerators, float32 on CPU)")


def parse_args(argv):
    if argv and argv[0] == "batch":
        p = argparse.ArgumentParser(prog="run.py batch",
                                    description="Generate completions for a JSONL file of "
                                                "prompts; rerun the same command to resume.")
        p.add_argument("--input", type=Path, required=True, help="JSONL: one request per line")
        p.add_argument("--output", type=Path, required=True,
                       help="JSONL results, appended; records already there are skipped")
        p.add_argument("--slots", type=int, default=32, help="batch slots decoded together")
        add_model_args(p, argv[1:])
        args = p.parse_args(argv[1:])
        args.mode = "batch"
        return args
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="Batch jobs: python run.py batch --help")
    p.add_argument("--prompt", dest="prompts", action="append", default=[],
                   type=lambda s: ("text", s), help="prompt text (repeatable: one batch entry each)")
    p.add_argument("--prompt-ids", dest="prompts", action="append", type=lambda s: ("ids", s),
                   help='raw token ids, e.g. "5 6 7" (repeatable; no tokenizer needed)')
    p.add_argument("--slots", type=int, default=None,
                   help="batch slots decoded together (default: one per prompt, at most 32)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt per line")
    add_model_args(p, argv)
    args = p.parse_args(argv)
    args.mode = "generate"
    return args


def resolve_checkpoint(args) -> Path:
    from runtime.errors import RuntimeInputError
    if args.hf_repo is not None:
        if args.checkpoint is not None:
            raise RuntimeInputError("give either --checkpoint or --hf-repo, not both")
        from runtime.checkpoint.hub import download
        return download(args.hf_repo, args.revision)
    if args.checkpoint is not None:
        if not args.checkpoint.is_dir():
            raise RuntimeInputError(f"--checkpoint {args.checkpoint}: no such directory")
        return args.checkpoint
    if not (DEMO_CHECKPOINT / "ckpt-0").is_dir():
        raise RuntimeInputError(
            f"no --checkpoint given and the demo checkpoint {DEMO_CHECKPOINT} is not there; "
            f"pass --checkpoint DIR (see checkpoints/README.md)")
    return DEMO_CHECKPOINT


def _next_to(checkpoint: Path, name: str) -> Path | None:
    """A file beside the checkpoint: in DIR, or in the parent when DIR is the ckpt-0 folder."""
    for folder in (checkpoint, checkpoint.parent):
        if (folder / name).is_file():
            return folder / name
    return None


def default_request(args):
    from runtime.request import Request
    return Request((), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def build_requests(args, tokenizer, config):
    import dataclasses

    from runtime.errors import RuntimeInputError
    prompts = args.prompts or [("text", DEFAULT_PROMPT)]
    requests = []
    for kind, value in prompts:
        if kind == "ids":
            try:
                ids = tuple(int(t) for t in value.replace(",", " ").split())
            except ValueError:
                raise RuntimeInputError(f"--prompt-ids {value!r}: expected integers") from None
        else:
            if tokenizer is None:
                raise RuntimeInputError("--prompt needs a tokenizer: pass --tokenizer or put "
                                        "tokenizer.model next to the checkpoint (or use "
                                        "--prompt-ids)")
            ids = tuple(tokenizer.encode(value))
        requests.append(dataclasses.replace(default_request(args), prompt_ids=ids))
    for i, r in enumerate(requests):
        r.validate(config.vocab_size, config.sequence_len, label=f"prompt {i}")
    return requests


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from runtime.errors import RuntimeInputError
    try:
        if args.plan:
            return print_plan(args)
        enable_compilation_cache(args)
        init_distributed(args)
        enable_program_cache(args)
        return run_batch(args) if args.mode == "batch" else generate(args)
    except RuntimeInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def print_plan(args) -> int:
    """--plan: the memory table for the flags' configuration; nothing is loaded."""
    import jax

    from runtime.config import load_config
    from runtime.parameter_shapes import abstract_params
    from runtime.planning import (default_weight_format, device_capacity, make_plan,
                                  parse_bytes, plan_for_target)
    from runtime.sharding import default_mesh_sizes, parse_mesh_flag

    checkpoint = args.checkpoint or (args.hf_repo and resolve_checkpoint(args))
    if checkpoint:
        _, config_source, config, _ = open_model(args)
        from runtime.checkpoint.load import detect_format
        weight_format = args.weight_format or default_weight_format(detect_format(checkpoint),
                                                                    args.quantize)
    else:
        config_source = args.config or "grok-1"
        config = load_config(config_source)
        if args.dtype:
            config = config.replace(dtype=args.dtype)
        weight_format = args.weight_format or ("int8" if args.quantize else "grok-int8")
    slots = args.slots or 1
    cache_length = args.cache_length or config.sequence_len
    if args.plan_target:
        plan = plan_for_target(config, args.plan_target, weight_format, slots, cache_length,
                               label=str(config_source), int8_group_size=args.int8_group_size)
    else:
        sizes = parse_mesh_flag(args.mesh) if args.mesh else \
            default_mesh_sizes(abstract_params(config), jax.device_count())
        capacity, kind = device_capacity(jax.devices()[:max(1, min(jax.device_count(),
                                                                   _count(sizes)))])
        if args.device_memory:
            capacity = parse_bytes(args.device_memory)
        plan = make_plan(config, sizes, weight_format, slots, cache_length, capacity, kind,
                         label=str(config_source),
                         capacity_source="--device-memory" if args.device_memory else None,
                         int8_group_size=args.int8_group_size)
    print(plan.table())
    if plan.fits:
        return 0
    print("\nDOES NOT FIT; what would fit:")
    for suggestion in plan.suggestions() or ["(nothing found)"]:
        print(f"  - {suggestion}")
    return 2


def _count(sizes) -> int:
    import math
    return math.prod(sizes.values())


def open_model(args):
    """Checkpoint folder, config, tokenizer (or None) from the flags; no weights read yet."""
    import jax

    from runtime.checkpoint.load import default_config, detect_format
    from runtime.config import load_config
    from runtime.tokenizer import find_tokenizer, load_tokenizer, sentencepiece_adds_bos

    checkpoint = resolve_checkpoint(args)
    kind = detect_format(checkpoint)
    fill_sampling_defaults(args, checkpoint)
    config_source = args.config or _next_to(checkpoint, "config.yaml")
    if config_source is not None:
        config = load_config(config_source)
    elif kind == "hf":
        config_source, config = checkpoint / "config.json", default_config(checkpoint)
        # bf16 activations on accelerators; CPU matmuls are fastest (and exact) in float32
        config = config.replace(dtype="float32" if jax.default_backend() == "cpu"
                                else "bfloat16")
    else:
        config_source, config = "grok-1", load_config("grok-1")
    if args.dtype:
        config = config.replace(dtype=args.dtype)

    tokenizer_path = args.tokenizer or find_tokenizer(checkpoint, checkpoint.parent)
    # A SentencePiece model of a Hugging Face folder prepends BOS unless its tokenizer config
    # says not; Grok-1's prepends none; a tokenizer.json adds what its post-processor adds.
    bos = config.bos_token if kind == "hf" and tokenizer_path is not None \
        and sentencepiece_adds_bos(tokenizer_path.parent) else None
    tokenizer = load_tokenizer(tokenizer_path, bos) if tokenizer_path else None
    return checkpoint, config_source, config, tokenizer


def load_engine(args, checkpoint, config_source, config, slots: int, cache_length: int):
    """Mesh from --mesh (or the default); each parameter read, placed on its devices; engine."""
    import jax

    import time

    from runtime.checkpoint.lazy import BYTES_READ
    from runtime.checkpoint.load import load_params_on_mesh, widen_floats_on_cpu
    from runtime.engine import Engine
    from runtime.parameter_shapes import abstract_params
    from runtime.models import build_model
    from runtime.sharding import default_mesh_sizes, format_mesh, make_mesh, parse_mesh_flag

    from runtime.distributed import is_leader

    if args.mesh:
        sizes = parse_mesh_flag(args.mesh)
    elif jax.device_count() == 1:  # nothing to choose; skips tracing the model for its shapes
        sizes = {"data": 1, "model": 1}
    else:
        sizes = default_mesh_sizes(abstract_params(config), jax.device_count(),
                                   jax.process_count())
    mesh = make_mesh(sizes)
    check_memory(args, checkpoint, config, sizes, slots, cache_length)
    if is_leader():
        print(f"[run] {jax.process_count()} process(es), checkpoint {checkpoint}, config {config_source}, mesh {format_mesh(sizes)} over "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s), {slots} slot(s), "
          f"cache length {cache_length}", file=sys.stderr)
    start = time.perf_counter()
    params = load_params_on_mesh(checkpoint, config, mesh, args.quantize,
                                 progress=sys.stderr.isatty() and is_leader(),
                                 widen_floats_to=widen_floats_on_cpu(config),
                                 int8_group_size=args.int8_group_size)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    if BYTES_READ.bytes:  # every process reports what it read itself
        print(f"[load p{jax.process_index()}] read {BYTES_READ.bytes} bytes "
              f"({BYTES_READ.bytes / 1e9:.3f} GB) in "
              f"{seconds:.1f} s ({BYTES_READ.bytes / 1e9 / max(seconds, 1e-9):.2f} GB/s)",
              file=sys.stderr)
    return Engine(build_model(config), params, mesh, slots=slots, cache_length=cache_length)


def leader_decides(compute, encode, decode):
    """compute() on process 0, its result (or its error) on every process."""
    from runtime.distributed import broadcast_json, is_leader, multi_process
    from runtime.errors import RuntimeInputError
    if not multi_process():
        return compute()
    message = None
    if is_leader():
        try:
            message = {"value": encode(compute())}
        except RuntimeInputError as e:
            message = {"error": str(e)}
    message = broadcast_json(message)
    if "error" in message:
        raise RuntimeInputError(message["error"])
    return decode(message["value"])


def check_memory(args, checkpoint, config, sizes, slots, cache_length) -> None:
    """Refuse, before anything is read, a configuration the devices cannot hold (when they say
    how much memory they have, or --device-memory does)."""
    from runtime.checkpoint.load import detect_format
    from runtime.planning import (check_plan, default_weight_format, device_capacity,
                                  make_plan, parse_bytes)
    capacity, kind = device_capacity()
    if args.device_memory:
        capacity = parse_bytes(args.device_memory)
    if capacity is None:
        return
    weight_format = default_weight_format(detect_format(checkpoint), args.quantize)
    check_plan(make_plan(config, sizes, weight_format, slots, cache_length, capacity, kind,
                         label=str(checkpoint), int8_group_size=args.int8_group_size))


def generate(args) -> int:
    import dataclasses

    from runtime.tokenizer import StreamDecoder

    from runtime.distributed import is_leader

    checkpoint, config_source, config, tokenizer = open_model(args)
    requests = leader_decides(lambda: build_requests(args, tokenizer, config),
                              encode=lambda rs: [list(r.prompt_ids) for r in rs],
                              decode=lambda ids: [dataclasses.replace(
                                  default_request(args), prompt_ids=tuple(i)) for i in ids])
    longest = max(len(r.prompt_ids) for r in requests) + args.max_new_tokens
    cache_length = args.cache_length or min(config.sequence_len, longest)
    slots = args.slots or min(len(requests), 32)
    engine = load_engine(args, checkpoint, config_source, config, slots, cache_length)

    stream = not args.json and sys.stdout.isatty() and len(requests) == 1 and tokenizer \
        and is_leader()
    decoder = StreamDecoder(tokenizer, requests[0].prompt_ids) if stream else None

    def stream_token(_, token):  # returns None: a true value would ask the engine to stop
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()

    if stream:
        sys.stdout.write(tokenizer.decode(requests[0].prompt_ids))
    completions = engine.generate(requests, on_token=stream_token if stream else None)
    if not is_leader():
        return 0
    for i, (kind_value, done) in enumerate(zip(args.prompts or [("text", DEFAULT_PROMPT)],
                                               completions)):
        text = tokenizer.decode(done.output_ids) if tokenizer else None
        if args.json:
            print(json.dumps({"index": i, "prompt": kind_value[1] if kind_value[0] == "text"
                              else None, "prompt_ids": done.prompt_ids,
                              "output_ids": done.output_ids, "text": text,
                              "finish_reason": done.finish_reason}), flush=True)
        elif stream:
            print(f"\n[finish_reason: {done.finish_reason}]")
        else:
            prompt_text = tokenizer.decode(done.prompt_ids) if tokenizer else done.prompt_ids
            print(f"--- prompt {i}: {prompt_text!r}")
            print(text if tokenizer else " ".join(map(str, done.output_ids)))
            print(f"[finish_reason: {done.finish_reason}, {len(done.output_ids)} tokens]")
    return 0


def run_batch(args) -> int:
    import dataclasses

    from runtime.batch import run_job
    from runtime.errors import RuntimeInputError

    def check_input():
        if not args.input.is_file():
            raise RuntimeInputError(f"--input {args.input}: no such file")

    leader_decides(check_input, encode=lambda _: None, decode=lambda _: None)
    checkpoint, config_source, config, tokenizer = open_model(args)
    dataclasses.replace(default_request(args), prompt_ids=(0,)).validate(
        config.vocab_size, config.sequence_len, label="the default settings")
    cache_length = args.cache_length or config.sequence_len
    engine = load_engine(args, checkpoint, config_source, config, args.slots, cache_length)

    # First Ctrl-C: stop taking new records, finish those in flight, exit; a second one aborts.
    stopping = []

    def on_interrupt(signum, frame):
        if stopping:
            raise KeyboardInterrupt
        stopping.append(signum)
        print("\n[batch] interrupted: finishing the records in flight (Ctrl-C again to abort)",
              file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        summary = run_job(engine, tokenizer, args.input, args.output, default_request(args),
                          keep_going=lambda: not stopping, progress=sys.stderr.isatty())
    finally:
        signal.signal(signal.SIGINT, previous)
    from runtime.distributed import is_leader
    if is_leader():
        print(f"[batch] {summary.line()}", file=sys.stderr)
    return 130 if summary.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
