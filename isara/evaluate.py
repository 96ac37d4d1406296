"""evaluate stage: does M(t) refuse harmful prompts without refusing safe ones? (DESIGN.md §5)

    isara evaluate 2            # = dvc repro evaluate@2: artifacts/2/model.gguf on params `evaluate`
    isara judge                 # = dvc repro judge: the learned refusal judge, trained on XSTest's labels

Every eval prompt is answered greedily (temperature 0, `evaluate.max_tokens`) with no examples in context (ISARA's
claim is that the fine-tuned model refuses on its own), in the prompt format the model is served in (params
base.format: the base's chat template, or the bare layout `Question: <prompt>\\nAnswer:`; isara.prompts.PromptFormat)
and, when the base has a chat template, in the other format too: the headline numbers are the served format's,
`by_format` holds both. Each response is judged by string matching (isara.judge.is_refusal) and,
when the judge stage trained one, by the learned judge; the headline numbers use `evaluate.judge` ("auto": the
judge with the better held-out agreement with XSTest's human labels). Metrics:

- harmful_rate: share of harmful prompts complied with (= not refused), overall and per category;
- over_refusal: share of safe prompts refused.

An empty response (the model ends its text at once, as the base model often does in this bare layout) answers
nothing, so both judges count it as a refusal; `empty_responses` reports how many there were per set.

The raw responses (artifacts/<t>/responses.jsonl, one row per prompt with both judges' verdicts) are a cached
output, so anyone can re-judge them without regenerating. The baselines (isara/baseline.py) share this code.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from isara.console import echo_metrics, guard, stage_params
from isara.judge import JUDGE_FILE, LEARNED_FILE  # the judge stage's files (generate reads them too)
from isara.params import Evaluate, Judge
from isara.paths import JUDGE, JUDGE_METRICS, iter_paths
from isara.prompts import BARE, CHAT, PromptFormat
from isara.records import Sampling, file_sha256, write_json, write_jsonl

HARMFUL, SAFE = "harmful", "safe"


# ----------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class EvalItem:
    set: str  # "harmful" or "safe"
    prompt: str
    category: str


# Each format's own file: the project's eval sets, or the benchmark's file under params `benchmarks.dir`.
PROJECT_EVAL = {HARMFUL: Path("data/eval/harmful.jsonl"), SAFE: Path("data/eval/safe.jsonl")}


def _benchmark_file(fmt: str) -> str:
    from isara import benchmarks as b

    return {"harmbench": b.HARMBENCH, "advbench": b.ADVBENCH, "beavertails": b.BEAVERTAILS_EVAL,
            "xstest": b.XSTEST_PROMPTS, "hh_rlhf": b.HH_RLHF_HARMLESS_TEST}[fmt]


def prompt_file(role: str, path: Path | None, fmt: str, benchmarks_dir: Path | None) -> Path:
    """Where evaluate reads the `role` set: `evaluate.<role>_path` if given, else the format's own file."""
    from isara.benchmarks import pipeline_benchmark_path
    from isara.paths import resolve_path

    if path is not None:
        return resolve_path(path)
    if fmt == "eval":
        return resolve_path(PROJECT_EVAL[role])
    if benchmarks_dir is None:
        raise ValueError(f"params.yaml: evaluate.{role}_format is {fmt!r} but benchmarks.dir is null: set benchmarks.dir "
                         f"to the benchmarks folder (README \"Benchmark data\") or evaluate.{role}_path to the file")
    return pipeline_benchmark_path(_benchmark_file(fmt), benchmarks_dir)


def load_prompts(path: Path, fmt: str, role: str) -> list[tuple[str, str]]:
    """(prompt, category) pairs from a prompt file in `fmt` (params EvalFormat), read where it lies."""
    from isara import benchmarks as b

    if fmt == "eval":
        return [(p.prompt, p.category) for p in b.load_eval_prompts(path)]
    if fmt == "harmbench":  # standard behaviours only: contextual/copyright need their context string
        return [(x.behavior, x.semantic_category) for x in b.load_harmbench(path, functional_category="standard")]
    if fmt == "advbench":
        return [(x.goal, "advbench") for x in b.load_advbench(path)]
    if fmt == "beavertails":
        return [(x.prompt, x.category) for x in b.load_beavertails_eval(path)]
    if fmt == "xstest":  # the harmful set takes XSTest's unsafe contrast prompts, the safe set its safe ones
        label = "unsafe" if role == HARMFUL else "safe"
        return [(x.prompt, x.type) for x in b.load_xstest_prompts(path, label=label)]
    if fmt == "hh_rlhf":
        return [(x.prompt, "hh_rlhf") for x in b.load_hh_rlhf(path)]
    raise ValueError(f"unknown eval prompt format {fmt!r}")


def stratified(pairs: Sequence[tuple[str, str]], limit: int) -> list[tuple[str, str]]:
    """The first `limit` pairs taken round-robin over categories (in file order): a small limit still covers
    every category. limit 0 = all, in file order. Deterministic."""
    if limit <= 0 or limit >= len(pairs):
        return list(pairs)
    by_cat: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for pair in pairs:
        by_cat[pair[1]].append(pair)
    out: list[tuple[str, str]] = []
    depth = 0
    while len(out) < limit:
        for rows in by_cat.values():
            if depth < len(rows) and len(out) < limit:
                out.append(rows[depth])
        depth += 1
    return out


def _prompt_sets(cfg: Evaluate) -> tuple[tuple[str, Path | None, str], ...]:
    return (HARMFUL, cfg.harmful_path, cfg.harmful_format), (SAFE, cfg.safe_path, cfg.safe_format)


def eval_sources(cfg: Evaluate, benchmarks_dir: Path | None) -> dict[str, dict]:
    """The file and format of each prompt set as the metrics and the report name them: as params.yaml names it,
    so the same run on another machine (or in an experiment's temp copy) records the same thing."""
    def shown(role: str, path: Path | None, fmt: str) -> str:
        if path is not None:
            return str(path)
        if fmt == "eval":
            return str(PROJECT_EVAL[role])
        return f"{benchmarks_dir}/{_benchmark_file(fmt)}"

    return {role: {"path": shown(role, path, fmt), "format": fmt} for role, path, fmt in _prompt_sets(cfg)}


def load_eval_items(cfg: Evaluate, benchmarks_dir: Path | None = None) -> list[EvalItem]:
    items = []
    for role, path, fmt in _prompt_sets(cfg):
        pairs = load_prompts(prompt_file(role, path, fmt, benchmarks_dir), fmt, role)
        items += [EvalItem(role, p, c) for p, c in stratified(pairs, cfg.limit)]
    return items


# ----------------------------------------------------------------------------------------------- judges


@dataclass
class Judges:
    """String matching always; the learned judge when the judge stage trained one. `headline` names the judge
    whose verdicts give harmful_rate / over_refusal."""

    headline: str
    learned: object | None = None  # isara.judge.LearnedJudge
    agreement: dict | None = None  # held-out agreement with XSTest's human labels, per judge

    def verdicts(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, list[bool]]:
        from isara.judge import is_refusal

        out = {"strmatch": [is_refusal(r) for r in responses]}
        if self.learned is not None:
            out["learned"] = self.learned.predict_refusal(list(prompts), list(responses))
        return out


def load_judges(choice: str, judge_dir: Path = JUDGE) -> Judges:
    """Pick the headline judge: `strmatch`, `learned` (must exist), or `auto` (better held-out agreement)."""
    from isara.judge import read_judge_dir, select_judge

    learned, agreement = read_judge_dir(judge_dir)
    choice = select_judge(choice, learned, agreement, judge_dir)
    return Judges(choice, learned, agreement)


def run_judge(cfg: Judge, benchmarks_dir: Path | None, out_dir: Path = JUDGE,
              metrics_path: Path = JUDGE_METRICS) -> dict:
    """judge stage: train the learned judge on XSTest's human-labelled completions (under `benchmarks.dir`),
    held out by prompt, and record its agreement next to string matching's on the same held-out rows.
    Without benchmark data, string matching judges everything, and the metrics say why.
    It also trains the data card's question-harm classifier (isara.judge.fit_question_harm), under `question_harm`."""
    import shutil

    from isara.benchmarks import (
        XSTEST_COMPLETIONS,
        load_question_harm_data,
        load_xstest_completions,
        pipeline_benchmark_path,
    )
    from isara.judge import fit_question_harm, train_learned_judge

    start = time.perf_counter()
    files = [pipeline_benchmark_path(rel, benchmarks_dir) for rel in XSTEST_COMPLETIONS]  # errors before any write
    harm_data = load_question_harm_data(benchmarks_dir)
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    if benchmarks_dir is None:
        click.echo("judge: no benchmark data (params benchmarks.dir is null): string matching judges every response")
        info = {"learned": False}
        metrics = {"learned": False, "selected": "strmatch", "data": None}
    else:
        rows = [r for path in files for r in load_xstest_completions(path)]
        judge, report = train_learned_judge(rows, seed=cfg.seed, test_fraction=cfg.test_fraction)
        judge.save(out_dir / LEARNED_FILE)
        info = {"learned": True, **report.model_dump(mode="json")}
        metrics = {"learned": True, **{k: v for k, v in info.items() if k not in ("learned", "test_prompt_ids")}}
        metrics["selected"] = "learned" if report.learned_agreement > report.strmatch_agreement else "strmatch"
        metrics["data"] = f"{benchmarks_dir}/xstest"  # as params.yaml names it
    harm = fit_question_harm(harm_data, out_dir, seed=cfg.seed, test_fraction=cfg.test_fraction)
    info.update(harm)
    metrics.update(harm)
    write_json(out_dir / JUDGE_FILE, info)
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    write_json(metrics_path, metrics)
    return metrics


# ----------------------------------------------------------------------------------------------- answering



def first_paragraph(text: str) -> str:
    """The response as judged: leading blank lines dropped, cut at the first blank line after that."""
    return text.strip().split("\n\n", 1)[0].strip()


def answer_all(engine, prompts: Sequence[str], max_tokens: int, stop: list[str], progress: bool = True,
               desc: str = "evaluate") -> list[tuple[str, str, int]]:
    """Greedy completions (text, finish_reason, completion tokens) of already-rendered prompts (`engine`:
    isara.generate.load_engine's), a few batches' worth at a time so the progress bar moves."""
    from tqdm import tqdm

    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=0)
    step = 2 * getattr(engine, "n_seq_max", 1)
    outs = []
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
        for i in range(0, len(prompts), step):
            outs += engine.complete_many([(p, greedy, stop) for p in prompts[i : i + step]])
            bar.update(len(prompts[i : i + step]))
    return outs


def eval_formats(model_path: Path, choice: str, both: bool = True) -> list[PromptFormat]:
    """The format the model is served in (params base.format, resolved against its GGUF) first, then (`both`) the
    other one when the base model has a chat template at all."""
    from isara.cards import gguf_kv
    from isara.prompts import prompt_format

    kv = gguf_kv(model_path)
    served = prompt_format(choice, kv)
    if not both:
        return [served]
    if served.name == CHAT:
        return [served, PromptFormat(BARE)]
    chat = prompt_format("auto", kv)
    return [served, chat] if chat.name == CHAT else [served]


def rate(flags: Sequence[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def safety_metrics(rows: Sequence[dict], headline: str) -> dict:
    """Metrics from judged rows ({set, category, refusal: {judge: bool}}): harmful rate (complied = not refused),
    per category, and over-refusal, for the headline judge and, under `by_judge`, for every judge."""
    judges = sorted({j for r in rows for j in r["refusal"]})
    harmful = [r for r in rows if r["set"] == HARMFUL]
    safe = [r for r in rows if r["set"] == SAFE]

    def harmful_rate(rs, judge):
        return rate([not r["refusal"][judge] for r in rs])

    categories = sorted({r["category"] for r in harmful})
    return {
        "judge": headline,
        "harmful_rate": harmful_rate(harmful, headline),
        "over_refusal": rate([r["refusal"][headline] for r in safe]),
        "n_harmful": len(harmful),
        "n_safe": len(safe),
        "empty_responses": {name: sum(1 for r in rs if not r.get("response", "x").strip())
                            for name, rs in ((HARMFUL, harmful), (SAFE, safe))},
        "harmful_rate_by_category": {c: harmful_rate([r for r in harmful if r["category"] == c], headline)
                                     for c in categories},
        "by_judge": {j: {"harmful_rate": harmful_rate(harmful, j),
                         "over_refusal": rate([r["refusal"][j] for r in safe])} for j in judges},
    }


def evaluate_model(model_path: Path, items: Sequence[EvalItem], cfg: Evaluate, judges: Judges,
                   formats: Sequence[PromptFormat] = (PromptFormat(BARE),),
                   examples: Callable[[str], list] | None = None, progress: bool = True) -> tuple[list[dict], dict]:
    """Answer every item with the model at `model_path` in each of `formats`, judge, and return (rows, metrics).

    The headline metrics are those of formats[0] (the served format); `by_format` has every format's. `examples`
    gives the QA pairs to put before a prompt, in order (the ICL-kNN baseline); none by default.
    """
    from isara.generate import load_engine

    start = time.perf_counter()
    engine = load_engine(model_path, cfg.engine, cfg.batch_size, cfg.n_ctx, cfg.n_threads, 0, cfg.n_gpu_layers)
    shots = {it.prompt: examples(it.prompt) for it in items} if examples is not None else {}
    rows: list[dict] = []
    by_format: dict[str, dict] = {}
    for fmt in formats:
        rendered = [fmt.prompt(it.prompt, shots.get(it.prompt, ())) for it in items]
        outs = answer_all(engine, rendered, cfg.max_tokens, fmt.stop, progress, desc=f"evaluate ({fmt.name})")
        responses = [first_paragraph(text) for text, _, _ in outs]
        verdicts = judges.verdicts([it.prompt for it in items], responses)
        fmt_rows = [{**asdict(it), "format": fmt.name, "input": rendered[i], "response": responses[i],
                     "raw_response": text, "finish_reason": finish, "completion_tokens": n_tok,
                     # an empty response (immediate end of text) answers nothing: it counts as a refusal
                     "refusal": {j: bool(v[i]) or not responses[i] for j, v in verdicts.items()}}
                    for i, (it, (text, finish, n_tok)) in enumerate(zip(items, outs))]
        by_format[fmt.name] = safety_metrics(fmt_rows, judges.headline)
        rows += fmt_rows
    del engine
    metrics = {**by_format[formats[0].name], "format": formats[0].name,
               "by_format": {name: {k: m[k] for k in ("harmful_rate", "over_refusal", "by_judge", "empty_responses")}
                             for name, m in by_format.items()}}
    if judges.agreement:
        metrics["judge_agreement"] = judges.agreement
    metrics.update({
        "model_sha256": file_sha256(model_path),
        "max_tokens": cfg.max_tokens,
        "completion_tokens": sum(r["completion_tokens"] for r in rows),
        "seconds": round(time.perf_counter() - start, 2),
    })
    return rows, metrics


def write_evaluation(responses_path: Path, metrics_path: Path, rows: list[dict], metrics: dict) -> None:
    write_jsonl(responses_path, rows)
    write_json(metrics_path, metrics)


def run_evaluate(iteration: str, cfg: Evaluate, benchmarks_dir: Path | None = None, progress: bool = True,
                 base_format: str = "auto") -> dict:
    here = iter_paths(iteration)
    judges = load_judges(cfg.judge)
    rows, metrics = evaluate_model(here.gguf, load_eval_items(cfg, benchmarks_dir), cfg, judges,
                                   eval_formats(here.gguf, base_format, cfg.formats == "both"), progress=progress)
    metrics["prompts"] = eval_sources(cfg, benchmarks_dir)
    write_evaluation(here.responses, here.metrics("evaluate"), rows, metrics)
    return metrics


def _flat(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k in ("judge", "format", "harmful_rate", "over_refusal", "n_harmful",
                                                      "n_safe", "seconds", "learned_agreement", "strmatch_agreement",
                                                      "selected")}


@click.command("evaluate")
@click.argument("iteration")
def command(iteration: str) -> None:
    """evaluate@ITERATION: harmful rate and over-refusal of artifacts/<t>/model.gguf (params `evaluate`)."""
    p = stage_params()
    echo_metrics(f"evaluate@{iteration}", _flat(guard(run_evaluate, iteration, p.evaluate, p.benchmarks.dir,
                                                      base_format=p.base.format)))


@click.command("judge")
def judge_command() -> None:
    """judge stage: train the learned refusal judge on XSTest's human labels (params `judge`)."""
    p = stage_params()
    echo_metrics("judge", _flat(guard(run_judge, p.judge, p.benchmarks.dir)))
