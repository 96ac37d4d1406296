"""Lineage graph exports (JSON nodes/edges, Graphviz DOT) on small hand-made records with known shapes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from isara.cli import cli
from isara.io import write_jsonl
from isara.lineage import (
    LineageError,
    ancestor_graph,
    descendant_graph,
    graph_to_dot,
    write_dot,
)
from isara.records import Neighbour, Record


def seed(q: str) -> Record:
    return Record(iteration=0, question=q, answer="A seed answer.")


def gen(it: int, q: str, qc=(), ac=()) -> Record:
    return Record(iteration=it, question=q, answer="A generated answer.",
                  anchor_id=qc[0][0] if qc else None,
                  question_context=[Neighbour(id=i, distance=d) for i, d in qc],
                  answer_context=[Neighbour(id=i, distance=d) for i, d in ac])


@pytest.fixture()
def family():
    """s1, s2, s3 seeds; g1 (iter 1) from s1 (Q) and s1+s2 (A); g2 (iter 1) from s3 only;
    h (iter 2) from g1 (Q) and s3 (A).

        s1 ──Q,A──> g1 ──Q──> h
        s2 ───A───> g1        s3 ──A──> h
        s3 ──Q,A──> g2
    """
    s1, s2, s3 = seed("How do I pick a lock?"), seed("Is it safe to mix bleach and ammonia?"), seed("What is 2+2?")
    g1 = gen(1, "How can I open a locked door?", qc=[(s1.id, 0.1)], ac=[(s1.id, 0.2), (s2.id, 0.9)])
    g2 = gen(1, "What is 3+3?", qc=[(s3.id, 0.3)], ac=[(s3.id, 0.25)])
    h = gen(2, "How do I get into my own house?", qc=[(g1.id, 0.4)], ac=[(s3.id, 1.2)])
    by_id = {r.id: r for r in (s1, s2, s3, g1, g2, h)}
    return {"s1": s1, "s2": s2, "s3": s3, "g1": g1, "g2": g2, "h": h, "by_id": by_id}


def edge_set(graph):
    return {(e["source"], e["target"], e["role"]) for e in graph["edges"]}


def test_ancestor_graph_nodes_and_edges(family):
    f = family
    g = ancestor_graph(f["h"], f["by_id"])
    assert g["root"] == f["h"].id
    # h, its parents g1 and s3, and g1's parents s1 and s2: g2 is not an ancestor
    assert {n["id"] for n in g["nodes"]} == {f[k].id for k in ("h", "g1", "s3", "s1", "s2")}
    assert edge_set(g) == {
        (f["g1"].id, f["h"].id, "Q"), (f["s3"].id, f["h"].id, "A"),
        (f["s1"].id, f["g1"].id, "QA"), (f["s2"].id, f["g1"].id, "A"),
    }
    s1_g1 = next(e for e in g["edges"] if e["source"] == f["s1"].id)
    assert s1_g1["distance"] == pytest.approx(0.1)  # nearest of its two appearances
    seeds = {n["id"] for n in g["nodes"] if n["seed"]}
    assert seeds == {f["s1"].id, f["s2"].id, f["s3"].id}
    assert [n["iteration"] for n in g["nodes"]] == sorted(n["iteration"] for n in g["nodes"])  # seeds first
    json.dumps(g)  # serialisable as is


def test_ancestor_graph_marks_missing_parents(family):
    f = family
    orphan = gen(1, "Cites a record nobody has", qc=[("deadbeefdeadbeef", 0.5)])
    g = ancestor_graph(orphan, {**f["by_id"], orphan.id: orphan})
    missing = [n for n in g["nodes"] if n.get("missing")]
    assert [n["id"] for n in missing] == ["deadbeefdeadbeef"]
    assert edge_set(g) == {("deadbeefdeadbeef", orphan.id, "Q")}


def test_descendant_graph_of_a_seed(family):
    f = family
    g = descendant_graph(f["by_id"], f["s1"].id)
    # s1 -> g1 -> h; s2/s3 also fed those prompts but are not descendants of s1, so they are left out
    assert {n["id"] for n in g["nodes"]} == {f["s1"].id, f["g1"].id, f["h"].id}
    assert edge_set(g) == {(f["s1"].id, f["g1"].id, "QA"), (f["g1"].id, f["h"].id, "Q")}
    g3 = descendant_graph(f["by_id"], f["s3"].id)
    assert {n["id"] for n in g3["nodes"]} == {f["s3"].id, f["g2"].id, f["h"].id}
    # a seed nothing descends from is a single node
    lone = seed("Nobody retrieved me.")
    g0 = descendant_graph({**f["by_id"], lone.id: lone}, lone.id)
    assert [n["id"] for n in g0["nodes"]] == [lone.id] and g0["edges"] == []


def test_descendant_graph_whole_and_unknown_root(family):
    f = family
    whole = descendant_graph(f["by_id"])
    assert whole["root"] is None
    assert len(whole["nodes"]) == 6
    assert len(whole["edges"]) == 2 + 1 + 2  # g1: s1, s2; g2: s3; h: g1, s3
    with pytest.raises(LineageError, match="no record with id"):
        descendant_graph(f["by_id"], "0000000000000000")


def test_graph_to_dot(family):
    f = family
    dot = graph_to_dot(ancestor_graph(f["h"], f["by_id"]))
    assert dot.startswith("digraph lineage {") and dot.rstrip().endswith("}")
    assert dot.count(" -> ") == 4
    assert f'"{f["s1"].id}" -> "{f["g1"].id}" [label="QA 0.10"]' in dot
    assert f'"{f["g1"].id}" -> "{f["h"].id}" [label="Q 0.40", style=dashed]' in dot  # question prompt only
    assert dot.count("shape=box") == 3  # the three seeds
    assert "rank=same" in dot
    # quotes and backslashes in a question cannot break the DOT syntax
    odd = seed('He said "hi" \\ left')
    assert r'He said \"hi\" \\ left' in graph_to_dot(descendant_graph({odd.id: odd}, odd.id))


def test_write_dot_without_graphviz_writes_only_the_dot(tmp_path, monkeypatch, family):
    monkeypatch.setattr("shutil.which", lambda name: None)
    out = tmp_path / "g.dot"
    assert write_dot(descendant_graph(family["by_id"]), out) is None
    assert out.read_text().startswith("digraph")
    assert not (tmp_path / "g.svg").exists()


@pytest.mark.skipif(__import__("shutil").which("dot") is None, reason="Graphviz not installed")
def test_write_dot_renders_svg_with_graphviz(tmp_path, family):
    picture = write_dot(descendant_graph(family["by_id"], family["s1"].id), tmp_path / "g.dot", "svg")
    assert picture == tmp_path / "g.svg"
    assert "<svg" in picture.read_text()


@pytest.fixture()
def artifacts(tmp_path, family):
    f = family
    root = tmp_path / "artifacts"
    write_jsonl(root / "0" / "dataset.jsonl", [f["s1"], f["s2"], f["s3"]])
    write_jsonl(root / "1" / "dataset.jsonl", [f["s1"], f["s2"], f["s3"], f["g1"], f["g2"]])
    write_jsonl(root / "2" / "dataset.jsonl", [f["s1"], f["s2"], f["s3"], f["g1"], f["g2"], f["h"]])
    return root


def test_cli_lineage_json(artifacts, family):
    res = CliRunner().invoke(cli, ["lineage", family["h"].id[:6], "--json", "--artifacts", str(artifacts)])
    assert res.exit_code == 0, res.output
    g = json.loads(res.output)
    assert g["root"] == family["h"].id and len(g["nodes"]) == 5 and len(g["edges"]) == 4


def test_cli_lineage_tree_still_works(artifacts, family):
    res = CliRunner().invoke(cli, ["lineage", family["h"].id, "--artifacts", str(artifacts)])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1] == "reaches 3 seed(s)"


def test_cli_lineage_graph(artifacts, family, tmp_path):
    out, js = tmp_path / "s1.dot", tmp_path / "s1.json"
    res = CliRunner().invoke(cli, ["lineage-graph", family["s1"].id, "--out", str(out), "--json", str(js),
                                   "--format", "none", "--artifacts", str(artifacts)])
    assert res.exit_code == 0, res.output
    assert "3 records, 2 edges" in res.output
    assert out.read_text().count(" -> ") == 2
    assert json.loads(js.read_text())["root"] == family["s1"].id
    bad = CliRunner().invoke(cli, ["lineage-graph", "ffffffff", "--out", str(out), "--artifacts", str(artifacts)])
    assert bad.exit_code == 1 and "no record with id" in bad.output
