"""seeds stage: validate the seed file and turn it into D0, records with content-hash ids.

`isara seeds check FILE` runs exactly these rules, so a file that passes the check passes the pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

from isara.io import write_jsonl
from isara.paths import iter_paths
from isara.records import Record
from isara.text import normalise


class SeedFileError(ValueError):
    """A seed file that breaks a rule; the message names the file and line."""


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
        key = normalise(row["question"])
        if key in first_line_of:
            raise SeedFileError(f"{path}:{lineno}: duplicate question (same as line {first_line_of[key]})")
        first_line_of[key] = lineno
        records.append(Record(iteration=0, question=row["question"].strip(), answer=row["answer"].strip()))
    if not records:
        raise SeedFileError(f"{path}: seed file is empty")
    return records


def check_context(records: list[Record], path: Path, base, n_ctx: int) -> None:
    """Every seed, rendered as an in-context example, must fit the model's context (engine.n_ctx) with
    room for the slot the model fills; otherwise it could never be retrieved into a prompt. Counted with the
    tokenizer of the base model (params `base`): its GGUF's, or for a Hugging Face checkpoint (base.hf, converted
    only later, by prepare) the checkpoint's own, from which llama.cpp's converter builds the GGUF's."""
    from isara.prompts import render_example

    budget = n_ctx // 2  # half the window: the other half holds the neighbours and the completion
    lines = _line_numbers(path)
    texts = [render_example(record) for record in records]
    if base.hf is not None:
        from transformers import AutoTokenizer

        from isara.base_models import hf_checkpoint

        tokenizer = AutoTokenizer.from_pretrained(hf_checkpoint(base.hf))
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    else:
        from isara.base_models import resolve_base_model
        from isara.engines import count_tokens

        lengths = count_tokens(resolve_base_model(base.model, base.path), texts)
    for n, lineno in zip(lengths, lines):
        if n > budget:
            raise SeedFileError(f"{path}:{lineno}: seed is {n} tokens long, more than half of the model's context "
                                f"(engine.n_ctx={n_ctx}): shorten it or raise engine.n_ctx")


def _line_numbers(path: Path) -> list[int]:
    text = Path(path).read_text(encoding="utf-8")
    return [i for i, line in enumerate(text.splitlines(), start=1) if line.strip()]


def validate_seed_file(path: str | Path, base, n_ctx: int) -> list[Record]:
    """All the rules the pipeline applies to a seed file: format, content, and fit in the context of the
    base model (params `base`)."""
    records = read_seed_file(path)
    check_context(records, Path(path), base, n_ctx)
    return records


def run_seeds(seed_path: Path, base, n_ctx: int) -> list[Record]:
    records = validate_seed_file(seed_path, base, n_ctx)
    write_jsonl(iter_paths(0).dataset, records)
    return records
