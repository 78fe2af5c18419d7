"""Request validation: each bad field raises RequestError naming the field and the request."""

from __future__ import annotations

import pytest

from runtime.errors import RequestError, RuntimeInputError
from runtime.request import Request

VOCAB, CONTEXT, LABEL = 100, 16, "prompt 3"


def check_error(request, *words):
    with pytest.raises(RequestError) as e:
        request.validate(VOCAB, CONTEXT, label=LABEL)
    message = str(e.value)
    assert isinstance(e.value, RuntimeInputError)
    assert message.startswith(LABEL) and "\n" not in message, message
    for word in words:
        assert word in message, (word, message)
    return message


def test_valid_request_passes():
    Request((1, 5, 99), max_new_tokens=4, temperature=0.7, top_p=0.9, top_k=40,
            seed=2**31 - 1).validate(VOCAB, CONTEXT, label=LABEL)
    Request((0,), max_new_tokens=1, temperature=0.0, top_p=1.0, top_k=0,
            seed=0).validate(VOCAB, CONTEXT, label=LABEL)


def test_prompt_of_context_minus_one_passes():
    Request(tuple(range(CONTEXT - 1))).validate(VOCAB, CONTEXT, label=LABEL)


def test_prompt_filling_the_context_fails():
    message = check_error(Request(tuple(range(CONTEXT))), "prompt", str(CONTEXT))
    assert "context" in message
    check_error(Request(tuple([7] * (CONTEXT + 5))), "prompt", str(CONTEXT + 5))


def test_empty_prompt():
    check_error(Request(()), "prompt")


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 50, -1])
def test_prompt_id_out_of_vocab(bad):
    check_error(Request((1, 2, bad, 3)), "prompt", str(bad), str(VOCAB))


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0),
    ("max_new_tokens", -3),
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.2),
    ("top_k", -1),
    ("top_k", 2.5),
    ("seed", -1),
    ("seed", 2**31),
])
def test_bad_field(field, value):
    check_error(Request((1, 2, 3), **{field: value}), field, repr(value))


def test_label_default():
    with pytest.raises(RequestError, match=r"^request\b.*top_k"):
        Request((1,), top_k=-1).validate(VOCAB, CONTEXT)
