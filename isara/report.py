"""report stage: pipeline-wide metrics from every iteration's metric files (reports/iters/<t>/*.json).

It depends on the whole reports/iters folder, which is how DVC aggregates over a foreach loop.
"""

from __future__ import annotations

import json
from pathlib import Path

from isara.paths import ITER_REPORTS, REPORTS, iter_paths
from isara.records import write_json

import click

from isara.console import echo_metrics, guard, stage_params

SUMMARY = REPORTS / "summary.json"


def read_iteration_metrics(root: Path = ITER_REPORTS) -> dict[str, dict[str, dict]]:
    """{iteration: {stage: metrics}} for every iteration folder, in iteration order."""
    out: dict[str, dict[str, dict]] = {}
    if not root.is_dir():
        return out
    for folder in sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        out[folder.name] = {f.stem: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))}
    return out


def summarize(per_iteration: dict[str, dict[str, dict]], seed_count: int) -> dict:
    sizes = {it: m["generate"]["dataset_size"] for it, m in per_iteration.items() if "generate" in m}
    last = list(sizes)[-1] if sizes else None
    summary: dict = {
        "seed_size": seed_count,
        "final_dataset_size": sizes[last] if last else seed_count,
        "scaling_ratio": round((sizes[last] if last else seed_count) / seed_count, 4),
        "dataset_size": sizes,
        "final_train_loss": None,
        "seconds": {},
    }
    for it, stages in per_iteration.items():
        if "finetune" in stages:
            summary["final_train_loss"] = stages["finetune"]["final_loss"]
        for stage, metrics in stages.items():
            if "seconds" in metrics:
                summary["seconds"][f"{stage}@{it}"] = metrics["seconds"]
    summary["total_seconds"] = round(sum(summary["seconds"].values()), 2)
    return summary


def run_report(seed_dataset: Path) -> dict:
    seed_count = sum(1 for line in Path(seed_dataset).read_text(encoding="utf-8").splitlines() if line.strip())
    summary = summarize(read_iteration_metrics(), seed_count)
    write_json(SUMMARY, summary)
    return summary


@click.command("report")
def command() -> None:
    """report stage: pipeline-wide metrics (data set growth, scaling ratio, losses, stage times)."""
    stage_params()  # validate before work, like every stage
    echo_metrics("report", guard(run_report, iter_paths(0).dataset))
