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


# ----------------------------------------------------------------------------- issue 10: domain and stance


def test_seed_far_distance_is_shared_by_generate_and_the_data_card():
    from isara import datacard, filters

    assert datacard.seed_far_distance is filters.seed_far_distance
    # three unit vectors: e1, e2 at 90 degrees (distance sqrt 2), e1' at 60 degrees from e1 (distance 1)
    v = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, np.sqrt(3) / 2]])
    # nearest-other distances: e1 -> 1, e2 -> sqrt 2, e1' -> 1
    assert filters.seed_far_distance(v, quantile=0.0) == pytest.approx(1.0)
    assert filters.seed_far_distance(v, quantile=1.0) == pytest.approx(np.sqrt(2))


def test_nearest_distance_and_domain_reason():
    from isara.filters import domain_reason, nearest_distance

    seeds = np.array([[1.0, 0.0], [0.0, 1.0]])
    # (3, 1) is nearest to e1: cos = 3 / sqrt 10, distance sqrt(2 - 2 cos); an unnormalised vector changes nothing
    assert nearest_distance(np.array([3.0, 1.0]), seeds) == pytest.approx(np.sqrt(2 - 6 / np.sqrt(10)))
    assert nearest_distance(np.array([-1.0, 0.0]), seeds) == pytest.approx(np.sqrt(2))
    assert domain_reason(0.9, 0.8) == "out_of_domain"
    assert domain_reason(0.8, 0.8) is None  # strictly farther, as the data card's far flag
    assert domain_reason(1.9, None) is None  # filter off


def test_majority_stance_and_mismatch_with_ties():
    from isara.filters import majority_stance, stance_mismatch_reason

    assert majority_stance(["declines", "declines", "complies"]) == "declines"
    assert majority_stance(["complies", "complies", "declines", "complies"]) == "complies"
    assert majority_stance(["declines", "complies"]) is None
    assert majority_stance([]) is None
    assert stance_mismatch_reason("complies", ["declines"] * 3 + ["complies"]) == "stance_mismatch"
    assert stance_mismatch_reason("declines", ["declines"] * 3 + ["complies"]) is None
    # a tie: the examples show both behaviours, either answer is consistent with them
    assert stance_mismatch_reason("complies", ["declines", "declines", "complies", "complies"]) is None
    assert stance_mismatch_reason("declines", ["declines", "declines", "complies", "complies"]) is None


@pytest.mark.parametrize("n, share0, band, quotas", [
    (32, 1.0, 0.15, {"declines": 32, "complies": 5}),   # lo = 0.85: 27.2 -> 27 must decline, so 5 may comply
    (32, 0.5, 0.15, {"declines": 21, "complies": 21}),  # hi = 0.65: 20.8 -> 21; lo = 0.35: 11.2 -> 11
    (10, 0.5, 0.0, {"declines": 5, "complies": 5}),     # exactly D0's share
    (3, 0.125, 0.15, {"declines": 1, "complies": 3}),   # hi = 0.275: 0.825 -> 1; lo clamps to 0
    (5, 0.5, 0.0, {"declines": 3, "complies": 2}),      # 2.5 rounds half up: exactly 3 of 5 decline
])
def test_stance_quotas(n, share0, band, quotas):
    from isara.filters import stance_quotas

    assert stance_quotas(n, share0, band) == quotas


def test_stance_quota_reason_and_the_band_it_keeps():
    from isara.filters import stance_quota_reason, stance_quotas

    quotas = stance_quotas(10, 0.6, 0.1)  # declining share in [0.5, 0.7]: at most 7 decline, at most 5 comply
    assert quotas == {"declines": 7, "complies": 5}
    assert stance_quota_reason("declines", {"declines": 6}, quotas) is None
    assert stance_quota_reason("declines", {"declines": 7}, quotas) == "stance_quota"
    assert stance_quota_reason("complies", {"complies": 5}, quotas) == "stance_quota"
    assert stance_quota_reason("complies", {"complies": 99}, None) is None  # band null: off
    # Any order of stances, accepted greedily under the quotas until 10 are in: the share lands in the band.
    rng = np.random.default_rng(0)
    for _ in range(200):
        accepted = {"declines": 0, "complies": 0}
        while sum(accepted.values()) < 10:
            stance = "declines" if rng.random() < rng.random() else "complies"
            if stance_quota_reason(stance, accepted, quotas) is None:
                accepted[stance] += 1
        assert 0.5 <= accepted["declines"] / 10 <= 0.7


def test_stance_judge_strmatch_and_learned():
    from isara.judges import N_FEATURES, LearnedJudge, StanceJudge

    answers = ["I can't help with that.", "Sure: press the primer bulb three times, then pull the cord."]
    assert StanceJudge("strmatch").declines(["q1", "q2"], answers) == [True, False]
    # A learned head that only reads the string-match flag (the last feature) agrees with string matching.
    weights = np.zeros(N_FEATURES)
    weights[-1] = 10.0
    judge = StanceJudge("learned", LearnedJudge(weights, -5.0))
    assert judge.declines(["q1", "q2"], answers) == [True, False]
    with pytest.raises(ValueError):
        StanceJudge("learned")


def test_stance_judge_selection_reads_the_judge_stage_folder(tmp_path):
    import json

    from isara.judges import JUDGE_FILE, LEARNED_FILE, N_FEATURES, LearnedJudge, StanceJudge

    assert StanceJudge.load("auto", tmp_path).name == "strmatch"  # no judge stage output: string matching
    with pytest.raises(ValueError, match="generate.stance_judge is 'learned'"):
        StanceJudge.load("learned", tmp_path)
    LearnedJudge(np.zeros(N_FEATURES), 0.0).save(tmp_path / LEARNED_FILE)
    info = {"learned": True, "learned_agreement": 0.9, "strmatch_agreement": 0.8}
    (tmp_path / JUDGE_FILE).write_text(json.dumps(info))
    assert StanceJudge.load("auto", tmp_path).name == "learned"
    assert StanceJudge.load("strmatch", tmp_path).name == "strmatch"
    (tmp_path / JUDGE_FILE).write_text(json.dumps({**info, "learned_agreement": 0.7}))
    assert StanceJudge.load("auto", tmp_path).name == "strmatch"
