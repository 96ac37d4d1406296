import textwrap

import pytest
from click.testing import CliRunner

from isara.cli import cli
from isara.params import ParamsError, load_params

GOOD = textwrap.dedent("""\
    seeds: {path: data/seeds/safety.jsonl}
    iterations:
      "1": {prev: "0"}
      "2": {prev: "1"}
    """)


def write(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repo_params_file_is_valid():
    p = load_params("params.yaml")
    assert list(p.iterations) == ["1", "2"]
    assert p.base.model == "gemma3" and p.finetune.method == "lora"


def test_exponent_written_by_dvc_exp_set_is_a_float(tmp_path):
    # `dvc exp run -S finetune.lr=4e-05` writes exactly this; PyYAML would read a string.
    assert load_params(write(tmp_path, GOOD + "finetune: {lr: 4e-05}\n")).finetune.lr == pytest.approx(4e-5)


@pytest.mark.parametrize("edit, expected", [
    ("finetune: {lr: fast}", "finetune.lr = 'fast'"),
    ("finetune: {learning_rate: 0.1}", "finetune.learning_rate"),
    ("generate: {temperature: -1}", "generate.temperature = -1"),
    ("generate: {n_samples: -5}", "generate.n_samples = -5"),
    ("base: {model: gpt5}", "base.model = 'gpt5'"),
    ("finetune: {method: qlora}", "finetune.method = 'qlora'"),
    ("finetune: {gradient_accumulation_steps: 0}", "finetune.gradient_accumulation_steps = 0"),
    ("finetune: {gradient_checkpointing: sometimes}", "finetune.gradient_checkpointing = 'sometimes'"),
    ("finetune: {uncheckpointed_layers: -2}", "finetune.uncheckpointed_layers = -2"),
    ("finetune: {lora_r: 0}", "finetune.lora_r = 0"),
    ("finetune: {lora_target_modules: []}", "finetune.lora_target_modules = []"),
    ("finetune: {lora_target_modules: ['q proj']}", "finetune.lora_target_modules"),
    ("bogus: {x: 1}", "bogus"),
])
def test_bad_values_name_key_and_value(tmp_path, edit, expected):
    with pytest.raises(ParamsError) as err:
        load_params(write(tmp_path, GOOD + edit + "\n"))
    assert expected in str(err.value)
    assert "params.yaml" in str(err.value)


@pytest.mark.parametrize("schedule, expected", [
    ('iterations:\n  "1": {prev: "0"}\n  "2": {prev: "7"}\n', "prev '7'"),
    ('iterations:\n  "1": {prev: "2"}\n  "2": {prev: "1"}\n', "earlier iteration"),
    ('iterations:\n  1: {prev: "0"}\n', "must be quoted"),
])
def test_bad_schedule(tmp_path, schedule, expected):
    text = "seeds: {path: s.jsonl}\n" + schedule
    with pytest.raises(ParamsError, match=expected):
        load_params(write(tmp_path, text))


def test_cli_params_check(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(cli, ["params", "check", str(write(tmp_path, GOOD))])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(cli, ["params", "check", str(write(tmp_path, GOOD + "finetune: {epochs: zero}\n"))])
    assert bad.exit_code == 1
    assert "finetune.epochs = 'zero'" in bad.output
    assert "Traceback" not in bad.output


def test_stage_params_refuses_undeclared_section(monkeypatch, tmp_path):
    from isara.params import StageParams

    view = StageParams(load_params(write(tmp_path, GOOD)), "generate@1", {"generate"})
    assert view.generate.n_samples > 0
    with pytest.raises(ParamsError, match="does not declare"):
        view.finetune


def test_relative_paths_resolve_from_the_project_even_in_an_experiment_copy(tmp_path):
    """`dvc exp run --queue/--temp` run in <project>/.dvc/tmp/exps/<name>/: a relative path that the copy lacks
    (a folder beside the project) is taken from the project; the copy's own files still win."""
    from isara.paths import project_root, resolve_path

    project = tmp_path / "project"
    copy = project / ".dvc" / "tmp" / "exps" / "tmpa1b2"
    (copy / "data").mkdir(parents=True)
    (copy / "data" / "x.jsonl").write_text("")
    (tmp_path / "benchmarks").mkdir()
    assert project_root(copy) == project and project_root(project) == project
    assert resolve_path("../benchmarks", copy) == project / "../benchmarks"
    assert resolve_path("data/x.jsonl", copy) == copy / "data" / "x.jsonl"
    assert resolve_path("../benchmarks", project) == project / "../benchmarks"
    assert resolve_path(tmp_path / "benchmarks", copy) == tmp_path / "benchmarks"
