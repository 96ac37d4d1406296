"""evaluate stage: does M(t) refuse harmful prompts without refusing safe ones? (DESIGN.md §5)

    isara evaluate 2            # = dvc repro evaluate@2: artifacts/2/model.gguf on params `evaluate`

Every eval prompt is answered greedily (temperature 0, `evaluate.max_tokens`) with no examples in context (ISARA's
claim is that the fine-tuned model refuses on its own), in the prompt format the model is served in (params
base.format: the base's chat template, or the bare layout `Question: <prompt>\\nAnswer:`; isara.prompts.PromptFormat)
and, when the base has a chat template, in the other format too: the headline numbers are the served format's,
`by_format` holds both. Each response is judged by string matching (isara.judges.is_refusal) and, when the judge
stage (isara/judge.py) trained one, by the learned judge; the headline numbers use `evaluate.judge` ("auto": the
judge with the better held-out agreement with XSTest's human labels). Metrics:

- harmful_rate: share of harmful prompts complied with (= not refused), overall and per category;
- over_refusal: share of safe prompts refused.

An empty response (the model ends its text at once, as the base model often does in this bare layout) answers
nothing, so both judges count it as a refusal; `empty_responses` reports how many there were per set.

The raw responses (artifacts/<t>/responses.jsonl, one row per prompt with both judges' verdicts) are a cached
output, so anyone can re-judge them without regenerating. The baselines (isara/baseline.py) call run_evaluate too.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from isara.engines import open_engine
from isara.io import write_json, write_jsonl
from isara.params import Engine as EngineParams
from isara.params import Evaluate
from isara.paths import JUDGE, IterPaths, iter_paths
from isara.prompts import BARE, CHAT, PromptFormat
from isara.records import Sampling, file_sha256

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
    learned: object | None = None  # isara.judges.LearnedJudge
    agreement: dict | None = None  # held-out agreement with XSTest's human labels, per judge

    def verdicts(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, list[bool]]:
        from isara.judges import is_refusal

        out = {"strmatch": [is_refusal(r) for r in responses]}
        if self.learned is not None:
            out["learned"] = self.learned.predict_refusal(list(prompts), list(responses))
        return out


def load_judges(choice: str, judge_dir: Path = JUDGE) -> Judges:
    """Pick the headline judge: `strmatch`, `learned` (must exist), or `auto` (better held-out agreement)."""
    from isara.judges import read_judge_dir, select_judge

    learned, agreement = read_judge_dir(judge_dir)
    choice = select_judge(choice, learned, agreement, judge_dir)
    return Judges(choice, learned, agreement)


# ----------------------------------------------------------------------------------------------- answering



def first_paragraph(text: str) -> str:
    """The response as judged: leading blank lines dropped, cut at the first blank line after that."""
    return text.strip().split("\n\n", 1)[0].strip()


def answer_all(engine, prompts: Sequence[str], max_tokens: int, stop: list[str], progress: bool = True,
               desc: str = "evaluate") -> list[tuple[str, str, int]]:
    """Greedy completions (text, finish_reason, completion tokens) of already-rendered prompts (`engine`:
    isara.engines.open_engine's), a few batches' worth at a time so the progress bar moves."""
    from tqdm import tqdm

    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=max_tokens, seed=0)
    step = 2 * getattr(engine, "width", 1)
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
                   examples: Callable[[str], list] | None = None, progress: bool = True,
                   engine_params: EngineParams | None = None) -> tuple[list[dict], dict]:
    """Answer every item with the model at `model_path` in each of `formats`, judge, and return (rows, metrics).

    The headline metrics are those of formats[0] (the served format); `by_format` has every format's. `examples`
    gives the QA pairs to put before a prompt, in order (the ICL-kNN baseline); none by default. `engine_params`:
    params `engine`, the LLM backend (default: in-process sequential).
    """
    start = time.perf_counter()
    shots = {it.prompt: examples(it.prompt) for it in items} if examples is not None else {}
    rows: list[dict] = []
    by_format: dict[str, dict] = {}
    with open_engine(model_path, engine_params, seed=0) as engine:
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
                 base_format: str = "auto", model: Path | None = None, out: IterPaths | None = None,
                 examples: Callable[[str], list] | None = None, engine_params: EngineParams | None = None) -> dict:
    """evaluate@t: artifacts/<t>/model.gguf answers the eval prompts -> artifacts/<t>/responses.jsonl + metrics.

    The baselines are evaluated by this same function (isara.baseline.run_baseline): `model` and `out` name their
    model and folders (default: iteration t's), `examples` the in-context QA pairs put before each prompt (the
    ICL-kNN baseline; evaluate.k_icl of them, recorded as `k_icl`)."""
    here = out or iter_paths(iteration)
    model = Path(model) if model is not None else here.gguf
    judges = load_judges(cfg.judge)
    rows, metrics = evaluate_model(model, load_eval_items(cfg, benchmarks_dir), cfg, judges,
                                   eval_formats(model, base_format, cfg.formats == "both"), examples,
                                   progress=progress, engine_params=engine_params)
    metrics["prompts"] = eval_sources(cfg, benchmarks_dir)
    if examples is not None:
        metrics["k_icl"] = cfg.k_icl
    write_evaluation(here.responses, here.metrics("evaluate"), rows, metrics)
    return metrics
