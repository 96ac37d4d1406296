import json

import pytest

from isara.io import write_jsonl
from isara.records import Neighbour, Record, RecordFileError, read_records


def test_id_is_content_hash_and_detects_edits(tmp_path):
    r = Record(iteration=1, question="q?", answer="a.", question_context=[Neighbour(id="x", distance=0.5)])
    assert len(r.id) == 16
    assert Record.model_validate_json(r.model_dump_json()) == r
    tampered = json.loads(r.model_dump_json())
    tampered["answer"] = "something else"
    with pytest.raises(ValueError, match="not the content hash"):
        Record.model_validate(tampered)


def test_stance_is_optional_and_leaves_older_records_unchanged():
    """Record.stance (issue 10) is left out of the JSON and of the content hash when unset: a record written
    before the field keeps its bytes and its id; a set stance is part of the id like any lineage field."""
    plain = Record(iteration=1, question="q?", answer="a.")
    assert "stance" not in plain.model_dump_json()
    assert plain.id == "4fe68c8cfae3d48f"  # its id before the field existed
    old = json.loads(plain.model_dump_json())
    assert Record.model_validate(old).id == plain.id
    declines = Record(iteration=1, question="q?", answer="a.", stance="declines")
    assert declines.id not in (plain.id, Record(iteration=1, question="q?", answer="a.", stance="complies").id)
    assert Record.model_validate_json(declines.model_dump_json()) == declines
    with pytest.raises(ValueError):
        Record(iteration=1, question="q?", answer="a.", stance="maybe")


def test_lineage_fields_are_part_of_the_id():
    a = Record(iteration=1, question="q?", answer="a.", question_context=[Neighbour(id="x", distance=0.5)])
    b = Record(iteration=1, question="q?", answer="a.", question_context=[Neighbour(id="y", distance=0.5)])
    assert a.id != b.id


def test_read_records_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [Record(iteration=0, question="q?", answer="a.")])
    with path.open("a") as fh:
        fh.write('{"iteration": 0, "question": ""}\n')
    with pytest.raises(RecordFileError, match=r"d.jsonl:2"):
        read_records(path)


def test_parent_ids_question_first_without_repeats():
    r = Record(iteration=2, question="q?", answer="a.",
               question_context=[Neighbour(id="a", distance=0.1), Neighbour(id="b", distance=0.2)],
               answer_context=[Neighbour(id="b", distance=0.3), Neighbour(id="c", distance=0.4)])
    assert r.parent_ids() == ["a", "b", "c"]


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    from isara.io import atomic_directory

    out = tmp_path / "ckpt"
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("1")
    assert (out / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "b").write_text("half")
            raise RuntimeError("crash while writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp folder left
    assert sorted(p.name for p in out.iterdir()) == ["a"]  # previous output untouched
