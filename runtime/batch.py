"""Batch generation jobs: JSONL in, JSONL out, continuous batching, resumable after any kill.

Input: one JSON object per line, in either of two formats, told apart line by line:

- This runtime's records: `id` and `prompt` (text), `prompt_ids` (token ids) or `messages`
  (chat messages, rendered with the checkpoint's chat template), and optionally the sampling
  fields under the OpenAI API's names, parsed and checked as the server does
  (runtime/request_fields.py): `max_new_tokens` (or `max_tokens`), `temperature`, `top_p`,
  `top_k`, `min_p`, `repetition_penalty`, `presence_penalty`, `frequency_penalty`, `seed`,
  `logit_bias` ({"token id": bias}), `stop` (a string or a list of strings), `stop_token_ids`,
  `n` (samples of the prompt), `logprobs` (true with `top_logprobs` alternatives, or their
  number). Output: one JSON object per input line, in completion order, with `id`, `line`,
  `text`, `output_ids`, `finish_reason` (eos, length, stop, error), `error` (on errors),
  `prompt_tokens`, `output_tokens` (of choice 0); with logprobs also `logprobs`, per output
  token {"token_id", "logprob", "top_logprobs": [{"token_id", "logprob"}, ...]}; with n > 1
  also `choices`: [{"index", "text", "output_ids", "finish_reason", "logprobs"?}, ...].
- OpenAI's batch file format: {"custom_id", "method", "url", "body"} lines, answered with
  OpenAI's output lines (runtime/openai_batch.py).

Settings a line leaves out come from run.py's flags (and generation_config.json).

Every output record is appended with a single write() of one complete line, so a killed job
leaves at most one torn line at the end; a rerun of the same command truncates it, skips every
record already written (by id or custom_id, or by line number for lines without a usable one)
and goes on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from runtime import openai_batch
from runtime.distributed import is_leader, multi_process, synchronized, synchronized_flag
from runtime.engine import Engine
from runtime.errors import RequestError, RuntimeInputError, listed
from runtime.openai_batch import (OpenAILine, decoded, is_openai_line, looks_openai,
                                  native_record, valid_text)
from runtime.request import Completion, Request, request_from_json, request_to_json
from runtime.request_fields import SAMPLING_FIELDS, Sampling, parse_sampling
from runtime.stop_strings import StopStrings, cut_at_stop

PROMPTS = ("prompt", "prompt_ids", "messages")  # exactly one per record
FIELDS = frozenset(("id",) + PROMPTS) | (SAMPLING_FIELDS - {"echo"})


@dataclasses.dataclass
class Job:
    """One input line: a request to run (n samples of it), or an error to report as is."""
    line: int
    id: object  # the record's id or custom_id (None when the line has none or it is unusable)
    request: Optional[Request] = None
    stop: tuple[str, ...] = ()
    error: Optional[str] = None
    n: int = 1  # samples (Request.choice 0..n-1), written as one record once all are done
    openai: Optional[OpenAILine] = None  # a line in OpenAI's batch format

    @property
    def key(self) -> str:
        if self.openai is not None:
            return openai_batch.key(self.id, self.line)
        return record_key(self.id, self.line)

    @property
    def label(self) -> str:
        """How error messages name the line."""
        if self.id is None:
            return f"line {self.line}"
        return f"line {self.line} ({'custom_id' if self.openai else 'id'} {self.id!r})"


def record_key(record_id, line: int) -> str:
    """Identity of a record across runs: its id, else its line number."""
    return f"id:{json.dumps(record_id)}" if record_id is not None else f"line:{line}"


def parse_job(line: int, text: str, tokenizer, defaults: Union[Request, Sampling], seen: dict,
              chat_template: Optional[Callable] = None, model_name: str = "model",
              can_score: bool = True) -> Job:
    """One input line -> a Job; any problem becomes a Job with an error naming the line (also
    one this code did not foresee: a record can never stop the job). chat_template() gives
    the checkpoint's template for `messages` (or raises the error those records get);
    model_name: OpenAI lines' `model` when their body has none; can_score: whether their
    `echo` with `logprobs` can be served (single process)."""
    try:
        defaults = defaults if isinstance(defaults, Sampling) else Sampling(defaults)
        return _parse_job(line, text, tokenizer, defaults, seen, chat_template, model_name,
                          can_score)
    except Exception as e:  # noqa: BLE001 - turned into this record's error record
        return Job(line, None, error=f"line {line}: cannot be read as a request "
                                     f"({type(e).__name__}: {_first_line(e)})",
                   openai=OpenAILine(code="invalid_request") if looks_openai(text) else None)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _prompt_ids(record: dict, tokenizer, chat_template) -> tuple:
    """The record's prompt as ids, from exactly one of PROMPTS; a RuntimeInputError naming the
    field otherwise."""
    given = [name for name in PROMPTS if name in record]
    if len(given) != 1:
        raise RuntimeInputError("give exactly one of 'prompt', 'prompt_ids' and 'messages'")
    if "prompt_ids" in record:
        ids = record["prompt_ids"]
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                for t in ids):
            raise RuntimeInputError("'prompt_ids' must be a list of integers")
        return tuple(ids)
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise RuntimeInputError("'prompt' must be a string")
        if not valid_text(record["prompt"]):
            raise RuntimeInputError("'prompt' is not valid Unicode text (it holds a lone "
                                    "surrogate)")
    from runtime.chat_template import check_messages
    messages = check_messages(record["messages"]) if "messages" in record else None
    if tokenizer is None:
        raise RuntimeInputError(f"{given[0]!r} needs a tokenizer (use 'prompt_ids' or pass "
                                f"--tokenizer)")
    if messages is None:
        return tuple(tokenizer.encode(record["prompt"]))
    if chat_template is None:
        raise RuntimeInputError("'messages' need the checkpoint's chat template")
    return tuple(chat_template().encode(tokenizer, messages))


def _parse_job(line: int, text: str, tokenizer, defaults: Sampling, seen: dict,
               chat_template, model_name: str, can_score: bool) -> Job:
    openai = OpenAILine(code="invalid_json") if looks_openai(text) else None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return Job(line, None, error=f"line {line}: invalid JSON: {e.msg} at column {e.colno}",
                   openai=openai)
    except RecursionError:
        return Job(line, None, error=f"line {line}: invalid JSON: nested too deeply",
                   openai=openai)
    if not isinstance(record, dict):
        return Job(line, None, error=f"line {line}: expected a JSON object, got "
                                     f"{type(record).__name__}", openai=openai)
    if is_openai_line(record):
        info, parsed, error = openai_batch.parse_line(line, record, seen, tokenizer,
                                                      defaults.request, chat_template,
                                                      model_name, can_score)
        job = Job(line, info.custom_id, error=error or None, openai=info)
        if parsed is None:
            return job
        return _with_settings(job, parsed.request.prompt_ids, parsed.sampling, record["body"],
                              defaults, tokenizer)
    return _native_job(line, record, tokenizer, defaults, seen, chat_template)


def _native_job(line: int, record: dict, tokenizer, defaults: Sampling, seen: dict,
                chat_template) -> Job:
    """A record of this runtime's own format (see the module's docstring)."""
    record_id = record.get("id")
    if not isinstance(record_id, (str, int)) or isinstance(record_id, bool) \
            or (isinstance(record_id, str) and not valid_text(record_id)):
        return Job(line, None, error=f"line {line}: missing or invalid 'id' (a string of "
                                     f"Unicode text or an integer)")
    if record_id in seen:
        return Job(line, None, error=f"line {line}: duplicate id {record_id!r} (first on line "
                                     f"{seen[record_id]})")
    seen[record_id] = line
    job = Job(line, record_id)
    unknown = sorted(set(record) - FIELDS)
    if unknown:
        return dataclasses.replace(job, error=f"{job.label}: unknown field(s) "
                                              f"{listed(map(repr, unknown))}; allowed: "
                                              f"{', '.join(sorted(FIELDS))}")
    try:
        prompt_ids = _prompt_ids(record, tokenizer, chat_template)
        fields = {name: record[name] for name in SAMPLING_FIELDS if name in record}
        sampling = parse_sampling(fields, defaults.request)
    except RuntimeInputError as e:
        return dataclasses.replace(job, error=f"{job.label}: {e}")
    return _with_settings(job, prompt_ids, sampling, fields, defaults, tokenizer)


def _with_settings(job: Job, prompt_ids: tuple, sampling: Sampling, fields: dict,
                   defaults: Sampling, tokenizer) -> Job:
    """The job with its request; stop strings and n the line leaves out are the defaults'."""
    stop = sampling.stop if "stop" in fields else defaults.stop
    n = sampling.n if "n" in fields else defaults.n
    if stop and tokenizer is None:
        return dataclasses.replace(job, error=f"{job.label}: 'stop' strings need a tokenizer")
    request = dataclasses.replace(sampling.request, prompt_ids=tuple(prompt_ids))
    return dataclasses.replace(job, request=request, stop=stop, n=n)


def read_jobs(path: Path, tokenizer, defaults: Union[Request, Sampling], done: set,
              chat_template: Optional[Callable] = None, model_name: str = "model",
              can_score: bool = True) -> Iterator[Job]:
    """Jobs of the input file not already in `done` (streamed: the file is not held in memory)."""
    seen: dict = {}
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            job = parse_job(number, text, tokenizer, defaults, seen, chat_template, model_name,
                            can_score)
            if job.key not in done:
                yield job


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def check_output(path: Path) -> None:
    """--output must be a regular file (or not exist yet) in an existing folder: the resume
    reads it back, which would block forever on a pipe or a terminal (/dev/stdout)."""
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a pipe, terminal or device)"
        raise RuntimeInputError(f"--output {path}: {kind}; batch results go to a file, so that "
                                f"a rerun can resume from it")
    if not path.parent.is_dir():
        raise RuntimeInputError(f"--output {path}: the folder {path.parent} does not exist")


def recover_output(path: Path) -> set:
    """Keys of the records already written; a torn last line (killed mid-write) is cut off."""
    check_output(path)
    if not path.exists():
        return set()
    try:
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(path, "r+b") as f:
                f.truncate(end)
    except OSError as e:
        raise RuntimeInputError(f"--output {path}: cannot read and resume it: "
                                f"{e.strerror or e}") from None
    done = set()
    for number, text in enumerate(data[:end].split(b"\n")[:-1], start=1):
        try:
            record = json.loads(text.decode("utf-8"))
            done.add(openai_batch.output_key(record) if "custom_id" in record
                     else record_key(record["id"], record["line"]))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # JSON, shape
            raise RuntimeInputError(f"output file {path} line {number} is not a record of this "
                                    f"job; refusing to append to it") from None
    return done


class RecordWriter:
    """Appends one JSON line per record with one write() on an O_APPEND descriptor."""

    def __init__(self, path: Path, sync_every: float = 5.0):
        self.path = path
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise RuntimeInputError(f"--output {path}: cannot write to it: "
                                    f"{e.strerror or e}") from None
        self.sync_every = sync_every
        self.last_sync = time.monotonic()

    def write(self, record: dict) -> None:
        try:
            text = json.dumps(record, ensure_ascii=False)
            data = (text + "\n").encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate in some string: escape it (\\udXXX)
            data = (json.dumps(record) + "\n").encode("ascii")
        try:
            while data:  # a regular file takes it in one go; loop only for partial writes
                data = data[os.write(self.fd, data):]
            if time.monotonic() - self.last_sync > self.sync_every:
                os.fsync(self.fd)
                self.last_sync = time.monotonic()
        except OSError as e:  # a full disk, a lost mount: nothing later could be written either
            raise RuntimeInputError(f"--output {self.path}: writing failed ({e.strerror or e}); "
                                    f"the records written before are kept: rerun the same "
                                    f"command to resume") from None

    def close(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError:
            pass  # the write that failed has said so
        os.close(self.fd)


@dataclasses.dataclass
class Summary:
    records: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    skipped: int = 0  # already in the output from an earlier run
    interrupted: bool = False

    def line(self) -> str:
        rate = self.records / self.seconds if self.seconds else 0.0
        tokens = self.output_tokens / self.seconds if self.seconds else 0.0
        text = (f"{self.records} records ({self.errors} errors), {self.prompt_tokens} prompt + "
                f"{self.output_tokens} generated tokens in {self.seconds:.1f} s: {rate:.2f} "
                f"records/s, {tokens:.1f} generated tokens/s")
        if self.skipped:
            text += f"; {self.skipped} already done earlier"
        if self.interrupted:
            text += "; interrupted: rerun the same command to resume"
        return text


def _encode_job(job: Job) -> dict:
    """A job as JSON, for its broadcast to the other processes (every Request field kept)."""
    return {"line": job.line, "id": job.id, "stop": list(job.stop), "n": job.n,
            "request": request_to_json(job.request),
            "openai": None if job.openai is None else dataclasses.asdict(job.openai)}


def _decode_job(message: dict) -> Job:
    openai = message["openai"]
    return Job(message["line"], message["id"], request_from_json(message["request"]),
               tuple(message["stop"]), n=message["n"],
               openai=None if openai is None else OpenAILine(**openai))


def run_job(engine: Engine, tokenizer, input_path: Optional[Path], output_path: Optional[Path],
            defaults: Union[Request, Sampling], keep_going: Callable[[], bool] = lambda: True,
            progress: bool = False, chat_template: Optional[Callable] = None,
            model_name: str = "model") -> Summary:
    """Generate a completion for every input line not yet in the output file. `messages`
    records are rendered with chat_template() (runtime/chat_template.py's template_loader);
    defaults: the settings, stop strings and n of lines that leave them out; model_name: the
    `model` of OpenAI-format responses whose body names none.

    Multi-host: only the leader (process 0) reads the input and writes the output; every job
    reaches the other processes by broadcast, so all of them run the same steps in lockstep.
    """
    leader = is_leader()
    if leader and not input_path.is_file():
        raise RuntimeInputError(f"--input {input_path}: no such file")
    done = recover_output(output_path) if leader else set()
    output = _Output(tokenizer, RecordWriter(output_path) if leader else None,
                     _progress_bar(progress and leader, max(count_lines(input_path) - len(done), 0)
                                   if leader else 0), Summary(skipped=len(done)),
                     engine.prompt_logprobs)
    stops = StopStrings(tokenizer)
    jobs: dict[int, Job] = {}  # in flight, by input line
    results: dict[int, list[Optional[Completion]]] = {}  # their choices, as they finish

    def requests():
        parsed = read_jobs(input_path, tokenizer, defaults, done, chat_template, model_name,
                           can_score=not multi_process()) if leader else None
        for job in synchronized(output.errors_written(parsed) if leader else None, _encode_job,
                                _decode_job):
            jobs[job.line], results[job.line] = job, [None] * job.n
            for choice in range(job.n):  # one after another: they share one prefill
                stops.add((job.line, choice), job.stop)
                yield (job.line, choice), dataclasses.replace(job.request, choice=choice)

    try:
        for key, completion in engine.serve(requests(), stops.reached,
                                            admit=lambda: synchronized_flag(keep_going())):
            stops.finished(key)
            line, choice = key
            if completion.error is not None:
                completion.error = completion.error.replace(f"request {key}", jobs[line].label)
            results[line][choice] = completion
            if all(done is not None for done in results[line]):
                output.write(jobs.pop(line), results.pop(line))
    finally:
        output.close()
    output.summary.seconds = time.monotonic() - output.start
    output.summary.interrupted = not synchronized_flag(keep_going())
    return output.summary


class _Output:
    """The records of one run: counted on every process, written (with progress) by the
    leader. score(prompt_ids, top): the prompt's log-probabilities (OpenAI lines' echo)."""

    def __init__(self, tokenizer, writer: Optional[RecordWriter], bar, summary: Summary,
                 score: Optional[Callable] = None):
        self.tokenizer, self.writer, self.bar, self.summary = tokenizer, writer, bar, summary
        self.score = score
        self.start = time.monotonic()

    def errors_written(self, jobs: Iterator[Job]) -> Iterator[Job]:
        """The jobs to run; those that are errors already go straight to the output."""
        for job in jobs:
            if job.error is None:
                yield job
            else:
                self.write(job, [])

    def write(self, job: Job, completions: list[Completion]) -> None:
        """A job's record, once all its choices are done (none: an error job)."""
        error = job.error or next((c.error for c in completions if c.error is not None), None)
        request, prompt_logprobs = job.request, None
        if error is None and self.writer is not None and job.openai is not None \
                and job.openai.echo and (request.logprobs or request.top_logprobs):
            try:  # scoring: the prompt's own log-probabilities (single process: can_score)
                prompt_logprobs = self.score(request.prompt_ids, request.top_logprobs)
            except RequestError as e:
                error = f"{job.label}: {e}"
        summary = self.summary
        summary.records += 1
        summary.errors += error is not None
        summary.prompt_tokens += len(request.prompt_ids) if request else 0
        summary.output_tokens += sum(len(c.output_ids) for c in completions)
        if self.writer is None:
            return
        if job.openai is not None:
            self.writer.write(openai_batch.error_line(job.line, job.openai, error) if error else
                              openai_batch.response_line(job.line, job.openai, request,
                                                         self._texts(job, completions),
                                                         completions, self.tokenizer,
                                                         prompt_logprobs))
        elif error is not None:
            text = None if self.tokenizer is None else ""
            self.writer.write({"id": job.id, "line": job.line, "text": text, "output_ids": [],
                               "finish_reason": "error", "error": error, "output_tokens": 0,
                               "prompt_tokens": len(request.prompt_ids) if request else 0})
        else:
            self.writer.write(native_record(job.id, job.line, request,
                                            self._texts(job, completions), completions))
        if self.bar is not None:
            elapsed = time.monotonic() - self.start
            self.bar.set_postfix_str(f"{summary.output_tokens / max(elapsed, 1e-9):.1f} tok/s, "
                                     f"{summary.errors} errors", refresh=False)
            self.bar.update(1)

    def _texts(self, job: Job, completions: list[Completion]) -> list[Optional[str]]:
        """Each choice's text, cut where a stop string begins; None without a tokenizer."""
        if self.tokenizer is None:
            return [None] * len(completions)
        texts = [decoded(self.tokenizer, done.output_ids) for done in completions]
        return [text[:cut_at_stop(text, job.stop)] if done.finish_reason == "stop" else text
                for text, done in zip(texts, completions)]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="rec", desc="batch", dynamic_ncols=True)
