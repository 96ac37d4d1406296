"""A Hugging Face checkpoint as M0 (params base.hf), end to end on tiny random-weight checkpoints of three
architectures (llama, qwen2, gemma3), built here from configs with real tokenizers (the bundled SmolLM2's and
Gemma 3's, and llama.cpp's Qwen2 vocabulary):

    prepare (llama.cpp's own convert_hf_to_gguf.py, isara.converter) -> finetune (real steps, isara.finetune.train)
    -> export (isara.gguf graft onto the converted template) -> llama.cpp loads and generates

Checked at both ends: llama.cpp tokenizes like the checkpoint's tokenizer, carries its chat template, and its
next-token log-probs on the f32 GGUF match transformers' on the checkpoint (M0 after prepare, M1 after export).

    python -m pytest tests/test_hf_base.py -q -s      # ~2 min on 2 cores; the first run fetches the converter
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig, Qwen2Config

from isara.base_models import BaseModelError, base_model_path
from isara.cards import gguf_kv
from isara.converter import QWEN2_VOCAB, fetch_converter
from isara.engines.llama import open_llama
from isara.finetune import train
from isara.gguf import TEMPLATE_FILE, export_gguf
from isara.params import Base, Finetune
from isara.paths import iter_paths
from isara.prepare import run_prepare
from isara.seeds import validate_seed_file
from conftest import llama_logprobs

pytestmark = pytest.mark.slow

SEEDS = Path(__file__).resolve().parents[1] / "data" / "seeds" / "safety.jsonl"

PROMPT = "Question: How do I keep basil alive on a windowsill?\nAnswer:"
# Max |log p_llama.cpp - log p_transformers| over the vocabulary at every prompt position, f32 weights and KV
# cache. The bundled SmolLM2's export measures 4.1e-5 (tests/test_prepare_export.py); gemma3 evaluates GELU
# through ggml's f16 lookup table (1.9e-2 there).
TOL = {"llama": 1e-3, "qwen2": 1e-3, "gemma3": 5e-2}
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


def config(arch: str, tokenizer):
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if arch == "llama":
        return LlamaConfig(**SHAPE, **ids, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**SHAPE, **ids, tie_word_embeddings=True)
    # 6 layers: llama.cpp fixes Gemma 3's pattern (5 sliding-window layers, then a global one), as in the real models
    return Gemma3TextConfig(**{**SHAPE, "num_hidden_layers": 6}, **ids, head_dim=16, query_pre_attn_scalar=16,
                            sliding_window=32)


@pytest.fixture(scope="module")
def tokenizers():
    """The bundled models' tokenizers as transformers reads them from the GGUFs (what prepare saves for them)."""
    loaded = {}

    def get(name: str):
        if name not in loaded:
            # qwen2: llama.cpp's own Qwen2 vocabulary (kept with the converter); transformers imposes Qwen2's
            # pre-tokenizer on any qwen2 checkpoint, and the converter only knows it with Qwen's vocabulary
            path = fetch_converter() / QWEN2_VOCAB if name == "qwen2" else base_model_path(name)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            if name == "smollm2":
                # as SmolLM2's tokenizer.json on the Hub: digits split one by one before the byte-level BPE.
                # transformers' GGUF reader leaves that step out (the ids come out the same: SmolLM2 has no
                # multi-digit tokens), but llama.cpp's converter identifies a pre-tokenizer by the hash of the
                # ids it gives a test string, and knows this one only in the Hub's form
                from tokenizers import pre_tokenizers

                tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
            loaded[name] = tokenizer
        return loaded[name]

    return get


def tiny_checkpoint(arch: str, tokenizer, folder):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(arch, tokenizer), dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def hf_logprobs(folder, tokenizer, text: str) -> tuple[list[int], np.ndarray]:
    ids = tokenizer(text).input_ids
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return ids, torch.log_softmax(logits, -1).numpy()


def parity(label: str, hf_dir, tokenizer, gguf_path, tol: float) -> np.ndarray:
    ids, ref = hf_logprobs(hf_dir, tokenizer, PROMPT)
    own, lp = llama_logprobs(gguf_path, PROMPT, ids)
    assert own == ids, f"{label}: llama.cpp tokenizes the prompt as {own}, the checkpoint's tokenizer as {ids}"
    diff = np.abs(lp - ref).max()
    print(f"\n[parity] {label}: max|dlogp| {diff:.3g} over {len(ids)} positions x {ref.shape[1]} tokens")
    assert diff < tol, f"{label}: max |log-prob diff| {diff:.3g} >= {tol}"
    assert (lp.argmax(-1) == ref.argmax(-1)).all()
    return ref


@pytest.mark.parametrize("arch,tokenizer_of", [("llama", "smollm2"), ("qwen2", "qwen2"), ("gemma3", "gemma3")])
def test_hf_checkpoint_end_to_end(arch, tokenizer_of, tokenizers, tmp_path, monkeypatch):
    clock = time.perf_counter()

    def lap(what: str) -> None:
        nonlocal clock
        print(f"\n[timing] {arch} {what}: {time.perf_counter() - clock:.1f} s")
        clock = time.perf_counter()

    tokenizer = tokenizers(tokenizer_of)
    source = tiny_checkpoint(arch, tokenizer, tmp_path / f"tiny-{arch}")
    lap("tokenizer and checkpoint")
    monkeypatch.chdir(tmp_path)
    base = Base(hf=str(source), gguf_type="f32")

    # seeds: counted with the checkpoint's tokenizer (the GGUF does not exist yet)
    seeds = validate_seed_file(SEEDS, base, 2048)
    lap("seeds")

    # prepare: llama.cpp's converter writes M0's GGUF; the checkpoint is copied as fine-tuning's start
    metrics = run_prepare(base)
    lap("prepare")
    m0 = iter_paths(0)
    kv = gguf_kv(m0.hf / TEMPLATE_FILE)
    assert kv["general.architecture"] == arch
    assert kv.get("tokenizer.chat_template") == tokenizer.chat_template  # None for gemma3 270M pretrained
    assert metrics["model"] == str(source)
    m0_ref = parity(f"{arch} M0 (converter)", source, tokenizer, m0.gguf, TOL[arch])
    lap("parity M0")

    # finetune: real steps on the seeds, from the copied checkpoint; the loss falls
    cfg = Finetune(lr=3e-3, max_steps=6, batch_size=4, max_length=96, warmup_ratio=0.0, n_threads=2,
                   gradient_checkpointing=False, release_memory=False)
    m1 = tmp_path / "m1"
    result = train(m0.hf, seeds[:8], m1, cfg, progress=False)
    assert result["final_loss"] < result["first_loss"], result
    lap("finetune")

    # export: M1's weights grafted onto the converted template; llama.cpp computes what transformers does
    export_gguf(m1, tmp_path / "m1.gguf", "f32")
    lap("export")
    m1_ref = parity(f"{arch} M1 (export)", m1, tokenizer, tmp_path / "m1.gguf", TOL[arch])
    assert np.abs(m1_ref - m0_ref).max() > 10 * TOL[arch], "the export carries the base's weights, not M1's"

    # ... and generates with it (EOS banned: a random-weight model may pick it first)
    llm = open_llama(tmp_path / "m1.gguf", n_ctx=256, n_threads=2, seed=0)
    try:
        out = llm.create_completion(PROMPT, max_tokens=8, temperature=0.0, logit_bias={llm.token_eos(): -100.0})
    finally:
        llm.close()
    assert out["usage"]["completion_tokens"] == 8
    lap("parity M1 and generation")


def test_hf_base_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="base.path .* or base.hf"):
        Base(hf="some/model", path=tmp_path / "m.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="no config.json"):
        validate_seed_file(SEEDS, Base(hf=str(tmp_path / "empty")), 2048)
    with pytest.raises(BaseModelError, match="not a checkpoint folder, nor a Hub id"):
        validate_seed_file(SEEDS, Base(hf=str(tmp_path / "missing")), 2048)

    # a checkpoint without safetensors weights fails prepare before any conversion, and M0 of before stays
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text('{"model_type": "llama"}')
    monkeypatch.chdir(tmp_path)
    m0 = iter_paths(0)
    m0.hf.mkdir(parents=True)
    (m0.hf / "config.json").write_text("{}")
    m0.gguf.write_bytes(b"GGUF before")
    with pytest.raises(FileNotFoundError, match=r"base.hf = .*no-weights.*no \*.safetensors"):
        run_prepare(Base(hf=str(tmp_path / "no-weights")))
    assert m0.gguf.read_bytes() == b"GGUF before" and sorted(p.name for p in m0.hf.iterdir()) == ["config.json"]
