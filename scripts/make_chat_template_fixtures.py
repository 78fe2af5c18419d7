#!/usr/bin/env python3
"""Chat-template fixtures (tests/test_chat_template.py), checked against transformers: tiny
byte-level BPE tokenizers with the special tokens each template needs, saved as Hugging Face
folders with real-world chat templates, and what
`AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, add_generation_prompt=True,
tokenize=True)` gives for a few conversations (the text too, with tokenize=False).

  pip install transformers tokenizers   # no torch needed
  python scripts/make_chat_template_fixtures.py

Folders written under tests/fixtures/chat_templates/:
  llama3   Llama-3-Instruct: <|start_header_id|>role<|end_header_id|> ... <|eot_id|>, BOS
           written by the template (the tokenizer's post-processor would add one too: it must
           not when the template is tokenized)
  chatml   Qwen2.5 (ChatML, <|im_start|>/<|im_end|>) with its default system message and tool
           branch (tojson); tokenizer_config.json lists it as {"name": "default", ...}
  mistral  Mistral-Instruct v0.1 [INST] ... [/INST]: raise_exception on roles that do not
           alternate; bos/eos written as AddedToken objects
  gemma    Gemma's <start_of_turn> template, delivered as chat_template.jinja; raises on a
           system message
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "chat_templates"
CORPUS = (ROOT / "checkpoints" / "demo" / "heldout.txt").read_text()[:20000]

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Qwen2.5-Instruct's template as shipped (its long lines too)
CHATML = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}")

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
    "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}\n")

USER = {"role": "user", "content": "What is the capital of France?"}
SYSTEM = {"role": "system", "content": "You are terse. Answer in one word."}
TURNS = [{"role": "user", "content": "Return the value."},
         {"role": "assistant", "content": "  The value is 42.  "},
         {"role": "user", "content": "And twice that?"}]
UNICODE = [{"role": "user", "content": "émigré naïve 🙂👍🏽 日本語のテキスト Ωμέγα\n\ttab"},
           {"role": "assistant", "content": "Très bien: 龘 & <b>"},
           {"role": "user", "content": "Encore 🙂"}]
TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "Find <b>things</b> & café's hours",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]

# name -> (template, where it goes, special tokens, the BOS the post-processor adds, settings,
#          conversations, (messages the template refuses) or None)
CASES = {
    "llama3": (LLAMA3, "config", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                  "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>",
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
               {"user": [USER], "system_user": [SYSTEM, USER], "multi_turn": TURNS,
                "unicode": UNICODE}, None),
    # transformers renders with "tool_use" when tools are given; the runtime reads "default"
    "chatml": ([{"name": "default", "template": CHATML}, {"name": "tool_use", "template": CHATML}],
               "config", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None,
               {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
               {"user": [USER], "system_user": [SYSTEM, USER], "multi_turn": TURNS,
                "unicode": UNICODE, "tools": ([SYSTEM, USER], TOOLS)}, None),
    "mistral": (MISTRAL, "config", ["<unk>", "<s>", "</s>"], "<s>",
                {"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False,
                               "normalized": False, "rstrip": False, "single_word": False},
                 "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False,
                               "normalized": False, "rstrip": False, "single_word": False},
                 "unk_token": "<unk>"},
                {"user": [USER], "multi_turn": TURNS, "unicode": UNICODE},
                [USER, USER]),
    "gemma": (GEMMA, "jinja", ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
              "<bos>", {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
              {"user": [USER], "multi_turn": TURNS, "unicode": UNICODE}, [SYSTEM, USER]),
}


def tiny_tokenizer(specials: list[str], bos: str | None) -> Tokenizer:
    """Byte-level BPE as in scripts/make_tokenizer_fixtures.py, with `specials` first."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if bos is not None:  # the BOS the template writes must not come twice
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
    return tok


def input_ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True): a list in transformers 4, a BatchEncoding in 5."""
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]


def write_folder(folder: Path, template, where: str, specials, bos, settings) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tiny_tokenizer(specials, bos).save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **settings}
    if where == "config":
        config["chat_template"] = template
    else:
        (folder / "chat_template.jinja").write_text(template)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1,
                                                             ensure_ascii=False) + "\n")


def main() -> None:
    from transformers import AutoTokenizer, __version__
    expected = {"transformers": __version__, "templates": {}}
    for name, (template, where, specials, bos, settings, conversations,
               refused) in CASES.items():
        folder = OUT / name
        write_folder(folder, template, where, specials, bos, settings)
        auto = AutoTokenizer.from_pretrained(str(folder))
        cases = {}
        for key, conversation in conversations.items():
            messages, tools = conversation if isinstance(conversation, tuple) else (
                conversation, None)
            text = auto.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                            tokenize=False)
            ids = input_ids(auto.apply_chat_template(messages, tools=tools, tokenize=True,
                                                     add_generation_prompt=True))
            cases[key] = {"messages": messages, "tools": tools, "text": text, "ids": ids}
        entry = {"conversations": cases}
        if refused is not None:
            try:
                auto.apply_chat_template(refused, add_generation_prompt=True, tokenize=False)
            except Exception as e:  # jinja2.TemplateError: the template's raise_exception
                entry["refuses"] = {"messages": refused, "error": str(e)}
            else:
                raise SystemExit(f"{name}: the template accepted {refused}")
        expected["templates"][name] = entry
        print(name, {key: len(case["ids"]) for key, case in cases.items()})
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
