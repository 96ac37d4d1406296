"""Fine-tuning throughput: isara's finetune loop vs a plain transformers.Trainer on the same data and settings.
With --memory: peak memory and tokens/s of the finetune methods and memory levers, each in its own process.

    python benchmarks/finetune.py                       # 64 seeds, batch 8, 8 steps each, 2 threads
    python benchmarks/finetune.py --steps 16 --threads 2 --batch-size 8
    python benchmarks/finetune.py --memory              # full / lora x checkpointing, the default finetune@2 shape
    python benchmarks/finetune.py --memory --dataset artifacts/2/dataset.jsonl   # a real D(2)
    python benchmarks/finetune.py --profile --base artifacts/0/hf --dataset artifacts/2/dataset.jsonl
                                                        # where a default step's time goes, fp32 and bf16
    python benchmarks/finetune.py --device cuda --sizes 135M 360M 1.7B --batch-size 32 --steps 64 --repeats 1
                                                        # issue 13's GPU table: random-weight SmolLM2 shapes, bf16

Both train the same prepared base checkpoint (SmolLM2-135M, fp32) on the same examples (data/seeds/safety.jsonl
encoded by isara.finetune.encode: prompt tokens masked, answer + eos trained), same lr, batch size, optimizer
(AdamW), number of optimizer steps and threads. The Trainer gets the usual recipe: random batches padded to
the longest in the batch (DataCollatorForSeq2Seq), fp32 (the Trainer's CPU default). isara runs twice: in fp32
(length-grouped batches and the LM head on answer positions only) and with its default precision (auto: bf16
autocast where the CPU has native bf16 dot products, AVX512-BF16 or AMX; else fp32 again). Reported: real
(non-padding) tokens per second of the training loop, padding share, and the ratios to the Trainer. A second
Trainer row turns on its own bf16 flag, to show how much of the gain is precision and how much the loop. Runs alternate (Trainer, isara, Trainer, isara) so load drift on a
shared machine hits both alike; medians are printed.

--memory: isara.finetune.train as the finetune stage runs it (the params.yaml defaults, the base's prompt format,
DVCLive logging, the checkpoint saved and, for lora, merged) on the default run's finetune@2 shape: 128 records
(safety_wide + safety_mixed seeds, or --dataset), batch 8, max_length 256, 2 epochs. Each configuration (full,
full + gradient checkpointing, + release_memory (the default: malloc's free heap pages trimmed before each step's
peak; the row marked "(before)" fixes glibc's mmap threshold at 128 KiB instead, the mechanism until 2026-12-01), lora,
lora + checkpointing, lora with the last k decoder layers uncheckpointed (finetune.uncheckpointed_layers), full
with batch 4 x 2 accumulation steps; --rows picks some) runs in a fresh child process, --repeats times in
alternating rounds, and reports its own peak resident memory (ru_maxrss: model load, training and save together,
as the stage's process holds them), real tokens/s of its training loop and the sha256 of the weights it saved.

--profile: where the time of the default fine-tune's steps goes (params.yaml's base model, unless --base, and
finetune section; the --memory data), under torch.profiler, in fp32 (the precision of a CPU without native bf16)
and, where the CPU has native bf16, in bf16 autocast: seconds a step, and the shares of the step's CPU time in
HeadLoss (the LM head's matmuls and softmax, its gradients taken in its forward pass) and in aten::mm (every matmul,
the head's included). What the matmuls do not take is the most any fusion of the other ops (torch.compile, a fused
kernel) could save.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from isara.base_models import base_model_path  # noqa: E402
from isara.finetune import (IGNORE, accumulate_gradients, collate, cpu_has_bf16, encode,  # noqa: E402
                            length_grouped_batches, prepare_model, train, train_format)
import isara.finetune as finetune_module  # noqa: E402
from isara.memory import release_at_peaks, release_freed_memory  # noqa: E402
from isara.params import Finetune, load_params  # noqa: E402
from isara.prepare import prepare_base  # noqa: E402
from isara.records import file_sha256, read_records  # noqa: E402
from isara.seeds import read_seed_file  # noqa: E402


def run_trainer(model_dir: Path, examples, cfg: Finetune, steps: int, out: Path, bf16: bool = False,
                device: str = "cpu") -> tuple[float, int, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.n_threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [{"input_ids": x, "attention_mask": [1] * len(x), "labels": y} for x, y in examples]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
    counted = {"real": 0, "padded": 0}

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            counted["real"] += int(inputs["attention_mask"].sum())
            counted["padded"] += int(inputs["attention_mask"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.lr, max_steps=steps,
        weight_decay=cfg.weight_decay, warmup_steps=int(steps * cfg.warmup_ratio), max_grad_norm=1.0, logging_steps=steps,
        save_strategy="no", report_to=[], use_cpu=device == "cpu", seed=cfg.seed, dataloader_num_workers=0,
        disable_tqdm=True, bf16=bf16,
    )
    trainer = CountingTrainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, counted["real"], counted["padded"]


# --sizes: SmolLM2-shaped llama configs (SmolLM2's tokenizer and vocabulary), built with random weights: enough for
# throughput, which does not depend on the weights' values.
SIZES = {
    "135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
    "360M": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5),
    "1.7B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32),
}


def random_checkpoint(base: Path, size: str, out: Path) -> Path:
    """A random-weight checkpoint of `size` with the prepared base's tokenizer and GGUF template beside it."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    for key, value in SIZES[size].items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    for path in base.iterdir():
        if not path.name.startswith(("model", "config")):
            shutil.copy(path, out / path.name)
    return out


# --memory rows: overrides of the params.yaml finetune defaults. release_memory is process-wide (glibc's malloc), so
# each row runs in a fresh process, and the child applies it as the finetune stage does (run_finetune).
PLAIN = {"gradient_checkpointing": False, "release_memory": False}
FULL = {"method": "full", "lr": 5e-5}  # full fine-tuning's own lr (the default lora's 1e-3 is too high for it)
THRESHOLD = "mmap_threshold_128k"
FP32_FROZEN = "fp32_frozen_weights"  # LoRA's frozen weights left in fp32, cast by autocast each use (until 2026-12-01)
MEMORY_CONFIGS = {  # the params.yaml default: "lora + checkpointing except the last 8 layers + release_memory"
    "full": {**PLAIN, **FULL},
    "full + checkpointing": {**PLAIN, **FULL, "gradient_checkpointing": True},
    "full + checkpointing + release_memory": {**FULL, "gradient_checkpointing": True, "release_memory": True},
    "lora": {**PLAIN, "method": "lora"},
    "lora + checkpointing": {**PLAIN, "method": "lora", "gradient_checkpointing": True},
    "lora + checkpointing + release_memory": {"method": "lora", "gradient_checkpointing": True, "release_memory": True},
    "lora + release_memory": {"method": "lora", "gradient_checkpointing": False, "release_memory": True},
    # release_memory's mechanism until 2026-12-01 (THRESHOLD: not a param, the child applies it)
    "lora + checkpointing + mmap threshold 128 KiB (before)": {**PLAIN, "method": "lora", "gradient_checkpointing": True,
                                                              THRESHOLD: True},
    "full, batch 4 x 2 accumulation": {**PLAIN, **FULL, "batch_size": 4, "gradient_accumulation_steps": 2},
    # finetune.uncheckpointed_layers: how much speed each layer's kept activations buy, and what they cost,
    # between the all-checkpointed and the uncheckpointed rows
    **{f"lora + checkpointing except the last {k} layers + release_memory":
       {"method": "lora", "gradient_checkpointing": True, "release_memory": True, "uncheckpointed_layers": k}
       for k in (4, 8, 9, 12)},
    "lora + checkpointing except the last 4 layers + release_memory, fp32 frozen weights (before)":
        {"method": "lora", "gradient_checkpointing": True, "release_memory": True, "uncheckpointed_layers": 4,
         FP32_FROZEN: True},
}


def memory_records(dataset: str | Path | None) -> list:
    """The --memory and --profile data: a records JSONL, else the safety_wide + safety_mixed seeds."""
    if dataset:
        return read_records(Path(dataset))
    seeds = REPO / "data/seeds"
    return [*read_seed_file(seeds / "safety_wide.jsonl"), *read_seed_file(seeds / "safety_mixed.jsonl")]


def memory_child(spec: dict) -> None:
    """One configuration in this (fresh) process: train as the finetune stage does, print metrics + peak RSS."""
    base, out = Path(spec["base"]), Path(spec["out"])
    records = memory_records(spec["dataset"])
    overrides = dict(spec["cfg"])
    if overrides.pop(THRESHOLD, False):
        release_freed_memory()
    if overrides.pop(FP32_FROZEN, False):
        finetune_module.LoweredWeights = lambda core, dtype: None
    cfg = Finetune(**overrides)
    if cfg.release_memory:
        release_at_peaks()
    m = train(base, records, out / "hf", cfg, log_dir=out / "live", progress=False, fmt=train_format(base, "auto"))
    m["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    # rows that should train the same weights (checkpointing changes what is kept, not what is computed) show it
    m["weights_sha256"] = file_sha256(out / "hf/model.safetensors")[:12]
    print("RESULT " + json.dumps(m), flush=True)


def memory_table(args, work: Path, base: Path) -> None:
    defaults = load_params(REPO / "params.yaml").finetune.model_dump()
    # rows name their checkpointed layers: "checkpointing" alone means all of them
    defaults.update(n_threads=args.threads, epochs=args.epochs, uncheckpointed_layers=0)
    configs = {name: o for name, o in MEMORY_CONFIGS.items() if not args.rows or name in args.rows}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    # rounds alternate the rows (a, b, a, b) so drift in a shared machine's speed hits every row alike
    for r in range(args.repeats):
        for i, (name, overrides) in enumerate(configs.items()):
            spec = {"base": str(base), "out": str(work / f"mem{r}-{i}"),
                    "dataset": str(args.dataset) if args.dataset else None, "cfg": {**defaults, **overrides}}
            t = time.perf_counter()
            child = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                   text=True)
            if child.returncode != 0:
                sys.exit(f"{name}: child failed ({child.returncode}):\n{child.stderr[-3000:]}")
            line = next(x for x in child.stdout.splitlines() if x.startswith("RESULT "))
            m = json.loads(line[len("RESULT "):])
            runs[name].append(m)
            shutil.rmtree(spec["out"], ignore_errors=True)
            print(f"  {name}: {m['peak_rss_gib']:.2f} GiB, {m['tokens_per_second']:.1f} tok/s, "
                  f"{time.perf_counter() - t:.0f} s with load and save", flush=True)
    first = next(iter(runs.values()))[0]
    print(f"\nfine-tuning {base}, {first['examples']} examples, {first['format']} format, batch "
          f"{defaults['batch_size']}, max_length {defaults['max_length']}, {args.epochs} epochs "
          f"({first['steps']} optimizer steps), {first['precision']}, {args.threads} threads, one process per run, "
          f"{args.repeats} runs per row (median tok/s, the runs' range, the largest peak)")
    speed = {name: statistics.median(m["tokens_per_second"] for m in ms) for name, ms in runs.items()}
    reference = speed[next(iter(runs))]
    print(f"{'configuration':<62} {'trainable':>11} {'real tok/s':>10} {'range':>13} {'vs first':>8} "
          f"{'peak RSS GiB':>12} {'final loss':>10} {'weights sha256':>14}")
    for name, ms in runs.items():
        rates = [m["tokens_per_second"] for m in ms]
        print(f"{name:<62} {ms[0]['trainable_parameters']:>11,} {speed[name]:>10.1f} "
              f"{min(rates):>6.1f}-{max(rates):<6.1f} {speed[name] / reference:>7.2f}x "
              f"{max(m['peak_rss_gib'] for m in ms):>12.2f} {ms[0]['final_loss']:>10.4f} "
              f"{'/'.join(sorted({m['weights_sha256'] for m in ms})):>14}")


def profile_table(args, base: Path) -> None:
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    cfg = load_params(REPO / "params.yaml").finetune
    records = memory_records(args.dataset)
    tokenizer = AutoTokenizer.from_pretrained(base)
    examples = encode(records, tokenizer, cfg.max_length, train_format(base, "auto"))
    batches = length_grouped_batches(examples, cfg.batch_size, torch.Generator().manual_seed(cfg.seed))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    inputs = [collate(examples, b, pad) for b in batches[:args.steps + 1]]
    model, core = prepare_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), cfg)
    model.train()
    print(f"\n{base}, {cfg.method}, batch {cfg.batch_size}, {args.steps} steps after one warm-up step, "
          f"{args.threads} threads; shares of the steps' CPU time")
    print(f"{'precision':<10} {'s / step':>9} {'HeadLoss':>9} {'aten::mm':>9} {'the rest':>9}")
    for bf16 in (False, True) if cpu_has_bf16() else (False,):
        accumulate_gradients(core, [inputs[0]], bf16)
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in inputs[1:]:
                accumulate_gradients(core, [batch], bf16)
                model.zero_grad(set_to_none=True)
        seconds = (time.perf_counter() - start) / (len(inputs) - 1)
        ops = {e.key: e for e in prof.key_averages()}
        total = sum(e.self_cpu_time_total for e in ops.values())
        head, mm = ops["HeadLoss"].cpu_time_total / total, ops["aten::mm"].self_cpu_time_total / total
        print(f"{'bf16' if bf16 else 'fp32':<10} {seconds:>9.2f} {head:>9.0%} {mm:>9.0%} {1 - mm:>9.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="peak memory and tokens/s of full / lora x checkpointing")
    ap.add_argument("--profile", action="store_true", help="shares of a default step's time: HeadLoss, matmuls, rest")
    ap.add_argument("--epochs", type=int, default=2, help="--memory: epochs (the default run: 2)")
    ap.add_argument("--dataset", type=Path, help="--memory, --profile: a records JSONL (artifacts/2/dataset.jsonl)")
    ap.add_argument("--base", type=Path, help="a prepared base checkpoint (isara prepare's hf/) instead of preparing one")
    ap.add_argument("--rows", nargs="+", choices=list(MEMORY_CONFIGS), help="--memory: only these rows")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both loops train")
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES),
                    help="random-weight SmolLM2-shaped models of these sizes instead of the real SmolLM2-135M")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return memory_child(json.loads(args.child))

    work = Path(tempfile.mkdtemp(prefix="isara-bench-ft-"))
    base = work / "base"
    if args.base:
        base = args.base
    else:
        # --profile measures the default run's fine-tune, so its base is params.yaml's base.model
        prepare_base(base_model_path(load_params(REPO / "params.yaml").base.model if args.profile else "smollm2"), base)
    if args.memory:
        return memory_table(args, work, base)
    if args.profile:
        return profile_table(args, base)
    records = read_seed_file(REPO / "data/seeds/safety.jsonl")
    for size in args.sizes or [None]:
        model_dir = random_checkpoint(base, size, work / f"random-{size}") if size else base
        throughput_table(args, work, model_dir, records, size or "SmolLM2-135M")


def throughput_table(args, work: Path, base: Path, records, label: str) -> None:
    from transformers import AutoTokenizer

    cfg = Finetune(batch_size=args.batch_size, max_steps=args.steps, epochs=100, n_threads=args.threads,
                   device=args.device)
    examples = encode(records, AutoTokenizer.from_pretrained(base), cfg.max_length)
    # On a GPU both loops run in bf16 (the Trainer's bf16 flag, isara's autocast): equal precision; fp32 is CPU's
    # reference row.
    isara_runs = {"isara auto": cfg} if args.device == "cuda" else {
        "isara fp32": cfg.model_copy(update={"precision": "fp32"}), "isara auto": cfg}
    trainers = {"trainer bf16": True} if args.device == "cuda" else {"trainer": False, "trainer bf16": True}
    results: dict[str, list[float]] = {name: [] for name in (*trainers, *isara_runs)}
    padding: dict[str, list[float]] = {name: [] for name in results}
    peak: dict[str, float] = {}
    chosen = ""
    for r in range(args.repeats):
        for name, bf16 in trainers.items():
            seconds, real, padded = run_trainer(base, examples, cfg, args.steps, work / f"{name}-{r}".replace(" ", "-"),
                                                bf16=bf16, device=args.device)
            results[name].append(real / seconds)
            padding[name].append(1 - real / padded)
            peak[name] = cuda_peak_gib()
        for name, run_cfg in isara_runs.items():
            m = train(base, records, work / f"{name}{r}".replace(" ", "-"), run_cfg, log_dir=None, progress=False)
            results[name].append(m["tokens_per_second"])
            padding[name].append(m["padding_share"])
            peak[name] = cuda_peak_gib()
            chosen = m["precision"] if name == "isara auto" else chosen

    print(f"\nfine-tuning {label} on {args.device}, {len(examples)} examples, batch {args.batch_size}, {args.steps} steps, "
          f"{args.threads} threads, {args.repeats} repeats (median); isara auto chose {chosen}")
    reference = statistics.median(results[next(iter(trainers))])
    print(f"{'loop':<12} {'real tok/s':>10} {'padding':>8} {'vs trainer':>10}"
          + (f" {'peak GPU GiB':>12}" if args.device == "cuda" else ""))
    for name in results:
        tps = statistics.median(results[name])
        print(f"{name:<12} {tps:>10.1f} {statistics.median(padding[name]):>8.1%} {tps / reference:>9.2f}x"
              + (f" {peak[name]:>12.1f}" if args.device == "cuda" else ""))


def cuda_peak_gib() -> float:
    """Peak GPU memory since the last call (0 on CPU)."""
    if not torch.cuda.is_available():
        return 0.0
    value = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return value


if __name__ == "__main__":
    main()
