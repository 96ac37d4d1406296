"""dvc.yaml lists, for every stage, each isara module its code can import (directly, transitively, or inside a
function): a module it runs but does not list would leave DVC's cache stale after an edit to that module."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def isara_imports(path: Path) -> set[str]:
    """Repo-relative paths of the isara modules `path` imports anywhere in its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "isara":
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "isara" else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("isara.")]
        else:
            continue
        found |= {n.replace(".", "/") + ".py" for n in names if (REPO / (n.replace(".", "/") + ".py")).is_file()}
    return found


def closure(entry: str) -> set[str]:
    seen, todo = set(), [entry]
    while todo:
        for module in isara_imports(REPO / todo.pop()) - seen:
            seen.add(module)
            todo.append(module)
    return seen


def stage_code_deps() -> dict[str, tuple[str, set[str]]]:
    """stage name -> (its stages/<x>.py entry, the deps dvc.yaml lists)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        entry = next(word for word in body["cmd"].split() if word.startswith("stages/"))
        out[name] = (entry, {d if isinstance(d, str) else next(iter(d)) for d in body["deps"]})
    return out


def test_every_stage_lists_the_isara_modules_it_imports():
    missing = {name: sorted(closure(entry) - deps) for name, (entry, deps) in stage_code_deps().items()}
    assert not {k: v for k, v in missing.items() if v}, missing
