"""Batch generation jobs: JSONL in, JSONL out, continuous batching, resumable after any kill.

Input: one JSON object per line with `id` and `prompt` (text), `prompt_ids` (token ids) or
`messages` (chat messages, rendered with the checkpoint's chat template), and optionally
`max_new_tokens`, `temperature`, `top_p`, `top_k`, `seed`, `stop` (a string or a list of
strings). Output: one JSON object per input line, in completion order, with `id`, `line`,
`text`, `output_ids`, `finish_reason` (eos, length, stop, error), `error` (on errors),
`prompt_tokens`, `output_tokens`.

Every output record is appended with a single write() of one complete line, so a killed job
leaves at most one torn line at the end; a rerun of the same command truncates it, skips every
record already written (by id, or by line number for lines without a usable id) and goes on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from runtime.distributed import is_leader, synchronized, synchronized_flag
from runtime.engine import Engine
from runtime.errors import RuntimeInputError, listed
from runtime.request import Request
from runtime.tokenizer import StreamDecoder

SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")
PROMPTS = ("prompt", "prompt_ids", "messages")  # exactly one per record
FIELDS = frozenset(("id", "stop") + PROMPTS + SETTINGS)


@dataclasses.dataclass
class Job:
    """One input line: a request to run, or an error to report as is."""
    line: int
    id: object  # the record's id (None when the line has none or it is unusable)
    request: Optional[Request] = None
    stop: tuple[str, ...] = ()
    error: Optional[str] = None

    @property
    def key(self) -> str:
        return record_key(self.id, self.line)


def record_key(record_id, line: int) -> str:
    """Identity of a record across runs: its id, else its line number."""
    return f"id:{json.dumps(record_id)}" if record_id is not None else f"line:{line}"


def parse_job(line: int, text: str, tokenizer, defaults: Request, seen: dict,
              chat_template: Optional[Callable] = None) -> Job:
    """One input line -> a Job; any problem becomes a Job with an error naming the line (also
    one this code did not foresee: a record can never stop the job). chat_template() gives
    the checkpoint's template for `messages` (or raises the error those records get)."""
    try:
        return _parse_job(line, text, tokenizer, defaults, seen, chat_template)
    except Exception as e:  # noqa: BLE001 - turned into this record's error record
        return Job(line, None, error=f"line {line}: cannot be read as a request "
                                     f"({type(e).__name__}: {_first_line(e)})")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _valid_text(value: str) -> bool:
    """Whether a JSON string is Unicode text (JSON may escape a lone surrogate, \\ud800, which
    no tokenizer or UTF-8 writer takes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
        if not _valid_text(record["prompt"]):
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


def _parse_job(line: int, text: str, tokenizer, defaults: Request, seen: dict,
               chat_template=None) -> Job:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return Job(line, None, error=f"line {line}: invalid JSON: {e.msg} at column {e.colno}")
    except RecursionError:
        return Job(line, None, error=f"line {line}: invalid JSON: nested too deeply")
    if not isinstance(record, dict):
        return Job(line, None, error=f"line {line}: expected a JSON object, got "
                                     f"{type(record).__name__}")
    record_id = record.get("id")
    if not isinstance(record_id, (str, int)) or isinstance(record_id, bool) \
            or (isinstance(record_id, str) and not _valid_text(record_id)):
        return Job(line, None, error=f"line {line}: missing or invalid 'id' (a string of "
                                     f"Unicode text or an integer)")
    if record_id in seen:
        return Job(line, None, error=f"line {line}: duplicate id {record_id!r} (first on line "
                                     f"{seen[record_id]})")
    seen[record_id] = line

    def fail(message: str) -> Job:
        return Job(line, record_id, error=f"line {line} (id {record_id!r}): {message}")

    unknown = sorted(set(record) - FIELDS)
    if unknown:
        return fail(f"unknown field(s) {listed(map(repr, unknown))}; allowed: "
                    f"{', '.join(sorted(FIELDS))}")
    try:
        prompt_ids = _prompt_ids(record, tokenizer, chat_template)
    except RuntimeInputError as e:
        return fail(str(e))
    stop = record.get("stop", ())
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s and _valid_text(s)
                                                      for s in stop):
        return fail("'stop' must be a non-empty string or a list of them")
    if stop and tokenizer is None:
        return fail("'stop' strings need a tokenizer")
    settings = {name: record[name] for name in SETTINGS if name in record}
    for name in ("temperature", "top_p"):
        if name in settings and (not isinstance(settings[name], (int, float))
                                 or isinstance(settings[name], bool)):
            return fail(f"{name!r} must be a number")
    try:
        request = dataclasses.replace(defaults, prompt_ids=prompt_ids, **settings)
    except TypeError as e:
        return fail(str(e))
    return Job(line, record_id, request, tuple(stop))


def read_jobs(path: Path, tokenizer, defaults: Request, done: set,
              chat_template: Optional[Callable] = None) -> Iterator[Job]:
    """Jobs of the input file not already in `done` (streamed: the file is not held in memory)."""
    seen: dict = {}
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            job = parse_job(number, text, tokenizer, defaults, seen, chat_template)
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
            done.add(record_key(record["id"], record["line"]))
        except (ValueError, KeyError, TypeError, RecursionError):  # JSON, UTF-8, shape
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


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> Optional[int]:
    hits = [text.find(s) for s in stop if s in text]
    return min(hits) if hits else None


def _encode_job(job: Job) -> dict:
    r = job.request
    return {"line": job.line, "id": job.id, "stop": list(job.stop),
            "request": [list(r.prompt_ids), r.max_new_tokens, r.temperature, r.top_p, r.top_k,
                        r.seed]}


def _decode_job(message: dict) -> Job:
    ids, *settings = message["request"]
    return Job(message["line"], message["id"], Request(tuple(ids), *settings),
               tuple(message["stop"]))


def run_job(engine: Engine, tokenizer, input_path: Optional[Path], output_path: Optional[Path],
            defaults: Request, keep_going: Callable[[], bool] = lambda: True,
            progress: bool = False, chat_template: Optional[Callable] = None) -> Summary:
    """Generate a completion for every input line not yet in the output file. `messages`
    records are rendered with chat_template() (runtime/chat_template.py's template_loader).

    Multi-host: only the leader (process 0) reads the input and writes the output; every job
    reaches the other processes by broadcast, so all of them run the same steps in lockstep.
    """
    leader = is_leader()
    if leader and not input_path.is_file():
        raise RuntimeInputError(f"--input {input_path}: no such file")
    done = recover_output(output_path) if leader else set()
    output = _Output(tokenizer, RecordWriter(output_path) if leader else None,
                     _progress_bar(progress and leader, max(count_lines(input_path) - len(done), 0)
                                   if leader else 0), Summary(skipped=len(done)))
    stops = _StopStrings(tokenizer)

    def requests():
        jobs = read_jobs(input_path, tokenizer, defaults, done, chat_template) if leader \
            else None
        for job in synchronized(output.errors_written(jobs) if leader else None, _encode_job,
                                _decode_job):
            stops.jobs[job.line] = job
            yield job.line, job.request

    try:
        for line, completion in engine.serve(requests(), stops.reached,
                                             admit=lambda: synchronized_flag(keep_going())):
            job = stops.finished(line)
            error = completion.error
            if error is not None:
                error = error.replace(f"request {line}", f"line {line} (id {job.id!r})")
            output.write(job, completion.output_ids, completion.finish_reason, error)
    finally:
        output.close()
    output.summary.seconds = time.monotonic() - output.start
    output.summary.interrupted = not synchronized_flag(keep_going())
    return output.summary


class _StopStrings:
    """The jobs in flight (by input line) and their stop strings: on_token for Engine.serve.
    Every process decides alike: each has the tokenizer and the job's stop strings. Each job's
    text streams through a StreamDecoder (a few ids decoded per token, not the whole output)
    and only its tail, where a stop string completed by the new text can lie, is searched."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.jobs: dict[int, Job] = {}
        self.decoders: dict[int, StreamDecoder] = {}  # for jobs with stop strings
        self.tails: dict[int, str] = {}  # their text's last (longest stop - 1) characters

    def reached(self, line: int, token: int) -> bool:
        job = self.jobs[line]
        if not job.stop:
            return False
        decoder = self.decoders.get(line) or self.decoders.setdefault(
            line, StreamDecoder(self.tokenizer))
        try:
            text = self.tails.get(line, "") + decoder.push(token)
        except Exception:  # noqa: BLE001 - an id the tokenizer cannot decode matches nothing
            return False
        keep = max(map(len, job.stop)) - 1
        self.tails[line] = text[len(text) - keep:] if keep else ""
        return any(s in text for s in job.stop)

    def finished(self, line: int) -> Job:
        self.decoders.pop(line, None)
        self.tails.pop(line, None)
        return self.jobs.pop(line)


class _Output:
    """The records of one run: counted on every process, written (with progress) by the
    leader."""

    def __init__(self, tokenizer, writer: Optional[RecordWriter], bar, summary: Summary):
        self.tokenizer, self.writer, self.bar, self.summary = tokenizer, writer, bar, summary
        self.start = time.monotonic()

    def errors_written(self, jobs: Iterator[Job]) -> Iterator[Job]:
        """The jobs to run; those that are errors already go straight to the output."""
        for job in jobs:
            if job.error is None:
                yield job
            else:
                self.write(job, [], "error", job.error)

    def write(self, job: Job, output_ids: list[int], reason: str,
              error: Optional[str] = None) -> None:
        summary = self.summary
        prompt_tokens = len(job.request.prompt_ids) if job.request else 0
        summary.records += 1
        summary.errors += reason == "error"
        summary.prompt_tokens += prompt_tokens
        summary.output_tokens += len(output_ids)
        if self.writer is None:
            return
        text = _decoded(self.tokenizer, output_ids) if self.tokenizer is not None else None
        if reason == "stop" and text is not None:
            text = text[:_cut_at_stop(text, job.stop)]
        record = {"id": job.id, "line": job.line, "text": text, "output_ids": output_ids,
                  "finish_reason": reason, "prompt_tokens": prompt_tokens,
                  "output_tokens": len(output_ids)}
        if error is not None:
            record["error"] = error
        self.writer.write(record)
        if self.bar is not None:
            elapsed = time.monotonic() - self.start
            self.bar.set_postfix_str(f"{summary.output_tokens / max(elapsed, 1e-9):.1f} tok/s, "
                                     f"{summary.errors} errors", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()


def _decoded(tokenizer, ids: list[int]) -> str:
    """The text of generated ids; ids the tokenizer cannot decode come out as U+FFFD."""
    try:
        return tokenizer.decode(ids)
    except Exception:  # noqa: BLE001 - a record's text must not stop the job
        return "\ufffd" * len(ids)


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="rec", desc="batch", dynamic_ncols=True)
