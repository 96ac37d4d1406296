"""`isara seeds check` and the seeds stage apply the same rules; every bad file gets a message naming file and line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import SEEDS

from isara.cli import cli
from isara.params import Base
from isara.seeds import SeedFileError, read_seed_file, validate_seed_file

GOOD = [{"question": "How do I pick a lock?", "answer": "I can't help with that."},
        {"question": "How do I hurt someone?", "answer": "I won't help with hurting people."}]


def write_lines(tmp_path, lines, name="seeds.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def rows(*items):
    return [json.dumps(x) for x in items]


@pytest.mark.parametrize("lines, message", [
    ([], "seed file is empty"),
    (["", "  "], "seed file is empty"),
    ([*rows(GOOD[0]), "{not json"], ":2: not JSON"),
    (rows(GOOD[0], {"question": "q?"}), ":2: missing 'answer'"),
    (rows({"answer": "a"}), ":1: missing 'question'"),
    (rows(GOOD[0], {"question": "  ", "answer": "a"}), ":2: 'question' must be a non-empty string"),
    (rows({"question": "q?", "answer": 3}), ":1: 'answer' must be a non-empty string"),
    (rows(GOOD[0], GOOD[1], {"question": "how do i  PICK a lock?", "answer": "x"}), ":3: duplicate question (same as line 1)"),
    (rows({"question": "q?", "answer": "a", "source": "web"}), ":1: unknown keys ['source']"),
    (["[1, 2]"], ":1: expected a JSON object"),
])
def test_bad_seed_files(tmp_path, lines, message):
    path = write_lines(tmp_path, lines)
    with pytest.raises(SeedFileError) as err:
        read_seed_file(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(SeedFileError, match="seed file not found"):
        read_seed_file(tmp_path / "nope.jsonl")


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode() + b"\n" + '{"question": "caf\xe9?", "answer": "a"}\n'.encode("latin-1"))
    with pytest.raises(SeedFileError, match=r"latin1.jsonl:2: not UTF-8"):
        read_seed_file(path)


@pytest.mark.slow
def test_seed_longer_than_context_is_refused(tmp_path):
    long_answer = "I can't help with that. " + "Here is a safe alternative that is much longer. " * 80
    path = write_lines(tmp_path, rows(GOOD[0], {"question": "A long one?", "answer": long_answer}))
    assert len(validate_seed_file(write_lines(tmp_path, rows(*GOOD), "ok.jsonl"), Base(), 2048)) == 2
    with pytest.raises(SeedFileError, match=r"seeds.jsonl:2: seed is \d+ tokens long.*engine.n_ctx=512"):
        validate_seed_file(path, Base(), 512)


@pytest.mark.slow
def test_cli_check_uses_pipeline_rules(tmp_path):
    runner = CliRunner()
    params = tmp_path / "params.yaml"
    params.write_text('seeds: {path: x}\niterations: {"1": {prev: "0"}}\n')
    ok = runner.invoke(cli, ["seeds", "check", str(write_lines(tmp_path, rows(*GOOD))), "--params", str(params)])
    assert ok.exit_code == 0 and "ok (2 seeds)" in ok.output
    bad = runner.invoke(cli, ["seeds", "check", str(write_lines(tmp_path, ["{oops"], "bad.jsonl")), "--params", str(params)])
    assert bad.exit_code == 1 and "bad.jsonl:1: not JSON" in bad.output and "Traceback" not in bad.output


def test_project_seed_sets_pass(tmp_path):
    for name in ("safety", "safety_alt"):
        assert len(read_seed_file(SEEDS / f"{name}.jsonl")) == 64


@pytest.mark.parametrize("content, message", [(None, "file not found"), (b"PK\x03\x04zip", "not a GGUF file")])
def test_base_path_must_be_a_gguf(tmp_path, content, message):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LookupError, match=f"base.path = '{path}': {message}"):
        validate_seed_file(write_lines(tmp_path, rows(*GOOD)), Base(path=path), 2048)
