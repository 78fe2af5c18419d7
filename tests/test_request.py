"""Request validation: each bad field raises RequestError naming the field and the request."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

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
    # values a JSON record or a flag can carry that the engine's int32 / float32 arrays cannot
    ("top_k", 2**40),
    ("top_k", True),
    ("temperature", float("inf")),
    ("temperature", 1e39),  # finite in float64, inf in float32
    ("temperature", "0.5"),
    ("top_p", 1e-50),  # underflows to 0 in float32
    ("max_new_tokens", True),
    ("max_new_tokens", 4.0),
    ("seed", False),
])
def test_bad_field(field, value):
    check_error(Request((1, 2, 3), **{field: value}), field, repr(value))


def test_huge_numbers_are_named_briefly():
    message = check_error(Request((1, 2, 3), temperature=10**400), "temperature")
    assert len(message) < 200


def test_bool_prompt_ids_are_not_token_ids():
    check_error(Request((1, True)), "prompt token id True")


ANY_VALUE = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
             | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5)
             | st.lists(st.integers(), max_size=2))


@given(prompt=st.lists(st.integers(-5, 2 * VOCAB) | st.booleans(), max_size=20),
       fields=st.fixed_dictionaries({}, optional={
           name: ANY_VALUE for name in ("max_new_tokens", "temperature", "top_p", "top_k",
                                        "seed")}))
def test_fuzzed_requests_are_refused_or_fit_the_engine(prompt, fields):
    """Any values: a RequestError naming the request, or values that go into the engine's
    int32 / float32 arrays unchanged and finite."""
    request = Request(tuple(prompt), **fields)
    try:
        request.validate(VOCAB, CONTEXT, label=LABEL)
    except RequestError as e:
        assert str(e).startswith(LABEL) and "\n" not in str(e)
        return
    ids = np.asarray(request.prompt_ids, np.int32)
    assert (ids == np.asarray(request.prompt_ids)).all() and len(ids) < CONTEXT
    for value, dtype in ((request.top_k, np.int32), (request.seed, np.int32),
                         (request.temperature, np.float32), (request.top_p, np.float32)):
        narrowed = np.asarray(value, dtype)
        assert np.isfinite(narrowed) and (dtype == np.float32 or narrowed == value)
    assert np.float32(request.top_p) > 0 and request.max_new_tokens >= 1


def test_label_default():
    with pytest.raises(RequestError, match=r"^request\b.*top_k"):
        Request((1,), top_k=-1).validate(VOCAB, CONTEXT)
