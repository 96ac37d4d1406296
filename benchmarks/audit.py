"""Audit at scale: `isara audit` on a synthetic data set shaped exactly like the pipeline's.

    python benchmarks/audit.py                                   # 64 seeds + 100,000 records over 10 iterations
    python benchmarks/audit.py --records 5000 --iterations 3 --keep /tmp/audit-5k

Builds, in a temp folder, what the audit reads after a `dvc repro` of that many iterations (isara/paths.py's
layout): artifacts/0/dataset.jsonl (the seeds), artifacts/<t>/generated.jsonl and dataset.jsonl (D(t) = D(t-1) +
generated, written line for line as generate writes them), artifacts/<t>/model.gguf for every model (stand-in
bytes: the audit only hashes them), and a dvc.yaml + dvc.lock whose seeds, prepare, generate@t and export@t entries
record those files' md5s and generate@t's dependency on the GGUF of t-1, as `dvc repro` records them. Records are
isara.records.Record objects (content-hash ids, both prompts' retrieved neighbours from D(t-1) with the anchor first
at distance 0, float32 distances, the GGUF's sha256, both samplings, raw completions, a stance), with field
lengths drawn around those of real records (96 of generate@1/@2 from two runs at the default params, 2026-11-30:
question 59 characters, answer 204, 1,396 bytes of JSON per record on average). Rejected attempts are left out: the
audit never reads them.

Then it runs `python -m isara.cli audit --root <folder>` (the code `isara audit` and the audit stage run), prints its
wall time, generated records/s and the JSONL bytes per record, and exits 1 if the audit did not pass.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from isara.paths import IterPaths  # noqa: E402
from isara.records import Neighbour, Record, Sampling, file_sha256  # noqa: E402

WORDS = ("how can i safely help someone who wants to learn about chemistry cooking locks networks passwords history "
         "the a of in for with without when what why is are do you your my their people should could would never "
         "always first then because please here is an answer that explains steps risks legal options support").split()
QUESTION_CHARS = (25, 95)  # uniform: mean 60, as the default run's 59
ANSWER_CHARS = (60, 350)  # mean 205, as the default run's 204
K_QUESTION = K_ANSWER = 4  # params generate.k_question / k_answer defaults

# What the audit needs of dvc.yaml: the stages whose outputs it checks and whose names it expects (prepare and
# export@<prev> produce the GGUF that generate@t ran on). Commands never run: dvc.lock says what they produced.
DVC_YAML = """\
stages:
  seeds:
    cmd: "true"
    outs:
      - artifacts/0/dataset.jsonl
  prepare:
    cmd: "true"
    outs:
      - artifacts/0/model.gguf
  generate:
    foreach: ${iterations}
    do:
      cmd: "true"
      deps:
        - artifacts/${item.prev}/dataset.jsonl
        - artifacts/${item.prev}/model.gguf
      outs:
        - artifacts/${key}/generated.jsonl
        - artifacts/${key}/dataset.jsonl
  export:
    foreach: ${iterations}
    do:
      cmd: "true"
      outs:
        - artifacts/${key}/model.gguf
"""


def text(rng: random.Random, lo: int, hi: int, end: str) -> str:
    target = rng.randint(lo, hi)
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < target:
        words.append(rng.choice(WORDS))
    return " ".join(words).capitalize() + end


def float32(x: float) -> float:
    """Annoy returns float32 distances; the records hold them as doubles (1.2514771223068237)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def lock_entry(root: Path, rel: Path) -> dict:
    data = (root / rel).read_bytes()
    return {"path": str(rel), "hash": "md5", "md5": hashlib.md5(data).hexdigest(), "size": len(data)}


def build(root: Path, n_records: int = 100_000, iterations: int = 10, n_seeds: int = 64, seed: int = 0) -> dict:
    """Write the synthetic project at root (a new folder); returns {"lines": ..., "bytes": ...} per file kind."""
    from dvc.repo import Repo

    rng = random.Random(seed)
    root.mkdir(parents=True)
    Repo.init(str(root), no_scm=True).close()
    schedule = {str(t): {"prev": str(t - 1)} for t in range(1, iterations + 1)}
    (root / "params.yaml").write_text(yaml.safe_dump({"seeds": {"path": "data/seeds/synthetic.jsonl"},
                                                      "iterations": schedule}, sort_keys=False))
    (root / "dvc.yaml").write_text(DVC_YAML)
    for t in range(iterations + 1):  # M0 (prepare) and every M(t) (export@t)
        gguf = root / IterPaths(str(t)).gguf
        gguf.parent.mkdir(parents=True, exist_ok=True)
        gguf.write_bytes(b"GGUF" + rng.randbytes(4092))

    seeds = [Record(iteration=0, question=text(rng, *QUESTION_CHARS, "?"), answer=text(rng, *ANSWER_CHARS, "."))
             for _ in range(n_seeds)]
    ids = [r.id for r in seeds]
    d0 = "".join(r.model_dump_json() + "\n" for r in seeds)
    (root / IterPaths("0").dataset).write_text(d0, encoding="utf-8")
    dataset_text = d0  # D(t-1): generate writes D(t) as D(t-1)'s records then the accepted ones (write_jsonl)
    sizes = {"seeds": len(d0.encode()), "generated": 0, "datasets": 0, "generated_lines": 0, "dataset_lines": 0}
    lock = {"seeds": {"cmd": "true", "outs": [lock_entry(root, IterPaths("0").dataset)]},
            "prepare": {"cmd": "true", "outs": [lock_entry(root, IterPaths("0").gguf)]}}
    per_round = [n_records // iterations + (1 if t < n_records % iterations else 0) for t in range(iterations)]
    sampling_seed = 0
    for t, n in enumerate(per_round, start=1):
        here, prev = IterPaths(str(t)), IterPaths(str(t - 1))
        sha = file_sha256(root / prev.gguf)
        new: list[Record] = []
        for _ in range(n):
            anchor, *others = rng.sample(ids, K_QUESTION)
            q_ctx = [Neighbour(id=anchor, distance=0.0)] + [
                Neighbour(id=i, distance=float32(rng.uniform(0.9, 1.4))) for i in others]
            a_ctx = [Neighbour(id=i, distance=float32(d)) for i, d in
                     zip(rng.sample(ids, K_ANSWER), sorted(rng.uniform(0.9, 1.4) for _ in range(K_ANSWER)))]
            question, answer = text(rng, *QUESTION_CHARS, "?"), text(rng, *ANSWER_CHARS, ".")
            sampling_seed += 2
            new.append(Record(
                iteration=t, question=question, answer=answer, anchor_id=anchor, question_context=q_ctx,
                answer_context=a_ctx, model_sha256=sha,
                question_sampling=Sampling(temperature=0.8, top_p=0.95, max_tokens=64, seed=sampling_seed),
                answer_sampling=Sampling(temperature=0.3, top_p=0.95, max_tokens=128, seed=sampling_seed + 1),
                raw_question=" " + question, raw_answer=" " + answer,
                stance=rng.choice(("declines", "complies"))))
        generated_text = "".join(r.model_dump_json() + "\n" for r in new)
        dataset_text += generated_text
        (root / here.generated).write_text(generated_text, encoding="utf-8")
        (root / here.dataset).write_text(dataset_text, encoding="utf-8")
        ids += [r.id for r in new]
        sizes["generated"] += len(generated_text.encode())
        sizes["generated_lines"] += len(new)
        sizes["datasets"] += len(dataset_text.encode())
        sizes["dataset_lines"] += len(ids)
        lock[f"generate@{t}"] = {"cmd": "true",
                                 "deps": [lock_entry(root, prev.dataset), lock_entry(root, prev.gguf)],
                                 "outs": [lock_entry(root, here.generated), lock_entry(root, here.dataset)]}
        lock[f"export@{t}"] = {"cmd": "true", "outs": [lock_entry(root, here.gguf)]}
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": lock}, sort_keys=False))
    return sizes


def run_audit_cli(root: Path, env: dict[str, str] | None = None,
                  timeout: float = 1800) -> tuple[float, float, subprocess.CompletedProcess]:
    """`isara audit --root root` in its own process, as a user or the audit stage runs it: (wall s, CPU s, result).
    The audit is one thread, so on an idle core its wall time is about its CPU seconds (user + system); on a busy
    machine the wall time also counts the time other processes held the cores."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "isara.cli", "audit", "--root", str(root)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000, help="generated records in all (default 100,000)")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=64)
    ap.add_argument("--keep", type=Path, help="build here (a new folder) and leave it; default: a temp folder")
    args = ap.parse_args()
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")

    with tempfile.TemporaryDirectory(prefix="isara-audit-") as tmp:
        root = args.keep or Path(tmp) / "project"
        start = time.perf_counter()
        sizes = build(root, args.records, args.iterations, args.seeds)
        print(f"built {args.seeds} seeds + {sizes['generated_lines']:,} generated records over {args.iterations} "
              f"iterations in {time.perf_counter() - start:.1f} s at {root}")
        load = os.getloadavg()[0]
        wall, cpu, proc = run_audit_cli(root)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux; the largest child
        print(f"load average before the audit: {load:.2f} on {os.cpu_count()} CPUs; audit peak RSS {peak:.2f} GiB")
        print(proc.stdout.strip() or proc.stderr.strip()[-2000:])
        per_record = sizes["generated"] / sizes["generated_lines"]
        print(f"isara audit: {wall:.1f} s wall, {cpu:.1f} s CPU; {sizes['generated_lines'] / wall:,.0f} generated "
              f"records/s of wall time, {sizes['generated_lines'] / cpu:,.0f} per CPU second "
              f"({sizes['dataset_lines'] + args.seeds + sizes['generated_lines']:,} JSONL lines read, "
              f"{(sizes['datasets'] + sizes['generated'] + sizes['seeds']) / wall / 1e6:.1f} MB/s)")
        print(f"JSONL: {per_record:,.0f} bytes per generated record; generated.jsonl files "
              f"{sizes['generated'] / 1e6:.1f} MB, D(1..{args.iterations}) dataset.jsonl files "
              f"{sizes['datasets'] / 1e6:.1f} MB "
              f"(D(t) repeats D(t-1)), final D({args.iterations}) "
              f"{(root / IterPaths(str(args.iterations)).dataset).stat().st_size / 1e6:.1f} MB")
        return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
