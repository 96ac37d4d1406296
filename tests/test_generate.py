"""generate on the real SmolLM2 GGUF through llama.cpp and the real MiniLM: records, filters, resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SEEDS, write_seed_subset
from isara.base_models import base_model_path
from isara.records import read_records

pytestmark = pytest.mark.slow

PARAMS = """\
seeds: {path: seeds.jsonl}
iterations: {"1": {prev: "0"}}
index: {n_trees: 4}
generate: {n_samples: 3, max_attempts: 30, k_question: 3, k_answer: 3, max_question_tokens: 48,
           max_answer_tokens: 96, seed: 3}
engine: {kind: sequential, n_ctx: 1024, n_threads: 1}
"""


def use_engine(root, extra: str) -> None:
    """Set more params `engine` keys in root's params.yaml, e.g. "kind: batched, batch_size: 2"."""
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("engine: {kind: sequential, n_ctx: 1024, n_threads: 1}",
                                                 f"engine: {{n_ctx: 1024, n_threads: 1, {extra}}}"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """artifacts/0 (8 seeds, the base GGUF) and index@1, built once with the real CLI: every test's workspace is
    a copy (building it, two processes that load torch and MiniLM, took 16-30 s per test)."""
    root = tmp_path_factory.mktemp("gen") / "built"
    root.mkdir()
    (root / "params.yaml").write_text(PARAMS)
    write_seed_subset(SEEDS / "safety.jsonl", root / "seeds.jsonl", 8)
    (root / "artifacts/0").mkdir(parents=True)
    shutil.copy(base_model_path("smollm2"), root / "artifacts/0/model.gguf")
    for args in (["seeds"], ["index", "1"]):
        cli(root, *args)
    return root


@pytest.fixture(scope="module")
def workspace(built):
    """A fresh copy of `built` at the given path, e.g. workspace(tmp_path / "batched")."""
    return lambda root: Path(shutil.copytree(built, root))


def cli(root, *args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DVC_STAGE", None)
    return subprocess.run([sys.executable, "-m", "isara.cli", *args], cwd=root, env=env, text=True,
                          capture_output=True, check=kw.get("check", True), timeout=kw.get("timeout", 900))


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory):
    root = workspace(tmp_path_factory.mktemp("gen") / "ref")
    cli(root, "generate", "1")
    return root


def test_generated_records_carry_lineage(reference):
    seeds = {r.id for r in read_records(reference / "artifacts/0/dataset.jsonl")}
    generated = read_records(reference / "artifacts/1/generated.jsonl")
    assert len(generated) == 3
    for r in generated:
        assert r.iteration == 1 and set(r.parent_ids()) <= seeds
        assert len(r.question_context) == 3 and len(r.answer_context) == 3
        assert r.raw_question.strip() == r.question and r.raw_answer.strip() == r.answer
        assert r.question_sampling.seed != r.answer_sampling.seed
    dataset = read_records(reference / "artifacts/1/dataset.jsonl")
    assert [r.id for r in dataset][-3:] == [r.id for r in generated]
    assert {r.id for r in dataset[:-3]} == seeds
    assert not (reference / "checkpoints").exists() or not any((reference / "checkpoints").iterdir())


def test_batched_engine_writes_what_the_sequential_one_writes(reference, tmp_path, workspace):
    """The batched engine decodes engine.batch_size attempts together (isara.engines.batched); the reference, one
    completion after another (kind: sequential in PARAMS), must have written the very same records, byte for byte."""
    root = workspace(tmp_path / "batched")
    use_engine(root, "kind: batched")
    cli(root, "generate", "1")
    for name in ("generated.jsonl", "rejected.jsonl", "dataset.jsonl"):
        assert (root / "artifacts/1" / name).read_bytes() == (reference / "artifacts/1" / name).read_bytes(), name


def generate_until_logged(root, **popen):
    """Start `isara generate 1` in root and return (the process, its attempt logs) once the log holds 2 attempts,
    or when it ends or 600 s pass: the moment to kill it (or its server) mid-run."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "isara.cli", "generate", "1"], cwd=root, env=env, **popen)
    deadline = time.time() + 600
    logs = []
    while time.time() < deadline and proc.poll() is None:
        logs = list((root / "checkpoints").glob("generate@1-*.jsonl")) if (root / "checkpoints").exists() else []
        if logs and logs[0].read_text().count("\n") >= 2:
            break
        time.sleep(0.1)
    return proc, logs


def test_killed_generate_resumes_to_identical_records(reference, tmp_path, workspace):
    root = workspace(tmp_path / "killed")
    # The batched engine in batches of 2 attempts: the log grows batch by batch, and neither the kill nor the
    # engine may change the records (the reference ran sequentially).
    use_engine(root, "kind: batched, batch_size: 2")
    proc, logs = generate_until_logged(root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.poll() is None, "generate finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (root / "artifacts/1/generated.jsonl").exists(), "a killed run must not leave outputs"
    done_before = logs[0].read_text().count("\n")

    out = cli(root, "generate", "1").stdout
    resumed = int(re.search(r"resumed_attempts=(\d+)", out).group(1))
    assert resumed >= done_before >= 2, out
    for name in ("generated.jsonl", "rejected.jsonl", "dataset.jsonl"):
        assert (root / "artifacts/1" / name).read_bytes() == (reference / "artifacts/1" / name).read_bytes(), name


ONE_SHOT_ROUND = """\
import sys
from isara.baseline import one_shot_config
from isara.generate import run_generate
from isara.params import DEFAULT_PARAMS, load_params
from isara.paths import baseline_paths, iter_paths
p = load_params(DEFAULT_PARAMS)
prefix = iter_paths("1").attempts if sys.argv[1] == "reuse" else None
m = run_generate("1", "0", one_shot_config(p.generate, 2), False, out=baseline_paths("one_shot"),
                 engine_params=p.engine, prefix_from=prefix)
print(m["reused_attempts"], m["attempted"])
"""


def test_one_shot_round_continues_generate_1s_attempts_to_the_same_records(reference, tmp_path):
    """The one-shot baseline's round (twice the samples, from M0 over D0) made from scratch and made as a
    continuation of generate@1's attempt log write the same bytes; the continuation makes only the attempts
    generate@1 did not (all of its, up to a stance_quota rejection, are reused)."""
    from isara.generate import reusable_prefix

    root = tmp_path / "oneshot"
    shutil.copytree(reference, root)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = lambda mode: subprocess.run([sys.executable, "-c", ONE_SHOT_ROUND, mode], cwd=root, env=env, text=True,  # noqa: E731
                                      capture_output=True, check=True, timeout=900).stdout.split()
    out = root / "artifacts/baselines/one_shot"
    fresh_reused, fresh_attempted = run("fresh")
    fresh = {name: (out / name).read_bytes() for name in ("generated.jsonl", "rejected.jsonl", "dataset.jsonl",
                                                          "attempts.jsonl")}
    reused, attempted = run("reuse")
    for name, data in fresh.items():
        assert (out / name).read_bytes() == data, name
    log = (root / "artifacts/1/attempts.jsonl").read_text().splitlines()
    key = json.loads(log[0])["key"]
    reasons = [(json.loads(line)["rejection"] or {}).get("reason") for line in log[1:]]
    expected = reasons.index("stance_quota") if "stance_quota" in reasons else len(reasons)
    assert (fresh_reused, int(reused)) == ("0", expected) and expected >= 3 and attempted == fresh_attempted
    assert reusable_prefix(root / "artifacts/1/attempts.jsonl", "another key") == []
    assert len(reusable_prefix(root / "artifacts/1/attempts.jsonl", key)) == expected


# ------------------------------------------------------------------ the server engine (isara.engines.server)


def without_backend(path) -> list[dict]:
    """The records of a JSONL file with their backend and id (the content hash that covers it) left out."""
    return [r.model_dump(mode="json", exclude={"id", "backend"}) for r in read_records(path)]


def assert_same_as_reference(root, reference, backend: dict) -> None:
    """The records the sequential in-process engine wrote, now naming `backend`; the rejections byte for byte."""
    assert (root / "artifacts/1/rejected.jsonl").read_bytes() == (reference / "artifacts/1/rejected.jsonl").read_bytes()
    for name in ("generated.jsonl", "dataset.jsonl"):
        assert without_backend(root / "artifacts/1" / name) == without_backend(reference / "artifacts/1" / name), name
    generated = read_records(root / "artifacts/1/generated.jsonl")
    assert generated and all(r.backend.model_dump() == backend for r in generated)
    seeds = read_records(root / "artifacts/0/dataset.jsonl")
    assert read_records(root / "artifacts/1/dataset.jsonl") == [*seeds, *generated]


def test_server_engine_writes_the_sequential_records(reference, tmp_path, workspace):
    """engine.kind server without a url: generate starts llama-cpp-python's server on 127.0.0.1 (no llama-server
    asked for), sends it 4 attempts' requests per round, and stops it. That server completes one request at a time
    from an empty KV cache in the same llama.cpp library, so its completions, and the records, are the in-process
    engine's; each record names its backend."""
    root = workspace(tmp_path / "server")
    use_engine(root, "kind: server, server: llama-cpp-python, batch_size: 4")
    cli(root, "generate", "1")
    assert_same_as_reference(root, reference, {"kind": "server", "server": "llama-cpp-python", "endpoint": None,
                                               "slots": 1})


def start_server(model, port: int, log) -> subprocess.Popen:
    """llama-cpp-python's server (isara's launcher) for `model` on 127.0.0.1:port, once it answers."""
    from urllib.request import urlopen

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "isara.engines.llama_cpp_server", "--model", str(model),
                             "--port", str(port), "--n_ctx", "1024", "--n_threads", "1"], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            with urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start within 120 s")


def test_server_killed_mid_generate_is_a_clear_error_and_the_rerun_resumes(reference, tmp_path, workspace):
    """A server at engine.url (started here, on 127.0.0.1) is SIGKILLed while generate is using it: generate stops
    with one error line naming the endpoint and writes no output; with the server back on the same port, the rerun
    resumes from the attempt log and ends with the records of an uninterrupted run."""
    from isara.engines.server import free_port

    root = workspace(tmp_path / "server-killed")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    use_engine(root, f"kind: server, url: '{url}', slots: 1, batch_size: 2")
    with (tmp_path / "server.log").open("wb") as log:
        server = start_server(root / "artifacts/0/model.gguf", port, log)
        try:
            proc, logs = generate_until_logged(root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert proc.poll() is None, "generate finished before the server could be killed"
            server.send_signal(signal.SIGKILL)
            server.wait()
            out, err = proc.communicate(timeout=120)
        finally:
            if server.poll() is None:
                server.kill()
        assert proc.returncode == 1, (out, err)
        assert f"Error: LLM server {url}/v1/completions: no answer" in err and "Traceback" not in err, err
        assert not (root / "artifacts/1/generated.jsonl").exists(), "a failed run must not leave outputs"
        done_before = logs[0].read_text().count("\n")

        server = start_server(root / "artifacts/0/model.gguf", port, log)  # back, at the same endpoint
        try:
            out = cli(root, "generate", "1").stdout
        finally:
            server.kill()
            server.wait()
    resumed = int(re.search(r"resumed_attempts=(\d+)", out).group(1))
    assert resumed >= done_before >= 2, out
    assert_same_as_reference(root, reference, {"kind": "server", "server": "openai-compatible",
                                               "endpoint": f"{url}/v1/completions", "slots": 1})


def llama_server_binary():
    """llama.cpp's llama-server: $ISARA_LLAMA_SERVER, PATH, or benchmarks/build_llama_server.sh's default output."""
    found = os.environ.get("ISARA_LLAMA_SERVER") or shutil.which("llama-server")
    default = REPO / ".llama-server/bin/llama-server"
    return found or (str(default) if default.is_file() else None)


@pytest.mark.skipif(llama_server_binary() is None, reason="no llama-server (benchmarks/build_llama_server.sh builds it)")
def test_llama_server_with_parallel_slots_generates_records_with_lineage(reference, tmp_path, workspace):
    """llama.cpp's own server with 2 parallel slots, started by generate: the records carry the same lineage and
    name the backend. Their text is not compared with the in-process engine's: llama-server is another build of
    llama.cpp, and slots decoded together share llama_decode calls (README "Reliability and reproducibility")."""
    root = workspace(tmp_path / "llama-server")
    use_engine(root, f"kind: server, server: llama-server, server_binary: '{llama_server_binary()}', slots: 2")
    cli(root, "generate", "1")
    seeds = {r.id for r in read_records(root / "artifacts/0/dataset.jsonl")}
    generated = read_records(root / "artifacts/1/generated.jsonl")
    assert len(generated) == 3
    for r in generated:
        assert r.backend.model_dump() == {"kind": "server", "server": "llama-server", "endpoint": None, "slots": 2}
        assert r.iteration == 1 and set(r.parent_ids()) <= seeds and len(r.answer_context) == 3
        assert r.raw_answer.strip() == r.answer and r.question_sampling.seed != r.answer_sampling.seed


def test_attempt_budget_stops_with_warning_and_metric(tmp_path, workspace):
    root = workspace(tmp_path / "budget")
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("n_samples: 3, max_attempts: 30", "n_samples: 5, max_attempts: 5")
                      .replace("max_answer_tokens: 96", "max_answer_tokens: 8"))  # every answer is cut short
    proc = cli(root, "generate", "1")
    assert "accepted 0 of 5 samples within max_attempts=5" in proc.stderr
    metrics = json.loads((root / "reports/iters/1/generate.json").read_text())
    assert metrics["attempted"] == 5 and metrics["accepted"] == 0 and metrics["shortfall"] == 5
    assert sum(metrics["rejected"].values()) == 5


def test_k_larger_than_the_seed_set_is_a_clear_error(tmp_path, workspace):
    root = workspace(tmp_path / "bigk")
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("k_question: 3", "k_question: 9"))
    proc = cli(root, "generate", "1", check=False)
    assert proc.returncode == 1
    assert "generate.k_question = 9 is larger than the data set it retrieves from (8 records in" in proc.stderr
    assert not (root / "artifacts/1/generated.jsonl").exists()


# ------------------------------------------------------------------ issue 10: domain, stance and balance filters


def generate_with(root, extra: str, **replace):
    """Rerun generate@1 in `root` with extra generate params (e.g. "stance_band: null") and the given replacements
    of PARAMS text; returns (metrics, accepted records, rejected rows)."""
    text = PARAMS.replace("seed: 3}", f"seed: 3, {extra}}}" if extra else "seed: 3}")
    for old, new in replace.items():
        text = text.replace(old, new)
    (root / "params.yaml").write_text(text)
    cli(root, "generate", "1")
    rejected = [json.loads(line) for line in (root / "artifacts/1/rejected.jsonl").read_text().splitlines()]
    return (json.loads((root / "reports/iters/1/generate.json").read_text()),
            read_records(root / "artifacts/1/generated.jsonl"), rejected)


def seed_stances(root) -> dict[str, str]:
    from isara.judges import is_refusal

    return {r.id: "declines" if is_refusal(r.answer) else "complies"
            for r in read_records(root / "artifacts/0/dataset.jsonl")}


def test_default_filters_are_recorded_and_hold(reference):
    """Defaults: out_of_domain against D(t-1) at the seeds' own threshold, stance consistency, stance band 0.15,
    string matching (no judge stage here). Every accepted record carries its stance and obeys every filter."""
    import numpy as np

    from isara.filters import majority_stance, seed_far_distance

    metrics = json.loads((reference / "reports/iters/1/generate.json").read_text())
    filters = metrics["filters"]
    vectors = np.load(reference / "artifacts/1/index/embeddings.npy")  # D0 = the 8 seeds
    assert filters["out_of_domain"] == "data" and filters["stance_judge"] == "strmatch"
    assert filters["out_of_domain_distance"] == pytest.approx(seed_far_distance(vectors), abs=1e-6)
    stances = seed_stances(reference)
    share0 = sum(s == "declines" for s in stances.values()) / len(stances)
    assert filters["declining_share0"] == pytest.approx(share0, abs=1e-4)
    generated = read_records(reference / "artifacts/1/generated.jsonl")
    for r in generated:
        assert min(n.distance for n in r.answer_context) <= filters["out_of_domain_distance"]
        assert majority_stance([stances[n.id] for n in r.answer_context]) in (None, r.stance)
    assert filters["accepted_stance"][generated[0].stance] == sum(r.stance == generated[0].stance for r in generated)
    for stance, quota in filters["stance_quota"].items():
        assert filters["accepted_stance"][stance] <= quota


def test_out_of_domain_rejects_with_a_tight_threshold_and_not_with_a_huge_one(tmp_path, workspace):
    root = workspace(tmp_path / "domain")
    metrics, generated, rejected = generate_with(
        root, "out_of_domain_distance: 0.05", **{"n_samples: 3, max_attempts: 30": "n_samples: 3, max_attempts: 6"})
    assert metrics["attempted"] == 6 and generated == []
    far = [r for r in rejected if r["reason"] == "out_of_domain"]
    assert far and metrics["rejected"]["out_of_domain"] == len(far)
    for row in far:  # rejected before answering, with the distance that decided it
        assert row["nearest_distance"] > row["out_of_domain_distance"] == 0.05 and "answer" not in row
    assert metrics["filters"]["out_of_domain_distance"] == 0.05

    metrics, _, rejected = generate_with(  # the same 6 attempts, against D0 only, with the loosest threshold
        root, "out_of_domain: seeds, out_of_domain_distance: 2.0",
        **{"n_samples: 3, max_attempts: 30": "n_samples: 3, max_attempts: 6"})
    assert "out_of_domain" not in metrics["rejected"] and metrics["filters"]["out_of_domain"] == "seeds"
    assert metrics["accepted"] + sum(1 for r in rejected if "answer" in r) > 0  # answered this time


# The stance filters off, with the domain filter off and no repeat penalty: the old records, and the answers the
# tests below hand to a judge. Shared: one run of the 135M model instead of one per test.
STANCE_OFF = "out_of_domain: off, stance_band: null, answer_repeat_penalty: 1.0"
STANCE_BUDGET = {"n_samples: 3, max_attempts: 30": "n_samples: 4, max_attempts: 12"}


@pytest.fixture(scope="module")
def stance_off(workspace, tmp_path_factory):
    root = workspace(tmp_path_factory.mktemp("stance") / "off")
    return root, *generate_with(root, STANCE_OFF + ", stance_consistency: false", **STANCE_BUDGET)


def judge_singling_out(root, generated):
    """Write into root's judge folder a learned judge that calls one of `generated`'s first answers complying and
    every seed answer declining; returns (the judge, that record).

    Which stance the 135M model samples depends on the CPU's llama.cpp kernels (a seed picked on one machine sampled
    only refusals on another), so the stance filters are tested against a judge fitted to what this machine
    sampled: a head on the answer's embedding, thresholded halfway between the chosen answer (cosine 1) and the
    seed answer most like it. Every attempt is seeded on its own, so the chosen answer comes back in the rerun."""
    import numpy as np

    from isara.embed import EMBED_DIM
    from isara.judges import DEFAULT_HEAD_CHARS, JUDGE_FILE, LEARNED_FILE, N_FEATURES, LearnedJudge, _features

    seeds = read_records(root / "artifacts/0/dataset.jsonl")
    seed_x = _features([s.question for s in seeds], [s.answer for s in seeds], DEFAULT_HEAD_CHARS)
    for record in generated[:3]:  # the quota test asks for 3: the chosen one must come before the round is full
        direction = np.zeros(N_FEATURES)
        direction[EMBED_DIM:2 * EMBED_DIM] = _features([record.question], [record.answer],
                                                       DEFAULT_HEAD_CHARS)[0, EMBED_DIM:2 * EMBED_DIM]
        nearest = float((seed_x @ direction).max())
        if nearest < 0.99:  # not a copy of a seed answer
            break
    else:
        pytest.fail(f"the first answers all copy a seed answer: {[r.answer for r in generated[:3]]}")
    scale = 20.0 / (1.0 - nearest)  # logit +10 at the nearest seed answer, -10 at the chosen answer
    judge = LearnedJudge(-scale * direction, scale * (1.0 + nearest) / 2)
    judge_dir = root / "artifacts/judge"
    judge_dir.mkdir(parents=True, exist_ok=True)
    judge.save(judge_dir / LEARNED_FILE)
    (judge_dir / JUDGE_FILE).write_text(json.dumps({"learned": True, "learned_agreement": 0.95,
                                                    "strmatch_agreement": 0.9}))
    judge = LearnedJudge.load(judge_dir / LEARNED_FILE)  # as generate reads it (float32 weights)
    assert judge.predict_refusal([s.question for s in seeds], [s.answer for s in seeds]) == [True] * len(seeds)
    assert judge.predict_refusal([record.question], [record.answer]) == [False]
    return judge, record


def test_stance_consistency_rejects_mismatches_and_off_means_the_old_records(stance_off, tmp_path):
    """With the stance filters and the domain filter off, records carry no stance (the pre-issue-10 records);
    with stance consistency on, the answers that contradict their examples' majority are rejected."""
    from isara.filters import majority_stance

    off_root, metrics, generated, rejected = stance_off
    raw = (off_root / "artifacts/1/generated.jsonl").read_text()
    assert generated and '"stance"' not in raw and '"stance"' not in (off_root / "artifacts/1/rejected.jsonl").read_text()
    assert metrics["filters"] == {"out_of_domain": "off"}
    off_ids = {r.id for r in generated}

    root = tmp_path / "on"
    shutil.copytree(off_root, root)
    judge, complying = judge_singling_out(root, generated)
    stances = {s.id: "declines" for s in read_records(root / "artifacts/0/dataset.jsonl")}  # checked by the judge
    metrics, generated, rejected = generate_with(root, STANCE_OFF, **STANCE_BUDGET)
    assert metrics["filters"]["stance_judge"] == "learned"
    mismatched = [r for r in rejected if r["reason"] == "stance_mismatch"]
    assert complying.question in [r["question"] for r in mismatched]
    for row in mismatched:
        assert majority_stance(row["example_stances"]) not in (None, row["stance"])
        assert judge.predict_refusal([row["question"]], [row["answer"]]) == [row["stance"] == "declines"]
    for r in generated:
        assert r.stance is not None and majority_stance([stances[n.id] for n in r.answer_context]) in (None, r.stance)
    assert off_ids != {r.id for r in generated}


def test_stance_quota_holds_with_the_learned_judge(stance_off, tmp_path):
    """stance_band 0: the round keeps D0's declining share exactly (here the judge calls all 8 seeds declining: no
    complying answer is accepted), judged by a learned judge from the judge stage's folder."""
    off_root, _, off_generated, _ = stance_off
    root = tmp_path / "quota"
    shutil.copytree(off_root, root)
    _, complying = judge_singling_out(root, off_generated)
    metrics, generated, rejected = generate_with(
        root, "out_of_domain: off, stance_consistency: false, stance_band: 0.0, answer_repeat_penalty: 1.0",
        **{"max_attempts: 30": "max_attempts: 12"})
    filters = metrics["filters"]
    assert filters["stance_judge"] == "learned" and filters["declining_share0"] == 1.0
    assert filters["stance_quota"] == {"declines": 3, "complies": 0}
    assert all(r.stance == "declines" for r in generated)
    quota = [r for r in rejected if r["reason"] == "stance_quota"]
    assert complying.question in [r["question"] for r in quota] and all(r["stance"] == "complies" for r in quota)
    assert metrics["rejected"]["stance_quota"] == len(quota)
