"""generate stage: M(t-1) writes new QA pairs for D(t) by dual-stage retrieval-augmented ICL (paper §3).

For each attempt: pick an anchor question of D(t-1) at random, retrieve its k nearest neighbours, and let
the model continue a prompt made only of those QA pairs with one new question. Embed the question,
retrieve the k nearest QA pairs to it, and let the model answer it. Filter (isara.filters), and keep
going until n_samples are accepted or max_attempts run out. D(t) = D(t-1) + accepted.

Issue 10's filters keep the data in the seeds' domain and behaviour, using nothing but the seeds (no reward
model, no instruction); each is a param, and `Levers` holds what they need, prepared once per run:

- out_of_domain (generate.out_of_domain, .out_of_domain_distance): a question whose nearest example in D(t-1)
  (or in D0) is farther than the seeds lie from each other is rejected before it is answered;
- stance_mismatch (generate.stance_consistency): the answer's stance (declines / complies, by the judge evaluate
  uses, generate.stance_judge) must be the majority stance of the k_answer examples it was prompted with;
- stance_quota (generate.stance_band): each round's declining share stays within D0's share +- the band.
Every accepted record carries its stance (Record.stance); rejections carry their distance or stances.

The completions come from the engine params `engine` choose (isara.engines). An engine that works on several
requests at once (engine.kind batched: batch_size sequences per llama_decode; server: a server's parallel slots)
gets its `width` of attempts per round, which are decided one by one in order afterwards (run_attempts), so the
records are those of the one-by-one loop whenever the engine returns the same completions (batched does, as
llama-cpp-python's server that isara starts does; tests/test_generate.py compares them byte for byte). Records
from a server name it (Record.backend).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from isara.embed import embed
from isara.engines import open_engine
from isara.filters import (
    domain_reason,
    duplicate_reason,
    nearest_distance,
    normalise,
    seed_far_distance,
    stance_mismatch_reason,
    stance_of,
    stance_quota_reason,
    stance_quotas,
    text_reason,
)
from isara.io import atomic_write_text, write_json, write_jsonl
from isara.judges import StanceJudge
from isara.params import Engine as EngineParams
from isara.params import Generate, ParamsError
from isara.paths import CHECKPOINTS, JUDGE, IterPaths, iter_paths
from isara.prompts import ANSWER_STOP, QUESTION_STOP, answer_prompt, question_prompt
from isara.records import (
    Backend,
    Neighbour,
    Record,
    Sampling,
    file_sha256,
    read_records,
)
from isara.retrieval import Retriever


def attempt_seed(base_seed: int, iteration: int, attempt: int, part: int) -> int:
    """One sampling seed per completion, derived (not drawn) so any attempt can be replayed alone."""
    return (base_seed * 1_000_003 + iteration * 100_003 + attempt * 2 + part) % (2**31 - 1)


@dataclass
class Levers:
    """Issue 10's filters for one run: what they compare against, fixed before the first attempt.

    The defaults are all off (the filters before issue 10). `accepted` counts the stances accepted so far in
    this run (the quota's state); generate_samples updates it as it accepts, replayed records included."""

    domain: str = "off"  # generate.out_of_domain: "data" (nearest in D(t-1)), "seeds" (nearest in D0) or "off"
    domain_threshold: float | None = None
    seed_vectors: np.ndarray | None = None  # D0's question vectors, for domain "seeds"
    judge: StanceJudge | None = None  # None: answers get no stance (both stance filters off)
    example_stances: dict[str, str] = field(default_factory=dict)  # record id of D(t-1) -> its answer's stance
    consistency: bool = False
    declining_share0: float | None = None  # D0's declining share, by the same judge
    quotas: dict[str, int] | None = None  # stance -> most accepted answers of it (isara.filters.stance_quotas)
    accepted: Counter = field(default_factory=Counter)

    def nearest_distance(self, vector: np.ndarray, neighbours: list[tuple[Record, float]]) -> float:
        """The new question's distance to the nearest example of the reference set: the answer retrieval's own
        (Annoy) distance for D(t-1), an exact one over the seeds' vectors for D0."""
        if self.domain == "seeds":
            return nearest_distance(vector, self.seed_vectors)
        return min(d for _, d in neighbours)

    def fingerprint(self) -> str:
        """What of the levers the params do not name (the learned judge's weights): part of the checkpoint name."""
        if self.judge is None or self.judge.learned is None:
            return self.judge.name if self.judge else ""
        return "learned:" + hashlib.sha256(np.asarray(self.judge.learned.weights).tobytes()).hexdigest()

    def metrics(self) -> dict:
        out: dict = {"out_of_domain": self.domain}
        if self.domain_threshold is not None:
            out["out_of_domain_distance"] = round(self.domain_threshold, 6)
        if self.judge is not None:
            n = sum(self.accepted.values())
            out["stance_judge"] = self.judge.name
            out["declining_share0"] = round(self.declining_share0, 4)
            out["accepted_stance"] = {"declines": self.accepted["declines"], "complies": self.accepted["complies"]}
            out["declining_share"] = round(self.accepted["declines"] / n, 4) if n else None
            if self.quotas is not None:
                out["stance_quota"] = dict(self.quotas)
        return out


def prepare_levers(cfg: Generate, retriever: Retriever, judge_dir: Path = JUDGE) -> Levers:
    """The filters' references from D(t-1) (retriever.records; its seeds are D0) and the judge stage's folder."""
    seeds = [i for i, r in enumerate(retriever.records) if r.is_seed]
    levers = Levers(domain=cfg.out_of_domain, consistency=cfg.stance_consistency)
    if cfg.out_of_domain != "off":
        seed_vectors = retriever.vectors[seeds]
        levers.domain_threshold = (cfg.out_of_domain_distance if cfg.out_of_domain_distance is not None
                                   else seed_far_distance(seed_vectors))
        levers.seed_vectors = seed_vectors
    if cfg.labels_stance:
        levers.judge = StanceJudge.load(cfg.stance_judge, judge_dir)
        records = retriever.records
        declines = levers.judge.declines([r.question for r in records], [r.answer for r in records])
        levers.example_stances = {r.id: stance_of(d) for r, d in zip(records, declines)}
        if not seeds:
            raise ValueError("the stance filters need D0's answers, and the data set holds no seeds")
        levers.declining_share0 = float(np.mean([declines[i] for i in seeds]))
        if cfg.stance_band is not None:
            levers.quotas = stance_quotas(cfg.n_samples, levers.declining_share0, cfg.stance_band)
    return levers


@dataclass
class GenerationResult:
    accepted: list[Record] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    attempted: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    resumed_attempts: int = 0
    reused_attempts: int = 0
    carried_accepted: int = 0  # accepted by resumed or reused attempts, outside `seconds`
    levers: Levers = field(default_factory=Levers)
    outcomes: list[Outcome] = field(default_factory=list)  # every attempt's, in order: the attempt log

    def rejected_by_reason(self) -> Counter:
        return Counter(r["reason"] for r in self.rejected)


@dataclass
class Outcome:
    """What one attempt produced: an accepted record (with its question embedding) or a rejection."""

    attempt: int
    completion_tokens: int
    record: Record | None = None
    vector: list[float] | None = None
    rejection: dict | None = None

    def to_json(self) -> str:
        return json.dumps({"attempt": self.attempt, "completion_tokens": self.completion_tokens,
                           "record": self.record.model_dump(mode="json") if self.record else None,
                           "vector": self.vector, "rejection": self.rejection}, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> "Outcome":
        row = json.loads(line)
        record = Record.model_validate(row["record"]) if row["record"] else None
        return cls(row["attempt"], row["completion_tokens"], record, row["vector"], row["rejection"])


class KnownQuestions:
    """Every question already in the data: D(t-1) plus what this run accepted. New ones must not repeat them."""

    def __init__(self, questions: list[str], vectors: np.ndarray):
        self.questions = list(questions)
        self.normalised = {normalise(q) for q in questions}
        self.vectors = vectors

    def add(self, question: str, vector: np.ndarray) -> None:
        self.questions.append(question)
        self.normalised.add(normalise(question))
        self.vectors = np.vstack([self.vectors, np.asarray(vector, dtype=np.float32)[None, :]])

    def duplicate_reason(self, question: str, vector: np.ndarray, cfg: Generate) -> str | None:
        return duplicate_reason(question, vector, self.questions, self.normalised, self.vectors, cfg)


def run_attempts(engine, model_sha256: str, retriever: Retriever, known: KnownQuestions, iteration: int,
                 first: int, anchors: list[int], cfg: Generate, levers: Levers | None = None):
    """Dual-stage attempts first, first+1, ... (one per anchor): all questions in one batch, then the answers
    of the questions that pass the filters in a second. Yields one Outcome per attempt, in order, each decided
    only when the caller asks for it, so that `known` then includes what the caller accepted before (exactly
    the decisions one attempt after another would make: every completion has its own seed and empty cache).
    The same holds for `levers.accepted`, the stance quota's state. Out-of-domain questions are not answered."""
    levers = levers or Levers()
    q_neighbours = [retriever.nearest_to_item(a, cfg.k_question) for a in anchors]
    q_sampling = [Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_question_tokens,
                           seed=attempt_seed(cfg.seed, iteration, first + i, 0)) for i in range(len(anchors))]
    q_out = engine.complete_many([(question_prompt(n), s, QUESTION_STOP) for n, s in zip(q_neighbours, q_sampling)])
    questions = [raw.strip() for raw, _, _ in q_out]
    text_reasons = [text_reason(q, None, cfg) for q in questions]
    vectors = [embed([q])[0] if r is None else None for q, r in zip(questions, text_reasons)]
    # Screen against the questions known now; ones accepted earlier in this batch are checked again below.
    screened = [i for i, v in enumerate(vectors)
                if v is not None and known.duplicate_reason(questions[i], v, cfg) is None]
    a_neighbours = {i: retriever.nearest_to_vector(vectors[i], cfg.k_answer) for i in screened}
    distance = {i: levers.nearest_distance(vectors[i], a_neighbours[i]) for i in screened}
    to_answer = [i for i in screened if domain_reason(distance[i], levers.domain_threshold) is None]
    a_sampling = {i: Sampling(temperature=cfg.answer_temperature, top_p=cfg.top_p, max_tokens=cfg.max_answer_tokens,
                              repeat_penalty=cfg.answer_repeat_penalty,
                              seed=attempt_seed(cfg.seed, iteration, first + i, 1)) for i in to_answer}
    a_out = dict(zip(to_answer, engine.complete_many(
        [(answer_prompt(a_neighbours[i], questions[i]), a_sampling[i], ANSWER_STOP) for i in to_answer])))

    for i, anchor in enumerate(anchors):
        raw_q, _, tokens = q_out[i]
        question, vector = questions[i], vectors[i]
        rejection = {"attempt": first + i, "anchor_id": retriever.records[anchor].id, "raw_question": raw_q,
                     "question": question}
        reason = text_reasons[i] or known.duplicate_reason(question, vector, cfg)
        if reason is not None:
            yield Outcome(first + i, tokens, rejection={**rejection, "reason": reason})
            continue
        reason = domain_reason(distance[i], levers.domain_threshold)
        if reason is not None:  # not answered: the retrieval's distance and the threshold explain it
            yield Outcome(first + i, tokens, rejection={**rejection, "reason": reason, "nearest_distance": distance[i],
                                                        "out_of_domain_distance": levers.domain_threshold})
            continue
        raw_a, finish, n_tok = a_out[i]
        tokens += n_tok
        answer = raw_a.strip()
        stance = None
        if levers.judge is not None and answer:  # one answer at a time: the same label in every engine
            stance = stance_of(levers.judge.declines([question], [answer])[0])
            rejection["stance"] = stance
        reason = text_reason(question, answer, cfg)
        if reason is None and finish == "length":
            reason = "answer_truncated"  # cut at max_answer_tokens: an unfinished answer would teach cut-offs
        if reason is None and stance is not None:
            examples = [levers.example_stances[r.id] for r, _ in a_neighbours[i]]
            if levers.consistency:
                reason = stance_mismatch_reason(stance, examples)
                if reason is not None:
                    rejection["example_stances"] = examples
            reason = reason or stance_quota_reason(stance, levers.accepted, levers.quotas)
        if reason is not None:
            yield Outcome(first + i, tokens, rejection={**rejection, "raw_answer": raw_a, "answer": answer,
                                                        "reason": reason})
            continue
        record = Record(
            iteration=iteration, question=question, answer=answer, anchor_id=retriever.records[anchor].id,
            question_context=[Neighbour(id=r.id, distance=d) for r, d in q_neighbours[i]],
            answer_context=[Neighbour(id=r.id, distance=d) for r, d in a_neighbours[i]],
            model_sha256=model_sha256, question_sampling=q_sampling[i], answer_sampling=a_sampling[i],
            raw_question=raw_q, raw_answer=raw_a, stance=stance, backend=getattr(engine, "backend", None),
        )
        yield Outcome(first + i, tokens, record=record, vector=[float(x) for x in vector])


class Checkpoint:
    """Append-only log of attempt outcomes, so a killed generate resumes where it stopped.

    It lives outside DVC's outputs (DVC deletes those before rerunning a stage) and its name hashes
    everything the outcomes depend on, so a run with other params, model or data never reuses it.
    """

    def __init__(self, path: Path | None):
        self.path = path

    def load(self) -> list[Outcome]:
        if self.path is None or not self.path.exists():
            return []
        outcomes = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                outcomes.append(Outcome.from_json(line))
            except (json.JSONDecodeError, KeyError, ValueError):
                break  # a line cut by the kill: everything before it is sound
        return outcomes

    def append(self, outcome: Outcome) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(outcome.to_json() + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def generate_samples(engine, model_sha256: str, retriever: Retriever, iteration: int, cfg: Generate,
                     progress: bool = True, checkpoint: Checkpoint | None = None,
                     levers: Levers | None = None, prefix: list[Outcome] = ()) -> GenerationResult:
    """levers None: prepared from cfg (prepare_levers, the judge stage's artifacts/judge for a learned judge).
    prefix: outcomes of the same round with a smaller n_samples (reusable_prefix), taken as this round's first
    attempts when there is no checkpoint to resume from."""
    checkpoint = checkpoint or Checkpoint(None)
    levers = levers if levers is not None else prepare_levers(cfg, retriever)
    rng = np.random.default_rng([cfg.seed, iteration])
    known = KnownQuestions([r.question for r in retriever.records], retriever.vectors)
    result = GenerationResult(levers=levers)
    bar = tqdm(total=cfg.n_samples, desc=f"generate@{iteration}", unit="sample", disable=not progress)

    def apply(outcome: Outcome) -> None:
        result.outcomes.append(outcome)
        result.attempted += 1
        result.completion_tokens += outcome.completion_tokens
        if outcome.record is not None:
            result.accepted.append(outcome.record)
            known.add(outcome.record.question, np.asarray(outcome.vector, dtype=np.float32))
            if outcome.record.stance is not None:
                levers.accepted[outcome.record.stance] += 1
            bar.update(1)
        else:
            result.rejected.append(outcome.rejection)
        bar.set_postfix(attempts=result.attempted, rejected=len(result.rejected))

    resumed = checkpoint.load()
    for outcome in resumed:
        rng.integers(len(retriever.records))  # replay the anchor draw this attempt consumed
        apply(outcome)
    result.resumed_attempts = result.attempted
    for outcome in prefix if not resumed else ():
        if len(result.accepted) >= cfg.n_samples or result.attempted >= cfg.max_attempts:
            break
        rng.integers(len(retriever.records))
        checkpoint.append(outcome)
        apply(outcome)
        result.reused_attempts += 1
    result.carried_accepted = len(result.accepted)
    start = time.perf_counter()
    while len(result.accepted) < cfg.n_samples and result.attempted < cfg.max_attempts:
        # Attempts this round: no more than samples are still missing, since attempts past the last needed sample
        # are thrown away (a 16-wide round for 2 missing samples made up to 14 for nothing in the tiny test projects).
        width = min(getattr(engine, "width", 1), cfg.max_attempts - result.attempted,
                    cfg.n_samples - len(result.accepted))
        anchors = [int(rng.integers(len(retriever.records))) for _ in range(width)]
        for outcome in run_attempts(engine, model_sha256, retriever, known, iteration, result.attempted, anchors, cfg,
                                    levers):
            if len(result.accepted) >= cfg.n_samples:
                break  # attempts past the last needed sample are dropped, as if never made
            checkpoint.append(outcome)
            apply(outcome)
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
        "resumed_attempts": result.resumed_attempts,
        "reused_attempts": result.reused_attempts,
        "accepted_per_second": round((len(result.accepted) - result.carried_accepted) / max(result.seconds, 1e-9), 4),
    }
    metrics["rejected_total"] = sum(metrics["rejected"].values())
    metrics["filters"] = result.levers.metrics()
    return metrics


def checkpoint_path(iteration: str, cfg: Generate, model_sha: str, dataset: Path, index_dir: Path,
                    levers: Levers | None = None, backend: Backend | None = None) -> Path:
    """backend: the engine's (a server's; None in process, whose engines all return the same completions)."""
    key = round_key(cfg, model_sha, dataset, index_dir, levers, backend, with_sizes=True)
    return CHECKPOINTS / f"generate@{iteration}-{key[:16]}.jsonl"


def round_key(cfg: Generate, model_sha: str, dataset: Path, index_dir: Path, levers: Levers | None = None,
              backend: Backend | None = None, with_sizes: bool = False, seed_iteration: int | None = None) -> str:
    """A hash of everything a round's attempt outcomes depend on; without n_samples and max_attempts unless
    with_sizes (a round that only asks for more samples makes the same attempts: reusable_prefix), and with the
    iteration its seeds derive from when given (attempt_seed)."""
    h = hashlib.sha256()
    h.update(cfg.model_dump_json(exclude=None if with_sizes else {"n_samples", "max_attempts"}).encode())
    if seed_iteration is not None:
        h.update(f"seed iteration {seed_iteration}".encode())
    if backend is not None:
        h.update(backend.model_dump_json().encode())
    if levers is not None and levers.fingerprint():
        h.update(levers.fingerprint().encode())
    h.update(model_sha.encode())
    h.update(file_sha256(dataset).encode())
    h.update((index_dir / "ids.json").read_bytes())
    return h.hexdigest()


def write_attempts(path: Path, key: str, outcomes: list[Outcome]) -> None:
    atomic_write_text(path, "".join([json.dumps({"key": key}) + "\n", *(o.to_json() + "\n" for o in outcomes)]))


def reusable_prefix(path: Path, key: str) -> list[Outcome]:
    """The outcomes of the attempt log at `path` that a round with the same round_key and at least as many
    n_samples would make itself: every attempt draws its anchor and seeds from its number alone, and each filter
    decides the same given the same earlier outcomes, except the stance quota, which grows with n_samples, so
    the prefix ends before the log's first stance_quota rejection. [] when the log is missing or its key differs
    (other params, model, data or engine)."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or json.loads(lines[0]).get("key") != key:
        return []
    prefix = []
    for line in lines[1:]:
        outcome = Outcome.from_json(line)
        if outcome.rejection is not None and outcome.rejection["reason"] == "stance_quota":
            break
        prefix.append(outcome)
    return prefix


def check_k(cfg: Generate, n_records: int, dataset: Path) -> None:
    """Retrieval cannot return more neighbours than the data holds; fewer would silently shrink every prompt."""
    for key in ("k_question", "k_answer"):
        k = getattr(cfg, key)
        if k > n_records:
            raise ParamsError(f"params.yaml: generate.{key} = {k} is larger than the data set it retrieves from "
                              f"({n_records} records in {dataset})")


def run_generate(iteration: str, prev: str, cfg: Generate, progress: bool = True, out: IterPaths | None = None,
                 engine_params: EngineParams | None = None, prefix_from: Path | None = None) -> dict:
    """generate@t: M(prev) and index@t over D(prev) -> D(t) = D(prev) + the accepted records.

    `out`: where the records, the metrics and the attempt logs go (default: iteration t's). The one-shot
    baseline (isara.baseline.run_one_shot) is this same round from M0, in artifacts/baselines/one_shot, asking for
    more samples: `prefix_from` names generate@t's attempt log, whose attempts it then need not make again."""
    here, before = iter_paths(iteration), iter_paths(prev)
    out = out or here
    retriever = Retriever.load(here.index, before.dataset)
    check_k(cfg, len(retriever.records), before.dataset)
    previous = read_records(before.dataset)
    model_sha = file_sha256(before.gguf)
    levers = prepare_levers(cfg, retriever)
    with open_engine(before.gguf, engine_params, cfg.seed) as engine:
        checkpoint = Checkpoint(checkpoint_path(out.iteration, cfg, model_sha, before.dataset, here.index, levers,
                                                engine.backend))
        key = round_key(cfg, model_sha, before.dataset, here.index, levers, engine.backend,
                        seed_iteration=int(iteration))
        prefix = reusable_prefix(prefix_from, key) if prefix_from is not None else []
        result = generate_samples(engine, model_sha, retriever, int(iteration), cfg, progress, checkpoint, levers,
                                  prefix)
    write_attempts(out.attempts, key, result.outcomes)
    write_jsonl(out.generated, result.accepted)
    write_jsonl(out.rejected, result.rejected)
    write_jsonl(out.dataset, [*previous, *result.accepted])
    metrics = generation_metrics(result, cfg, len(previous))
    write_json(out.metrics("generate"), metrics)
    checkpoint.remove()  # only once every output is written
    return metrics
