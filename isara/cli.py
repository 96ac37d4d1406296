"""The `isara` command. Each pipeline stage is a subcommand defined in its own module (the same word in
dvc.yaml, params.yaml and isara/<stage>.py); they load lazily so `isara lineage` does not import torch.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import click

from isara.audit import command as audit_command
from isara.console import guard
from isara.params import DEFAULT_PARAMS, load_params

STAGES = ["seeds", "prepare", "index", "generate", "finetune", "export", "datacard", "judge", "evaluate", "baseline",
          "truthfulqa", "report", "package"]
# Stages whose command lives in another stage's module: (module, attribute).
STAGE_COMMANDS = {"judge": ("evaluate", "judge_command")}
# Commands outside the pipeline, also loaded lazily: name -> (module, attribute).
TOOLS = {"truthfulqa-score": ("truthfulqa", "score_command"), "truthfulqa-seeds": ("truthfulqa", "seeds_command"),
         "show": ("show", "command")}


class StageGroup(click.Group):
    def list_commands(self, ctx):
        return [*STAGES, *TOOLS, *super().list_commands(ctx)]

    def get_command(self, ctx, name):
        if name in STAGES:
            module, attribute = STAGE_COMMANDS.get(name, (name, "command"))
            return getattr(importlib.import_module(f"isara.{module}"), attribute)
        if name in TOOLS:
            module, attribute = TOOLS[name]
            return getattr(importlib.import_module(f"isara.{module}"), attribute)
        return super().get_command(ctx, name)


@click.group(cls=StageGroup)
@click.version_option(package_name="isara")
def cli() -> None:
    """ISARA: self-alignment from a few seed examples by retrieval-augmented in-context generation."""


@cli.group()
def params() -> None:
    """Inspect params.yaml."""


@params.command("check")
@click.argument("path", default=str(DEFAULT_PARAMS), type=click.Path(dir_okay=False))
def params_check(path: str) -> None:
    """Validate a params file; exit non-zero naming the bad key and value."""
    p = guard(load_params, path)
    click.echo(f"{path}: ok ({len(p.iterations)} iterations, base model {p.base.model}, seeds {p.seeds.path})")


@cli.command()
@click.argument("record_id")
@click.option("--artifacts", default="artifacts", type=click.Path(file_okay=False), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the ancestor graph as JSON (nodes and edges) instead.")
def lineage(record_id: str, artifacts: str, as_json: bool) -> None:
    """Print the chain of in-context examples from RECORD_ID (or an unambiguous prefix) back to the seeds."""
    from isara.lineage import (
        lineage_lines,
        load_all_records,
        resolve_id,
        seed_ancestors,
    )

    by_id = guard(load_all_records, Path(artifacts))
    record = guard(resolve_id, record_id, by_id)
    if as_json:
        from isara.lineage import ancestor_graph

        click.echo(json.dumps(ancestor_graph(record, by_id), indent=2, ensure_ascii=False))
        return
    for line in lineage_lines(record, by_id):
        click.echo(line)
    click.echo(f"reaches {len(guard(seed_ancestors, record, by_id))} seed(s)")


@cli.command("lineage-graph")
@click.argument("record_id", required=False)
@click.option("--out", "out", default="lineage.dot", type=click.Path(dir_okay=False), show_default=True,
              help="Graphviz DOT file to write; rendered next to it (same name) when `dot` is installed.")
@click.option("--format", "fmt", default="svg", type=click.Choice(["svg", "png", "none"]), show_default=True)
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Also write the graph as JSON.")
@click.option("--artifacts", default="artifacts", type=click.Path(file_okay=False), show_default=True)
def lineage_graph(record_id: str | None, out: str, fmt: str, json_out: str | None, artifacts: str) -> None:
    """Export the descendants of RECORD_ID (usually a seed; a prefix works) as a picture: Graphviz DOT, plus
    SVG/PNG when Graphviz is available. Without RECORD_ID, the whole lineage graph of every record."""
    from isara.lineage import descendant_graph, load_all_records, resolve_id, write_dot
    from isara.records import write_json

    by_id = guard(load_all_records, Path(artifacts))
    root = guard(resolve_id, record_id, by_id).id if record_id else None
    graph = guard(descendant_graph, by_id, root)
    picture = write_dot(graph, Path(out), None if fmt == "none" else fmt)
    if json_out:
        write_json(json_out, graph)
    shown = f"{out} and {picture}" if picture else f"{out} (install Graphviz to render it: dot -Tsvg {out})"
    click.echo(f"{len(graph['nodes'])} records, {len(graph['edges'])} edges: wrote {shown}")


cli.add_command(audit_command)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="isara")


if __name__ == "__main__":
    main()
