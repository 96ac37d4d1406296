"""dvc.yaml lists, for every stage, each isara module its code can import (directly, transitively, or inside a
function): a module it runs but does not list would leave DVC's cache stale after an edit to that module.

A stages/<x>.py shim imports its stage module and runs a command of isara/cli.py, which holds every command and
loads what a command runs by name when it runs: so the plain static closure of the shim is the stage's own code
plus cli.py's module-level imports, exactly what runs, and each stage depends on its own code only.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def module_files(name: str) -> set[str]:
    """The files Python runs to import isara module `name`: the module (X.py, or a package's X/__init__.py) and
    the __init__.py of every package above it below isara itself (isara.engines.server runs isara/engines/__init__.py)."""
    parts = name.split(".")
    found = set()
    for n in range(2, len(parts) + 1):
        rel = "/".join(parts[:n])
        for candidate in (rel + ".py", rel + "/__init__.py"):
            if (REPO / candidate).is_file():
                found.add(candidate)
    return found


CLI = "isara/cli.py"


@cache  # every stage's closure walks the same modules: parse each once (one test took 49 s in CI re-parsing them)
def isara_imports(path: Path) -> frozenset[str]:
    """Repo-relative paths of the isara modules `path` imports anywhere in its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "isara":
            # `from isara.engines import batched` imports the module isara.engines.batched (if there is one)
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("isara.")]
        else:
            continue
        for name in names:
            found |= module_files(name)
    return frozenset(found)


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


def test_a_stage_depends_on_its_own_command_only():
    """Through cli.py, report reaches report.py, not generate.py (another command's module) or torch's finetune.py."""
    report = closure("stages/report.py")
    assert {CLI, "isara/console.py", "isara/report.py"} <= report
    assert not {"isara/generate.py", "isara/finetune.py", "isara/lineage.py"} & report
    assert {"isara/baseline.py", "isara/evaluate.py", "isara/generate.py", "isara/finetune.py"} <= closure(
        "stages/baseline.py")


def test_editing_a_generate_filter_does_not_rerun_evaluation():
    """isara/filters.py decides which generated samples are kept; evaluation never runs it, so editing it must not
    rerun evaluate@* (or the judge): neither imports the generate stage."""
    for entry in ("stages/evaluate.py", "stages/judge.py"):
        assert "isara/filters.py" not in closure(entry), entry
    deps = stage_code_deps()
    assert "isara/filters.py" not in deps["evaluate"][1] and "isara/filters.py" not in deps["judge"][1]


def test_no_stage_lists_code_it_does_not_run():
    """A listed module outside the closure reruns the stage for nothing when it is edited (as isara/filters.py once
    reran every evaluate@t through evaluate -> generate)."""
    extra = {name: sorted(d for d in deps if d.endswith(".py") and d not in closure(entry) | {entry})
             for name, (entry, deps) in stage_code_deps().items()}
    assert not {k: v for k, v in extra.items() if v}, extra
