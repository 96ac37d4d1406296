"""`isara show` on a small hand-made artifacts folder (real Record objects, no models), plus one run against the
tiny pipeline's real generated data (slow)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from isara.cli import cli
from isara.io import write_jsonl
from isara.records import Neighbour, Record, read_records
from isara.show import Item, format_item, reason_counts, select


def seed(q: str) -> Record:
    return Record(iteration=0, question=q, answer="A seed answer.")


def gen(it: int, q: str, qc=(), ac=(), answer="A generated answer.") -> Record:
    return Record(iteration=it, question=q, answer=answer, anchor_id=qc[0],
                  question_context=[Neighbour(id=i, distance=0.3) for i in qc],
                  answer_context=[Neighbour(id=i, distance=0.4) for i in ac])


def rejection(attempt: int, anchor: str, question: str, reason: str, answer: str | None = None) -> dict:
    row = {"attempt": attempt, "anchor_id": anchor, "raw_question": f" {question}", "question": question,
           "reason": reason}
    if answer is not None:
        row |= {"raw_answer": f" {answer}", "answer": answer}
    return row


LONG = "I cannot help with that. " * 20


@pytest.fixture()
def arts(tmp_path):
    """Seeds s1 s2 s3. Iteration 1: g1 (from s1, s2), g2 (from s3, long answer); rejected: two repetitions
    (anchors s1, s3) and one too_short (anchor s2, answered). Iteration 2: h (from g1, s3); rejected: one
    out_of_domain (anchor g2), a reason no list in the code names."""
    s1, s2, s3 = seed("How do I pick a lock?"), seed("Is it safe to mix bleach and ammonia?"), seed("What is 2+2?")
    g1 = gen(1, "How can I open a locked door?", qc=[s1.id], ac=[s1.id, s2.id])
    g2 = gen(1, "What is 3+3?", qc=[s3.id], ac=[s3.id], answer=LONG)
    h = gen(2, "How do I get into my own house?", qc=[g1.id], ac=[s3.id])
    root = tmp_path / "artifacts"
    write_jsonl(root / "0/dataset.jsonl", [s1, s2, s3])
    write_jsonl(root / "1/generated.jsonl", [g1, g2])
    write_jsonl(root / "1/rejected.jsonl", [rejection(0, s1.id, "How do I pick a lock?", "repetition"),
                                            rejection(2, s2.id, "Bleach?", "too_short", answer="No."),
                                            rejection(3, s3.id, "What is 2+2?", "repetition")])
    write_jsonl(root / "1/dataset.jsonl", [s1, s2, s3, g1, g2])
    write_jsonl(root / "2/generated.jsonl", [h])
    write_jsonl(root / "2/rejected.jsonl", [rejection(1, g2.id, "Which stock should I buy?", "out_of_domain",
                                                      answer="Buy gold.")])
    write_jsonl(root / "2/dataset.jsonl", [s1, s2, s3, g1, g2, h])
    (root / "judge").mkdir()  # other artifacts folders are not iterations
    return {"root": root, "s1": s1, "s2": s2, "s3": s3, "g1": g1, "g2": g2, "h": h}


def show(arts, *args: str):
    return CliRunner().invoke(cli, ["show", *args, "--artifacts", str(arts["root"])])


def ok(arts, *args: str) -> str:
    result = show(arts, *args)
    assert result.exit_code == 0, result.output
    return result.stdout


def error(arts, *args: str) -> str:
    """The one-line error of a failing call (exit 1, no traceback)."""
    result = show(arts, *args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught error
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------- selection


def test_default_is_the_latest_iterations_accepted_records(arts):
    out = ok(arts)
    lines = out.splitlines()
    assert lines[0] == "iteration 2: 1 accepted, 1 rejected (out_of_domain 1); showing 1"
    h = arts["h"]
    assert f"{h.id}  iter 2  accepted" in out
    assert f"  Q: {h.question}" in out
    assert f"  seeds: 3  anchor: {arts['g1'].id}" in out  # h reaches s1, s2 (via g1) and s3
    assert "rejected" not in out.split("\n", 1)[1]


def test_iteration_argument_and_counts_by_reason(arts):
    out = ok(arts, "1")
    assert out.splitlines()[0] == "iteration 1: 2 accepted, 3 rejected (repetition 2, too_short 1); showing 2"
    assert arts["g1"].id in out and arts["g2"].id in out and arts["h"].id not in out
    seeds_out = ok(arts, "0")
    assert seeds_out.splitlines()[0] == "iteration 0: 3 seeds, 0 rejected; showing 3"
    assert f"{arts['s1'].id}  iter 0  seed" in seeds_out


def test_rejected_attempts_show_reason_and_anchor(arts):
    out = ok(arts, "1", "--rejected")
    assert "attempt 0  iter 1  rejected: repetition" in out
    assert "attempt 2  iter 1  rejected: too_short" in out
    assert "A: (not answered: rejected at the question)" in out  # the repetitions never got an answer
    assert "  A: No." in out
    assert f"seeds: 1 (via anchor)  anchor: {arts['s2'].id}" in out
    assert arts["g1"].id not in out
    both = ok(arts, "1", "--all")
    assert "showing 5" in both.splitlines()[0]
    assert both.index(arts["g2"].id) < both.index("attempt 0")  # accepted first


def test_reason_filter_implies_rejected_and_takes_any_reason(arts):
    out = ok(arts, "1", "--reason", "repetition")
    assert out.splitlines()[0].endswith("showing 2")
    assert out.count("rejected: repetition") == 2 and "too_short" not in out.split("\n", 1)[1]
    new = ok(arts, "2", "--reason", "out_of_domain")  # a reason added after this module was written
    assert "rejected: out_of_domain" in new and "Which stock should I buy?" in new


def test_descends_from_a_seed_prefix(arts):
    s1, s3 = arts["s1"], arts["s3"]
    out = ok(arts, "1", "--all", "--descends-from", s1.id[:6])
    assert arts["g1"].id in out and "attempt 0" in out  # g1 cites s1; attempt 0 was anchored on s1
    assert arts["g2"].id not in out and "attempt 3" not in out
    out3 = ok(arts, "2", "--all", "--descends-from", s3.id)
    assert arts["h"].id in out3 and "out_of_domain" in out3  # via its anchor g2, itself from s3


def test_grep_limit_and_full(arts):
    out = ok(arts, "1", "--all", "--grep", "BLEACH")
    assert "attempt 2" in out and arts["g1"].id not in out
    limited = ok(arts, "1", "--all", "--limit", "2")
    assert limited.splitlines()[0].endswith("showing 2 of 5 matching")
    assert limited.count("  Q: ") == 2
    short = ok(arts, "1", "--grep", "3+3")
    assert LONG.strip() not in short and "…" in short
    assert LONG.strip() in ok(arts, "1", "--grep", "3+3", "--full")


def test_json_lines_parse(arts):
    out = ok(arts, "1", "--all", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["status"] for r in rows] == ["accepted"] * 2 + ["rejected"] * 3
    g1 = rows[0]
    assert g1["id"] == arts["g1"].id and g1["iteration"] == 1
    assert g1["seed_ancestors"] == sorted([arts["s1"].id, arts["s2"].id])
    assert Record.model_validate({k: v for k, v in g1.items() if k in Record.model_fields}) == arts["g1"]
    assert rows[2]["reason"] == "repetition" and rows[2]["seed_ancestors"] == [arts["s1"].id]
    assert rows[3]["answer"] == "No."
    assert all(r["answer"] == LONG for r in rows if r.get("id") == arts["g2"].id)  # never truncated
    one = ok(arts, "2", "--reason", "out_of_domain", "--json").splitlines()
    assert len(one) == 1 and json.loads(one[0])["reason"] == "out_of_domain"


def test_select_and_reason_counts_are_pure():
    s = seed("Q?")
    rows = [{"reason": "a", "question": "x"}, {"reason": "b", "question": "y"}, {"reason": "a", "question": "Z"}]
    items = [Item(1, record=s, seeds=frozenset({s.id})), *(Item(1, row=r, seeds=None) for r in rows)]
    assert reason_counts(rows).most_common() == [("a", 2), ("b", 1)]
    assert [i.row["question"] for i in select(items, reason="a")] == ["x", "Z"]
    assert select(items, seed_id=s.id) == items[:1]  # a broken chain (seeds None) never matches
    assert [i.question for i in select(items, grep="z")] == ["Z"]


def test_format_item_marks_empty_and_unanswered():
    empty_q = Item(1, row={"attempt": 5, "anchor_id": None, "question": "", "reason": "empty_question"},
                   broken="no anchor")
    text = format_item(empty_q)
    assert text.splitlines() == ["attempt 5  iter 1  rejected: empty_question", "  Q: (empty)",
                                 "  A: (not answered: rejected at the question)", "  seeds: ? (no anchor)  anchor: -"]
    empty_a = Item(1, row={"attempt": 6, "anchor_id": "x", "question": "Why?", "answer": "", "reason": "too_short"})
    assert "  A: (empty)" in format_item(empty_a)


# ------------------------------------------------------------------------------------------------- errors


def test_errors_are_one_clear_line(arts, tmp_path):
    assert "no artifacts folder" in error({"root": tmp_path / "nowhere"})
    assert error(arts, "7") == f"Error: no iteration '7' in {arts['root']}/: there are 0, 1, 2"
    msg = error(arts, "1", "--reason", "nonsense")
    assert "'nonsense'" in msg and "reasons present: repetition (2), too_short (1)" in msg
    assert "not a seed" in error(arts, "--descends-from", arts["g1"].id[:8])
    assert "no seed with id 'ffffffff' among 3 seeds" in error(arts, "--descends-from", "ffffffff")
    msg = error(arts, "1", "--grep", "no such words")
    assert msg.endswith("iteration 1: nothing accepted containing 'no such words' (2 accepted, 3 rejected in all)")
    assert "nothing rejected" in error(arts, "0", "--rejected")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no iteration data" in error({"root": empty})


def test_reason_with_accepted_is_a_usage_error(arts):
    result = show(arts, "--accepted", "--reason", "repetition")
    assert result.exit_code == 2 and "--reason selects rejected attempts" in result.output


def test_show_is_listed_and_loads_lazily():
    result = CliRunner().invoke(cli, ["--help"])
    assert "show" in result.output
    assert "--descends-from" in CliRunner().invoke(cli, ["show", "--help"]).output


# --------------------------------------------------------------------------------- real generated data


@pytest.mark.slow
def test_show_on_the_tiny_pipeline(tiny_project):
    root = tiny_project.root
    accepted = read_records(root / "artifacts/1/generated.jsonl")
    out = tiny_project.isara("show", "1").stdout
    assert out.startswith(f"iteration 1: {len(accepted)} accepted")
    assert all(r.id in out for r in accepted)
    n_rejected = sum(1 for line in (root / "artifacts/1/rejected.jsonl").read_text().splitlines() if line.strip())
    proc = tiny_project.isara("show", "1", "--rejected", "--json", check=False)
    if n_rejected == 0:
        assert proc.returncode == 1 and "nothing rejected" in proc.stderr
        return
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == n_rejected and all(r["status"] == "rejected" and r["reason"] for r in rows)
    assert all(r["seed_ancestors"] for r in rows)  # every anchor is in D0, so it reaches a seed
