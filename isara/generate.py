"""generate stage: M(t-1) writes new QA pairs for D(t) by dual-stage retrieval-augmented ICL (paper §3).

For each attempt: pick an anchor question of D(t-1) at random, retrieve its k nearest neighbours, and let
the model continue a prompt made only of those QA pairs with one new question. Embed the question,
retrieve the k nearest QA pairs to it, and let the model answer it. Filter (isara.filters), and keep
going until n_samples are accepted or max_attempts run out. D(t) = D(t-1) + accepted.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from isara.embed import embed
from isara.filters import duplicate_reason, normalise, text_reason
from isara.index import Retriever
from isara.params import Generate
from isara.paths import iter_paths
from isara.prompts import ANSWER_STOP, QUESTION_STOP, answer_prompt, question_prompt
from isara.records import Neighbour, Record, Sampling, file_sha256, read_records, write_json, write_jsonl

import click

from isara.console import echo_metrics, guard, iteration_argument, prev_option, resolve_prev, stage_params


def load_llama(model_path: Path, n_ctx: int, n_threads: int, seed: int):
    from llama_cpp import Llama

    if not Path(model_path).is_file():
        raise FileNotFoundError(f"{model_path}: model file not found")
    return Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                 seed=seed, verbose=False)


def attempt_seed(base_seed: int, iteration: int, attempt: int, part: int) -> int:
    """One sampling seed per completion, derived (not drawn) so any attempt can be replayed alone."""
    return (base_seed * 1_000_003 + iteration * 100_003 + attempt * 2 + part) % (2**31 - 1)


@dataclass
class GenerationResult:
    accepted: list[Record] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    attempted: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def rejected_by_reason(self) -> Counter:
        return Counter(r["reason"] for r in self.rejected)


def complete(llm, prompt: str, sampling: Sampling, stop: list[str]) -> tuple[str, str, int]:
    out = llm.create_completion(prompt, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                top_p=sampling.top_p, seed=sampling.seed, stop=stop)
    choice = out["choices"][0]
    return choice["text"], choice["finish_reason"], out["usage"]["completion_tokens"]


def generate_samples(llm, model_sha256: str, retriever: Retriever, iteration: int, cfg: Generate,
                     progress: bool = True) -> GenerationResult:
    rng = np.random.default_rng([cfg.seed, iteration])
    known_questions = [r.question for r in retriever.records]
    known_normalised = {normalise(q) for q in known_questions}
    known_vectors = retriever.vectors
    result = GenerationResult()
    start = time.perf_counter()
    bar = tqdm(total=cfg.n_samples, desc=f"generate@{iteration}", unit="sample", disable=not progress)
    for attempt in range(cfg.max_attempts):
        if len(result.accepted) >= cfg.n_samples:
            break
        result.attempted += 1
        anchor = int(rng.integers(len(retriever.records)))
        q_neighbours = retriever.nearest_to_item(anchor, cfg.k_question)
        q_sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_question_tokens,
                              seed=attempt_seed(cfg.seed, iteration, attempt, 0))
        raw_q, _, n_tok = complete(llm, question_prompt(q_neighbours), q_sampling, QUESTION_STOP)
        result.completion_tokens += n_tok
        question = raw_q.strip()
        rejection = {"attempt": attempt, "anchor_id": retriever.records[anchor].id, "raw_question": raw_q,
                     "question": question}
        reason = text_reason(question, None, cfg)
        vector = None
        if reason is None:
            vector = embed([question])[0]
            reason = duplicate_reason(question, vector, known_questions, known_normalised, known_vectors, cfg)
        if reason is not None:
            result.rejected.append({**rejection, "reason": reason})
            bar.set_postfix(attempts=result.attempted, rejected=len(result.rejected))
            continue

        a_neighbours = retriever.nearest_to_vector(vector, cfg.k_answer)
        a_sampling = Sampling(temperature=cfg.answer_temperature, top_p=cfg.top_p, max_tokens=cfg.max_answer_tokens,
                              seed=attempt_seed(cfg.seed, iteration, attempt, 1))
        raw_a, finish, n_tok = complete(llm, answer_prompt(a_neighbours, question), a_sampling, ANSWER_STOP)
        result.completion_tokens += n_tok
        answer = raw_a.strip()
        reason = text_reason(question, answer, cfg)
        if reason is None and finish == "length":
            reason = "answer_truncated"  # cut at max_answer_tokens: an unfinished answer would teach cut-offs
        if reason is not None:
            result.rejected.append({**rejection, "raw_answer": raw_a, "answer": answer, "reason": reason})
            bar.set_postfix(attempts=result.attempted, rejected=len(result.rejected))
            continue

        record = Record(
            iteration=iteration, question=question, answer=answer, anchor_id=retriever.records[anchor].id,
            question_context=[Neighbour(id=r.id, distance=d) for r, d in q_neighbours],
            answer_context=[Neighbour(id=r.id, distance=d) for r, d in a_neighbours],
            model_sha256=model_sha256, question_sampling=q_sampling, answer_sampling=a_sampling,
            raw_question=raw_q, raw_answer=raw_a,
        )
        result.accepted.append(record)
        known_questions.append(question)
        known_normalised.add(normalise(question))
        known_vectors = np.vstack([known_vectors, vector[None, :]])
        bar.update(1)
        bar.set_postfix(attempts=result.attempted, rejected=len(result.rejected))
    bar.close()
    result.seconds = time.perf_counter() - start
    if len(result.accepted) < cfg.n_samples:
        warnings.warn(f"generate@{iteration}: accepted {len(result.accepted)} of {cfg.n_samples} samples within "
                      f"max_attempts={cfg.max_attempts}; see rejected reasons in the metrics", stacklevel=2)
    return result


def generation_metrics(result: GenerationResult, cfg: Generate, prev_size: int) -> dict:
    metrics = {
        "attempted": result.attempted,
        "accepted": len(result.accepted),
        "requested": cfg.n_samples,
        "shortfall": cfg.n_samples - len(result.accepted),
        "acceptance_rate": round(len(result.accepted) / max(result.attempted, 1), 4),
        "rejected": {reason: n for reason, n in sorted(result.rejected_by_reason().items())},
        "dataset_size": prev_size + len(result.accepted),
        "completion_tokens": result.completion_tokens,
        "seconds": round(result.seconds, 2),
        "accepted_per_second": round(len(result.accepted) / max(result.seconds, 1e-9), 4),
    }
    metrics["rejected_total"] = sum(metrics["rejected"].values())
    return metrics


def run_generate(iteration: str, prev: str, cfg: Generate, progress: bool = True) -> dict:
    here, before = iter_paths(iteration), iter_paths(prev)
    retriever = Retriever.load(here.index, before.dataset)
    previous = read_records(before.dataset)
    llm = load_llama(before.gguf, cfg.n_ctx, cfg.n_threads, cfg.seed)
    result = generate_samples(llm, file_sha256(before.gguf), retriever, int(iteration), cfg, progress)
    write_jsonl(here.generated, result.accepted)
    write_jsonl(here.rejected, result.rejected)
    write_jsonl(here.dataset, [*previous, *result.accepted])
    metrics = generation_metrics(result, cfg, len(previous))
    write_json(here.metrics("generate"), metrics)
    return metrics


@click.command("generate")
@iteration_argument
@prev_option
def command(iteration: str, prev: str | None) -> None:
    """generate@ITERATION: M(prev) writes new QA pairs by retrieval-augmented ICL; D(t) = D(prev) + accepted."""
    p = stage_params()
    echo_metrics(f"generate@{iteration}", guard(run_generate, iteration, resolve_prev(iteration, prev), p.generate))
