"""Shared fixtures: an isolated DVC project in a temp git repo, built from this checkout's code."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SEEDS = REPO / "data" / "seeds"
# The public benchmark files for the tests that need them: $ISARA_BENCHMARKS_DIR, else the workspace's copy beside
# this checkout (CI lays it there). The pipeline itself never looks there unless params benchmarks.dir says so.
SHARED_BENCHMARKS = Path(os.environ.get("ISARA_BENCHMARKS_DIR") or REPO.parent / "shared" / "data" / "benchmarks")


def isolated_env(home: Path) -> dict[str, str]:
    """No user git/DVC config, no analytics, a private DVC site cache: tests never touch the real ones."""
    env = dict(os.environ)
    env.update({
        "HOME": str(home),
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(home / "dvc-site-cache"),
        "GIT_AUTHOR_NAME": "isara-test", "GIT_AUTHOR_EMAIL": "test@isara.invalid",
        "GIT_COMMITTER_NAME": "isara-test", "GIT_COMMITTER_EMAIL": "test@isara.invalid",
        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
    })
    env.pop("DVC_STAGE", None)
    return env


# One command of a test project (the tiny `dvc repro` takes about 4 min on 2 cores): far above that is a hang.
COMMAND_TIMEOUT = 1500


class Project:
    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env

    def run(self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        # Own process group: on a timeout the stages dvc started go too, not only dvc itself.
        with subprocess.Popen(list(args), cwd=self.root, env=self.env, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, start_new_session=True) as child:
            try:
                out, err = child.communicate(timeout=timeout)
            except BaseException as e:  # a hang, or Ctrl-C (which the group no longer hears from the terminal)
                os.killpg(child.pid, signal.SIGKILL)
                if not isinstance(e, subprocess.TimeoutExpired):
                    raise
                out, err = child.communicate()
                raise AssertionError(f"{' '.join(args)} still running after {timeout:.0f} s:\n{out}\n{err}") from None
        if check and child.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({child.returncode}):\n{out}\n{err}")
        return subprocess.CompletedProcess(list(args), child.returncode, out, err)

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args, check=check)

    def isara(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "isara.cli", *args, check=check)

    def json(self, rel: str):
        return json.loads((self.root / rel).read_text())


def write_seed_subset(src: Path, dst: Path, n: int) -> None:
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()][:n]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")


TINY_PARAMS = """\
seeds: {path: data/seeds/tiny.jsonl}
base: {model: smollm2, format: auto}
iterations:
  "1": {prev: "0"}
  "2": {prev: "1"}
index: {n_trees: 4, seed: 0}
generate:
  n_samples: 2
  max_attempts: 40
  k_question: 3
  k_answer: 3
  max_question_tokens: 48
  max_answer_tokens: 96
  seed: 0
engine: {n_ctx: 1024}
finetune: {max_steps: 1, batch_size: 4, max_length: 128, epochs: 1}
export: {outtype: q8_0}
datacard: {n_examples: 2}
benchmarks: {dir: null}
judge: {seed: 0}
evaluate: {limit: 2, max_tokens: 8, k_icl: 2}
truthfulqa: {limit: 2}
package: {num_predict: 64}
"""


def make_project(root: Path, params: str = TINY_PARAMS, n_seeds: int = 8) -> Project:
    """A fresh git + DVC repo holding this checkout's pipeline code and tiny seed sets."""
    root.mkdir(parents=True)
    for name in ("isara", "stages"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(params)
    shutil.copytree(REPO / "data" / "eval", root / "data" / "eval")
    write_seed_subset(SEEDS / "safety.jsonl", root / "data/seeds/tiny.jsonl", n_seeds)
    write_seed_subset(SEEDS / "safety_alt.jsonl", root / "data/seeds/tiny_alt.jsonl", n_seeds)
    (root / ".gitignore").write_text("__pycache__/\n")
    home = root.parent / f"{root.name}-home"
    home.mkdir()
    project = Project(root, isolated_env(home))
    project.run("git", "init", "-q", "-b", "main")
    project.dvc("init", "-q")
    project.dvc("config", "core.analytics", "false")
    # Hard links instead of a second copy of every checkpoint in the cache (with copies the tiny project alone
    # held 8.9 GB). DVC makes linked outputs read-only, and removes them before a stage reruns.
    project.dvc("config", "cache.type", "hardlink,copy")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "tiny isara project")
    return project


def stages_run(output: str) -> set[str]:
    """Names of the stages `dvc repro` actually ran (not the ones it skipped or restored)."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Project:
    """The tiny pipeline reproduced once: 8 seeds, 2 iterations, 2 samples each, 1 training step."""
    project = make_project(tmp_path_factory.mktemp("pipeline") / "repo")
    project.repro = project.dvc("repro")
    return project


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory) -> Path:
    """The bundled SmolLM2 GGUF prepared as a transformers checkpoint (prepare_base), once for every module that
    reads it; nothing may write into it."""
    from isara.base_models import base_model_path
    from isara.prepare import prepare_base

    out = tmp_path_factory.mktemp("smollm2") / "hf"
    prepare_base(base_model_path("smollm2"), out)
    return out


def pytest_collection_modifyitems(config, items):
    """Tests marked `mutates_tiny_project` change the shared tiny project: run them after every other test."""
    items.sort(key=lambda item: item.get_closest_marker("mutates_tiny_project") is not None)


def llama_logprobs(gguf_path: Path, text: str, ids: list[int]):
    """(llama.cpp's own token ids for `text`, its next-token log-probs at every position of `ids`), from an f32 KV
    cache (llama.cpp's default f16 one alone moves log-probs by ~1e-2), for parity with transformers."""
    import numpy as np
    import torch

    from isara.engines.llama import open_llama

    llm = open_llama(gguf_path, logits_all=True, n_ctx=256, n_threads=2, seed=0, type_k=0, type_v=0)  # 0 = F32
    try:
        own = llm.tokenize(text.encode(), add_bos=True, special=False)
        llm.reset()
        llm.eval(ids)
        scores = torch.tensor(np.asarray(llm.scores[: len(ids)]), dtype=torch.float64)
        return own, torch.log_softmax(scores, -1).numpy()
    finally:
        llm.close()
