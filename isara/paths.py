"""Where every artifact lives: the one source of truth shared by the stages, the CLI and dvc.yaml's layout.

Iteration "0" is the starting point: the base model M0 (prepare) and the seed set D0 (seeds).
Iteration t >= 1 reads iteration prev(t) and writes its own folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ARTIFACTS = Path("artifacts")
REPORTS = Path("reports")
ITER_REPORTS = REPORTS / "iters"
# Markdown data cards, one per iteration (outside reports/iters, which the report stage depends on whole).
DATACARDS = REPORTS / "datacards"
# Progress of interrupted stages: outside DVC outputs (DVC deletes those before a rerun), ignored by git.
CHECKPOINTS = Path("checkpoints")
# The learned refusal judge (judge stage) and the baselines evaluated on the same prompts as every iteration.
JUDGE = ARTIFACTS / "judge"
JUDGE_METRICS = REPORTS / "judge.json"
BASELINES = ("base", "icl_knn", "sft_seed", "one_shot")
BASELINE_ARTIFACTS = ARTIFACTS / "baselines"
BASELINE_REPORTS = REPORTS / "baselines"


# `dvc exp run --temp` and queued experiments run in a copy of the project at <project>/.dvc/tmp/exps/<name>/
# (DVC's executors; DESIGN.md §4).
EXPERIMENT_COPY_PARTS = (".dvc", "tmp", "exps")


def project_root(cwd: Path | None = None) -> Path:
    """The project a stage belongs to: the working directory, or, inside an experiment's temp copy, the project
    that DVC copied it from."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    parts = cwd.parts
    n = len(EXPERIMENT_COPY_PARTS)
    for i in range(len(parts) - n, 0, -1):
        if parts[i : i + n] == EXPERIMENT_COPY_PARTS:
            return Path(*parts[:i])
    return cwd


def resolve_path(path: Path | str, cwd: Path | None = None) -> Path:
    """A path a user gave in params.yaml. Relative paths are taken from the working directory (the project root
    under `dvc repro`); in an experiment's temp copy, a relative path that the copy lacks (a file outside the
    repository, like `../benchmarks`) is taken from the project that DVC copied, so `dvc exp run --queue` and
    `--temp` read the same file as `dvc repro`."""
    path = Path(path)
    if path.is_absolute():
        return path
    cwd = Path.cwd() if cwd is None else Path(cwd)
    here = cwd / path
    if here.exists():
        return here
    origin = project_root(cwd)
    return origin / path if origin != cwd else here


@dataclass(frozen=True)
class IterPaths:
    iteration: str
    root: Path = ARTIFACTS
    reports_root: Path = ITER_REPORTS

    @property
    def dir(self) -> Path:
        return self.root / self.iteration

    @property
    def dataset(self) -> Path:
        """D(t): every record the next iteration retrieves from and finetune@t trains on."""
        return self.dir / "dataset.jsonl"

    @property
    def generated(self) -> Path:
        """The records accepted in this iteration (a subset of dataset.jsonl)."""
        return self.dir / "generated.jsonl"

    @property
    def rejected(self) -> Path:
        return self.dir / "rejected.jsonl"

    @property
    def attempts(self) -> Path:
        """generate's attempt log: a header line {"key": ...}, then one outcome per attempt, in order (the one-shot
        baseline continues generate@1's instead of making the same attempts again)."""
        return self.dir / "attempts.jsonl"

    @property
    def index(self) -> Path:
        """Annoy index over the questions of D(t-1), built by index@t."""
        return self.dir / "index"

    @property
    def hf(self) -> Path:
        """Transformers checkpoint of M(t) (prepare writes M0's)."""
        return self.dir / "hf"

    @property
    def gguf(self) -> Path:
        """llama.cpp model M(t) that generates round t+1."""
        return self.dir / "model.gguf"

    @property
    def responses(self) -> Path:
        """evaluate's raw responses to every eval prompt, with each judge's verdict (re-judge from here)."""
        return self.dir / "responses.jsonl"

    @property
    def reports(self) -> Path:
        return self.reports_root / self.iteration

    def metrics(self, stage: str) -> Path:
        return self.reports / f"{stage}.json"

    @property
    def package(self) -> Path:
        """M(t) as released (package@t): model card README.md, Ollama Modelfile (FROM ../model.gguf), LICENSE, NOTICE."""
        return self.dir / "package"

    @property
    def datacard(self) -> Path:
        """The markdown data card of iteration t (datacard@t); its figures are metrics("datacard")."""
        return DATACARDS / f"{self.iteration}.md"

    @property
    def train_log(self) -> Path:
        """DVCLive folder of finetune@t (loss curves)."""
        return self.reports / "train"


def iter_paths(iteration: str | int) -> IterPaths:
    return IterPaths(str(iteration))


def baseline_paths(name: str) -> IterPaths:
    """artifacts/baselines/<name>/ and reports/baselines/<name>/: the same file names as an iteration's."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {list(BASELINES)}")
    return IterPaths(name, root=BASELINE_ARTIFACTS, reports_root=BASELINE_REPORTS)
