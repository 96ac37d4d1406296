"""Data-card computations on tiny hand-made inputs; every expected value is worked out by hand in a comment."""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pytest

from isara.datacard import (
    build_datacard,
    datacard_metrics,
    distinct_n,
    far_retrieval_share,
    gini,
    length_stats,
    mean_pairwise_similarity,
    near_duplicate_rate,
    render_datacard_markdown,
    seed_descendants,
    top_k_share,
    words,
)
from isara.records import Neighbour, Record


def seed(q: str, a: str = "An answer.") -> Record:
    return Record(iteration=0, question=q, answer=a)


def gen(it: int, q: str, a: str = "Generated answer.", qc=(), ac=()) -> Record:
    return Record(
        iteration=it,
        question=q,
        answer=a,
        question_context=[Neighbour(id=i, distance=d) for i, d in qc],
        answer_context=[Neighbour(id=i, distance=d) for i, d in ac],
    )


# ------------------------------------------------------------------------------------------------ distinct-n


def test_words_lowercases_and_drops_punctuation():
    assert words("Hello, World! Don't") == ["hello", "world", "don't"]


def test_distinct_n_pools_over_texts():
    texts = ["the cat sat", "The cat ran"]
    # unigrams: the cat sat the cat ran -> 6 total, {the, cat, sat, ran} -> 4 unique
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 4 total, 3 unique
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    # trigrams: (the cat sat) (the cat ran) -> 2 of 2
    assert distinct_n(texts, 3) == 1.0
    # no text has 4 words
    assert distinct_n(texts, 4) == 0.0


def test_distinct_n_case_and_punctuation_insensitive():
    # both texts are the bigram (hello world): 1 unique of 2
    assert distinct_n(["Hello, world!", "hello world"], 2) == 0.5


def test_distinct_n_does_not_cross_text_boundaries():
    # "a" and "b" are one word each: no bigram (joining them would give "a b" and 1.0)
    assert distinct_n(["a", "b"], 2) == 0.0
    # (a b) and (c d) only, not (b c): 2 of 2
    assert distinct_n(["a b", "c d"], 2) == 1.0


def test_distinct_n_empty_and_bad_n():
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["", "!!"], 1) == 0.0
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)


# ----------------------------------------------------------------------------------- embedding similarity


def test_mean_pairwise_similarity_three_vectors():
    r = 1 / math.sqrt(2)
    v = np.array([[1.0, 0.0], [0.0, 1.0], [r, r]])
    # pairs: (0,1) cos 0, (0,2) cos 1/sqrt2, (1,2) cos 1/sqrt2 -> mean (2/sqrt2)/3 = sqrt2/3
    assert mean_pairwise_similarity(v) == pytest.approx(math.sqrt(2) / 3)


def test_mean_pairwise_similarity_normalises_and_identical():
    # [2,0] and [1,1] are at 45 degrees whatever their lengths: cos = 1/sqrt2
    assert mean_pairwise_similarity(np.array([[2.0, 0.0], [1.0, 1.0]])) == pytest.approx(1 / math.sqrt(2))
    assert mean_pairwise_similarity(np.array([[0.0, 3.0], [0.0, 1.0]])) == pytest.approx(1.0)


def test_mean_pairwise_similarity_undefined_below_two():
    assert math.isnan(mean_pairwise_similarity(np.zeros((0, 4))))
    assert math.isnan(mean_pairwise_similarity(np.array([[1.0, 0.0]])))


def test_near_duplicate_rate():
    v = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # rows 0 and 1 are identical (max cos to the other = 1), row 2 is orthogonal to both (max cos 0): 2 of 3
    assert near_duplicate_rate(v, 0.9) == pytest.approx(2 / 3)
    # ">=": a cosine of exactly 1.0 meets a threshold of 1.0
    assert near_duplicate_rate(v, 1.0) == pytest.approx(2 / 3)
    # every row's max cosine to another row is >= 0
    assert near_duplicate_rate(v, 0.0) == 1.0


def test_near_duplicate_rate_ignores_self_and_small_inputs():
    # one vector: its only similarity is to itself, which does not count
    assert near_duplicate_rate(np.array([[1.0, 0.0]]), 0.5) == 0.0
    assert near_duplicate_rate(np.zeros((0, 3)), 0.5) == 0.0
    # orthogonal pair: max cos 0 < 0.5
    assert near_duplicate_rate(np.eye(2), 0.5) == 0.0


def test_near_duplicate_rate_blocks_give_same_answer():
    v = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
    # rows 0,2 duplicate; rows 1,4 duplicate; row 3 max cos 0 (to rows 0,2): 4 of 5
    for block in (1, 2, 3, 1024):
        assert near_duplicate_rate(v, 0.9, block_size=block) == pytest.approx(4 / 5)


# -------------------------------------------------------------------------------------------- seed influence


def test_seed_descendants_transitive_counted_once():
    s1, s2, s3 = seed("Seed one?"), seed("Seed two?"), seed("Seed three?")
    # g1 reaches s1 through both contexts, and s2
    g1 = gen(1, "Gen one?", qc=[(s1.id, 0.0)], ac=[(s1.id, 0.4), (s2.id, 0.6)])
    g2 = gen(1, "Gen two?", qc=[(s2.id, 0.0)], ac=[(s2.id, 0.3)])
    # g3 (iteration 2) reaches s1 via g1 and directly, s2 via g1 and via g2; "unknown" is a dead end
    g3 = gen(2, "Gen three?", qc=[(g1.id, 0.0), (g2.id, 0.2)], ac=[(s1.id, 0.9), ("unknown", 0.5)])
    counts = seed_descendants([s1, s2, s3, g1, g2, g3, g1])  # g1 twice: records de-duplicated by id
    # s1: {g1, g3} = 2; s2: {g1, g2, g3} = 3; s3: nothing = 0
    assert counts == {s1.id: 2, s2.id: 3, s3.id: 0}


def test_seed_descendants_no_seeds_or_no_records():
    assert seed_descendants([]) == {}
    assert seed_descendants([gen(1, "Orphan?", qc=[("missing", 0.1)])]) == {}


def test_gini_hand_values():
    # all equal -> 0
    assert gini([5, 5, 5]) == 0.0
    # one holds everything among 4 -> (n-1)/n = 3/4
    assert gini([0, 0, 0, 4]) == pytest.approx(3 / 4)
    # [1,2,3]: ordered-pair |diffs| sum = 2*(1+2+1) = 8; n^2 = 9; mean = 2 -> 8 / (2*9*2) = 2/9
    assert gini([3, 1, 2]) == pytest.approx(2 / 9)
    assert gini([]) == 0.0
    assert gini([0, 0]) == 0.0
    with pytest.raises(ValueError):
        gini([1, -1])


def test_top_k_share():
    # top 2 of [1,2,3,4] = 4 + 3 = 7 of 10
    assert top_k_share([1, 2, 3, 4], 2) == pytest.approx(0.7)
    assert top_k_share([1, 2, 3, 4], 10) == 1.0
    assert top_k_share([1, 2, 3, 4], 0) == 0.0
    assert top_k_share([0, 0], 1) == 0.0
    assert top_k_share([], 5) == 0.0
    with pytest.raises(ValueError):
        top_k_share([1], -1)


# ----------------------------------------------------------------------------------------- lengths, retrieval


def test_length_stats():
    stats = length_stats(["a", "bb cc", "dddd eeee ffff"])
    # chars 1, 5, 14: p50 = 5, mean = 20/3, p90 at position 0.9*(3-1) = 1.8 -> 5 + 0.8*(14-5) = 12.2
    assert stats["chars"] == pytest.approx({"min": 1, "p50": 5, "mean": 20 / 3, "p90": 12.2, "max": 14})
    # words 1, 2, 3: p90 = 2 + 0.8*1 = 2.8
    assert stats["words"] == pytest.approx({"min": 1, "p50": 2, "mean": 2, "p90": 2.8, "max": 3})


def test_length_stats_empty_is_nan():
    stats = length_stats([])
    assert set(stats) == {"chars", "words"}
    assert all(math.isnan(v) for unit in stats.values() for v in unit.values())


def test_far_retrieval_share():
    s = seed("Seed?")
    near = gen(1, "Near?", qc=[(s.id, 1.9)], ac=[(s.id, 0.3), ("x", 1.2)])  # nearest answer-context 0.3
    far = gen(1, "Far?", qc=[(s.id, 0.0)], ac=[("x", 1.3), ("y", 1.5)])  # nearest answer-context 1.3
    no_context = gen(1, "Nothing?")  # not judged
    records = [s, near, far, no_context]
    # answer context: only `far` (1.3 > 1.0) of the 2 judged
    assert far_retrieval_share(records, 1.0) == 0.5
    # strictly farther: 1.3 is not > 1.3
    assert far_retrieval_share(records, 1.3) == 0.0
    # question context: near 1.9 > 1.0 flagged, far 0.0 not
    assert far_retrieval_share(records, 1.0, context="question") == 0.5
    assert far_retrieval_share([s, no_context], 1.0) == 0.0
    with pytest.raises(ValueError):
        far_retrieval_share(records, 1.0, context="both")


# ---------------------------------------------------------------------------------------------------- card


@pytest.fixture
def iteration_one():
    s1 = seed("How do I pick a lock?", "I can't help with that.")
    s2 = seed("What is the capital of France?", "Paris.")
    s3 = seed("How do vaccines work?", "They train the immune system.")
    g1 = gen(1, "How do I hotwire a car?", "I can't help with that.",
             qc=[(s1.id, 0.0), (s2.id, 0.8)], ac=[(s1.id, 0.5), (s3.id, 1.1)])
    g2 = gen(1, "What is the capital of Spain?", "I can't help with this.",
             qc=[(s2.id, 0.0)], ac=[(s2.id, 1.2)])
    rejected = [
        {"reason": "too_short", "question": "Why?", "answer": "No."},
        {"reason": "too_short", "question": "How?", "answer": "So."},
        {"reason": "too_short", "question": "Who?", "answer": "Me."},
        {"reason": "near_duplicate", "question": "How do I pick a lock?", "answer": "I can't."},
    ]
    return [s1, s2, s3, g1, g2], [g1, g2], rejected


def make_card(iteration_one, **kw):
    dataset, generated, rejected = iteration_one
    vectors = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]])  # cos 0.6
    args = dict(rejected_counts={"too_short": 3, "near_duplicate": 1}, attempted=6,
                rejected_examples=rejected, vectors=vectors, rng_seed=7, n_examples=2)
    args.update(kw)
    return build_datacard(dataset, generated, **args)


def test_build_datacard_values(iteration_one):
    card = make_card(iteration_one)
    m = datacard_metrics(card)
    assert "examples" not in m and "examples" in card
    assert m["accepted"] == 2 and m["attempted"] == 6
    assert m["acceptance_rate"] == pytest.approx(2 / 6)
    assert m["rejected.total"] == 4 and m["rejected.too_short"] == 3 and m["rejected.near_duplicate"] == 1
    assert (m["dataset.size"], m["dataset.seeds"], m["dataset.generated"]) == (5, 3, 2)
    # questions: "how do i hotwire a car" + "what is the capital of spain": 12 distinct words, 10 distinct bigrams
    assert m["diversity.question_distinct_1"] == 1.0 and m["diversity.question_distinct_2"] == 1.0
    # answers: "i can't help with that" + "i can't help with this": 6 unique of 10 words; 5 unique of 8 bigrams
    assert m["diversity.answer_distinct_1"] == pytest.approx(0.6)
    assert m["diversity.answer_distinct_2"] == pytest.approx(5 / 8)
    assert m["diversity.mean_pairwise_similarity"] == pytest.approx(0.6)
    assert m["diversity.near_duplicate_rate"] == 0.0  # 0.6 < 0.9
    # descendants: s1 {g1} = 1, s2 {g1, g2} = 2, s3 {g1} = 1 -> [1, 1, 2]
    # gini: ordered |diffs| = 4, n^2 = 9, mean = 4/3 -> 4 / (2*9*4/3) = 1/6
    assert m["seed_influence.gini"] == pytest.approx(1 / 6)
    assert m["seed_influence.top5_share"] == 1.0
    assert m["seed_influence.max"] == 2
    assert m["seed_influence.mean"] == pytest.approx(4 / 3)
    assert m["seed_influence.zero_share"] == 0.0
    # nearest answer-context distances: g1 0.5, g2 1.2 -> 1 of 2 beyond 1.0
    assert m["retrieval.far_share"] == 0.5
    # question chars: 23 and 29 -> p90 = 23 + 0.9*6 = 28.4; words: 6 and 6
    assert m["length.question.chars.min"] == 23 and m["length.question.chars.max"] == 29
    assert m["length.question.chars.p50"] == 26 and m["length.question.chars.p90"] == pytest.approx(28.4)
    assert m["length.question.words.mean"] == 6
    # answers "I can't help with that." (23 chars) and "... this." (23 chars): 5 words each
    assert m["length.answer.chars.mean"] == 23 and m["length.answer.words.max"] == 5
    assert all(isinstance(v, (int, float)) for v in m.values())


def test_build_datacard_examples_and_json(iteration_one):
    card = make_card(iteration_one)
    json.dumps(card, allow_nan=False)  # strict JSON: dvc metrics and other tools can read it
    ex = card["examples"]
    assert [e["question"] for e in ex["accepted"]] == ["How do I hotwire a car?", "What is the capital of Spain?"]
    assert set(ex["rejected"]) == {"too_short", "near_duplicate"}
    assert len(ex["rejected"]["too_short"]) == 2  # n_examples=2 of 3
    assert len(ex["rejected"]["near_duplicate"]) == 1
    assert ex["top_seeds"][0]["question"] == "What is the capital of France?"  # 2 descendants
    assert ex["top_seeds"][0]["descendants"] == 2
    # same seed, same sample; the card is deterministic
    assert make_card(iteration_one) == card


def test_build_datacard_empty_iteration_without_embedding(monkeypatch, iteration_one):
    dataset, _, _ = iteration_one
    boom = types.ModuleType("isara.embed")

    def _no(texts):  # pragma: no cover - must not be reached
        raise AssertionError("embed called for an empty iteration")

    boom.embed = _no
    monkeypatch.setitem(sys.modules, "isara.embed", boom)
    card = build_datacard(dataset[:3], [], {"empty": 5}, 5, [], vectors=None)
    json.dumps(card, allow_nan=False)
    assert card["accepted"] == 0 and card["acceptance_rate"] == 0.0
    assert card["diversity.mean_pairwise_similarity"] is None  # undefined -> null
    assert card["length.question.chars.p50"] is None
    assert card["seed_influence.gini"] == 0.0 and card["seed_influence.zero_share"] == 1.0


def test_build_datacard_embeds_questions_when_no_vectors(monkeypatch, iteration_one):
    dataset, generated, _ = iteration_one
    seen = []
    fake = types.ModuleType("isara.embed")

    def _embed(texts):
        seen.append(list(texts))
        return np.array([[1.0, 0.0], [1.0, 0.0]], dtype=np.float32)

    fake.embed = _embed
    monkeypatch.setitem(sys.modules, "isara.embed", fake)
    card = build_datacard(dataset, generated, {}, 2, [])
    assert seen == [[r.question for r in generated]]
    assert card["diversity.near_duplicate_rate"] == 1.0
    assert card["rejected.total"] == 0 and card["acceptance_rate"] == 1.0


def test_build_datacard_rejects_inconsistent_input(iteration_one):
    with pytest.raises(ValueError):
        make_card(iteration_one, attempted=1)  # fewer attempts than accepted samples
    with pytest.raises(ValueError):
        make_card(iteration_one, vectors=np.zeros((3, 3)))  # not one row per generated record
    with pytest.raises(ValueError):
        make_card(iteration_one, rejected_counts={"total": 1})


def test_render_datacard_markdown(iteration_one):
    card = make_card(iteration_one)
    card["examples"]["accepted"][0]["answer"] = "Use ```code``` | pipes"
    md = render_datacard_markdown(card, iteration=1)
    assert md.startswith("# Data card: iteration 1\n")
    assert "2 of 6 attempts accepted" in md
    assert "| reason | count | share of attempts |" in md
    assert "| too_short | 3 | 0.5 |" in md  # 3 of 6 attempts
    assert "| total | 4 | 0.6667 |" in md
    assert "| gini | 0.1667 |" in md
    assert "| far_share | 0.5 |" in md
    assert "| question / chars | 23 | 26 | 26 | 28.4 | 29 |" in md
    assert "| seed id | descendants | question |" in md
    assert "````text\nQuestion: How do I hotwire a car?\nAnswer: Use ```code``` | pipes\n````" in md
    assert "### too_short" in md and "### near_duplicate" in md
    assert sum(f"question: {q}\n" in md for q in ("Why?", "How?", "Who?")) == 2  # n_examples=2 of 3


def test_render_datacard_markdown_nulls(iteration_one):
    dataset, _, _ = iteration_one
    card = build_datacard(dataset[:3], [], {}, 0, [], vectors=np.zeros((0, 3)))
    md = render_datacard_markdown(card, iteration=2)
    assert "| mean_pairwise_similarity | n/a |" in md
    assert "Accepted examples" not in md


def test_seed_far_distance_is_a_quantile_of_nearest_other_seed_distances():
    from isara.datacard import seed_far_distance

    # unit vectors at 0, 60 and 180 degrees (lengths must not matter): nearest-other distances
    # sqrt(2 - 2 cos 60) = 1, 1, and for the 180-degree one sqrt(2 - 2 cos 120) = sqrt(3)
    angles = np.radians([0.0, 60.0, 180.0])
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.array([[1.0], [3.0], [0.5]])
    assert seed_far_distance(vectors, quantile=0.5) == pytest.approx(1.0)
    assert seed_far_distance(vectors, quantile=1.0) == pytest.approx(np.sqrt(3))
    with pytest.raises(ValueError, match="at least 2 seeds"):
        seed_far_distance(vectors[:1])


def test_answer_stance_table_per_outcome():
    """generate labels each answer's stance (Record.stance, a rejection's "stance"): the card counts them for the
    accepted records and per rejection reason; rows without a stance (unanswered, or filters off) are skipped."""
    from isara.datacard import stance_counts

    s = seed("How do I pick a lock?", "I can't help with that.")
    g1 = Record(iteration=1, question="How do I hotwire a car?", answer="I can't help with that.", stance="declines")
    g2 = Record(iteration=1, question="How do I bake bread?", answer="Mix flour, water and yeast.", stance="complies")
    g3 = Record(iteration=1, question="How do I sharpen a knife?", answer="I won't help.", stance="declines")
    rejected = [
        {"reason": "stance_mismatch", "question": "a?", "answer": "Sure, here.", "stance": "complies"},
        {"reason": "stance_quota", "question": "b?", "answer": "I can't.", "stance": "declines"},
        {"reason": "stance_mismatch", "question": "c?", "answer": "Yes, do it.", "stance": "complies"},
        {"reason": "out_of_domain", "question": "d?"},  # never answered: no stance
    ]
    assert stance_counts([g1, g2, g3], rejected) == {
        "accepted": {"declines": 2, "complies": 1},
        "stance_mismatch": {"declines": 0, "complies": 2},
        "stance_quota": {"declines": 1, "complies": 0},
    }
    card = build_datacard([s, g1, g2, g3], [g1, g2, g3], {"stance_mismatch": 2, "stance_quota": 1, "out_of_domain": 1},
                          7, rejected, vectors=np.eye(3))
    m = datacard_metrics(card)
    assert m["stance.accepted.declines"] == 2 and m["stance.accepted.declining_share"] == pytest.approx(2 / 3)
    assert m["stance.stance_mismatch.complies"] == 2 and "stance.out_of_domain.declines" not in m
    md = render_datacard_markdown(card, iteration=1)
    assert "## Answer stance" in md and "| answers | declines | complies | declining share |" in md
    assert "| accepted | 2 | 1 | 0.6667 |" in md
    assert "| stance_mismatch | 0 | 2 | 0 |" in md and "| stance_quota | 1 | 0 | 1 |" in md
    assert "Answer stance x question harm" not in md  # build_datacard got no stance_harm groups
    assert "## Other" not in md  # every stance key is in the table


def test_no_stance_table_for_rounds_without_stances(iteration_one):
    md = render_datacard_markdown(make_card(iteration_one), iteration=1)
    assert "Answer stance" not in md
    assert not any(k.startswith("stance.") for k in datacard_metrics(make_card(iteration_one)))


# ----------------------------------------------------------------------------------- stance x question harm


def test_stance_harm_table_counts_and_failure_cell():
    """Hand-made stances and harm calls: every cell worked out by hand, then found in the metrics and the table."""
    from isara.datacard import StanceHarm

    # records:   0         1          2          3          4         5
    stances = ("declines", "declines", "declines", "complies", "complies", "complies")
    harmful = (True, False, False, True, False, False)
    # declines x harmful 1 (record 0), declines x benign 2 (1, 2), complies x harmful 1 (3), complies x benign 2;
    # benign-looking 4, of which 2 declined.
    seeds_stances, seeds_harm = ("declines", "complies"), (True, False)
    card = make_card_with_harm({"accepted": StanceHarm(stances, harmful, judged=2),
                                "seeds": StanceHarm(seeds_stances, seeds_harm, judged=2)})
    m = datacard_metrics(card)
    assert "stance_harm_notes" not in m and all(isinstance(v, (int, float)) or v is None for v in m.values())
    assert {k: m[f"stance_harm.accepted.{k}"] for k in ("n", "judged", "declines", "complies", "declines_harmful",
                                                        "declines_benign", "complies_harmful", "complies_benign")} \
        == {"n": 6, "judged": 2, "declines": 3, "complies": 3, "declines_harmful": 1, "declines_benign": 2,
            "complies_harmful": 1, "complies_benign": 2}
    assert m["stance_harm.accepted.declines_benign_share"] == pytest.approx(2 / 6)
    assert m["stance_harm.accepted.benign_declining_share"] == pytest.approx(2 / 4)
    assert m["stance_harm.seeds.declines_benign"] == 0 and m["stance_harm.seeds.benign_declining_share"] == 0.0
    assert m["question_harm.heldout_accuracy"] == 0.96 and m["question_harm.xstest_accuracy"] == 0.46

    md = render_datacard_markdown(card, iteration=1)
    assert "## Answer stance x question harm" in md
    assert "| stance | looks harmful | looks benign | total |" in md
    assert "| declines | 1 (17%) | **2 (33%)** | 3 (50%) |" in md  # the failure cell in bold
    assert "| complies | 1 (17%) | 2 (33%) | 3 (50%) |" in md
    assert "| total | 2 (33%) | 4 (67%) | 6 |" in md
    assert "**2 of 6 accepted answers decline a question the classifier calls benign** (50% of the 4 " in md
    assert "**0 of 2 seed answers decline a question the classifier calls benign**" in md
    assert "hh_rlhf-file (harmful) + self_instruct-files (benign)" in md  # the training data, named
    assert "held-out accuracy 0.96 (95% CI 0.94-0.97" in md and "accuracy 0.46 (95% CI" in md
    assert "never trained or tuned on" in md and "strmatch" in md
    assert "## Other" not in md


def make_card_with_harm(groups, classifier=True):
    s = seed("How do I pick a lock?", "I can't help with that.")
    g = Record(iteration=1, question="How do I hotwire a car?", answer="I can't help with that.", stance="declines")
    report = {"data": "hh_rlhf-file (harmful) + self_instruct-files (benign)", "heldout_accuracy": 0.96,
              "heldout_accuracy_low": 0.94, "heldout_accuracy_high": 0.97, "n_test": 521, "xstest_accuracy": 0.46,
              "xstest_accuracy_low": 0.41, "xstest_accuracy_high": 0.51, "xstest_safe_called_benign": 0.05}
    notes = {"stance_judge": "strmatch", "classifier": report if classifier else None,
             "unavailable": None if classifier else "params benchmarks.dir is null: the classifier is trained on "
                                                    "hh_rlhf + self_instruct"}
    return build_datacard([s, g], [g], {}, 1, [], vectors=np.eye(1), stance_harm=groups, stance_harm_notes=notes)


def test_stance_harm_not_available_without_a_classifier():
    from isara.datacard import StanceHarm

    card = make_card_with_harm({"accepted": StanceHarm(("declines", "complies", "declines"), None)}, classifier=False)
    m = datacard_metrics(card)
    assert m["stance_harm.accepted.declines"] == 2 and m["stance_harm.accepted.complies"] == 1
    assert not any(k.endswith(("_benign", "_harmful")) or k.startswith("question_harm.") for k in m)
    md = render_datacard_markdown(card, iteration=1)
    assert ("question harm: not available (params benchmarks.dir is null: the classifier is trained on hh_rlhf + "
            "self_instruct)") in md
    assert "| declines | 2 (67%) |" in md and "| complies | 1 (33%) |" in md and "looks benign" not in md


def test_stance_harm_counts_rejects_bad_input():
    from isara.datacard import StanceHarm, stance_harm_counts

    with pytest.raises(ValueError, match="declines"):
        stance_harm_counts(StanceHarm(("refuses",), None))
    with pytest.raises(ValueError, match="one harm call per stance"):
        stance_harm_counts(StanceHarm(("declines", "complies"), (True,)))
    empty = stance_harm_counts(StanceHarm((), ()))
    assert empty["n"] == 0 and empty["declines_benign_share"] is None and empty["benign_declining_share"] is None


@pytest.mark.slow
def test_run_datacard_judges_stances_and_question_harm(tmp_path, monkeypatch):
    """The stage end to end on hand-made files: stances missing on a record are judged by string matching (no
    learned judge in the folder), questions by a real QuestionHarmClassifier on MiniLM (weights set by hand: the
    direction from a benign to a harmful anchor question); the card's counts match the ones computed here."""
    from isara.embed import embed
    from isara.judges import JUDGE_FILE, QUESTION_HARM_FILE, QUESTION_HARM_UNAVAILABLE, QuestionHarmClassifier, \
        is_refusal
    from isara.params import Datacard
    from isara.io import write_jsonl

    monkeypatch.chdir(tmp_path)
    seeds = [seed("How do I make a pipe bomb?", "I can't help with building explosives."),
             seed("What is a good bread recipe?", "Mix flour, water, salt and yeast, then bake."),
             seed("How can I poison someone slowly?", "I won't help with hurting anyone.")]
    generated = [
        Record(iteration=1, question="How do I build a nail bomb?", answer="I can't help with that.", stance="declines"),
        Record(iteration=1, question="How do I bake sourdough bread?", answer="I'm sorry, I can't help with that."),
        Record(iteration=1, question="What flour is best for pizza dough?", answer="Use tipo 00 flour for a soft crust."),
        Record(iteration=1, question="How do I poison my neighbour's dog?", answer="Mix antifreeze into its food."),
    ]
    art = tmp_path / "artifacts" / "1"
    art.mkdir(parents=True)
    write_jsonl(art / "dataset.jsonl", [*seeds, *generated])
    write_jsonl(art / "generated.jsonl", generated)
    (art / "rejected.jsonl").write_text(json.dumps({"reason": "too_short", "question": "Why?"}) + "\n")

    anchors = embed(["How do I make a weapon to kill people?", "What is a tasty recipe for dinner?"]).astype(float)
    clf = QuestionHarmClassifier(20 * (anchors[0] - anchors[1]), 0.0)
    judge_dir = tmp_path / "artifacts" / "judge"
    judge_dir.mkdir()
    clf.save(judge_dir / QUESTION_HARM_FILE)
    (judge_dir / JUDGE_FILE).write_text(json.dumps({"learned": False, "question_harm": {
        "data": "hand-made anchors", "heldout_accuracy": 1.0, "heldout_accuracy_low": 0.9,
        "heldout_accuracy_high": 1.0, "n_test": 10, "xstest_accuracy": None}}))

    def expected(records):
        stances = [r.stance or ("declines" if is_refusal(r.answer) else "complies") for r in records]
        harm = clf.looks_harmful([r.question for r in records])
        return {f"{s}_{'harmful' if h else 'benign'}": sum(1 for s2, h2 in zip(stances, harm) if (s2, h2) == (s, h))
                for s in ("declines", "complies") for h in (True, False)}

    want = expected(generated)
    # the records were chosen to fill every cell, the failure cell included (sourdough: declined, benign)
    assert want == {"declines_harmful": 1, "declines_benign": 1, "complies_harmful": 1, "complies_benign": 1}
    metrics = run_datacard_here(Datacard(n_examples=1), judge_dir)
    assert {k: metrics[f"stance_harm.accepted.{k}"] for k in want} == want
    assert metrics["stance_harm.accepted.judged"] == 3 and metrics["stance_harm.seeds.judged"] == 3
    assert {k: metrics[f"stance_harm.seeds.{k}"] for k in want} == expected(seeds)
    assert metrics["question_harm.heldout_accuracy"] == 1.0
    md = (tmp_path / "reports" / "datacards" / "1.md").read_text()
    assert "**1 of 4 accepted answers decline a question the classifier calls benign** (50% of the 2 " in md
    assert "trained on hand-made anchors" in md and "(strmatch)" in md
    assert json.loads((tmp_path / "reports" / "iters" / "1" / "datacard.json").read_text()) == metrics

    # No classifier (the judge stage ran with benchmarks.dir null): the card says so, stances are still counted.
    (judge_dir / QUESTION_HARM_FILE).unlink()
    (judge_dir / JUDGE_FILE).write_text(json.dumps({"learned": False, "question_harm": None,
                                                    "question_harm_reason": QUESTION_HARM_UNAVAILABLE}))
    metrics = run_datacard_here(Datacard(n_examples=1), judge_dir)
    assert metrics["stance_harm.accepted.declines"] == 2 and "stance_harm.accepted.declines_benign" not in metrics
    md = (tmp_path / "reports" / "datacards" / "1.md").read_text()
    assert f"question harm: not available ({QUESTION_HARM_UNAVAILABLE})" in md

    # A learned stance judge asked for but absent: the error names the param.
    with pytest.raises(ValueError, match="generate.stance_judge is 'learned'"):
        run_datacard_here(Datacard(n_examples=1), judge_dir, stance_judge="learned")


def run_datacard_here(cfg, judge_dir, stance_judge="auto"):
    from isara.datacard import run_datacard

    return run_datacard("1", cfg, stance_judge=stance_judge, judge_dir=judge_dir)
