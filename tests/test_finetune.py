"""finetune's pieces on the real SmolLM2 checkpoint: the answer-only loss, length grouping, device and precision,
gradient accumulation and checkpointing, and LoRA (adapter-only training, merged checkpoint, GGUF export parity)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from conftest import REPO, SEEDS
from transformers import AutoModelForCausalLM, AutoTokenizer

from isara.finetune import (FP32_MATMUL_CHUNK, IGNORE, LOSS_CHUNK, HeadLoss, LoweredWeights, ResumeState,
                            accumulate_gradients, answer_loss, collate, cpu_has_bf16, encode, length_grouped_batches,
                            merged, precision_note, prepare_model, resolve_device, trained_tokens, train)
from isara.gguf import export_gguf
from isara.params import Finetune, ParamsError
from isara.seeds import read_seed_file

pytestmark = pytest.mark.slow

# Whole fine-tune steps under bf16 autocast need native bf16 dot products to take seconds: emulated (AVX2 only) a
# matmul runs at a quarter of fp32's speed, and these steps took 9 of the suite's minutes there, on a path that
# precision auto never takes on such a CPU. They run wherever bf16 is native (AVX512-BF16, AMX).
native_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="bf16 autocast is emulated here (no AVX512-BF16, AMX)")


@pytest.fixture(scope="module")
def smol_hf(smollm2_hf):
    return smollm2_hf


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


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("cap", [None, 30.0])
def test_head_loss_matches_autograd_over_several_chunks(cap, bf16):
    """HeadLoss takes its gradients chunk by chunk in the forward pass: loss and both gradients must be what
    autograd gives for the whole logits matrix (2 fp32 matmul chunks of rows and a partial one, whose exp-and-sum
    runs in LOSS_CHUNK parts; 4.5 chunks under bf16 autocast, whose casts HeadLoss makes itself once for all)."""
    g = torch.Generator().manual_seed(0)
    n = 2 * FP32_MATMUL_CHUNK + LOSS_CHUNK // 2 + 1
    hidden = torch.randn(n, 32, generator=g).requires_grad_()
    weight = torch.randn(1000, 32, generator=g).requires_grad_()
    targets = torch.randint(0, 1000, (n,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = (hidden @ weight.t()).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        reference = torch.nn.functional.cross_entropy(logits, targets)
        ref_h, ref_w = torch.autograd.grad(2 * reference, (hidden, weight))
        loss = HeadLoss.apply(hidden, weight, targets, cap)
        got_h, got_w = torch.autograd.grad(2 * loss, (hidden, weight))  # 2x: the incoming gradient is applied
        frozen = HeadLoss.apply(hidden, weight.detach(), targets, cap)  # LoRA: the head takes no gradient
        got_frozen = torch.autograd.grad(frozen, hidden)[0]

    def close(got, ref):
        # bf16: the matmuls' outputs are rounded to bf16 (one ulp is 0.4%), HeadLoss's per chunk and then summed,
        # so an element near zero can be off by a rounding of the terms it sums, not of itself
        tol = dict(rtol=1e-2, atol=1e-2 * float(ref.abs().max())) if bf16 else dict(rtol=1e-4, atol=1e-7)
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, **tol)

    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    close(got_h, ref_h)
    close(got_w, ref_w)
    close(got_frozen, ref_h / 2)


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


def test_an_fp32_cpu_fine_tune_under_auto_says_why_it_is_slow():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    note = precision_note(Finetune(), cpu, bf16=False)
    assert "no native bf16" in note and "fp32" in note and "about an hour" in note
    # bf16 found, or a precision the user chose, or a GPU: nothing to explain
    assert precision_note(Finetune(), cpu, bf16=True) is None
    assert precision_note(Finetune(precision="fp32"), cpu, bf16=False) is None
    assert precision_note(Finetune(), cuda, bf16=False) is None


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=native_bf16)])
def test_a_real_training_step_moves_the_weights(smol_hf, seeds, tmp_path, precision):
    cfg = Finetune(max_steps=2, batch_size=4, max_length=128, precision=precision)
    metrics = train(smol_hf, seeds, tmp_path / "out", cfg, progress=False)
    assert metrics["steps"] == 2 and metrics["precision"] == precision and metrics["device"] == "cpu"
    assert 0 < metrics["final_loss"] < 20
    before = AutoModelForCausalLM.from_pretrained(smol_hf, dtype=torch.float32).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).state_dict()
    assert after["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32  # bf16 only inside autocast
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"])


# ------------------------------------------------------------------------ gradient accumulation and checkpointing


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all parameters together."""
    assert a.keys() == b.keys()
    diff = sum(float((a[n] - b[n]).double().square().sum()) for n in b)
    norm = sum(float(b[n].double().square().sum()) for n in b)
    return (diff / norm) ** 0.5


@pytest.fixture(scope="module")
def fp32_model(smol_hf):
    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(smol_hf, dtype=torch.float32).train()


def test_accumulated_micro_batches_give_the_big_batchs_gradient(smol_hf, seeds, fp32_model):
    """2 micro-batches of 3 = 1 batch of 6 (fp32): the same loss and gradient, although the micro-batches hold
    different numbers of answer tokens (so averaging their two losses would be wrong)."""
    tok = AutoTokenizer.from_pretrained(smol_hf)
    examples = encode(seeds[:6], tok, 96)
    pad = tok.eos_token_id
    by_answer = sorted(range(6), key=lambda i: sum(label != IGNORE for label in examples[i][1]))
    micro = [collate(examples, by_answer[:3], pad), collate(examples, by_answer[3:], pad)]  # short, long answers
    counts = [trained_tokens(b) for b in micro]
    assert counts[0] < counts[1], counts
    model = fp32_model
    model.zero_grad(set_to_none=True)
    big_loss = accumulate_gradients(model, [collate(examples, list(range(6)), pad)])
    big = _grads(model)
    model.zero_grad(set_to_none=True)
    acc_loss = accumulate_gradients(model, micro)
    acc = _grads(model)
    model.zero_grad(set_to_none=True)
    err = _relative_error(acc, big)
    print(f"\n[accumulation] loss {acc_loss:.6f} vs {big_loss:.6f}, gradient relative error {err:.2e}")
    assert abs(acc_loss - big_loss) < 1e-5
    assert err < 1e-5  # fp32 sums in another order; measured 1e-7 level
    # the plain mean of the two micro-batch losses is not the big batch's loss: the weighting above matters
    with torch.no_grad():
        naive = sum(float(answer_loss(model, b)) for b in micro) / 2
    print(f"[accumulation] unweighted mean of the micro-batch losses: {naive:.6f}")
    assert abs(naive - big_loss) > 20 * abs(acc_loss - big_loss)


def _updates_differing(start: Path, a: Path, b: Path, lr: float) -> tuple[int, int]:
    """(weights moved from start in a, of them moved differently in b by more than 1% of lr)."""
    s0 = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32).state_dict()
    sa = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32).state_dict()
    sb = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32).state_dict()
    moved = differ = 0
    for name in s0:
        da, db = sa[name] - s0[name], sb[name] - s0[name]
        moved += int((da != 0).sum())
        differ += int(((da - db).abs() > 0.01 * lr).sum())
    return moved, differ


# One fine-tune that the accumulation, two-process and resume tests each reproduce another way: 9 examples in
# batches of 8, 2 optimizer steps (8 examples, then 1), fp32.
REFERENCE = dict(max_length=96, epochs=1, precision="fp32", lr=1e-4, batch_size=8)


@pytest.fixture(scope="module")
def reference(smol_hf, seeds, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "hf"
    return out, train(smol_hf, seeds[:9], out, Finetune(**REFERENCE), progress=False)


def _same_training(smol_hf, reference, other: Path, m: dict, label: str) -> None:
    """`other` trained what the reference trained: same steps, tokens and losses, and weight by weight the same
    updates. AdamW's first step moves each weight by about lr x sign(gradient); another batching (an optimizer step
    on a single micro-batch, one process's rows alone) would move a large share of them differently."""
    ref_dir, ref = reference
    assert m["steps"] == ref["steps"] == 2 and m["train_tokens"] == ref["train_tokens"]
    assert abs(m["first_loss"] - ref["first_loss"]) < 1e-4 and abs(m["final_loss"] - ref["final_loss"]) < 1e-4
    moved, differ = _updates_differing(smol_hf, ref_dir, other, REFERENCE["lr"])
    print(f"\n[{label}] loss {m['first_loss']} -> {m['final_loss']}; {differ} of {moved} moved weights updated "
          "differently from the reference")
    assert moved > 1_000_000
    assert differ / moved < 1e-3


def test_accumulation_steps_make_one_update_like_a_batch_k_times_larger(smol_hf, seeds, reference, tmp_path):
    """train(): batch 4 x 2 accumulation steps = batch 8 in one optimizer step, on the same examples. The schedule
    counts optimizer steps: 2 either way."""
    cfg = Finetune(**{**REFERENCE, "batch_size": 4}, gradient_accumulation_steps=2)
    m = train(smol_hf, seeds[:9], tmp_path / "acc", cfg, progress=False)
    assert m["gradient_accumulation_steps"] == 2
    _same_training(smol_hf, reference, tmp_path / "acc", m, "accumulation")


def test_two_gloo_processes_train_what_one_process_trains(smol_hf, seeds, reference, tmp_path):
    """finetune.num_processes = 2 on CPU: torchrun starts two processes (gloo), each trains on its rows of every batch
    and the gradients are summed, so the checkpoint is the one-process checkpoint of the same global batches. Step 1
    splits 4 + 4 rows; step 2 has one row, so the second process joins it with an empty share."""
    m = train(smol_hf, seeds[:9], tmp_path / "two", Finetune(**REFERENCE, num_processes=2), progress=False)
    assert m["processes"] == 2 and reference[1]["processes"] == 1
    _same_training(smol_hf, reference, tmp_path / "two", m, "2 processes")


RESUMABLE = """
from pathlib import Path
from isara.finetune import train
from isara.params import Finetune
from isara.seeds import read_seed_file
train(Path({model!r}), read_seed_file(Path({seeds!r}))[:9], Path({out!r}), Finetune(**{cfg!r}), progress=False)
"""


def test_killed_finetune_resumes_to_the_same_checkpoint(smol_hf, seeds, reference, tmp_path):
    """finetune.resume_every: a fine-tune killed (SIGKILL) after its first saved state resumes there when run
    again, and ends with exactly the reference checkpoint, bit for bit (weights, AdamW moments, schedule and batch
    order restored). A state from other params, data or start weights is ignored with a warning."""
    cfg = {**REFERENCE, "resume_every": 1}
    out, state = tmp_path / "hf", tmp_path / "hf.resume.pt"
    script = RESUMABLE.format(cfg=cfg, model=str(smol_hf), seeds=str(SEEDS / "safety.jsonl"), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 300
        while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.exists(), "no resume state appeared"
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()  # killed before the end

    m = train(smol_hf, seeds[:9], out, Finetune(**cfg), progress=False)
    assert m["resumed_from_step"] == 1  # the one state saved (never at the last step)
    assert not state.exists()  # the checkpoint is written: the state is gone
    ref_dir, ref = reference
    assert [m[k] for k in ("steps", "first_loss", "final_loss", "train_tokens")] == \
        [ref[k] for k in ("steps", "first_loss", "final_loss", "train_tokens")]
    a = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)

    # a state left by a fine-tune with other params, data or start weights: ignored, the run starts at step 0
    torch.save({"fingerprint": "other"}, state)
    with pytest.warns(UserWarning, match="another fine-tune"):
        assert ResumeState(out, "this one").load([], None, None, torch.device("cpu")) == {}


def _saved_bytes(model, inputs) -> tuple[float, int]:
    """The loss and the bytes autograd keeps for the backward pass outside checkpointed regions."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = answer_loss(model, inputs)
    loss.backward()
    return float(loss.detach()), saved[0]


def test_gradient_checkpointing_keeps_loss_and_gradients(smol_hf, seeds):
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(smol_hf)
    inputs = collate(encode(seeds[:4], tok, 96), [0, 1, 2, 3], tok.eos_token_id)
    plain = AutoModelForCausalLM.from_pretrained(smol_hf, dtype=torch.float32).train()
    loss, kept = _saved_bytes(plain, inputs)
    ref = _grads(plain)
    del plain
    model, core = prepare_model(AutoModelForCausalLM.from_pretrained(smol_hf, dtype=torch.float32),
                                Finetune(gradient_checkpointing=True))
    model.train()
    ckpt_loss, ckpt_kept = _saved_bytes(core, inputs)
    err = _relative_error(_grads(model), ref)
    print(f"\n[checkpointing] loss {ckpt_loss:.6f} vs {loss:.6f}, gradient relative error {err:.2e}, "
          f"saved for backward {ckpt_kept / 2**20:.1f} MiB vs {kept / 2**20:.1f} MiB")
    assert abs(ckpt_loss - loss) < 1e-5
    assert err < 1e-5
    assert ckpt_kept < kept / 4  # the decoder layers' activations were not kept: checkpointing was on


def test_uncheckpointed_layers_keep_the_last_layers_activations(smol_hf, seeds):
    """finetune.uncheckpointed_layers: the last n decoder layers run without checkpointing (their activations are
    kept, so more bytes are saved for the backward pass), the others still recompute, and the gradients are the
    all-checkpointed ones. n above the model's 30 layers means all of them."""
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(smol_hf)
    inputs = collate(encode(seeds[:4], tok, 96), [0, 1, 2, 3], tok.eos_token_id)
    kept, grads = {}, {}
    for n in (0, 10, 99):
        cfg = Finetune(method="lora", lora_r=4, uncheckpointed_layers=n)
        torch.manual_seed(0)  # the same adapter initialisation each time
        model, core = prepare_model(AutoModelForCausalLM.from_pretrained(smol_hf, dtype=torch.float32), cfg)
        model.train()
        off = min(n, 30)
        assert [layer.gradient_checkpointing for layer in core.model.layers] == [True] * (30 - off) + [False] * off
        _, kept[n] = _saved_bytes(core, inputs)
        grads[n] = _grads(model)
    print(f"\n[uncheckpointed layers] saved for backward: 0 -> {kept[0] / 2**20:.1f} MiB, 10 -> "
          f"{kept[10] / 2**20:.1f} MiB, all 30 -> {kept[99] / 2**20:.1f} MiB")
    assert kept[0] < kept[10] < kept[99]
    # each layer's activations are the same size: 10 of 30 layers keep about a third of the difference
    assert kept[10] - kept[0] == pytest.approx((kept[99] - kept[0]) / 3, rel=0.1)
    assert _relative_error(grads[10], grads[0]) < 1e-6 and _relative_error(grads[99], grads[0]) < 1e-6


# --------------------------------------------------------------------------------------------------- LoRA


def test_lora_trains_only_the_adapter(smol_hf, seeds):
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(smol_hf)
    inputs = collate(encode(seeds[:4], tok, 96), [0, 1, 2, 3], tok.eos_token_id)
    start = {n: t.clone() for n, t in AutoModelForCausalLM.from_pretrained(smol_hf, dtype=torch.float32)
             .state_dict().items()}
    cfg = Finetune(method="lora", lora_r=4, lr=1e-3)
    model, core = prepare_model(AutoModelForCausalLM.from_pretrained(smol_hf, dtype=torch.float32), cfg)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(".lora_A." in n or ".lora_B." in n for n in params)
    # r x (in + out) per adapted projection: 7 projections in each of 30 layers
    assert sum(p.numel() for p in params.values()) < 0.01 * sum(t.numel() for t in start.values())
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr)
    for _ in range(2):  # B starts at zero, so A gets its first non-zero gradient in the second step
        accumulate_gradients(core, [inputs])
        assert all(p.grad is None for n, p in model.named_parameters() if n not in params)
        assert all(p.grad is not None for p in params.values())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    weights = {n.replace(".base_layer.", "."): t for n, t in core.state_dict().items() if ".lora_" not in n}
    assert weights.keys() == start.keys()
    assert all(torch.equal(weights[n], start[n]) for n in start), "a base weight changed before the merge"
    model.eval()
    with torch.no_grad():
        adapted = core(**inputs).logits
        plain = merged(model, cfg)
        assert type(plain).__name__ == "LlamaForCausalLM"
        assert torch.allclose(plain(**inputs).logits, adapted, atol=1e-4)
    after = plain.state_dict()
    assert after.keys() == start.keys()
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(after["model.embed_tokens.weight"], start["model.embed_tokens.weight"])  # not a target


@native_bf16
def test_lora_frozen_weights_in_bf16_train_the_same_bits(smol_hf, seeds, tmp_path):
    """LoweredWeights (LoRA under bf16 autocast, what _train does): the adapted layers' frozen weights held in bf16
    give the very gradients autocast's own casts of the fp32 weights give, and restore() brings the fp32 weights
    back bit for bit, so the merged model is the one training without it merges."""
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(smol_hf)
    inputs = collate(encode(seeds[:4], tok, 96), [0, 1, 2, 3], tok.eos_token_id)
    cfg = Finetune(method="lora", lora_r=4, lr=1e-3)
    grads, weights = {}, {}
    for lower in (False, True):
        torch.manual_seed(0)
        model, core = prepare_model(AutoModelForCausalLM.from_pretrained(smol_hf, dtype=torch.float32), cfg)
        lowered = LoweredWeights(core, torch.bfloat16) if lower else None
        frozen = core.model.layers[0].mlp.down_proj.base_layer.weight
        assert frozen.dtype == (torch.bfloat16 if lower else torch.float32)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
        for _ in range(2):  # B starts at zero, so A gets its first non-zero gradient in the second step
            accumulate_gradients(core, [inputs], bf16=True)
            grads[lower] = _grads(model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if lowered is not None:
            assert len(lowered.layers) == 7 * 30  # every adapted projection of the 30 layers
            with pytest.raises(RuntimeError, match="no tensor named model.layers"):
                lowered.restore(tmp_path)  # a folder without the checkpoint: a clear error, nothing changed
            lowered.restore(smol_hf)
        weights[lower] = merged(model, cfg).state_dict()
    assert grads[True].keys() == grads[False].keys()
    assert all(torch.equal(grads[True][n], grads[False][n]) for n in grads[False])
    assert weights[True].keys() == weights[False].keys()
    assert all(weights[True][n].dtype == torch.float32 for n in weights[True])
    assert all(torch.equal(weights[True][n], weights[False][n]) for n in weights[False])


def test_lora_unknown_target_module_is_a_params_error(smol_hf):
    model = AutoModelForCausalLM.from_pretrained(smol_hf, dtype=torch.float32)
    with pytest.raises(ParamsError, match="finetune.lora_target_modules"):
        prepare_model(model, Finetune(method="lora", lora_target_modules=["query_key_value"]))


def test_lora_loss_falls_and_the_merged_export_matches_llama_cpp(smol_hf, seeds, tmp_path):
    """LoRA through train(): the loss on one repeated batch falls, the saved checkpoint is a plain model with the
    adapter merged (not the base), and its GGUF export computes the same next-token log-probs in llama.cpp."""
    from test_prepare_export import TOL_F32, _check_parity, _hf_logprobs

    cfg = Finetune(method="lora", lr=1e-3, max_steps=4, batch_size=4, epochs=4, max_length=96, precision="fp32")
    out = tmp_path / "hf"
    m = train(smol_hf, seeds[:4], out, cfg, progress=False)  # one batch of 4: every step sees the same examples
    print(f"\n[lora] loss {m['first_loss']} -> {m['final_loss']}, {m['trainable_parameters']} trainable")
    assert m["method"] == "lora" and m["steps"] == 4
    assert m["final_loss"] < m["first_loss"] - 0.1
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    base_model = AutoModelForCausalLM.from_pretrained(smol_hf, dtype=torch.float32)
    # r x (in + out) per adapted projection, nothing else: 3.6% of the 135M weights at r = 16 on all 7 projections
    assert m["trainable_parameters"] == sum(cfg.lora_r * (mod.in_features + mod.out_features)
                                            for name, mod in base_model.named_modules()
                                            if name.rsplit(".", 1)[-1] in cfg.lora_target_modules)
    base = base_model.state_dict()
    assert saved.keys() == base.keys()
    assert not torch.equal(saved["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])
    del saved, base, base_model

    gguf_path = tmp_path / "lora-f32.gguf"
    export_gguf(out, gguf_path, "f32")  # the template train() carried into the checkpoint
    ids, ref = _hf_logprobs(out)
    _, ref_base = _hf_logprobs(smol_hf)
    shift = float(abs(ref - ref_base).max())
    print(f"[lora] merged model's log-probs moved by up to {shift:.3g} from the base")
    assert shift > 0.05
    _check_parity("smollm2 lora merged f32", gguf_path, ids, ref, TOL_F32)


# ------------------------------------------------------------------------------------------- release_memory

PROBE = """
import sys, torch
from isara.memory import release_at_peaks, release_freed_memory, trim_heap
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
if sys.argv[1] == "threshold":
    assert release_freed_memory()
if sys.argv[1] == "trim":
    assert release_at_peaks()
x = torch.ones(1 << 20); del x  # a 4 MiB tensor freed: glibc's dynamic mmap threshold rises past 4 MiB
big, small = [], []
for _ in range(64):  # 4 MiB tensors, each followed by a small one that outlives it, as activations and weights do
    big.append(torch.ones(1 << 20)); small.append(torch.ones(64 << 10))
before = rss_mib(); del big
trim_heap()  # a no-op unless release_at_peaks() switched it on
print(before - rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_release_memory_returns_freed_tensors_to_the_os():
    """finetune.release_memory (run_finetune calls release_at_peaks, answer_loss trim_heap before the head): 256 MiB
    of freed 4 MiB tensors leave the process, where glibc's default keeps them in heap holes between live tensors.
    prepare's fixed mmap threshold (release_freed_memory) does the same as they are freed. A fresh process each:
    both settings are process-wide."""
    freed = {}
    for mode in ("off", "threshold", "trim"):
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, out.stderr
        freed[mode] = float(out.stdout)
    print(f"\n[release_memory] MiB returned after freeing 256 MiB: {freed}")
    assert freed["threshold"] >= 250 and freed["trim"] >= 250
    assert freed["off"] < 64  # the premise: without it the memory stays resident
