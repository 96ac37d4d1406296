"""The per-iteration data card: an audit of the health of the data one ISARA round generated.

Self-generated data fails quietly: the model can collapse onto a few phrasings, copy itself, lean on a
handful of seeds, or drift away from the seed domain, and the fine-tuned model still trains. The card
puts numbers on each of those failure modes, so `dvc metrics diff` shows them moving across iterations
and experiments:

- volume and rejections: how many attempts it took, and why the filters threw samples away;
- diversity: distinct-n (Li et al. 2016, "A Diversity-Promoting Objective ...") and embedding similarity
  of the generated questions, within the round;
- seed influence: how unevenly the generated data descends from the seed set (Gini, top-5 share);
- retrieval distance: how often a new question was far from everything already in the data
  (the out-of-domain flag);
- lengths of questions and answers;
- answer stance x question harm: how often an accepted answer declines a question that a classifier trained on
  public data (isara.judges, question-harm section) calls benign, the over-refusal ISARA can teach itself.

Everything here is a pure function of records, texts or vectors; only `build_datacard` (when it is not handed
vectors) and the stage itself, `run_datacard`, embed. `build_datacard` returns flat dotted numeric keys (what `dvc metrics`
reads) plus one non-numeric key, `examples`; `datacard_metrics` strips that key for the metrics file.
"""

from __future__ import annotations

import json
import math
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from isara.filters import FAR_QUANTILE, seed_far_distance, stance_of  # noqa: F401 (re-exported)
from isara.io import atomic_write_text, write_json
from isara.params import Datacard
from isara.paths import JUDGE, iter_paths
from isara.records import Record, read_records
from isara.text import words  # the one word definition: distinct-n and the word counts

EXAMPLES_KEY = "examples"
# What the card says about the stance judge and the question-harm classifier (names, data, or why there is none):
# text, so it stays out of the metrics file like the examples.
STANCE_HARM_NOTES_KEY = "stance_harm_notes"
NON_METRIC_KEYS = (EXAMPLES_KEY, STANCE_HARM_NOTES_KEY)

# Defaults for the two thresholds the card needs; the stage passes its own params.
# 0.9 cosine between MiniLM sentence vectors is a paraphrase, not merely the same topic.
DEFAULT_NEAR_DUPLICATE_THRESHOLD = 0.9
# Annoy angular distance sqrt(2 - 2 cos): 1.0 is cosine 0.5. A fixed number fits no seed set well (the 64
# safety seeds cover 14 harm areas: half of them have no other seed within 1.09), hence the default below.
DEFAULT_FAR_DISTANCE = 1.0
# datacard.far_distance null: "far" = beyond the FAR_QUANTILE (0.95) of the seeds' own nearest-other-seed
# distances, i.e. a new question lies farther from the data than 95% of the seeds lie from each other. The same
# function gives generate's out-of-domain filter its default threshold (isara.filters.seed_far_distance).

# ---------------------------------------------------------------------------------------------- diversity


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Corpus-level distinct-n: unique n-grams / total n-grams, pooled over all texts.

    Tokens are `words(text)`. N-grams are taken within each text (never across two texts). A text
    shorter than n words contributes none. Returns 0.0 when there are no n-grams at all.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    total = 0
    unique: set[tuple[str, ...]] = set()
    for text in texts:
        tokens = words(text)
        for i in range(len(tokens) - n + 1):
            unique.add(tuple(tokens[i : i + n]))
            total += 1
    return len(unique) / total if total else 0.0


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float64) so dot products are cosines; all-zero rows stay zero."""
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"expected a 2-D array of row vectors, got shape {v.shape}")
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)


def mean_pairwise_similarity(vectors: np.ndarray) -> float:
    """Mean cosine similarity over all n(n-1)/2 distinct pairs of rows (i < j).

    Rows are normalised first, so non-unit input still gives cosines. Computed without the n x n matrix:
    sum over pairs i != j of v_i.v_j = |sum_i v_i|^2 - sum_i |v_i|^2.
    Returns nan for fewer than 2 rows: with no pair the mean is undefined (neither "diverse" nor "identical").
    """
    v = _unit_rows(vectors)
    n = v.shape[0]
    if n < 2:
        return float("nan")
    total = v.sum(axis=0)
    off_diagonal = float(total @ total) - float(np.einsum("ij,ij->", v, v))
    return off_diagonal / (n * (n - 1))


def near_duplicate_rate(vectors: np.ndarray, threshold: float, block_size: int = 1024) -> float:
    """Share of rows whose maximum cosine similarity to any OTHER row is >= threshold.

    Both members of a near-duplicate pair count. Rows are normalised first. Returns 0.0 for fewer than
    2 rows (no other row, so nothing is a duplicate). Works in row blocks, so memory is block_size x n.
    """
    v = _unit_rows(vectors)
    n = v.shape[0]
    if n < 2:
        return 0.0
    flagged = 0
    for start in range(0, n, block_size):
        sims = v[start : start + block_size] @ v.T
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # never compare an item with itself
        flagged += int((sims.max(axis=1) >= threshold).sum())
    return flagged / n


# ----------------------------------------------------------------------------------------- seed influence


def seed_descendants(records: Iterable[Record]) -> dict[str, int]:
    """For every seed (iteration 0), the number of distinct generated records that descend from it.

    A record descends from a seed when the seed is reachable through `Record.parent_ids()` (question and
    answer context), hop by hop, across iterations. A descendant reachable along several paths counts
    once per seed; one generated record counts for every seed it reaches. Every seed in `records` is a
    key, with 0 if nothing descends from it. Records are de-duplicated by id; parent ids that are not in
    `records` are dead ends.
    """
    by_id: dict[str, Record] = {}
    for record in records:
        by_id.setdefault(record.id, record)
    children: dict[str, list[str]] = {}
    for record in by_id.values():
        for parent in record.parent_ids():
            children.setdefault(parent, []).append(record.id)

    counts: dict[str, int] = {}
    for seed in (r for r in by_id.values() if r.is_seed):
        seen = {seed.id}
        queue = deque([seed.id])
        while queue:
            for child in children.get(queue.popleft(), []):
                if child not in seen:
                    seen.add(child)
                    queue.append(child)
        counts[seed.id] = sum(1 for rid in seen if not by_id[rid].is_seed)
    return counts


def gini(values: Sequence[float]) -> float:
    """Gini coefficient by the mean absolute difference: G = sum_i sum_j |x_i - x_j| / (2 n^2 mean(x)).

    0 when all values are equal; (n-1)/n, its maximum, when one value holds everything.
    Values must be >= 0. Returns 0.0 for no values or an all-zero list (nothing is unequally shared).
    Computed in O(n log n) from the sorted values: G = sum_i (2i - n - 1) x_(i) / (n sum x), i = 1..n.
    """
    x = np.sort(np.asarray(values, dtype=np.float64))
    if x.size and x[0] < 0:
        raise ValueError("gini needs non-negative values")
    n = x.size
    total = float(x.sum())
    if n == 0 or total == 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float(((2 * ranks - n - 1) * x).sum() / (n * total))


def top_k_share(values: Sequence[float], k: int) -> float:
    """Share of the total held by the k largest values: sum(top k) / sum(all).

    k >= len(values) gives 1.0. Returns 0.0 when the total is 0 (or there are no values). Values must be >= 0.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    x = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    if x.size and x[-1] < 0:
        raise ValueError("top_k_share needs non-negative values")
    total = float(x.sum())
    if total == 0:
        return 0.0
    return float(x[:k].sum()) / total


# --------------------------------------------------------------------------------------- lengths, retrieval


def length_stats(texts: Sequence[str]) -> dict[str, dict[str, float]]:
    """Length distribution of texts: {"chars": {...}, "words": {...}}, each with min, p50, mean, p90, max.

    chars = len(text) in Unicode code points, as stored; words = len(words(text)).
    Percentiles use numpy's default linear interpolation. With no texts every statistic is nan.
    """
    out: dict[str, dict[str, float]] = {}
    for unit, measure in (("chars", len), ("words", lambda t: len(words(t)))):
        lengths = np.array([measure(t) for t in texts], dtype=np.float64)
        if lengths.size == 0:
            out[unit] = {k: float("nan") for k in ("min", "p50", "mean", "p90", "max")}
            continue
        out[unit] = {
            "min": float(lengths.min()),
            "p50": float(np.percentile(lengths, 50)),
            "mean": float(lengths.mean()),
            "p90": float(np.percentile(lengths, 90)),
            "max": float(lengths.max()),
        }
    return out


def far_retrieval_share(
    records: Iterable[Record],
    threshold: float,
    context: Literal["answer", "question"] = "answer",
) -> float:
    """Out-of-domain flag: share of generated records whose NEAREST in-context example is farther than threshold.

    Distances are the Annoy angular distances stored on the record, sqrt(2 - 2 cos) in [0, 2].
    A record is flagged when min(distance over its context) > threshold (strictly).

    Default context is `answer_context`: its retrieval query is the newly generated question, so its
    nearest distance says how far the new question landed from everything in D(t-1). The question
    context is retrieved around the anchor, an existing record, so it says nothing about the new sample.

    Seeds are skipped, and so are generated records with an empty context (no distance to judge);
    the share is over the rest. Returns 0.0 when none remain.
    """
    if context not in ("answer", "question"):
        raise ValueError(f"context must be 'answer' or 'question', got {context!r}")
    judged = flagged = 0
    for record in records:
        if record.is_seed:
            continue
        neighbours = record.answer_context if context == "answer" else record.question_context
        if not neighbours:
            continue
        judged += 1
        if min(n.distance for n in neighbours) > threshold:
            flagged += 1
    return flagged / judged if judged else 0.0


def stance_counts(generated: Iterable[Record], rejected_examples: Iterable[dict]) -> dict[str, dict[str, int]]:
    """Answer stance (declines / complies, as generate's judge labelled it: Record.stance and the rejections'
    "stance") per outcome: "accepted" and each rejection reason whose answers were labelled. Empty when nothing
    was labelled (a round generated with the stance filters off, or before them)."""
    out: dict[str, dict[str, int]] = {}
    rows = [("accepted", r.stance) for r in generated]
    rows += [(str(r.get("reason", "unknown")), r.get("stance")) for r in rejected_examples]
    for outcome, stance in rows:
        if stance in ("declines", "complies"):
            counts = out.setdefault(outcome, {"declines": 0, "complies": 0})
            counts[stance] += 1
    return out


@dataclass(frozen=True)
class StanceHarm:
    """One group of records (a round's accepted records, the seeds) for the stance x question-harm table: each
    record's answer stance, and whether its question looks harmful (None: no classifier)."""

    stances: tuple[str, ...]  # "declines" / "complies", one per record
    looks_harmful: tuple[bool, ...] | None
    judged: int = 0  # stances the card judged itself (the record carried none)


def stance_harm_counts(group: StanceHarm) -> dict[str, int | float | None]:
    """n, declines, complies, judged; with a harm call per record also each stance x {harmful, benign} cell,
    declines_benign_share (of all n: the failure cell's share) and benign_declining_share (of the benign-looking
    questions). Shares are None when their denominator is 0."""
    bad = set(group.stances) - {"declines", "complies"}
    if bad:
        raise ValueError(f"stances must be 'declines' or 'complies', got {sorted(bad)}")
    n = len(group.stances)
    out: dict[str, int | float | None] = {
        "n": n, "judged": group.judged,
        "declines": sum(1 for s in group.stances if s == "declines"),
        "complies": sum(1 for s in group.stances if s == "complies"),
    }
    if group.looks_harmful is None:
        return out
    if len(group.looks_harmful) != n:
        raise ValueError(f"one harm call per stance expected: {len(group.looks_harmful)} != {n}")
    for stance in ("declines", "complies"):
        for harm, label in ((True, "harmful"), (False, "benign")):
            out[f"{stance}_{label}"] = sum(1 for s, h in zip(group.stances, group.looks_harmful)
                                           if s == stance and h == harm)
    benign = out["declines_benign"] + out["complies_benign"]
    out["declines_benign_share"] = out["declines_benign"] / n if n else None
    out["benign_declining_share"] = out["declines_benign"] / benign if benign else None
    return out


# ---------------------------------------------------------------------------------------------- the card


def _finite_or_none(value: float) -> float | None:
    """JSON has no nan: undefined statistics become null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _sample(items: Sequence[Any], n: int, rng: np.random.Generator) -> list[Any]:
    """Up to n items drawn without replacement, kept in their original order (stable, readable)."""
    if len(items) <= n:
        return list(items)
    picked = sorted(rng.choice(len(items), size=n, replace=False).tolist())
    return [items[i] for i in picked]


def build_datacard(
    records_in_dataset: Sequence[Record],
    generated: Sequence[Record],
    rejected_counts: dict[str, int],
    attempted: int,
    rejected_examples: list[dict],
    vectors: np.ndarray | None = None,
    rng_seed: int = 0,
    n_examples: int = 3,
    *,
    near_duplicate_threshold: float = DEFAULT_NEAR_DUPLICATE_THRESHOLD,
    far_distance: float = DEFAULT_FAR_DISTANCE,
    top_k: int = 5,
    stance_harm: dict[str, StanceHarm] | None = None,
    stance_harm_notes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the data card of one iteration as a JSON-serialisable dict.

    records_in_dataset: D(t), seeds included (whether or not it already holds `generated`: the two are
    merged by id for lineage). generated: the records accepted this iteration. rejected_counts: reason ->
    count. attempted: generation attempts made. rejected_examples: dicts as the filter logged them
    (a "reason" key groups them). vectors: embeddings of the generated *questions*, row i for generated[i];
    computed with `isara.embed.embed` when None.

    Keys (all numeric or null, flat and dotted for `dvc metrics`):
      accepted, attempted, acceptance_rate (= accepted / attempted, 0.0 if no attempts),
      rejected.total, rejected.<reason>, dataset.size, dataset.seeds, dataset.generated,
      diversity.{question,answer}_distinct_{1,2} (generated this iteration),
      diversity.mean_pairwise_similarity, diversity.near_duplicate_rate (generated questions, within round),
      seed_influence.{gini,top<k>_share,max,mean,zero_share} (over all generated records in D(t)),
      retrieval.far_share (this iteration, answer context), length.{question,answer}.{chars,words}.{min,...},
      stance.<accepted|reason>.{declines,complies,declining_share} (only where generate labelled stances),
      stance_harm.<group>.<stance_harm_counts key> per group of `stance_harm` ("accepted", "seeds"), and with a
      classifier question_harm.{heldout_accuracy,xstest_accuracy} from `stance_harm_notes["classifier"]`.
    Plus `examples` (non-numeric): sampled accepted records, rejected ones per reason, most influential seeds;
    and `stance_harm_notes` as given (stance_judge: its name; classifier: the judge stage's question-harm report,
    or None with `unavailable`: why).
    """
    if attempted < len(generated):
        raise ValueError(f"attempted ({attempted}) < accepted ({len(generated)})")
    if "total" in rejected_counts:
        raise ValueError("'total' is reserved for rejected.total; rename that rejection reason")
    questions = [r.question for r in generated]
    answers = [r.answer for r in generated]
    if vectors is None:
        if questions:
            from isara.embed import (
                embed,  # lazy: sentence-transformers only when the card must embed
            )

            vectors = embed(questions)
        else:
            vectors = np.zeros((0, 1))
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != len(generated):
        raise ValueError(f"vectors must have one row per generated record ({len(generated)}), got {vectors.shape}")

    merged: dict[str, Record] = {}
    for record in [*records_in_dataset, *generated]:
        merged.setdefault(record.id, record)
    descendants = seed_descendants(merged.values())
    counts = list(descendants.values())

    card: dict[str, Any] = {
        "accepted": len(generated),
        "attempted": attempted,
        "acceptance_rate": len(generated) / attempted if attempted else 0.0,
        "rejected.total": int(sum(rejected_counts.values())),
    }
    for reason in sorted(rejected_counts):
        card[f"rejected.{reason}"] = int(rejected_counts[reason])
    n_seeds = sum(1 for r in merged.values() if r.is_seed)
    card["dataset.size"] = len(merged)
    card["dataset.seeds"] = n_seeds
    card["dataset.generated"] = len(merged) - n_seeds
    for n in (1, 2):
        card[f"diversity.question_distinct_{n}"] = distinct_n(questions, n)
        card[f"diversity.answer_distinct_{n}"] = distinct_n(answers, n)
    card["diversity.mean_pairwise_similarity"] = mean_pairwise_similarity(vectors)
    card["diversity.near_duplicate_rate"] = near_duplicate_rate(vectors, near_duplicate_threshold)
    card["seed_influence.gini"] = gini(counts)
    card[f"seed_influence.top{top_k}_share"] = top_k_share(counts, top_k)
    card["seed_influence.max"] = max(counts, default=0)
    card["seed_influence.mean"] = float(np.mean(counts)) if counts else 0.0
    card["seed_influence.zero_share"] = sum(1 for c in counts if c == 0) / len(counts) if counts else 0.0
    card["retrieval.far_distance"] = far_distance
    card["retrieval.far_share"] = far_retrieval_share(generated, far_distance)
    for outcome, counts in sorted(stance_counts(generated, rejected_examples).items(),
                                  key=lambda kv: (kv[0] != "accepted", kv[0])):
        card[f"stance.{outcome}.declines"] = counts["declines"]
        card[f"stance.{outcome}.complies"] = counts["complies"]
        card[f"stance.{outcome}.declining_share"] = counts["declines"] / (counts["declines"] + counts["complies"])
    for group, rows in (stance_harm or {}).items():
        for key, value in stance_harm_counts(rows).items():
            card[f"stance_harm.{group}.{key}"] = value
    classifier = (stance_harm_notes or {}).get("classifier")
    if stance_harm and classifier:
        card["question_harm.heldout_accuracy"] = classifier.get("heldout_accuracy")
        card["question_harm.xstest_accuracy"] = classifier.get("xstest_accuracy")
    for field, texts in (("question", questions), ("answer", answers)):
        for unit, stats in length_stats(texts).items():
            for stat, value in stats.items():
                card[f"length.{field}.{unit}.{stat}"] = value
    card = {key: _finite_or_none(value) for key, value in card.items()}

    rng = np.random.default_rng(rng_seed)
    by_reason: dict[str, list[dict]] = {}
    for example in rejected_examples:
        by_reason.setdefault(str(example.get("reason", "unknown")), []).append(example)
    seed_text = {r.id: r.question for r in merged.values() if r.is_seed}
    top_seeds = sorted(descendants.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
    card[EXAMPLES_KEY] = {
        "accepted": [
            {"id": r.id, "question": r.question, "answer": r.answer} for r in _sample(list(generated), n_examples, rng)
        ],
        "rejected": {reason: _sample(by_reason[reason], n_examples, rng) for reason in sorted(by_reason)},
        "top_seeds": [{"id": sid, "descendants": c, "question": seed_text[sid]} for sid, c in top_seeds],
    }
    if stance_harm:
        card[STANCE_HARM_NOTES_KEY] = dict(stance_harm_notes or {})
    return card


def datacard_metrics(card: dict[str, Any]) -> dict[str, Any]:
    """The card without its examples and notes: the flat numeric dict to write as the `dvc metrics` file."""
    return {key: value for key, value in card.items() if key not in NON_METRIC_KEYS}


# ------------------------------------------------------------------------------------------------ markdown


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value)


def _cell(text: Any, limit: int = 160) -> str:
    """One markdown table cell: a single line, pipes escaped, long text shortened."""
    s = " ".join(str(text).split()).replace("|", "\\|")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _block(text: str) -> str:
    """A fenced block that survives backticks inside the text."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _share(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _pct(part: int, whole: int) -> str:
    return f"{part} ({100 * part / whole:.0f}%)" if whole else str(part)


# The table's group names as the card shows them.
_GROUP_TITLES = {"accepted": "Accepted this round", "seeds": "Seeds (D0), for reference"}
_GROUP_NOUNS = {"accepted": "accepted answers", "seeds": "seed answers"}


def _stance_harm_section(metrics: dict[str, Any], notes: dict[str, Any]) -> list[str]:
    """The "stance x question harm" tables, one per group, with the failure cell (declines a benign-looking
    question) in bold and spelled out under each table."""
    clf = notes.get("classifier")
    judge = notes.get("stance_judge", "n/a")
    out = ["## Answer stance x question harm", "",
           f"Stance: generate's label (Record.stance), or where a record has none judged here by the judge "
           f"generate.stance_judge selects ({judge}).", ""]
    if clf:
        xs = ("not measured" if clf.get("xstest_accuracy") is None else
              f"{_fmt(clf['xstest_accuracy'])} (95% CI {_fmt(clf.get('xstest_accuracy_low'))}-"
              f"{_fmt(clf.get('xstest_accuracy_high'))}; it calls {_share(clf.get('xstest_safe_called_benign'))} of "
              f"XSTest's safe prompts benign)")
        out += [f"Question harm: a MiniLM + logistic-regression classifier (judge stage, artifacts/judge) trained on "
                f"{clf.get('data', 'n/a')}; held-out accuracy {_fmt(clf.get('heldout_accuracy'))} (95% CI "
                f"{_fmt(clf.get('heldout_accuracy_low'))}-{_fmt(clf.get('heldout_accuracy_high'))}, "
                f"{_fmt(clf.get('n_test'))} texts) between its sources. On XSTest's safe / unsafe prompt "
                f"labels, an eval set it is measured on and never trained or tuned on: accuracy {xs}. It calls many "
                "harmless questions that sound risky harmful: the benign column, and the bold failure cell, "
                "undercount (a floor, not a rate).", ""]
    else:
        out += [f"question harm: not available ({notes.get('unavailable') or 'no classifier'})", ""]
    groups = list(dict.fromkeys(k.split(".")[1] for k in metrics if k.startswith("stance_harm.")))
    for group in groups:
        def m(key: str) -> Any:
            return metrics.get(f"stance_harm.{group}.{key}")

        n = m("n") or 0
        title = _GROUP_TITLES.get(group, group)
        out += [f"**{title}**: {n} records, {_fmt(m('judged'))} of them judged here.", ""]
        if m("declines_benign") is None:
            out += _table(["stance", "count"], [("declines", _pct(m("declines"), n)),
                                               ("complies", _pct(m("complies"), n)), ("total", n)])
            out.append("")
            continue
        rows = []
        for stance in ("declines", "complies"):
            harmful, benign = m(f"{stance}_harmful"), m(f"{stance}_benign")
            shown = _pct(benign, n)
            rows.append((stance, _pct(harmful, n), f"**{shown}**" if stance == "declines" else shown,
                         _pct(harmful + benign, n)))
        col = [m("declines_harmful") + m("complies_harmful"), m("declines_benign") + m("complies_benign")]
        rows.append(("total", _pct(col[0], n), _pct(col[1], n), n))
        out += _table(["stance", "looks harmful", "looks benign", "total"], rows)
        share = m("benign_declining_share")
        of_benign = "" if share is None else f" ({100 * share:.0f}% of the {col[1]} benign-looking questions)"
        out += ["", f"**{m('declines_benign')} of {n} {_GROUP_NOUNS.get(group, 'answers')} decline a question the "
                f"classifier calls benign**{of_benign}.", ""]
    return out


def render_datacard_markdown(card: dict[str, Any], iteration: int) -> str:
    """A readable markdown data card: one table per section, then the sampled examples."""
    metrics = datacard_metrics(card)
    out = [f"# Data card: iteration {iteration}", ""]
    accepted, attempted = metrics.get("accepted"), metrics.get("attempted")
    out += [
        f"{_fmt(accepted)} of {_fmt(attempted)} attempts accepted "
        f"(acceptance rate {_fmt(metrics.get('acceptance_rate'))}); "
        f"the data set now holds {_fmt(metrics.get('dataset.size'))} records "
        f"({_fmt(metrics.get('dataset.seeds'))} seeds).",
        "",
    ]

    used: set[str] = set()

    def section(title: str, prefix: str, note: str = "") -> None:
        keys = [k for k in metrics if k.startswith(prefix) and k not in used]
        if not keys:
            return
        used.update(keys)
        out.extend([f"## {title}", ""])
        if note:
            out.extend([note, ""])
        out.extend(_table(["metric", "value"], [(k[len(prefix) :], _fmt(metrics[k])) for k in keys]))
        out.append("")

    used.update(k for k in ("accepted", "attempted", "acceptance_rate") if k in metrics)
    section("Data set", "dataset.")

    reasons = [k for k in metrics if k.startswith("rejected.") and k != "rejected.total"]
    if "rejected.total" in metrics:
        used.update(["rejected.total", *reasons])
        out.extend(["## Rejections", ""])
        rows = []
        for k in [*reasons, "rejected.total"]:
            count = metrics[k]
            share = count / attempted if attempted else None
            rows.append((k[len("rejected.") :], _fmt(count), _fmt(share)))
        out.extend(_table(["reason", "count", "share of attempts"], rows))
        out.append("")

    section("Diversity (this iteration)", "diversity.",
            "distinct-n: unique / total n-grams (higher is more varied); similarity: MiniLM cosine of questions.")
    section("Seed influence", "seed_influence.",
            "Generated records descending from each seed (all iterations); Gini 0 = even, (n-1)/n = one seed.")
    section("Retrieval", "retrieval.",
            "far_share: share of new questions whose nearest retrieved example is beyond far_distance (Annoy angular "
            "distance; by default the 95th percentile of the seeds' distances to their nearest other seed): the "
            "out-of-domain flag.")

    stance_keys = [k for k in metrics if k.startswith("stance.")]
    if stance_keys:
        used.update(stance_keys)
        outcomes = list(dict.fromkeys(k[len("stance.") :].rsplit(".", 1)[0] for k in stance_keys))
        out.extend(["## Answer stance", "",
                    "Stance of each answered attempt, by the judge generate used (generate.stance_judge; "
                    "metrics filters.stance_judge of generate): accepted records, then each rejection reason."
                    + (" Crossed with whether the question looks harmful: the next section." if any(
                        k.startswith("stance_harm.") for k in metrics) else ""), ""])
        rows = [(o, *(_fmt(metrics.get(f"stance.{o}.{c}")) for c in ("declines", "complies", "declining_share")))
                for o in outcomes]
        out.extend(_table(["answers", "declines", "complies", "declining share"], rows))
        out.append("")

    harm_keys = [k for k in metrics if k.startswith(("stance_harm.", "question_harm."))]
    if harm_keys:
        used.update(harm_keys)
        out.extend(_stance_harm_section(metrics, card.get(STANCE_HARM_NOTES_KEY) or {}))

    length_keys = [k for k in metrics if k.startswith("length.")]
    if length_keys:
        used.update(length_keys)
        stats = ["min", "p50", "mean", "p90", "max"]
        groups = sorted({k.rsplit(".", 1)[0] for k in length_keys})  # length.<field>.<unit>
        out.extend(["## Lengths", ""])
        rows = [(g[len("length.") :].replace(".", " / "), *(_fmt(metrics.get(f"{g}.{s}")) for s in stats))
                for g in groups]
        out.extend(_table(["text / unit", *stats], rows))
        out.append("")

    rest = [k for k in metrics if k not in used]
    if rest:
        out.extend(["## Other", ""])
        out.extend(_table(["metric", "value"], [(k, _fmt(metrics[k])) for k in rest]))
        out.append("")

    examples = card.get(EXAMPLES_KEY) or {}
    if examples.get("top_seeds"):
        out.extend(["## Most influential seeds", ""])
        out.extend(_table(["seed id", "descendants", "question"],
                          [(s["id"], s["descendants"], s["question"]) for s in examples["top_seeds"]]))
        out.append("")
    if examples.get("accepted"):
        out.extend(["## Accepted examples", ""])
        for ex in examples["accepted"]:
            out.extend([f"**{ex['id']}**", "", _block(f"Question: {ex['question']}\nAnswer: {ex['answer']}"), ""])
    if examples.get("rejected"):
        out.extend(["## Rejected examples", ""])
        for reason, items in examples["rejected"].items():
            out.extend([f"### {reason}", ""])
            for ex in items:
                body = "\n".join(f"{k}: {v}" for k, v in ex.items() if k != "reason")
                out.extend([_block(body or "(no fields)"), ""])
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------------------------- the stage


def judge_stance_harm(records: Sequence[Record], vectors: np.ndarray, stance_judge, classifier) -> StanceHarm:
    """Each record's stance (its own label, else `stance_judge`'s verdict: an isara.judges.StanceJudge) and, with a
    classifier (isara.judges.QuestionHarmClassifier), whether its question looks harmful; `vectors`: the questions'
    embeddings, one row per record."""
    missing = [i for i, r in enumerate(records) if r.stance is None]
    verdicts = stance_judge.declines([records[i].question for i in missing], [records[i].answer for i in missing])
    stances = [r.stance for r in records]
    for i, declines in zip(missing, verdicts):
        stances[i] = stance_of(declines)
    harm = None if classifier is None else tuple(classifier.looks_harmful([r.question for r in records], vectors))
    return StanceHarm(tuple(stances), harm, judged=len(missing))


def run_datacard(iteration: str, cfg: Datacard, seeds=None, base=None, stance_judge: str = "auto",
                 judge_dir: Path = JUDGE) -> dict[str, Any]:
    """datacard@t: the card of iteration t from what generate@t wrote (D(t), accepted and rejected records).

    Every attempt ends accepted or rejected with a reason, so attempted = accepted + rejected.
    Writes reports/iters/<t>/datacard.json (flat numeric figures for `dvc metrics`) and reports/datacards/<t>.md;
    with the `seeds` and `base` params that .md is a Hugging Face dataset card (YAML front matter: license, task,
    size, data files, lineage) of artifacts/<t>/.
    The stance x question-harm table reads the judge stage's folder (`judge_dir`): the stance judge that params
    `stance_judge` (generate.stance_judge) selects, for records without a stance, and the question-harm classifier.
    """
    from isara.embed import embed
    from isara.judges import StanceJudge, read_question_harm

    here = iter_paths(iteration)
    dataset = read_records(here.dataset)
    generated = read_records(here.generated)
    rejected = [json.loads(line) for line in here.rejected.read_text(encoding="utf-8").splitlines() if line.strip()]
    counts: dict[str, int] = {}
    for row in rejected:
        reason = str(row.get("reason", "unknown"))
        counts[reason] = counts.get(reason, 0) + 1
    judge = StanceJudge.load(stance_judge, judge_dir)
    classifier, harm_info = read_question_harm(judge_dir)
    seed_records = [r for r in dataset if r.is_seed]
    # One embedding of each question set serves diversity, the far-distance default and the harm classifier.
    vectors = embed([r.question for r in generated])
    seed_vectors = embed([r.question for r in seed_records])
    far = cfg.far_distance if cfg.far_distance is not None else seed_far_distance(seed_vectors)
    stance_harm = {"accepted": judge_stance_harm(generated, vectors, judge, classifier),
                   "seeds": judge_stance_harm(seed_records, seed_vectors, judge, classifier)}
    notes = {"stance_judge": judge.name, "classifier": harm_info if classifier is not None else None,
             "unavailable": None if classifier is not None else harm_info["reason"]}
    card = build_datacard(dataset, generated, counts, len(generated) + len(rejected), rejected, vectors=vectors,
                          rng_seed=cfg.seed, n_examples=cfg.n_examples,
                          near_duplicate_threshold=cfg.near_duplicate_threshold, far_distance=far,
                          top_k=cfg.top_k, stance_harm=stance_harm, stance_harm_notes=notes)
    metrics = datacard_metrics(card)
    write_json(here.metrics("datacard"), metrics)
    head = ""
    if seeds is not None and base is not None:  # the stage passes both: a Hub dataset card (isara.cards)
        from isara.cards import base_facts, dataset_front_matter, file_sha256

        head = dataset_front_matter(iteration, n_records=len(dataset), facts=base_facts(base),
                                    seeds_path=seeds.path, seeds_sha256=file_sha256(seeds.path),
                                    generator_sha256=sorted({r.model_sha256 for r in generated if r.model_sha256}))
    atomic_write_text(here.datacard, head + render_datacard_markdown(card, int(iteration)))
    return metrics
