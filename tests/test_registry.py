"""The get-started convention on the reproduced tiny pipeline (issue 14):

- dvc.lock and every output DVC does not cache (metrics, plots, report, data cards) committed to git, so a fresh
  clone shows the run's numbers with `dvc metrics show` / `dvc exp show` and `dvc metrics diff` compares against
  them, without running or pulling anything;
- the models declared in dvc.yaml's `artifacts:` (DVC's model registry), registered with a GTO version tag and read
  back with `dvc artifacts get`, which must return the bytes dvc.lock records.

Both work on a git clone of the session's tiny project (its workspace and git state are never touched).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, Project

pytestmark = pytest.mark.slow

# Lists, from the project's own dvc.yaml via DVC, the paths the convention commits: every output DVC does not cache,
# and every metrics / plots output whether cached or not (a cached one is git-ignored by DVC, so `git add` fails).
COMMITTED_OUTPUTS = """\
from dvc.repo import Repo
with Repo(".") as repo:
    for stage in repo.index.stages:
        for out in stage.outs:
            if not out.use_cache or out.metric or out.plot:
                print(out.def_path)
"""
# The registry as DVC reads it (artifacts' meta is templated from params.yaml).
READ_ARTIFACTS = """\
import json
from dvc.repo import Repo
with Repo(".") as repo:
    print(json.dumps({name: a.to_dict() for name, a in repo.artifacts.read()["dvc.yaml"].items()}))
"""
REGISTERED = {"isara-aligned": "v1.0.0", "baseline-sft-seed-hf": "v1.0.0"}


def link_tree(src: Path, dst: Path) -> None:
    """src's files as hard links at dst: DVC's cache files are read-only and never edited in place."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link, dirs_exist_ok=True)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def published(tiny_project, tmp_path_factory) -> Project:
    """A clone of the tiny project whose last commit holds the run's dvc.lock and uncached outputs, as the
    maintainers commit the default run's, with two models registered (GTO tags) and the run's DVC cache."""
    root = tmp_path_factory.mktemp("published") / "repo"
    tiny_project.run("git", "clone", "-q", str(tiny_project.root), str(root))
    project = Project(root, tiny_project.env)
    outputs = project.run(sys.executable, "-c", COMMITTED_OUTPUTS).stdout.split()  # the clone's dvc.yaml: the same
    # DVC writes a .gitignore beside every cached output: part of the commit, so the clone ignores the artifacts.
    ignores = tiny_project.run("git", "ls-files", "--others", "--exclude-standard", "--", "*.gitignore").stdout.split()
    assert ignores, "dvc repro wrote no .gitignore for its cached outputs"
    for rel in ["dvc.lock", *outputs, *ignores]:
        src, dst = tiny_project.root / rel, root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    link_tree(tiny_project.root / ".dvc" / "cache", root / ".dvc" / "cache")
    project.run("git", "add", "dvc.lock", *outputs, *ignores)  # fails if any of them is git-ignored
    project.run("git", "commit", "-q", "-m", "default run: dvc.lock and metrics")
    for name, version in REGISTERED.items():
        project.run("git", "tag", "-a", f"{name}@{version}", "-m", f"register {name} {version}")
    project.outputs = outputs
    return project


def test_committed_outputs_are_the_small_reports(published, tiny_project):
    """What the convention puts in git is small text and figures under reports/, never a model or a data set; and
    every file the pipeline wrote under reports/ is one of them. reports/iters is a dependency of report and package
    as a whole folder: a file there that no stage declares would be missing from a clone, and `dvc repro` there
    would rerun them."""
    outputs = published.outputs
    assert "reports/summary.json" in outputs and "reports/audit.json" in outputs
    assert all(p.startswith("reports/") for p in outputs), outputs
    written = sorted(str(f.relative_to(tiny_project.root)) for f in (tiny_project.root / "reports").rglob("*")
                     if f.is_file())
    undeclared = [f for f in written if not any(f == p or f.startswith(p + "/") for p in outputs)]
    assert not undeclared, undeclared
    size = sum((published.root / f).stat().st_size for f in written)
    assert size < 5_000_000, size


def test_a_fresh_clone_shows_the_committed_metrics(published, tmp_path):
    clone = Project(tmp_path / "clone", published.env)
    published.run("git", "clone", "-q", str(published.root), str(clone.root))
    # nothing pulled or run: under artifacts/ only the .gitignore files DVC wrote; the numbers come from git alone
    assert {f.name for f in (clone.root / "artifacts").rglob("*") if f.is_file()} == {".gitignore"}
    expected = json.loads(published.dvc("metrics", "show", "--json").stdout)
    shown = json.loads(clone.dvc("metrics", "show", "--json").stdout)
    assert shown == expected
    workspace = next(iter(shown.values()))["data"]
    summary = published.json("reports/summary.json")
    assert workspace["reports/summary.json"]["data"] == summary
    assert workspace["reports/audit.json"]["data"]["ok"] == 1

    # dvc exp show: the committed run is the baseline row, read from git
    rows = json.loads(clone.dvc("exp", "show", "--json").stdout)
    head = next(row for row in rows if row["rev"] != "workspace")
    metrics = head["data"]["metrics"]
    assert metrics["reports/summary.json"]["data"]["dataset_size"] == summary["dataset_size"]

    # dvc metrics diff: a user's change against the committed numbers
    changed = dict(summary, scaling_ratio=summary["scaling_ratio"] + 1.0)
    (clone.root / "reports/summary.json").write_text(json.dumps(changed))
    diff = json.loads(clone.dvc("metrics", "diff", "--json").stdout)
    assert diff["reports/summary.json"]["scaling_ratio"]["old"] == summary["scaling_ratio"]
    assert diff["reports/summary.json"]["scaling_ratio"]["new"] == changed["scaling_ratio"]


def test_registered_models_come_back_from_dvc_artifacts_get(published, tmp_path):
    lock = yaml.safe_load((published.root / "dvc.lock").read_text())
    recorded = {o["path"]: o for stage in lock["stages"].values() for o in stage.get("outs", [])}
    artifacts = json.loads(published.run(sys.executable, "-c", READ_ARTIFACTS).stdout)
    assert set(artifacts) == set(yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"])
    for name, a in artifacts.items():
        # every registered path is an output dvc.lock records (a stage that moved its output breaks this)
        assert a["path"] in recorded, (name, a["path"])
        assert a["type"] == "model"
        # meta templated from this project's params.yaml (the tiny one)
        assert a["meta"]["seed_set"] == "data/seeds/tiny.jsonl" and a["meta"]["base"]["model"] == "smollm2", a
        for metrics in a["meta"]["metrics"]:
            assert (published.root / metrics).is_file(), (name, metrics)
    assert artifacts["isara-aligned"]["meta"]["iteration"] == 2

    gguf = tmp_path / "aligned.gguf"
    proc = published.dvc("artifacts", "get", str(published.root), "isara-aligned", "-o", str(gguf))
    assert "Downloaded" in proc.stdout + proc.stderr
    assert md5(gguf) == recorded[artifacts["isara-aligned"]["path"]]["md5"]
    assert gguf.read_bytes()[:4] == b"GGUF"

    # a folder artifact: the transformers checkpoint, every file dvc.lock counts, byte for byte the cached ones
    hf = tmp_path / "sft-seed-hf"
    published.dvc("artifacts", "get", str(published.root), "baseline-sft-seed-hf", "-o", str(hf))
    entry = recorded[artifacts["baseline-sft-seed-hf"]["path"]]
    files = [f for f in hf.rglob("*") if f.is_file()]
    assert len(files) == entry["nfiles"] and sum(f.stat().st_size for f in files) == entry["size"]
    manifest = published.root / ".dvc/cache/files/md5" / entry["md5"][:2] / entry["md5"][2:]
    for item in json.loads(manifest.read_text()):
        assert md5(hf / item["relpath"]) == item["md5"], item["relpath"]

    # declared but never tagged: not in the registry, and `dvc artifacts get` says so
    proc = published.dvc("artifacts", "get", str(published.root), "baseline-one-shot", "-o", str(tmp_path / "x"),
                         check=False)
    assert proc.returncode != 0 and not (tmp_path / "x").exists()
    assert "baseline-one-shot" in proc.stderr, proc.stderr
