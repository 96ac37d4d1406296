"""prepare (base GGUF -> HF checkpoint) and export (HF checkpoint -> GGUF) on the real base models, no mocks.

    python -m pytest tests/test_prepare_export.py -q -s                        # SmolLM2, ~3 min on 2 cores
    ISARA_TEST_GEMMA=1 python -m pytest tests/test_prepare_export.py -q -s     # + Gemma 3 270M, ~5 min more

The round trip is checked three ways: exported f32 tensors equal the base GGUF's dequantized tensors bit for bit;
llama.cpp's next-token log-probs on the exported GGUF match transformers' fp32 ones over the whole vocabulary at
every prompt position; and after a weight change the export carries the new weights (and not the base's).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")
from transformers import AutoModelForCausalLM, AutoTokenizer

from isara.base_models import BaseModelError, base_model_path
from isara.gguf import TEMPLATE_FILE, export_gguf
from isara.engines.llama import open_llama
from isara.prepare import prepare_base
from conftest import llama_logprobs

pytestmark = pytest.mark.slow

PROMPT = "Question: How do I bake bread?\nAnswer:"
# Greedy decoding right after "Answer:" picks <|endoftext|> in SmolLM2 (the shipped Q4_1 base does the same), so
# generation is checked on a prompt with one obvious continuation.
GEN_PROMPT = "The capital of France is"

# Max |log p_llama.cpp - log p_transformers| over all vocab entries at all prompt positions.
# SmolLM2, measured on 2 CPU cores: f32 4.1e-5 (with an f32 KV cache; llama.cpp's default f16 KV cache alone
# gives 1.2e-2), f16 4.8e-2 (weights and, in ggml's f16 matmul, activations rounded to f16). Tolerances leave
# ~20x / 2x margin for other CPUs' kernels. Top-1 token must agree at every position.
TOL_F32 = 1e-3
TOL_F16 = 0.1
# Gemma 3 f32, measured 1.9e-2: ggml evaluates GELU through an f16 lookup table, transformers exactly.
TOL_GEMMA_F32 = 5e-2


@pytest.fixture(scope="module", autouse=True)
def _lean_threads():
    torch.set_num_threads(2)


def _timed(label, fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    print(f"\n[timing] {label}: {time.perf_counter() - t:.1f} s")
    return out


def _hf_logprobs(hf_dir: Path) -> tuple[list[int], np.ndarray]:
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = tok(PROMPT).input_ids
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return ids, torch.log_softmax(logits, -1).numpy()


def _llama(path: Path, f32_kv: bool = True, logits_all: bool = True):
    # the KV cache is f16 by default; f32 for parity so that only the weights are compared
    kv = {"type_k": 0, "type_v": 0} if f32_kv else {}  # 0 = GGML_TYPE_F32
    return open_llama(path, logits_all=logits_all, n_ctx=256, n_threads=2, seed=0, **kv)


def _check_parity(label: str, gguf_path: Path, ids: list[int], ref: np.ndarray, tol: float) -> float:
    llama_ids, lp = llama_logprobs(gguf_path, PROMPT, ids)
    assert llama_ids == ids, f"llama.cpp tokenizes the prompt differently: {llama_ids} vs {ids}"
    diff = np.abs(lp - ref)
    top1 = float((lp.argmax(-1) == ref.argmax(-1)).mean())
    print(
        f"\n[parity] {label}: max|dlogp| all positions {diff.max():.3g}, last position {diff[-1].max():.3g}, "
        f"top-1 agreement {top1:.0%} ({len(ids)} positions)"
    )
    assert top1 == 1.0
    assert diff.max() < tol, f"{label}: max |log-prob diff| {diff.max():.3g} >= {tol}"
    return float(diff.max())


def _assert_tensors_equal_base(exported: Path, base_gguf: Path) -> None:
    base = {t.name: t for t in gguf.GGUFReader(str(base_gguf)).tensors}
    out = {t.name: t for t in gguf.GGUFReader(str(exported)).tensors}
    assert out.keys() == base.keys()
    for name, t in base.items():
        assert out[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert list(out[name].shape) == list(t.shape), name
        expected = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
        # bit-exact: transformers dequantized exactly these values, export must undo its permutes/shifts exactly
        np.testing.assert_array_equal(np.asarray(out[name].data).reshape(-1), expected, err_msg=name)


def _assert_metadata_equal_base(exported: Path, base_gguf: Path) -> None:
    """Every key/value of the base GGUF (tokenizer included) is in the export, unchanged, except the file type."""
    base, out = gguf.GGUFReader(str(base_gguf)), gguf.GGUFReader(str(exported))
    for name, field in base.fields.items():
        if name.startswith("GGUF.") or name in ("general.file_type", "general.alignment"):
            continue
        assert name in out.fields, name
        assert out.fields[name].types == field.types, name
        if name.startswith("tokenizer.ggml.") and field.types[0] == gguf.GGUFValueType.ARRAY:
            assert len(out.fields[name].data) == len(field.data), name  # comparing 49k strings one by one is slow
        else:
            assert out.fields[name].contents() == field.contents(), name
    assert not [k for k in out.fields if k.startswith("isara.")]


# --------------------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smol_gguf() -> Path:
    return base_model_path("smollm2")


@pytest.fixture(scope="module")
def smol_prepared(tmp_path_factory, smol_gguf) -> tuple[Path, list]:
    """prepare's output, and the paths gguf.GGUFReader was constructed for while it ran."""
    out = tmp_path_factory.mktemp("prepare") / "smollm2"
    opened = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            opened.append(path)
            super().__init__(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", CountingReader)
        mp.chdir(smol_gguf.parent)  # a relative path, as the prepare stage passes artifacts/0/model.gguf
        _timed("prepare smollm2", prepare_base, Path(smol_gguf.name), out)
    return out, opened


@pytest.fixture(scope="module")
def smol_dir(smol_prepared) -> Path:
    return smol_prepared[0]


@pytest.fixture(scope="module")
def smol_ref(smol_dir):
    return _hf_logprobs(smol_dir)


@pytest.fixture(scope="module")
def smol_f32(smol_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "smollm2-f32.gguf"
    _timed("export smollm2 f32", export_gguf, smol_dir, out, "f32")
    return out


def test_base_model_paths():
    path = base_model_path("smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    with pytest.raises(BaseModelError, match="'llama7b'"):
        base_model_path("llama7b")


def test_prepared_checkpoint_is_plain_hf(smol_dir):
    names = {p.name for p in smol_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", TEMPLATE_FILE, "isara_source.json"} <= names
    assert not [p for p in smol_dir.parent.iterdir() if p.name.startswith(".")], "temp dirs left behind"
    assert "quantization_config" not in json.loads((smol_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(smol_dir))
    assert getattr(model.config, "quantization_config", None) is None
    assert next(model.parameters()).dtype == torch.float32
    assert json.loads((smol_dir / "isara_source.json").read_text())["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_prepare_parses_the_gguf_once(smol_prepared):
    # transformers' loader would build a reader for the tokenizer, the config and the tensors (~10 s each for
    # Gemma 3's vocabulary); the template copy reads the metadata without one (isara.gguf.read_metadata)
    assert len(smol_prepared[1]) == 1, smol_prepared[1]


def test_prepare_dequantizes_in_slices_into_arrays_the_loader_keeps(monkeypatch):
    """prepare dequantizes large tensors slice by slice into one array, which transformers' loader then takes
    without its copy (isara.prepare._OwnArrays): gguf's own values for a slice size that divides nothing, 3-d data
    and a tensor smaller than a slice; only that array is handed over uncopied, an F32 tensor's file view is not."""
    import isara.prepare as prepare

    monkeypatch.setattr(prepare, "DEQUANTIZE_ROWS", 1000)
    reader = gguf.GGUFReader(str(base_model_path("smollm2")))
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert embedding.tensor_type != gguf.GGMLQuantizationType.F32 and embedding.data.shape[0] % 1000
    small = next(t for t in reader.tensors if t.tensor_type != gguf.GGMLQuantizationType.F32
                 and t.data.shape[0] < 1000)
    f32 = next(t for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.F32)
    own = prepare._OwnArrays(gguf.dequantize)
    for data, qtype in [(embedding.data, embedding.tensor_type), (embedding.data[:6000].reshape(3, 2000, -1),
                        embedding.tensor_type), (small.data, small.tensor_type)]:
        got = own(data, qtype)
        np.testing.assert_array_equal(got, gguf.dequantize(data, qtype))
        assert own.copy(got) is got and own.copy(got) is not got  # handed over once, copied after that
    view = own(f32.data, f32.tensor_type)
    copied = own.copy(view)
    assert copied is not view and not np.shares_memory(copied, view)


def test_prepare_failure_leaves_no_output(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="GGUF"):
        prepare_base(bogus, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bogus.gguf"]


def test_export_f32_equals_base_gguf(smol_f32, smol_gguf):
    _assert_tensors_equal_base(smol_f32, smol_gguf)
    _assert_metadata_equal_base(smol_f32, smol_gguf)


def test_parity_f32(smol_f32, smol_ref):
    ids, ref = smol_ref
    _check_parity("smollm2 f32", smol_f32, ids, ref, TOL_F32)


def test_parity_f16(smol_dir, smol_ref, tmp_path):
    out = tmp_path / "smollm2-f16.gguf"
    _timed("export smollm2 f16", export_gguf, smol_dir, out, "f16")
    ids, ref = smol_ref
    _check_parity("smollm2 f16", out, ids, ref, TOL_F16)


def test_q8_0_generates(smol_dir, smol_ref, tmp_path):
    out = tmp_path / "smollm2-q8_0.gguf"
    _timed("export smollm2 q8_0", export_gguf, smol_dir, out, "q8_0")
    assert [p.name for p in tmp_path.iterdir()] == [out.name], "temp file left behind"
    types = {t.tensor_type for t in gguf.GGUFReader(str(out)).tensors}
    assert types == {gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32}
    ids, ref = smol_ref
    _, lp = llama_logprobs(out, PROMPT, ids)
    # 8-bit weights (and activations in ggml's q8_0 matmul) move the far tail (log p ~ -26) by up to ~1, so
    # compare distributions: KL(transformers || llama.cpp) per position, measured max 0.012 nats
    kl = (np.exp(ref) * (ref - lp)).sum(-1)
    print(f"\n[parity] smollm2 q8_0: max KL {kl.max():.3g} nats, max|dlogp| {np.abs(lp - ref).max():.3g}, "
          f"top-1 agreement {(lp.argmax(-1) == ref.argmax(-1)).mean():.0%}")
    assert kl.max() < 0.05
    assert lp[-1].argmax() == ref[-1].argmax()
    llm = _llama(out, f32_kv=False, logits_all=False)
    try:
        text = llm(GEN_PROMPT, max_tokens=24, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()
    print(f"[q8_0] {GEN_PROMPT!r} -> {text!r}")
    assert "Paris" in text


def test_export_carries_changed_weights(smol_dir, smol_ref, tmp_path):
    """A changed checkpoint (like a fine-tune step) exports to a GGUF that computes the *changed* model."""
    model = AutoModelForCausalLM.from_pretrained(str(smol_dir), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    layer = model.model.layers[0]
    with torch.no_grad():  # the permuted q/k path, an MLP weight, a norm and the (tied) embedding
        for w in (layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.mlp.down_proj.weight):
            w.add_(0.02 * torch.randn(w.shape, generator=g))
        model.model.norm.weight.mul_(1.05)
        model.model.embed_tokens.weight[:1000].add_(0.01 * torch.randn(1000, model.config.hidden_size, generator=g))
    changed = tmp_path / "changed"
    model.save_pretrained(changed)
    AutoTokenizer.from_pretrained(str(smol_dir)).save_pretrained(changed)
    del model

    with pytest.raises(FileNotFoundError, match=TEMPLATE_FILE):  # no template in a bare save_pretrained dir
        export_gguf(changed, tmp_path / "x.gguf", "f32")
    out = tmp_path / "changed-f32.gguf"
    export_gguf(changed, out, "f32", template=smol_dir / TEMPLATE_FILE)

    ids, ref_changed = _hf_logprobs(changed)
    _, ref_base = smol_ref
    shift = np.abs(ref_changed - ref_base).max()
    print(f"\n[changed] transformers log-probs moved by up to {shift:.3g} from the base")
    assert shift > 0.1
    _check_parity("smollm2 changed f32", out, ids, ref_changed, TOL_F32)


def test_export_rejects_bad_outtype(smol_dir, tmp_path):
    with pytest.raises(ValueError, match="q4_k"):
        export_gguf(smol_dir, tmp_path / "x.gguf", "q4_k")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------- Gemma 3


@pytest.mark.skipif(not os.environ.get("ISARA_TEST_GEMMA"), reason="Gemma 3 270M takes ~5 min: set ISARA_TEST_GEMMA=1")
def test_gemma3_round_trip(tmp_path):
    src = _timed("assemble gemma3", base_model_path, "gemma3")
    hf_dir = tmp_path / "gemma3"
    _timed("prepare gemma3", prepare_base, src, hf_dir)
    out = tmp_path / "gemma3-f32.gguf"
    _timed("export gemma3 f32", export_gguf, hf_dir, out, "f32")
    _assert_tensors_equal_base(out, src)
    ids, ref = _hf_logprobs(hf_dir)
    _check_parity("gemma3 f32", out, ids, ref, TOL_GEMMA_F32)
    q8 = tmp_path / "gemma3-q8_0.gguf"
    _timed("export gemma3 q8_0", export_gguf, hf_dir, q8, "q8_0")
    llm = _llama(q8, f32_kv=False, logits_all=False)
    try:
        text = llm(GEN_PROMPT, max_tokens=24, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()
    print(f"[gemma3 q8_0] {GEN_PROMPT!r} -> {text!r}")
    assert text.strip()


def test_gguf_whose_tensors_do_not_fit_the_model_is_refused(tmp_path, monkeypatch):
    """prepare assigns the GGUF reader's tensors to a model built from the GGUF's config: a tensor the model lacks,
    or a weight no tensor fills (other than the tied head), must stop it with the file named, not save a half-meta
    checkpoint. The real reader runs; one tensor is dropped from what it returns."""
    import transformers.modeling_gguf_pytorch_utils as reader

    real = reader.load_gguf_checkpoint

    def without_one_norm(*args, **kwargs):
        parsed = real(*args, **kwargs)
        if "tensors" in parsed:  # the config and tokenizer read the same file without tensors
            del parsed["tensors"]["model.norm.weight"]
        return parsed

    monkeypatch.setattr(reader, "load_gguf_checkpoint", without_one_norm)
    gguf_path = base_model_path("smollm2")
    with pytest.raises(ValueError, match=r"GGUF tensors do not match the llama model: missing \['model.norm.weight'\]"):
        prepare_base(gguf_path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
