"""run.py's command line: the flags, their types and their defaults (a checkpoint's
generation_config.json sampling values among them). Parsing only; runtime/app.py acts on them."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from runtime.config import ACTIVATION_DTYPES, KV_DTYPES  # config imports no JAX

ROOT = Path(__file__).resolve().parent.parent
DEMO_CHECKPOINT = ROOT / "checkpoints" / "demo"
DEFAULT_PROMPT = "Return the"  # docstrings often start so: the demo model was trained on them
CACHE_ENV = "LLM_RUNTIME_COMPILATION_CACHE"  # a directory, or "off"
DESCRIPTION = ("Sample from a language-model checkpoint: flags -> config, mesh, checkpoint, "
               "generate.")  # run.py's docstring, first line

# runtime.quant4.DEFAULT_GROUP_SIZE, written out: that module imports JAX, and flags are parsed
# before JAX starts (tests/test_int4_loading.py checks the two agree).
INT4_DEFAULT_GROUP_SIZE = 32

# Sampling defaults where neither a flag nor the checkpoint's generation_config.json sets one.
BUILTIN_SAMPLING = {"max_new_tokens": 64, "temperature": 0.8, "top_p": 0.95, "top_k": 0}


def _env_int(name: str):
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


class OneLineParser(argparse.ArgumentParser):
    """argparse with the runtime's error form: one line `error: ...` and exit status 2 (instead
    of the usage block), like every other input error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _checked(convert, accept, wanted: str):
    """An argparse type: convert the text, then accept(value) or report what was wanted."""
    def parse(text: str):
        try:
            value = convert(text)
            ok = accept(value)
        except (ValueError, OverflowError):
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value
    parse.__name__ = wanted  # argparse names the type in some messages
    return parse


def _float32(value: float) -> float:
    """value as the float32 the sampler receives (inf when it does not fit)."""
    import numpy as np
    with np.errstate(over="ignore"):
        return float(np.float32(value))


positive_int = _checked(int, lambda v: 1 <= v < 2**31, "an integer in [1, 2^31)")
non_negative_int = _checked(int, lambda v: 0 <= v < 2**31, "an integer in [0, 2^31)")
int31 = _checked(int, lambda v: 0 <= v < 2**31, "an integer in [0, 2^31)")
temperature = _checked(float, lambda v: math.isfinite(_float32(v)) and v >= 0,
                       "a finite number >= 0 (0 = greedy)")
top_p = _checked(float, lambda v: 0 < _float32(v) <= 1, "a number in (0, 1]")


def prompt_text(text: str) -> tuple[str, str]:
    """--prompt: text that is valid Unicode (argv bytes that are not UTF-8 arrive as lone
    surrogates, which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("the prompt is not valid UTF-8 text") from None
    return "text", text


def chat_text(text: str) -> tuple[str, str]:
    """--chat: one user message (valid Unicode, as --prompt), rendered with the checkpoint's
    chat template."""
    return "chat", prompt_text(text)[1]


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


def int4_group_size(text: str) -> int:
    """--group-size: an even number of input rows, at least 2 (int4 packs rows in pairs)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 2 or value % 2 or value >= 2**31:
        raise argparse.ArgumentTypeError(f"expected an even number of input rows >= 2 per "
                                         f"int4 scale, got {text!r}")
    return value


def check_quantize_flags(parser: argparse.ArgumentParser, args) -> None:
    """--group-size belongs to int4 (int8 has --int8-group-size); then its default."""
    int4 = args.quantize == "int4" or getattr(args, "weight_format", None) == "int4"
    if args.group_size is not None and not int4:
        parser.error("argument --group-size: applies to --quantize int4 only (int8 groups: "
                     "--int8-group-size)")
    if args.group_size is None:
        args.group_size = INT4_DEFAULT_GROUP_SIZE


def _checked_args(parser: argparse.ArgumentParser, argv, mode: str):
    """argv parsed, the cross-flag checks every mode shares done, and the mode recorded."""
    args = parser.parse_args(argv)
    check_sampling(parser, args)
    check_quantize_flags(parser, args)
    args.mode = mode
    return args


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


def next_to(checkpoint: Path, name: str) -> Path | None:
    """A file beside the checkpoint: in DIR, or in the parent when DIR is the ckpt-0 folder."""
    for folder in (checkpoint, checkpoint.parent):
        if (folder / name).is_file():
            return folder / name
    return None


def checkpoint_sampling(checkpoint: Path) -> dict:
    """The sampling defaults a checkpoint's generation_config.json sets (see
    runtime/checkpoint/generation_config.py); {} when it has none."""
    from runtime.checkpoint.generation_config import read_generation_config, sampling_defaults
    folder = next_to(checkpoint, "generation_config.json")
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


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    from runtime.config import DEFAULT_INT8_GROUP_SIZE
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a Grok-1 download (with ckpt-0/) or its ckpt-0 folder, a Hugging Face "
                        "model folder (config.json + *.safetensors), a llama.cpp GGUF file "
                        "(model.gguf), a converted checkpoint, or a Palm torch.save file "
                        "(X.bin); default: the demo checkpoint in "
                        "checkpoints/demo")
    p.add_argument("--hf-repo", default=None, metavar="ORG/NAME",
                   help="download a Hugging Face model (only the files the runtime reads; "
                        "resumable; a cached copy works offline) and use it as --checkpoint")
    p.add_argument("--revision", default=None, help="with --hf-repo: branch, tag or commit")
    p.add_argument("--config", default=None,
                   help="preset name (see configs/) or YAML/JSON file; default: config.yaml next "
                        "to the checkpoint, else its config.json (Hugging Face), else grok-1")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.model (SentencePiece), tokenizer.json, or a minbpe pickle "
                        "(Palm's encoder.bin); default: the one next to the checkpoint")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="store float matmul weights as int8 or int4 at load (a tied embedding "
                        "table as int8 either way; weights stored in int8 stay so)")
    p.add_argument("--int8-group-size", type=group_size, default=DEFAULT_INT8_GROUP_SIZE,
                   metavar="N",
                   help="with --quantize int8: one scale per output channel and group of at "
                        "most N input rows; 0 = one scale per output channel (default: "
                        f"{DEFAULT_INT8_GROUP_SIZE})")
    p.add_argument("--group-size", type=int4_group_size, default=None, metavar="N",
                   help="with --quantize int4: one float16 scale per output channel and group "
                        "of at most N input rows, N even (default: "
                        f"{INT4_DEFAULT_GROUP_SIZE})")
    p.add_argument("--int8-activations", action="store_true",
                   help="int4 weights multiply the activations rounded to int8 per group, as "
                        "llama.cpp's Q4_0 does: faster int4 decode on CPUs (AVX512-VNNI or "
                        "AVX2), an accuracy trade (off: float activations)")


def _add_sampling_args(p: argparse.ArgumentParser, argv) -> None:
    defaults, origin = help_sampling_defaults(p.prog, argv)
    shown = lambda key: f"default: {defaults[key]}{origin.get(key, '')}"  # noqa: E731
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help=shown("max_new_tokens"))
    p.add_argument("--temperature", type=temperature, default=None,
                   help=f"0 = greedy; {shown('temperature')}")
    p.add_argument("--top-p", type=top_p, default=None, help=shown("top_p"))
    p.add_argument("--top-k", type=int31, default=None, help=f"0 = off; {shown('top_k')}")
    p.add_argument("--seed", type=int31, default=0)


def logit_bias(text: str) -> list[tuple[int, float]]:
    """--logit-bias ID:VALUE[,ID:VALUE...] -> [(id, value), ...] (ranges: check_sampling)."""
    pairs = []
    for item in text.split(","):
        token, _, value = item.partition(":")
        try:
            pairs.append((int(token), float(value)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected ID:VALUE (e.g. 42:-5.5), comma-"
                                             f"separated or repeated, got {item!r}") from None
    return pairs


def token_ids(text: str) -> list[int]:
    """--stop-token-ids 2,13 -> [2, 13]."""
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got "
                                         f"{text!r}") from None


def _add_control_args(p: argparse.ArgumentParser) -> None:
    """The sampling controls beyond temperature / top-k / top-p, as the OpenAI API names them
    (checked by runtime/request_fields.py and Request.validate, as requests are)."""
    p.add_argument("--min-p", type=float, default=None, metavar="P",
                   help="keep tokens with probability >= P x the top one's; 0 = off")
    p.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                   help="divide seen tokens' positive logits by R (prompt and output); 1 = off")
    p.add_argument("--presence-penalty", type=float, default=None, metavar="X",
                   help="subtract X from generated tokens' logits, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=None, metavar="X",
                   help="subtract X per occurrence from generated tokens' logits, in [-2, 2]")
    p.add_argument("--logit-bias", type=logit_bias, action="append", default=None,
                   metavar="ID:VALUE", help="add VALUE to token ID's logit (repeatable or "
                                            "comma-separated)")
    p.add_argument("--stop", action="append", default=None, metavar="STRING",
                   help="end a completion where this text appears, cut before it (repeatable)")
    p.add_argument("--stop-token-ids", type=token_ids, action="append", default=None,
                   metavar="IDS", help="end a completion at these token ids (comma-separated)")
    p.add_argument("--n", type=int, default=None, help="samples per prompt (default: 1)")
    p.add_argument("--logprobs", action="store_true",
                   help="report each generated token's log-probability (--json, batch records)")
    p.add_argument("--top-logprobs", type=int, default=None, metavar="K",
                   help="and its K most likely alternatives (implies --logprobs)")


# flag -> the request field it sets (request_fields.py's names)
CONTROL_FLAGS = {"--min-p": "min_p", "--repetition-penalty": "repetition_penalty",
                 "--presence-penalty": "presence_penalty",
                 "--frequency-penalty": "frequency_penalty", "--logit-bias": "logit_bias",
                 "--stop": "stop", "--stop-token-ids": "stop_token_ids", "--n": "n",
                 "--logprobs": "logprobs", "--top-logprobs": "top_logprobs"}
SAMPLING_FLAGS = {"--max-new-tokens": "max_new_tokens", "--temperature": "temperature",
                  "--top-p": "top_p", "--top-k": "top_k", "--seed": "seed", **CONTROL_FLAGS}


def sampling_fields(args) -> dict:
    """The sampling flags given (or filled in) as request fields, for parse_sampling."""
    fields = {field: getattr(args, field.lstrip("-").replace("-", "_"), None)
              for field in SAMPLING_FLAGS}
    fields = {SAMPLING_FLAGS[flag]: value for flag, value in fields.items()}
    pairs = [pair for given in fields["logit_bias"] or [] for pair in given]
    fields["logit_bias"] = {str(token): value for token, value in pairs} if pairs else None
    fields["stop_token_ids"] = [t for given in fields["stop_token_ids"] or [] for t in given] \
        or None
    fields["logprobs"] = True if fields["logprobs"] or fields["top_logprobs"] else None
    return {name: value for name, value in fields.items() if value is not None}


def check_sampling(parser: argparse.ArgumentParser, args) -> None:
    """Refuse bad sampling controls now, one line naming the flag and the field, as requests'
    are refused (parse_sampling, then Request.validate without a model: token ids are checked
    against the vocabulary when the model opens). Only when one is given: this imports JAX."""
    given = [getattr(args, flag.lstrip("-").replace("-", "_"), None) for flag in CONTROL_FLAGS]
    if all(value is None or value is False for value in given):
        return
    pairs = [token for given in args.logit_bias or [] for token, _ in given]
    repeated = sorted({token for token in pairs if pairs.count(token) > 1})
    if repeated:
        parser.error(f"argument --logit-bias: token id {repeated[0]} given twice")
    from runtime.errors import RequestError
    from runtime.request import Request
    from runtime.request_fields import parse_sampling
    try:
        parse_sampling(sampling_fields(args), Request((0,))).request.validate(
            2**31, 2**31, label="flags")
    except RequestError as e:
        message = str(e).removeprefix("flags: ")
        field = message.lstrip("'").split(" ")[0].split("[")[0].strip("'")
        flag = next((f for f, name in SAMPLING_FLAGS.items() if name == field), None)
        parser.error(f"argument {flag}: {message}" if flag else message)


def _add_layout_and_plan_args(p: argparse.ArgumentParser) -> None:
    from runtime.config import DEFAULT_PREFILL_CHUNK
    p.add_argument("--mesh", default=None,
                   help="mesh axis sizes, e.g. data=1,model=8 (default: all local devices on "
                        "model where the shapes allow)")
    p.add_argument("--cache-length", type=positive_int, default=None,
                   help="KV memory length per slot (default: for prompts given on the command "
                        "line, longest prompt + max new tokens; for batch jobs, the model's "
                        "context, or the longest that fits the slots when it does not)")
    p.add_argument("--prefill-chunk", type=non_negative_int, default=None, metavar="N",
                   help="prompts longer than N tokens are prefilled N at a time, the other "
                        "slots decoding between chunks; 0 = whole prompts (default: "
                        f"{DEFAULT_PREFILL_CHUNK})")
    p.add_argument("--decode-steps", type=positive_int, default=None, metavar="N",
                   help="decode steps per dispatch when no request waits to start; tokens "
                        "stream N at a time (default: 8 on accelerators, 1 on the CPU)")
    p.add_argument("--plan", action="store_true",
                   help="print the per-device memory plan (parameters, KV memory, working set) "
                        "and exit without loading; works without a checkpoint (grok-1 preset)")
    p.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="memory per device for the plan, e.g. 80GB or 16GiB (default: what the "
                        "devices report; on the CPU, the host memory available now)")
    p.add_argument("--plan-target", default=None,
                   choices=("h100x8", "h100x4", "v5e-32", "v5e-16"),
                   help="with --plan: plan for that machine (its mesh and memory)")
    p.add_argument("--weight-format", default=None,
                   choices=("float32", "bfloat16", "int8", "int4", "grok-int8"),
                   help="with --plan and no checkpoint: how the weights are stored (default "
                        "grok-int8, the released Grok-1)")


def _add_multihost_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                   metavar="HOST:PORT",
                   help="multi-host: address of process 0's coordinator (also "
                        "$JAX_COORDINATOR_ADDRESS); every host runs this same command")
    p.add_argument("--num-processes", type=positive_int,
                   default=_env_int("JAX_NUM_PROCESSES"), help="multi-host: number of processes")
    p.add_argument("--process-id", type=non_negative_int, default=_env_int("JAX_PROCESS_ID"),
                   help="multi-host: this process's rank, 0..N-1")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host with the cluster detected by JAX (TPU pod slices, SLURM, ...)")
    p.add_argument("--init-timeout", type=positive_int, default=120,
                   help="seconds to wait for all processes to join (then fail with an error)")
    p.add_argument("--heartbeat-timeout", type=positive_int, default=60,
                   help="seconds after which a silent process counts as dead (the others stop)")


def _add_compilation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help=f"persistent compilation cache directory (default: ${CACHE_ENV}, else "
                        f"~/.cache/llm-runtime/jax); a second run of the same model skips "
                        f"compiling, and (single process) tracing: the traced programs are "
                        f"kept in its llm-runtime-programs/")
    p.add_argument("--no-compilation-cache", action="store_true",
                   help="compile everything afresh and store nothing")
    p.add_argument("--dtype", choices=ACTIVATION_DTYPES, default=None,
                   help="activation dtype (default: the config's; for Hugging Face checkpoints "
                        "bfloat16 on accelerators, float32 on CPU)")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default=None,
                   help="KV memory dtype (default: the config's kv_dtype, else the activation "
                        "dtype); float16 or bfloat16 under float32 activations halves the "
                        "memory a context holds and what decode attention reads")


def add_model_args(p: argparse.ArgumentParser, argv=()) -> None:
    """The flags both modes share, in the order --help lists them."""
    _add_checkpoint_args(p)
    _add_sampling_args(p, argv)
    _add_control_args(p)
    _add_layout_and_plan_args(p)
    _add_multihost_args(p)
    _add_compilation_args(p)


def _parse_batch_args(argv):
    p = OneLineParser(prog="run.py batch",
                                description="Generate completions for a JSONL file of "
                                            "prompts; rerun the same command to resume.")
    p.add_argument("--input", type=Path, required=True, help="JSONL: one request per line")
    p.add_argument("--output", type=Path, required=True,
                   help="JSONL results, appended; records already there are skipped")
    p.add_argument("--slots", type=positive_int, default=32, help="batch slots decoded together")
    add_model_args(p, argv)
    return _checked_args(p, argv, "batch")


def _parse_serve_args(argv):
    p = OneLineParser(prog="run.py serve",
                      description="Serve the model over an OpenAI-compatible HTTP API "
                                  "(/v1/completions, /v1/chat/completions, /v1/models, "
                                  "/health, /metrics); Ctrl-C or SIGTERM drains and exits.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=_checked(int, lambda v: 0 < v < 65536, "a port in [1, 65535]"),
                   default=8000, help="TCP port (default 8000)")
    p.add_argument("--slots", type=positive_int, default=8,
                   help="requests decoded together (default 8); more wait in the queue")
    p.add_argument("--max-queue", type=non_negative_int, default=256,
                   help="requests that may wait for a slot; beyond, 429 (default 256)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model's name in the API (default: --hf-repo or the checkpoint "
                        "folder's name)")
    add_model_args(p, argv)
    return _checked_args(p, argv, "serve")


def parse_args(argv):
    """The flags of `run.py ...` (mode "generate"), `run.py batch ...` (mode "batch") or
    `run.py serve ...` (mode "serve")."""
    if argv and argv[0] == "batch":
        return _parse_batch_args(argv[1:])
    if argv and argv[0] == "serve":
        return _parse_serve_args(argv[1:])
    p = OneLineParser(description=DESCRIPTION,
                                epilog="Batch jobs: python run.py batch --help; the HTTP server: "
                                       "python run.py serve --help")
    p.add_argument("--prompt", dest="prompts", action="append", default=[],
                   type=prompt_text,
                   help="prompt text (repeatable: one batch entry each)")
    p.add_argument("--prompt-ids", dest="prompts", action="append", type=lambda s: ("ids", s),
                   help='raw token ids, e.g. "5 6 7" (repeatable; no tokenizer needed)')
    p.add_argument("--chat", dest="prompts", action="append", type=chat_text, metavar="TEXT",
                   help="a user message, rendered with the checkpoint's chat template "
                        "(tokenizer_config.json or chat_template.jinja; repeatable: one batch "
                        "entry each)")
    p.add_argument("--slots", type=positive_int, default=None,
                   help="batch slots decoded together (default: one per prompt, at most 32)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt per line")
    add_model_args(p, argv)
    return _checked_args(p, argv, "generate")
