"""audit: prove that the artifacts on disk are the ones the pipeline produced, and that every generated
sample traces back, hop by hop, to the seeds.

    isara audit [--root .] [--metrics reports/audit.json]

Checks (each break is one line naming the file, record or stage; any break exits 1):

1. every output of every stage recorded in dvc.lock still has the hash dvc.lock records for it. The hashes
   are DVC's own (md5 of a file, md5 of the `.dir` manifest of a folder), computed by DVC's output objects,
   so this is exactly what `dvc status` compares, one line per output;
2. every generated record of iteration t names, as its generating model, the sha256 of
   artifacts/<prev>/model.gguf, the file dvc.lock records as the output of export@<prev> (prepare for
   prev = 0), and generate@t's lock entry depends on that very file hash;
3. every id a record cites (anchor, question and answer context) is in D(prev) =
   artifacts/<prev>/dataset.jsonl, the data set it was retrieved from; D(t) is D(prev) plus the records
   accepted in t, and D(0) holds only seeds, so every chain ends at the seeds;
4. record ids are unique and equal to the content hash (a tampered record is a finding, not a crash).

The DVC stage `audit` runs this after everything else and writes the summary as a metrics file.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from isara.lineage import LineageError, seed_ancestors
from isara.params import Iteration
from isara.paths import REPORTS, IterPaths
from isara.records import Record, file_sha256

AUDIT_STAGE = "audit"  # its own outputs are being written while it runs: never audited
AUDIT_METRICS = REPORTS / "audit.json"
MAX_IDS_SHOWN = 3


@dataclass
class AuditResult:
    findings: list[str] = field(default_factory=list)
    artifacts: int = 0  # outputs whose hash matched dvc.lock
    stages: int = 0  # stages with a dvc.lock entry
    records: int = 0  # distinct records checked, seeds and generated
    generated: int = 0  # generated records checked (iterations and the one-shot baseline)
    chains: int = 0  # generated records traced to the seeds
    seeds_reached: int = 0
    seeds: int = 0
    iterations: int = 0
    baseline: bool = False  # the one-shot baseline's generated records were audited too

    @property
    def ok(self) -> bool:
        return not self.findings

    def metrics(self) -> dict:
        return {"ok": int(self.ok), "findings": len(self.findings), "artifacts": self.artifacts,
                "stages": self.stages, "records": self.records, "generated": self.generated,
                "chains": self.chains, "seeds": self.seeds, "seeds_reached": self.seeds_reached,
                "iterations": self.iterations}

    def summary(self) -> str:
        return (f"audit passed: {self.artifacts} outputs of {self.stages} stages match dvc.lock; "
                f"{self.records} records checked ({self.seeds} seeds, {self.generated} generated in "
                f"{self.iterations} iterations{' and the one-shot baseline' if self.baseline else ''}); "
                f"{self.chains} chains reach {self.seeds_reached} of {self.seeds} seeds")


def _ids(ids: list[str]) -> str:
    shown = ", ".join(ids[:MAX_IDS_SHOWN])
    return shown + (f" and {len(ids) - MAX_IDS_SHOWN} more" if len(ids) > MAX_IDS_SHOWN else "")


# ------------------------------------------------------------------------------------------- 1. dvc.lock


@dataclass
class LockInfo:
    """What dvc.lock says: output path -> (producing stage, hash), and each stage's dependency hashes."""

    producer: dict[str, tuple[str, str]] = field(default_factory=dict)
    deps: dict[str, dict[str, str]] = field(default_factory=dict)


def check_lock(root: Path, result: AuditResult) -> LockInfo:
    """Recompute every locked output's hash with DVC's machinery and compare it with dvc.lock."""
    from dvc.exceptions import DvcException

    info = LockInfo()
    if not (root / "dvc.lock").is_file():
        result.findings.append(f"{root / 'dvc.lock'}: missing: nothing has been reproduced to audit")
        return info
    try:
        _check_lock(root, result, info)
    except DvcException as exc:  # not a DVC project, unparsable dvc.yaml/dvc.lock: one clear line, no traceback
        raise ValueError(f"{root}: DVC cannot read the project: {exc}") from exc
    return info


def _check_lock(root: Path, result: AuditResult, info: LockInfo) -> None:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            name = stage.name  # "prepare", "generate@1": the names dvc.lock and `dvc repro` use
            if name == AUDIT_STAGE or not any(o.hash_info for o in stage.outs):
                continue  # the audit itself, or a stage dvc.lock has no entry for (never run)
            result.stages += 1
            info.deps[name] = {str(d.def_path): d.hash_info.value for d in stage.deps if d.hash_info}
            for out in stage.outs:
                path = str(out.def_path)
                recorded = out.hash_info
                if not recorded:
                    result.findings.append(f"{path}: output of stage {name} has no hash in dvc.lock")
                    continue
                info.producer[path] = (name, recorded.value)
                if not out.exists:
                    result.findings.append(f"{path}: output of stage {name} is missing (dvc.lock records "
                                           f"{recorded.name} {recorded.value})")
                    continue
                actual = out.get_hash()
                if (actual.name, actual.value) != (recorded.name, recorded.value):
                    result.findings.append(f"{path}: {actual.name} {actual.value} does not match dvc.lock "
                                           f"({name} recorded {recorded.value}): modified after the stage ran")
                    continue
                result.artifacts += 1


# ------------------------------------------------------------------------------------------ 4. record ids


def load_checked(path: Path, root: Path, result: AuditResult,
                 verified: dict[str, Record] | None = None) -> list[Record]:
    """Read a JSONL of records; every unparsable line, schema error or id that is not the content hash
    becomes a finding (the record is then left out), and duplicate ids within the file too.

    verified maps line text -> the record it was checked to be, shared by the files of one audit: D(t) repeats
    D(prev) and generated(t) line for line (generate writes all three from the same records), so a line seen before
    is the same record without parsing and hashing it again (100,000 records over 10 iterations: 650,000 lines
    read, 100,000 of them hashed). A line edited in any byte is not in it and is checked in full."""
    rel = path.relative_to(root) if path.is_absolute() else path
    if not path.is_file():
        result.findings.append(f"{rel}: missing")
        return []
    if verified is None:
        verified = {}
    records: list[Record] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line or line.isspace():  # not line.strip(): that copies every line, and D(t) holds them all
            continue
        record = verified.get(line)
        if record is None:
            record, problem = check_line(line)
            if record is None:
                result.findings.append(f"{rel}:{lineno}: {problem}")
                continue
            verified[line] = record
        if record.id in seen:
            result.findings.append(f"{rel}:{lineno}: duplicate id {record.id} (first on line {seen[record.id]})")
            continue
        seen[record.id] = lineno
        records.append(record)
    return records


def check_line(line: str) -> tuple[Record | None, str]:
    """(the record, "") if the line is a valid record whose id is its content hash, else (None, what is wrong)."""
    # A line as write_jsonl writes it ({"id":"<id>", first): parsed, validated and hashed by pydantic in one call,
    # which raises on an id that is not the content hash. Anything else (a wrong or missing id, bad JSON, a schema
    # error) takes the path below, which says what is wrong.
    try:
        record = Record.model_validate_json(line)
    except ValidationError:
        record = None
    if record is not None and line.startswith(f'{{"id":"{record.id}"'):
        return record, ""
    try:
        row = json.loads(line)
        claimed = row.get("id", "") if isinstance(row, dict) else ""
        record = Record.model_validate({**row, "id": ""})  # computes the content hash
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"]) or "record"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return None, f"not a valid record: {where}: {err['msg']}{more}"
    except (json.JSONDecodeError, TypeError) as exc:
        return None, f"not a valid record: {type(exc).__name__}: {exc}"
    if claimed != record.id:
        return None, (f"record {claimed or '(no id)'} is not its content hash (content hashes to {record.id}): "
                      "the record was edited after it was written")
    return record, ""


# ------------------------------------------------------------------------------- 2 + 3. per generation round


@dataclass(frozen=True)
class Round:
    """One generation run: the stage that wrote it, its outputs, and the iteration it started from."""

    stage: str  # "generate@2", "baseline_one_shot"
    paths: IterPaths  # where its generated.jsonl and dataset.jsonl are
    prev: str  # D(prev) it retrieved from, M(prev) it generated with
    iteration: int  # what its records must say


def rounds(iterations: dict[str, Iteration], lock: LockInfo) -> list[Round]:
    """Every iteration (prev before t: check_schedule guarantees prev < t), then the one-shot baseline when
    dvc.lock says it ran (it generates from M0 and D0 like iteration 1, all in one round)."""
    out = [Round(f"generate@{t}", IterPaths(t), iterations[t].prev, int(t)) for t in sorted(iterations, key=int)]
    if "baseline_one_shot" in lock.deps:
        from isara.paths import baseline_paths

        out.append(Round("baseline_one_shot", baseline_paths("one_shot"), "0", 1))
    return out


def check_model(run: Round, generated: list[Record], root: Path, lock: LockInfo, result: AuditResult) -> None:
    """The model every record names is the GGUF the previous iteration produced, per dvc.lock."""
    gguf = IterPaths(run.prev).gguf
    producer_name = "prepare" if run.prev == "0" else f"export@{run.prev}"
    producer = lock.producer.get(str(gguf))
    if producer is None:
        result.findings.append(f"{gguf}: dvc.lock records no stage producing it (expected {producer_name})")
    else:
        stage, md5 = producer
        if stage != producer_name:
            result.findings.append(f"{gguf}: dvc.lock says {stage} produced it, expected {producer_name}")
        dep = lock.deps.get(run.stage, {}).get(str(gguf))
        if run.stage not in lock.deps:
            result.findings.append(f"{run.stage}: no entry in dvc.lock: the stage has not been reproduced")
        elif dep is None:
            result.findings.append(f"{run.stage}: dvc.lock records no dependency on {gguf}")
        elif dep != md5:
            result.findings.append(f"{run.stage}: dvc.lock records it ran on {gguf} md5 {dep}, but {stage} "
                                   f"produced md5 {md5}: {run.stage} is stale, rerun dvc repro")
    if not (root / gguf).is_file():
        if generated:
            result.findings.append(f"{gguf}: missing: cannot check the model hash of {len(generated)} records "
                                   f"of {run.stage}")
        return
    sha = file_sha256(root / gguf)
    wrong: dict[str | None, list[str]] = defaultdict(list)
    for r in generated:
        if r.model_sha256 != sha:
            wrong[r.model_sha256].append(r.id)
    for claimed, ids in wrong.items():
        result.findings.append(f"{run.paths.generated}: {len(ids)} record(s) ({_ids(ids)}) name model sha256 "
                               f"{claimed} but {gguf} (the model of iteration {run.prev}) has sha256 {sha}")


def check_citations(run: Round, generated: list[Record], previous: list[Record], result: AuditResult) -> None:
    """Every cited id is in D(prev), the data set the round retrieved its examples from."""
    known = {r.id for r in previous}
    source = IterPaths(run.prev).dataset
    generated_path = str(run.paths.generated)  # once per round, and each finding's text only for a finding
    for r in generated:
        if r.iteration != run.iteration:
            result.findings.append(f"{generated_path}: record {r.id} says iteration {r.iteration}, but {run.stage} "
                                   f"is iteration {run.iteration}")
        if not r.parent_ids():
            result.findings.append(f"{generated_path}: record {r.id} cites no in-context examples: its chain ends "
                                   "before a seed")
        cited = [("anchor_id", r.anchor_id)] if r.anchor_id is not None else []
        cited += [("question_context", n.id) for n in r.question_context]
        cited += [("answer_context", n.id) for n in r.answer_context]
        for role, cid in cited:
            if cid not in known:
                result.findings.append(f"{generated_path}: record {r.id} cites {cid} ({role}), which is not in "
                                       f"{source} (D({run.prev}), the data set it was retrieved from)")


def check_dataset_is_union(run: Round, dataset: list[Record], previous: list[Record], generated: list[Record],
                           root: Path, result: AuditResult) -> None:
    """D(t) must be exactly D(prev) followed by the records accepted in t: no record added or dropped on the way."""
    expected = [r.id for r in previous] + [r.id for r in generated]
    actual = [r.id for r in dataset]
    path = run.paths.dataset
    if actual == expected or not (root / path).is_file():  # a missing file is already a finding
        return
    expected_ids, actual_ids = set(expected), set(actual)  # once: per element it was quadratic in D(t)'s size
    extra = [i for i in actual if i not in expected_ids]
    lost = [i for i in expected if i not in actual_ids]
    if extra:
        result.findings.append(f"{path}: {len(extra)} record(s) ({_ids(extra)}) are neither in D({run.prev}) nor "
                               f"in {run.paths.generated}")
    if lost:
        result.findings.append(f"{path}: {len(lost)} record(s) ({_ids(lost)}) of D({run.prev}) + generated are "
                               "missing")
    if not extra and not lost:
        result.findings.append(f"{path}: records are not in the order D({run.prev}) then generated")


def run_audit(root: str | Path, iterations: dict[str, Iteration]) -> AuditResult:
    """Audit the project at root (artifact paths in dvc.lock and isara.paths are relative to it)."""
    root = Path(root).resolve()
    result = AuditResult(iterations=len(iterations))
    lock = check_lock(root, result)

    verified: dict[str, Record] = {}

    def load(path: Path) -> list[Record]:
        return load_checked(root / path, root, result, verified)

    datasets: dict[str, list[Record]] = {}
    seeds_path = IterPaths("0").dataset
    datasets["0"] = load(seeds_path)
    for r in datasets["0"]:
        if not r.is_seed or r.parent_ids() or r.anchor_id:
            result.findings.append(f"{seeds_path}: record {r.id} is not a seed (iteration {r.iteration}, "
                                   f"{len(r.parent_ids())} cited examples): D(0) must hold only seeds")
    result.seeds = sum(1 for r in datasets["0"] if r.is_seed)

    all_generated: list[Record] = []
    by_id: dict[str, Record] = {r.id: r for r in datasets["0"]}
    for run in rounds(iterations, lock):
        generated = load(run.paths.generated)
        dataset = load(run.paths.dataset)
        if run.stage.startswith("generate@"):
            datasets[run.paths.iteration] = dataset
        else:
            result.baseline = True
        previous = datasets.get(run.prev, [])
        check_model(run, generated, root, lock, result)
        check_citations(run, generated, previous, result)
        check_dataset_is_union(run, dataset, previous, generated, root, result)
        all_generated += generated
        for r in [*dataset, *generated]:
            by_id.setdefault(r.id, r)
    result.generated = len(all_generated)

    reached: set[str] = set()
    broken_chains = 0
    memo: dict[str, frozenset[str]] = {}  # each record's seeds computed once, from its parents' (lineage.py)
    for r in all_generated:
        try:
            seeds = seed_ancestors(r, by_id, memo)
        except (LineageError, RecursionError):
            broken_chains += 1  # the citation check above already named the missing id
            continue
        result.chains += 1
        reached |= seeds
    result.seeds_reached = len(reached)
    result.records = len(by_id)
    if broken_chains and not any("cites" in f for f in result.findings):
        result.findings.append(f"{broken_chains} generated record(s) have a chain that does not reach a seed")
    return result
