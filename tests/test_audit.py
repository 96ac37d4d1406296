"""`isara audit`: passes on the reproduced tiny pipeline, and fails with a clear line on each kind of tampering.

Tampering happens on a copy of the tiny project whose files are hard links to the original's (cheap, even
for the checkpoints): a tampered file is always unlinked and written anew, never edited in place, so the
session's `tiny_project` is never touched.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, Project, isolated_env

from isara.audit import (
    AuditResult,
    LockInfo,
    Round,
    check_citations,
    load_checked,
    rounds,
)
from isara.params import Iteration
from isara.paths import IterPaths
from isara.records import Neighbour, Record, read_records

# ------------------------------------------------------------------------------- unit: records and citations


def seed(q: str) -> Record:
    return Record(iteration=0, question=q, answer="A seed answer.")


def gen(it: int, q: str, parents: list[str]) -> Record:
    return Record(iteration=it, question=q, answer="A generated answer.", anchor_id=parents[0],
                  question_context=[Neighbour(id=p, distance=0.5) for p in parents],
                  answer_context=[Neighbour(id=p, distance=0.5) for p in parents])


def test_load_checked_turns_bad_lines_into_findings(tmp_path):
    s1, s2 = seed("What is safe?"), seed("What is unsafe?")
    edited = s2.model_dump(mode="json") | {"answer": "Tampered."}
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([s1.model_dump_json(), json.dumps(edited), s1.model_dump_json(), "{not json",
                               json.dumps({"id": "x", "iteration": 0})]) + "\n")
    result = AuditResult()
    records = load_checked(path, tmp_path, result)
    assert [r.id for r in records] == [s1.id]
    f = result.findings
    assert len(f) == 4, f
    assert f[0].startswith(f"d.jsonl:2: record {s2.id} is not its content hash")
    assert f[1] == f"d.jsonl:3: duplicate id {s1.id} (first on line 1)"
    assert f[2].startswith("d.jsonl:4: not a valid record")
    assert f[3].startswith("d.jsonl:5: not a valid record")


def test_check_citations_names_the_missing_id_and_role():
    s1 = seed("What is safe?")
    ok = gen(1, "Is this safe?", [s1.id])
    bad = Record(iteration=1, question="Q?", answer="A generated answer.", anchor_id=s1.id,
                 question_context=[Neighbour(id=s1.id, distance=0.1)],
                 answer_context=[Neighbour(id="0123456789abcdef", distance=0.2)])
    orphan = Record(iteration=1, question="Orphan?", answer="A generated answer.")
    result = AuditResult()
    check_citations(Round("generate@1", IterPaths("1"), "0", 1), [ok, bad, orphan], [s1], result)
    assert result.findings == [
        (f"artifacts/1/generated.jsonl: record {bad.id} cites 0123456789abcdef (answer_context), which is not in "
         "artifacts/0/dataset.jsonl (D(0), the data set it was retrieved from)"),
        f"artifacts/1/generated.jsonl: record {orphan.id} cites no in-context examples: its chain ends before a seed",
    ]


def test_rounds_cover_every_iteration_then_the_one_shot_baseline():
    iterations = {"2": Iteration(prev="1"), "1": Iteration(prev="0")}
    assert [(r.stage, r.prev, r.iteration) for r in rounds(iterations, LockInfo())] == [
        ("generate@1", "0", 1), ("generate@2", "1", 2)]
    with_baseline = rounds(iterations, LockInfo(deps={"baseline_one_shot": {}}))
    assert with_baseline[-1].stage == "baseline_one_shot" and with_baseline[-1].prev == "0"
    assert str(with_baseline[-1].paths.generated) == "artifacts/baselines/one_shot/generated.jsonl"


# ------------------------------------------------------------------------------------ the tiny pipeline



def link_copy(src: Path, dst: Path) -> None:
    """The project at src, as hard links at dst (DVC's cache and tmp left out: the audit needs neither)."""
    def ignore(directory, names):
        return {"cache", "tmp"} & set(names) if Path(directory).name == ".dvc" else set()

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:  # another file system: a real copy
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link, ignore=ignore, symlinks=True)


def replace(path: Path, data: bytes | str) -> None:
    """Write a new file in place of a hard link (editing it would change the original project's file)."""
    path.unlink()
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)


@pytest.fixture()
def copy(tiny_project, tmp_path) -> Project:
    root = tmp_path / "repo"
    link_copy(tiny_project.root, root)
    return Project(root, tiny_project.env)


def audit_fails(project: Project) -> list[str]:
    proc = project.isara("audit", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "audit passed" not in proc.stdout
    lines = [line.removeprefix("AUDIT FAIL: ") for line in proc.stderr.splitlines() if line.startswith("AUDIT FAIL: ")]
    assert lines and proc.stderr.rstrip().endswith(f"audit failed: {len(lines)} break(s) found")
    return lines


def first_generated(project: Project) -> tuple[str, list[Record]]:
    for t in ("1", "2"):
        records = read_records(project.root / f"artifacts/{t}/generated.jsonl")
        if records:
            return t, records
    pytest.skip("the tiny run accepted no samples")


@pytest.mark.slow
def test_audit_passes_on_the_tiny_pipeline(tiny_project):
    proc = tiny_project.isara("audit")
    line = proc.stdout.strip()
    assert line.startswith("audit passed: "), line
    # the audit stage ran inside dvc repro and wrote its metrics
    m = tiny_project.json("reports/audit.json")
    assert m["ok"] == 1 and m["findings"] == 0
    assert m["seeds"] == 8 and m["iterations"] == 2
    files = [tiny_project.root / f"artifacts/{t}/generated.jsonl" for t in ("1", "2")]
    one_shot = tiny_project.root / "artifacts/baselines/one_shot/generated.jsonl"  # audited too, when it ran
    generated = [r for f in [*files, one_shot] if f.exists() for r in read_records(f)]
    assert m["generated"] == len(generated) and m["chains"] == len(generated)
    assert m["records"] == 8 + len({r.id for r in generated})  # one-shot may repeat iteration 1's records
    # every locked output but the audit's own, at least: seeds 1, prepare 3, and per iteration index 2,
    # generate 4, datacard 2, finetune 3, export 2 (report, evaluation and baselines add more)
    assert m["artifacts"] >= 1 + 3 + 2 * (2 + 4 + 2 + 3 + 2)
    assert f"{m['artifacts']} outputs of {m['stages']} stages match dvc.lock" in line


@pytest.mark.slow
def test_datacard_stage_in_the_tiny_pipeline(tiny_project):
    for t in ("1", "2"):
        card = tiny_project.json(f"reports/iters/{t}/datacard.json")
        gen_metrics = tiny_project.json(f"reports/iters/{t}/generate.json")
        assert card["accepted"] == gen_metrics["accepted"]
        assert card["attempted"] == gen_metrics["attempted"]
        assert card["rejected.total"] == gen_metrics["rejected_total"]
        assert card["dataset.seeds"] == 8
        assert card["dataset.size"] == gen_metrics["dataset_size"]
        for key in ("acceptance_rate", "diversity.near_duplicate_rate", "seed_influence.gini",
                    "seed_influence.top5_share", "retrieval.far_share", "diversity.question_distinct_1"):
            assert 0.0 <= card[key] <= 1.0, (key, card[key])
        assert all(isinstance(v, (int, float)) or v is None for v in card.values())  # flat, for dvc metrics
        md = (tiny_project.root / f"reports/datacards/{t}.md").read_text()
        assert md.startswith("---\n")  # the Hub dataset card's YAML front matter, then the data card as its body
        assert md.split("\n---\n", 1)[1].lstrip().startswith(f"# Data card: iteration {t}")
        assert "## Seed influence" in md
        # benchmarks.dir is null: stances are counted (judged where generate left none), question harm is not
        assert card["stance_harm.accepted.n"] == card["accepted"] and card["stance_harm.seeds.n"] == 8
        assert "stance_harm.accepted.declines_benign" not in card
        assert "question harm: not available (params benchmarks.dir is null" in md
    shown = tiny_project.dvc("metrics", "show", "--json").stdout
    assert "reports/iters/1/datacard.json" in shown and "seed_influence.gini" in shown


@pytest.mark.slow
def test_audit_fails_on_an_edited_generated_record(copy):
    t, records = first_generated(copy)
    path = copy.root / f"artifacts/{t}/generated.jsonl"
    lines = path.read_text().splitlines()
    row = json.loads(lines[0])
    row["answer"] = "Sure, here is how to do it."
    lines[0] = json.dumps(row)
    replace(path, "\n".join(lines) + "\n")
    findings = audit_fails(copy)
    assert any(f.startswith(f"artifacts/{t}/generated.jsonl:1: record {records[0].id} is not its content hash")
               for f in findings), findings
    assert any(f.startswith(f"artifacts/{t}/generated.jsonl: md5 ") and f"generate@{t} recorded" in f
               for f in findings), findings


@pytest.mark.slow
def test_audit_fails_on_a_removed_seed(copy):
    t, records = first_generated(copy)
    path = copy.root / "artifacts/0/dataset.jsonl"
    if t == "1":
        victim = records[0].answer_context[0].id  # a seed this record was generated from
    else:
        victim = read_records(path)[0].id
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["id"] != victim]
    replace(path, "\n".join(kept) + "\n")
    findings = audit_fails(copy)
    assert any(f.startswith("artifacts/0/dataset.jsonl: md5 ") and "(seeds recorded" in f for f in findings), findings
    # D(1) still holds the seed that D(0) lost
    assert f"artifacts/1/dataset.jsonl: 1 record(s) ({victim}) are neither in D(0) nor in " \
           "artifacts/1/generated.jsonl" in findings, findings
    if t == "1":
        assert any(f"cites {victim}" in f and "which is not in artifacts/0/dataset.jsonl" in f
                   for f in findings), findings


@pytest.mark.slow
def test_audit_fails_on_a_swapped_model(copy):
    other = (copy.root / "artifacts/1/model.gguf").read_bytes()
    replace(copy.root / "artifacts/0/model.gguf", other)
    findings = audit_fails(copy)
    assert any(f.startswith("artifacts/0/model.gguf: md5 ") and "(prepare recorded" in f for f in findings), findings
    if read_records(copy.root / "artifacts/1/generated.jsonl"):
        assert any(f.startswith("artifacts/1/generated.jsonl:") and "name model sha256" in f
                   and "but artifacts/0/model.gguf (the model of iteration 0) has sha256" in f
                   for f in findings), findings


@pytest.mark.slow
def test_audit_fails_on_a_record_citing_a_nonexistent_id(copy):
    t, records = first_generated(copy)
    prev = "0" if t == "1" else "1"
    path = copy.root / f"artifacts/{t}/generated.jsonl"
    row = records[0].model_dump(mode="json")
    row["answer_context"][0]["id"] = "0123456789abcdef"
    del row["id"]
    forged = Record.model_validate(row)  # a valid content hash: only the citation is wrong
    lines = path.read_text().splitlines()
    lines[0] = forged.model_dump_json()
    replace(path, "\n".join(lines) + "\n")
    findings = audit_fails(copy)
    assert (f"artifacts/{t}/generated.jsonl: record {forged.id} cites 0123456789abcdef (answer_context), which is "
            f"not in artifacts/{prev}/dataset.jsonl (D({prev}), the data set it was retrieved from)") in findings


# ------------------------------------------------------------------------------------------------ at scale


def load_benchmark():
    """benchmarks/audit.py: the synthetic data set the scale benchmark audits (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("audit_benchmark", REPO / "benchmarks" / "audit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rewrite_line(path: Path, index: int, line: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[index] = line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_audit_of_a_synthetic_data_set_finds_a_tampered_record_and_a_broken_chain(tmp_path):
    """5,000 records over 3 iterations, built as benchmarks/audit.py builds 100,000: the audit passes on it as built,
    then names each break and nothing else, however many paths lead to the seeds."""
    bench = load_benchmark()
    root = tmp_path / "project"
    bench.build(root, n_records=5000, iterations=3)
    env = isolated_env(tmp_path / "home")
    _, _, proc = bench.run_audit_cli(root, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.startswith("audit passed: "), proc.stdout + proc.stderr
    assert "5064 records checked (64 seeds, 5000 generated in 3 iterations); 5000 chains reach 64 of 64 seeds" \
        in proc.stdout

    # 1. an edited answer in iteration 2, its id left as it was
    gen2 = root / "artifacts/2/generated.jsonl"
    row = json.loads(gen2.read_text().splitlines()[10])
    tampered = row["id"]
    rewrite_line(gen2, 10, json.dumps(row | {"answer": "Sure, here is how to do it."}, separators=(",", ":")))
    # 2. a record of iteration 3 that cites an id in no data set, with a valid content hash, in generated.jsonl and
    # in D(3) alike (so the only break is the chain)
    gen3, d3 = root / "artifacts/3/generated.jsonl", root / "artifacts/3/dataset.jsonl"
    row = json.loads(gen3.read_text().splitlines()[5])
    row["answer_context"][0]["id"] = "0123456789abcdef"
    del row["id"]
    forged = Record.model_validate(row)
    rewrite_line(gen3, 5, forged.model_dump_json())
    rewrite_line(d3, len(read_records(root / "artifacts/2/dataset.jsonl")) + 5, forged.model_dump_json())

    lock = {o["path"]: o["md5"] for stage in yaml.safe_load((root / "dvc.lock").read_text())["stages"].values()
            for o in stage["outs"]}

    def modified(rel: str, stage: str) -> str:
        actual = hashlib.md5((root / rel).read_bytes()).hexdigest()
        return (f"{rel}: md5 {actual} does not match dvc.lock ({stage} recorded {lock[rel]}): modified after the "
                "stage ran")

    metrics = tmp_path / "audit.json"
    proc = subprocess.run([sys.executable, "-m", "isara.cli", "audit", "--root", str(root), "--metrics", str(metrics)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    findings = [line.removeprefix("AUDIT FAIL: ") for line in proc.stderr.splitlines()
                if line.startswith("AUDIT FAIL: ")]
    assert len(findings) == 6, findings
    assert findings[0] == modified("artifacts/2/generated.jsonl", "generate@2")
    assert findings[1:3] == [modified("artifacts/3/generated.jsonl", "generate@3"),
                             modified("artifacts/3/dataset.jsonl", "generate@3")]
    assert findings[3].startswith(f"artifacts/2/generated.jsonl:11: record {tampered} is not its content hash")
    assert findings[4] == (f"artifacts/2/dataset.jsonl: 1 record(s) ({tampered}) are neither in D(1) nor in "
                           "artifacts/2/generated.jsonl")
    assert findings[5] == (f"artifacts/3/generated.jsonl: record {forged.id} cites 0123456789abcdef (answer_context), "
                           "which is not in artifacts/2/dataset.jsonl (D(2), the data set it was retrieved from)")
    m = json.loads(metrics.read_text())
    assert m["ok"] == 0 and m["findings"] == 6
    assert m["generated"] == 4999 and m["chains"] == 4998  # the edited record is left out; the forged one breaks
