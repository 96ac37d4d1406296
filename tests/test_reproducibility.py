"""Two clean `dvc repro` runs with the same params give the same artifacts (compared by dvc.lock hashes)."""

from __future__ import annotations

import pytest
from ruamel.yaml import YAML

from conftest import make_project

pytestmark = pytest.mark.slow


def out_hashes(root) -> dict[str, str]:
    lock = YAML(typ="safe").load((root / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def test_two_clean_runs_give_identical_artifacts(tiny_project, tmp_path):
    """A second project from scratch, reproduced through the first iteration's export (seeds, prepare, index,
    generation, fine-tuning, GGUF export: every kind of artifact), must hash exactly like the first."""
    second = make_project(tmp_path / "again")
    second.dvc("repro", "export@1")
    first, again = out_hashes(tiny_project.root), out_hashes(second.root)
    # Metric files hold wall times, which differ from run to run; every artifact must not.
    compared = sorted(p for p in again if p.startswith("artifacts/"))
    assert "artifacts/1/generated.jsonl" in compared and "artifacts/1/model.gguf" in compared
    differing = [p for p in compared if first[p] != again[p]]
    assert differing == [], f"not reproduced bit for bit: {differing}"
