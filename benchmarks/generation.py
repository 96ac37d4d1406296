"""Generation throughput: the sequential llama-cpp-python engine vs isara.engines.batched.BatchedLlama.

    python benchmarks/generation.py --stage 24 --threads 2           # the generate stage itself, both engines
    python benchmarks/generation.py                                  # the engines on fixed request lists
    python benchmarks/generation.py --threads 1 2 --batch-sizes 4 8 16 --attempts 16 --repeats 3
    python benchmarks/generation.py --model path/to/model.gguf      # e.g. an exported M(t) (q8_0)

Prompts are built as the generate stage builds them: seeds = data/seeds/safety.jsonl, an Annoy index over
their MiniLM embeddings (isara.index), and for each attempt a question prompt around a random anchor
(its k nearest seeds, isara.prompts.question_prompt) and an answer prompt for a new question with its k
nearest seeds (isara.prompts.answer_prompt). The new questions are the held-out questions of
data/seeds/safety_alt.jsonl, standing in for model-written ones so every engine gets identical prompts.
Sampling settings, stop strings and per-completion seeds are the stage's defaults (isara.params.Generate,
isara.generate.attempt_seed). Requests run as the batched stage would send them: the question prompts of
all attempts, then their answer prompts.

Every engine completes the identical request list, interleaved in one process (the engine order rotates
between repeats, so machine load drifts hit all engines alike), with the same model, threads and
max_tokens. Each batched run starts with an empty prompt cache. Reported: medians over repeats of
completion tokens/s and completions/s, and their ratio to the sequential loop; the CPU seconds of the
process (on a shared machine wall time swings with other load; with 1 thread, CPU time is the work done);
how many completions differ from the sequential loop's (expected: 0, see isara/engines/batched.py); and the
resident memory after each run (the batched KV cache is allocated up front).

Threads: llama.cpp's OpenMP threads spin while waiting; on a 2-core machine shared with other work,
--threads 2 ran 2.4-5.7x slower than 1 thread, unless OMP_WAIT_POLICY=passive is set before llama_cpp is
imported (then 2 threads were as fast as 1 under that load):
    OMP_WAIT_POLICY=passive python benchmarks/generation.py --threads 1 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from isara.base_models import base_model_path
from isara.engines.batched import BatchedLlama
from isara.engines.llama import SequentialEngine, open_llama
from isara.generate import attempt_seed
from isara.io import write_jsonl
from isara.params import Engine, Generate
from isara.prompts import ANSWER_STOP, QUESTION_STOP, answer_prompt, question_prompt
from isara.records import Sampling
from isara.seeds import read_seed_file

SEEDS = REPO / "data" / "seeds" / "safety.jsonl"
NEW_QUESTIONS = REPO / "data" / "seeds" / "safety_alt.jsonl"
ITERATION = 1


def build_requests(n_attempts: int, cfg: Generate, k: int) -> list[tuple[str, Sampling, list[str]]]:
    from isara.embed import embed
    from isara.retrieval import Retriever, build_index

    seeds = read_seed_file(SEEDS)
    new_questions = [r.question for r in read_seed_file(NEW_QUESTIONS)]
    with tempfile.TemporaryDirectory() as tmp:
        write_jsonl(Path(tmp) / "dataset.jsonl", seeds)
        build_index(seeds, Path(tmp) / "index", n_trees=16, seed=0)
        retriever = Retriever.load(Path(tmp) / "index", Path(tmp) / "dataset.jsonl")
    rng = np.random.default_rng([cfg.seed, ITERATION])  # anchors drawn as generate_samples draws them
    questions, answers = [], []
    vectors = embed(new_questions[:n_attempts])
    for attempt in range(n_attempts):
        anchor = int(rng.integers(len(retriever.records)))
        questions.append((
            question_prompt(retriever.nearest_to_item(anchor, k)),
            Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_question_tokens,
                     seed=attempt_seed(cfg.seed, ITERATION, attempt, 0)),
            QUESTION_STOP,
        ))
        question = new_questions[attempt % len(new_questions)]
        answers.append((
            answer_prompt(retriever.nearest_to_vector(vectors[attempt % len(vectors)], k), question),
            Sampling(temperature=cfg.answer_temperature, top_p=cfg.top_p, max_tokens=cfg.max_answer_tokens,
                     seed=attempt_seed(cfg.seed, ITERATION, attempt, 1)),
            ANSWER_STOP,
        ))
    return questions + answers


def stage_comparison(n_samples: int, threads: int, model: Path) -> None:
    """generate_samples (the generate stage's loop: filters, embedding, duplicate checks, records) over the seeds
    with engine.kind = sequential (one create_completion after another) and = batched, same params
    (benchmarks/engines.py adds the server engine)."""
    from isara.engines import open_engine
    from isara.generate import generate_samples
    from isara.retrieval import Retriever, build_index

    seeds = read_seed_file(SEEDS)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_jsonl(Path(tmp) / "dataset.jsonl", seeds)
        build_index(seeds, Path(tmp) / "index", n_trees=16, seed=0)
        retriever = Retriever.load(Path(tmp) / "index", Path(tmp) / "dataset.jsonl")
        for engine_name in ("sequential", "batched"):
            cfg = Generate(n_samples=n_samples, max_attempts=8 * n_samples)
            params = Engine(kind=engine_name, n_threads=threads, n_gpu_layers=0)
            with open_engine(model, params, cfg.seed) as engine:
                start, cpu_start = time.perf_counter(), time.process_time()
                result = generate_samples(engine, "benchmark", retriever, ITERATION, cfg, progress=False)
                rows[engine_name] = (time.perf_counter() - start, time.process_time() - cpu_start, result)
    print(f"\ngenerate stage loop, {n_samples} samples from {len(seeds)} seeds, {threads} threads, model {model.name}")
    print("| engine | wall s | CPU s | attempts | accepted/s | completion tok/s | vs sequential (accepted/s) |")
    print("|---|---|---|---|---|---|---|")
    base = len(rows["sequential"][2].accepted) / rows["sequential"][0]
    for name, (wall, cpu, result) in rows.items():
        aps = len(result.accepted) / wall
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {result.attempted} | {aps:.3f} | "
              f"{result.completion_tokens / wall:.1f} | {aps / base:.2f}x |")
    same = ([r.model_dump() for r in rows["sequential"][2].accepted] == [r.model_dump() for r in rows["batched"][2].accepted]
            and rows["sequential"][2].rejected == rows["batched"][2].rejected)
    print(f"accepted and rejected records identical across engines: {same}")


def rss_mib() -> float:
    """Resident memory of this process now (Linux), MiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: the smollm2 base model)")
    ap.add_argument("--attempts", type=int, default=16, help="attempts: each is one question + one answer request")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--k", type=int, default=4, help="in-context examples per prompt (k_question = k_answer)")
    ap.add_argument("--no-reuse", action="store_true", help="batched engines without prompt-prefix reuse")
    ap.add_argument("--stage", type=int, default=0, metavar="SAMPLES",
                    help="instead: run the generate stage's loop to SAMPLES accepted samples with both engines")
    ap.add_argument("--cache-slots", type=int, nargs="*", default=[48],
                    help="also run the largest batch size with this many prompt-cache slots (BatchedLlama cache_slots)")
    args = ap.parse_args()

    cfg = Generate()
    model = args.model or base_model_path("smollm2")
    if args.stage:
        for threads in args.threads:
            stage_comparison(args.stage, threads, model)
        return
    requests = build_requests(args.attempts, cfg, args.k)
    print(f"model {model.name}; {len(requests)} requests ({args.attempts} question + {args.attempts} answer "
          f"prompts, k={args.k}); sampling: question T={cfg.temperature}, answer T={cfg.answer_temperature}, "
          f"top_p={cfg.top_p}, max_tokens {cfg.max_question_tokens}/{cfg.max_answer_tokens}")
    print(f"machine: {os.cpu_count()} CPUs, load average at start {load_average()}")

    rows = []
    for threads in args.threads:
        llm = open_llama(model, n_ctx=Engine().n_ctx, n_threads=threads, n_threads_batch=threads, seed=cfg.seed)
        prompt_lens = [len(llm.tokenize(p.encode("utf-8"), add_bos=False)) for p, _, _ in requests]
        n_ctx_seq = max(prompt_lens) + max(cfg.max_question_tokens, cfg.max_answer_tokens) + 8
        print(f"\nthreads {threads}: prompt tokens mean {statistics.mean(prompt_lens):.0f}, max {max(prompt_lens)}; "
              f"n_ctx_seq {n_ctx_seq}")
        engines = ["sequential"] + [f"batched-{b}" for b in args.batch_sizes]
        if not args.no_reuse:
            engines += [f"batched-{max(args.batch_sizes)}+cache{c}" for c in args.cache_slots if c > 0]
        times: dict[str, list[float]] = {e: [] for e in engines}
        cpu: dict[str, list[float]] = {e: [] for e in engines}
        tokens: dict[str, int] = {}
        reused: dict[str, int] = {}
        rss: dict[str, float] = {}
        reference = None
        mismatches: dict[str, int] = {}
        for rep in range(args.repeats):
            order = engines[rep % len(engines):] + engines[: rep % len(engines)]
            for name in order:
                if name == "sequential":
                    engine = SequentialEngine(llm)  # each completion from an empty KV cache
                else:
                    width, _, cache = name.split("-")[1].partition("+cache")
                    engine = BatchedLlama(llm, n_seq_max=int(width), n_ctx_seq=n_ctx_seq, n_threads=threads,
                                          reuse_prefix=not args.no_reuse, cache_slots=int(cache or 0))
                start, cpu_start = time.perf_counter(), time.process_time()
                out = engine.complete_many(requests)
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - cpu_start)
                tokens[name] = sum(n for _, _, n in out)
                rss[name] = rss_mib()
                if name == "sequential":
                    reference = reference or out
                else:
                    reused[name] = engine.stats["prompt_tokens_reused"]
                    engine.close()
                if reference is not None:
                    mismatches[name] = max(mismatches.get(name, 0), sum(a != b for a, b in zip(out, reference)))
                print(f"  repeat {rep + 1} {name:20s} {times[name][-1]:7.1f} s wall {cpu[name][-1]:7.1f} s CPU  "
                      f"{tokens[name]} completion tokens  load {load_average()}", flush=True)
        base, base_cpu = statistics.median(times["sequential"]), statistics.median(cpu["sequential"])
        for name in engines:
            t, c = statistics.median(times[name]), statistics.median(cpu[name])
            rows.append((threads, name, t, tokens[name] / t, len(requests) / t, base / t, c, base_cpu / c,
                         reused.get(name, 0), mismatches.get(name, 0), rss[name]))
        del llm

    print(f"\nmedians over {args.repeats} repeats; load average at end {load_average()}")
    print("| threads | engine | wall s | completion tok/s | completions/s | vs sequential (wall) | CPU s "
          "| vs sequential (CPU) | prompt tokens reused | outputs differing from sequential | RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for threads, name, t, tps, cps, ratio, c, cratio, reuse, mism, mem in rows:
        print(f"| {threads} | {name} | {t:.1f} | {tps:.1f} | {cps:.3f} | {ratio:.2f}x | {c:.1f} | {cratio:.2f}x "
              f"| {reuse} | {mism} | {mem:.0f} |")


if __name__ == "__main__":
    main()
