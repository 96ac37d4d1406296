"""generate on the real SmolLM2 GGUF through llama.cpp and the real MiniLM: records, filters, resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, SEEDS, write_seed_subset
from isara.base_models import base_model_path
from isara.records import read_records

pytestmark = pytest.mark.slow

PARAMS = """\
seeds: {path: seeds.jsonl}
iterations: {"1": {prev: "0"}}
index: {n_trees: 4}
generate: {n_samples: 3, max_attempts: 30, k_question: 3, k_answer: 3, max_question_tokens: 48,
           max_answer_tokens: 96, n_ctx: 1024, n_threads: 1, seed: 3}
"""


def workspace(root):
    """artifacts/0 (8 seeds, the base GGUF) and index@1, built with the real CLI."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(PARAMS)
    write_seed_subset(SEEDS / "safety.jsonl", root / "seeds.jsonl", 8)
    (root / "artifacts/0").mkdir(parents=True)
    shutil.copy(base_model_path("smollm2"), root / "artifacts/0/model.gguf")
    for args in (["seeds"], ["index", "1"]):
        cli(root, *args)
    return root


def cli(root, *args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DVC_STAGE", None)
    return subprocess.run([sys.executable, "-m", "isara.cli", *args], cwd=root, env=env, text=True,
                          capture_output=True, check=kw.get("check", True), timeout=kw.get("timeout", 900))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = workspace(tmp_path_factory.mktemp("gen") / "ref")
    cli(root, "generate", "1")
    return root


def test_generated_records_carry_lineage(reference):
    seeds = {r.id for r in read_records(reference / "artifacts/0/dataset.jsonl")}
    generated = read_records(reference / "artifacts/1/generated.jsonl")
    assert len(generated) == 3
    for r in generated:
        assert r.iteration == 1 and set(r.parent_ids()) <= seeds
        assert len(r.question_context) == 3 and len(r.answer_context) == 3
        assert r.raw_question.strip() == r.question and r.raw_answer.strip() == r.answer
        assert r.question_sampling.seed != r.answer_sampling.seed
    dataset = read_records(reference / "artifacts/1/dataset.jsonl")
    assert [r.id for r in dataset][-3:] == [r.id for r in generated]
    assert {r.id for r in dataset[:-3]} == seeds
    assert not (reference / "checkpoints").exists() or not any((reference / "checkpoints").iterdir())


def test_batched_engine_writes_what_the_sequential_one_writes(reference, tmp_path):
    """The batched engine decodes 8 attempts together (isara.batched); the reference, one completion after
    another (the default engine), must have written the very same accepted and rejected records, byte for byte."""
    root = workspace(tmp_path / "batched")
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("seed: 3}", "seed: 3, engine: batched}"))
    cli(root, "generate", "1")
    for name in ("generated.jsonl", "rejected.jsonl", "dataset.jsonl"):
        assert (root / "artifacts/1" / name).read_bytes() == (reference / "artifacts/1" / name).read_bytes(), name


def test_killed_generate_resumes_to_identical_records(reference, tmp_path):
    root = workspace(tmp_path / "killed")
    # The batched engine in batches of 2 attempts: the log grows batch by batch, and neither the kill nor the
    # engine may change the records (the reference ran sequentially).
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("seed: 3}", "seed: 3, engine: batched, batch_size: 2}"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "isara.cli", "generate", "1"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    logs = []
    while time.time() < deadline and proc.poll() is None:
        logs = list((root / "checkpoints").glob("generate@1-*.jsonl")) if (root / "checkpoints").exists() else []
        if logs and logs[0].read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "generate finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "artifacts/1/generated.jsonl").exists(), "a killed run must not leave outputs"
    done_before = logs[0].read_text().count("\n")

    out = cli(root, "generate", "1").stdout
    resumed = int(re.search(r"resumed_attempts=(\d+)", out).group(1))
    assert resumed >= done_before >= 2, out
    for name in ("generated.jsonl", "rejected.jsonl", "dataset.jsonl"):
        assert (root / "artifacts/1" / name).read_bytes() == (reference / "artifacts/1" / name).read_bytes(), name


def test_attempt_budget_stops_with_warning_and_metric(tmp_path):
    root = workspace(tmp_path / "budget")
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("n_samples: 3, max_attempts: 30", "n_samples: 5, max_attempts: 5")
                      .replace("max_answer_tokens: 96", "max_answer_tokens: 8"))  # every answer is cut short
    proc = cli(root, "generate", "1")
    assert "accepted 0 of 5 samples within max_attempts=5" in proc.stderr
    metrics = json.loads((root / "reports/iters/1/generate.json").read_text())
    assert metrics["attempted"] == 5 and metrics["accepted"] == 0 and metrics["shortfall"] == 5
    assert sum(metrics["rejected"].values()) == 5


def test_k_larger_than_the_seed_set_is_a_clear_error(tmp_path):
    root = workspace(tmp_path / "bigk")
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("k_question: 3", "k_question: 9"))
    proc = cli(root, "generate", "1", check=False)
    assert proc.returncode == 1
    assert "generate.k_question = 9 is larger than the data set it retrieves from (8 records in" in proc.stderr
    assert not (root / "artifacts/1/generated.jsonl").exists()
