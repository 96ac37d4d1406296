"""judge stage: train the learned refusal judge (and the data card's question-harm classifier) on the public
benchmarks' human labels, into artifacts/judge, which evaluate, generate (stance) and the data card read.

    isara judge                 # = dvc repro judge (params `judge`, `benchmarks`)

The judges themselves (string matching, LearnedJudge, StanceJudge, QuestionHarmClassifier) are a capability:
isara/judges.py.
"""

from __future__ import annotations

import time
from pathlib import Path

from isara.io import atomic_directory, write_json
from isara.params import Judge
from isara.paths import JUDGE, JUDGE_METRICS


def run_judge(cfg: Judge, benchmarks_dir: Path | None, out_dir: Path = JUDGE,
              metrics_path: Path = JUDGE_METRICS) -> dict:
    """judge stage: train the learned judge on XSTest's human-labelled completions (under `benchmarks.dir`),
    held out by prompt, and record its agreement next to string matching's on the same held-out rows.
    Without benchmark data, string matching judges everything, and the metrics say why.
    It also trains the data card's question-harm classifier (isara.judges.fit_question_harm), under `question_harm`."""
    from isara.benchmarks import (
        XSTEST_COMPLETIONS,
        load_question_harm_data,
        load_xstest_completions,
        pipeline_benchmark_path,
    )
    from isara.judges import JUDGE_FILE, LEARNED_FILE, fit_question_harm, train_learned_judge

    start = time.perf_counter()
    files = [pipeline_benchmark_path(rel, benchmarks_dir) for rel in XSTEST_COMPLETIONS]  # errors before any write
    harm_data = load_question_harm_data(benchmarks_dir)
    with atomic_directory(out_dir) as tmp:  # the whole folder or nothing: a crash never leaves half a judge
        if benchmarks_dir is None:
            print("judge: no benchmark data (params benchmarks.dir is null): string matching judges every response",
                  flush=True)
            info = {"learned": False}
            metrics = {"learned": False, "selected": "strmatch", "data": None}
        else:
            rows = [r for path in files for r in load_xstest_completions(path)]
            judge, report = train_learned_judge(rows, seed=cfg.seed, test_fraction=cfg.test_fraction)
            judge.save(tmp / LEARNED_FILE)
            info = {"learned": True, **report.model_dump(mode="json")}
            metrics = {"learned": True, **{k: v for k, v in info.items() if k not in ("learned", "test_prompt_ids")}}
            metrics["selected"] = "learned" if report.learned_agreement > report.strmatch_agreement else "strmatch"
            metrics["data"] = f"{benchmarks_dir}/xstest"  # as params.yaml names it
        harm = fit_question_harm(harm_data, tmp, seed=cfg.seed, test_fraction=cfg.test_fraction)
        info.update(harm)
        metrics.update(harm)
        write_json(tmp / JUDGE_FILE, info)
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    write_json(metrics_path, metrics)
    return metrics
