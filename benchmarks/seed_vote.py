"""Seed vote: a cheap proxy for how a seed set steers retrieval-augmented generation toward declining.

    python benchmarks/seed_vote.py --seeds data/seeds/safety_mixed.jsonl --benchmarks ../shared/data/benchmarks
    python benchmarks/seed_vote.py --seeds data/seeds/safety_mixed.jsonl --seeds data/seeds/safety_wide.jsonl \\
        --benchmarks ../shared/data/benchmarks --k 1 3 5

For every benchmark prompt, the k seed questions nearest to it (cosine on all-MiniLM-L6-v2, `isara.embed.embed`,
the retrieval the generation prompts use) vote: the prompt counts as "decline" when more than half of them have a
declining answer (the first sentence matches REFUSAL of tests/test_data_sets.py, the rule that test uses for a
declining seed). A model that follows its retrieved examples tends to inherit that vote, so the share of "decline"
on HarmBench's standard behaviours should be high and on XSTest's safe prompts low.

Each prompt set is split into
- eval: exactly the prompts the pipeline's benchmark evaluation scores (`isara.evaluate.stratified` with
  `--limit`, default 100 as in the benchmark run: harmful_format=harmbench, safe_format=xstest, limit=100);
- dev: every other prompt of the same file, the part to tune a seed set on.
XSTest unsafe prompts (the pipeline's harmful set under harmful_format=xstest) are reported too, and the dev
split of XSTest is also broken down by XSTest `type`. Rates come with 95% Wilson intervals (isara.stats.wilson).

--write-dev DIR also writes the dev split as the project's eval JSONL (DIR/harmful.jsonl: HarmBench dev, DIR/safe.jsonl:
XSTest safe dev), so a trained model can be scored on prompts the benchmark eval never uses, e.g. the SFT-seed
baseline of a fine-tuning setting (README "Results", docs/results.md):
    dvc exp run -S evaluate.harmful_path=DIR/harmful.jsonl -S evaluate.safe_path=DIR/safe.jsonl -S evaluate.limit=0 \
        -S benchmarks.dir=... baseline@sft_seed
Keep DIR outside the repository: the prompts are the benchmarks' (their licenses), not the project's.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np

from isara import benchmarks as b
from isara.embed import embed
from isara.evaluate import HARMFUL, SAFE, load_prompts, stratified
from isara.seeds import read_seed_file
from isara.stats import wilson
from tests.test_data_sets import REFUSAL, first_sentence  # the one definition of a declining seed

# (name, benchmark file, the evaluate format, the role whose prompts it takes)
PROMPT_SETS = (
    ("harmbench", b.HARMBENCH, "harmbench", HARMFUL),
    ("xstest_safe", b.XSTEST_PROMPTS, "xstest", SAFE),
    ("xstest_unsafe", b.XSTEST_PROMPTS, "xstest", HARMFUL),
)


def split(pairs: list[tuple[str, str]], limit: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(eval, dev): eval = the pipeline's stratified pick; dev = the rest of the file, in file order."""
    chosen = stratified(pairs, limit)
    left = Counter(chosen)
    dev = []
    for pair in pairs:
        if left[pair] > 0:
            left[pair] -= 1
        else:
            dev.append(pair)
    assert len(chosen) + len(dev) == len(pairs)
    return chosen, dev


def declines(answers: list[str]) -> np.ndarray:
    return np.array([bool(REFUSAL.search(first_sentence(a))) for a in answers])


def vote(sims: np.ndarray, seed_declines: np.ndarray, k: int) -> np.ndarray:
    """True where most of the k nearest seeds (highest cosine) decline."""
    k = min(k, sims.shape[1])
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return seed_declines[top].sum(axis=1) * 2 > k


def fmt_rate(hits: int, n: int) -> str:
    if not n:
        return "     -"
    rate = hits / n
    lo, hi = wilson(rate, n)
    return f"{100 * rate:5.1f}% [{100 * lo:4.1f}, {100 * hi:5.1f}] n={n}"


def write_dev(folder: Path, parts: dict[str, list[tuple[str, str]]]) -> None:
    """Each dev split as {"prompt", "category"} rows, the format `evaluate.*_format: eval` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    for role, pairs in parts.items():
        path = folder / f"{role}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps({"prompt": p, "category": c}) + "\n" for p, c in pairs)
        print(f"wrote {path} ({len(pairs)} prompts)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=Path, action="append", required=True, help="seed JSONL (repeatable)")
    ap.add_argument("--benchmarks", type=Path, default=b.default_benchmarks_dir(),
                    help="benchmarks folder (default $ISARA_BENCHMARKS_DIR)")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--limit", type=int, default=100, help="evaluate.limit of the benchmark run (eval split)")
    ap.add_argument("--no-categories", action="store_true", help="skip the per-category dev breakdown")
    ap.add_argument("--write-dev", type=Path, metavar="DIR",
                    help="also write the dev split as eval JSONL: DIR/harmful.jsonl (HarmBench), DIR/safe.jsonl (XSTest)")
    args = ap.parse_args(argv)
    if args.benchmarks is None:
        ap.error(f"--benchmarks or ${b.BENCHMARKS_ENV} is required")

    sets = {}
    for name, rel, fmt, role in PROMPT_SETS:
        pairs = load_prompts(b.benchmark_path(rel, args.benchmarks), fmt, role)
        sets[name] = dict(zip(("eval", "dev"), split(pairs, args.limit)))
    if args.write_dev:
        write_dev(args.write_dev, {"harmful": sets["harmbench"]["dev"], "safe": sets["xstest_safe"]["dev"]})
    texts = sorted({p for parts in sets.values() for pairs in parts.values() for p, _ in pairs})
    vectors = dict(zip(texts, embed(texts, batch_size=256)))

    print(f"seed vote: share of prompts whose k nearest seeds (MiniLM cosine) mostly decline; "
          f"eval = stratified(limit={args.limit}), dev = the rest; 95% Wilson intervals")
    for path in args.seeds:
        records = read_seed_file(path)
        seed_declines = declines([r.answer for r in records])
        seed_vecs = embed([r.question for r in records], batch_size=256)
        print(f"\n== {path}  ({len(records)} seeds, {int(seed_declines.sum())} decline)")
        print(f"{'set':<14} {'split':<5} {'k':>2}  decline share")
        per_cat = defaultdict(dict)
        for name, parts in sets.items():
            for part in ("dev", "eval"):
                pairs = parts[part]
                sims = np.stack([vectors[p] for p, _ in pairs]) @ seed_vecs.T
                for k in args.k:
                    v = vote(sims, seed_declines, k)
                    print(f"{name:<14} {part:<5} {k:>2}  {fmt_rate(int(v.sum()), len(v))}")
                    if part == "dev" and name.startswith("xstest"):
                        for cat in dict.fromkeys(c for _, c in pairs):
                            mask = np.array([c == cat for _, c in pairs])
                            per_cat[(name, cat)][k] = (int(v[mask].sum()), int(mask.sum()))
        if not args.no_categories:
            print(f"\n{'dev split by XSTest type':<40} " + "  ".join(f"{'k=' + str(k):<26}" for k in args.k))
            for (name, cat), by_k in per_cat.items():
                print(f"{name + ' ' + cat:<40} " + "  ".join(f"{fmt_rate(*by_k[k]):<26}" for k in args.k))


if __name__ == "__main__":
    main()
