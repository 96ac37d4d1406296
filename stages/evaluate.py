"""DVC entry of the evaluate stage: `python stages/evaluate.py ITERATION` (same as `isara evaluate`).

It imports isara from this checkout, not from site-packages, so that a queued `dvc exp run` (which runs in
a copy under .dvc/tmp/exps) executes the code whose hashes it records.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import isara.evaluate  # noqa: E402,F401  (its code is what DVC hashes: tests/test_dvc_deps.py)
from isara.cli import evaluate_command  # noqa: E402

if __name__ == "__main__":
    evaluate_command.main(args=sys.argv[1:], prog_name="isara evaluate")
