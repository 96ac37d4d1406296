"""Filters for generated QA pairs (DESIGN.md §2). Each returns a rejection reason or None.

Reasons are short stable strings: they become metric names (`rejected.<reason>`) and land on every
rejected record, so a rejection is always explained.

Besides the text and duplicate filters, the three filters of issue 10 (params `generate.out_of_domain*`,
`generate.stance_consistency`, `generate.stance_band`) are pure functions here; isara.generate wires them in:

- `out_of_domain`: the new question's nearest example is farther than the seeds lie from each other
  (`seed_far_distance`, shared with the data card);
- `stance_mismatch`: the answer declines where the examples it was prompted with mostly comply, or the reverse;
- `stance_quota`: the round already holds as many answers of that stance as the band around D0's share allows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from isara.params import Generate
from isara.text import normalise, words  # the one word definition (isara.text), shared with seeds and the data card


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


# ------------------------------------------------------------------------------------------ the domain filter

# Default out-of-domain threshold (generate.out_of_domain_distance and datacard.far_distance null): farther
# from the data than 95% of the seeds lie from their nearest other seed.
FAR_QUANTILE = 0.95


def seed_far_distance(seed_vectors: np.ndarray, quantile: float = FAR_QUANTILE) -> float:
    """The `quantile` of each seed's angular distance to its nearest other seed (at least 2 seeds).

    Angular distance as Annoy reports it: sqrt(2 - 2 cos) of the two sentence vectors, in [0, 2]."""
    v = np.asarray(seed_vectors, dtype=np.float64)
    if len(v) < 2:
        raise ValueError("the out-of-domain threshold needs at least 2 seeds")
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    cos = v @ v.T
    np.fill_diagonal(cos, -np.inf)
    return float(np.quantile(np.sqrt(np.clip(2 - 2 * cos.max(axis=1), 0, None)), quantile))


def nearest_distance(vector: np.ndarray, vectors: np.ndarray) -> float:
    """Angular distance sqrt(2 - 2 cos) from `vector` to the nearest row of `vectors` (exact, no index)."""
    v = np.asarray(vector, dtype=np.float64)
    m = np.asarray(vectors, dtype=np.float64)
    cos = (m / np.linalg.norm(m, axis=1, keepdims=True)) @ (v / np.linalg.norm(v))
    return float(np.sqrt(max(2.0 - 2.0 * float(cos.max()), 0.0)))


def domain_reason(distance: float, threshold: float | None) -> str | None:
    """`out_of_domain` when the nearest example is strictly farther than the threshold; None disables."""
    if threshold is not None and distance > threshold:
        return "out_of_domain"
    return None


# ---------------------------------------------------------------------------------------- the stance filters

DECLINES, COMPLIES = "declines", "complies"


def stance_of(declines: bool) -> str:
    return DECLINES if declines else COMPLIES


def majority_stance(example_stances: Sequence[str]) -> str | None:
    """The stance most of the in-context examples take; None on a tie (or no examples)."""
    n_declines = sum(1 for s in example_stances if s == DECLINES)
    n_complies = len(example_stances) - n_declines
    if n_declines == n_complies:
        return None
    return DECLINES if n_declines > n_complies else COMPLIES


def stance_mismatch_reason(stance: str, example_stances: Sequence[str]) -> str | None:
    """`stance_mismatch` when the answer's stance differs from the examples' majority stance.

    A tie (e.g. 2 of 4 examples decline) accepts either stance: the examples themselves show both behaviours
    for questions like this one, so neither answer contradicts them."""
    majority = majority_stance(example_stances)
    if majority is not None and stance != majority:
        return "stance_mismatch"
    return None


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def stance_quotas(n_samples: int, declining_share0: float, band: float) -> dict[str, int]:
    """How many accepted answers of each stance a round of n_samples may hold.

    The declining share must stay in [share0 - band, share0 + band] (clamped to [0, 1]): at most
    round(n * hi) declining answers, and at most n - round(n * lo) complying ones. A round that reaches
    n_samples then holds between round(n * lo) and round(n * hi) declining answers; a round cut short by
    max_attempts keeps only the upper bounds."""
    lo = min(max(declining_share0 - band, 0.0), 1.0)
    hi = min(max(declining_share0 + band, 0.0), 1.0)
    return {DECLINES: _round_half_up(n_samples * hi), COMPLIES: n_samples - _round_half_up(n_samples * lo)}


def stance_quota_reason(stance: str, accepted: dict[str, int], quotas: dict[str, int] | None) -> str | None:
    """`stance_quota` when the round already accepted its quota of answers with this stance; None disables."""
    if quotas is not None and accepted.get(stance, 0) >= quotas[stance]:
        return "stance_quota"
    return None
