"""What `run.py` does with its parsed flags: start the process (compilation cache, multi-host),
open the model (its format detected once), print a memory plan, or load the weights onto the
mesh and generate, for prompts on the command line or a JSONL batch job."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional, Union

from runtime.app_engine import load_engine
from runtime.cli import DEFAULT_PROMPT, DEMO_CHECKPOINT, compilation_cache_dir, \
    fill_sampling_defaults, next_to


@dataclasses.dataclass(frozen=True)
class OpenedModel:
    """A checkpoint opened from the flags, no weights read yet. `kind` is detect_format's
    answer ("hf", "native" or "ckpt-0"), asked once here and handed to the memory check and the
    loader."""
    checkpoint: Path
    kind: str
    config_source: Union[str, Path]
    config: Any  # runtime.config.ModelConfig
    tokenizer: Optional[Any]  # None: prompts must come as --prompt-ids


def main(args) -> int:
    """Run the parsed flags (runtime/cli.py); the exit status. A RuntimeInputError is a
    one-line error and status 2."""
    from runtime.errors import RuntimeInputError
    try:
        if args.plan:
            return print_plan(args)
        if args.int8_activations:  # read while tracing the products and keying stored programs
            from runtime import layout
            layout.INT8_ACTIVATIONS = True
        check_checkpoint_flags(args)  # before JAX loads: a wrong path fails at once
        enable_compilation_cache(args)
        init_distributed(args)
        enable_program_cache(args)
        run = {"batch": run_batch, "serve": run_serve}.get(args.mode, generate)
        return run(args)
    except RuntimeInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


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
    if not (args.distributed or args.coordinator or args.num_processes
            or args.process_id is not None):
        return
    from runtime.distributed import check_process_flags
    if not args.distributed:
        check_process_flags(args.coordinator, args.num_processes, args.process_id)
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
    from runtime.distributed import start_deadline, wait_for_coordinator
    if args.coordinator and args.process_id:
        # JAX aborts the whole process (no exception) when the coordinator never answers; probe
        # it first so that an unreachable coordinator is a one-line error.
        wait_for_coordinator(args.coordinator, args.init_timeout)
    where = (f"coordinator {args.coordinator or 'auto'}, {args.num_processes} processes, this "
             f"is process {args.process_id}")
    deadline = start_deadline(args.init_timeout + 2, (
        f"multi-host start failed ({where}): not every process joined within --init-timeout "
        f"{args.init_timeout} s (are all {args.num_processes or 'the'} processes started, and "
        f"is --coordinator process 0's JAX coordinator?)"))
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=args.init_timeout,
                                   heartbeat_timeout_seconds=args.heartbeat_timeout)
    except Exception as e:  # jax raises RuntimeError/ValueError/XlaRuntimeError here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeInputError(f"multi-host start failed ({where}, waited up to "
                                f"{args.init_timeout} s): {first}") from None
    finally:
        deadline.cancel()


def check_checkpoint_flags(args) -> None:
    """The checkpoint flags' errors that need no download and no JAX: both given, a missing
    --checkpoint path, no demo checkpoint to fall back on."""
    from runtime.errors import RuntimeInputError
    if args.hf_repo is not None:
        if args.checkpoint is not None:
            raise RuntimeInputError("give either --checkpoint or --hf-repo, not both")
    elif args.checkpoint is not None:
        if not (args.checkpoint.is_dir() or args.checkpoint.is_file()):  # a file: Palm's .bin
            raise RuntimeInputError(f"--checkpoint {args.checkpoint}: no such file or "
                                    f"directory")
    elif not (DEMO_CHECKPOINT / "ckpt-0").is_dir():
        raise RuntimeInputError(
            f"no --checkpoint given and the demo checkpoint {DEMO_CHECKPOINT} is not there; "
            f"pass --checkpoint DIR (see checkpoints/README.md)")


def resolve_checkpoint(args) -> Path:
    check_checkpoint_flags(args)
    if args.hf_repo is not None:
        from runtime.checkpoint.hub import download
        return download(args.hf_repo, args.revision)
    return DEMO_CHECKPOINT if args.checkpoint is None else args.checkpoint


def open_model(args) -> OpenedModel:
    """Checkpoint folder, its format, config, tokenizer (or None) from the flags; no weights
    read yet."""
    from runtime.checkpoint.load import detect_format

    checkpoint = resolve_checkpoint(args)
    kind = detect_format(checkpoint)
    fill_sampling_defaults(args, checkpoint)
    config_source, config = _open_config(args, checkpoint, kind)
    return OpenedModel(checkpoint, kind, config_source, config,
                       _open_tokenizer(args, checkpoint, kind, config))


def _open_config(args, checkpoint: Path, kind: str):
    """(where the config came from, the config): --config, else config.yaml beside the
    checkpoint, else a Hugging Face config.json, else the grok-1 preset; --dtype and
    --kv-dtype applied."""
    from runtime.checkpoint.hf_config import read_hf_config
    from runtime.config import load_config, with_dtypes
    from runtime.layout import default_activation_dtype

    config_source = args.config or next_to(checkpoint, "config.yaml")
    if config_source is not None:
        config = load_config(config_source)
    elif kind == "hf":
        config_source, config = checkpoint / "config.json", read_hf_config(checkpoint)
        config = config.replace(dtype=default_activation_dtype())
    elif kind == "palm":  # a Palm file carries its config (its "hyperparams")
        from runtime.checkpoint.load import default_config
        config_source, config = checkpoint, default_config(checkpoint)
    elif kind == "gguf":  # a GGUF file's metadata is its config.json
        from runtime.checkpoint.load import default_config
        config_source, config = checkpoint, default_config(checkpoint)
        config = config.replace(dtype=default_activation_dtype())
    else:
        config_source, config = "grok-1", load_config("grok-1")
    return config_source, with_dtypes(config, args.dtype, args.kv_dtype)


def _open_tokenizer(args, checkpoint: Path, kind: str, config):
    from runtime.tokenizer import find_tokenizer, load_tokenizer, sentencepiece_adds_bos

    if kind == "gguf" and args.tokenizer is None:  # its vocabulary is in its metadata
        from runtime.gguf_tokenizer import gguf_tokenizer
        return gguf_tokenizer(checkpoint)
    tokenizer_path = args.tokenizer or find_tokenizer(checkpoint, checkpoint.parent)
    # A SentencePiece model of a Hugging Face folder prepends BOS unless its tokenizer config
    # says not; Grok-1's prepends none; a tokenizer.json adds what its post-processor adds.
    bos = config.bos_token if kind == "hf" and tokenizer_path is not None \
        and sentencepiece_adds_bos(tokenizer_path.parent) else None
    return load_tokenizer(tokenizer_path, bos) if tokenizer_path else None


def default_sampling(args, tokenizer=None, need_tokenizer: bool = False):
    """The sampling flags (after fill_sampling_defaults) as request_fields.Sampling: settings,
    stop strings, n. need_tokenizer: --stop is refused without one."""
    from runtime.cli import sampling_fields
    from runtime.errors import RuntimeInputError
    from runtime.request import Request
    from runtime.request_fields import parse_sampling
    sampling = parse_sampling(sampling_fields(args), Request(()))
    if need_tokenizer and sampling.stop and tokenizer is None:
        raise RuntimeInputError("--stop needs a tokenizer: pass --tokenizer or put "
                                "tokenizer.model next to the checkpoint")
    return sampling


def default_request(args):
    return default_sampling(args).request


def build_requests(args, tokenizer, config, checkpoint: Optional[Path] = None):
    """One request per --prompt / --prompt-ids / --chat (a user message rendered with the
    checkpoint's chat template), checked against the vocabulary and the context."""
    from runtime.chat_template import template_loader
    from runtime.errors import RuntimeInputError
    prompts = args.prompts or [("text", DEFAULT_PROMPT)]
    chat_template = template_loader(checkpoint)
    requests = []
    for kind, value in prompts:
        if kind == "ids":
            try:
                ids = tuple(int(t) for t in value.replace(",", " ").split())
            except ValueError:
                raise RuntimeInputError(f"--prompt-ids {value!r}: expected integers") from None
        else:
            if tokenizer is None:
                raise RuntimeInputError(f"--{'chat' if kind == 'chat' else 'prompt'} needs a "
                                        f"tokenizer: pass --tokenizer or put tokenizer.model "
                                        f"next to the checkpoint (or use --prompt-ids)")
            ids = tuple(chat_template().encode(tokenizer, [{"role": "user", "content": value}])
                        if kind == "chat" else tokenizer.encode(value))
        requests.append(dataclasses.replace(default_request(args), prompt_ids=ids))
    for i, r in enumerate(requests):
        r.validate(config.vocab_size, config.sequence_len, label=f"prompt {i}")
    return requests


def print_plan(args) -> int:
    """--plan: the memory table for the flags' configuration; nothing is loaded."""
    from runtime.app_memory import make_plan_for_flags, planned_weight_format
    from runtime.config import load_config, with_dtypes

    if args.checkpoint or args.hf_repo:
        opened = open_model(args)
        config_source, config = opened.config_source, opened.config
        weight_format = args.weight_format or \
            planned_weight_format(args, opened, here=not args.plan_target)
        kind, checkpoint = opened.kind, opened.checkpoint
    else:
        config_source = args.config or "grok-1"
        config = with_dtypes(load_config(config_source), args.dtype, args.kv_dtype)
        weight_format = args.weight_format or args.quantize or "grok-int8"
        kind = checkpoint = None
    plan = make_plan_for_flags(args, config, config_source, weight_format, kind, checkpoint)
    print(plan.table())
    if plan.fits:
        return 0
    print("\nDOES NOT FIT; what would fit:")
    for suggestion in plan.suggestions() or ["(nothing found)"]:
        print(f"  - {suggestion}")
    return 2


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


def generate(args) -> int:
    """Prompts from the command line: stream one to a terminal, else print each completion
    (or one JSON object per prompt with --json); --n samples of each."""
    from runtime.app_output import print_completions, stop_strings
    from runtime.distributed import is_leader
    from runtime.tokenizer import StreamDecoder

    opened = open_model(args)
    config, tokenizer = opened.config, opened.tokenizer
    sampling = default_sampling(args, tokenizer, need_tokenizer=True)
    requests = leader_decides(lambda: build_requests(args, tokenizer, config, opened.checkpoint),
                              encode=lambda rs: [list(r.prompt_ids) for r in rs],
                              decode=lambda ids: [dataclasses.replace(
                                  default_request(args), prompt_ids=tuple(i)) for i in ids])
    # n samples of a prompt: one after another (they share one prefill), each its own stream
    samples = [dataclasses.replace(r, choice=c) for r in requests for c in range(sampling.n)]
    longest = max(len(r.prompt_ids) for r in requests) + args.max_new_tokens
    cache_length = args.cache_length or min(config.sequence_len, longest)
    slots = args.slots or min(len(samples), 32)
    engine = load_engine(args, opened, slots, cache_length)

    # streamed text could not be taken back where a stop string begins: no stream with --stop
    stream = not args.json and sys.stdout.isatty() and len(samples) == 1 and tokenizer \
        and is_leader() and not sampling.stop
    decoder = StreamDecoder(tokenizer, requests[0].prompt_ids) if stream else None

    def stream_token(_, token):  # returns None: a true value would ask the engine to stop
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()

    if stream and (args.prompts or [("text", "")])[0][0] != "chat":  # not the chat template
        sys.stdout.write(tokenizer.decode(requests[0].prompt_ids))
    completions = engine.generate(samples, on_token=stream_token if stream
                                  else stop_strings(tokenizer, sampling.stop, len(samples)))
    if stream:
        sys.stdout.write(decoder.flush())  # an incomplete character at the end, as U+FFFD
    if is_leader():
        n = sampling.n
        print_completions(args, tokenizer, [completions[i:i + n] for i in
                                             range(0, len(completions), n)], stream, sampling)
    return 0


def run_batch(args) -> int:
    """`run.py batch`: a JSONL file of requests through the engine; 130 when interrupted."""
    from runtime.batch import run_job
    from runtime.chat_template import template_loader
    from runtime.distributed import is_leader
    from runtime.errors import RuntimeInputError

    def check_input():
        if not args.input.is_file():
            raise RuntimeInputError(f"--input {args.input}: no such file")

    leader_decides(check_input, encode=lambda _: None, decode=lambda _: None)
    opened = open_model(args)
    sampling = default_sampling(args, opened.tokenizer, need_tokenizer=True)
    dataclasses.replace(sampling.request, prompt_ids=(0,)).validate(
        opened.config.vocab_size, opened.config.sequence_len, label="the default settings")
    engine = load_engine(args, opened, args.slots, args.cache_length)

    # First Ctrl-C or SIGTERM: stop taking new records, finish those in flight, exit; a second
    # one stops at once (records already written stay; a rerun resumes after them).
    stopping = []

    def on_signal(signum, frame):
        if stopping:
            # Exit here: an exception raised from a handler can land inside JAX's tracing,
            # which reports it as its own traceback. Every record is on disk already (one
            # unbuffered write() per line), so nothing written is lost.
            print(f"error: batch stopped at once by a second {signal.Signals(signum).name}; "
                  f"the records written to {args.output} are kept (rerun the same command to "
                  f"resume)", file=sys.stderr, flush=True)
            os._exit(130)
        stopping.append(signum)
        print(f"\n[batch] interrupted ({signal.Signals(signum).name}): finishing the records in "
              f"flight (again to stop at once)", file=sys.stderr)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        summary = run_job(engine, opened.tokenizer, args.input, args.output, sampling,
                          keep_going=lambda: not stopping, progress=sys.stderr.isatty(),
                          chat_template=template_loader(opened.checkpoint),
                          model_name=args.hf_repo or opened.checkpoint.name)
    finally:
        # Once interrupted, the exit is 130 whatever comes next: a second signal after the last
        # records is ignored (restored, or left to Python, whose shutdown restores the default,
        # it would kill the process on its way out).
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if stopping else handler)
    if is_leader():
        print(f"[batch] {summary.line()}", file=sys.stderr)
    return 130 if summary.interrupted else 0


def run_serve(args) -> int:
    """`run.py serve`: the OpenAI-compatible server (runtime/server) until SIGTERM / Ctrl-C;
    every process of a multi-host run serves, process 0 answers HTTP."""
    from runtime.chat_template import template_loader
    from runtime.distributed import is_leader
    from runtime.server.http import ServedModel
    from runtime.server.main import Server, check_port, warm_up

    if is_leader():
        check_port(args.host, args.port)  # before minutes of loading
    opened = open_model(args)
    defaults = default_sampling(args, opened.tokenizer).request
    dataclasses.replace(defaults, prompt_ids=(0,)).validate(
        opened.config.vocab_size, opened.config.sequence_len, label="the default settings")
    engine = load_engine(args, opened, args.slots, args.cache_length)
    warm_up(engine)
    model = ServedModel(args.served_model_name or args.hf_repo or opened.checkpoint.name,
                        opened.tokenizer, template_loader(opened.checkpoint), defaults,
                        opened.config.vocab_size, engine.cache_length)
    return Server(engine, model, args.host, args.port, args.max_queue).run()

