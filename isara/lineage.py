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


def seed_ancestors(record: Record, by_id: dict[str, Record]) -> set[str]:
    """Ids of the seeds a record descends from; raises if a chain breaks before reaching a seed."""
    if record.is_seed:
        return {record.id}
    if not record.parent_ids():
        raise LineageError(f"record {record.id} (iteration {record.iteration}) cites no examples: chain ends before a seed")
    seeds: set[str] = set()
    for pid in record.parent_ids():
        if pid not in by_id:
            raise LineageError(f"record {record.id} cites {pid}, which is in no data set")
        seeds |= seed_ancestors(by_id[pid], by_id)
    return seeds


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
