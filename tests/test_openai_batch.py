"""OpenAI's batch file format in batch jobs: lines {custom_id, method, url, body} parsed as the
server parses bodies, answered with OpenAI's request output lines (200 with the endpoint's
response, 400 with its error object, or no response and an error object for lines that are no
request); mixed with this runtime's records in one file; resumed by custom_id."""

from __future__ import annotations

import json

import pytest

from runtime.batch import parse_job, recover_output, run_job
from runtime.chat_template import load_chat_template, template_loader
from runtime.request import Request
from test_chat_cli import small_tokenizer, user  # noqa: F401 - a fixture

GREEDY = Request((), max_new_tokens=4, temperature=0.0)
VOLATILE = ("id", "created", "request_id")  # fresh per run


def line(custom_id, body, url="/v1/completions", method="POST"):
    return {"custom_id": custom_id, "method": method, "url": url, "body": body}


def chat_line(custom_id, body):
    return line(custom_id, body, "/v1/chat/completions")


def write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def outputs(path):
    """Output lines by custom_id (or by id for lines without one, and native records')."""
    found = {}
    for record in map(json.loads, path.read_text().splitlines()):
        key = record.get("custom_id") or record["id"]
        assert key not in found, f"{key} written twice"
        found[key] = record
    return found


def stable(value):
    """value without the ids and times that differ from run to run."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


LINES = [
    line("plain", {"model": "tiny", "prompt": "alpha beta", "max_tokens": 4, "temperature": 0}),
    line("ids", {"prompt": [5, 6, 7], "max_tokens": 3, "n": 2, "temperature": 1.0, "seed": 4,
                 "logprobs": 2}),
    chat_line("chat", {"messages": user("alpha"), "max_completion_tokens": 3,
                       "temperature": 0, "logprobs": True, "top_logprobs": 2}),
    line("echo", {"prompt": "beta gamma", "max_tokens": 2, "temperature": 0, "echo": True,
                  "logprobs": 1}),
    line("bad-type", {"prompt": "alpha", "min_p": "high"}),
    line("bad-range", {"prompt": [5], "min_p": 2}),
    line("stream", {"prompt": "alpha", "stream": True}),
    line("plain", {"prompt": "again"}),
    '{"custom_id": "torn", "method": "POST", "url": ',
    line("get", {"prompt": "alpha"}, method="GET"),
    line("embed", {"input": "alpha"}, url="/v1/embeddings"),
    {"id": "native", "prompt": "alpha beta", "max_new_tokens": 4},
]


@pytest.fixture(scope="module")
def job_outputs(small_tokenizer, engine3, tmp_path_factory):  # noqa: F811
    tokenizer, folder = small_tokenizer
    tmp = tmp_path_factory.mktemp("openai-batch")
    out = tmp / "out.jsonl"
    run_job(engine3, tokenizer, write(tmp / "in.jsonl", LINES), out, GREEDY,
            chat_template=template_loader(folder), model_name="default-model")
    return outputs(out), out, tmp


@pytest.mark.slow
def test_completions_and_chat_lines_get_the_endpoints_responses(job_outputs, small_tokenizer):
    found, _, _ = job_outputs
    tokenizer, folder = small_tokenizer
    plain = found["plain"]
    assert plain["id"] == "batch_req_1" and plain["error"] is None
    response = plain["response"]
    assert response["status_code"] == 200 and response["request_id"].startswith("req_")
    body = response["body"]
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    native = found["native"]  # the same prompt and settings as this runtime's record
    assert choice["text"] == native["text"] and choice["index"] == 0
    assert body["usage"] == {"prompt_tokens": native["prompt_tokens"],
                             "completion_tokens": native["output_tokens"],
                             "total_tokens": native["prompt_tokens"] + native["output_tokens"]}

    ids = found["ids"]["response"]["body"]
    assert ids["model"] == "default-model" and len(ids["choices"]) == 2
    for c in ids["choices"]:
        logprobs = c["logprobs"]
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) \
            == len(logprobs["top_logprobs"]) and all(len(t) <= 2 for t in logprobs["top_logprobs"])
    assert ids["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"])
                                                   for c in ids["choices"])

    chat = found["chat"]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    [message] = chat["choices"]
    assert message["message"]["role"] == "assistant"
    content = message["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"]
    assert all(len(entry["top_logprobs"]) == 2 for entry in content)
    prompt = load_chat_template(folder).encode(tokenizer, user("alpha"))
    assert chat["usage"]["prompt_tokens"] == len(prompt)

    echo = found["echo"]["response"]["body"]["choices"][0]
    prompt_text = tokenizer.decode(tokenizer.encode("beta gamma"))
    assert echo["text"].startswith(prompt_text)
    scored = echo["logprobs"]["token_logprobs"]
    assert scored[0] is None and len(scored) == len(tokenizer.encode("beta gamma")) + \
        found["echo"]["response"]["body"]["usage"]["completion_tokens"]


@pytest.mark.slow
def test_bad_lines_get_openais_error_shapes_naming_the_field(job_outputs):
    found, _, _ = job_outputs
    for custom_id, field in (("bad-type", "'min_p' must be a number"),
                             ("bad-range", "min_p must be a number in [0, 1]"),
                             ("stream", "'stream' must be false")):
        record = found[custom_id]
        assert record["error"] is None and record["response"]["status_code"] == 400
        message = record["response"]["body"]["error"]["message"]
        number = next(i for i, x in enumerate(LINES, start=1)
                      if isinstance(x, dict) and x.get("custom_id") == custom_id)
        assert message.startswith(f"line {number} (custom_id {custom_id!r}): "), message
        assert field in message and "\n" not in message
        assert record["response"]["body"]["error"]["type"] == "invalid_request_error"
    # lines that are no request: no response, an error object
    by_line = {r["id"]: r for r in found.values() if r["id"].startswith("batch_req_")}
    duplicate = by_line["batch_req_8"]
    assert duplicate["custom_id"] is None and duplicate["response"] is None
    assert duplicate["error"]["code"] == "duplicate_custom_id"
    assert "duplicate custom_id 'plain' (first on line 1)" in duplicate["error"]["message"]
    assert by_line["batch_req_9"]["error"]["code"] == "invalid_json"
    assert "'method' must be \"POST\"" in found["get"]["error"]["message"]
    assert "'url' must be" in found["embed"]["error"]["message"]
    assert found["embed"]["response"] is None


def test_a_chat_line_without_a_template_is_a_400(small_tokenizer, tmp_path):  # noqa: F811
    tokenizer, _ = small_tokenizer
    text = json.dumps(chat_line("c", {"messages": user("alpha")}))
    for loader, message in ((template_loader(tmp_path), "has no chat template"),
                            (None, "this model has no chat template")):
        job = parse_job(3, text, tokenizer, GREEDY, {}, loader)
        assert job.request is None and job.openai.code is None and job.id == "c"
        assert job.error.startswith("line 3 (custom_id 'c'): ") and message in job.error


def test_echo_with_logprobs_needs_a_single_process(small_tokenizer):  # noqa: F811
    tokenizer, _ = small_tokenizer
    text = json.dumps(line("e", {"prompt": "alpha", "echo": True, "logprobs": 0}))
    assert parse_job(1, text, tokenizer, GREEDY, {}).error is None
    job = parse_job(1, text, tokenizer, GREEDY, {}, can_score=False)
    assert "needs a single-process job" in job.error


@pytest.mark.slow
def test_resume_after_a_partial_output_writes_each_line_once(job_outputs, small_tokenizer,
                                                             engine3):
    found, full, tmp = job_outputs
    tokenizer, folder = small_tokenizer
    lines = full.read_text().splitlines(keepends=True)
    partial = tmp / "partial.jsonl"
    partial.write_text("".join(lines[:5]) + lines[5][:20])  # killed mid-write
    assert len(recover_output(partial)) == 5
    summary = run_job(engine3, tokenizer, tmp / "in.jsonl", partial, GREEDY,
                      chat_template=template_loader(folder), model_name="default-model")
    assert summary.skipped == 5 and summary.records == len(LINES) - 5
    resumed = outputs(partial)
    assert stable(resumed) == stable(found)
    assert len(partial.read_text().splitlines()) == len(LINES)


@pytest.mark.slow
def test_stop_strings_cut_the_text_in_both_formats(small_tokenizer, engine3,  # noqa: F811
                                                   tmp_path):
    tokenizer, _ = small_tokenizer
    token = next(t for t in range(4, tokenizer.vocab_size)
                 if len(tokenizer.decode([t]).strip()) >= 3)
    piece = tokenizer.decode([token])
    stop = piece[2:]
    settings = {"logit_bias": {str(token): 100}, "stop": [stop], "temperature": 0}  # always it
    source = write(tmp_path / "in.jsonl", [
        line("o", {"prompt": "alpha", "max_tokens": 5, **settings}),
        {"id": "n", "prompt": "alpha", "max_new_tokens": 5, **settings}])
    out = tmp_path / "out.jsonl"
    run_job(engine3, tokenizer, source, out, GREEDY)
    found = outputs(out)
    body = found["o"]["response"]["body"]
    assert body["choices"][0]["text"] == piece[:piece.index(stop)] == found["n"]["text"]
    assert body["choices"][0]["finish_reason"] == "stop" == found["n"]["finish_reason"]
    assert body["usage"]["completion_tokens"] == 1 and found["n"]["output_ids"] == [token]
