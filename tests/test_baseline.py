"""The baselines reach the other stages only through their run_* functions, pointed at the baseline's own folders
(README "Architecture"); the end-to-end run is tests/test_pipeline.py's."""

from __future__ import annotations

from pathlib import Path

from isara.params import Evaluate, Export, Finetune, Generate
from isara.paths import baseline_paths, iter_paths


def test_one_shot_is_generate_at_1_then_finetune_into_its_own_folder(monkeypatch):
    import isara.finetune
    import isara.generate
    import isara.gguf
    from isara.baseline import run_one_shot

    calls = {}

    def run_generate(iteration, prev, cfg, progress=True, out=None, **kwargs):
        calls["generate"] = (iteration, prev, cfg.n_samples, cfg.max_attempts, out)
        return {"accepted": 3, "dataset_size": 11, "seconds": 1.5}

    def run_finetune(iteration, prev, cfg, progress=True, base_format="auto", out=None, dataset=None):
        calls["finetune"] = (prev, out, dataset)
        return {"final_loss": 0.5, "seconds": 2.0}

    monkeypatch.setattr(isara.generate, "run_generate", run_generate)
    monkeypatch.setattr(isara.finetune, "run_finetune", run_finetune)
    monkeypatch.setattr(isara.gguf, "export_gguf", lambda hf, gguf, outtype, metadata=None:
                        calls.setdefault("export", (hf, gguf, outtype, metadata)))
    gen = Generate(n_samples=2, max_attempts=5)
    m = run_one_shot(gen, 3, Finetune(), Export(), progress=False)
    here = baseline_paths("one_shot")
    assert calls["generate"] == ("1", "0", 6, 15, here)  # generate@1's round from M0, N x T samples, own folder
    assert calls["finetune"] == ("0", here, here.dataset)  # M0 trained on D0 + the one-shot samples
    assert calls["export"][:2] == (here.hf, here.gguf) and calls["export"][3] is None  # no seeds/base: no metadata
    assert m == {"accepted": 3, "requested": 6, "dataset_size": 11, "final_loss": 0.5, "seconds": 3.5}


def test_sft_seed_trains_m0_on_d0(monkeypatch):
    import isara.finetune
    import isara.gguf
    from isara.baseline import run_sft_seed

    seen = {}
    monkeypatch.setattr(isara.finetune, "run_finetune",
                        lambda it, prev, cfg, progress=True, base_format="auto", out=None, dataset=None:
                        seen.setdefault("finetune", (it, prev, out, dataset)) and {"final_loss": 1.0})
    monkeypatch.setattr(isara.gguf, "export_gguf", lambda *a, **k: None)
    run_sft_seed(Finetune(), Export(), progress=False)
    assert seen["finetune"] == ("sft_seed", "0", baseline_paths("sft_seed"), iter_paths(0).dataset)


def test_baseline_evaluation_is_run_evaluate_on_the_baseline_model(monkeypatch):
    import isara.evaluate
    from isara.baseline import run_baseline

    seen = []

    def run_evaluate(iteration, cfg, benchmarks_dir=None, progress=True, base_format="auto", model=None, out=None,
                     examples=None, **kwargs):
        seen.append((iteration, Path(model), out, examples))
        return {}

    monkeypatch.setattr(isara.evaluate, "run_evaluate", run_evaluate)
    run_baseline("base", Evaluate(), progress=False)
    run_baseline("sft_seed", Evaluate(), progress=False)
    assert seen == [("base", iter_paths(0).gguf, baseline_paths("base"), None),
                    ("sft_seed", baseline_paths("sft_seed").gguf, baseline_paths("sft_seed"), None)]
