"""params.yaml as pydantic models: one model per section, unknown keys rejected.

The file is read with ruamel.yaml (YAML 1.2, as DVC itself uses), because `dvc exp run -S finetune.lr=4e-05`
writes `4e-05`, which PyYAML (YAML 1.1) reads as a string.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

DEFAULT_PARAMS = Path("params.yaml")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Seeds(Section):
    path: Path


class Base(Section):
    model: Literal["smollm2", "gemma3"] = "smollm2"
    path: Path | None = None
    # A Hugging Face causal-LM checkpoint as M0 (a local folder or a Hub id): prepare converts it with llama.cpp's
    # own converter (isara.converter) to a GGUF of `gguf_type` for generation; fine-tuning starts from its weights
    hf: str | None = None
    gguf_type: Literal["f32", "f16", "bf16", "q8_0"] = "q8_0"
    # The prompt format of fine-tuning, evaluation and the exported model (isara.prompts.PromptFormat): chat = the
    # base GGUF's chat template, bare = "Question: ..\nAnswer:", auto = chat when the base has a template.
    format: Literal["auto", "chat", "bare"] = "auto"

    @model_validator(mode="after")
    def _one_source(self) -> "Base":
        if self.hf is not None and self.path is not None:
            raise ValueError("set base.path (a GGUF file) or base.hf (a Hugging Face checkpoint), not both")
        return self


class Iteration(Section):
    prev: str


class Index(Section):
    n_trees: int = Field(16, ge=1, le=1000)
    seed: int = 0


class Engine(Section):
    """The LLM backend of generate, evaluate, the baselines and TruthfulQA (isara.engines), and the context size the
    seeds stage checks each seed against."""

    # sequential: in-process llama.cpp, one completion after another; batched: in process, batch_size sequences per
    # llama_decode (the same completions; one after another where batching would move the model's logits); server:
    # an OpenAI-compatible /v1/completions server (url, or one isara starts on 127.0.0.1 for the model file)
    kind: Literal["sequential", "batched", "server"] = "batched"
    n_ctx: int = Field(2048, ge=128)  # context tokens per sequence (per server slot)
    n_threads: int = Field(2, ge=1)
    n_gpu_layers: int = Field(-1, ge=-1)  # offloaded to a GPU if llama.cpp has GPU support; -1 all, 0 none
    # batched: sequences decoded together; batched and server: attempts per generate round, prompts per evaluate step
    batch_size: int = Field(16, ge=1, le=64)
    url: str | None = None  # server: an endpoint that serves the model already (http://host:port[/v1/completions])
    # server without url: "llama-server" (llama.cpp's own, `slots` parallel slots), "llama-cpp-python" (its server
    # extra, one completion at a time, bit-identical to sequential), auto: llama-server when found, else the other
    server: Literal["auto", "llama-server", "llama-cpp-python"] = "auto"
    server_binary: Path | None = None  # llama-server's path; null: `llama-server` on PATH
    slots: int = Field(4, ge=1, le=64)  # server: completions in flight at once (llama-server --parallel)
    timeout: float = Field(600.0, gt=0)  # server: seconds to wait for one completion (and for a server to load)

    @model_validator(mode="after")
    def _url(self) -> "Engine":
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url {self.url!r} must start with http:// or https://")
        return self


class Generate(Section):
    n_samples: int = Field(32, ge=1)
    max_attempts: int = Field(160, ge=1)
    k_question: int = Field(4, ge=1, le=32)
    k_answer: int = Field(4, ge=1, le=32)
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    answer_temperature: float = Field(0.3, ge=0.0, le=5.0)
    answer_repeat_penalty: float = Field(1.1, ge=1.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_question_tokens: int = Field(64, ge=4)
    max_answer_tokens: int = Field(128, ge=4)
    seed: int = 0
    min_question_chars: int = Field(15, ge=1)
    max_question_chars: int = Field(300, ge=1)
    min_answer_chars: int = Field(40, ge=1)
    max_answer_chars: int = Field(800, ge=1)
    max_repeated_ngram_share: float = Field(0.3, ge=0.0, le=1.0)
    max_embedding_similarity: float = Field(0.92, gt=0.0, le=1.0)
    max_rouge_l: float = Field(0.7, gt=0.0, le=1.0)
    # Issue 10's filters (isara/filters.py). out_of_domain: reject a question whose nearest example in D(t-1)
    # ("data") or in D0 only ("seeds") is farther than out_of_domain_distance (Annoy angular, sqrt(2 - 2 cos));
    # "off" disables. Distance null: the seeds' own 95th-percentile nearest-other-seed distance.
    out_of_domain: Literal["data", "seeds", "off"] = "data"
    out_of_domain_distance: float | None = Field(None, gt=0.0, le=2.0)
    # Reject an answer whose stance (declines / complies) differs from the majority of its k_answer examples.
    stance_consistency: bool = True
    # Accepted declining share kept within D0's share +- this band (quota per stance); null disables.
    stance_band: float | None = Field(0.15, ge=0.0, le=1.0)
    # Judge of the stance, as evaluate.judge: auto (the judge stage's better one), strmatch or learned.
    stance_judge: Literal["auto", "strmatch", "learned"] = "auto"

    @property
    def labels_stance(self) -> bool:
        """Whether answers get a stance at all; with both stance filters off, records are as before them."""
        return self.stance_consistency or self.stance_band is not None

    @model_validator(mode="after")
    def _bounds(self) -> "Generate":
        if self.min_question_chars > self.max_question_chars:
            raise ValueError("min_question_chars is larger than max_question_chars")
        if self.min_answer_chars > self.max_answer_chars:
            raise ValueError("min_answer_chars is larger than max_answer_chars")
        if self.max_attempts < self.n_samples:
            raise ValueError(f"max_attempts ({self.max_attempts}) is smaller than n_samples ({self.n_samples})")
        return self


class Finetune(Section):
    init: Literal["previous", "base"] = "previous"
    lr: float = Field(5e-5, gt=0.0, lt=1.0)
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(8, ge=1)
    max_steps: int = Field(-1, ge=-1)
    max_length: int = Field(256, ge=16)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    seed: int = 0
    n_threads: int = Field(2, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when torch sees a GPU
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast where the device runs it natively
    # full: every weight trains (fp32 AdamW); lora: a peft LoRA adapter on lora_target_modules trains alone and is
    # merged into the weights before the checkpoint is saved, so export and everything after it see a plain model.
    method: Literal["full", "lora"] = "full"
    lora_r: int = Field(16, ge=1)
    lora_alpha: float = Field(32.0, gt=0.0)  # the adapter's update is scaled by lora_alpha / lora_r
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Module names inside each decoder layer; the default is the attention and MLP projections of llama and gemma3.
    lora_target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), min_length=1)
    # Recompute each decoder layer's activations in the backward pass instead of keeping them: less memory, more time.
    gradient_checkpointing: bool = True
    # With gradient_checkpointing: the last this many decoder layers keep their activations instead (no recompute).
    # Each costs one layer's activations of memory and saves one layer's second forward pass; the trained weights
    # are the same either way (benchmarks/README.md "Checkpointing only some layers").
    uncheckpointed_layers: int = Field(0, ge=0)
    # Hand malloc's free heap pages back to the OS before each step's memory peak (isara.memory.trim_heap): lowers
    # the fine-tune's peak RSS at no cost in speed (benchmarks/README.md).
    release_memory: bool = True
    # Micro-batches of batch_size per optimizer step: effective batch = batch_size x gradient_accumulation_steps;
    # max_steps, warmup and the lr schedule count optimizer steps.
    gradient_accumulation_steps: int = Field(1, ge=1)
    # Data-parallel processes on this machine, started by torchrun (gloo on CPU, one GPU each on CUDA): each takes
    # batch_size / num_processes rows of every micro-batch, and the summed gradients give the one-process model.
    num_processes: int = Field(1, ge=1)
    # Save the training state (trainable weights, AdamW moments, step) every this many optimizer steps beside the
    # checkpoint (<out>.resume.pt), so that a killed fine-tune resumes there when it is run again; 0: never.
    resume_every: int = Field(0, ge=0)

    @field_validator("lora_target_modules")
    @classmethod
    def _module_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        bad = [n for n in names if not n or not n.replace("_", "").replace(".", "").isalnum()]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a module name (letters, digits, '_' and '.')")
        return names

    @model_validator(mode="after")
    def _rows_for_every_process(self) -> Finetune:
        if self.num_processes > self.batch_size:
            raise ValueError(f"num_processes ({self.num_processes}) is more than batch_size ({self.batch_size}): "
                             "each process needs at least one row of every batch")
        return self


class Export(Section):
    outtype: Literal["q8_0", "f16", "f32"] = "q8_0"


class Benchmarks(Section):
    # The folder holding the public benchmark files (layout: isara.benchmarks; sources and licenses: README
    # "Benchmark data"). The one setting for all of them. None: the pipeline runs without them (string matching
    # judges, the TruthfulQA stages record that they did not run). A relative path is taken from the project root.
    dir: Path | None = None


class Judge(Section):
    # Trains on <benchmarks.dir>/xstest/xstest_v2_completions_*_gpteval.csv (XSTest's human labels).
    seed: int = 0  # prompt-grouped train/held-out split
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)


# Prompt file formats evaluate reads (loaders in isara.benchmarks): the project's JSONL, or a public benchmark.
EvalFormat = Literal["eval", "harmbench", "advbench", "beavertails", "xstest", "hh_rlhf"]


class Evaluate(Section):
    # None: the format's own file (data/eval/<set>.jsonl for "eval", the benchmark's file under benchmarks.dir).
    harmful_path: Path | None = None
    harmful_format: EvalFormat = "eval"
    safe_path: Path | None = None
    safe_format: EvalFormat = "eval"
    limit: int = Field(10, ge=0)  # prompts per set, spread round-robin over categories; 0 = all
    max_tokens: int = Field(48, ge=1)
    judge: Literal["auto", "strmatch", "learned"] = "auto"
    # both: also the format the models are not served in (base.format), when the base has a chat template
    formats: Literal["both", "served"] = "both"
    k_icl: int = Field(4, ge=1, le=32)  # ICL-kNN baseline: retrieved seed QA pairs in context


class Datacard(Section):
    # 0.9 cosine between MiniLM sentence vectors is a paraphrase, not merely the same topic.
    near_duplicate_threshold: float = Field(0.9, gt=0.0, le=1.0)
    # Out-of-domain flag, Annoy angular distance sqrt(2 - 2 cos) to the nearest retrieved example.
    # null: the 95th percentile of the seeds' distances to their nearest other seed (isara.filters.seed_far_distance)
    far_distance: float | None = Field(None, gt=0.0, le=2.0)
    n_examples: int = Field(3, ge=0)
    top_k: int = Field(5, ge=1)
    seed: int = 0


class Truthfulqa(Section):
    # Reads <benchmarks.dir>/truthfulqa/TruthfulQA.csv; with benchmarks.dir null the stages record "not run".
    limit: int = Field(50, ge=0)  # held-out questions scored, in file order; 0 = all


class Package(Section):
    # The release folder of every fine-tuned model (isara/package.py): model card, Ollama Modelfile, licenses.
    num_predict: int = Field(256, ge=1)  # Ollama's token limit per answer (evaluation reads only evaluate.max_tokens)


class Params(Section):
    seeds: Seeds
    base: Base = Base()
    benchmarks: Benchmarks = Benchmarks()
    iterations: dict[str, Iteration]
    index: Index = Index()
    engine: Engine = Engine()
    generate: Generate = Generate()
    finetune: Finetune = Finetune()
    export: Export = Export()
    datacard: Datacard = Datacard()
    judge: Judge = Judge()
    evaluate: Evaluate = Evaluate()
    truthfulqa: Truthfulqa = Truthfulqa()
    package: Package = Package()

    @model_validator(mode="after")
    def _schedule(self) -> "Params":
        check_schedule(self.iterations)
        return self

    def prev_of(self, iteration: str) -> str:
        if iteration not in self.iterations:
            raise ParamsError(f"iterations: no iteration {iteration!r} (have {sorted(self.iterations)})")
        return self.iterations[iteration].prev


def check_schedule(iterations: dict[str, Iteration]) -> None:
    """Every key is a positive integer string, every `prev` is "0" or an earlier key, so the chain is acyclic."""
    if not iterations:
        raise ValueError("at least one iteration is required")
    for key, it in iterations.items():
        if not key.isdigit() or int(key) < 1:
            raise ValueError(f"iteration key {key!r} must be a positive integer written as a quoted string")
        if it.prev != "0" and it.prev not in iterations:
            raise ValueError(f"iteration {key!r} has prev {it.prev!r}, which is neither '0' nor an iteration")
        if not it.prev.isdigit() or int(it.prev) >= int(key):
            raise ValueError(f"iteration {key!r} has prev {it.prev!r}: prev must be an earlier iteration (no cycles)")


class ParamsError(ValueError):
    """Invalid params; the message names the file and the offending key and value."""


def read_yaml(path: Path) -> dict:
    yaml = YAML(typ="safe", pure=True)
    try:
        with Path(path).open(encoding="utf-8") as fh:
            data = yaml.load(fh)
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


def format_validation_error(path: Path, exc: ValidationError, data: dict | None = None) -> str:
    lines = [f"{path}: invalid params"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        lines.append(f"  {key}{shown}: {err['msg']}")
    return "\n".join(lines)


def load_params(path: str | os.PathLike = DEFAULT_PARAMS) -> Params:
    path = Path(path)
    data = read_yaml(path)
    # YAML maps unquoted iteration keys to ints; DVC's foreach then builds no stages. Refuse them here.
    iters = data.get("iterations")
    if isinstance(iters, dict):
        bad = [k for k in iters if not isinstance(k, str)]
        if bad:
            raise ParamsError(f"{path}: iterations: key {bad[0]!r} must be quoted (\"{bad[0]}\"): DVC's foreach "
                              "silently builds no stages from unquoted integer keys")
    try:
        return Params.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(format_validation_error(path, exc)) from None


class StageParams:
    """The params a stage may read: under `dvc repro`, only the sections dvc.yaml declares for it.

    Reading an undeclared section would make DVC's cache stale (changing that section would not rerun the
    stage), so it fails loudly instead. Outside DVC (the plain CLI) every section is readable.
    """

    def __init__(self, params: Params, stage: str | None, declared: set[str] | None):
        self._params, self._stage, self._declared = params, stage, declared

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if self._declared is not None and name not in self._declared:
            raise ParamsError(f"stage {self._stage!r} reads params section {name!r}, which dvc.yaml does not "
                              f"declare for it (declared: {sorted(self._declared)}): add it to the stage's params")
        return getattr(self._params, name)


def load_stage_params(path: str | os.PathLike = DEFAULT_PARAMS) -> StageParams:
    """Validate the whole params file (a bad key anywhere stops every stage), then restrict to this stage."""
    params = load_params(path)
    stage = os.environ.get("DVC_STAGE")
    if not stage:
        return StageParams(params, None, None)
    import dvc.api

    declared = set(dvc.api.params_show(str(path), stages=[stage]).keys())
    return StageParams(params, stage, declared)
