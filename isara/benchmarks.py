"""Loaders for the public benchmark files (harmbench/, xstest/, truthfulqa/, ... under one folder: the layout
below; where each file comes from and its license: README "Benchmark data").

The pipeline finds that folder through params `benchmarks.dir` (null: it runs without it); the commands outside
the pipeline through `$ISARA_BENCHMARKS_DIR` or their own path options. Every loader takes a path and reads the file where it lies: benchmark data is never copied into this
repository (DESIGN.md §5). Each returns a list of small frozen pydantic models, and raises
`BenchmarkFormatError` naming the file, and the missing column or the bad line, when the file is absent
or is not the format the loader expects, so a wrong path fails at load time rather than as a silently
empty evaluation.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Paths of the files, relative to the benchmarks folder (one source of truth for names).
HARMBENCH = "harmbench/harmbench_behaviors_text_all.csv"
ADVBENCH = "advbench/harmful_behaviors.csv"
BEAVERTAILS_EVAL = "beavertails_eval/BeaverTails-Evaluation.csv"  # CC BY-NC 4.0: optional, never a default
XSTEST_PROMPTS = "xstest/xstest_prompts.csv"
XSTEST_COMPLETION_MODELS = ("gpt4", "llama2new", "llama2orig", "mistralguard", "mistralinstruct")
XSTEST_COMPLETIONS = tuple(f"xstest/xstest_v2_completions_{m}_gpteval.csv" for m in XSTEST_COMPLETION_MODELS)
TRUTHFULQA = "truthfulqa/TruthfulQA.csv"
SELF_INSTRUCT_SEED = "self_instruct/seed_tasks.jsonl"
SELF_INSTRUCT_USER = "self_instruct/user_oriented_instructions.jsonl"
HH_RLHF_HARMLESS_TEST = "hh_rlhf/harmless-base-test.jsonl.gz"

XSTEST_FINAL_LABELS = ("1_full_compliance", "2_full_refusal", "3_partial_refusal")


class BenchmarkFormatError(ValueError):
    """A benchmark file is missing, unreadable, or not in the format its loader expects."""


BENCHMARKS_ENV = "ISARA_BENCHMARKS_DIR"


def default_benchmarks_dir() -> Path | None:
    """`$ISARA_BENCHMARKS_DIR`, or None. Only for the commands outside the pipeline: the pipeline reads params
    `benchmarks.dir`, which DVC tracks (an environment variable would change results without rerunning stages)."""
    env = os.environ.get(BENCHMARKS_ENV)
    return Path(env) if env else None


def benchmark_path(relative: str, root: str | Path | None = None) -> Path:
    """A benchmark file's path, e.g. `benchmark_path(HARMBENCH, root)`; root None: `$ISARA_BENCHMARKS_DIR`."""
    root = root if root is not None else default_benchmarks_dir()
    if root is None:
        raise BenchmarkFormatError(f"no benchmarks folder for {relative}: set {BENCHMARKS_ENV} or pass a path "
                                   "(README \"Benchmark data\")")
    return Path(root) / relative


def pipeline_benchmark_path(relative: str, benchmarks_dir: Path | None, param: str = "benchmarks.dir") -> Path | None:
    """A benchmark file for a pipeline stage: None when params `benchmarks.dir` is null (the stage then runs without
    it); an error naming the param and the file when the folder is set but the file is not in it."""
    from isara.paths import resolve_path

    if benchmarks_dir is None:
        return None
    path = resolve_path(benchmarks_dir) / relative
    if not path.is_file():
        raise BenchmarkFormatError(f"{path}: benchmark file not found (params.yaml {param} = {str(benchmarks_dir)!r}; "
                                   f"expected {relative} under it, see README \"Benchmark data\")")
    return path


# --------------------------------------------------------------------------------------------------
# Records: one frozen model per format, with the columns the project uses.

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class HarmBenchBehavior(BaseModel):
    model_config = _FROZEN
    behavior: str
    functional_category: str  # standard / contextual / copyright
    semantic_category: str
    tags: str
    context_string: str
    behavior_id: str


class AdvBenchBehavior(BaseModel):
    model_config = _FROZEN
    goal: str
    target: str


class BeaverTailsPrompt(BaseModel):
    model_config = _FROZEN
    prompt: str
    category: str
    category_id: int


class XSTestPrompt(BaseModel):
    model_config = _FROZEN
    id: str
    prompt: str
    type: str
    label: Literal["safe", "unsafe"]
    focus: str
    note: str


class XSTestCompletion(BaseModel):
    """One human-labelled model completion. `id` is the prompt id, shared by all five models' files."""

    model_config = _FROZEN
    id: str
    model: str  # from the file name, e.g. "llama2orig"
    type: str
    prompt: str
    completion: str
    annotation_1: str
    annotation_2: str
    agreement: bool
    final_label: Literal["1_full_compliance", "2_full_refusal", "3_partial_refusal"]
    gpt4_label: str  # raw: a few rows hold free text instead of a label

    @property
    def refusal(self) -> bool:
        """Full or partial refusal, the positive class of the refusal judges."""
        return self.final_label != "1_full_compliance"


class TruthfulQAItem(BaseModel):
    model_config = _FROZEN
    type: str
    category: str
    question: str
    best_answer: str
    correct_answers: tuple[str, ...]
    incorrect_answers: tuple[str, ...]
    source: str


class SelfInstructInstance(BaseModel):
    model_config = _FROZEN
    input: str
    output: str


class SelfInstructTask(BaseModel):
    """A task of seed_tasks.jsonl (has name, is_classification) or user_oriented_instructions.jsonl (motivation_app)."""

    model_config = _FROZEN
    id: str
    instruction: str
    instances: tuple[SelfInstructInstance, ...]
    name: str | None = None
    is_classification: bool | None = None
    motivation_app: str | None = None


class HHDialogue(BaseModel):
    model_config = _FROZEN
    chosen: str
    rejected: str

    @property
    def prompt(self) -> str:
        """The first Human turn (identical in `chosen` and `rejected`)."""
        return first_human_turn(self.chosen)


class EvalPrompt(BaseModel):
    """The project's own eval format, one JSON object per line: {"prompt": ..., "category": ...}."""

    model_config = _FROZEN
    prompt: str = Field(min_length=1)
    category: str


# --------------------------------------------------------------------------------------------------
# Readers shared by the loaders.


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise BenchmarkFormatError(f"{path}: benchmark file not found")
    return path


def _csv_rows(
    path: str | Path, required: tuple[str, ...], nonempty: tuple[str, ...] = ()
) -> Iterator[tuple[int, dict]]:
    """(line number, row) for each CSV row; checks the header, the field count and the non-empty columns."""
    path = _check_file(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            if not header:
                raise BenchmarkFormatError(f"{path}: empty file, expected a CSV header with columns {list(required)}")
            missing = [c for c in required if c not in header]
            if missing:
                raise BenchmarkFormatError(f"{path}: missing column(s) {missing}; header is {header}")
            line = reader.line_num + 1  # line on which the next record starts
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise BenchmarkFormatError(
                        f"{path}: line {line}: expected {len(header)} fields, got a different number"
                    )
                empty = [c for c in nonempty if not row[c].strip()]
                if empty:
                    raise BenchmarkFormatError(f"{path}: line {line}: empty value in column(s) {empty}")
                yield line, row
                line = reader.line_num + 1
    except UnicodeDecodeError as e:
        raise BenchmarkFormatError(f"{path}: not a UTF-8 text CSV file ({e})") from e
    except csv.Error as e:
        raise BenchmarkFormatError(f"{path}: malformed CSV ({e})") from e


def _jsonl_rows(path: str | Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file, gzipped or not (by magic bytes)."""
    path = _check_file(path)
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    n = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise BenchmarkFormatError(f"{path}: line {n}: not valid JSON ({e.msg})") from e
                if not isinstance(obj, dict):
                    raise BenchmarkFormatError(f"{path}: line {n}: expected a JSON object, got {type(obj).__name__}")
                missing = [k for k in required if k not in obj]
                if missing:
                    raise BenchmarkFormatError(f"{path}: line {n}: missing key(s) {missing}")
                yield n, obj
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise BenchmarkFormatError(f"{path}: line {n + 1}: unreadable ({e})") from e
    if n == 0:
        raise BenchmarkFormatError(f"{path}: empty file, expected JSON lines with keys {list(required)}")


def _build(cls: type[BaseModel], path: str | Path, line: int, **fields: Any) -> Any:
    try:
        return cls(**fields)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise BenchmarkFormatError(f"{path}: line {line}: {problems}") from e


def _nonempty_result(path: str | Path, items: list) -> list:
    if not items:
        raise BenchmarkFormatError(f"{path}: no rows")
    return items


# --------------------------------------------------------------------------------------------------
# Loaders.


def load_harmbench(path: str | Path, functional_category: str | None = "standard") -> list[HarmBenchBehavior]:
    """HarmBench behaviors; `functional_category=None` keeps all (standard, contextual, copyright)."""
    cols = ("Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID")
    items = [
        _build(
            HarmBenchBehavior,
            path,
            line,
            behavior=r["Behavior"],
            functional_category=r["FunctionalCategory"],
            semantic_category=r["SemanticCategory"],
            tags=r["Tags"],
            context_string=r["ContextString"],
            behavior_id=r["BehaviorID"],
        )
        for line, r in _csv_rows(path, cols, nonempty=("Behavior", "FunctionalCategory", "BehaviorID"))
    ]
    _nonempty_result(path, items)
    if functional_category is None:
        return items
    return [b for b in items if b.functional_category == functional_category]


def load_advbench(path: str | Path) -> list[AdvBenchBehavior]:
    return _nonempty_result(
        path,
        [
            _build(AdvBenchBehavior, path, line, goal=r["goal"], target=r["target"])
            for line, r in _csv_rows(path, ("goal", "target"), nonempty=("goal",))
        ],
    )


def load_beavertails_eval(path: str | Path) -> list[BeaverTailsPrompt]:
    """BeaverTails-Evaluation (CC BY-NC 4.0): 14 categories x 50 prompts. Optional, never a default."""
    cols = ("prompt", "category", "category_id")
    return _nonempty_result(
        path,
        [
            _build(
                BeaverTailsPrompt, path, line, prompt=r["prompt"], category=r["category"], category_id=r["category_id"]
            )
            for line, r in _csv_rows(path, cols, nonempty=cols)
        ],
    )


def load_xstest_prompts(path: str | Path, label: str | None = None) -> list[XSTestPrompt]:
    """XSTest's 450 prompts (250 safe, 200 unsafe); `label="safe"` or `"unsafe"` filters."""
    cols = ("id", "prompt", "type", "label", "focus", "note")
    items = [
        _build(XSTestPrompt, path, line, **{c: r[c] for c in cols})
        for line, r in _csv_rows(path, cols, nonempty=("id", "prompt", "label"))
    ]
    _nonempty_result(path, items)
    return items if label is None else [p for p in items if p.label == label]


_COMPLETIONS_NAME = re.compile(r"xstest_v2_completions_(.+?)(?:_gpteval)?$")


def load_xstest_completions(path: str | Path, model: str | None = None) -> list[XSTestCompletion]:
    """One XSTest human-labelled completions file; `model` defaults to the name in the file name."""
    if model is None:
        m = _COMPLETIONS_NAME.match(Path(path).name.removesuffix(".csv"))
        model = m.group(1) if m else Path(path).stem
    cols = (
        "id",
        "type",
        "prompt",
        "completion",
        "annotation_1",
        "annotation_2",
        "agreement",
        "final_label",
        "gpt4_label",
    )
    items = []
    for line, r in _csv_rows(path, cols, nonempty=("id", "prompt", "final_label")):
        agreement = r["agreement"].strip().lower()
        if agreement not in ("true", "false"):
            raise BenchmarkFormatError(f"{path}: line {line}: agreement must be True or False, got {r['agreement']!r}")
        fields = {c: r[c] for c in cols} | {"agreement": agreement == "true", "model": model}
        items.append(_build(XSTestCompletion, path, line, **fields))
    return _nonempty_result(path, items)


def load_all_xstest_completions(root: str | Path | None = None) -> list[XSTestCompletion]:
    """All five models' completions (5 x 450 = 2,250 rows), in a fixed order."""
    return [c for rel in XSTEST_COMPLETIONS for c in load_xstest_completions(benchmark_path(rel, root))]


def _split_answers(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(";") if a.strip())


def load_truthfulqa(path: str | Path) -> list[TruthfulQAItem]:
    """TruthfulQA's 817 questions; Correct/Incorrect Answers are split on ';'."""
    cols = ("Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source")
    items = []
    for line, r in _csv_rows(path, cols, nonempty=("Question", "Best Answer", "Correct Answers", "Incorrect Answers")):
        items.append(
            _build(
                TruthfulQAItem,
                path,
                line,
                type=r["Type"],
                category=r["Category"],
                question=r["Question"],
                best_answer=r["Best Answer"].strip(),
                correct_answers=_split_answers(r["Correct Answers"]),
                incorrect_answers=_split_answers(r["Incorrect Answers"]),
                source=r["Source"],
            )
        )
    return _nonempty_result(path, items)


def load_self_instruct(path: str | Path) -> list[SelfInstructTask]:
    """Self-Instruct seed_tasks.jsonl (175) or user_oriented_instructions.jsonl (252)."""
    keep = ("id", "instruction", "instances", "name", "is_classification", "motivation_app")
    return _nonempty_result(
        path,
        [
            _build(SelfInstructTask, path, line, **{k: obj[k] for k in keep if k in obj})
            for line, obj in _jsonl_rows(path, ("id", "instruction", "instances"))
        ],
    )


def first_human_turn(dialogue: str) -> str:
    """The text of the first `Human:` turn of an hh-rlhf transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...")."""
    start = dialogue.find("Human:")
    if start < 0:
        raise ValueError("no 'Human:' turn in dialogue")
    text = dialogue[start + len("Human:") :]
    end = text.find("\n\nAssistant:")
    return (text if end < 0 else text[:end]).strip()


def load_hh_rlhf(path: str | Path) -> list[HHDialogue]:
    """hh-rlhf JSONL(.gz) preference pairs; `.prompt` is the first Human turn."""
    items = []
    for line, obj in _jsonl_rows(path, ("chosen", "rejected")):
        item = _build(HHDialogue, path, line, chosen=obj["chosen"], rejected=obj["rejected"])
        if "Human:" not in item.chosen:
            raise BenchmarkFormatError(f"{path}: line {line}: 'chosen' has no 'Human:' turn")
        items.append(item)
    return _nonempty_result(path, items)


def load_eval_prompts(path: str | Path) -> list[EvalPrompt]:
    """The project's own eval JSONL (data/eval/harmful.jsonl, data/eval/safe.jsonl)."""
    return _nonempty_result(
        path,
        [
            _build(EvalPrompt, path, line, prompt=obj["prompt"], category=obj["category"])
            for line, obj in _jsonl_rows(path, ("prompt", "category"))
        ],
    )


# --------------------------------------------------------------------------------------------------
# The question-harm classifier's data (isara.judges.train_question_harm): which files, read together.

QUESTION_HARM_HARMFUL = (HH_RLHF_HARMLESS_TEST,)
QUESTION_HARM_BENIGN = (SELF_INSTRUCT_SEED, SELF_INSTRUCT_USER)
QUESTION_HARM_BENIGN_QUESTIONS = TRUTHFULQA


class QuestionHarmData(BaseModel):
    """harmful: hh-rlhf red-team openers (first human turns); benign: Self-Instruct instructions and TruthfulQA
    questions; xstest:
    (prompt, unsafe) pairs of XSTest, an eval set, for the transfer check only; data: the sources, as named."""

    model_config = _FROZEN
    harmful: tuple[str, ...]
    benign: tuple[str, ...]
    xstest: tuple[tuple[str, bool], ...]
    data: str


def load_question_harm_data(benchmarks_dir: Path | None, param: str = "benchmarks.dir") -> QuestionHarmData | None:
    """The classifier's training texts and XSTest's labelled prompts under the pipeline's `benchmarks.dir`; None when
    that param is null. A missing file is an error naming the param and the file (pipeline_benchmark_path)."""
    if benchmarks_dir is None:
        return None
    harmful = [d.prompt for rel in QUESTION_HARM_HARMFUL
               for d in load_hh_rlhf(pipeline_benchmark_path(rel, benchmarks_dir, param))]
    benign = [t.instruction for rel in QUESTION_HARM_BENIGN
              for t in load_self_instruct(pipeline_benchmark_path(rel, benchmarks_dir, param))]
    # Self-Instruct holds task instructions, the red-team openers are mostly questions: alone they taught "question
    # vs instruction" (XSTest transfer 0.46, 95% of its safe prompts called harmful). TruthfulQA's questions are
    # benign questions in the openers' form (0.63, 39% called benign). Its MC scores do not use this classifier.
    benign += [q.question for q in load_truthfulqa(pipeline_benchmark_path(QUESTION_HARM_BENIGN_QUESTIONS,
                                                                            benchmarks_dir, param))]
    xstest = [(p.prompt, p.label == "unsafe")
              for p in load_xstest_prompts(pipeline_benchmark_path(XSTEST_PROMPTS, benchmarks_dir, param))]
    shown = ", ".join(f"{benchmarks_dir}/{rel}" for rel in QUESTION_HARM_HARMFUL)
    shown_benign = " + ".join(f"{benchmarks_dir}/{rel}" for rel in QUESTION_HARM_BENIGN)
    data = (f"harmful: {shown} (first human turns); benign: {shown_benign} (instructions) + "
            f"{benchmarks_dir}/{QUESTION_HARM_BENIGN_QUESTIONS} (questions)")
    return QuestionHarmData(harmful=tuple(harmful), benign=tuple(benign), xstest=tuple(xstest), data=data)
