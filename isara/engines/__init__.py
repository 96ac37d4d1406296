"""LLM engines: every way isara completes prompts and scores answers, behind one protocol (a capability: it
imports only contracts, isara.params and isara.records).

    with open_engine(model_path, params.engine, seed) as engine:
        outs = engine.complete_many([(prompt, Sampling(...), stop), ...])   # [(text, finish_reason, tokens)]

A request is (prompt, isara.records.Sampling, stop strings); a completion is (text, finish_reason, completion
tokens), what llama-cpp-python's `Llama.create_completion(prompt, max_tokens, temperature, top_p, seed, stop)`
returns. The backend is params `engine.kind` (isara.params.Engine, one block shared by generate, evaluate, the
baselines, TruthfulQA and the seeds' context check):

| kind       | where llama.cpp runs                         | module                 | records' `backend` |
|------------|----------------------------------------------|------------------------|--------------------|
| sequential | in process, one completion after another     | isara.engines.llama    | omitted            |
| batched    | in process, batch_size sequences per decode  | isara.engines.batched  | omitted            |
| server     | an OpenAI-compatible /v1/completions server: | isara.engines.server   | kind, server,      |
|            | engine.url, else llama-server (--parallel    |                        | endpoint           |
|            | engine.slots) or llama-cpp-python's server   |                        |                    |
|            | that isara starts on 127.0.0.1 and stops     |                        |                    |

Every in-process backend returns, for every request, exactly what the sequential one returns (the batched
engine's contract, tests/test_batched.py), so their records are the same bytes and carry no backend. Log-likelihood
scoring (TruthfulQA MC1/MC2, `open_scorer`) always runs in process: OpenAI-compatible servers do not all return
the log-probs of prompt tokens. `llama_cpp.Llama` objects are built in isara.engines.llama and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from isara.params import Engine as EngineParams
from isara.records import Backend, Sampling

Request = tuple[str, Sampling, list[str]]  # (prompt, sampling, stop strings)
Completion = tuple[str, str, int]  # (text, finish_reason, completion_tokens)


class Engine(Protocol):
    """What generate, evaluate and the baselines complete prompts with."""

    # Requests worth handing over per complete_many call to keep the backend busy (1: one at a time).
    width: int
    # What a record generated through this engine names as its backend (None: in-process llama.cpp).
    backend: Backend | None

    def complete_many(self, requests: Sequence[Request]) -> list[Completion]:
        """Completion i is request i's; each depends only on its own request (prompt, sampling seed, stop)."""
        ...

    def close(self) -> None: ...


class Scorer(Protocol):
    def score(self, context: str, continuation: str) -> float:
        """Sum of the log-probs of the continuation's tokens after the context."""
        ...


class EngineBase:
    """Context-manager plumbing shared by the engines: `with open_engine(...) as engine:` closes (and stops a
    server isara started) whatever happens inside."""

    width: int = 1
    backend: Backend | None = None

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_engine(model_path: str | Path, params: EngineParams | None = None, seed: int = 0) -> Engine:
    """The engine params `engine` asks for, on the GGUF at `model_path` (a server given by engine.url is
    expected to serve that model already; isara cannot check which model a remote endpoint holds)."""
    params = params or EngineParams()
    if params.kind == "sequential":
        from isara.engines.llama import SequentialEngine

        return SequentialEngine.load(model_path, params, seed)
    if params.kind == "batched":
        import sys

        from isara.engines.batched import BatchedLlama
        from isara.engines.llama import SequentialEngine

        engine = BatchedLlama.load(model_path, n_seq_max=params.batch_size, n_ctx_seq=params.n_ctx,
                                   n_threads=params.n_threads, seed=seed, n_gpu_layers=params.n_gpu_layers)
        width = engine.invariant_width()
        if width == engine.n_seq_max:
            return engine
        # Records must not depend on the engine (resume, `dvc exp` comparisons): where batching changes the
        # numbers from some width on, decode narrower; where it does from 2, complete one request after another
        # with the model already loaded.
        if width >= 2:
            engine.narrow(width)
            print(f"engine: batched decoding moves the logits of {model_path} from {width + 1} sequences on (as "
                  f"k-quant weights do on x86 CPUs); decoding at most {width} at once, "
                  + (f"prompt pieces after a reused prefix of at least {width + 1} tokens" if engine.reuse_prefix
                     else "no prompt-prefix reuse (pieces move the logits too)"), file=sys.stderr, flush=True)
            return engine
        print(f"engine: batched decoding moves the logits of {model_path} on this build (as it does for f16 and "
              f"bf16 weights on x86 CPUs); completing one request after another instead", file=sys.stderr,
              flush=True)
        return SequentialEngine(engine.release_llm(), owns=True)
    from isara.engines.server import ServerEngine

    return ServerEngine.open(model_path, params, seed)


def open_scorer(model_path: str | Path, params: EngineParams | None = None) -> Scorer:
    """Answer log-likelihoods (TruthfulQA), in process with engine.n_ctx / n_threads / n_gpu_layers whatever
    engine.kind is."""
    from isara.engines.llama import LogLikelihood

    params = params or EngineParams()
    return LogLikelihood(model_path, n_ctx=params.n_ctx, n_threads=params.n_threads, n_gpu_layers=params.n_gpu_layers)


def count_tokens(model_path: str | Path, texts: Sequence[str]) -> list[int]:
    """Tokens of each text (no BOS) under the model's own tokenizer: only its vocabulary is loaded."""
    from isara.engines.llama import open_llama

    vocab = open_llama(model_path, vocab_only=True)
    try:
        return [len(vocab.tokenize(t.encode("utf-8"), add_bos=False)) for t in texts]
    finally:
        vocab.close()
