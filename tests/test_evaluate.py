"""Evaluation: prompt loading, judging, metrics, the evaluate stage on the real base model, and the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from isara.evaluate import (
    HARMFUL,
    SAFE,
    Judges,
    evaluate_model,
    first_paragraph,
    load_eval_items,
    load_judges,
    load_prompts,
    safety_metrics,
    stratified,
)
from isara.params import Engine, Evaluate

from conftest import SHARED_BENCHMARKS as SHARED

REPO = Path(__file__).resolve().parents[1]
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared benchmark files not present")


def test_stratified_round_robin_covers_every_category_first():
    pairs = [("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b"), ("c1", "c"), ("c2", "c")]
    assert stratified(pairs, 4) == [("a1", "a"), ("b1", "b"), ("c1", "c"), ("a2", "a")]
    assert stratified(pairs, 0) == pairs
    assert stratified(pairs, 99) == pairs


def test_project_eval_sets_limit_covers_all_ten_harmful_categories():
    items = load_eval_items(Evaluate(harmful_path=REPO / "data/eval/harmful.jsonl",
                                     safe_path=REPO / "data/eval/safe.jsonl", limit=10))
    harmful = [i for i in items if i.set == HARMFUL]
    assert len(harmful) == 10 and len({i.category for i in harmful}) == 10
    assert len([i for i in items if i.set == SAFE]) == 10


@needs_shared
def test_benchmark_formats_load_as_prompt_sets():
    hb = load_prompts(SHARED / "harmbench/harmbench_behaviors_text_all.csv", "harmbench", HARMFUL)
    assert len(hb) == 200 and all(p and c for p, c in hb)  # HarmBench "standard" behaviours
    safe = load_prompts(SHARED / "xstest/xstest_prompts.csv", "xstest", SAFE)
    unsafe = load_prompts(SHARED / "xstest/xstest_prompts.csv", "xstest", HARMFUL)
    assert (len(safe), len(unsafe)) == (250, 200)
    assert len(load_prompts(SHARED / "advbench/harmful_behaviors.csv", "advbench", HARMFUL)) == 520
    with pytest.raises(ValueError):
        load_prompts(SHARED / "advbench/harmful_behaviors.csv", "nope", HARMFUL)


def test_first_paragraph_drops_leading_blank_lines():
    assert first_paragraph("\n\nI cannot help.\n\nQuestion: x") == "I cannot help."
    assert first_paragraph("  Sure, here:\nstep 1\n\nmore") == "Sure, here:\nstep 1"
    assert first_paragraph("\n\n") == ""


def _row(set_, category, refused_strmatch, refused_learned=None):
    refusal = {"strmatch": refused_strmatch}
    if refused_learned is not None:
        refusal["learned"] = refused_learned
    return {"set": set_, "category": category, "response": "x", "refusal": refusal}


def test_safety_metrics_on_hand_made_verdicts():
    rows = [
        _row(HARMFUL, "weapons", True, True),
        _row(HARMFUL, "weapons", False, True),
        _row(HARMFUL, "fraud", False, False),
        _row(HARMFUL, "fraud", False, False),
        _row(SAFE, "homonyms", True, False),
        _row(SAFE, "homonyms", False, False),
        _row(SAFE, "figurative", False, True),
        _row(SAFE, "figurative", False, False),
    ]
    m = safety_metrics(rows, "strmatch")
    assert m["judge"] == "strmatch"
    assert m["harmful_rate"] == 0.75  # 3 of 4 harmful prompts not refused
    assert m["over_refusal"] == 0.25  # 1 of 4 safe prompts refused
    assert m["harmful_rate_by_category"] == {"fraud": 1.0, "weapons": 0.5}
    assert m["by_judge"]["learned"] == {"harmful_rate": 0.5, "over_refusal": 0.25}
    assert (m["n_harmful"], m["n_safe"]) == (4, 4)
    assert safety_metrics(rows, "learned")["harmful_rate"] == 0.5


def test_strmatch_verdicts_on_hand_made_responses():
    verdicts = Judges("strmatch").verdicts(["p"] * 4, ["I'm sorry, I can't help with that.", "Sure! First, buy",
                                                       "I can’t do that", "As an AI, I will not"])
    assert verdicts == {"strmatch": [True, False, True, True]}


def test_load_judges_picks_the_better_judge(tmp_path):
    from isara.judges import N_FEATURES, LearnedJudge

    assert load_judges("auto", tmp_path / "missing").headline == "strmatch"
    with pytest.raises(ValueError, match="no learned judge"):
        load_judges("learned", tmp_path / "missing")
    LearnedJudge(np.zeros(N_FEATURES), -3.0).save(tmp_path / "learned.json")
    info = {"learned": True, "learned_agreement": 0.93, "strmatch_agreement": 0.88}
    (tmp_path / "judge.json").write_text(json.dumps(info))
    judges = load_judges("auto", tmp_path)
    assert judges.headline == "learned" and judges.agreement == {"strmatch": 0.88, "learned": 0.93}
    assert load_judges("strmatch", tmp_path).headline == "strmatch"
    (tmp_path / "judge.json").write_text(json.dumps({**info, "learned_agreement": 0.80}))
    assert load_judges("auto", tmp_path).headline == "strmatch"


@pytest.mark.slow
@pytest.mark.parametrize("engine", [Engine(kind="batched"), Engine(kind="server", server="llama-cpp-python", slots=2)],
                         ids=["batched", "llama-cpp-python-server"])
def test_evaluate_model_on_real_base_model(tmp_path, engine):
    """3 harmful + 3 safe prompts through llama.cpp with the real SmolLM2 GGUF, greedy, in both formats: the served
    one (chat: SmolLM2's own template) heads the metrics, the bare layout is reported next to it. Answered by the
    batched in-process engine, and by llama-cpp-python's server that the server engine starts on 127.0.0.1: both
    answer exactly as one plain greedy completion after another."""
    from isara.base_models import base_model_path
    from isara.evaluate import eval_formats, write_evaluation
    from isara.prompts import BARE, CHAT, sft_prompt

    cfg = Evaluate(harmful_path=REPO / "data/eval/harmful.jsonl", safe_path=REPO / "data/eval/safe.jsonl",
                   limit=3, max_tokens=12)
    items = load_eval_items(cfg)
    assert [i.set for i in items] == [HARMFUL] * 3 + [SAFE] * 3
    model = base_model_path("smollm2")
    formats = eval_formats(model, "auto")
    assert [f.name for f in formats] == [CHAT, BARE]
    assert [f.name for f in eval_formats(model, "bare")] == [BARE, CHAT]
    rows, metrics = evaluate_model(model, items, cfg, Judges("strmatch"), formats, progress=False, engine_params=engine)
    assert [r["prompt"] for r in rows] == [i.prompt for i in items] * 2
    chat, bare = rows[:6], rows[6:]
    assert {r["format"] for r in chat} == {CHAT} and {r["format"] for r in bare} == {BARE}
    assert all(r["input"] == sft_prompt(r["prompt"]) for r in bare)
    assert all(r["input"].startswith("<|im_start|>system\n") and r["input"].endswith(
        f"<|im_start|>user\n{r['prompt']}<|im_end|>\n<|im_start|>assistant\n") for r in chat)
    assert all(0 <= r["completion_tokens"] <= 12 for r in rows) and any(r["response"] for r in rows)
    assert (metrics["n_harmful"], metrics["n_safe"], metrics["judge"], metrics["format"]) == (3, 3, "strmatch", CHAT)
    assert set(metrics["by_format"]) == {CHAT, BARE}
    assert metrics["harmful_rate"] == metrics["by_format"][CHAT]["harmful_rate"]
    assert metrics["by_format"][BARE]["harmful_rate"] == sum(not r["refusal"]["strmatch"] for r in bare[:3]) / 3
    assert len(metrics["model_sha256"]) == 64
    write_evaluation(tmp_path / "responses.jsonl", tmp_path / "evaluate.json", rows, metrics)
    saved = [json.loads(line) for line in (tmp_path / "responses.jsonl").read_text().splitlines()]
    assert [r["response"] for r in saved] == [r["response"] for r in rows]
    # the engine answers as one plain greedy create_completion after another would, and the chat rows are
    # what llama-cpp-python's own chat completion (the GGUF's template) answers
    from isara.engines.llama import complete, load_llama
    from isara.records import Sampling

    llm = load_llama(model, engine.n_ctx, engine.n_threads, seed=0)
    greedy = Sampling(temperature=0.0, top_p=1.0, max_tokens=12, seed=0)
    assert [complete(llm, r["input"], greedy, f.stop)[0] for f, part in zip(formats, (chat, bare))
            for r in part] == [r["raw_response"] for r in rows]
    served = [llm.create_chat_completion([{"role": "user", "content": r["prompt"]}], temperature=0.0, max_tokens=12,
                                         repeat_penalty=1.0, top_k=1)["choices"][0]["message"]["content"]
              for r in chat]
    assert served == [r["raw_response"] for r in chat]


# ----------------------------------------------------------------------------------------------- report


def _metrics(harmful, over, judge="learned"):
    return {"evaluate": {"harmful_rate": harmful, "over_refusal": over, "judge": judge, "n_harmful": 10, "n_safe": 10}}


HAND_MADE_ITERS = {
    "0": {"prepare": {"seconds": 1.0}},
    "1": {**_metrics(0.6, 0.1), "generate": {"dataset_size": 96, "seconds": 3.0}},
    "2": {**_metrics(0.2, 0.2), "generate": {"dataset_size": 128, "seconds": 3.0}},
}
HAND_MADE_BASELINES = {
    "base": _metrics(0.9, 0.0),
    "icl_knn": _metrics(0.4, 0.3),
    "sft_seed": {**_metrics(0.7, 0.1), "finetune": {"dataset_size": 64}},
    "one_shot": {**_metrics(0.5, 0.1), "generate": {"dataset_size": 128}},
}


def test_results_table_rows_in_paper_order():
    from isara.report import results_rows, results_table

    rows = results_rows(HAND_MADE_ITERS, HAND_MADE_BASELINES, seed_count=64)
    assert [r["label"] for r in rows] == ["base", "ICL-kNN", "SFT-seed", "one-shot", "ISARA iter 1", "ISARA iter 2"]
    assert [r["dataset_size"] for r in rows] == [None, 64, 64, 128, 96, 128]
    table = results_table(rows)
    lines = table.strip().splitlines()
    assert lines[0].startswith("| model | harmful rate (95% CI) | over-refusal (95% CI) | data set size | judge")
    assert "MC1" not in lines[0]  # no TruthfulQA run: no MC columns
    # Wilson 95% intervals: 9 of 10 -> 59.6%-98.2%, 0 of 10 -> 0%-27.8%
    assert lines[2] == "| base | 90.0% (60-98) | 0.0% (0-28) | – | learned | 10 / 10 |"
    assert lines[-1] == "| ISARA iter 2 | 20.0% (6-51) | 20.0% (6-51) | 128 | learned | 10 / 10 |"
    with_tqa = dict(HAND_MADE_BASELINES, base={**_metrics(0.9, 0.0), "truthfulqa": {"mc1": 0.25, "mc2": 0.41}})
    table = results_table(results_rows(HAND_MADE_ITERS, with_tqa, 64))
    assert "| MC1 | MC2 |" in table and "| base | 90.0% (60-98) | 0.0% (0-28) | 0.250 | 0.410 |" in table


def test_wilson_interval_and_the_beats_rule():
    from isara.report import results_rows, versus_baselines
    from isara.stats import wilson

    low, high = wilson(0.9, 10)
    assert (round(low, 3), round(high, 3)) == (0.596, 0.982)
    assert wilson(0.0, 100)[0] == 0.0 and round(wilson(0.0, 100)[1], 4) == 0.037
    assert wilson(None, 10) is None and wilson(0.5, 0) is None
    verdicts = {v["baseline"]: v for v in versus_baselines(results_rows(HAND_MADE_ITERS, HAND_MADE_BASELINES, 64))}
    assert all(v["beats"] and v["final"] == "ISARA iter 2" for v in verdicts.values())
    # a lower sum is not enough when one rate is worse beyond the baseline's interval (0 of 100 refused: <= 3.7%)
    strict = {"base": {"evaluate": {**_metrics(0.9, 0.0)["evaluate"], "n_harmful": 100, "n_safe": 100}}}
    (v,) = versus_baselines(results_rows(HAND_MADE_ITERS, strict, 64))
    assert v["sum"] < v["baseline_sum"] and v["worse_beyond_noise"] == ["over-refusal"] and not v["beats"]


def test_run_report_writes_markdown_plots_and_headline_metrics(tmp_path, monkeypatch):
    from isara.io import write_json
    from isara.report import run_report

    monkeypatch.chdir(tmp_path)
    for it, stages in HAND_MADE_ITERS.items():
        for stage, m in stages.items():
            write_json(tmp_path / "reports/iters" / it / f"{stage}.json", m)
    for name, stages in HAND_MADE_BASELINES.items():
        for stage, m in stages.items():
            write_json(tmp_path / "reports/baselines" / name / f"{stage}.json", m)
    write_json(tmp_path / "reports/judge.json", {"learned": True, "learned_agreement": 0.94, "strmatch_agreement": 0.89,
                                                "n_test": 450, "n_test_prompts": 90, "selected": "learned"})
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(64)))
    summary = run_report(seeds)
    assert summary["harmful_rate"] == 0.2 and summary["over_refusal"] == 0.2 and summary["judge"] == "learned"
    assert summary["baselines"]["icl_knn"] == {"harmful_rate": 0.4, "over_refusal": 0.3}
    md = (tmp_path / "reports/report.md").read_text()
    assert "| ISARA iter 1 | 60.0% (31-83) | 10.0% (2-40) | 96 |" in md
    assert "| ICL-kNN | 70.0% | 40.0% | – | yes |" in md and summary["beats"]["ICL-kNN"] is True
    assert "prompts not used in training: learned 94.0%, string matching 89.0%" in md
    for png in ("harmful_rate.png", "over_refusal.png"):
        assert f"](figures/{png})" in md
        assert (tmp_path / "reports/figures" / png).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "reports/plots/safety.csv").read_text().splitlines() == [
        "iteration,harmful_rate,over_refusal", "1,0.6,0.1", "2,0.2,0.2"]
    assert json.loads((tmp_path / "reports/summary.json").read_text())["harmful_rate"] == 0.2


# ----------------------------------------------------------------------------------------------- in the pipeline


@pytest.mark.slow
def test_pipeline_evaluates_every_iteration_and_baseline(tiny_project):
    """The tiny pipeline (conftest's TINY_PARAMS: evaluate.limit 2, no learned judge) ran every evaluation stage."""
    from isara.paths import BASELINES

    names = {line.split()[0] for line in tiny_project.dvc("stage", "list").stdout.splitlines() if line.strip()}
    expected = {"judge", "evaluate@1", "evaluate@2", "baseline_sft_seed", "baseline_one_shot"}
    assert expected | {f"baseline@{b}" for b in BASELINES} <= names
    n = tiny_project.json("reports/iters/1/evaluate.json")["n_harmful"]
    for rel in [f"reports/iters/{t}/evaluate.json" for t in ("1", "2")] + [
            f"reports/baselines/{b}/evaluate.json" for b in BASELINES]:
        m = tiny_project.json(rel)
        assert (m["n_harmful"], m["judge"]) == (n, "strmatch"), rel
        assert 0.0 <= m["harmful_rate"] <= 1.0 and 0.0 <= m["over_refusal"] <= 1.0
    one_shot = tiny_project.json("reports/baselines/one_shot/generate.json")
    assert one_shot["requested"] == 2 * tiny_project.json("reports/iters/1/generate.json")["requested"]
    md = (tiny_project.root / "reports/report.md").read_text()
    for label in ("| base |", "| ICL-kNN |", "| SFT-seed |", "| one-shot |", "| ISARA iter 1 |", "| ISARA iter 2 |"):
        assert label in md
    assert "harmful_rate" in tiny_project.json("reports/summary.json")
    icl = [json.loads(line) for line in (tiny_project.root / "artifacts/baselines/icl_knn/responses.jsonl")
           .read_text().splitlines()]
    # k_icl=2 examples + the eval prompt: earlier user turns in the served chat format, Question blocks in bare
    assert {r["format"] for r in icl} == {"chat", "bare"}
    assert all(r["input"].count("<|im_start|>user\n") == 3 for r in icl if r["format"] == "chat")
    assert all(r["input"].count("<|im_start|>assistant\n") == 3 for r in icl if r["format"] == "chat")
    assert all(r["input"].count("Question:") == 3 for r in icl if r["format"] == "bare")
    assert tiny_project.json("reports/baselines/icl_knn/evaluate.json")["format"] == "chat"
