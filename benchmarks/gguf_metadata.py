"""Reading a GGUF's key/values: isara.gguf.read_metadata against gguf-py's GGUFReader, side by side.

    python benchmarks/gguf_metadata.py                  # both bundled base models, 3 repeats each
    python benchmarks/gguf_metadata.py --repeats 1 --gguf artifacts/2/model.gguf

Every finetune, export (twice), evaluate and package stage reads its model's GGUF metadata (prompt format, chat
template, identity): 23 reads in the default `dvc repro`. For Gemma 3's 262,144-token vocabulary GGUFReader spends
seconds building a numpy view per vocabulary entry. Prints the median wall time of each reader per file, the ratio,
and whether both returned the same key/values and tensor names.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from isara.base_models import base_model_path  # noqa: E402
from isara.gguf import _metadata_via_reader, read_metadata  # noqa: E402


def _median_time(fn, path: Path, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(path)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, nargs="*", help="GGUF files (default: the bundled smollm2 and gemma3)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    paths = args.gguf or [base_model_path("smollm2"), base_model_path("gemma3")]

    print(f"{'file':<40} {'keys':>5} {'vocab':>7} {'GGUFReader s':>13} {'read_metadata s':>16} {'ratio':>7} same")
    for path in paths:
        slow, reference = _median_time(_metadata_via_reader, path, args.repeats)
        fast, meta = _median_time(read_metadata, path, args.repeats)
        vocab = len(meta.kv.get("tokenizer.ggml.tokens", []))
        print(f"{Path(path).name[:40]:<40} {len(meta.fields):>5} {vocab:>7} {slow:>13.2f} {fast:>16.3f} "
              f"{slow / fast:>6.0f}x {'yes' if meta == reference else 'NO'}")
        if meta != reference:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
