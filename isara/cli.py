"""The `isara` command. Each pipeline stage is a subcommand defined in its own module (the same word in
dvc.yaml, params.yaml and isara/<stage>.py); they load lazily so `isara lineage` does not import torch.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from isara.console import guard
from isara.params import DEFAULT_PARAMS, load_params

STAGES = ["seeds", "prepare", "index", "generate", "finetune", "export", "report"]


class StageGroup(click.Group):
    def list_commands(self, ctx):
        return [*STAGES, *super().list_commands(ctx)]

    def get_command(self, ctx, name):
        if name in STAGES:
            return importlib.import_module(f"isara.{name}").command
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
def lineage(record_id: str, artifacts: str) -> None:
    """Print the chain of in-context examples from RECORD_ID (or an unambiguous prefix) back to the seeds."""
    from isara.lineage import lineage_lines, load_all_records, resolve_id, seed_ancestors

    by_id = guard(load_all_records, Path(artifacts))
    record = guard(resolve_id, record_id, by_id)
    for line in lineage_lines(record, by_id):
        click.echo(line)
    click.echo(f"reaches {len(guard(seed_ancestors, record, by_id))} seed(s)")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="isara")


if __name__ == "__main__":
    main()
