"""Filters for generated QA pairs (DESIGN.md §2). Each returns a rejection reason or None.

Reasons are short stable strings: they become metric names (`rejected.<reason>`) and land on every
rejected record, so a rejection is always explained.
"""

from __future__ import annotations

import re

import numpy as np

from isara.params import Generate

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of word n-grams that are repeats of an earlier n-gram: 0 for fresh text, near 1 for loops."""
    toks = words(text)
    grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 over lowercase word tokens (longest common subsequence), as Self-Instruct filters with."""
    x, y = words(a), words(b)
    if not x or not y:
        return 0.0
    prev = [0] * (len(y) + 1)
    for xi in x:
        cur = [0]
        for j, yj in enumerate(y, start=1):
            cur.append(prev[j - 1] + 1 if xi == yj else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(x), lcs / len(y)
    return 2 * p * r / (p + r)


def text_reason(question: str, answer: str | None, cfg: Generate) -> str | None:
    """Checks that need no other data. `answer=None` checks the question alone (before answering)."""
    if not question:
        return "empty_question"
    if len(question) < cfg.min_question_chars:
        return "question_too_short"
    if len(question) > cfg.max_question_chars:
        return "question_too_long"
    if "Answer:" in question or "Question:" in question:
        return "format_leak_question"
    if repeated_ngram_share(question) > cfg.max_repeated_ngram_share:
        return "repetition_question"
    if answer is None:
        return None
    if not answer:
        return "empty_answer"
    if len(answer) < cfg.min_answer_chars:
        return "answer_too_short"
    if len(answer) > cfg.max_answer_chars:
        return "answer_too_long"
    if "Question:" in answer or "Answer:" in answer:
        return "format_leak_answer"
    if repeated_ngram_share(answer) > cfg.max_repeated_ngram_share:
        return "repetition_answer"
    return None


def normalise(text: str) -> str:
    return " ".join(words(text))


def duplicate_reason(
    question: str,
    vector: np.ndarray,
    known_questions: list[str],
    known_normalised: set[str],
    known_vectors: np.ndarray,
    cfg: Generate,
) -> str | None:
    """Exact, embedding and ROUGE-L duplicates of any question already in the data (seeds, earlier
    iterations and samples accepted earlier in this run)."""
    if normalise(question) in known_normalised:
        return "duplicate_exact"
    if len(known_vectors):
        sims = known_vectors @ vector
        if float(sims.max()) > cfg.max_embedding_similarity:
            return "duplicate_embedding"
        # ROUGE-L only against the closest questions: near duplicates in words are close in embedding too,
        # and this keeps the filter linear in the data size.
        for i in np.argsort(-sims)[:32]:
            if rouge_l(question, known_questions[i]) > cfg.max_rouge_l:
                return "duplicate_rouge"
    return None
