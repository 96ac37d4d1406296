"""finetune stage: supervised fine-tuning of M(t-1) (or M0) on D(t), loss on answer tokens only.

A plain torch loop (nanoGPT style) rather than transformers.Trainer: the whole loop is on one screen,
and batches are grouped by length so CPU time is not spent on padding.
Method (params finetune.method): full trains every weight; lora trains a peft LoRA adapter alone and merges it into
the weights before the checkpoint is saved, so export (isara.gguf) and every later stage read a plain checkpoint.
finetune.gradient_checkpointing recomputes activations in the backward pass; finetune.gradient_accumulation_steps
sums the gradients of several micro-batches into one optimizer step; finetune.release_memory hands malloc's free heap
pages back to the OS before each step's memory peak (isara.memory.trim_heap); with checkpointing and fused AdamW they
hold the default run's fine-tunes under 3 GiB (benchmarks/README.md). finetune.num_processes trains data-parallel in
processes started by torchrun (launch()); finetune.resume_every saves a state a killed fine-tune resumes from
(ResumeState).
Format (params base.format, isara.prompts.PromptFormat): the prompt (no loss), then the answer the model is taught to
write (loss): bare "Question: <q>\nAnswer:" + " <answer><eos>", or the base's chat template's user turn + the
assistant turn it closes ("<answer><|im_end|>"), the format the exported GGUF is served and evaluated in.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from isara.gguf import TEMPLATE_FILE
from isara.io import atomic_directory, atomic_file, write_json, write_jsonl
from isara.memory import release_at_peaks, trim_heap
from isara.params import Finetune, ParamsError
from isara.paths import IterPaths, iter_paths
from isara.prompts import BARE, PromptFormat
from isara.records import Record, file_sha256, read_records

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


def step_groups(examples, batch_size: int, accumulation: int, generator: torch.Generator) -> Iterator[list[list[int]]]:
    """Each optimizer step's micro-batches, epoch after epoch, without end.

    A step takes one length-grouped batch of batch_size x accumulation examples, cut into micro-batches of
    batch_size: the same examples (and the same seeded order) as one batch of that size, so accumulation changes
    the memory a step needs, not what it trains on. Deterministic from the generator's seed, which is how a resumed
    fine-tune finds its place: it replays the steps it has done without computing them."""
    while True:
        for batch in length_grouped_batches(examples, batch_size * accumulation, generator):
            yield [batch[i : i + batch_size] for i in range(0, len(batch), batch_size)]


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


LOSS_CHUNK = 64  # trained positions per exp-and-sum of HeadLoss's logsumexp, and per matmul but in fp32 on CPU
# Trained positions per matmul with the head in fp32 on CPU: each of a chunk's two matmuls streams the whole head (671
# MB of fp32 for Gemma 3), and at 64 rows they ran at half the speed of larger ones on 2 AVX2 cores; 128 rows took a
# fine-tune step there about 10% faster for one more chunk of logits in memory (64 MiB; benchmarks/README.md). bf16
# autocast keeps 64: its extra fp32 copy of the logits makes rows dearer, and its runs gained little from more.
FP32_MATMUL_CHUNK = 2 * LOSS_CHUNK


class HeadLoss(torch.autograd.Function):
    """Mean cross-entropy of the LM head's logits (hidden @ weight.T, Gemma's soft cap applied when set) against
    `targets`, a chunk of rows at a time, with both gradients taken in the forward pass (Liger-Kernel's fused
    linear cross-entropy, in plain torch). Autograd would keep every row's logits, their softmax and, with the
    soft cap, its tanh alive until the backward pass: for Gemma 3's 262k vocabulary that is 1 GiB of fp32 per
    1,000 trained positions per tensor, the largest part of its fine-tune's peak memory; here one chunk's exist.
    The matmuls run in the caller's autocast dtype, their operands rounded as autocast would round them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, cap):
        n, vocab = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None  # LoRA: the head is frozen
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        chunk = FP32_MATMUL_CHUNK if dtype == torch.float32 and device == "cpu" else LOSS_CHUNK
        # Cast once what autocast would cast in every chunk's matmuls. Each chunk's tensors (64 MiB of fp32 a
        # tensor for Gemma 3 per LOSS_CHUNK rows) go into buffers made once: a fresh one per chunk page-faulted all
        # of its memory in again after trim_heap, which cost a Gemma 3 step more time than the softmax itself.
        weight, low_hidden = weight.to(dtype), hidden.to(dtype)
        buffer = lambda dt, rows: torch.empty((min(n, rows), vocab), dtype=dt, device=hidden.device)  # noqa: E731
        low = buffer(dtype, chunk)  # the matmuls' side: the logits as they come out, the gradient as it goes in
        full = low if dtype == torch.float32 else buffer(torch.float32, chunk)
        shifted, squashed = buffer(torch.float32, LOSS_CHUNK), buffer(torch.float32, chunk) if cap else None
        for start in range(0, n, chunk):
            h, t = low_hidden[start:start + chunk], targets[start:start + chunk]
            rows = len(t)
            logits = full[:rows]
            torch.mm(h, weight.t(), out=low[:rows])
            if logits is not low:
                logits.copy_(low[:rows])
            if cap:
                torch.tanh(logits.div_(cap), out=squashed[:rows])
                torch.mul(squashed[:rows], cap, out=logits)
            # torch.logsumexp's own steps (max, exp of the difference, sum, log, plus max) without its temporaries
            top = logits.amax(1, keepdim=True)
            top.masked_fill_(top.abs() == float("inf"), 0)
            lse = torch.empty(rows, dtype=torch.float32, device=hidden.device)
            for part in range(0, rows, LOSS_CHUNK):  # the exp's scratch buffer holds LOSS_CHUNK rows
                block = logits[part:part + LOSS_CHUNK]
                torch.sub(block, top[part:part + LOSS_CHUNK], out=shifted[:len(block)]).exp_()
                torch.sum(shifted[:len(block)], 1, out=lse[part:part + LOSS_CHUNK])
            lse.log_().add_(top.squeeze(1))
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
            grad[torch.arange(rows, device=t.device), t] -= 1
            if cap:
                grad.mul_(1 - squashed[:rows].square_())
            grad.div_(n)
            if grad is not low:
                grad = low[:rows].copy_(grad)
            if grad_hidden is not None:
                grad_hidden[start:start + rows] = grad @ weight
            if grad_weight is not None:
                grad_weight += grad.t() @ h
        ctx.grads = (grad_hidden, grad_weight)
        return total / n

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.grads
        del ctx.grads
        return tuple(None if g is None else g * grad_output.to(g.dtype) for g in (grad_hidden, grad_weight)) + (None, None)


def answer_loss(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal-LM loss of `model(**inputs).loss`, with the LM head run only where a label is trained.

    The head (vocabulary x hidden, the largest matrix of a small model) and its softmax would otherwise
    run on every prompt and padding position only for the loss to ignore them; HeadLoss then runs it a chunk
    of positions at a time.
    """
    # use_cache=False: training never reads a KV cache back, so building one only holds tensors longer
    hidden = model.get_decoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                 use_cache=False)[0]
    targets = inputs["labels"][:, 1:]
    keep = targets != IGNORE
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:  # e.g. lm_head among LoRA's targets
        raise ParamsError(f"finetune: the LM head must be a plain linear layer without bias, not {head!r}; "
                          "leave lm_head out of finetune.lora_target_modules")
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma-style soft cap, as the model's forward
    trim_heap()  # the head's transients come on top of the whole forward: the step's memory peak
    return HeadLoss.apply(hidden[:, :-1][keep], head.weight, targets[keep], cap)


def trained_tokens(inputs: dict[str, torch.Tensor]) -> int:
    """Positions whose next token carries a loss (answer_loss's `keep`)."""
    return int((inputs["labels"][:, 1:] != IGNORE).sum())


def accumulate_gradients(model, micro_batches: list[dict[str, torch.Tensor]], bf16: bool = False,
                         total: int | None = None) -> float:
    """Backward over the micro-batches of one optimizer step; returns the step's loss.

    Each micro-batch's mean loss is weighted by its share of the step's trained tokens, so the summed gradient is
    that of one batch holding all their examples (the mean over all its trained tokens), however unevenly the
    answer tokens fall into the micro-batches. Dividing by the number of micro-batches instead would weight a
    token of a short-answer micro-batch more than one of a long-answer micro-batch.
    `total`: the step's trained tokens over all processes (finetune.num_processes), when these micro-batches are one
    process's share: the weights then sum, over the processes, to the one-process gradient.
    """
    counts = [trained_tokens(inputs) for inputs in micro_batches]
    total = sum(counts) if total is None else total
    step_loss = 0.0
    for inputs, n in zip(micro_batches, counts):
        device = inputs["input_ids"].device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = answer_loss(model, inputs)
        # the whole step in one micro-batch: the plain loss, so the default run's gradients stay bit-identical to
        # before accumulation
        (loss if n == total else loss * (n / total)).backward()
        step_loss += float(loss.detach()) * n / total
    return step_loss


def all_reduce_gradients(params: list[torch.Tensor], step_loss: float) -> float:
    """Sum the processes' gradients and step losses (each already weighted by its share of the step's trained
    tokens, so the sums are what one process computes on the whole step); every process then holds the same
    gradients, clips them the same way and takes the same optimizer step, so the weights never diverge.

    A plain all-reduce rather than DistributedDataParallel: a process whose share of a step is empty (a last batch
    smaller than num_processes) still joins it with zero gradients, where DDP would wait for its backward pass."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    pending = [dist.all_reduce(p.grad, async_op=True) for p in params]
    loss = torch.tensor([step_loss], dtype=torch.float64, device=params[0].device)
    dist.all_reduce(loss)
    for work in pending:
        work.wait()
    return float(loss)


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
        if cfg.uncheckpointed_layers:
            # transformers checks each decoder layer's own flag at call time. The last layers are the first the
            # backward pass reaches, so their kept activations are freed first.
            from transformers.modeling_layers import GradientCheckpointingLayer

            layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
            for layer in layers[max(len(layers) - cfg.uncheckpointed_layers, 0):]:
                layer.gradient_checkpointing = False
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


class LoweredWeights:
    """LoRA under bf16 autocast: the frozen weights of the adapted linear layers held in bf16 while training.

    Autocast caches its casts only for weights that take a gradient, so it cast every frozen weight to bf16 again
    in every forward and recomputed forward. Held in bf16, the matmuls get the same operands, so training computes
    the same numbers bit for bit (tests/test_finetune.py). What it buys is memory more than time: the fp32 weights
    are views of the checkpoint file transformers maps, every other tensor is copied out of it (CPU), so the mapping
    closes and the fp32 weights leave memory (Gemma 3's fine-tune: 2.71 -> 2.49 GiB, benchmarks/README.md).
    restore() reads them back from the checkpoint before the adapter is merged into them."""

    def __init__(self, core, dtype: torch.dtype):
        from peft.tuners.lora import LoraLayer

        self.layers: dict[str, torch.nn.Linear] = {}  # checkpoint tensor name -> the linear layer holding it
        self.dtype = None
        for name, module in core.named_modules():
            if isinstance(module, LoraLayer) and isinstance(module.base_layer, torch.nn.Linear):
                base = module.base_layer
                self.dtype = base.weight.dtype
                base.weight = torch.nn.Parameter(base.weight.detach().to(dtype), requires_grad=False)
                self.layers[f"{name}.weight"] = base
        done = {id(layer.weight) for layer in self.layers.values()}  # already in memory of their own
        for tensor in [*core.parameters(), *core.buffers()]:
            if id(tensor) not in done and tensor.device.type == "cpu":
                done.add(id(tensor))  # a tied weight once
                tensor.data = tensor.data.clone()

    def restore(self, model_dir: Path) -> None:
        from safetensors import safe_open

        missing = set(self.layers)
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(path, framework="pt") as f:
                for key in missing & set(f.keys()):
                    layer = self.layers[key]
                    weight = f.get_tensor(key).to(device=layer.weight.device, dtype=self.dtype)
                    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
                    missing.discard(key)
        if missing:
            raise RuntimeError(f"{model_dir}: no tensor named {sorted(missing)[0]} (and {len(missing) - 1} more) "
                               "to restore the LoRA-adapted weights from before merging")


def merged(model, cfg: Finetune):
    """The plain transformers model to save: for lora, the adapter merged into the weights it adapts
    (W + lora_alpha / lora_r x B A) and the peft layers removed, so the checkpoint has the base's tensor names."""
    return model.merge_and_unload() if cfg.method == "lora" else model


def resolve_device(cfg: Finetune, local_rank: int = 0) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ParamsError("params.yaml: finetune.device = cuda, but torch sees no CUDA GPU "
                          "(torch.cuda.is_available() is False); use auto or cpu")
    if cfg.device != "cpu" and torch.cuda.is_available():
        if cfg.num_processes > torch.cuda.device_count():
            raise ParamsError(f"params.yaml: finetune.num_processes = {cfg.num_processes}, but torch sees "
                              f"{torch.cuda.device_count()} CUDA GPU(s): one process per GPU")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


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


def precision_note(cfg: Finetune, device: torch.device, bf16: bool) -> str | None:
    """The line a user gets before an fp32 fine-tune on CPU, where `auto` found no native bf16: the run is then
    about 3x slower than the README's headline times, and without the line nothing says why."""
    if device.type != "cpu" or bf16 or cfg.precision != "auto":
        return None
    return ("finetune: this CPU has no native bf16 dot products (AVX512-BF16 or AMX), so fine-tuning runs in fp32, "
            "about 3x slower than with them: the default dvc repro takes about an hour on 2 such cores instead of "
            "19-24 minutes (README \"Performance\"). finetune.precision=bf16 would be slower still here.")


def train_format(model_dir: Path, choice: str) -> PromptFormat:
    """The PromptFormat of params base.format for the checkpoint in `model_dir` (its base GGUF's metadata, which
    prepare put there as TEMPLATE_FILE and every fine-tune carries on)."""
    from isara.cards import gguf_kv
    from isara.prompts import prompt_format

    return prompt_format(choice, gguf_kv(Path(model_dir) / TEMPLATE_FILE))


def distributed() -> tuple[int, int, int]:
    """(rank, local rank, world size) of this process as torchrun sets them; (0, 0, 1) outside torchrun."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def train(model_dir: Path, records: list[Record], out_dir: Path, cfg: Finetune, log_dir: Path | None = None,
          progress: bool = True, fmt: PromptFormat = PromptFormat(BARE)) -> dict | None:
    """Fine-tune the checkpoint in model_dir on records into out_dir; the metrics (None in torchrun's other ranks).

    finetune.num_processes > 1: launch() starts the processes, which come back here under torchrun."""
    rank, local_rank, world = distributed()
    if cfg.num_processes > 1 and world == 1:
        return launch(model_dir, records, out_dir, cfg, log_dir, progress, fmt)
    device = resolve_device(cfg, local_rank)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(model_dir, records, out_dir, cfg, log_dir, progress, fmt, device, rank, world)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _train(model_dir: Path, records: list[Record], out_dir: Path, cfg: Finetune, log_dir: Path | None,
           progress: bool, fmt: PromptFormat, device: torch.device, rank: int, world: int) -> dict | None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)
    # n_threads is the machine's share for the whole fine-tune: on CPU the processes split it
    torch.set_num_threads(max(1, cfg.n_threads // world) if device.type == "cpu" else cfg.n_threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bf16 = use_bf16(cfg, device)
    note = precision_note(cfg, device, bf16)
    if note and rank == 0:
        print(note, file=sys.stderr, flush=True)
    # Weights, gradients and optimizer state stay fp32; autocast runs the matmuls in bf16 (mixed precision).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model, core = prepare_model(model, cfg)
    lowered = LoweredWeights(core, torch.bfloat16) if cfg.method == "lora" and bf16 else None
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # lora: the adapter's A and B only
    params = [p for _, p in named]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = encode(records, tokenizer, cfg.max_length, fmt)
    if not examples:
        raise ValueError("no training examples: every record was cut to nothing by finetune.max_length")
    trained = [sum(label != IGNORE for label in labels[1:]) for _, labels in examples]  # trained_tokens per example

    accumulation = cfg.gradient_accumulation_steps
    # optimizer steps: max_steps, warmup and the schedule count these, not micro-batches
    steps_per_epoch = math.ceil(len(examples) / (cfg.batch_size * accumulation))
    total = steps_per_epoch * cfg.epochs if cfg.max_steps < 0 else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    warmup = int(total * cfg.warmup_ratio)
    # fused: one kernel per parameter, no per-parameter temporaries (0.10 GiB less peak memory in the default run)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(total - warmup, 1)))

    resume = ResumeState(out_dir, fingerprint(model_dir, examples, cfg, fmt)) if cfg.resume_every else None
    done = resume.load(named, optimizer, schedule, device) if resume else {}
    first_step = done.get("step", 0)
    losses, tokens, slots = done.get("losses", []), done.get("tokens", 0), done.get("slots", 0)
    seconds_before = done.get("seconds", 0.0)

    live = None
    if log_dir is not None and rank == 0:
        from dvclive import Live

        if not first_step:
            shutil.rmtree(log_dir, ignore_errors=True)
        # resume: DVCLive carries on from the step the curves reached
        live = Live(str(log_dir), dvcyaml=None, save_dvc_exp=False, report=None, resume=bool(first_step))

    start = time.perf_counter()
    bar = tqdm(total=total, initial=first_step, desc="finetune", unit="step", disable=not progress or rank > 0)
    groups = step_groups(examples, cfg.batch_size, accumulation, torch.Generator().manual_seed(cfg.seed))
    for step, group in zip(range(total), groups):
        if step < first_step:  # done before the resume: its batches drawn (the generator's order), not trained
            continue
        # this process's rows of each micro-batch (all of them in one process); a share can be empty
        mine = [batch[rank::world] for batch in group]
        inputs = [{k: v.to(device) for k, v in collate(examples, b, pad_id).items()} for b in mine if b]
        step_loss = accumulate_gradients(core, inputs, bf16, sum(trained[i] for b in group for i in b))
        losses.append(all_reduce_gradients(params, step_loss) if world > 1 else step_loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += sum(len(examples[i][0]) for b in group for i in b)  # real tokens, padding excluded
        slots += sum(len(b) * max(len(examples[i][0]) for i in b) for b in group)
        if live is not None:
            live.log_metric("loss", losses[-1])
            live.log_metric("lr", schedule.get_last_lr()[0])
            live.next_step()
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if resume and rank == 0 and (step + 1) % cfg.resume_every == 0 and step + 1 < total:
            resume.save(named, optimizer, schedule, step=step + 1, losses=losses, tokens=tokens, slots=slots,
                        seconds=seconds_before + time.perf_counter() - start)
    bar.close()
    seconds = seconds_before + time.perf_counter() - start
    if live is not None:
        live.end()

    del optimizer, schedule  # AdamW's two fp32 moments (2x the model) need not sit through the save
    trainable = sum(p.numel() for p in params)
    del params, named
    if rank > 0:
        return None
    trim_heap()
    if lowered is not None:
        lowered.restore(model_dir)
    model = merged(model, cfg)
    model.eval()
    model.to("cpu")
    save_checkpoint(model, tokenizer, out_dir, carry=[Path(model_dir) / TEMPLATE_FILE])
    if resume:
        resume.remove()  # the checkpoint is written: nothing left to resume
    tail = losses[-steps_per_epoch:]
    return {
        "examples": len(examples),
        "steps": total,
        "first_loss": round(losses[0], 4),
        "final_loss": round(losses[-1], 4),
        "last_epoch_mean_loss": round(sum(tail) / len(tail), 4),
        "train_tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 2),
        "padding_share": round(1 - tokens / slots, 4),
        "seconds": round(seconds, 2),
        "device": device.type,
        "processes": world,
        "precision": "bf16" if bf16 else "fp32",
        "format": fmt.name,
        "method": cfg.method,
        "trainable_parameters": trainable,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "uncheckpointed_layers": cfg.uncheckpointed_layers if cfg.gradient_checkpointing else None,
        "gradient_accumulation_steps": accumulation,
        "resumed_from_step": first_step,
    }


# Params that change how a fine-tune runs, not what it computes: a resume may change them.
RUN_ONLY = ("n_threads", "release_memory", "resume_every", "num_processes", "uncheckpointed_layers")


def fingerprint(model_dir: Path, examples, cfg: Finetune, fmt: PromptFormat) -> str:
    """What a resume state must have been trained from: the start weights, the encoded examples, the params that
    shape training and the prompt format. Hashing the weights costs about a second per GB, next to hours of
    training at the sizes that need a resume."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(file_sha256(path).encode())
    digest.update(json.dumps([examples, cfg.model_dump(mode="json", exclude=set(RUN_ONLY)), asdict(fmt)],
                             sort_keys=True).encode())
    return digest.hexdigest()


class ResumeState:
    """finetune.resume_every: the trainable weights, optimizer and schedule state, step, loss curve and RNG state
    in one file beside the checkpoint folder (<out>.resume.pt). DVC deletes a stage's outputs before it runs it
    again, so the state cannot live inside them; the file is git-ignored and removed once the checkpoint is
    written. A state whose fingerprint differs (other params, data or start weights) is ignored and replaced."""

    def __init__(self, out_dir: Path, digest: str):
        self.path = Path(out_dir).with_name(Path(out_dir).name + ".resume.pt")
        self.digest = digest

    def load(self, named, optimizer, schedule, device: torch.device) -> dict:
        if not self.path.exists():
            return {}
        state = torch.load(self.path, map_location=device, weights_only=True)
        if state.get("fingerprint") != self.digest:
            warnings.warn(f"{self.path}: a resume state of another fine-tune (params, data or start model differ); "
                          "starting from step 0", stacklevel=2)
            return {}
        with torch.no_grad():
            for name, p in named:
                p.copy_(state["weights"][name])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"].cpu())
        print(f"finetune: resuming from step {state['step']} ({self.path})", flush=True)
        return state

    def save(self, named, optimizer, schedule, **progress) -> None:
        state = {"fingerprint": self.digest, "weights": {n: p.detach() for n, p in named},
                 "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                 "rng": torch.get_rng_state(), **progress}
        with atomic_file(self.path) as tmp:
            torch.save(state, tmp)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def launch(model_dir: Path, records: list[Record], out_dir: Path, cfg: Finetune, log_dir: Path | None,
           progress: bool, fmt: PromptFormat) -> dict:
    """finetune.num_processes > 1: train() in that many processes on this machine, started by torchrun (torch's
    own launcher): gloo on CPU, NCCL and one GPU per process on CUDA. Data-parallel: each process takes its rows of
    every batch and the gradients are summed (all_reduce_gradients), so the model equals one process's on the same
    batches, within float rounding. DVC still sees one stage: this process waits and returns rank 0's metrics."""
    resolve_device(cfg)  # a params error before any process starts
    with tempfile.TemporaryDirectory(prefix="isara-finetune-") as tmp:
        spec = {"model_dir": str(model_dir), "records": f"{tmp}/records.jsonl", "out_dir": str(out_dir),
                "cfg": cfg.model_dump(mode="json"), "log_dir": str(log_dir) if log_dir else None,
                "progress": progress, "fmt": asdict(fmt), "metrics": f"{tmp}/metrics.json"}
        write_jsonl(spec["records"], records)
        write_json(f"{tmp}/spec.json", spec)
        # the processes import this isara (a queued `dvc exp run` runs a copy of the project, not site-packages)
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cfg.n_threads // cfg.num_processes)),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                           os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.num_processes}",
               "-m", "isara.finetune", f"{tmp}/spec.json"]
        code = subprocess.run(cmd, env=env).returncode
        if code:
            raise RuntimeError(f"finetune.num_processes = {cfg.num_processes}: torchrun exited with code {code} "
                               "(the processes' errors are above)")
        return json.loads(Path(spec["metrics"]).read_text())


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
        release_at_peaks()
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


def worker(spec_path: str) -> None:
    """One of launch()'s processes (torchrun runs `python -m isara.finetune SPEC`)."""
    spec = json.loads(Path(spec_path).read_text())
    cfg = Finetune(**spec["cfg"])
    if cfg.release_memory:
        release_at_peaks()
    metrics = train(Path(spec["model_dir"]), read_records(spec["records"]), Path(spec["out_dir"]), cfg,
                    Path(spec["log_dir"]) if spec["log_dir"] else None, spec["progress"], PromptFormat(**spec["fmt"]))
    if metrics is not None:
        write_json(spec["metrics"], metrics)


if __name__ == "__main__":
    worker(sys.argv[1])
