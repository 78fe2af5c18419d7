"""OpenAI's API shapes: request bodies of /v1/completions and /v1/chat/completions -> a
Request (one validation with batch records and run.py's flags: runtime/request_fields.py), and
completions -> response objects, stream chunks and logprobs, field for field as OpenAI's
(the server and batch jobs in the OpenAI batch file format both use them).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from runtime.chat_template import check_messages
from runtime.errors import RequestError
from runtime.request import Completion, Request
from runtime.request_fields import SAMPLING_FIELDS, Sampling, check_known, parse_sampling

COMMON_FIELDS = frozenset(("model", "stream", "stream_options", "user"))
COMPLETION_FIELDS = SAMPLING_FIELDS | COMMON_FIELDS | {"prompt"}
CHAT_FIELDS = (SAMPLING_FIELDS - {"echo"}) | COMMON_FIELDS | {"messages",
                                                              "max_completion_tokens"}
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "error": "error"}


@dataclasses.dataclass(frozen=True)
class ParsedBody:
    request: Request  # prompt ids and settings (choice 0)
    sampling: Sampling  # stop strings, n, echo
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage


def parse_body(body, chat: bool, defaults: Request, tokenizer,
               chat_template: Optional[Callable] = None) -> ParsedBody:
    """A request body (a JSON object) -> ParsedBody; RequestError naming the field.
    chat_template() gives the checkpoint's template (or raises the error chat requests get)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    check_known(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    fields = dict(body)
    if chat and fields.get("max_completion_tokens") is not None:
        fields["max_tokens"] = fields.pop("max_completion_tokens")
    sampling = parse_sampling(fields, defaults, chat=chat)
    if chat:
        if "messages" not in body:
            raise RequestError("'messages' is required")
        messages = check_messages(body["messages"])
        if chat_template is None:
            raise RequestError("this model has no chat template: use /v1/completions")
        ids = tuple(chat_template().encode(_need(tokenizer, "'messages'"), messages))
    else:
        ids = _prompt_ids(body.get("prompt"), tokenizer)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"} \
            or not isinstance(options.get("include_usage", False), bool):
        raise RequestError("'stream_options' must be {\"include_usage\": true|false}")
    request = dataclasses.replace(sampling.request, prompt_ids=ids)
    return ParsedBody(request, sampling, stream, options.get("include_usage", False))


def _need(tokenizer, what: str):
    if tokenizer is None:
        raise RequestError(f"{what} needs a tokenizer; this model has none (send token ids)")
    return tokenizer


def _prompt_ids(prompt, tokenizer) -> tuple[int, ...]:
    """One prompt: a string, a list of token ids, or a list holding one of either."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError("'prompt' is not valid Unicode text") from None
        return tuple(_need(tokenizer, "a text 'prompt'").encode(prompt))
    if isinstance(prompt, list) and prompt \
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return tuple(prompt)
    raise RequestError("'prompt' must be a string or a list of token ids (one prompt per "
                       "request)")


# --- responses ------------------------------------------------------------------------------

def finish_reason(completion: Completion) -> str:
    return FINISH_REASONS[completion.finish_reason]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_text(tokenizer, token: int) -> str:
    try:
        return tokenizer.decode([token]) if tokenizer is not None else str(token)
    except Exception:  # noqa: BLE001 - an id the tokenizer cannot decode
        return "\ufffd"


def completion_logprobs(tokenizer, ids, logprobs, offset: int = 0) -> dict:
    """The completions API's logprobs object for tokens `ids` with their (logprob, top)
    pairs (logprob None: the prompt's first token, which has none); text offsets from
    `offset`."""
    texts = [token_text(tokenizer, t) for t in ids]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": [lp for lp, _ in logprobs],
            "top_logprobs": [None if lp is None else
                             {token_text(tokenizer, i): v for i, v in top}
                             for lp, top in logprobs],
            "text_offset": offsets}


def chat_logprobs(tokenizer, ids, logprobs) -> dict:
    """The chat API's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def entry(token: int, value: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                        for t, (lp, top) in zip(ids, logprobs)]}


def choice(chat: bool, index: int, text: str, reason: Optional[str],
           logprobs: Optional[dict] = None, delta: bool = False, first: bool = False) -> dict:
    """One entry of `choices`: a whole one, or a stream chunk's (delta) part."""
    if not chat:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
    if delta:
        message = {"role": "assistant", "content": text} if first else \
            ({"content": text} if text else {})
        return {"index": index, "delta": message, "logprobs": logprobs,
                "finish_reason": reason}
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": logprobs, "finish_reason": reason}


def response(chat: bool, request_id: str, model: str, created: int, choices: list,
             usage_counts: Optional[dict] = None, chunk: bool = False) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat \
        else "text_completion"
    body = {"id": request_id, "object": kind, "created": created, "model": model,
            "choices": choices}
    if usage_counts is not None or not chunk:
        body["usage"] = usage_counts
    return body


def error_body(message: str, kind: str = "invalid_request_error",
               param: Optional[str] = None, code: Optional[str] = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
