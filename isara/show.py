"""`isara show`: browse one iteration's accepted records and rejected attempts in the terminal, or as JSON lines.

An accepted record is shown with its id (`isara lineage <id>` follows it to the seeds); a rejected attempt has no
id of its own (it never became a record), so its lineage id is its anchor, the record its question prompt was
retrieved around, and the seeds it reaches are the anchor's. Rejection reasons are read from the data, never
from a fixed list: a new filter's reason shows up here without a change.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from isara.lineage import LineageError, load_all_records, resolve_id, seed_ancestors
from isara.paths import IterPaths
from isara.records import Record, read_records

ACCEPTED, REJECTED, ALL = "accepted", "rejected", "all"
DEFAULT_LIMIT = 20  # blocks shown as text when --limit is not given (JSON lines: all of them)
WIDTH = 160  # characters of a question or answer shown before "…" (--full shows everything)


class ShowError(LookupError):
    """Nothing to show for what was asked; the message says what exists instead."""

    def __str__(self) -> str:
        return str(self.args[0])


# ------------------------------------------------------------------------------------------ reading a round


def iterations(root: Path) -> list[str]:
    """The iterations with data under root, in numeric order: "0" (the seeds) and every round that generated."""
    root = Path(root)
    if not root.is_dir():
        raise ShowError(f"no artifacts folder {str(root)!r}: run `dvc repro` first, or pass --artifacts")
    found = [d.name for d in root.iterdir() if d.is_dir() and d.name.isdigit()
             and (IterPaths(d.name, root=root).generated.is_file()
                  or (int(d.name) == 0 and IterPaths(d.name, root=root).dataset.is_file()))]
    return sorted(found, key=int)


def pick_iteration(root: Path, iteration: str | None) -> str:
    """The iteration asked for (its folder name), or the latest one; raises naming the ones there are."""
    have = iterations(root)
    if not have:
        raise ShowError(f"no iteration data in {root}/ (no */generated.jsonl, no 0/dataset.jsonl): "
                        "run `dvc repro` first")
    if iteration is None:
        return have[-1]
    for name in have:
        if name == iteration or (iteration.isdigit() and int(name) == int(iteration)):
            return name
    raise ShowError(f"no iteration {iteration!r} in {root}/: there are {', '.join(have)}")


def read_rejected(path: Path) -> list[dict]:
    """rejected.jsonl: one JSON object per rejected attempt (attempt, anchor_id, question, reason, ...)."""
    if not path.is_file():
        return []
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON: {exc}") from exc
        if not isinstance(row, dict) or "reason" not in row:
            raise ValueError(f"{path}:{lineno}: not a rejected attempt (a JSON object with a 'reason')")
        rows.append(row)
    return rows


def load_round(root: Path, iteration: str) -> tuple[list[Record], list[dict]]:
    """Accepted records and rejected attempts of one iteration; iteration 0's accepted records are the seeds."""
    paths = IterPaths(iteration, root=Path(root))
    if int(iteration) == 0:
        return read_records(paths.dataset), []
    return read_records(paths.generated), read_rejected(paths.rejected)


# ---------------------------------------------------------------------------------------- items and filters


@dataclass(frozen=True)
class Item:
    """One thing to show: an accepted record, or a rejected attempt (row of rejected.jsonl)."""

    iteration: int
    record: Record | None = None
    row: dict | None = None
    seeds: frozenset[str] | None = None  # seed ancestors (a rejected attempt's: its anchor's); None: chain broken
    broken: str | None = None  # why the chain to the seeds breaks

    @property
    def accepted(self) -> bool:
        return self.record is not None

    @property
    def reason(self) -> str | None:
        return None if self.accepted else str(self.row["reason"])

    @property
    def id(self) -> str | None:
        return self.record.id if self.accepted else None

    @property
    def anchor_id(self) -> str | None:
        return self.record.anchor_id if self.accepted else self.row.get("anchor_id")

    @property
    def question(self) -> str:
        return self.record.question if self.accepted else str(self.row.get("question") or "")

    @property
    def answer(self) -> str | None:
        return self.record.answer if self.accepted else self.row.get("answer")


def _seeds_of(record: Record | None, by_id: dict[str, Record], what: str,
              memo: dict[str, frozenset[str]]) -> tuple[frozenset[str] | None, str | None]:
    if record is None:
        return None, f"{what} is in no data set"
    try:
        return seed_ancestors(record, by_id, memo), None
    except LineageError as exc:
        return None, str(exc)


def make_items(iteration: str, accepted: list[Record], rejected: list[dict], by_id: dict[str, Record],
               status: str = ACCEPTED) -> list[Item]:
    """Items of the given status (accepted, rejected or all: accepted first, then rejected in attempt order)."""
    t = int(iteration)
    items = []
    memo: dict[str, frozenset[str]] = {}  # every item's ancestry computed once (lineage.seed_ancestors)
    if status in (ACCEPTED, ALL):
        for r in accepted:
            seeds, broken = _seeds_of(r, by_id, f"record {r.id}", memo)
            items.append(Item(t, record=r, seeds=seeds, broken=broken))
    if status in (REJECTED, ALL):
        for row in rejected:
            anchor = row.get("anchor_id")
            seeds, broken = (_seeds_of(by_id.get(anchor), by_id, f"anchor {anchor}", memo) if anchor
                             else (None, "no anchor"))
            items.append(Item(t, row=row, seeds=seeds, broken=broken))
    return items


def reason_counts(rejected: Iterable[dict]) -> Counter:
    return Counter(str(row["reason"]) for row in rejected)


def check_reason(reason: str, rejected: list[dict], iteration: str) -> None:
    counts = reason_counts(rejected)
    if reason not in counts:
        present = ", ".join(f"{r} ({n})" for r, n in counts.most_common()) or "none (nothing was rejected)"
        raise ShowError(f"no attempt of iteration {iteration} was rejected for {reason!r}; reasons present: {present}")


def resolve_seed(prefix: str, by_id: dict[str, Record]) -> Record:
    """The seed with this id or unambiguous id prefix; raises if there is none, or the record is not a seed."""
    seeds = {i: r for i, r in by_id.items() if r.is_seed}
    if any(i.startswith(prefix) for i in seeds):
        return resolve_id(prefix, seeds)  # raises if the prefix is ambiguous
    try:
        other = resolve_id(prefix, by_id)
    except LineageError:
        raise ShowError(f"--descends-from: no seed with id {prefix!r} among {len(seeds)} seeds") from None
    raise ShowError(f"--descends-from: record {other.id} is not a seed (iteration {other.iteration}); "
                    f"`isara lineage {other.id}` shows the seeds it reaches")


def select(items: list[Item], reason: str | None = None, seed_id: str | None = None,
           grep: str | None = None) -> list[Item]:
    """Items rejected for `reason`, descending from seed `seed_id`, and containing `grep` (case-insensitive,
    in the question or the answer); None means no filter."""
    needle = grep.casefold() if grep else None
    out = []
    for item in items:
        if reason is not None and item.reason != reason:
            continue
        if seed_id is not None and (item.seeds is None or seed_id not in item.seeds):
            continue
        if needle is not None and needle not in f"{item.question}\n{item.answer or ''}".casefold():
            continue
        out.append(item)
    return out


# ------------------------------------------------------------------------------------------------ formatting


def header(iteration: str, accepted: list[Record], rejected: list[dict], matched: int, shown: int) -> str:
    counts = reason_counts(rejected)
    by_reason = f" ({', '.join(f'{r} {n}' for r, n in counts.most_common())})" if counts else ""
    what = "seeds" if int(iteration) == 0 else "accepted"
    line = f"iteration {iteration}: {len(accepted)} {what}, {len(rejected)} rejected{by_reason}; "
    return line + (f"showing {shown} of {matched} matching" if shown < matched else f"showing {matched}")


def _clip(text: str, full: bool, width: int = WIDTH) -> str:
    if full:
        return text.replace("\n", "\n     ")
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def format_item(item: Item, full: bool = False) -> str:
    """A compact block: id and status, question, answer, seed ancestors and anchor (the lineage ids)."""
    if item.accepted:
        head = f"{item.id}  iter {item.iteration}  {'seed' if item.record.is_seed else 'accepted'}"
    else:
        head = f"attempt {item.row.get('attempt', '?')}  iter {item.iteration}  rejected: {item.reason}"
    answer = item.answer
    lines = [head, f"  Q: {_clip(item.question, full) or '(empty)'}",
             "  A: (not answered: rejected at the question)" if answer is None
             else f"  A: {_clip(answer, full) or '(empty)'}"]
    via = "" if item.accepted else " (via anchor)"
    seeds = f"{len(item.seeds)}{via}" if item.seeds is not None else f"? ({item.broken})"
    anchor = item.anchor_id or "-"
    lines.append(f"  seeds: {seeds}  anchor: {anchor}")
    return "\n".join(lines)


def item_json(item: Item) -> dict:
    """Everything the files hold about the item, plus status, iteration and the seed ancestors' ids."""
    data = item.record.model_dump(mode="json") if item.accepted else dict(item.row)
    data.update(status=ACCEPTED if item.accepted else REJECTED, iteration=item.iteration,
                seed_ancestors=sorted(item.seeds) if item.seeds is not None else None)
    if item.broken:
        data["lineage_error"] = item.broken
    return data


# -------------------------------------------------------------------------------------------- what is shown


def show_text(root: Path, iteration: str | None, status: str | None = None, reason: str | None = None,
              seed_prefix: str | None = None, grep: str | None = None, limit: int | None = None, full: bool = False,
              as_json: bool = False) -> str:
    """What `isara show` prints: ITERATION's accepted records or rejected attempts (default: the latest
    iteration's accepted records; 0: the seeds), as text blocks under a header, or as JSON lines.
    Raises ShowError (a LookupError) when nothing matches, naming what exists instead."""
    status = status or (REJECTED if reason is not None else ACCEPTED)
    t = pick_iteration(root, iteration)
    accepted, rejected = load_round(root, t)
    if reason is not None:
        check_reason(reason, rejected, t)
    by_id = load_all_records(root)
    seed_id = resolve_seed(seed_prefix, by_id).id if seed_prefix else None
    chosen = select(make_items(t, accepted, rejected, by_id, status), reason, seed_id, grep)
    if not chosen:
        asked = [f"rejected for {reason}" if reason else {ALL: "accepted or rejected"}.get(status, status)]
        asked += [f"descending from seed {seed_id}"] if seed_id else []
        asked += [f"containing {grep!r}"] if grep else []
        raise ShowError(f"iteration {t}: nothing {' '.join(asked)} ({len(accepted)} accepted, "
                        f"{len(rejected)} rejected in all)")
    n = limit if limit is not None else (0 if as_json else DEFAULT_LIMIT)
    shown = chosen[:n] if n else chosen
    if as_json:
        return "".join(json.dumps(item_json(i), ensure_ascii=False) + "\n" for i in shown)
    blocks = [header(t, accepted, rejected, len(chosen), len(shown)), *(format_item(i, full) for i in shown)]
    return "\n\n".join(blocks) + "\n"
