"""Parallel experiments from DVC's queue (issue 14): `dvc exp run --queue` over two seed sets, `dvc queue start -j 2`,
then `dvc exp show` comparing them. Each experiment runs in its own copy under .dvc/tmp/exps and must import that
copy's code (DESIGN.md §4). They run on the shared tiny project up to generate@1, the first stage that turns seeds
into new data: prepare comes from the cache, every stage after it reads the seed file."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import COMMAND_TIMEOUT, SEEDS, write_seed_subset

pytestmark = [pytest.mark.slow, pytest.mark.mutates_tiny_project]

# Two seed sets neither the tiny repro nor another test has run, so both experiments really run (nothing from the
# run-cache).
SEED_SETS = {"seeds-mixed": "safety_mixed", "seeds-wide": "safety_wide"}


def wait_for_queue(project, names: set[str], timeout: float) -> dict[str, str]:
    """Poll `dvc queue status` until every named task has ended; name -> its status row."""
    deadline = time.monotonic() + timeout
    while True:
        status = project.dvc("queue", "status").stdout
        rows = {name: line for line in status.splitlines() for name in names if f" {name} " in f" {line} "}
        if len(rows) == len(names) and all("Success" in r or "Failed" in r for r in rows.values()):
            return rows
        assert time.monotonic() < deadline, f"queued experiments still running after {timeout:.0f} s:\n{status}"
        time.sleep(5)


def test_queue_with_two_workers_compares_two_seed_sets(tiny_project):
    project = tiny_project
    project.run("git", "checkout", "--", "params.yaml")  # undo earlier workspace experiments' params
    paths = {}
    for name, source in SEED_SETS.items():
        paths[name] = f"data/seeds/tiny_{source}.jsonl"
        write_seed_subset(SEEDS / f"{source}.jsonl", project.root / paths[name], 8)
    project.run("git", "add", *paths.values())
    project.run("git", "commit", "-qm", "two more tiny seed sets")
    for name, path in paths.items():
        # one llama.cpp thread per worker, as the README says for -j 2 on 2 cores: with the default 2 threads each,
        # the four spinning threads made the same two runs 3x slower (312 s against 104 s, identical completions)
        project.dvc("exp", "run", "--queue", "-n", name, "-S", f"seeds.path={path}", "-S", "+engine.n_threads=1",
                    "generate@1")
    # `dvc queue start` leaves background workers that keep its stdout open (as in test_pipeline.py's queued run):
    # log to a file, poll the tasks, stop the workers.
    log = project.root.parent / "queue-start-2.log"
    start = time.monotonic()
    with log.open("w") as out:
        subprocess.Popen([sys.executable, "-m", "dvc", "queue", "start", "-j", "2"], cwd=project.root,
                         env=project.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rows = wait_for_queue(project, set(paths), COMMAND_TIMEOUT)
    finally:
        project.dvc("queue", "stop", check=False)
    print(f"queue of {len(paths)} experiments with 2 workers: {time.monotonic() - start:.0f} s")
    for name, row in rows.items():
        logs = project.dvc("queue", "logs", name, check=False)
        assert "Success" in row, f"{name}: {row}\n{logs.stdout}\n{logs.stderr}\n{log.read_text()}"
        # each ran its own stages: the seed file changed, so seeds, index@1 and generate@1 ran, prepare did not
        ran = {line.split("'")[1] for line in logs.stdout.splitlines() if line.startswith("Running stage '")}
        assert {"seeds", "index@1", "generate@1"} <= ran and "prepare" not in ran, (name, ran)

    shown = json.loads(project.dvc("exp", "show", "--json").stdout)
    experiments = {e["name"]: e for row in shown for e in row.get("experiments") or [] if e.get("name") in paths}
    assert sorted(experiments) == sorted(paths), shown  # one row per queued seed set
    data = {name: e["revs"][0]["data"] for name, e in experiments.items()}
    for name, path in paths.items():
        d = data[name]
        assert d["params"]["params.yaml"]["data"]["seeds"]["path"] == path
        assert path in d["deps"], sorted(d["deps"])  # each run read its own seed file
        generated = d["metrics"]["reports/iters/1/generate.json"]["data"]  # the later stages' metrics: not run
        assert generated["accepted"] >= 1, generated
    # Where the seed sets differ, so do the runs: the seed records, hence every id generated from them.
    a, b = (data[name] for name in paths)
    assert a["outs"]["artifacts/0/dataset.jsonl"]["hash"] != b["outs"]["artifacts/0/dataset.jsonl"]["hash"]
    assert a["outs"]["artifacts/1/generated.jsonl"]["hash"] != b["outs"]["artifacts/1/generated.jsonl"]["hash"]
