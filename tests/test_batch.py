"""Batch jobs: error records, stop strings, determinism across slot counts, kill and resume."""

import json
import signal

import numpy as np
import pytest
import sentencepiece

from batch_helpers import start_batch_job, wait_for_records
from conftest import random_params, single_device_mesh, tiny_config
from runtime.batch import recover_output, run_job
from runtime.checkpoint.grok_ckpt import write_ckpt0
from runtime.config import save_config
from runtime.engine import build_engine
from runtime.request import Request
from runtime.tokenizer import Tokenizer

GREEDY = Request((), max_new_tokens=6, temperature=0.0)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def read_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def job_records(count):
    rng = np.random.default_rng(3)
    records = []
    for i in range(count):
        record = {"id": f"r{i}", "prompt_ids": rng.integers(3, 256, 1 + i % 9).tolist(),
                  "max_new_tokens": 2 + i % 7}
        if i % 3 == 1:
            record.update(temperature=0.9, seed=i, top_p=0.9)
        records.append(record)
    return records


def by_id(records):
    return {r["id"]: {k: v for k, v in r.items() if k != "line"} for r in records}


@pytest.mark.slow
def test_errors_become_records_and_the_job_goes_on(engine3, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "a", "prompt_ids": [5, 6, 7]},
        "{not json",
        {"id": "b", "prompt_ids": [5], "colour": "red"},
        {"id": "c", "prompt_ids": list(range(3, 40))},  # 37 tokens > the 32-token cache
        {"id": "a", "prompt_ids": [9]},
        {"id": "d", "prompt": "text needs a tokenizer"},
        {"id": "e", "prompt_ids": [999]},
        {"id": "f", "prompt_ids": [8, 9], "temperature": -1},
        ["not", "an", "object"],
        {"id": "g", "prompt_ids": [10, 11]},
    ])
    out = tmp_path / "out.jsonl"
    summary = run_job(engine3, None, source, out, GREEDY)
    records = {r["line"]: r for r in read_records(out)}
    assert sorted(records) == list(range(1, 11))
    assert summary.records == 10 and summary.errors == 8
    expected_errors = {2: "line 2: invalid JSON", 3: "line 3 (id 'b'): unknown field(s) 'colour'",
                       4: "line 4 (id 'c'): prompt of 37 tokens does not fit",
                       5: "line 5: duplicate id 'a' (first on line 1)",
                       6: "line 6 (id 'd'): 'prompt' needs a tokenizer",
                       7: "line 7 (id 'e'): prompt token id 999 outside the vocabulary",
                       8: "line 8 (id 'f'): temperature must be a finite number >= 0",
                       9: "line 9: expected a JSON object"}
    for line, message in expected_errors.items():
        assert records[line]["finish_reason"] == "error"
        assert records[line]["error"].startswith(message), records[line]["error"]
    for line in (1, 10):
        assert records[line]["finish_reason"] == "length"
        assert len(records[line]["output_ids"]) == 6
        assert records[line]["output_tokens"] == 6


@pytest.mark.slow
def test_outputs_do_not_depend_on_slots_or_order(engine1, engine3, tmp_path):
    records = job_records(10)
    forward = write_jsonl(tmp_path / "forward.jsonl", records)
    backward = write_jsonl(tmp_path / "backward.jsonl", records[::-1])
    run_job(engine3, None, forward, tmp_path / "a.jsonl", GREEDY)
    run_job(engine1, None, backward, tmp_path / "b.jsonl", GREEDY)
    run_job(engine3, None, forward, tmp_path / "c.jsonl", GREEDY)
    a, b, c = (by_id(read_records(tmp_path / n)) for n in ("a.jsonl", "b.jsonl", "c.jsonl"))
    assert a == b == c
    assert len(a) == 10 and all(r["finish_reason"] in ("length", "eos") for r in a.values())


@pytest.fixture(scope="module")
def text_engine(tmp_path_factory):
    """A model whose vocabulary is a small SentencePiece model trained on the spot."""
    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    words = ["alpha", "beta", "gamma", "delta", "stop", "here", "the", "end", "of", "line"]
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(400)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=64, model_type="bpe",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=1, minloglevel=2)
    tokenizer = Tokenizer(folder / "sp.model")
    config = tiny_config(vocab_size=tokenizer.vocab_size)
    engine = build_engine(config, random_params(config, seed=4), single_device_mesh(),
                          slots=2, cache_length=32)
    return engine, tokenizer


@pytest.mark.slow
def test_stop_strings_cut_the_text(text_engine, tmp_path):
    engine, tokenizer = text_engine
    prompts = [{"id": i, "prompt": p, "max_new_tokens": 12, "temperature": 1.0, "seed": i,
                "logit_bias": {"2": -100}}  # no EOS (2): every free run has text to stop in
               for i, p in enumerate(["alpha beta", "the end of", "gamma delta stop"])]
    free = tmp_path / "free.jsonl"
    run_job(engine, tokenizer, write_jsonl(tmp_path / "in.jsonl", prompts), free, GREEDY)
    free_runs = by_id(read_records(free))
    stopped_prompts = []
    for p in prompts:
        text = free_runs[p["id"]]["text"]
        assert len(text) >= 6, text
        stopped_prompts.append(dict(p, stop=["\u2603", text[3:6]]))  # one never occurs
    out = tmp_path / "stopped.jsonl"
    run_job(engine, tokenizer, write_jsonl(tmp_path / "stop.jsonl", stopped_prompts), out,
            GREEDY)
    for record in read_records(out):
        free_run = free_runs[record["id"]]
        stop = stopped_prompts[record["id"]]["stop"][1]
        assert record["finish_reason"] == "stop"
        assert record["text"] == free_run["text"][:free_run["text"].index(stop)]
        ids = record["output_ids"]
        assert ids == free_run["output_ids"][:len(ids)]
        assert stop in tokenizer.decode(ids) and stop not in tokenizer.decode(ids[:-1])


def test_torn_last_line_is_cut_on_resume(tmp_path):
    out = tmp_path / "out.jsonl"
    good = json.dumps({"id": "a", "line": 1}) + "\n"
    out.write_text(good + '{"id": "b", "li')
    assert recover_output(out) == {'id:"a"'}
    assert out.read_text() == good


@pytest.mark.slow
def test_killed_and_interrupted_jobs_resume_without_loss_or_duplicates(engine3, config, params,
                                                                      tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    write_ckpt0(params, directory, config)
    save_config(config, directory / "config.yaml")
    records = job_records(40)
    source = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"

    killed = start_batch_job(directory, source, out, 4, 6)
    wait_for_records(out, 5, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    after_kill = out.read_text().count("\n")
    assert 5 <= after_kill < 40

    interrupted = start_batch_job(directory, source, out, 4, 6)
    wait_for_records(out, after_kill + 3, interrupted)
    interrupted.send_signal(signal.SIGINT)
    _, stderr = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    after_interrupt = out.read_text().count("\n")
    assert after_interrupt < 40, "interrupt came too late to test anything"

    finished = start_batch_job(directory, source, out, 4, 6)
    _, stderr = finished.communicate(timeout=240)
    assert finished.returncode == 0, stderr
    assert f"{after_interrupt} already done earlier" in stderr

    results = read_records(out)
    assert sorted(r["id"] for r in results) == sorted(r["id"] for r in records)  # each once
    uninterrupted = tmp_path / "reference.jsonl"
    run_job(engine3, None, source, uninterrupted, GREEDY)
    assert by_id(results) == by_id(read_records(uninterrupted))
