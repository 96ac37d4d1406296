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
    second = make_project(tmp_path / "again")
    second.dvc("repro")
    first, again = out_hashes(tiny_project.root), out_hashes(second.root)
    assert first.keys() == again.keys()
    # Stage timings differ from run to run; every other output must not.
    timed = {p for p in first if p.startswith("reports/")}
    differing = sorted(p for p in first if p not in timed and first[p] != again[p])
    assert differing == [], f"not reproduced bit for bit: {differing}"
