"""Every sampling field in batch records and in run.py's flags, through the one parser the server
uses (request_fields.parse_sampling): accepted, or refused naming the field; n samples per
record; per-token logprobs; jobs broadcast to other processes keep every Request field."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from conftest import random_params, tiny_config
import runtime.batch
from runtime import cli
from runtime.app import default_sampling, main
from runtime.batch import FIELDS, Job, _decode_job, _encode_job, parse_job, run_job
from runtime.checkpoint.grok_ckpt import write_ckpt0
from runtime.config import save_config
from runtime.openai_batch import OpenAILine
from runtime.request import Request
from runtime.request_fields import Sampling
from test_chat_cli import small_tokenizer  # noqa: F401 - a fixture

GREEDY = Request((), max_new_tokens=5, temperature=0.0)


def parsed(**record):
    return parse_job(4, json.dumps({"id": "r", "prompt_ids": [5, 6, 7], **record}), None,
                     GREEDY, {})


def run_records(engine, tmp_path, records, defaults=GREEDY, tokenizer=None, name="out"):
    source = tmp_path / f"{name}.in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / f"{name}.jsonl"
    run_job(engine, tokenizer, source, out, defaults)
    return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}


# --- records ------------------------------------------------------------------------------------

def test_every_sampling_field_is_accepted():
    job = parsed(max_tokens=3, min_p=0.1, repetition_penalty=1.2, presence_penalty=0.5,
                 frequency_penalty=-0.5, logit_bias={"5": 3, "9": -100}, stop_token_ids=[7, 8],
                 n=3, logprobs=True, top_logprobs=2, seed=11, top_k=4, top_p=0.5,
                 temperature=0.7)
    assert job.error is None, job.error
    r = job.request
    assert (r.max_new_tokens, r.min_p, r.repetition_penalty, r.presence_penalty,
            r.frequency_penalty) == (3, 0.1, 1.2, 0.5, -0.5)
    assert r.logit_bias == ((5, 3), (9, -100)) and r.stop_token_ids == (7, 8)
    assert (r.logprobs, r.top_logprobs, r.seed, r.top_k, r.top_p, r.temperature) == \
        (True, 2, 11, 4, 0.5, 0.7)
    assert job.n == 3 and r.prompt_ids == (5, 6, 7) and r.choice == 0
    # the completions API's form: logprobs = the number of alternatives
    assert parsed(logprobs=4).request.top_logprobs == 4
    assert parsed(max_new_tokens=2).request.max_new_tokens == 2
    assert parsed().request == dataclasses.replace(GREEDY, prompt_ids=(5, 6, 7))


@pytest.mark.parametrize("field, value, message", [
    ("min_p", "high", "'min_p' must be a number"),
    ("repetition_penalty", [1], "'repetition_penalty' must be a number"),
    ("presence_penalty", True, "'presence_penalty' must be a number"),
    ("frequency_penalty", "1", "'frequency_penalty' must be a number"),
    ("logit_bias", [5, 1], "'logit_bias' must be an object"),
    ("logit_bias", {"five": 1}, "'logit_bias' key 'five' is not a token id"),
    ("logit_bias", {"5": "x"}, "'logit_bias[5]' must be a number"),
    ("stop_token_ids", "7", "'stop_token_ids' must be a list"),
    ("n", 0, "'n' must be an integer in [1, 128]"),
    ("n", 1.5, "'n' must be an integer"),
    ("logprobs", "yes", "'logprobs' must be an integer"),
    ("top_logprobs", 2, "'top_logprobs' needs 'logprobs': true"),
    ("max_tokens", 2.5, "'max_tokens' must be an integer"),
    ("stop", ["a"], "'stop' strings need a tokenizer"),
    ("echo", True, "unknown field(s) 'echo'"),
])
def test_a_bad_field_is_an_error_naming_line_id_and_field(field, value, message):
    job = parsed(**{field: value})
    assert job.request is None and job.error.startswith("line 4 (id 'r'): "), job.error
    assert message in job.error and "\n" not in job.error


@pytest.mark.slow
def test_out_of_range_values_are_error_records_naming_the_field(engine3, tmp_path):
    bad = {"min_p": ("min_p", 2), "rep": ("repetition_penalty", 0),
           "presence": ("presence_penalty", 3), "frequency": ("frequency_penalty", -2.5),
           "bias": ("logit_bias", {"5": 500}), "vocab": ("logit_bias", {"999": 1}),
           "stop-id": ("stop_token_ids", [999]), "top": ("top_logprobs", 21)}
    records = [{"id": key, "prompt_ids": [5, 6], field: value, "logprobs": True}
               for key, (field, value) in bad.items()]
    done = run_records(engine3, tmp_path, records)
    for line, (key, (field, _)) in enumerate(bad.items(), start=1):
        assert done[key]["finish_reason"] == "error"
        assert done[key]["error"].startswith(f"line {line} (id {key!r}): {field}"), \
            done[key]["error"]


@pytest.mark.slow
def test_n_choices_and_choice_zero_equals_a_single_run(engine3, tmp_path):
    sampled = {"prompt_ids": [5, 6, 7], "temperature": 1.0, "seed": 3, "max_new_tokens": 6}
    greedy = {"prompt_ids": [8, 9], "temperature": 0, "max_new_tokens": 4}
    done = run_records(engine3, tmp_path, [
        {"id": "one", **sampled}, {"id": "many", **sampled, "n": 4},
        {"id": "greedy", **greedy, "n": 2}, {"id": "greedy1", **greedy}])
    one, many = done["one"], done["many"]
    assert "choices" not in one  # n = 1 records are as before
    choices = many["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0]["output_ids"] == one["output_ids"] == many["output_ids"]
    assert many["finish_reason"] == choices[0]["finish_reason"]
    assert many["output_tokens"] == len(many["output_ids"])
    assert len({tuple(c["output_ids"]) for c in choices}) > 1, choices  # own PRNG streams
    greedy_choices = done["greedy"]["choices"]
    assert greedy_choices[0]["output_ids"] == greedy_choices[1]["output_ids"] \
        == done["greedy1"]["output_ids"]


@pytest.mark.slow
def test_defaults_give_n_and_a_record_overrides_them(engine3, tmp_path):
    defaults = Sampling(GREEDY, n=2)
    done = run_records(engine3, tmp_path, [{"id": "a", "prompt_ids": [5, 6]},
                                           {"id": "b", "prompt_ids": [5, 6], "n": 1}], defaults)
    assert len(done["a"]["choices"]) == 2 and "choices" not in done["b"]
    assert done["a"]["output_ids"] == done["b"]["output_ids"]


def check_logprobs(output_ids, entries, top, greedy):
    assert [e["token_id"] for e in entries] == output_ids
    for entry in entries:
        values = [entry["logprob"]] + [alt["logprob"] for alt in entry["top_logprobs"]]
        assert all(math.isfinite(v) and v <= 0 for v in values), entry
        alternatives = entry["top_logprobs"]
        assert len(alternatives) == top
        assert [a["logprob"] for a in alternatives] == sorted(
            (a["logprob"] for a in alternatives), reverse=True)
        is_top = entry["token_id"] == alternatives[0]["token_id"]
        # the chosen token beats every alternative exactly when it is the most likely one
        assert (entry["logprob"] >= alternatives[0]["logprob"]) == is_top
        if greedy:
            assert is_top and entry["logprob"] == alternatives[0]["logprob"]


@pytest.mark.slow
def test_logprobs_per_token_greedy_and_sampled(engine3, tmp_path):
    done = run_records(engine3, tmp_path, [
        {"id": "greedy", "prompt_ids": [5, 6, 7], "logprobs": True, "top_logprobs": 3},
        {"id": "sampled", "prompt_ids": [5, 6, 7], "temperature": 1.5, "seed": 1,
         "max_new_tokens": 8, "logprobs": 4, "n": 2},
        {"id": "plain", "prompt_ids": [5, 6, 7]}])
    greedy, sampled = done["greedy"], done["sampled"]
    check_logprobs(greedy["output_ids"], greedy["logprobs"], 3, greedy=True)
    assert greedy["output_ids"] == done["plain"]["output_ids"] and "logprobs" not in done["plain"]
    for choice in sampled["choices"]:
        check_logprobs(choice["output_ids"], choice["logprobs"], 4, greedy=False)
    assert sampled["logprobs"] == sampled["choices"][0]["logprobs"]


def test_jobs_broadcast_keep_every_request_field():
    request = Request((5, 6, 7), max_new_tokens=9, temperature=0.5, top_p=0.9, top_k=3, seed=4,
                      min_p=0.05, repetition_penalty=1.1, presence_penalty=-0.5,
                      frequency_penalty=0.25, logit_bias=((5, 2.0), (7, -1.5)),
                      stop_token_ids=(8, 9), logprobs=True, top_logprobs=3, choice=0)
    changed = {f.name for f in dataclasses.fields(Request)
               if getattr(request, f.name) != f.default} - {"choice"}
    assert changed == {f.name for f in dataclasses.fields(Request)} - {"choice"}
    for job in (Job(3, "x", request, ("a", "bc"), n=4),
                Job(5, "c", request, (), n=2, openai=OpenAILine("c", True, "m", True))):
        message = json.loads(json.dumps(_encode_job(job)))  # as broadcast_json sends it
        assert set(message["request"]) == {f.name for f in dataclasses.fields(Request)}
        assert _decode_job(message) == job


@pytest.mark.slow
def test_a_job_run_through_the_broadcast_encoding_writes_the_same(engine3, tmp_path,
                                                                  monkeypatch):
    """Every job as the other processes of a multi-host run receive it (JSON through
    broadcast_json): the same records."""
    records = [{"id": "a", "prompt_ids": [5, 6], "n": 2, "temperature": 1.0, "seed": 5,
                "logprobs": True, "top_logprobs": 2, "min_p": 0.05, "logit_bias": {"9": 5}},
               {"custom_id": "b", "method": "POST", "url": "/v1/completions",
                "body": {"prompt": [7, 8], "max_tokens": 3, "presence_penalty": 1.0}}]
    direct = run_records(engine3, tmp_path, records, name="direct")

    def broadcast(items, encode, decode):
        for item in items:
            yield decode(json.loads(json.dumps(encode(item))))

    monkeypatch.setattr(runtime.batch, "synchronized", broadcast)
    sent = run_records(engine3, tmp_path, records, name="sent")
    assert sent["a"] == direct["a"] and "choices" in sent["a"]
    for record in (sent, direct):
        record["batch_req_2"]["response"].pop("request_id")
        record["batch_req_2"]["response"]["body"].pop("id")
        record["batch_req_2"]["response"]["body"].pop("created")
    assert sent["batch_req_2"] == direct["batch_req_2"]


def test_fields_listed_in_the_docstring():
    for field in FIELDS | {"max_tokens", "custom_id", "method", "url", "body"}:
        assert f"`{field}`" in runtime.batch.__doc__ or f'"{field}"' in runtime.batch.__doc__, \
            field


# --- run.py's flags -----------------------------------------------------------------------------

def test_control_flags_parse_into_request_fields():
    args = cli.parse_args(["--min-p", "0.1", "--repetition-penalty", "1.3", "--presence-penalty",
                           "0.5", "--frequency-penalty", "-1", "--logit-bias", "5:1.5,6:-2",
                           "--logit-bias", "7:3", "--stop", "x", "--stop", "y z",
                           "--stop-token-ids", "2,3", "--n", "3", "--top-logprobs", "4",
                           "--temperature", "0.5"])
    sampling = default_sampling(args)
    r = sampling.request
    assert (r.min_p, r.repetition_penalty, r.presence_penalty, r.frequency_penalty) == \
        (0.1, 1.3, 0.5, -1.0)
    assert r.logit_bias == ((5, 1.5), (6, -2.0), (7, 3.0)) and r.stop_token_ids == (2, 3)
    assert (r.logprobs, r.top_logprobs, r.temperature) == (True, 4, 0.5)
    assert sampling.stop == ("x", "y z") and sampling.n == 3
    plain = default_sampling(cli.parse_args(["--logprobs"]))
    assert plain.request.logprobs and plain.request.top_logprobs == 0 and plain.n == 1
    batch = default_sampling(cli.parse_args(["batch", "--input", "i", "--output", "o", "--n",
                                             "2", "--stop", "end"]))
    assert (batch.n, batch.stop) == (2, ("end",))  # record defaults


@pytest.mark.parametrize("argv, flag, field", [
    (["--min-p", "2"], "--min-p", "min_p"),
    (["--min-p", "nan"], "--min-p", "min_p"),
    (["--repetition-penalty", "0"], "--repetition-penalty", "repetition_penalty"),
    (["--presence-penalty", "3"], "--presence-penalty", "presence_penalty"),
    (["--frequency-penalty", "-2.5"], "--frequency-penalty", "frequency_penalty"),
    (["--frequency-penalty", "x"], "--frequency-penalty", "float"),
    (["--logit-bias", "5:500"], "--logit-bias", "logit_bias[5]"),
    (["--logit-bias", "5"], "--logit-bias", "ID:VALUE"),
    (["--logit-bias", "5:1", "--logit-bias", "5:2"], "--logit-bias", "token id 5 given twice"),
    (["--stop", ""], "--stop", "'stop'"),
    (["--stop-token-ids", "a,b"], "--stop-token-ids", "token ids"),
    (["--stop-token-ids", "-3"], "--stop-token-ids", "stop_token_ids"),
    (["--n", "0"], "--n", "'n'"),
    (["--n", "129"], "--n", "'n'"),
    (["--top-logprobs", "21"], "--top-logprobs", "top_logprobs"),
    (["batch", "--input", "i", "--output", "o", "--min-p", "-1"], "--min-p", "min_p"),
])
def test_bad_control_flags_are_one_line_naming_flag_and_field(argv, flag, field, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: argument {flag}: "), err
    assert field in err and "Traceback" not in err


# --- run.py generating ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_checkpoint(small_tokenizer, tmp_path_factory):  # noqa: F811 - the imported fixture
    """A 2-layer checkpoint whose vocabulary is the 64-piece tokenizer's, tokenizer beside it."""
    tokenizer, folder = small_tokenizer
    config = tiny_config(vocab_size=tokenizer.vocab_size, num_layers=2)
    directory = tmp_path_factory.mktemp("text-ckpt")
    write_ckpt0(random_params(config, seed=7), directory, config)
    save_config(config, directory / "config.yaml")
    (directory / "tokenizer.model").write_bytes((folder / "sp.model").read_bytes())
    return directory


def run_py(capsys, *argv):
    assert main(cli.parse_args(list(map(str, argv)))) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_run_py_prints_n_choices_with_logprobs_and_cuts_at_stop(text_checkpoint, capsys):
    common = ["--checkpoint", text_checkpoint, "--prompt", "alpha beta", "--temperature", "1",
              "--seed", "2", "--max-new-tokens", "10", "--cache-length", "32",
              "--logit-bias", "2:-100", "--json"]  # no EOS (id 2): some text to cut
    record = json.loads(run_py(capsys, *common, "--n", "3", "--top-logprobs", "2"))
    choices = record["choices"]
    assert len(choices) == 3 and choices[0]["output_ids"] == record["output_ids"]
    assert record["logprobs"] == choices[0]["logprobs"]
    for choice in choices:
        check_logprobs(choice["output_ids"], choice["logprobs"], 2, greedy=False)
    text = record["text"]
    assert len(text) >= 4, text
    stop = text[2:4]
    stopped = json.loads(run_py(capsys, *common, "--stop", stop))
    assert stopped["finish_reason"] == "stop" and "choices" not in stopped
    assert stopped["text"] == text[:text.index(stop)]
    assert stopped["output_ids"] == record["output_ids"][:len(stopped["output_ids"])]
    printed = run_py(capsys, *common[:-1], "--n", "2")
    assert "[choice 0]" in printed and "[choice 1]" in printed
    assert sum(line.startswith("[finish_reason") for line in printed.splitlines()) == 2
