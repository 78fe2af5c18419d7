"""Grok-1 SentencePiece tokenizer: vocabulary, round trips, streaming deltas, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.errors import RuntimeInputError
from runtime.tokenizer import StreamDecoder, Tokenizer

MODEL = Path(__file__).resolve().parents[2] / "shared/fixtures/grok-1-tokenizer.model"

TEXTS = [
    "Hello, world!",
    "The café serves crème brûlée.",
    "日本語のテキストです。",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧 end",
    "mixed: a€b 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 龘靐齉 Ωμέγα",
    "  two leading spaces, tab\tand\nnewline",
]


@pytest.fixture(scope="module")
def tok():
    if not MODEL.is_file():
        pytest.skip(f"tokenizer fixture not found at {MODEL}")
    return Tokenizer(MODEL)


def test_vocab_size_and_special_ids(tok):
    assert tok.vocab_size == 131072
    sp = tok._sp
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids and all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, np.int64)) == text  # numpy ids (as generated) work too


def test_non_ascii_uses_byte_fallback(tok):
    """Guards the streaming test: some strings split a character over several tokens."""
    split = 0
    for text in TEXTS:
        ids = tok.encode(text)
        split += sum("\ufffd" in tok.decode(ids[:n]) for n in range(1, len(ids)))
    assert split > 0


@pytest.mark.parametrize("text", TEXTS)
def test_stream_deltas_concatenate_to_decode(tok, text):
    ids = tok.encode(text)
    decoder = StreamDecoder(tok)
    deltas = [decoder.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == tok.decode(ids) == text
    # text is emitted as it becomes complete, not only at the end
    for n in range(1, len(ids) + 1):
        partial = tok.decode(ids[:n])
        emitted = "".join(deltas[:n])
        assert partial.startswith(emitted)
        if "\ufffd" not in partial:
            assert emitted == partial


def test_stream_with_prompt_continuation(tok):
    """Streaming generated tokens after a prompt: deltas rebuild the generated text."""
    prompt, completion = tok.encode("Answer:"), tok.encode(" 日本語 🙂 ok")
    decoder = StreamDecoder(tok)
    out = "".join(decoder.push(i) for i in completion)
    assert out == tok.decode(completion)
    assert tok.decode(prompt) == "Answer:"


def test_missing_file(tmp_path):
    path = tmp_path / "absent" / "tokenizer.model"
    with pytest.raises(RuntimeInputError) as e:
        Tokenizer(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("size", [0, 4096])
def test_not_a_sentencepiece_file(tmp_path, size):
    path = tmp_path / "garbage.model"
    path.write_bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes())
    with pytest.raises(RuntimeInputError) as e:
        Tokenizer(path)
    message = str(e.value)
    assert str(path) in message and "\n" not in message


def test_directory_is_not_a_tokenizer(tmp_path):
    with pytest.raises(RuntimeInputError) as e:
        Tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value)
