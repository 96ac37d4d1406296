"""Lineage: follow a record's in-context examples back, hop by hop, to the seed examples."""

from __future__ import annotations

from pathlib import Path

from isara.paths import ARTIFACTS
from isara.records import Record, read_records


class LineageError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def load_all_records(root: Path = ARTIFACTS) -> dict[str, Record]:
    """Every record of every iteration's data set, by id."""
    by_id: dict[str, Record] = {}
    for dataset in sorted(Path(root).glob("*/dataset.jsonl")):
        for r in read_records(dataset):
            by_id[r.id] = r
    return by_id


def resolve_id(prefix: str, by_id: dict[str, Record]) -> Record:
    """Exact id, or an unambiguous prefix of one (as git accepts short hashes)."""
    if prefix in by_id:
        return by_id[prefix]
    matches = [i for i in by_id if i.startswith(prefix)]
    if len(matches) == 1:
        return by_id[matches[0]]
    if not matches:
        raise LineageError(f"no record with id {prefix!r} in {len(by_id)} records")
    raise LineageError(f"id prefix {prefix!r} is ambiguous: {len(matches)} records match")


def roles(record: Record) -> dict[str, tuple[str, float]]:
    """parent id -> ("Q", "A" or "QA", nearest distance) for the prompts it appeared in."""
    out: dict[str, tuple[str, float]] = {}
    for tag, context in (("Q", record.question_context), ("A", record.answer_context)):
        for n in context:
            old_tag, old_d = out.get(n.id, ("", float("inf")))
            out[n.id] = (old_tag + tag, min(old_d, n.distance))
    return out


def seed_ancestors(record: Record, by_id: dict[str, Record],
                   memo: dict[str, frozenset[str]] | None = None) -> frozenset[str]:
    """Ids of the seeds a record descends from; raises if a chain breaks before reaching a seed.

    memo (record id -> its seeds) is filled as records are resolved; pass the same dict for every record of a data
    set. Without it a record of iteration t walks every path to the seeds, up to (k_question + k_answer)^t of them
    (an audit of 10 iterations would not finish); with it each record's ancestry is computed once, from its
    parents' (a broken chain is never memoised: it raises every time)."""
    if memo is None:
        memo = {}
    found = memo.get(record.id)
    if found is not None:
        return found
    if record.is_seed:
        found = frozenset((record.id,))
    else:
        parents = record.parent_ids()
        if not parents:
            raise LineageError(f"record {record.id} (iteration {record.iteration}) cites no examples: chain ends "
                               "before a seed")
        reached = []
        for pid in parents:
            seeds = memo.get(pid)  # looked up here, not by a call: most parents are resolved already
            if seeds is None:
                if pid not in by_id:
                    raise LineageError(f"record {record.id} cites {pid}, which is in no data set")
                seeds = seed_ancestors(by_id[pid], by_id, memo)
            reached.append(seeds)
        found = frozenset().union(*reached)
    memo[record.id] = found
    return found


def _label(r: Record, width: int = 70) -> str:
    kind = "seed" if r.is_seed else f"iter {r.iteration}"
    q = r.question if len(r.question) <= width else r.question[: width - 1] + "…"
    return f"{r.id} [{kind}] {q}"


def lineage_lines(record: Record, by_id: dict[str, Record]) -> list[str]:
    """The tree of a record's ancestors. Q/A says which prompt the example was in, d its retrieval distance."""
    lines = [_label(record)]

    def walk(r: Record, indent: str) -> None:
        parents = list(roles(r).items())
        for i, (pid, (tag, dist)) in enumerate(parents):
            last = i == len(parents) - 1
            branch, child_indent = ("└── ", "    ") if last else ("├── ", "│   ")
            parent = by_id.get(pid)
            if parent is None:
                lines.append(f"{indent}{branch}{tag:<2} d={dist:.3f} {pid} [MISSING: in no data set]")
                continue
            lines.append(f"{indent}{branch}{tag:<2} d={dist:.3f} {_label(parent)}")
            walk(parent, indent + child_indent)

    walk(record, "")
    return lines


# ---------------------------------------------------------------------------------------- graph exports
# One shape for both directions: {"root": id | None, "nodes": [...], "edges": [...]}. An edge points from the
# in-context example (source) to the record generated with it (target); "role" says which prompt it was in
# (Q, A or QA) and "distance" its nearest retrieval distance. A cited id in no data set becomes a node with
# "missing": true, so a broken chain shows in the picture instead of vanishing from it.


def _node(rid: str, by_id: dict[str, Record]) -> dict:
    r = by_id.get(rid)
    if r is None:
        return {"id": rid, "missing": True}
    return {"id": r.id, "iteration": r.iteration, "seed": r.is_seed, "question": r.question, "answer": r.answer}


def _edges_into(record: Record) -> list[dict]:
    return [{"source": pid, "target": record.id, "role": tag, "distance": dist}
            for pid, (tag, dist) in roles(record).items()]


def ancestor_graph(record: Record, by_id: dict[str, Record]) -> dict:
    """The record and everything it descends from, down to the seeds, as nodes and edges."""
    nodes: dict[str, dict] = {}
    edges: list[dict] = []
    stack = [record.id]
    while stack:
        rid = stack.pop()
        if rid in nodes:
            continue
        nodes[rid] = _node(rid, by_id)
        if rid in by_id:
            new = _edges_into(by_id[rid])
            edges += new
            stack += [e["source"] for e in reversed(new)]
    return {"root": record.id, "nodes": sorted(nodes.values(), key=_order), "edges": sorted(edges, key=_edge_order)}


def descendant_graph(by_id: dict[str, Record], root_id: str | None = None) -> dict:
    """Everything generated, directly or through later rounds, from root_id (usually a seed), with the other
    examples that shared those prompts left out; with no root, the whole lineage graph of every record."""
    if root_id is None:
        nodes = {rid: _node(rid, by_id) for rid in by_id}
        edges = [e for r in by_id.values() for e in _edges_into(r)]
        for e in edges:
            nodes.setdefault(e["source"], _node(e["source"], by_id))
        return {"root": None, "nodes": sorted(nodes.values(), key=_order), "edges": sorted(edges, key=_edge_order)}
    if root_id not in by_id:
        raise LineageError(f"no record with id {root_id!r} in {len(by_id)} records")
    children: dict[str, list[Record]] = {}
    for r in by_id.values():
        for pid in r.parent_ids():
            children.setdefault(pid, []).append(r)
    keep = {root_id}
    queue = [root_id]
    while queue:
        for child in children.get(queue.pop(), []):
            if child.id not in keep:
                keep.add(child.id)
                queue.append(child.id)
    edges = [e for rid in keep if rid != root_id for e in _edges_into(by_id[rid]) if e["source"] in keep]
    return {"root": root_id, "nodes": sorted((_node(rid, by_id) for rid in keep), key=_order),
            "edges": sorted(edges, key=_edge_order)}


def _order(node: dict) -> tuple:
    return (node.get("iteration", -1), node["id"])


def _edge_order(edge: dict) -> tuple:
    return (edge["target"], edge["source"])


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def graph_to_dot(graph: dict, width: int = 40) -> str:
    """Graphviz DOT of a lineage graph: one rank per iteration (seeds at the top), seeds as boxes,
    missing records in red, edges labelled with the prompt role and retrieval distance."""
    lines = ["digraph lineage {", "  rankdir=TB;", '  node [shape=ellipse, fontsize=10, fontname="Helvetica"];',
             '  edge [fontsize=8, fontname="Helvetica"];']
    ranks: dict[int, list[str]] = {}
    for n in graph["nodes"]:
        if n.get("missing"):
            lines.append(f"  {_dot_quote(n['id'])} [label={_dot_quote(n['id'] + ' (MISSING)')}, color=red, "
                         "fontcolor=red, style=dashed];")
            continue
        q = n["question"] if len(n["question"]) <= width else n["question"][: width - 1] + "…"
        kind = "seed" if n["seed"] else f"iter {n['iteration']}"
        attrs = ["shape=box", 'style="filled"', 'fillcolor="#e8f0fe"'] if n["seed"] else []
        if n["id"] == graph.get("root"):
            attrs.append("penwidth=2")
        label = f"{n['id'][:8]} [{kind}]\n{q}"
        lines.append(f"  {_dot_quote(n['id'])} [{', '.join([f'label={_dot_quote(label)}', *attrs])}];")
        ranks.setdefault(n["iteration"], []).append(n["id"])
    for e in graph["edges"]:
        style = "" if "A" in e["role"] else ", style=dashed"  # dashed: only in the question prompt
        label = _dot_quote(f"{e['role']} {e['distance']:.2f}")
        lines.append(f"  {_dot_quote(e['source'])} -> {_dot_quote(e['target'])} [label={label}{style}];")
    for it in sorted(ranks):
        lines.append("  { rank=same; " + " ".join(_dot_quote(i) for i in ranks[it]) + " }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(graph: dict, out: Path, fmt: str | None = "svg") -> Path | None:
    """Write the DOT file; when Graphviz's `dot` is installed and fmt is given, render it next to the .dot
    (same name, .svg/.png) and return that path. Without Graphviz, only the .dot is written (returns None)."""
    import shutil
    import subprocess

    from isara.io import atomic_write_text

    out = Path(out)
    atomic_write_text(out, graph_to_dot(graph))
    dot = shutil.which("dot")
    if fmt is None or dot is None:
        return None
    picture = out.with_suffix(f".{fmt}")
    subprocess.run([dot, f"-T{fmt}", str(out), "-o", str(picture)], check=True, capture_output=True, timeout=300)
    return picture
