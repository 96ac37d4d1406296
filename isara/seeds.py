"""seeds stage: validate the seed file and turn it into D0, records with content-hash ids.

`isara seeds check FILE` runs exactly these rules, so a file that passes the check passes the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from isara.console import echo_metrics, guard, stage_params
from isara.params import DEFAULT_PARAMS, load_params
from isara.paths import iter_paths
from isara.records import Record, write_jsonl


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


def check_context(records: list[Record], path: Path, model_path: Path, n_ctx: int) -> None:
    """Every seed, rendered as an in-context example, must fit the model's context (generate.n_ctx) with
    room for the slot the model fills; otherwise it could never be retrieved into a prompt."""
    from isara.llm import open_llama
    from isara.prompts import render_example

    vocab = open_llama(model_path, vocab_only=True)
    budget = n_ctx // 2  # half the window: the other half holds the neighbours and the completion
    lines = _line_numbers(path)
    for record, lineno in zip(records, lines):
        n = len(vocab.tokenize(render_example(record).encode("utf-8"), add_bos=False))
        if n > budget:
            raise SeedFileError(f"{path}:{lineno}: seed is {n} tokens long, more than half of the model's context "
                                f"(generate.n_ctx={n_ctx}): shorten it or raise generate.n_ctx")


def _line_numbers(path: Path) -> list[int]:
    text = Path(path).read_text(encoding="utf-8")
    return [i for i, line in enumerate(text.splitlines(), start=1) if line.strip()]


def validate_seed_file(path: str | Path, base, n_ctx: int) -> list[Record]:
    """All the rules the pipeline applies to a seed file: format, content, and fit in the context of the
    base model (params `base`)."""
    from isara.base_models import resolve_base_model

    records = read_seed_file(path)
    check_context(records, Path(path), resolve_base_model(base.model, base.path), n_ctx)
    return records


def run_seeds(seed_path: Path, base, n_ctx: int) -> list[Record]:
    records = validate_seed_file(seed_path, base, n_ctx)
    write_jsonl(iter_paths(0).dataset, records)
    return records


@click.group("seeds", invoke_without_command=True)
@click.pass_context
def command(ctx: click.Context) -> None:
    """seeds stage: validate the seed file (params seeds.path) and write D0 with record ids."""
    if ctx.invoked_subcommand is None:
        p = stage_params()
        records = guard(run_seeds, p.seeds.path, p.base, p.generate.n_ctx)
        echo_metrics("seeds", {"seeds": len(records), "dataset": str(iter_paths(0).dataset)})


@command.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--params", "params_path", default=str(DEFAULT_PARAMS), show_default=True,
              help="params file giving base.model and generate.n_ctx")
def check(file: str, params_path: str) -> None:
    """Validate a seed file with exactly the rules the pipeline applies."""
    p = guard(load_params, params_path)
    records = guard(validate_seed_file, file, p.base, p.generate.n_ctx)
    click.echo(f"{file}: ok ({len(records)} seeds)")
