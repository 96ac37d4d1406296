"""End to end: the real pipeline (llama.cpp, MiniLM, torch, DVC) at tiny settings in a temp git repo."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from conftest import COMMAND_TIMEOUT, SHARED_BENCHMARKS, stages_run

from isara.records import Record, read_records

pytestmark = pytest.mark.slow

LOOPED = ["index", "generate", "finetune", "export", "datacard", "evaluate", "truthfulqa"]


def test_repro_builds_every_artifact(tiny_project):
    root = tiny_project.root
    for it in ("1", "2"):
        for name in ("index", "generated.jsonl", "dataset.jsonl", "hf", "model.gguf"):
            assert (root / "artifacts" / it / name).exists(), f"artifacts/{it}/{name} missing"
    summary = tiny_project.json("reports/summary.json")
    assert summary["seed_size"] == 8
    sizes = summary["dataset_size"]
    assert sizes["1"] > 8 and sizes["2"] > sizes["1"], sizes
    assert summary["scaling_ratio"] == pytest.approx(sizes["2"] / 8, abs=1e-4)
    gen = tiny_project.json("reports/iters/1/generate.json")
    assert gen["attempted"] == gen["accepted"] + gen["rejected_total"]


def test_dvc_stage_list_has_one_stage_per_iteration(tiny_project):
    names = {line.split()[0] for line in tiny_project.dvc("stage", "list").stdout.splitlines() if line.strip()}
    for stage in LOOPED:
        assert {n for n in names if n.startswith(stage + "@")} == {f"{stage}@1", f"{stage}@2"}
    assert {"seeds", "prepare", "report"} <= names


def test_runs_without_benchmark_data_and_says_so(tiny_project):
    """The tiny project is a user's clone: nothing beside it, params benchmarks.dir null. The pipeline completes,
    each stage that would read benchmark data says so in one line, and the report names the fallback judge."""
    assert not (tiny_project.root.parent / "shared").exists()
    out = tiny_project.repro.stdout
    assert "judge: no benchmark data (params benchmarks.dir is null)" in out
    assert out.count("truthfulqa: not run: no benchmark data") == 3  # truthfulqa_base, truthfulqa@1, truthfulqa@2
    assert tiny_project.json("reports/judge.json")["selected"] == "strmatch"
    assert tiny_project.json("reports/iters/2/truthfulqa.json")["skipped"].startswith("not run")
    md = (tiny_project.root / "reports/report.md").read_text()
    assert "Refusal judge: string matching (isara.judges.is_refusal) only: no benchmark data" in md
    assert "TruthfulQA MC1/MC2: not run: no benchmark data" in md
    assert "Eval prompts: harmful `" in md and "data/eval/harmful.jsonl` (eval)" in md


def test_generated_records_validate_and_trace_to_seeds(tiny_project):
    root = tiny_project.root
    seeds = {r.id for r in read_records(root / "artifacts/0/dataset.jsonl")}
    gen1 = {r.id for r in read_records(root / "artifacts/1/generated.jsonl")}
    gen2 = read_records(root / "artifacts/2/generated.jsonl")
    assert gen2, "iteration 2 accepted nothing"
    for r in gen2:
        assert isinstance(r, Record) and r.iteration == 2
        assert r.model_sha256 and len(r.model_sha256) == 64
        # iteration 2 retrieves from D1 = seeds + iteration-1 samples
        assert set(r.parent_ids()) <= seeds | gen1
    out = tiny_project.isara("lineage", gen2[0].id).stdout
    assert out.splitlines()[0].startswith(gen2[0].id)
    assert "[seed]" in out
    assert re.search(r"reaches [1-9]\d* seed\(s\)", out)
    ids_in_tree = set(re.findall(r"\b[0-9a-f]{16}\b", out))
    assert ids_in_tree & seeds


def test_lineage_unknown_id_is_a_clear_error(tiny_project):
    proc = tiny_project.isara("lineage", "ffffffffffffffff", check=False)
    assert proc.returncode == 1
    assert "no record with id 'ffffffffffffffff'" in proc.stderr


def test_second_repro_runs_nothing(tiny_project):
    proc = tiny_project.dvc("repro")
    assert stages_run(proc.stdout) == set()


@pytest.mark.mutates_tiny_project
def test_param_change_reruns_only_the_stages_that_read_it(tiny_project):
    """A param reruns the stages that declare its section and what depends on their outputs, nothing upstream.
    A datacard param, because a finetune one reruns most of the pipeline (218 s of the CI budget) to show the same
    DVC mechanism; tests/test_dvc_deps.py checks every stage's declared params."""
    params = tiny_project.root / "params.yaml"
    params.write_text(params.read_text().replace("datacard: {n_examples: 2}", "datacard: {n_examples: 1}"))
    ran = stages_run(tiny_project.dvc("repro").stdout)
    assert {"datacard@1", "datacard@2"} <= ran
    assert not ran & {"seeds", "prepare", "index@1", "generate@1", "finetune@1", "export@1", "generate@2",
                      "finetune@2", "evaluate@2"}, ran


@pytest.mark.mutates_tiny_project
def test_exp_run_with_second_seed_set(tiny_project):
    tiny_project.run("git", "commit", "-qam", "datacard.n_examples 1")
    # Up to generate@1 keeps the test short: enough to show the other seed set flowing into generation.
    tiny_project.dvc("exp", "run", "-n", "alt-seeds", "-S", "seeds.path=data/seeds/tiny_alt.jsonl", "generate@1")
    show = tiny_project.dvc("exp", "show", "--no-pager", "--md").stdout
    assert "alt-seeds" in show
    assert "tiny_alt.jsonl" in show and "tiny.jsonl" in show


@pytest.mark.mutates_tiny_project
@pytest.mark.skipif(not (SHARED_BENCHMARKS / "xstest").is_dir(), reason="no benchmark files (ISARA_BENCHMARKS_DIR)")
def test_queued_experiment_reads_benchmarks_through_a_relative_path(tiny_project):
    """`dvc exp run --queue` + `dvc queue start`: the experiment runs in a copy under .dvc/tmp/exps, where a relative
    benchmarks.dir like ../benchmarks would point nowhere; it must still find the folder beside the project, train
    the learned judge on it and score TruthfulQA."""
    link = tiny_project.root.parent / "benchmarks"
    link.symlink_to(SHARED_BENCHMARKS, target_is_directory=True)
    tiny_project.run("git", "checkout", "--", "params.yaml")  # undo the earlier workspace experiment's params
    # Only the stages this test reads: benchmarks is a param of every evaluate and baseline stage too, and rerunning
    # those (two fine-tunes among them) took most of this test's 445 s in CI.
    tiny_project.dvc("exp", "run", "--queue", "-n", "bench", "-S", "benchmarks.dir=../benchmarks",
                     "judge", "truthfulqa", "truthfulqa_base")
    # `dvc queue start` hands the queue to a background worker that inherits its stdout and stays up when idle, so
    # reading its output would never end: log it to a file, poll the task's status, then stop the worker.
    log = tiny_project.root.parent / "queue-start.log"
    with log.open("w") as out:
        subprocess.Popen([sys.executable, "-m", "dvc", "queue", "start", "-j", "1"], cwd=tiny_project.root,
                         env=tiny_project.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while True:
            status = tiny_project.dvc("queue", "status").stdout
            row = next((line for line in status.splitlines() if " bench " in line), "")
            if "Success" in row or "Failed" in row:
                break
            assert time.monotonic() < deadline, f"queued experiment still running:\n{status}"
            time.sleep(10)
    finally:
        tiny_project.dvc("queue", "stop", check=False)
    logs = tiny_project.dvc("queue", "logs", "bench", check=False)
    assert "Success" in row, f"{status}\n{logs.stdout}\n{logs.stderr}\n{log.read_text()}"
    exps = json.loads(tiny_project.dvc("exp", "show", "--json").stdout)
    runs = [e for row in exps for e in row.get("experiments") or [] if e.get("name") == "bench"]
    assert runs, exps
    data = runs[0]["revs"][0]["data"]
    # the stages this experiment did not run left no metrics file in its copy: exp show reports an error for those
    metrics = {path: m["data"] for path, m in data["metrics"].items() if "data" in m}
    judge = metrics["reports/judge.json"]
    assert judge["learned"] is True and judge["data"].endswith("xstest"), judge
    for rel in ("reports/baselines/base/truthfulqa.json", "reports/iters/1/truthfulqa.json",
                "reports/iters/2/truthfulqa.json"):
        m = metrics[rel]
        assert m["n_questions"] == 2 and 0 <= m["mc1"] <= 1 and 0 < m["mc2"] < 1, (rel, m)
    assert data["params"]["params.yaml"]["data"]["benchmarks"]["dir"] == "../benchmarks"
