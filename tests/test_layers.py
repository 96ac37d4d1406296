"""The layering rule of README "Architecture", checked on the source (ast, nothing imported):

- contracts import nothing from isara;
- capabilities import only contracts and other capabilities;
- a stage (or tool) module imports contracts and capabilities, and reaches another stage only through its `run_*`
  functions (`from isara.<stage> import run_<...>`); nothing below cli.py imports cli.py or console.py;
- cli.py is the only module that imports click.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "isara"

CONTRACTS = {"records", "params", "paths", "io", "stats", "text"}
STAGES = {"seeds", "prepare", "index", "generate", "finetune", "export", "datacard", "judge", "evaluate", "baseline",
          "truthfulqa", "report", "package", "audit"}
TOOLS = {"show"}  # `isara show`: a command outside the pipeline, layered like a stage
ENTRY = {"cli", "console"}  # the command line; console.py holds its click-free helpers


def modules(package: Path) -> dict[str, Path]:
    """Dotted name below isara (e.g. "generate", "engines.server") -> file."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(parts) or "__init__"] = path
    return out


def layer(name: str) -> str:
    top = name.split(".")[0]
    if top in CONTRACTS:
        return "contract"
    if top in STAGES:
        return "stage"
    if top in TOOLS:
        return "tool"
    if top in ENTRY:
        return "entry"
    return "capability"  # LLM engines, embeddings, retrieval, filters, judges, prompts, cards, benchmarks, gguf, ...


def imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported isara module below isara, the names taken from it, line) for every import anywhere in the file,
    function bodies included, and ("click", [], line) for click."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "click":
                    found.append(("click", [], node.lineno))
                elif parts[0] == "isara" and len(parts) > 1:
                    found.append((".".join(parts[1:]), [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                parts = ["isara", *base, *(node.module.split(".") if node.module else [])]
            else:
                parts = (node.module or "").split(".")
            if parts[0] == "click":
                found.append(("click", [], node.lineno))
            elif parts[0] == "isara":
                below = ".".join(parts[1:])
                if below:
                    found.append((below, [a.name for a in node.names], node.lineno))
                else:  # `from isara import benchmarks`: each name is a module
                    found += [(a.name, [], node.lineno) for a in node.names]
    return found


def violations(package: Path = PACKAGE) -> list[str]:
    out = []
    for name, path in modules(package).items():
        rel = path.relative_to(package.parent)
        own = layer(name)
        for target, names, line in imports(name, path):
            where = f"{rel}:{line}"
            if target == "click":
                if name != "cli":
                    out.append(f"{where}: imports click (only isara/cli.py may)")
                continue
            other = layer(target)
            if own == "contract":
                out.append(f"{where}: contract imports isara.{target} (contracts import nothing from isara)")
            elif own == "capability" and other not in ("contract", "capability"):
                out.append(f"{where}: capability imports the {other} module isara.{target}")
            elif own in ("stage", "tool"):
                if other in ("entry", "tool"):
                    out.append(f"{where}: {own} imports isara.{target} (only cli.py reaches it)")
                elif other == "stage" and target.split(".")[0] != name.split(".")[0]:
                    if not names or not all(n.startswith("run_") for n in names):
                        out.append(f"{where}: stage reaches stage isara.{target} other than by its run_* function "
                                   f"(imports {names or 'the module'})")
    return out


def test_every_module_follows_the_layering_rule():
    assert violations() == []


def test_each_dvc_stage_runs_the_stage_module_of_its_name():
    """Every dvc.yaml stage runs stages/<x>.py, x is a stage module isara/<x>.py, and every stage module has one."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    entries = set()
    for stage in stages.values():
        cmd = stage.get("do", stage)["cmd"]
        entries.add(Path(next(w for w in cmd.split() if w.startswith("stages/"))).stem)
    assert entries == STAGES
    assert {p.stem for p in (REPO / "stages").glob("*.py")} == STAGES
    assert all((PACKAGE / f"{name}.py").is_file() for name in STAGES)


def test_the_checker_catches_each_kind_of_break(tmp_path):
    """The rule test is only worth something if it fails: plant one break of each kind in a copy of the package."""
    import shutil

    copy = tmp_path / "isara"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "licenses"))
    planted = {
        "records.py": "from isara.paths import ARTIFACTS\n",
        "filters.py": "from isara.generate import run_generate\n",
        "baseline.py": "from isara.generate import Checkpoint\n",
        "datacard.py": "import click\n",
        "report.py": "from isara.console import guard\n",
    }
    for file, line in planted.items():
        (copy / file).write_text((copy / file).read_text(encoding="utf-8") + "\n" + line, encoding="utf-8")
    found = violations(copy)
    assert len(found) == len(planted), found
    for needle in ("contract imports", "capability imports the stage", "other than by its run_*", "imports click",
                   "only cli.py reaches it"):
        assert any(needle in v for v in found), (needle, found)


def test_each_stage_entry_runs_its_cli_command():
    """stages/<x>.py takes exactly `<x>_command` from isara.cli and nothing else from isara (its DVC code deps,
    tests/test_dvc_deps.py, are that command's)."""
    for path in sorted((REPO / "stages").glob("*.py")):
        taken = [(node.module, [a.name for a in node.names]) for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "isara"]
        assert taken == [("isara.cli", [f"{path.stem}_command"])], (path.name, taken)
