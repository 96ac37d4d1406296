"""Atomic outputs: every file and folder a stage writes goes to a temporary sibling and is renamed into place,
so a crash leaves the old output (or none), never a truncated JSONL, GGUF, index or checkpoint for DVC to cache.

`atomic_file` is the one helper for files (the JSON/JSONL/text writers and the GGUF writers use it);
`atomic_directory` is its counterpart for folders. A contract: imports nothing from isara.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import BaseModel


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` (same folder, so the rename is atomic) to write the whole file to.
    On success it is fsynced and renamed onto `path`; on any error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb+") as fh:  # the writer may have closed its own handle: flush what it wrote to disk
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_jsonl(path: str | os.PathLike, rows: Iterable[BaseModel | dict]) -> None:
    """Write JSONL atomically: pydantic models as their JSON, dicts with sorted keys."""
    lines = []
    for row in rows:
        if isinstance(row, BaseModel):
            lines.append(row.model_dump_json())
        else:
            lines.append(json.dumps(row, ensure_ascii=False, sort_keys=True))
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `out_dir`; on success it replaces `out_dir` whole, on error it is removed.
    A crash never leaves a half-written index or checkpoint where DVC or the next stage would take it for done."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the output is an ordinary folder
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
