"""The generate stage's loop on every LLM backend, side by side in one run: accepted samples/s and ratios.

    python benchmarks/engines.py                          # 8 samples from the 64 safety seeds, 2 threads
    python benchmarks/engines.py --samples 16 --slots 4 --threads 2
    python benchmarks/engines.py --llama-server .llama-server/bin/llama-server   # benchmarks/build_llama_server.sh

Each row runs isara.generate.generate_samples (retrieval, both completions, filters, embeddings, duplicate checks,
records: the stage's own loop) over the same seeds, params and sampling seeds, to --samples accepted samples, with:
- sequential: in-process llama.cpp, one completion after another (params engine.kind: sequential, the default);
- batched: in process, batch_size sequences per llama_decode (engine.kind: batched);
- server llama-cpp-python: its OpenAI-compatible server that the engine starts on 127.0.0.1 (one completion at a
  time, from an empty KV cache);
- server llama-server, 1 slot and --slots slots: llama.cpp's own server (--parallel N), when a binary is found
  (--llama-server, $PATH, or .llama-server/bin/llama-server).
The engines run one after another in this process (server rows: the server is a child process started before the
clock starts; its start-up time is reported apart). Reported: wall seconds of the loop, attempts, accepted samples/s
and its ratio to sequential, completion tokens/s, and whether the records equal the sequential run's (text, lineage
and sampling; the backend field aside). Threads: every engine gets --threads (a server: --threads for each of its
decode and batch threads, shared by its slots).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from generation import load_average  # noqa: E402  (benchmarks/generation.py: same load figure)
from isara.base_models import base_model_path
from isara.engines import open_engine
from isara.generate import generate_samples
from isara.io import write_jsonl
from isara.params import Engine, Generate
from isara.retrieval import Retriever, build_index
from isara.seeds import read_seed_file

SEEDS = REPO / "data" / "seeds" / "safety.jsonl"
ITERATION = 1


def find_llama_server(given: str | None) -> str | None:
    for candidate in (given, shutil.which("llama-server"), str(REPO / ".llama-server/bin/llama-server")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def backends(args, llama_server: str | None) -> list[tuple[str, Engine]]:
    common = {"n_threads": args.threads, "n_ctx": args.n_ctx, "n_gpu_layers": args.n_gpu_layers}
    rows = [("sequential (in process)", Engine(kind="sequential", **common)),
            (f"batched (in process, {args.batch_size} per decode)", Engine(kind="batched", batch_size=args.batch_size,
                                                                          **common)),
            ("server: llama-cpp-python (1 at a time)", Engine(kind="server", server="llama-cpp-python",
                                                              batch_size=args.batch_size, **common))]
    if llama_server:
        for slots in sorted({1, args.slots}):
            rows.append((f"server: llama-server, {slots} slot{'s' if slots > 1 else ''}",
                         Engine(kind="server", server="llama-server", server_binary=Path(llama_server), slots=slots,
                                batch_size=max(args.batch_size, slots), **common)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: the smollm2 base model)")
    ap.add_argument("--samples", type=int, default=8, help="accepted samples per engine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--n-gpu-layers", type=int, default=-1)
    ap.add_argument("--batch-size", type=int, default=8, help="batched: sequences per decode; attempts per round")
    ap.add_argument("--slots", type=int, default=4, help="llama-server's parallel slots in the multi-slot row")
    ap.add_argument("--llama-server", default=None, help="llama-server binary (default: PATH, .llama-server/bin)")
    ap.add_argument("--only", nargs="*", default=None, help="run only the rows whose name contains one of these")
    args = ap.parse_args()

    model = args.model or base_model_path("smollm2")
    llama_server = find_llama_server(args.llama_server)
    seeds = read_seed_file(SEEDS)
    cfg = Generate(n_samples=args.samples, max_attempts=10 * args.samples)
    print(f"model {model.name}; {len(seeds)} seeds ({SEEDS.name}); {args.samples} accepted samples per engine; "
          f"{args.threads} threads; {os.cpu_count()} CPUs; load average at start {load_average()}")
    if not llama_server:
        print("no llama-server binary: the llama-server rows are skipped (benchmarks/build_llama_server.sh)")
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        write_jsonl(Path(tmp) / "dataset.jsonl", seeds)
        build_index(seeds, Path(tmp) / "index", n_trees=16, seed=0)
        retriever = Retriever.load(Path(tmp) / "index", Path(tmp) / "dataset.jsonl")
        for name, params in backends(args, llama_server):
            if args.only and not any(word in name for word in args.only):
                continue
            t0 = time.perf_counter()
            with open_engine(model, params, cfg.seed) as engine:
                startup = time.perf_counter() - t0
                start, cpu = time.perf_counter(), time.process_time()
                result = generate_samples(engine, "benchmark", retriever, ITERATION, cfg, progress=False)
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            records = [r.model_dump(mode="json", exclude={"id", "backend"}) for r in result.accepted]
            same = "reference" if reference is None else ("yes" if records == reference[0]
                                                          and result.rejected == reference[1] else "no")
            if reference is None:
                reference = (records, result.rejected)
            rows.append((name, startup, wall, cpu, result, same))
            print(f"  {name}: {wall:.1f} s, {result.attempted} attempts, {len(result.accepted)} accepted, "
                  f"start-up {startup:.1f} s, load {load_average()}", flush=True)

    base = len(rows[0][4].accepted) / rows[0][2]
    print(f"\nload average at end {load_average()}")
    print("| engine | start-up s | wall s | attempts | accepted/s | vs sequential | completion tok/s | "
          "records = sequential's |")
    print("|---|---|---|---|---|---|---|---|")
    for name, startup, wall, _cpu, result, same in rows:
        aps = len(result.accepted) / wall
        print(f"| {name} | {startup:.1f} | {wall:.1f} | {result.attempted} | {aps:.3f} | {aps / base:.2f}x | "
              f"{result.completion_tokens / wall:.1f} | {same} |")


if __name__ == "__main__":
    main()
