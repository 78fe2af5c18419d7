#!/usr/bin/env python3
"""Tokenizer fixtures for the BOS/EOS rules (tests/test_tokenizer_specials.py), checked against
transformers: tiny byte-level BPE tokenizers saved as Hugging Face folders, and the ids
`AutoTokenizer.from_pretrained(folder)(text).input_ids` gives for a few texts.

  pip install transformers tokenizers   # no torch needed
  python scripts/make_tokenizer_fixtures.py

Folders written under tests/fixtures/tokenizers/:
  no_bos_template     byte-level post-processor only, GPT-2/SmolLM/Qwen style: nothing added
  bos_template        a TemplateProcessing that puts <|begin_of_text|> first (Llama 3 style)
  llama_add_bos_false the BOS template, but tokenizer_config.json says LlamaTokenizerFast with
                      add_bos_token false (transformers rebuilds the post-processor from it)
  llama_add_eos_true  the same class with add_bos_token true and add_eos_token true
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tokenizers"
CORPUS = (ROOT / "checkpoints" / "demo" / "heldout.txt").read_text()[:20000]
TEXTS = ["Return the value of the attribute.", " leading space", "", "<|begin_of_text|>hi",
         "émigré naïve 🙂"]
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def base_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def bos_template(tok: Tokenizer) -> None:
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1",
                                      special_tokens=[(BOS, bos)])])


CASES = {
    "no_bos_template": (False, {"tokenizer_class": "PreTrainedTokenizerFast",
                                "eos_token": EOS}),
    "bos_template": (True, {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS,
                            "eos_token": EOS}),
    "llama_add_bos_false": (True, {"tokenizer_class": "LlamaTokenizerFast", "bos_token": BOS,
                                   "eos_token": EOS, "add_bos_token": False,
                                   "add_eos_token": False}),
    "llama_add_eos_true": (False, {"tokenizer_class": "LlamaTokenizerFast", "bos_token": BOS,
                                   "eos_token": EOS, "add_bos_token": True,
                                   "add_eos_token": True}),
}


def main() -> None:
    from transformers import AutoTokenizer, __version__
    expected = {"transformers": __version__, "texts": TEXTS, "ids": {}}
    for name, (template, settings) in CASES.items():
        folder = OUT / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        tok = base_tokenizer()
        if template:
            bos_template(tok)
        tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=1) + "\n")
        auto = AutoTokenizer.from_pretrained(str(folder))
        expected["ids"][name] = [auto(text).input_ids for text in TEXTS]
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(json.dumps(expected["ids"]))


if __name__ == "__main__":
    main()
