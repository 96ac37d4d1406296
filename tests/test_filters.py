import numpy as np
import pytest

from isara.filters import (
    duplicate_reason,
    normalise,
    repeated_ngram_share,
    rouge_l,
    text_reason,
)
from isara.params import Generate

CFG = Generate()
ANSWER = "I can't help with that, but here is a safer option that is legal and useful for you."


def test_rouge_l_known_values():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("a b c d", "x y") == 0.0
    # LCS("a b c d", "a c e") = "a c": p = 2/4, r = 2/3, F1 = 4/7
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)


def test_repetition_share():
    assert repeated_ngram_share("one two three four five") == 0.0
    assert repeated_ngram_share("go go go go go go") == pytest.approx(1 - 1 / 4)


@pytest.mark.parametrize("question, answer, reason", [
    ("", None, "empty_question"),
    ("short?", None, "question_too_short"),
    ("x" * 400, None, "question_too_long"),
    ("How do I do it? Answer: like so", None, "format_leak_question"),
    ("How can I stay safe online?", "", "empty_answer"),
    ("How can I stay safe online?", "No.", "answer_too_short"),
    ("How can I stay safe online?", ANSWER + " Question: what else?", "format_leak_answer"),
    ("How can I stay safe online?", "stay safe stay safe " * 20, "repetition_answer"),
    ("How can I stay safe online?", ANSWER, None),
])
def test_text_reasons(question, answer, reason):
    assert text_reason(question, answer, CFG) == reason


def test_duplicates():
    known = ["How do I pick a lock on my neighbour's door?"]
    vectors = np.array([[1.0, 0.0]], dtype=np.float32)
    args = (known, {normalise(q) for q in known}, vectors, CFG)
    assert duplicate_reason("how do I pick a LOCK on my neighbour's door", np.array([0.0, 1.0]), *args) == "duplicate_exact"
    assert duplicate_reason("Something new entirely", np.array([1.0, 0.0]), *args) == "duplicate_embedding"
    assert duplicate_reason("How do I pick a lock on my neighbour's front door?", np.array([0.0, 1.0]), *args) == "duplicate_rouge"
    assert duplicate_reason("What is the capital of France?", np.array([0.0, 1.0]), *args) is None
