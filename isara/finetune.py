"""finetune stage: supervised fine-tuning of M(t-1) (or M0) on D(t), loss on answer tokens only.

A plain torch loop (nanoGPT style) rather than transformers.Trainer: the whole loop is on one screen,
and batches are grouped by length so CPU time is not spent on padding.
Method (params finetune.method): full trains every weight; lora trains a peft LoRA adapter alone and merges it into
the weights before the checkpoint is saved, so export (isara.gguf) and every later stage read a plain checkpoint.
finetune.gradient_checkpointing recomputes activations in the backward pass; finetune.gradient_accumulation_steps
sums the gradients of several micro-batches into one optimizer step; finetune.release_memory makes malloc give freed
tensors' pages back at once. The last two defaults hold the default run under 3 GiB (benchmarks/README.md).
Format (params base.format, isara.prompts.PromptFormat): the prompt (no loss), then the answer the model is taught to
write (loss): bare "Question: <q>\nAnswer:" + " <answer><eos>", or the base's chat template's user turn + the
assistant turn it closes ("<answer><|im_end|>"), the format the exported GGUF is served and evaluated in.
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from isara.gguf import TEMPLATE_FILE
from isara.io import atomic_directory, write_json
from isara.memory import release_freed_memory
from isara.params import Finetune, ParamsError
from isara.paths import IterPaths, iter_paths
from isara.prompts import BARE, PromptFormat
from isara.records import Record, read_records

IGNORE = -100  # label id that transformers' causal-LM loss skips


def encode(records: list[Record], tokenizer, max_length: int,
           fmt: PromptFormat = PromptFormat(BARE)) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per record; prompt tokens carry IGNORE labels, the answer (+ its end) carries itself.

    The prompt is tokenized alone, as llama.cpp tokenizes it at evaluation (BOS where the model wants one,
    special-token texts such as <|im_start|> parsed), so training sees exactly the tokens the served model sees."""
    examples = []
    for r in records:
        prompt = tokenizer(fmt.prompt(r.question), add_special_tokens=True)["input_ids"]
        answer = tokenizer(fmt.answer_text(r.question, r.answer), add_special_tokens=False)["input_ids"]
        if fmt.name == BARE:
            answer.append(tokenizer.eos_token_id)
        ids = (prompt + answer)[:max_length]
        labels = ([IGNORE] * len(prompt) + answer)[:max_length]
        if any(label != IGNORE for label in labels):
            examples.append((ids, labels))
    return examples


def length_grouped_batches(examples, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Indices in batches of similar length (little padding), in a seeded random batch order."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def collate(examples, batch: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(examples[i][0]) for i in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, i in enumerate(batch):
        x, y = examples[i]
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_loss(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal-LM loss of `model(**inputs).loss`, with the LM head run only where a label is trained.

    The head (vocabulary x hidden, the largest matrix of a small model) and its softmax would otherwise
    run on every prompt and padding position only for the loss to ignore them.
    """
    # use_cache=False: training never reads a KV cache back, so building one only holds tensors longer
    hidden = model.get_decoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                 use_cache=False)[0]
    targets = inputs["labels"][:, 1:]
    keep = targets != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma-style soft cap, as the model's own forward applies it
        logits = torch.tanh(logits / cap) * cap
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def trained_tokens(inputs: dict[str, torch.Tensor]) -> int:
    """Positions whose next token carries a loss (answer_loss's `keep`)."""
    return int((inputs["labels"][:, 1:] != IGNORE).sum())


def accumulate_gradients(model, micro_batches: list[dict[str, torch.Tensor]], bf16: bool = False) -> float:
    """Backward over the micro-batches of one optimizer step; returns the step's loss.

    Each micro-batch's mean loss is weighted by its share of the step's trained tokens, so the summed gradient is
    that of one batch holding all their examples (the mean over all its trained tokens), however unevenly the
    answer tokens fall into the micro-batches. Dividing by the number of micro-batches instead would weight a
    token of a short-answer micro-batch more than one of a long-answer micro-batch.
    """
    counts = [trained_tokens(inputs) for inputs in micro_batches]
    total = sum(counts)
    step_loss = 0.0
    for inputs, n in zip(micro_batches, counts):
        device = inputs["input_ids"].device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = answer_loss(model, inputs)
        # one micro-batch: the plain loss, so the default run's gradients stay bit-identical to before accumulation
        (loss if len(micro_batches) == 1 else loss * (n / total)).backward()
        step_loss += float(loss.detach()) * n / total
    return step_loss


def lora_config(cfg: Finetune):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), bias="none", task_type="CAUSAL_LM")


def prepare_model(model, cfg: Finetune):
    """The model to train (checkpointing switched on, LoRA adapter attached per cfg) and the module answer_loss
    runs: for lora the transformers model inside the peft wrapper, whose target layers now hold the adapter."""
    if cfg.gradient_checkpointing:
        # non-reentrant torch checkpointing per decoder layer (transformers' default): only each layer's input is
        # kept, the layer runs again in the backward pass
        model.activation_checkpointing_enable()
    if cfg.method == "full":
        return model, model
    from peft import get_peft_model

    try:
        with warnings.catch_warnings():
            # peft 0.21 asks transformers 5 for is_gradient_checkpointing, which warns that the name is deprecated
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            wrapped = get_peft_model(model, lora_config(cfg))
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ParamsError(f"params.yaml: finetune.lora_target_modules = {list(cfg.lora_target_modules)}: "
                          f"{exc}") from None
    return wrapped, wrapped.get_base_model()


def merged(model, cfg: Finetune):
    """The plain transformers model to save: for lora, the adapter merged into the weights it adapts
    (W + lora_alpha / lora_r x B A) and the peft layers removed, so the checkpoint has the base's tensor names."""
    return model.merge_and_unload() if cfg.method == "lora" else model


def resolve_device(cfg: Finetune) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ParamsError("params.yaml: finetune.device = cuda, but torch sees no CUDA GPU "
                          "(torch.cuda.is_available() is False); use auto or cpu")
    return torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")


def cpu_has_bf16() -> bool:
    """Native bf16 dot products (AVX512-BF16 or AMX): without them bf16 autocast on CPU is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(cfg: Finetune, device: torch.device) -> bool:
    if cfg.precision != "auto":
        return cfg.precision == "bf16"
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()


def train_format(model_dir: Path, choice: str) -> PromptFormat:
    """The PromptFormat of params base.format for the checkpoint in `model_dir` (its base GGUF's metadata, which
    prepare put there as TEMPLATE_FILE and every fine-tune carries on)."""
    from isara.cards import gguf_kv
    from isara.prompts import prompt_format

    return prompt_format(choice, gguf_kv(Path(model_dir) / TEMPLATE_FILE))


def train(model_dir: Path, records: list[Record], out_dir: Path, cfg: Finetune, log_dir: Path | None = None,
          progress: bool = True, fmt: PromptFormat = PromptFormat(BARE)) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.n_threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    device = resolve_device(cfg)
    bf16 = use_bf16(cfg, device)
    # Weights, gradients and optimizer state stay fp32; autocast runs the matmuls in bf16 (mixed precision).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model, core = prepare_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]  # lora: the adapter's A and B matrices only
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = encode(records, tokenizer, cfg.max_length, fmt)
    if not examples:
        raise ValueError("no training examples: every record was cut to nothing by finetune.max_length")

    accumulation = cfg.gradient_accumulation_steps
    # optimizer steps: max_steps, warmup and the schedule count these, not micro-batches
    steps_per_epoch = math.ceil(math.ceil(len(examples) / cfg.batch_size) / accumulation)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps < 0 else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    warmup = int(total * cfg.warmup_ratio)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(total - warmup, 1)))

    live = None
    if log_dir is not None:
        from dvclive import Live

        shutil.rmtree(log_dir, ignore_errors=True)
        live = Live(str(log_dir), dvcyaml=None, save_dvc_exp=False, report=None)

    generator = torch.Generator().manual_seed(cfg.seed)
    step, losses, tokens, slots, start = 0, [], 0, 0, time.perf_counter()
    bar = tqdm(total=total, desc="finetune", unit="step", disable=not progress)
    while step < total:
        micro = length_grouped_batches(examples, cfg.batch_size, generator)
        for first in range(0, len(micro), accumulation):
            if step >= total:
                break
            group = [{k: v.to(device) for k, v in collate(examples, batch, pad_id).items()}
                     for batch in micro[first : first + accumulation]]
            losses.append(accumulate_gradients(core, group, bf16))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += sum(int(inputs["attention_mask"].sum()) for inputs in group)  # real tokens, padding excluded
            slots += sum(inputs["attention_mask"].numel() for inputs in group)
            if live is not None:
                live.log_metric("loss", losses[-1])
                live.log_metric("lr", schedule.get_last_lr()[0])
                live.next_step()
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    if live is not None:
        live.end()

    del optimizer, schedule  # AdamW's two fp32 moments (2x the model) need not sit through the save
    trainable = sum(p.numel() for p in params)
    del params
    model = merged(model, cfg)
    model.eval()
    model.to("cpu")
    save_checkpoint(model, tokenizer, out_dir, carry=[Path(model_dir) / TEMPLATE_FILE])
    tail = losses[-steps_per_epoch:]
    return {
        "examples": len(examples),
        "steps": step,
        "first_loss": round(losses[0], 4),
        "final_loss": round(losses[-1], 4),
        "last_epoch_mean_loss": round(sum(tail) / len(tail), 4),
        "train_tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 2),
        "padding_share": round(1 - tokens / slots, 4),
        "seconds": round(seconds, 2),
        "device": device.type,
        "precision": "bf16" if bf16 else "fp32",
        "format": fmt.name,
        "method": cfg.method,
        "trainable_parameters": trainable,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "gradient_accumulation_steps": accumulation,
    }


def save_checkpoint(model, tokenizer, out_dir: Path, carry: list[Path] = ()) -> None:
    """Write into a temp folder and rename, so a crash never leaves a half-written checkpoint.

    `carry`: files copied alongside, e.g. the GGUF template that export needs for the base's tokenizer.
    """
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for path in carry:
            shutil.copyfile(path, tmp / path.name)


def run_finetune(iteration: str, prev: str, cfg: Finetune, progress: bool = True, base_format: str = "auto",
                 out: IterPaths | None = None, dataset: Path | None = None) -> dict:
    """finetune@t: M(prev) (or M0, finetune.init) trained on D(t) -> artifacts/<t>/hf, with DVCLive loss curves.

    The fine-tuned baselines (isara.baseline) train this same way: `out` names their folders (checkpoint and
    metrics, which then also record `dataset_size`; no DVCLive curves) and `dataset` the records they train on."""
    if cfg.release_memory:
        release_freed_memory()
    here = iter_paths(iteration)
    # With method lora and init previous, each round trains a fresh adapter on M(prev)'s checkpoint, in which the
    # previous round already merged its adapter: the rounds' updates add up in the weights, not in one adapter.
    start_from = iter_paths(prev if cfg.init == "previous" else "0").hf
    records = read_records(dataset if dataset is not None else here.dataset)
    metrics = train(start_from, records, (out or here).hf, cfg, here.train_log if out is None else None, progress,
                    train_format(start_from, base_format))
    if out is not None:
        metrics["dataset_size"] = len(records)
    write_json((out or here).metrics("finetune"), metrics)
    return metrics
