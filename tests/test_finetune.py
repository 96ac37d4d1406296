"""finetune's pieces on the real SmolLM2 checkpoint: the answer-only loss, length grouping, device and precision."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from conftest import SEEDS
from transformers import AutoModelForCausalLM, AutoTokenizer

from isara.base_models import base_model_path
from isara.finetune import IGNORE, answer_loss, collate, encode, length_grouped_batches, resolve_device, train
from isara.params import Finetune, ParamsError
from isara.prepare import prepare_base
from isara.seeds import read_seed_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_hf(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "hf"
    prepare_base(base_model_path("smollm2"), out)
    return out


@pytest.fixture(scope="module")
def seeds():
    return read_seed_file(SEEDS / "safety.jsonl")[:12]


def test_answer_loss_equals_the_models_own_loss(smol_hf, seeds):
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(smol_hf)
    model = AutoModelForCausalLM.from_pretrained(smol_hf, dtype=torch.float32).eval()
    examples = encode(seeds[:4], tok, 256)
    inputs = collate(examples, [0, 1, 2, 3], tok.eos_token_id)  # unequal lengths: padding included
    assert (inputs["attention_mask"] == 0).any()
    with torch.no_grad():
        ours, theirs = answer_loss(model, inputs), model(**inputs).loss
    assert abs(float(ours) - float(theirs)) < 1e-4, (float(ours), float(theirs))
    # the trained targets matter: other answer labels, another loss
    labels = inputs["labels"].clone()
    labels[labels != IGNORE] = tok.eos_token_id
    with torch.no_grad():
        assert abs(float(answer_loss(model, {**inputs, "labels": labels})) - float(ours)) > 0.1


def test_length_grouping_pads_less_than_arrival_order(smol_hf, seeds):
    tok = AutoTokenizer.from_pretrained(smol_hf)
    examples = encode(read_seed_file(SEEDS / "safety.jsonl"), tok, 256)

    def padding(batches):
        widths = [max(len(examples[i][0]) for i in b) * len(b) for b in batches]
        return 1 - sum(len(x) for x, _ in examples) / sum(widths)

    grouped = length_grouped_batches(examples, 8, torch.Generator().manual_seed(0))
    assert sorted(i for b in grouped for i in b) == list(range(len(examples)))  # every example once
    in_order = [list(range(i, min(i + 8, len(examples)))) for i in range(0, len(examples), 8)]
    assert padding(grouped) < padding(in_order) / 2


def test_cuda_without_a_gpu_is_a_params_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ParamsError, match="finetune.device = cuda"):
        resolve_device(Finetune(device="cuda"))
    assert resolve_device(Finetune()).type == "cpu"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_real_training_step_moves_the_weights(smol_hf, seeds, tmp_path, precision):
    cfg = Finetune(max_steps=2, batch_size=4, max_length=128, precision=precision)
    metrics = train(smol_hf, seeds, tmp_path / "out", cfg, progress=False)
    assert metrics["steps"] == 2 and metrics["precision"] == precision and metrics["device"] == "cpu"
    assert 0 < metrics["final_loss"] < 20
    before = AutoModelForCausalLM.from_pretrained(smol_hf, dtype=torch.float32).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    assert after["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32  # bf16 only inside autocast
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"])
