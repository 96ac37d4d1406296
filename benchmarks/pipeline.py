"""Pipeline: wall time and peak resident memory of every stage of the default `dvc repro`, then a no-op repro.

    python benchmarks/pipeline.py                        # a fresh clone of this repo's HEAD in a temp dir
    python benchmarks/pipeline.py --keep /tmp/isara-run  # clone there and keep it (artifacts, dvc.lock)

What it does: clones HEAD (committed files only, as a user gets them) next to this checkout, so relative
params such as judge.xstest_dir resolve as they do here; runs `dvc repro` and times each stage from its
"Running stage" line to the next; then times a second `dvc repro` that must find nothing to do. Peak memory
per stage: the largest sum of resident memory of the processes dvc started for it (sampled every 0.25 s
from /proc, Linux only).
Targets: no-op repro under 3 s (issue 6), every stage at most 3 GiB for the default model (issue 13; it was 4 GiB).
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOOP_TARGET_S = 3.0
RSS_TARGET_GIB = 3.0


def descendants_rss_gib(root: int) -> float:
    """Resident memory of every process below `root` (its stage and what that starts), GiB, from /proc."""
    parent, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    below, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - below
        below |= frontier
    return sum(rss.get(pid, 0) for pid in below) / 2**30


def repro(cwd: Path) -> tuple[list[tuple[str, float, float]], str]:
    """`dvc repro` with its output streamed: (stage, wall seconds, peak RSS GiB) per stage that ran, and the output.
    A stage runs from its "Running stage" line to the next one (or the end); memory is sampled every 0.25 s."""
    proc = subprocess.Popen(["dvc", "repro"], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    out, rows, current = [], [], None  # current: [stage, start, peak]

    def close(now: float) -> None:
        if current:
            rows.append((current[0], now - current[1], current[2]))
            print(f"  {current[0]:<24} {now - current[1]:8.1f} s {current[2]:6.2f} GiB", flush=True)

    while proc.poll() is None or not lines.empty():
        try:
            line = lines.get(timeout=0.25)
            out.append(line)
            # anywhere in the line, every one: when a stage's last output lacks a newline, dvc's next line continues
            # it (the 2026-12-01 13:02 run missed truthfulqa@2 and truthfulqa_base, timing them into truthfulqa@1);
            # stages sharing a line share its time
            for m in re.finditer(r"Running stage '([^']+)'", line):
                now = time.perf_counter()
                close(now)
                current = [m.group(1), now, 0.0]
        except queue.Empty:
            pass
        if current:
            current[2] = max(current[2], descendants_rss_gib(proc.pid))
    close(time.perf_counter())
    text = "".join(out)
    if proc.returncode != 0:
        sys.exit(f"dvc repro failed (exit {proc.returncode}):\n{text[-4000:]}")
    return rows, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, default=None, help="Clone into this (new) folder and keep it.")
    args = ap.parse_args()

    target = args.keep or Path(tempfile.mkdtemp(prefix="isara-bench-pipeline-", dir=REPO.parent)) / "repo"
    if target.exists():
        sys.exit(f"{target} exists: --keep needs a new folder")
    subprocess.run(["git", "clone", "-q", str(REPO), str(target)], check=True)
    try:
        start = time.perf_counter()
        rows, _ = repro(target)
        wall = time.perf_counter() - start
        start = time.perf_counter()
        again, _ = repro(target)
        noop = time.perf_counter() - start
        if again:
            sys.exit(f"the second dvc repro reran stages: {[r[0] for r in again]}")
    finally:
        if args.keep is None:
            shutil.rmtree(target.parent, ignore_errors=True)

    total = wall  # the stages plus dvc's own work between them
    peak = max(rss for *_, rss in rows)
    cores = os.cpu_count()
    print(f"\ndefault dvc repro, {len(rows)} stages, {cores} CPU cores")
    print(f"{'stage':<24} {'wall s':>8} {'share':>6} {'peak RSS GiB':>12}")
    for stage, seconds, rss in sorted(rows, key=lambda r: -r[1]):
        print(f"{stage:<24} {seconds:8.1f} {seconds / total:6.1%} {rss:12.2f}")
    print(f"{'total':<24} {total:8.1f} {'':>6} {peak:12.2f}   ({total / 60:.1f} min)")
    print(f"no-op dvc repro: {noop:.2f} s (target < {NOOP_TARGET_S} s: {'met' if noop < NOOP_TARGET_S else 'NOT met'})")
    print(f"peak RSS of any stage: {peak:.2f} GiB (target <= {RSS_TARGET_GIB} GiB: "
          f"{'met' if peak <= RSS_TARGET_GIB else 'NOT met'})")


if __name__ == "__main__":
    main()
