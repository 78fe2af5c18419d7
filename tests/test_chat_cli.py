"""Chat through run.py (`--chat TEXT`) and batch records with `messages`: rendered with the
checkpoint's template, the same ids as the template gives; a template-less checkpoint refuses
them (the batch job goes on with an error record naming the line)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece

from conftest import ROOT
from runtime.app import build_requests
from runtime.batch import parse_job, run_job
from runtime.chat_template import load_chat_template, template_loader
from runtime.cli import fill_sampling_defaults, parse_args
from runtime.config import load_config
from runtime.errors import RuntimeInputError
from runtime.request import Request
from runtime.tokenizer import Tokenizer

DEMO = ROOT / "checkpoints" / "demo"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}"
            "{{ raise_exception('no system messages here') }}{% endif %}"
            "{{ m.role }}: {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
GREEDY = Request((), max_new_tokens=4, temperature=0.0)


def with_template(folder, template=TEMPLATE):
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"}))
    return folder


def test_chat_flags_are_repeatable_and_keep_their_order():
    args = parse_args(["--chat", "hi", "--prompt", "x", "--chat", "café"])
    assert args.prompts == [("chat", "hi"), ("text", "x"), ("chat", "café")]


def test_chat_requests_are_the_templates_ids(tmp_path):
    shutil.copy(DEMO / "tokenizer.model", tmp_path)
    tokenizer = Tokenizer(tmp_path / "tokenizer.model")
    args = parse_args(["--chat", "Return the value", "--prompt", "Return the value"])
    fill_sampling_defaults(args, with_template(tmp_path))
    chat, plain = build_requests(args, tokenizer, load_config("demo"), tmp_path)
    text = "<s>user: Return the value\nassistant:"
    assert load_chat_template(tmp_path).render([{"role": "user", "content": "Return the value"}],
                                               ) == text
    assert list(chat.prompt_ids) == tokenizer.encode(text, add_special_tokens=False)
    assert chat.prompt_ids[0] == 1  # <s> written by the template is the BOS id
    assert list(plain.prompt_ids) == tokenizer.encode("Return the value")


def test_chat_on_a_checkpoint_without_a_template_is_refused(tmp_path):
    args = parse_args(["--chat", "hi"])
    fill_sampling_defaults(args, tmp_path)
    with pytest.raises(RuntimeInputError, match=f"checkpoint {tmp_path} has no chat template"):
        build_requests(args, Tokenizer(DEMO / "tokenizer.model"), load_config("demo"), tmp_path)


def test_a_template_that_raises_is_a_one_line_error(tmp_path):
    args = parse_args(["--chat", "hi"])
    fill_sampling_defaults(args, tmp_path)
    with_template(tmp_path, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(RuntimeInputError) as e:
        build_requests(args, Tokenizer(DEMO / "tokenizer.model"), load_config("demo"), tmp_path)
    assert str(e.value) == (f"the chat template of {tmp_path / 'tokenizer_config.json'} "
                            f"refused the messages: roles must alternate")


# --- batch records with messages --------------------------------------------------------------

@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    """A 64-piece SentencePiece model (fits the tiny test model's 256-id vocabulary)."""
    folder = tmp_path_factory.mktemp("spm")
    words = ["alpha", "beta", "gamma", "user", "assistant", "the", "end", ":"]
    rng = np.random.default_rng(0)
    (folder / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 12))
                                                 for _ in range(400)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "sp"), vocab_size=64,
        model_type="bpe", pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=1,
        minloglevel=2)
    return Tokenizer(folder / "sp.model"), with_template(folder)


def user(content):
    return [{"role": "user", "content": content}]


def record_line(**record):
    return json.dumps(record)


def test_messages_records_parse_to_the_templates_ids(small_tokenizer):
    tokenizer, folder = small_tokenizer
    loader = template_loader(folder)
    job = parse_job(1, record_line(id="a", messages=user("alpha beta")), tokenizer, GREEDY, {},
                    loader)
    assert job.error is None
    assert list(job.request.prompt_ids) == load_chat_template(folder).encode(
        tokenizer, user("alpha beta"))


@pytest.mark.parametrize("record,error", [
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content: must be a string"),
    ({"messages": user("x") + [{"role": "assistant"}]}, "messages[1].content: missing"),
    ({"messages": []}, "messages: must be a non-empty list"),
    ({"messages": user("x"), "prompt": "x"},
     "give exactly one of 'prompt', 'prompt_ids' and 'messages'"),
    ({"messages": [{"role": "system", "content": "x"}]}, "refused the messages: no system "
                                                         "messages here"),
])
def test_bad_messages_records_name_the_line_and_field(small_tokenizer, record, error):
    tokenizer, folder = small_tokenizer
    job = parse_job(3, json.dumps({"id": "c", **record}), tokenizer, GREEDY, {},
                    template_loader(folder))
    assert job.request is None and job.error.startswith("line 3 (id 'c'): ")
    assert error in job.error and "\n" not in job.error


def test_messages_without_a_template_are_error_records(small_tokenizer, tmp_path):
    tokenizer, _ = small_tokenizer
    job = parse_job(2, record_line(id="m", messages=user("alpha")), tokenizer, GREEDY, {},
                    template_loader(tmp_path))
    assert job.error == (f"line 2 (id 'm'): checkpoint {tmp_path} has no chat template "
                         f"(tokenizer_config.json chat_template or chat_template.jinja): chat "
                         f"requests need one (send a plain prompt instead)")


@pytest.mark.slow
def test_a_batch_job_runs_messages_like_their_prompt_ids(small_tokenizer, engine3, tmp_path):
    """Greedy outputs of a messages record equal those of its rendered ids; without a template
    the messages record is an error record and the job goes on."""
    tokenizer, folder = small_tokenizer
    ids = load_chat_template(folder).encode(tokenizer, user("alpha beta"))
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join([record_line(id="chat", messages=user("alpha beta")),
                                 record_line(id="ids", prompt_ids=ids),
                                 record_line(id="bad", messages=user(7))]) + "\n")
    out = tmp_path / "out.jsonl"
    run_job(engine3, tokenizer, source, out, GREEDY, chat_template=template_loader(folder))
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["chat"]["output_ids"] == records["ids"]["output_ids"]
    assert records["chat"]["prompt_tokens"] == len(ids) and "error" not in records["chat"]
    assert records["bad"]["error"].startswith("line 3 (id 'bad'): messages[0].content")
    plain = tmp_path / "plain.jsonl"
    run_job(engine3, tokenizer, source, plain, GREEDY,
            chat_template=template_loader(tmp_path))
    records = {r["id"]: r for r in map(json.loads, plain.read_text().splitlines())}
    assert "has no chat template" in records["chat"]["error"]
    assert records["ids"]["finish_reason"] in ("length", "eos")


# --- run.py --chat on the demo checkpoint -----------------------------------------------------

def _run(argv, cwd):
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *map(str, argv)], cwd=cwd,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "ckpt-0").is_dir(), reason="no demo checkpoint")
def test_run_py_chat_on_the_demo_checkpoint(tmp_path):
    """--chat renders with the checkpoint's template: its prompt ids are the template's, and
    its greedy output equals that of the same ids given as --prompt-ids in the same run; the
    shipped demo (no template) refuses --chat in one line."""
    folder = tmp_path / "demo-chat"
    shutil.copytree(DEMO, folder, ignore=shutil.ignore_patterns("heldout.txt"))
    with_template(folder)
    ids = load_chat_template(folder).encode(Tokenizer(folder / "tokenizer.model"),
                                            user("Return the value"))
    chat = _run(["--checkpoint", folder, "--chat", "Return the value", "--prompt-ids",
                 " ".join(map(str, ids)), "--max-new-tokens", "6", "--temperature", "0",
                 "--json"], tmp_path)
    refused = _run(["--checkpoint", DEMO, "--chat", "hi"], tmp_path)
    out, err = chat.communicate(timeout=300)
    assert chat.returncode == 0, err[-3000:]
    first, second = map(json.loads, out.splitlines())
    assert first["prompt_ids"] == ids == second["prompt_ids"] and first["prompt"] is None
    assert first["messages"] == user("Return the value")
    assert first["output_ids"] == second["output_ids"]
    out, err = refused.communicate(timeout=300)
    assert refused.returncode == 2 and out == ""
    assert err.strip() == (f"error: checkpoint {DEMO} has no chat template (tokenizer_config.json "
                           f"chat_template or chat_template.jinja): chat requests need one (send "
                           f"a plain prompt instead)")
