"""In-process llama.cpp (llama-cpp-python): the only module that builds a `llama_cpp.Llama`, the sequential engine,
and answer log-likelihoods.

`open_llama(path, **kwargs)`, the one way isara builds a model. Why not `Llama(...)` directly: with llama.cpp's
"extra buffer types" on (the default), a llama-cpp-python build for a CPU with AMX (Intel Sapphire Rapids and newer;
pip compiles llama.cpp with -march=native) puts Q4_1, Q4_K and Q8_0 weights in its AMX buffer type, and the first
llama_decode segfaults (measured with llama-cpp-python 0.3.36 on the bundled SmolLM2 Q4_1 and Gemma 3 Q4_K_M
models: a general protection fault in libggml-cpu.so). With them off, the weights stay in ordinary CPU buffers; six
completions of the generate stage's prompt shape took the same time either way here (11.3-11.8 s vs 12.2-12.3 s for
a portable build that has no AMX code at all). Llama builds its model params inside its constructor, so the switch
is made on the defaults it reads, for that call only.

`SequentialEngine`: one `create_completion` after another, each from an empty KV cache (`complete`), so a
completion depends on its own request only (not on the one before it): what makes generate's resume exact.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from isara.engines import Completion, EngineBase, Request
from isara.params import Engine as EngineParams
from isara.records import Sampling

_LOCK = threading.Lock()


@contextlib.contextmanager
def _without_extra_buffer_types():
    import llama_cpp.llama as llama_module

    low = llama_module.llama_cpp  # the ctypes bindings module Llama.__init__ reads its defaults from
    original = low.llama_model_default_params

    def defaults():
        params = original()
        params.use_extra_bufts = False
        return params

    with _LOCK:
        low.llama_model_default_params = defaults
        try:
            yield
        finally:
            low.llama_model_default_params = original


def open_llama(model_path: str | Path, **kwargs):
    """`llama_cpp.Llama(model_path=..., verbose=False, **kwargs)` with extra buffer types off; a clear error for a
    missing file (llama.cpp's own is a bare ValueError)."""
    from llama_cpp import Llama

    if not Path(model_path).is_file():
        raise FileNotFoundError(f"{model_path}: model file not found")
    kwargs.setdefault("verbose", False)
    with _without_extra_buffer_types():
        return Llama(model_path=str(model_path), **kwargs)


def offload(n_gpu_layers: int) -> int:
    """Layers to put on a GPU: the param where llama-cpp-python was built with GPU support, else none."""
    from llama_cpp import llama_supports_gpu_offload

    return n_gpu_layers if llama_supports_gpu_offload() else 0


def load_llama(model_path: str | Path, n_ctx: int, n_threads: int, seed: int, n_gpu_layers: int = 0, **kwargs):
    """A model for completions: n_threads for both decoding and prompt batches, layers offloaded where possible."""
    return open_llama(model_path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                      n_gpu_layers=offload(n_gpu_layers), seed=seed, **kwargs)


def complete(llm, prompt: str, sampling: Sampling, stop: list[str]) -> Completion:
    """One completion from an empty KV cache: llama-cpp-python would otherwise reuse a matching prompt prefix from
    the previous call, and the result of a completion would depend on what ran before it (breaking resume)."""
    llm.reset()
    out = llm.create_completion(prompt, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                top_p=sampling.top_p, seed=sampling.seed, stop=stop,
                                repeat_penalty=sampling.repeat_penalty)
    choice = out["choices"][0]
    return choice["text"], choice["finish_reason"], out["usage"]["completion_tokens"]


class SequentialEngine(EngineBase):
    """The default engine: one `complete` (empty KV cache first) per request."""

    width = 1
    backend = None

    def __init__(self, llm, owns: bool = False):
        self.llm = llm
        self._owns = owns

    @classmethod
    def load(cls, model_path: str | Path, params: EngineParams, seed: int = 0) -> SequentialEngine:
        return cls(load_llama(model_path, params.n_ctx, params.n_threads, seed, params.n_gpu_layers), owns=True)

    def complete_many(self, requests: Sequence[Request]) -> list[Completion]:
        return [complete(self.llm, prompt, sampling, stop) for prompt, sampling, stop in requests]

    def close(self) -> None:
        if self._owns and self.llm is not None:
            self.llm.close()
            self.llm = None


class LogLikelihood:
    """Sum of continuation log-probs under a GGUF model via llama.cpp (logits_all), reusing the KV cache of the
    longest token prefix shared with the previous call (the primer and the question are shared by every answer).
    The scorer of TruthfulQA MC1/MC2 (isara.truthfulqa)."""

    def __init__(self, model_path: str | Path, n_ctx: int = 1024, n_threads: int = 2, n_gpu_layers: int = 0):
        self.llm = load_llama(model_path, n_ctx, n_threads, seed=0, n_gpu_layers=n_gpu_layers, logits_all=True)

    def tokenize(self, text: str, bos: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=bos, special=False)

    def score(self, context: str, continuation: str) -> float:
        llm = self.llm
        ctx = self.tokenize(context)
        full = self.tokenize(context + continuation)
        start = 0  # first continuation token: where the tokenizations of context and context+continuation part
        while start < min(len(ctx), len(full)) and ctx[start] == full[start]:
            start += 1
        if start == len(full) or start == 0:
            raise ValueError(f"empty continuation {continuation!r}")
        if len(full) > llm.n_ctx():
            raise ValueError(f"{len(full)} tokens exceed n_ctx={llm.n_ctx()}")
        cached = 0
        for a, b in zip(llm._input_ids[: llm.n_tokens], full):
            if a != b:
                break
            cached += 1
        cached = min(cached, start)  # the logits at start-1 must be those of this very prefix
        if cached == len(full):
            cached -= 1
        llm.n_tokens = cached  # eval() drops the KV cells from here and decodes the rest
        llm.eval(full[cached:])
        logits = np.asarray(llm.scores[start - 1 : len(full) - 1], dtype=np.float64)
        m = logits.max(axis=1, keepdims=True)
        logprobs = logits - (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))
        return float(logprobs[np.arange(len(full) - start), full[start:]].sum())

    def close(self) -> None:
        self.llm.close()
