"""Pipeline: wall time and peak resident memory of every stage of the default `dvc repro`, then a no-op repro.

    python benchmarks/pipeline.py                        # a fresh clone of this repo's HEAD in a temp dir
    python benchmarks/pipeline.py --keep /tmp/isara-run  # clone there and keep it (artifacts, dvc.lock)

What it does: clones HEAD (committed files only, as a user gets them) next to this checkout, so relative
params such as judge.xstest_dir resolve as they do here; lists the stages in the order `dvc repro` runs them
(`dvc repro --dry`); runs each alone (`dvc repro --single-item <stage>`) and times it; then times a full
`dvc repro` that must find nothing to do. Peak memory per stage is the largest resident set of the
stage's processes (dvc and the python stage it starts), from the kernel's rusage of the finished child.
Targets (issue 6): no-op repro under 3 s, every stage under 4 GiB for the default model.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOOP_TARGET_S = 3.0
RSS_TARGET_GIB = 4.0


def run(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in GiB of the process tree's largest member, combined output)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{out[-4000:]}")
    return seconds, usage.ru_maxrss / 2**20, out  # ru_maxrss is in KiB on Linux


def stage_order(cwd: Path) -> list[str]:
    _, _, out = run(["dvc", "repro", "--dry"], cwd)
    return re.findall(r"Running stage '([^']+)'", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, default=None, help="Clone into this (new) folder and keep it.")
    args = ap.parse_args()

    target = args.keep or Path(tempfile.mkdtemp(prefix="isara-bench-pipeline-", dir=REPO.parent)) / "repo"
    if target.exists():
        sys.exit(f"{target} exists: --keep needs a new folder")
    subprocess.run(["git", "clone", "-q", str(REPO), str(target)], check=True)
    try:
        rows = []
        for stage in stage_order(target):
            seconds, rss, _ = run(["dvc", "repro", "--single-item", stage], target)
            rows.append((stage, seconds, rss))
            print(f"  {stage:<24} {seconds:8.1f} s {rss:6.2f} GiB", flush=True)
        noop, _, out = run(["dvc", "repro"], target)
        if "Running stage" in out:
            sys.exit(f"the second dvc repro reran stages:\n{out[-4000:]}")
    finally:
        if args.keep is None:
            shutil.rmtree(target.parent, ignore_errors=True)

    total = sum(s for _, s, _ in rows)
    peak = max(rss for *_, rss in rows)
    cores = os.cpu_count()
    print(f"\ndefault dvc repro, {len(rows)} stages, {cores} CPU cores")
    print(f"{'stage':<24} {'wall s':>8} {'share':>6} {'peak RSS GiB':>12}")
    for stage, seconds, rss in sorted(rows, key=lambda r: -r[1]):
        print(f"{stage:<24} {seconds:8.1f} {seconds / total:6.1%} {rss:12.2f}")
    print(f"{'total':<24} {total:8.1f} {'':>6} {peak:12.2f}   ({total / 60:.1f} min)")
    print(f"no-op dvc repro: {noop:.2f} s (target < {NOOP_TARGET_S} s: {'met' if noop < NOOP_TARGET_S else 'NOT met'})")
    print(f"peak RSS of any stage: {peak:.2f} GiB (target < {RSS_TARGET_GIB} GiB: "
          f"{'met' if peak < RSS_TARGET_GIB else 'NOT met'})")


if __name__ == "__main__":
    main()
