"""seeds stage: validate the seed file and turn it into D0, records with content-hash ids.

`isara seeds check FILE` runs exactly these rules, so a file that passes the check passes the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

from isara.records import Record, write_jsonl
from isara.paths import iter_paths

import click

from isara.console import echo_metrics, guard, stage_params


class SeedFileError(ValueError):
    """A seed file that breaks a rule; the message names the file and line."""


def normalise_question(text: str) -> str:
    return " ".join(text.lower().split())


def read_seed_file(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise SeedFileError(f"{path}: seed file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SeedFileError(f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    records: list[Record] = []
    first_line_of: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SeedFileError(f"{path}:{lineno}: not JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise SeedFileError(f"{path}:{lineno}: expected a JSON object with 'question' and 'answer'")
        for key in ("question", "answer"):
            if key not in row:
                raise SeedFileError(f"{path}:{lineno}: missing '{key}'")
            if not isinstance(row[key], str) or not row[key].strip():
                raise SeedFileError(f"{path}:{lineno}: '{key}' must be a non-empty string")
        extra = sorted(set(row) - {"question", "answer"})
        if extra:
            raise SeedFileError(f"{path}:{lineno}: unknown keys {extra}; a seed has only 'question' and 'answer'")
        key = normalise_question(row["question"])
        if key in first_line_of:
            raise SeedFileError(f"{path}:{lineno}: duplicate question (same as line {first_line_of[key]})")
        first_line_of[key] = lineno
        records.append(Record(iteration=0, question=row["question"].strip(), answer=row["answer"].strip()))
    if not records:
        raise SeedFileError(f"{path}: seed file is empty")
    return records


def run_seeds(seed_path: Path) -> list[Record]:
    records = read_seed_file(seed_path)
    write_jsonl(iter_paths(0).dataset, records)
    return records


@click.group("seeds", invoke_without_command=True)
@click.pass_context
def command(ctx: click.Context) -> None:
    """seeds stage: validate the seed file (params seeds.path) and write D0 with record ids."""
    if ctx.invoked_subcommand is None:
        p = stage_params()
        records = guard(run_seeds, p.seeds.path)
        echo_metrics("seeds", {"seeds": len(records), "dataset": str(iter_paths(0).dataset)})


@command.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def check(file: str) -> None:
    """Validate a seed file with exactly the rules the pipeline applies."""
    records = guard(read_seed_file, file)
    click.echo(f"{file}: ok ({len(records)} seeds)")
