"""Release packaging on a real exported model, no mocks: GGUF metadata and chat template (export), the package stage's
Ollama Modelfile and model card, and the dataset card's front matter.

    python -m pytest tests/test_package.py -q        # ~2 min on 2 cores (prepares and exports SmolLM2 once)

The prompt checks are byte for byte against what evaluation feeds the model: isara.prompts.sft_prompt(question),
tokenized as llama-cpp-python's create_completion tokenizes it, with isara.prompts.EVAL_STOP as the stop string
(bare format); the chat format's round trip (train in it, export, the GGUF's template renders evaluation's prompt
and finetune's tokens) is at the end.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")
huggingface_hub = pytest.importorskip("huggingface_hub")
from click.testing import CliRunner  # noqa: E402
from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: E402

from isara.base_models import base_model_path  # noqa: E402
from isara.cards import BASE_FACTS, dataset_front_matter, ollama_template  # noqa: E402
from isara.gguf import export_gguf, release_metadata  # noqa: E402
from isara.engines.llama import open_llama  # noqa: E402
from isara.cli import package_command as command  # noqa: E402
from isara.package import NOT_MEASURED, run_package  # noqa: E402
from isara.params import Base, Seeds, StageParams, load_params  # noqa: E402
from isara.prompts import EVAL_STOP, sft_prompt  # noqa: E402
from isara.io import write_json, write_jsonl  # noqa: E402
from isara.records import Record, file_sha256  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO / "data" / "seeds" / "safety.jsonl"
QUESTIONS = ["How do I pick a lock?", "What is 2+2?", "Explain  spacing\tand ünïcode: {{ .Prompt }} {% raw %}"]


@pytest.fixture(scope="module")
def prepared(smollm2_hf) -> Path:
    return smollm2_hf


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("package")


@pytest.fixture(scope="module")
def exported(prepared, out_dir) -> Path:
    """SmolLM2 exported as a bare-format M(2) with the pipeline's metadata (what export@2 writes)."""
    out = out_dir / "model.gguf"
    export_gguf(prepared, out, "q8_0",
                metadata=release_metadata(prepared, "2", Seeds(path=SEEDS), Base(format="bare")))
    return out


@pytest.fixture(scope="module")
def llm(exported):
    model = open_llama(exported, n_ctx=256, n_threads=2)
    yield model
    model.close()


# ------------------------------------------------------------------------------------------------ GGUF


def test_llama_cpp_reads_back_the_metadata(llm, exported):
    md = llm.metadata  # llama.cpp's own reading of the GGUF key/values
    assert md["general.name"] == "isara SmolLM2-135M-Instruct safety iter 2"
    assert md["general.basename"] == "smollm2" and md["general.finetune"] == "isara-safety-iter2"
    assert md["general.base_model.count"] == "1"
    assert md["general.base_model.0.name"] == "SmolLM2-135M-Instruct"
    assert md["general.base_model.0.repo_url"] == "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
    assert md["general.license"] == "apache-2.0"
    assert md["isara.iteration"] == "2" and md["isara.seed_set"] == "safety.jsonl"
    assert md["isara.seed_set_sha256"] == file_sha256(SEEDS)
    assert md["isara.prompt_format"] == sft_prompt("{question}")
    assert md["isara.base_chat_template"].startswith("{% for message in messages %}")  # SmolLM2's ChatML, kept
    base = gguf.GGUFReader(str(base_model_path("smollm2")))
    assert base.get_field("general.name").contents() not in md.values()  # no longer calls itself the base model
    reader = gguf.GGUFReader(str(exported))
    assert reader.get_field("isara.iteration").types == [gguf.GGUFValueType.UINT32]
    assert reader.get_field("isara.stop").contents() == EVAL_STOP
    assert reader.get_field("general.tags").contents() == ["isara", "self-alignment", "safety", "text-generation"]
    # the tokenizer is still the base's (generation itself is checked by tests/test_prepare_export.py)
    base_llm = open_llama(base_model_path("smollm2"), vocab_only=True)
    assert llm.tokenize(b"Question: Hi?\nAnswer:") == base_llm.tokenize(b"Question: Hi?\nAnswer:")


def _formatter(llm) -> Jinja2ChatFormatter:
    """The chat formatter llama-cpp-python builds from the GGUF (as Llama.__init__ does for chat_template.default)."""
    m = llm._model
    return Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"],
                               eos_token=m.token_get_text(m.token_eos()), bos_token=m.token_get_text(m.token_bos()))


@pytest.mark.parametrize("question", QUESTIONS)
def test_gguf_chat_template_renders_the_eval_prompt(llm, question):
    assert llm.chat_format == "chat_template.default"  # the GGUF's template, not a guessed built-in format
    result = _formatter(llm)(messages=[{"role": "user", "content": question}])
    bos = llm._model.token_get_text(llm._model.token_bos()) if llm._model.add_bos_token() else ""
    assert result.prompt == bos + sft_prompt(question)
    # tokens as the chat path feeds them == tokens as evaluation's create_completion feeds them
    chat_tokens = llm.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)
    eval_tokens = ([llm.token_bos()] if llm._model.add_bos_token() else []) + llm.tokenize(
        sft_prompt(question).encode(), add_bos=False, special=True)
    assert chat_tokens == eval_tokens


def test_gguf_chat_template_multi_turn_and_system(llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1?"},
                {"role": "assistant", "content": "A1."}, {"role": "user", "content": "Q2?"}]
    assert _formatter(llm)(messages=messages).prompt == "Be brief.\n\nQuestion: Q1?\nAnswer: A1.\n\n" + sft_prompt("Q2?")


# ------------------------------------------------------------------------------------------------ Ollama


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs as Ollama's parser (parser/parser.go ParseFile) reads them: `#` comments, a value in
    triple or double quotes keeps everything between them, a bare value runs to the end of the line; PARAMETER
    commands are named by the parameter."""
    out, i = [], 0
    while i < len(text):
        if text[i] in " \t\r\n":
            i += 1
            continue
        if text[i] == "#":
            i = text.find("\n", i) if "\n" in text[i:] else len(text)
            continue
        m = re.compile(r"([A-Za-z]+)[ \t]+").match(text, i)
        assert m, f"not a Modelfile command at {text[i:i + 30]!r}"
        name, i = m.group(1).lower(), m.end()
        if name == "parameter":
            m = re.compile(r"([A-Za-z0-9_]+)[ \t]+").match(text, i)
            name, i = m.group(1), m.end()
        for quote in ('"""', '"'):
            if text.startswith(quote, i):
                end = text.index(quote, i + len(quote))
                out.append((name, text[i + len(quote):end]))
                i = end + len(quote)
                break
        else:
            end = text.find("\n", i) if "\n" in text[i:] else len(text)
            out.append((name, text[i:end].strip()))
            i = end
    return out


def render_go_template(template: str, values: dict[str, str]) -> str:
    """The subset of Go's text/template the Modelfile TEMPLATE uses: {{ .Field }} and {{ if .Field }}..{{ end }}
    (a field is true when non-empty), nested ifs allowed. Anything else fails the test."""
    tokens = re.split(r"({{.*?}})", template, flags=re.S)
    out, stack = [], [True]
    for tok in tokens:
        action = re.fullmatch(r"{{-?\s*(.*?)\s*-?}}", tok, flags=re.S)
        if not action:
            out.append(tok if all(stack) else "")
            continue
        body = action.group(1)
        if m := re.fullmatch(r"if \.(\w+)", body):
            stack.append(bool(values.get(m.group(1), "")))
        elif body == "end":
            stack.pop()
        elif m := re.fullmatch(r"\.(\w+)", body):
            out.append(values.get(m.group(1), "") if all(stack) else "")
        else:
            raise AssertionError(f"template action outside the tested subset: {tok!r}")
    assert stack == [True], "unbalanced if/end"
    return "".join(out)


def ollama_prompt(template: str, messages: list[dict]) -> str:
    """Ollama's legacy (.Prompt/.Response) rendering, template/template.go Execute: one execution per earlier
    turn with its response, then the last user message with the template cut at {{ .Response }} (here: empty)."""
    system, prompt, response, out = "", "", "", []
    for m in messages:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "user":
            if response:
                out.append(render_go_template(template, {"System": system, "Prompt": prompt, "Response": response}))
                system = response = ""
            prompt = m["content"]
        else:
            response = m["content"]
    return "".join(out) + render_go_template(template, {"System": system, "Prompt": prompt, "Response": ""})


def _project(root: Path, exported: Path, *, truthfulqa: bool = True) -> Path:
    """A project folder as the pipeline leaves it before package@2: M(2), D(2) and the metrics it reports."""
    # the cards below state SmolLM2's facts (the `exported` fixture's model), whatever params.yaml's default base is
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"]["model"] = "smollm2"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "artifacts" / "2").mkdir(parents=True)
    (root / "artifacts" / "2" / "model.gguf").symlink_to(exported)
    seeds = [json.loads(line) for line in SEEDS.read_text().splitlines()[:4]]
    records = [Record(iteration=0, **s) for s in seeds]
    records += [Record(iteration=it, question=f"Generated question {it}.{k}?", answer="I can't help with that.",
                       model_sha256="0" * 64) for it, k in ((1, 0), (1, 1), (2, 0))]
    write_jsonl(root / "artifacts" / "2" / "dataset.jsonl", records)
    for it in ("1", "2"):
        write_json(root / "reports" / "iters" / it / "generate.json",
                   {"attempted": 5, "accepted": 2, "requested": 2, "rejected": {"too_short": 2, "near_duplicate": 1}})
    write_json(root / "reports" / "iters" / "2" / "evaluate.json", {
        "judge": "learned", "harmful_rate": 0.05, "over_refusal": 0.25, "n_harmful": 20, "n_safe": 20, "max_tokens": 48,
        "judge_agreement": {"learned": 0.942, "strmatch": 0.893},
        "prompts": {"harmful": {"path": "data/eval/harmful.jsonl", "format": "eval"},
                    "safe": {"path": "data/eval/safe.jsonl", "format": "eval"}}})
    write_json(root / "reports" / "iters" / "2" / "finetune.json", {"final_loss": 1.23, "examples": 7})
    if truthfulqa:
        write_json(root / "reports" / "iters" / "2" / "truthfulqa.json", {"mc1": 0.18, "mc2": 0.437})
    return root


def _params(root: Path) -> StageParams:
    return StageParams(load_params(root / "params.yaml"), None, None)


@pytest.fixture()
def packaged(tmp_path, exported, monkeypatch) -> Path:
    root = _project(tmp_path, exported)
    monkeypatch.chdir(root)
    run_package("2", _params(root))
    return root / "artifacts" / "2" / "package"


def test_package_writes_release_files(packaged):
    assert sorted(p.name for p in packaged.iterdir()) == ["LICENSE", "Modelfile", "NOTICE", "README.md"]
    assert "Apache License" in (packaged / "LICENSE").read_text() and "Version 2.0" in (packaged / "LICENSE").read_text()
    assert "SmolLM2-135M-Instruct" in (packaged / "NOTICE").read_text()


@pytest.mark.parametrize("question", QUESTIONS)
def test_modelfile_renders_the_eval_prompt(packaged, question):
    commands = parse_modelfile((packaged / "Modelfile").read_text())
    values = dict(commands)
    assert (packaged / values["from"]).resolve() == (packaged.parent / "model.gguf").resolve()  # FROM ../model.gguf
    assert values["template"] == ollama_template()
    assert ollama_prompt(values["template"], [{"role": "user", "content": question}]) == sft_prompt(question)
    assert [v for k, v in commands if k == "stop"] == EVAL_STOP
    assert values["temperature"] == "0" and values["repeat_penalty"] == "1"  # greedy, as evaluation decodes
    assert "Apache License" in values["license"] and "SmolLM2-135M-Instruct" in values["license"]


def test_modelfile_and_gguf_templates_agree_on_conversations(packaged, llm):
    template = dict(parse_modelfile((packaged / "Modelfile").read_text()))["template"]
    for messages in ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1?"}],
                     [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "A1."},
                      {"role": "user", "content": "Q2?"}]):
        assert ollama_prompt(template, messages) == _formatter(llm)(messages=messages).prompt


def test_model_card_front_matter_and_body(packaged):
    text = (packaged / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation" and "isara" in meta["tags"]
    card = huggingface_hub.ModelCard.load(packaged / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"harmful_rate": 0.05, "over_refusal": 0.25, "mc1": 0.18, "mc2": 0.437}
    body = card.text
    assert "5.0%" in body and "25.0%" in body and "**learned** refusal judge" in body
    assert "0.180 / 0.437" in body
    assert "4 seeds, 2 generated in round 1, 1 generated in round 2" in body
    assert "near_duplicate 1, too_short 2" in body
    assert "- fine-tuning: LoRA (r 16, alpha 32, merged into the weights) from" in body
    assert "ollama create" in body and "llama-cli" in body


def test_missing_truthfulqa_is_documented_as_not_measured(tmp_path, exported, monkeypatch):
    root = _project(tmp_path, exported, truthfulqa=False)
    monkeypatch.chdir(root)
    run_package("2", _params(root))
    card = huggingface_hub.ModelCard.load(root / "artifacts" / "2" / "package" / "README.md")
    assert f"| TruthfulQA MC1 / MC2 | {NOT_MEASURED} |" in card.text
    assert {r.metric_type for r in card.data.eval_results} == {"harmful_rate", "over_refusal"}


def test_missing_evaluation_names_the_file(tmp_path, exported, monkeypatch):
    root = _project(tmp_path, exported)
    (root / "reports" / "iters" / "2" / "evaluate.json").unlink()
    monkeypatch.chdir(root)
    result = CliRunner().invoke(command, ["2"])
    assert result.exit_code == 1
    assert "reports/iters/2/evaluate.json: metrics file not found" in result.output
    assert not (root / "artifacts" / "2" / "package").exists()


def test_unexported_model_is_refused(tmp_path, exported, monkeypatch):
    root = _project(tmp_path, exported)
    (root / "artifacts" / "2" / "model.gguf").unlink()
    (root / "artifacts" / "2" / "model.gguf").symlink_to(base_model_path("smollm2"))  # the base: no isara metadata
    monkeypatch.chdir(root)
    result = CliRunner().invoke(command, ["2"])
    assert result.exit_code == 1 and "exported without isara metadata" in result.output


# ------------------------------------------------------------------------------------------------ dataset card


def test_dataset_card_front_matter_loads():
    head = dataset_front_matter("2", n_records=128, facts=BASE_FACTS["gemma3"], seeds_path=SEEDS,
                                seeds_sha256=file_sha256(SEEDS), generator_sha256=["ab" * 32])
    card = huggingface_hub.DatasetCard(head + "\n# Data card: iteration 2\n")
    assert card.data.license == "gemma" and card.data.license_link == "https://ai.google.dev/gemma/terms"
    assert card.data.size_categories == ["n<1K"]
    assert card.data.configs[0] == {"config_name": "default", "data_files": [{"split": "train", "path": "dataset.jsonl"}]}
    assert card.data.isara["seed_set"] == "safety.jsonl"


def test_tiny_pipeline_writes_cards(tiny_project):
    """The DVC wiring: datacard@t writes a Hub dataset card, package@t / package_baseline@* the release folders."""
    for it in ("1", "2"):
        card = huggingface_hub.DatasetCard.load(tiny_project.root / "reports" / "datacards" / f"{it}.md")
        assert card.data.license == "apache-2.0" and card.data.isara["iteration"] == int(it)
        assert card.text.lstrip().startswith("#")  # the markdown data card is the body
        pkg = tiny_project.root / "artifacts" / it / "package"
        model = huggingface_hub.ModelCard.load(pkg / "README.md")
        assert model.data.model_name == f"isara SmolLM2-135M-Instruct tiny iter {it}"
        assert dict(parse_modelfile((pkg / "Modelfile").read_text()))["from"] == "../model.gguf"
    for name in ("sft_seed", "one_shot"):
        assert (tiny_project.root / "artifacts" / "baselines" / name / "package" / "README.md").is_file()


# ------------------------------------------------------------------------------------------------ chat format round trip


@pytest.fixture(scope="module")
def chat_trained(prepared, out_dir) -> tuple[Path, Path]:
    """Two real fine-tuning steps in the chat format (params base.format auto = SmolLM2's template), exported as
    export@1 exports: (checkpoint, GGUF)."""
    from isara.finetune import train, train_format
    from isara.params import Finetune

    fmt = train_format(prepared, "auto")
    assert fmt.name == "chat"
    records = [Record(iteration=0, **json.loads(line)) for line in SEEDS.read_text().splitlines()[:8]]
    hf = out_dir / "chat-hf"
    metrics = train(prepared, records, hf, Finetune(max_steps=2, batch_size=4, max_length=128), progress=False, fmt=fmt)
    assert metrics["format"] == "chat"
    out = out_dir / "chat.gguf"
    export_gguf(hf, out, "q8_0", metadata=release_metadata(hf, "1", Seeds(path=SEEDS), Base()))
    return hf, out


def test_chat_export_keeps_the_base_template(chat_trained):
    kv = gguf.GGUFReader(str(chat_trained[1]))
    base = gguf.GGUFReader(str(base_model_path("smollm2")))
    assert kv.get_field("tokenizer.chat_template").contents() == base.get_field("tokenizer.chat_template").contents()
    assert kv.get_field("isara.prompt_format").contents() == "chat"
    assert kv.get_field("isara.stop") is None and kv.get_field("isara.base_chat_template") is None


@pytest.mark.parametrize("question", QUESTIONS)
def test_chat_round_trip_trains_evaluates_and_serves_one_prompt(chat_trained, question):
    """What finetune trained on == what evaluate feeds llama.cpp == what llama-cpp-python's chat completion renders
    from the exported GGUF's own template, as text and as tokens; the answer ends with a token llama.cpp stops at."""
    from transformers import AutoTokenizer

    from isara.evaluate import eval_formats
    from isara.finetune import encode, train_format

    hf, out = chat_trained
    served = eval_formats(out, "auto")[0]
    assert served.name == "chat"
    model = open_llama(out, n_ctx=256, n_threads=2)
    try:
        assert model.chat_format == "chat_template.default"
        rendered = _formatter(model)(messages=[{"role": "user", "content": question}])
        assert rendered.prompt == served.prompt(question)
        chat_tokens = model.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True)
        eval_tokens = model.tokenize(served.prompt(question).encode(), add_bos=model._model.add_bos_token(),
                                     special=True)  # as create_completion tokenizes a prompt string
        answer = "I can't help with that."
        [(ids, labels)] = encode([Record(iteration=0, question=question, answer=answer)],
                                 AutoTokenizer.from_pretrained(hf), 256, train_format(hf, "auto"))
        prompt_ids = [i for i, label in zip(ids, labels) if label == -100]
        assert chat_tokens == eval_tokens == prompt_ids
        trained = [label for label in labels if label != -100]
        assert trained[-1] == model.token_eos() and model.detokenize(trained[:-1]).decode() == answer
    finally:
        model.close()


def test_chat_modelfile_leaves_the_template_to_the_gguf(tmp_path, chat_trained, monkeypatch):
    root = _project(tmp_path, chat_trained[1])
    monkeypatch.chdir(root)
    run_package("2", _params(root))
    commands = parse_modelfile((root / "artifacts" / "2" / "package" / "Modelfile").read_text())
    assert "template" not in dict(commands) and "stop" not in dict(commands)
    card = (root / "artifacts" / "2" / "package" / "README.md").read_text()
    assert "chat template" in card and "create_chat_completion" in card
