"""The OpenAI-compatible server (issue 21), started for real on 127.0.0.1 (a free port) over the
demo checkpoint and driven by the official `openai` client and raw HTTP: completions and chat,
streaming and not, equal to run.py's path; 32 concurrent streams; a dropped client frees its
slot; 4xx answers that name the problem while the server keeps serving; /metrics parses.
Bounded: fixed request counts, loopback only, every test ends by itself."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port
from runtime.app import default_request, load_engine, open_model
from runtime.chat_template import template_loader
from runtime.cli import parse_args
from runtime.request import Request
from runtime.server.http import ServedModel
from runtime.server.main import Server, warm_up

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SLOTS = 4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, base url, engine, opened model): the demo checkpoint on SLOTS slots."""
    args = parse_args(["--slots", str(SLOTS), "--temperature", "0"])
    opened = open_model(args)
    engine = load_engine(args, opened, SLOTS, None)
    warm_up(engine)
    folder = tmp_path_factory.mktemp("chat")
    (folder / "chat_template.jinja").write_text(CHATML)
    model = ServedModel("demo", opened.tokenizer, template_loader(folder), default_request(args),
                        opened.config.vocab_size, engine.cache_length)
    port = free_port()
    server = Server(engine, model, port=port, max_queue=64).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    yield server, url, engine, opened
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI  # here, not at collection: importing it takes seconds
    return OpenAI(base_url=f"{served[1]}/v1", api_key="unused", max_retries=0, timeout=120)


def metric(url: str, name: str) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


def test_completion_equals_run_py_greedy_and_streams_the_same_text(served, client):
    _, _, engine, opened = served
    prompt = "Return the"
    ids = opened.tokenizer.encode(prompt)
    want = engine.generate([Request(tuple(ids), max_new_tokens=12)])[0]  # run.py's path
    got = client.completions.create(model="demo", prompt=prompt, max_tokens=12, temperature=0)
    assert got.choices[0].text == opened.tokenizer.decode(want.output_ids)
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 12
    assert got.choices[0].finish_reason == "length" and got.model == "demo"
    assert got.id.startswith("cmpl-") and got.object == "text_completion" and got.created > 0
    chunks = list(client.completions.create(model="demo", prompt=prompt, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == got.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_chat_renders_the_template_and_streams(served, client):
    _, _, engine, opened = served
    messages = [{"role": "user", "content": "Return the value"}]
    rendered = ("<|im_start|>user\nReturn the value<|im_end|>\n<|im_start|>assistant\n")
    prompt = opened.tokenizer.encode(rendered, add_special_tokens=False)
    want = engine.generate([Request(tuple(prompt), max_new_tokens=8)])[0]
    got = client.chat.completions.create(model="demo", messages=messages, max_tokens=8,
                                         temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == opened.tokenizer.decode(want.output_ids)
    assert got.usage.prompt_tokens == len(prompt) and got.object == "chat.completion"
    stream = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=8,
                                                 temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == \
        got.choices[0].message.content


def test_sampling_controls_logprobs_stop_and_n(served, client):
    got = client.completions.create(model="demo", prompt="Return the", max_tokens=6,
                                    temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == 6 and all(v <= 0 for v in lp.token_logprobs)
    # greedy: the top token; its logprob equal to float32 rounding (two fusions compute them)
    assert all(max(top, key=top.get) == token and top[token] == pytest.approx(v, rel=1e-5)
               for top, token, v in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs))
    text = got.choices[0].text
    stop = text[3:6]
    cut = client.completions.create(model="demo", prompt="Return the", max_tokens=6,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    many = client.completions.create(model="demo", prompt="Return the", max_tokens=8,
                                     temperature=1.0, n=3, seed=11,
                                     extra_body={"min_p": 0.05, "repetition_penalty": 1.1})
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert len({c.text for c in many.choices}) > 1
    if all(c.finish_reason == "length" for c in many.choices):
        assert many.usage.completion_tokens == 3 * 8
    assert many.usage.completion_tokens <= 3 * 8


def test_thirty_two_concurrent_streams_complete_with_their_token_counts(served, client):
    def one(i: int):
        count, text, usage = 0, "", None
        for chunk in client.completions.create(
                model="demo", prompt=f"Return the {i}", max_tokens=5 + i % 7, temperature=0.7,
                seed=i, stream=True, stream_options={"include_usage": True}):
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                text += c.text
                count += 1 if c.finish_reason is not None else 0
        return i, count, usage

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    for i, finished, usage in results:
        assert finished == 1
        assert usage.completion_tokens <= 5 + i % 7
    assert sum(u.completion_tokens for _, _, u in results) > 32


def test_a_dropped_stream_frees_its_slot(served):
    url = served[1]
    body = {"model": "demo", "prompt": "Return the", "max_tokens": 240, "temperature": 0.8,
            "stream": True, "seed": 1, "logit_bias": {"2": -100}}  # no EOS: it would run 240
    before = metric(url, "llm_runtime_generated_tokens_total")
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{url}/v1/completions", json=body) as response:
            lines = response.iter_lines()
            received = [line for _, line in zip(range(6), lines) if line.startswith("data:")]
            assert received
            # leave mid-stream: closing the response drops the connection
    deadline = time.monotonic() + 30
    while metric(url, "llm_runtime_slots_busy") != 0:
        assert time.monotonic() < deadline, "the dropped client's slot was not freed"
        time.sleep(0.1)
    generated = metric(url, "llm_runtime_generated_tokens_total") - before
    print(f"generated {generated} tokens before the slot was freed")
    assert 0 < generated < 120


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "invalid JSON"),
    ({"prompt": "x", "temprature": 0.5}, 400, "unknown field(s) 'temprature'"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_logprobs": 3}, 400, "top_logprobs"),
    ({"prompt": "x", "logprobs": 50}, 400, "top_logprobs"),
    ({"prompt": "x", "n": 0}, 400, "'n'"),
    ({"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"prompt": [5] * 300}, 400, "does not fit the context"),
    ({"prompt": "x", "model": "gpt-9"}, 404, "gpt-9"),
    ({"prompt": 7}, 400, "'prompt'"),
])
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(
        served, body, status, words):
    url = served[1]
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(f"{url}/v1/completions", **kwargs)
    assert response.status_code == status
    assert words in response.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/completions",
                      json={"prompt": "Return", "max_tokens": 1}).status_code == 200


def test_chat_without_a_template_and_a_full_queue(served):
    server, url = served[0], served[1]
    served_model = server.model
    loader = served_model.chat_template
    served_model.chat_template = template_loader(Path(__file__).parent / "no-such-folder")
    try:
        response = httpx.post(f"{url}/v1/chat/completions",
                              json={"messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 400 and "chat template" in response.json()["error"][
            "message"]
    finally:
        served_model.chat_template = loader
    server.worker.max_queue = 0
    try:
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "x"})
        assert response.status_code == 429 and "queue is full" in response.json()["error"][
            "message"]
    finally:
        server.worker.max_queue = 64


def test_models_health_and_metrics_parse(served):
    url = served[1]
    models = httpx.get(f"{url}/v1/models").json()
    assert models["data"][0]["id"] == "demo"
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    names = {f.name for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    for name in ("llm_runtime_requests", "llm_runtime_prompt_tokens",
                 "llm_runtime_generated_tokens", "llm_runtime_time_to_first_token_seconds",
                 "llm_runtime_inter_token_latency_seconds", "llm_runtime_slots_busy",
                 "llm_runtime_queue_length"):
        assert name in names
    assert httpx.get(f"{url}/v1/nothing").status_code == 404


def test_echo_with_logprobs_scores_the_prompt(served, client):
    _, _, engine, opened = served
    prompt = "Return the value of"
    ids = opened.tokenizer.encode(prompt)
    got = client.completions.create(model="demo", prompt=prompt, max_tokens=3, temperature=0,
                                    echo=True, logprobs=2)
    lp = got.choices[0].logprobs
    assert got.choices[0].text.startswith(opened.tokenizer.decode(ids))
    assert len(lp.token_logprobs) == len(ids) + 3 and lp.token_logprobs[0] is None
    scored = engine.prompt_logprobs(ids, 2)
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([v for v, _ in scored[1:]], abs=1e-5)
    # token t's logprob is the raw logprob a prefill of tokens < t gives it (forced by a
    # logit bias: logprobs are the model's own, before the bias)
    forced = engine.generate([Request(tuple(ids[:t]), max_new_tokens=1, logprobs=True,
                                      logit_bias=((ids[t], 100.0),))
                              for t in range(1, len(ids))])
    assert [f.output_ids for f in forced] == [[t] for t in ids[1:]]
    assert [f.logprobs[0][0] for f in forced] == pytest.approx([v for v, _ in scored[1:]],
                                                               abs=1e-4)
