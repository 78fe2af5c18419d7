"""The line formats of batch jobs (runtime/batch.py tells them apart line by line): OpenAI's
batch file format, and the JSON of this runtime's own records (choices, logprobs).

OpenAI's input line: {"custom_id": "...", "method": "POST", "url": "/v1/completions" or
"/v1/chat/completions", "body": {...}}; the body is parsed as the server parses one
(openai_api.parse_body: the same fields and messages), except that `stream` must be false or
absent; settings a body leaves out are the job's defaults (run.py's flags), as for this
runtime's records, not the server's (16 tokens, a fresh seed): a rerun samples the same.
`model` is echoed back (the job's model name when absent). Output lines have OpenAI's
documented "request output" shape:

  {"id": "batch_req_<line>", "custom_id": ..., "error": null,
   "response": {"status_code": 200, "request_id": ..., "body": <the endpoint's response>}}

and failures its documented split: a body the endpoint would refuse gets "response":
{"status_code": 400, "request_id", "body": <OpenAI's error object>} with "error": null; a line
that is no request at all (not JSON, no usable custom_id, a repeated custom_id, another method
or url, unknown fields) gets "response": null and "error": {"code", "message"}. Records are
resumed by custom_id; lines without a usable one by the line number the id carries.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from typing import Callable, Optional

from runtime import openai_api as api
from runtime.errors import RequestError
from runtime.request import Completion, Request

URLS = {"/v1/completions": False, "/v1/chat/completions": True}  # url -> chat
LINE_FIELDS = frozenset(("custom_id", "method", "url", "body"))
ID_PREFIX = "batch_req_"


@dataclasses.dataclass(frozen=True)
class OpenAILine:
    """What an OpenAI-format line's output needs besides its request."""
    custom_id: Optional[str] = None  # None: missing, unusable or repeated (keyed by line)
    chat: bool = False
    model: Optional[str] = None  # the body's `model`, else the job's model name
    echo: bool = False  # completions: the prompt before each choice's text
    code: Optional[str] = None  # a line that is no request: its `error` object's code


def is_openai_line(record) -> bool:
    return isinstance(record, dict) and bool(LINE_FIELDS & set(record))


def looks_openai(text: str) -> bool:
    """For a line that is not even a JSON object: which format its error line takes."""
    return '"custom_id"' in text


def key(custom_id: Optional[str], line: int) -> str:
    """Identity of an OpenAI-format line across runs (batch.record_key's for the other)."""
    return f"custom_id:{json.dumps(custom_id)}" if custom_id is not None else f"line:{line}"


def output_key(record: dict) -> str:
    """key() of an output line read back; ValueError/KeyError/TypeError for a foreign one."""
    custom_id = record["custom_id"]
    if custom_id is not None and not isinstance(custom_id, str):
        raise TypeError("custom_id")
    line = int(record["id"].removeprefix(ID_PREFIX))
    return key(custom_id, line)


def parse_line(line: int, record: dict, seen: dict, tokenizer, defaults: Request,
               chat_template: Optional[Callable], model_name: str,
               can_score: bool = True) -> tuple[OpenAILine, Optional[api.ParsedBody], str]:
    """(the line's info, its parsed body, "") or (info, None, the error message naming the line,
    custom_id and field). seen: custom_ids (as ("custom_id", id)) -> their first line.
    can_score: whether `echo` with `logprobs` (prompt log-probabilities) can be served."""
    custom_id = record.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or not valid_text(custom_id):
        return (OpenAILine(code="invalid_request"), None,
                f"line {line}: missing or invalid 'custom_id' (a non-empty string)")
    if ("custom_id", custom_id) in seen:
        return (OpenAILine(code="duplicate_custom_id"), None,
                f"line {line}: duplicate custom_id {custom_id!r} (first on line "
                f"{seen['custom_id', custom_id]})")
    seen["custom_id", custom_id] = line
    where = f"line {line} (custom_id {custom_id!r})"
    unknown = sorted(set(record) - LINE_FIELDS)
    problem = (f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: "
               f"{', '.join(sorted(LINE_FIELDS))}") if unknown else None
    if problem is None and record.get("method") != "POST":
        problem = f"'method' must be \"POST\", got {_shown(record.get('method'))}"
    if problem is None and record.get("url") not in URLS:
        problem = (f"'url' must be \"/v1/completions\" or \"/v1/chat/completions\", got "
                   f"{_shown(record.get('url'))}")
    if problem is not None:
        return OpenAILine(custom_id, code="invalid_request"), None, f"{where}: {problem}"
    chat, body = URLS[record["url"]], record.get("body")
    info = OpenAILine(custom_id, chat, model_name)
    try:
        parsed = api.parse_body(body, chat, defaults, tokenizer, chat_template)
        model = model_name if body.get("model") is None else body["model"]
        if not isinstance(model, str):
            raise RequestError("'model' must be a string")
        if parsed.stream:
            raise RequestError("'stream' must be false or absent in a batch job")
        echo = parsed.sampling.echo
        if echo and (parsed.request.logprobs or parsed.request.top_logprobs) and not can_score:
            raise RequestError("'echo' with 'logprobs' (prompt log-probabilities) needs a "
                               "single-process job")
    except RequestError as e:
        return info, None, f"{where}: {e}"
    return dataclasses.replace(info, model=model, echo=echo), parsed, ""


def response_line(line: int, info: OpenAILine, request: Request, texts: list[Optional[str]],
                  completions: list[Completion], tokenizer,
                  prompt_logprobs: Optional[list] = None) -> dict:
    """The output line of a line whose n choices are done: the endpoint's response in `body`.
    texts: each choice's text (cut at its stop string; None without a tokenizer);
    prompt_logprobs: the prompt's entries (echo with logprobs)."""
    chat, prompt = info.chat, list(request.prompt_ids)
    echo_text = ""
    if info.echo and tokenizer is not None:
        echo_text = decoded(tokenizer, prompt)
    wants = request.logprobs or request.top_logprobs
    choices = []
    for index, (text, done) in enumerate(zip(texts, completions)):
        logprobs = None
        if wants and chat:
            logprobs = api.chat_logprobs(tokenizer, done.output_ids, done.logprobs or [])
        elif wants:
            scored = prompt if prompt_logprobs else []  # echo: the prompt's tokens come first
            entries = (prompt_logprobs or []) + (done.logprobs or [])
            logprobs = api.completion_logprobs(tokenizer, scored + done.output_ids, entries,
                                               0 if scored else len(echo_text))
        choices.append(api.choice(chat, index, echo_text + (text or ""), api.finish_reason(done),
                                  logprobs))
    usage = api.usage(len(prompt), sum(len(c.output_ids) for c in completions))
    body = api.response(chat, f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}",
                        info.model, int(time.time()), choices, usage)
    return _line(line, info, {"status_code": 200, "request_id": _request_id(), "body": body})


def error_line(line: int, info: OpenAILine, message: str) -> dict:
    """A failed line: a 400 response with OpenAI's error object for a refused body, else (no
    request at all) no response and an `error` object."""
    if info.code is not None:
        return _line(line, info, None, {"code": info.code, "message": message})
    return _line(line, info, {"status_code": 400, "request_id": _request_id(),
                              "body": api.error_body(message)})


def _line(line: int, info: OpenAILine, response: Optional[dict],
          error: Optional[dict] = None) -> dict:
    return {"id": f"{ID_PREFIX}{line}", "custom_id": info.custom_id, "response": response,
            "error": error}


def _request_id() -> str:
    return f"req_{secrets.token_hex(16)}"


def decoded(tokenizer, ids: list[int]) -> str:
    """The text of generated ids; ids the tokenizer cannot decode come out as U+FFFD."""
    try:
        return tokenizer.decode(ids)
    except Exception:  # noqa: BLE001 - a line's text must not stop the job
        return "\ufffd" * len(ids)


def valid_text(value: str) -> bool:
    """Whether a JSON string is Unicode text (JSON may escape a lone surrogate, \\ud800, which
    no tokenizer or UTF-8 writer takes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) \
        else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


# --- this runtime's records -------------------------------------------------------------------

def native_record(record_id, line: int, request: Request, texts: list,
                  completions: list[Completion]) -> dict:
    """A record of this runtime's format (batch.py's docstring): choice 0 at the top level as
    before n and logprobs existed; `choices` when there are several."""
    first, wants = completions[0], request.logprobs or request.top_logprobs
    record = {"id": record_id, "line": line, "text": texts[0], "output_ids": first.output_ids,
              "finish_reason": first.finish_reason, "prompt_tokens": len(request.prompt_ids),
              "output_tokens": len(first.output_ids)}
    if wants:
        record["logprobs"] = logprob_records(first.output_ids, first.logprobs)
    if len(completions) > 1:
        record["choices"] = choice_records(texts, completions, wants)
    return record


def choice_records(texts: list, completions: list[Completion], logprobs: bool) -> list[dict]:
    """A prompt's n samples as JSON (batch records, run.py --json)."""
    choices = []
    for index, (text, done) in enumerate(zip(texts, completions)):
        choice = {"index": index, "text": text, "output_ids": done.output_ids,
                  "finish_reason": done.finish_reason}
        if logprobs:
            choice["logprobs"] = logprob_records(done.output_ids, done.logprobs)
        choices.append(choice)
    return choices


def logprob_records(ids: list[int], entries: Optional[list]) -> list[dict]:
    """Completion.logprobs as JSON: per output token its id, log-probability and the most
    likely alternatives (most likely first)."""
    return [{"token_id": token, "logprob": logprob,
             "top_logprobs": [{"token_id": i, "logprob": v} for i, v in top]}
            for token, (logprob, top) in zip(ids, entries or [])]
