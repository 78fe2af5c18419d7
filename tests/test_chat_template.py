"""Chat templates: rendered text and ids equal transformers' apply_chat_template (fixtures made
by scripts/make_chat_template_fixtures.py), template-less checkpoints and bad messages are
refused naming the field, the sandbox blocks escapes, raise_exception reaches the user."""

import json
import shutil

import pytest

from conftest import ROOT
from runtime.chat_template import (ChatTemplate, ChatTemplateError, check_messages,
                                   load_chat_template, require_chat_template)
from runtime.errors import RuntimeInputError
from runtime.tokenizer import JsonTokenizer, Tokenizer

FIXTURES = ROOT / "tests" / "fixtures" / "chat_templates"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())["templates"]
CONVERSATIONS = [(name, key) for name in sorted(EXPECTED)
                 for key in sorted(EXPECTED[name]["conversations"])]
USER = [{"role": "user", "content": "hi"}]


def template(source, text: str, **special) -> ChatTemplate:
    return ChatTemplate(source, text, special)


@pytest.mark.parametrize("name,key", CONVERSATIONS)
def test_text_and_ids_equal_transformers(name, key):
    case = EXPECTED[name]["conversations"][key]
    chat = load_chat_template(FIXTURES / name)
    tokenizer = JsonTokenizer(FIXTURES / name / "tokenizer.json")
    assert chat.render(case["messages"], tools=case["tools"]) == case["text"]
    assert chat.encode(tokenizer, case["messages"], tools=case["tools"]) == case["ids"]


def test_fixtures_cover_the_template_kinds():
    """BOS written by the template (the post-processor's own must not come twice), a list of
    named templates, AddedToken objects, a chat_template.jinja file, a tools branch."""
    llama3 = EXPECTED["llama3"]["conversations"]["user"]
    assert llama3["text"].startswith("<|begin_of_text|>") and llama3["ids"][1] != 0
    assert llama3["ids"][0] == 0  # <|begin_of_text|> once
    settings = json.loads((FIXTURES / "chatml" / "tokenizer_config.json").read_text())
    assert isinstance(settings["chat_template"], list)
    assert isinstance(json.loads((FIXTURES / "mistral" / "tokenizer_config.json")
                                 .read_text())["bos_token"], dict)
    assert load_chat_template(FIXTURES / "gemma").source.name == "chat_template.jinja"
    assert '"Find <b>things</b> & café\'s hours"' in EXPECTED["chatml"]["conversations"][
        "tools"]["text"]  # tojson without HTML escapes


@pytest.mark.parametrize("name", [n for n in sorted(EXPECTED) if "refuses" in EXPECTED[n]])
def test_raise_exception_reaches_the_user(name):
    refused = EXPECTED[name]["refuses"]
    chat = load_chat_template(FIXTURES / name)
    with pytest.raises(ChatTemplateError) as e:
        chat.render(refused["messages"])
    message = str(e.value)
    assert isinstance(e.value, RuntimeInputError) and "\n" not in message
    assert refused["error"] in message and str(chat.source) in message


def test_a_checkpoint_without_a_template_is_refused(tmp_path):
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    assert load_chat_template(tmp_path) is None
    with pytest.raises(RuntimeInputError) as e:
        require_chat_template(tmp_path)
    assert str(e.value) == (f"checkpoint {tmp_path} has no chat template (tokenizer_config.json "
                            f"chat_template or chat_template.jinja): chat requests need one "
                            f"(send a plain prompt instead)")


def test_template_file_wins_and_ckpt0_reads_the_parent(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "config", "bos_token": {"content": "<s>"}, "eos_token": None}))
    assert load_chat_template(tmp_path / "ckpt-0").render(USER) == "config"
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}file{{ eos_token }}")
    chat = load_chat_template(tmp_path)
    assert chat.render(USER) == "<s>file" and chat.eos_token is None


@pytest.mark.parametrize("messages,field", [
    ("hi", "messages: must be a non-empty list"),
    ([], "messages: must be a non-empty list"),
    ([USER[0], "hi"], "messages[1]: must be an object with 'role' and 'content'"),
    ([{"content": "x"}], "messages[0].role: missing"),
    ([{"role": 1, "content": "x"}], "messages[0].role: must be a string"),
    ([{"role": "", "content": "x"}], "messages[0].role: must not be empty"),
    ([USER[0], USER[0], {"role": "user", "content": 3}], "messages[2].content: must be a string"),
    ([{"role": "user", "content": None}], "messages[0].content: must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
     'messages[0].content[0]: must be {"type": "text", "text": "..."}'),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}],
     "messages[0].content[0].text: must be a string"),
    ([{"role": "user", "content": "\ud800"}], "messages[0].content: not valid Unicode text"),
    ([{"role": "user", "content": "x", "colour": "red"}], "messages[0]: unknown field 'colour'"),
])
def test_bad_messages_are_refused_naming_the_field(messages, field):
    chat = template("t.jinja", "{{ messages }}")
    with pytest.raises(RuntimeInputError) as e:
        chat.render(messages)
    assert str(e.value).startswith(field) and "\n" not in str(e.value)


def test_text_parts_join_with_newlines():
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert check_messages([{"role": "user", "content": parts, "name": "ann"}]) == [
        {"role": "user", "content": "one\ntwo", "name": "ann"}]
    chat = load_chat_template(FIXTURES / "llama3")
    assert chat.render([{"role": "user", "content": parts}]) == chat.render(
        [{"role": "user", "content": "one\ntwo"}])


@pytest.mark.parametrize("text", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ raise_exception.__globals__['__builtins__'] }}",
    "{{ messages.append(1) }}",  # the values passed in are immutable
    "{{ messages[0].update({'role': 'x'}) }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
])
def test_the_sandbox_blocks_escapes(text):
    with pytest.raises(ChatTemplateError) as e:
        template("evil.jinja", text).render(USER)
    message = str(e.value)
    assert "evil.jinja" in message and "\n" not in message
    assert "SecurityError" in message, message


def test_helpers_transformers_templates_use():
    chat = template("t.jinja", "{{ {'a': '<é>'} | tojson }}|{{ [1] | tojson(indent=2) }}|"
                    "{{ strftime_now('%Y') }}|{% for m in messages %}{% if loop.first %}"
                    "{% continue %}{% endif %}{{ m.role }}{% endfor %}|{{ tools }}{{ documents }}"
                    "|{{ add_generation_prompt }}", bos_token="<s>")
    text = chat.render(USER + [{"role": "assistant", "content": "x"}], add_generation_prompt=False)
    head, indented, year, roles, tools, prompt = text.split("|")
    assert head == '{"a": "<é>"}' and indented == "[\n  1\n]" and year.isdigit()
    assert roles == "assistant" and tools == "NoneNone" and prompt == "False"


def test_unset_special_tokens_render_empty():
    """A token tokenizer_config.json does not name is undefined (""), as in transformers."""
    assert template("t.jinja", "[{{ bos_token }}]").render(USER) == "[]"


@pytest.mark.parametrize("text,problem", [
    ("{% if %}", "does not compile (line 1:"),
    ("{% for m in messages %}", "does not compile"),
])
def test_a_template_that_does_not_compile(tmp_path, text, problem):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": text}))
    with pytest.raises(RuntimeInputError) as e:
        load_chat_template(tmp_path)
    message = str(e.value)
    assert str(tmp_path / "tokenizer_config.json") in message and problem in message
    assert "\n" not in message


def test_a_template_that_fails_to_render():
    with pytest.raises(ChatTemplateError) as e:
        template("t.jinja", "{{ messages[0].content + 1 }}").render(USER)
    assert "t.jinja failed to render the messages (TypeError:" in str(e.value)


@pytest.mark.parametrize("value,problem", [
    ([{"name": "tool_use", "template": "x"}], "none named 'default'"),
    (5, "chat_template must be a string or a list"),
])
def test_bad_chat_template_values(tmp_path, value, problem):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": value}))
    with pytest.raises(RuntimeInputError, match=problem):
        load_chat_template(tmp_path)


def test_bad_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{nope")
    with pytest.raises(RuntimeInputError, match="is not readable JSON"):
        load_chat_template(tmp_path)


def test_sentencepiece_encodes_without_bos_and_reads_control_tokens(tmp_path):
    """A SentencePiece checkpoint's template writes `<s>`: it is the BOS id, not `<`, `s`, `>`;
    and encode(add_special_tokens=False) adds no BOS of its own."""
    shutil.copy(ROOT / "checkpoints" / "demo" / "tokenizer.model", tmp_path)
    tokenizer = Tokenizer(tmp_path / "tokenizer.model", bos_id=1)
    plain = tokenizer.encode("hi there", add_special_tokens=False)
    assert tokenizer.encode("hi there") == [1] + plain
    assert tokenizer.encode("<s>hi there</s>", add_special_tokens=False) == [1] + plain + [2]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ bos_token }}{{ messages[0].content }}", "bos_token": "<s>"}))
    chat = load_chat_template(tmp_path)
    assert chat.encode(tokenizer, [{"role": "user", "content": "hi there"}]) == [1] + plain
