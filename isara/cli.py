"""The `isara` command, and the only module that imports click (README "Architecture").

Each pipeline stage is a subcommand with the same word in dvc.yaml, params.yaml and isara/<stage>.py;
stages/<stage>.py imports its stage module and runs that same command under DVC. A command loads what it runs by
name (`_load`), when it runs: `isara lineage` does not import torch, and the static import closure of
stages/<stage>.py, the code deps dvc.yaml must list (tests/test_dvc_deps.py), is its own stage's code plus this
module's module-level imports, not every command's. Keep module-level imports here to contracts and console.py.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import click

from isara.console import UserError, echo_metrics, guard, resolve_prev, stage_params
from isara.io import write_json
from isara.params import DEFAULT_PARAMS, Engine, load_params
from isara.paths import ARTIFACTS, BASELINES, REPORTS, iter_paths

# The pipeline's stages in dvc.yaml's order (so `isara --help` lists them so), then the tools.
STAGES = ["seeds", "prepare", "index", "generate", "finetune", "export", "datacard", "judge", "evaluate", "baseline",
          "truthfulqa", "report", "package", "audit"]
TOOLS = ["truthfulqa-score", "truthfulqa-seeds", "show"]


class CommandError(click.ClickException):
    """A UserError as click shows it: "Error: <message>", exit code 1, no traceback."""

    def format_message(self) -> str:
        return self.message


class Command(click.Command):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise CommandError(str(exc)) from exc


class Group(click.Group):
    command_class = Command
    group_class = type  # subgroups are Groups too

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise CommandError(str(exc)) from exc


class StageGroup(Group):
    def list_commands(self, ctx):
        rest = sorted(set(self.commands) - {*STAGES, *TOOLS})
        return [name for name in [*STAGES, *TOOLS] if name in self.commands] + rest


def _load(module: str, *names: str):
    """isara.<module>'s names, imported when a command runs (see the docstring: why not an import statement)."""
    loaded = importlib.import_module(f"isara.{module}")
    values = [getattr(loaded, name) for name in names]
    return values[0] if len(values) == 1 else values


iteration_argument = click.argument("iteration")
prev_option = click.option("--prev", default=None,
                           help="Iteration to start from (default: params iterations.<t>.prev).")


def _evaluation_headline(metrics: dict) -> dict:
    """The numbers evaluate, judge and baseline print (the metrics files hold everything)."""
    keys = ("judge", "format", "harmful_rate", "over_refusal", "n_harmful", "n_safe", "seconds", "learned_agreement",
            "strmatch_agreement", "selected")
    return {k: v for k, v in metrics.items() if k in keys}


@click.group(cls=StageGroup)
@click.version_option(package_name="isara")
def cli() -> None:
    """ISARA: self-alignment from a few seed examples by retrieval-augmented in-context generation."""


# ---------------------------------------------------------------------------------------------------- stages


@cli.group("seeds", invoke_without_command=True)
@click.pass_context
def seeds_command(ctx: click.Context) -> None:
    """seeds stage: validate the seed file (params seeds.path) and write D0 with record ids."""
    if ctx.invoked_subcommand is None:
        run_seeds = _load("seeds", "run_seeds")

        p = stage_params()
        records = guard(run_seeds, p.seeds.path, p.base, p.engine.n_ctx)
        echo_metrics("seeds", {"seeds": len(records), "dataset": str(iter_paths(0).dataset)})


@seeds_command.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--params", "params_path", default=str(DEFAULT_PARAMS), show_default=True,
              help="params file giving base.model and engine.n_ctx")
def seeds_check(file: str, params_path: str) -> None:
    """Validate a seed file with exactly the rules the pipeline applies."""
    validate_seed_file = _load("seeds", "validate_seed_file")

    p = guard(load_params, params_path)
    records = guard(validate_seed_file, file, p.base, p.engine.n_ctx)
    click.echo(f"{file}: ok ({len(records)} seeds)")


@cli.command("prepare")
def prepare_command() -> None:
    """prepare stage: copy the base GGUF (params base.model) and convert it to a transformers checkpoint."""
    run_prepare = _load("prepare", "run_prepare")

    p = stage_params()
    echo_metrics("prepare", guard(run_prepare, p.base))


@cli.command("index")
@iteration_argument
@prev_option
def index_command(iteration: str, prev: str | None) -> None:
    """index@ITERATION: embed the questions of D(prev) and build the Annoy index."""
    run_index = _load("index", "run_index")

    p = stage_params()
    echo_metrics(f"index@{iteration}", guard(run_index, iteration, resolve_prev(iteration, prev), p.index))


@cli.command("generate")
@iteration_argument
@prev_option
def generate_command(iteration: str, prev: str | None) -> None:
    """generate@ITERATION: M(prev) writes new QA pairs by retrieval-augmented ICL; D(t) = D(prev) + accepted."""
    run_generate = _load("generate", "run_generate")

    p = stage_params()
    echo_metrics(f"generate@{iteration}", guard(run_generate, iteration, resolve_prev(iteration, prev), p.generate,
                                                engine_params=p.engine))


@cli.command("finetune")
@iteration_argument
@prev_option
def finetune_command(iteration: str, prev: str | None) -> None:
    """finetune@ITERATION: SFT of M(prev) (or M0, finetune.init) on D(t), loss on answer tokens only."""
    run_finetune = _load("finetune", "run_finetune")

    p = stage_params()
    echo_metrics(f"finetune@{iteration}", guard(run_finetune, iteration, resolve_prev(iteration, prev), p.finetune,
                                                 base_format=p.base.format))


@cli.command("export")
@iteration_argument
def export_command(iteration: str) -> None:
    """export@ITERATION: convert M(t) to GGUF for the next round's llama.cpp."""
    run_export = _load("export", "run_export")

    p = stage_params()
    echo_metrics(f"export@{iteration}", guard(run_export, iteration, p.export, p.seeds, p.base))


@cli.command("datacard")
@iteration_argument
def datacard_command(iteration: str) -> None:
    """datacard@ITERATION: the data card of iteration t: volume, rejections, diversity, seed influence,
    retrieval distances, lengths and examples (reports/datacards/<t>.md, figures in reports/iters/<t>)."""
    run_datacard = _load("datacard", "run_datacard")

    p = stage_params()
    m = guard(run_datacard, iteration, p.datacard, p.seeds, p.base, stance_judge=p.generate.stance_judge)
    keys = ("accepted", "attempted", "diversity.near_duplicate_rate", "seed_influence.gini", "retrieval.far_share")
    click.echo(f"datacard@{iteration}: " + ", ".join(f"{k}={m.get(k)}" for k in keys))


@cli.command("judge")
def judge_command() -> None:
    """judge stage: train the learned refusal judge on XSTest's human labels (params `judge`)."""
    run_judge = _load("judge", "run_judge")

    p = stage_params()
    echo_metrics("judge", _evaluation_headline(guard(run_judge, p.judge, p.benchmarks.dir)))


@cli.command("evaluate")
@iteration_argument
def evaluate_command(iteration: str) -> None:
    """evaluate@ITERATION: harmful rate and over-refusal of artifacts/<t>/model.gguf (params `evaluate`)."""
    run_evaluate = _load("evaluate", "run_evaluate")

    p = stage_params()
    metrics = guard(run_evaluate, iteration, p.evaluate, p.benchmarks.dir, base_format=p.base.format,
                    engine_params=p.engine)
    echo_metrics(f"evaluate@{iteration}", _evaluation_headline(metrics))


@cli.group("baseline")
def baseline_command() -> None:
    """Baselines on the eval prompts: base model, ICL-kNN, SFT on the seeds, one-shot generation + SFT."""


@baseline_command.command("evaluate")
@click.argument("name", type=click.Choice(BASELINES))
def baseline_evaluate(name: str) -> None:
    """baseline@NAME: harmful rate and over-refusal of a baseline (params `evaluate`)."""
    run_baseline = _load("baseline", "run_baseline")

    p = stage_params()
    metrics = guard(run_baseline, name, p.evaluate, p.benchmarks.dir, base_format=p.base.format,
                    engine_params=p.engine)
    echo_metrics(f"baseline@{name}", _evaluation_headline(metrics))


@baseline_command.command("sft-seed")
def baseline_sft_seed() -> None:
    """baseline_sft_seed: fine-tune M0 on the seed set only (params `finetune`, `export`)."""
    run_sft_seed = _load("baseline", "run_sft_seed")

    p = stage_params()
    m = guard(run_sft_seed, p.finetune, p.export, seeds=p.seeds, base=p.base)
    echo_metrics("baseline_sft_seed", {k: m[k] for k in ("examples", "steps", "final_loss", "seconds")})


@baseline_command.command("one-shot")
def baseline_one_shot() -> None:
    """baseline_one_shot: generate N x T samples from M0 in one round, fine-tune M0 on D0 + them."""
    run_one_shot = _load("baseline", "run_one_shot")

    p = stage_params()
    echo_metrics("baseline_one_shot", guard(run_one_shot, p.generate, len(p.iterations), p.finetune, p.export,
                                            seeds=p.seeds, base=p.base, engine_params=p.engine))


@cli.command("truthfulqa")
@click.argument("target")
def truthfulqa_command(target: str) -> None:
    """truthfulqa@ITERATION (or TARGET=base: truthfulqa_base): TruthfulQA MC1/MC2 on questions not in the seeds."""
    run_truthfulqa = _load("truthfulqa", "run_truthfulqa")

    p = stage_params()
    name = "truthfulqa_base" if target == "base" else f"truthfulqa@{target}"
    echo_metrics(name, guard(run_truthfulqa, target, p.truthfulqa, p.benchmarks.dir, engine_params=p.engine))


@cli.command("report")
def report_command() -> None:
    """report stage: pipeline-wide metrics (data set growth, scaling ratio, losses, stage times)."""
    run_report = _load("report", "run_report")

    stage_params()  # validate before work, like every stage
    echo_metrics("report", guard(run_report, iter_paths(0).dataset))


@cli.command("package")
@click.argument("target")
def package_command(target: str) -> None:
    """package TARGET: model card, Ollama Modelfile and license files of M(TARGET) (an iteration) or of a fine-tuned
    baseline (sft_seed, one_shot), in its artifacts folder's package/."""
    run_package = _load("package", "run_package")

    p = stage_params()
    m = guard(run_package, target, p)
    click.echo(f"package@{target}: wrote {', '.join(m['files'])} in {m['dir']}")


@cli.command("audit")
@click.option("--root", default=".", type=click.Path(file_okay=False, exists=True), show_default=True,
              help="Project root: the folder holding dvc.yaml, dvc.lock and artifacts/.")
@click.option("--metrics", "metrics_path", default=None, type=click.Path(dir_okay=False),
              help=f"Also write the summary as JSON (the DVC stage writes {REPORTS / 'audit.json'}).")
def audit_command(root: str, metrics_path: str | None) -> None:
    """Verify artifacts against dvc.lock and every generated record's lineage; exit 1 naming each break."""
    run_audit = _load("audit", "run_audit")

    if os.environ.get("DVC_STAGE"):
        iterations = stage_params().iterations  # under dvc repro: only the declared sections
    else:
        iterations = guard(load_params, Path(root) / "params.yaml").iterations
    result = guard(run_audit, root, iterations)
    if metrics_path:
        write_json(metrics_path, result.metrics())
    if not result.ok:
        for finding in result.findings:
            click.echo(f"AUDIT FAIL: {finding}", err=True)
        raise SystemExit(f"audit failed: {len(result.findings)} break(s) found")
    click.echo(result.summary())


# ----------------------------------------------------------------------------------------------------- tools


@cli.command("truthfulqa-score")
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False), help="GGUF model file.")
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False),
              help="TruthfulQA.csv (default: truthfulqa/TruthfulQA.csv under $ISARA_BENCHMARKS_DIR).")
@click.option("--limit", default=0, show_default=True, help="First N questions (after --exclude); 0 = all.")
@click.option("--exclude", default=None, type=click.Path(dir_okay=False),
              help="Seed JSONL whose questions are skipped (the truthfulness-domain seed set).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the metrics JSON here.")
@click.option("--threads", default=2, show_default=True)
def truthfulqa_score(model_path: str, csv_path: str | None, limit: int, exclude: str | None, out: str | None,
                     threads: int) -> None:
    """TruthfulQA MC1/MC2 of any GGUF model from answer log-likelihoods (llama.cpp), outside the pipeline."""
    default_csv, evaluate_mc, heldout_items = _load("truthfulqa", "default_csv", "evaluate_mc", "heldout_items")

    skip = set()
    if exclude:
        skip = {json.loads(line)["question"] for line in Path(exclude).read_text(encoding="utf-8").splitlines()
                if line.strip()}
    items = guard(heldout_items, Path(csv_path) if csv_path else guard(default_csv), skip, limit)
    metrics = guard(evaluate_mc, Path(model_path), items, Engine(n_threads=threads))
    metrics["model"] = str(model_path)
    if out:
        write_json(out, metrics)
    click.echo(f"truthfulqa: mc1={metrics['mc1']}, mc2={metrics['mc2']}, n={metrics['n_questions']}, "
               f"seconds={metrics['seconds']}")


@cli.command("truthfulqa-seeds")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Seed JSONL to write ({question, answer}: Best Answer). Keep it outside the repository.")
@click.option("--heldout", default=None, type=click.Path(dir_okay=False),
              help="Also write the held-out questions (eval JSONL: {prompt, category}).")
@click.option("--csv", "csv_path", default=None, type=click.Path(dir_okay=False))
@click.option("--n", default=64, show_default=True)
@click.option("--seed", default=0, show_default=True)
def truthfulqa_seeds(out: str, heldout: str | None, csv_path: str | None, n: int, seed: int) -> None:
    """The truthfulness-domain seed set: N TruthfulQA questions stratified by category, Best Answer as answer."""
    load_truthfulqa = _load("benchmarks", "load_truthfulqa")
    default_csv, stratified_seed_split, write_rows = _load(
        "truthfulqa", "default_csv", "stratified_seed_split", "write_rows")

    items = guard(load_truthfulqa, Path(csv_path) if csv_path else guard(default_csv))
    seeds, held = guard(stratified_seed_split, items, n, seed)
    write_rows(Path(out), [{"question": s.question, "answer": s.best_answer} for s in seeds])
    if heldout:
        write_rows(Path(heldout), [{"prompt": h.question, "category": h.category} for h in held])
    click.echo(f"truthfulqa-seeds: {len(seeds)} seeds ({len({s.category for s in seeds})} categories) -> {out}; "
               f"{len(held)} held out" + (f" -> {heldout}" if heldout else ""))


@cli.command("show")
@click.argument("iteration", required=False)
@click.option("--accepted", "status", flag_value="accepted", help="Accepted records (the default).")
@click.option("--rejected", "status", flag_value="rejected", help="Rejected attempts instead.")
@click.option("--all", "status", flag_value="all", help="Accepted records, then rejected attempts.")
@click.option("--reason", default=None, help="Only attempts rejected for REASON (implies --rejected).")
@click.option("--descends-from", "seed_prefix", default=None, metavar="SEED_ID",
              help="Only items whose lineage reaches this seed (an id prefix works; rejected: via their anchor).")
@click.option("--grep", default=None, metavar="TEXT", help="Only items whose question or answer contains TEXT "
              "(case-insensitive).")
@click.option("--limit", default=None, type=click.IntRange(min=0),
              help="Show at most N items; 0: all  [default: 20; all with --json]")
@click.option("--full", is_flag=True, help="Whole questions and answers, not one truncated line each.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (the full record or rejected "
              "attempt, plus status, iteration and seed_ancestors), no header.")
@click.option("--no-pager", is_flag=True, help="Never page (output is paged only when it goes to a terminal).")
@click.option("--artifacts", default=str(ARTIFACTS), type=click.Path(file_okay=False), show_default=True)
def show_command(iteration: str | None, status: str | None, reason: str | None, seed_prefix: str | None,
                 grep: str | None, limit: int | None, full: bool, as_json: bool, no_pager: bool,
                 artifacts: str) -> None:
    """Browse ITERATION's accepted records or rejected attempts (default: the latest iteration's accepted
    records; 0: the seeds), each with the id `isara lineage` takes: its own, or a rejected attempt's anchor."""
    show_text = _load("show", "show_text")

    if reason is not None and status == "accepted":
        raise click.UsageError("--reason selects rejected attempts; it cannot be combined with --accepted")
    text = guard(show_text, Path(artifacts), iteration, status, reason, seed_prefix, grep, limit, full, as_json)
    if sys.stdout.isatty() and not no_pager and not as_json:
        click.echo_via_pager(text)
    else:
        click.echo(text, nl=False)


def _remote_command(direction: str, what: str):
    """`isara push` and `isara pull`: the same command but for the direction (isara/remote.py says why they exist)."""

    @cli.command(direction, help=f"`dvc {direction}`: {what}. On failure, one line naming the remote, its URL and the "
                 "likely cause (README \"Sharing artifacts: a DVC remote\").")
    @click.argument("targets", nargs=-1)
    @click.option("-r", "--remote", default=None, help="DVC remote name (default: the default remote, core.remote).")
    @click.option("-j", "--jobs", default=None, type=click.IntRange(min=1), help="Parallel transfers (DVC's -j).")
    def command(targets: tuple[str, ...], remote: str | None, jobs: int | None) -> None:
        transfer = _load("remote", "transfer")

        where = guard(transfer, direction, remote, targets, jobs)
        click.echo(f"{direction}: done, {where}")

    return command


push_command = _remote_command("push", "upload the outputs dvc.lock records from the cache to the remote")
pull_command = _remote_command("pull", "download the outputs dvc.lock records from the remote and check them out")


@cli.group()
def params() -> None:
    """Inspect params.yaml."""


@params.command("check")
@click.argument("path", default=str(DEFAULT_PARAMS), type=click.Path(dir_okay=False))
def params_check(path: str) -> None:
    """Validate a params file; exit non-zero naming the bad key and value."""
    p = guard(load_params, path)
    click.echo(f"{path}: ok ({len(p.iterations)} iterations, base model {p.base.model}, seeds {p.seeds.path})")


@cli.command()
@click.argument("record_id")
@click.option("--artifacts", default="artifacts", type=click.Path(file_okay=False), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the ancestor graph as JSON (nodes and edges) instead.")
def lineage(record_id: str, artifacts: str, as_json: bool) -> None:
    """Print the chain of in-context examples from RECORD_ID (or an unambiguous prefix) back to the seeds."""
    lineage_lines, load_all_records, resolve_id, seed_ancestors = _load(
        "lineage", "lineage_lines", "load_all_records", "resolve_id", "seed_ancestors")

    by_id = guard(load_all_records, Path(artifacts))
    record = guard(resolve_id, record_id, by_id)
    if as_json:
        ancestor_graph = _load("lineage", "ancestor_graph")

        click.echo(json.dumps(ancestor_graph(record, by_id), indent=2, ensure_ascii=False))
        return
    for line in lineage_lines(record, by_id):
        click.echo(line)
    click.echo(f"reaches {len(guard(seed_ancestors, record, by_id))} seed(s)")


@cli.command("lineage-graph")
@click.argument("record_id", required=False)
@click.option("--out", "out", default="lineage.dot", type=click.Path(dir_okay=False), show_default=True,
              help="Graphviz DOT file to write; rendered next to it (same name) when `dot` is installed.")
@click.option("--format", "fmt", default="svg", type=click.Choice(["svg", "png", "none"]), show_default=True)
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False), help="Also write the graph as JSON.")
@click.option("--artifacts", default="artifacts", type=click.Path(file_okay=False), show_default=True)
def lineage_graph(record_id: str | None, out: str, fmt: str, json_out: str | None, artifacts: str) -> None:
    """Export the descendants of RECORD_ID (usually a seed; a prefix works) as a picture: Graphviz DOT, plus
    SVG/PNG when Graphviz is available. Without RECORD_ID, the whole lineage graph of every record."""
    descendant_graph, load_all_records, resolve_id, write_dot = _load(
        "lineage", "descendant_graph", "load_all_records", "resolve_id", "write_dot")

    by_id = guard(load_all_records, Path(artifacts))
    root = guard(resolve_id, record_id, by_id).id if record_id else None
    graph = guard(descendant_graph, by_id, root)
    picture = write_dot(graph, Path(out), None if fmt == "none" else fmt)
    if json_out:
        write_json(json_out, graph)
    shown = f"{out} and {picture}" if picture else f"{out} (install Graphviz to render it: dot -Tsvg {out})"
    click.echo(f"{len(graph['nodes'])} records, {len(graph['edges'])} edges: wrote {shown}")


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="isara")


if __name__ == "__main__":
    main()
