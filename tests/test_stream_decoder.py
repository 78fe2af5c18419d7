"""Streaming detokenisation: the deltas of StreamDecoder concatenate to a decode of everything
(minus the prefix's text) for both tokenizer kinds, on random ids with multi-byte characters,
byte-fallback pieces and control tokens, and each push decodes a bounded number of ids however
long the output grows."""

import random
from pathlib import Path

import pytest

from conftest import ROOT
from runtime.tokenizer import WINDOW, JsonTokenizer, StreamDecoder, Tokenizer

GROK = Path(__file__).resolve().parents[2] / "shared/fixtures/grok-1-tokenizer.model"
TOKENIZERS = {
    "grok-1": GROK,
    "demo": ROOT / "checkpoints" / "demo" / "tokenizer.model",
    **{f"json-{p.parent.name}": p
       for p in sorted((ROOT / "tests" / "fixtures" / "tokenizers").glob("*/tokenizer.json"))},
}
TEXT = ("Hello, émigré naïve café 🙂👍🏽 👨‍👩‍👧 日本語のテキストです。龘靐齉 Ωμέγα a€b 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 "
        "the cat\n\ttab  two spaces")
PREFIXES = ["", "Answer:", "日本 ", "x 🙂", " ok"]
# Ids decoded per push: the window (at most WINDOW + 1 ids) and a second decode to slide or
# cut it; never a whole output.
BOUND = 3 * (WINDOW + 2)


class Counting:
    """A tokenizer that counts the ids each decode is handed."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids)


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    path = TOKENIZERS[request.param]
    if not path.is_file():
        pytest.skip(f"tokenizer fixture not found at {path}")
    tokenizer = JsonTokenizer(path) if path.suffix == ".json" else Tokenizer(path)
    # Ids that are part of a character only (SentencePiece's <0xE6> pieces, byte-level BPE's
    # single high bytes and partial merges): alone they decode to U+FFFD.
    tokenizer.byte_ids = [i for i in range(tokenizer.vocab_size)
                          if tokenizer.decode([i]) == "\ufffd"]
    assert len(tokenizer.byte_ids) >= 64
    return tokenizer


def random_ids(tokenizer, rng: random.Random, length: int) -> list[int]:
    """Pieces of multi-byte text (runs of it too: characters split over byte tokens), stray
    bytes, any id, control tokens."""
    text = tokenizer.encode(TEXT, add_special_tokens=False)
    kinds = [lambda: rng.choice(text), lambda: rng.choice(text),
             lambda: rng.choice(tokenizer.byte_ids), lambda: rng.randrange(tokenizer.vocab_size),
             lambda: rng.randrange(4)]
    ids = []
    while len(ids) < length:
        if rng.random() < 0.2:
            start = rng.randrange(len(text))
            ids.extend(text[start:start + rng.randrange(1, 12)])
        else:
            ids.append(rng.choice(kinds)())
    return ids[:length]


def streamed(tokenizer, prefix: list[int], ids: list[int]):
    """(deltas and the flushed tail, the decoder, the most ids one push decoded)."""
    counting = Counting(tokenizer)
    decoder = StreamDecoder(counting, prefix)
    deltas, most = [], 0
    for token in ids:
        counting.decoded = 0
        deltas.append(decoder.push(token))
        most = max(most, counting.decoded)
    return deltas + [decoder.flush()], decoder, most


def expected(tokenizer, prefix: list[int], ids: list[int]) -> str:
    return tokenizer.decode(prefix + ids)[len(tokenizer.decode(prefix)):]


@pytest.mark.parametrize("seed", range(6))
def test_deltas_concatenate_to_the_decode_of_everything(tokenizer, seed):
    rng = random.Random(seed)
    for case in range(60):
        prefix = tokenizer.encode(PREFIXES[case % len(PREFIXES)], add_special_tokens=False)
        ids = random_ids(tokenizer, rng, rng.choice([1, 2, 3, 7, 20, 80]))
        deltas, decoder, _ = streamed(tokenizer, prefix, ids)
        assert "".join(deltas) == decoder.text == expected(tokenizer, prefix, ids), (prefix, ids)
        assert decoder.ids == prefix + ids


def test_text_comes_out_as_soon_as_it_is_complete(tokenizer):
    """Only an incomplete character is held back: after each push, what came out is the
    decode so far less its trailing U+FFFD (at most 3)."""
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    deltas, _, _ = streamed(tokenizer, [], ids)
    for n in range(1, len(ids) + 1):
        partial, emitted = tokenizer.decode(ids[:n]), "".join(deltas[:n])
        assert partial.startswith(emitted)
        assert len(partial) - len(emitted) <= 3 and set(partial[len(emitted):]) <= {"\ufffd"}
        assert "\ufffd" not in emitted
    assert deltas[-1] == ""  # nothing held back at the end of complete text


@pytest.mark.parametrize("kind", ["mixed", "stray bytes", "control tokens"])
def test_each_push_decodes_a_bounded_number_of_ids(tokenizer, kind):
    """5000 tokens: the ids decoded per push stay under a fixed bound (a whole-output decode
    would reach 5000), and the text still equals the decode of everything."""
    rng = random.Random(7)
    ids = {"mixed": lambda: random_ids(tokenizer, rng, 5000),
           "stray bytes": lambda: [rng.choice(tokenizer.byte_ids) for _ in range(5000)],
           "control tokens": lambda: [rng.randrange(4) for _ in range(5000)]}[kind]()
    prefix = tokenizer.encode("Answer:", add_special_tokens=False)
    deltas, _, most = streamed(tokenizer, prefix, ids)
    assert most <= BOUND, most
    assert "".join(deltas) == expected(tokenizer, prefix, ids)


def test_typical_pushes_decode_a_handful_of_ids(tokenizer):
    ids = tokenizer.encode(TEXT * 40, add_special_tokens=False)
    counting = Counting(tokenizer)
    decoder = StreamDecoder(counting)
    for token in ids:
        decoder.push(token)
    assert decoder.text == tokenizer.decode(ids)
    assert counting.decoded / len(ids) < 8, counting.decoded / len(ids)


def test_a_prompt_ending_in_control_tokens_keeps_the_next_space():
    """SentencePiece drops the leading space of a decode's first piece, also after control
    tokens: the window's context must hold text, or " the" would stream as "the"."""
    if not GROK.is_file():
        pytest.skip(f"tokenizer fixture not found at {GROK}")
    tokenizer = Tokenizer(GROK)
    prefix = tokenizer.encode("Hello", add_special_tokens=False) + [1] * 20
    ids = tokenizer.encode(" the cat", add_special_tokens=False)
    deltas, _, _ = streamed(tokenizer, prefix, [1, 2] + ids)
    assert "".join(deltas) == expected(tokenizer, prefix, [1, 2] + ids) == "  the cat"
