"""Fine-tuning throughput: isara's finetune loop vs a plain transformers.Trainer on the same data and settings.

    python benchmarks/finetune.py                       # 64 seeds, batch 8, 8 steps each, 2 threads
    python benchmarks/finetune.py --steps 16 --threads 2 --batch-size 8

Both train the same prepared base checkpoint (SmolLM2-135M, fp32) on the same examples (data/seeds/safety.jsonl
encoded by isara.finetune.encode: prompt tokens masked, answer + eos trained), same lr, batch size, optimizer
(AdamW), number of optimizer steps and threads. The Trainer gets the usual recipe: random batches padded to
the longest in the batch (DataCollatorForSeq2Seq), fp32 (the Trainer's CPU default). isara runs twice: in fp32
(length-grouped batches and the LM head on answer positions only) and with its default precision (auto: bf16
autocast where the CPU has native bf16 dot products, AVX512-BF16 or AMX; else fp32 again). Reported: real
(non-padding) tokens per second of the training loop, padding share, and the ratios to the Trainer. A second
Trainer row turns on its own bf16 flag, to show how much of the gain is precision and how much the loop. Runs alternate (Trainer, isara, Trainer, isara) so load drift on a
shared machine hits both alike; medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from isara.base_models import base_model_path  # noqa: E402
from isara.finetune import IGNORE, encode, train  # noqa: E402
from isara.params import Finetune  # noqa: E402
from isara.prepare import prepare_base  # noqa: E402
from isara.seeds import read_seed_file  # noqa: E402


def run_trainer(model_dir: Path, examples, cfg: Finetune, steps: int, out: Path, bf16: bool = False
                ) -> tuple[float, int, int]:
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
        save_strategy="no", report_to=[], use_cpu=True, seed=cfg.seed, dataloader_num_workers=0,
        disable_tqdm=True, bf16=bf16,
    )
    trainer = CountingTrainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start, counted["real"], counted["padded"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="isara-bench-ft-"))
    base = work / "base"
    prepare_base(base_model_path("smollm2"), base)
    records = read_seed_file(REPO / "data/seeds/safety.jsonl")
    cfg = Finetune(batch_size=args.batch_size, max_steps=args.steps, epochs=100, n_threads=args.threads)
    from transformers import AutoTokenizer

    examples = encode(records, AutoTokenizer.from_pretrained(base), cfg.max_length)

    isara_runs = {"isara fp32": cfg.model_copy(update={"precision": "fp32"}), "isara auto": cfg}
    results: dict[str, list[float]] = {name: [] for name in ("trainer", "trainer bf16", *isara_runs)}
    padding: dict[str, list[float]] = {name: [] for name in results}
    chosen = ""
    for r in range(args.repeats):
        seconds, real, padded = run_trainer(base, examples, cfg, args.steps, work / f"trainer{r}")
        results["trainer"].append(real / seconds)
        padding["trainer"].append(1 - real / padded)
        seconds, real, padded = run_trainer(base, examples, cfg, args.steps, work / f"trainer-bf16-{r}", bf16=True)
        results["trainer bf16"].append(real / seconds)
        padding["trainer bf16"].append(1 - real / padded)
        for name, run_cfg in isara_runs.items():
            m = train(base, records, work / f"{name}{r}".replace(" ", "-"), run_cfg, log_dir=None, progress=False)
            results[name].append(m["tokens_per_second"])
            padding[name].append(m["padding_share"])
            chosen = m["precision"] if name == "isara auto" else chosen

    print(f"fine-tuning SmolLM2-135M, {len(examples)} examples, batch {args.batch_size}, {args.steps} steps, "
          f"{args.threads} threads, {args.repeats} repeats (median); isara auto chose {chosen}")
    trainer = statistics.median(results["trainer"])
    print(f"{'loop':<12} {'real tok/s':>10} {'padding':>8} {'vs trainer':>10}")
    for name in results:
        tps = statistics.median(results[name])
        print(f"{name:<12} {tps:>10.1f} {statistics.median(padding[name]):>8.1%} {tps / trainer:>9.2f}x")


if __name__ == "__main__":
    main()
