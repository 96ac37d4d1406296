"""BatchedLlama against plain llama-cpp-python `create_completion`, on the real SmolLM2-135M model, no mocks.

    python -m pytest tests/test_batched.py -q      # ~25 s of CPU (1 thread); ~100 s wall on 2 busy shared cores

What holds, and is asserted exactly (text, finish_reason and token count, not just a prefix):
- greedy (temperature 0): a batch of 4 real few-shot prompts decoded together gives exactly the outputs of
  one-by-one create_completion calls;
- sampled: with the same seeds, exactly create_completion's outputs too (BatchedLlama builds the same
  llama.cpp sampler chain per request), the same again on a second run, in another order, with prompts
  reused from the KV cache, and the same for a request run alone (batch of 1) as inside a batch of 4;
- stop strings cut the text before the stop (finish_reason "stop"), max_tokens ends with "length".
Why exact equality can hold at all: on this build's CPU kernels, the logits of a token do not depend on the
other sequences in its llama_decode call nor on how a prompt is cut into pieces of >= 2 tokens; they do
change in the last bits when a prompt token is evaluated in a one-token piece (another matmul kernel), which
BatchedLlama never does unless create_completion does too (see BatchedLlama._pieces_for).
The reference create_completion calls each start from a reset Llama: create_completion itself reuses
the previous prompt's KV cache, and for a repeated prompt it re-evaluates only the last token, in a
one-token piece, so its own output for a request can depend on the request before it.
"""

from __future__ import annotations

import itertools

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from conftest import SEEDS

from isara.base_models import BaseModelError, base_model_path
from isara.engines.batched import BatchedLlama
from isara.engines.llama import complete, open_llama
from isara.prompts import ANSWER_PREFIX, ANSWER_STOP, QUESTION_STOP, answer_prompt, question_prompt
from isara.records import Sampling
from isara.seeds import read_seed_file

pytestmark = pytest.mark.slow

N_CTX = 512


@pytest.fixture(scope="module")
def llm():
    try:
        path = base_model_path("smollm2")
    except BaseModelError as exc:
        pytest.skip(str(exc))
    return open_llama(path, n_ctx=N_CTX, n_threads=1, n_threads_batch=1, seed=0)


@pytest.fixture(scope="module")
def prompts() -> list[tuple[str, list[str]]]:
    """Four real few-shot prompts as the generate stage writes them (2 examples each, to stay fast)."""
    seeds = read_seed_file(SEEDS / "safety.jsonl")
    pick = lambda *ids: [(seeds[i], 0.5 - 0.1 * n) for n, i in enumerate(ids)]
    return [
        (question_prompt(pick(0, 1)), QUESTION_STOP),
        (answer_prompt(pick(2, 3), seeds[10].question), ANSWER_STOP),
        (question_prompt(pick(4, 5)), QUESTION_STOP),
        (answer_prompt(pick(6, 7), seeds[11].question), ANSWER_STOP),
    ]


def requests_for(prompts, temperatures, max_tokens=(24, 24, 3, 24), seed=7):
    out = []
    for i, ((prompt, stop), temperature, n) in enumerate(zip(prompts, temperatures, max_tokens)):
        if i == 3:
            stop = ["never-generated stop string"]  # must run to max_tokens: "length"
        out.append((prompt, Sampling(temperature=temperature, top_p=0.95, max_tokens=n, seed=seed + i), stop))
    return out


def reference(llm, requests):
    """Plain create_completion, one by one, each from a reset Llama (see the module docstring): the sequential
    engine's `complete`."""
    return [complete(llm, *request) for request in requests]


@pytest.fixture(scope="module")
def greedy(prompts):
    return requests_for(prompts, [0.0] * 4)


@pytest.fixture(scope="module")
def sampled(prompts):
    return requests_for(prompts, [0.8, 0.3, 0.8, 0.3])


@pytest.fixture(scope="module")
def engine(llm):
    batched = BatchedLlama(llm, n_seq_max=4, n_ctx_seq=N_CTX, n_threads=1)
    yield batched
    batched.close()


def test_greedy_batch_equals_sequential(llm, engine, greedy):
    expected = reference(llm, greedy)
    got = engine.complete_many(greedy)
    assert got == expected
    assert all(n > 0 for _, _, n in got)


def test_sampled_batch_equals_sequential_and_is_deterministic(llm, engine, sampled):
    expected = reference(llm, sampled)
    first = engine.complete_many(sampled)
    assert first == expected
    reused_before = engine.stats["prompt_tokens_reused"]
    again = engine.complete_many(sampled[::-1])[::-1]  # other order, prompts now in the KV cache
    assert engine.stats["prompt_tokens_reused"] > reused_before  # the cache was really used...
    assert again == first  # ...and changed nothing


def test_repeat_penalty_equals_sequential(llm, engine, greedy, sampled):
    """generate.answer_repeat_penalty: the batched chain's penalties sampler sees what create_completion's sees."""
    for requests in (greedy, sampled):
        penalised = [(p, s.model_copy(update={"repeat_penalty": 1.5, "max_tokens": 48}), stop)
                     for p, s, stop in requests]
        expected = reference(llm, penalised)
        assert engine.complete_many(penalised) == expected
        plain = reference(llm, [(p, s.model_copy(update={"repeat_penalty": 1.0}), stop) for p, s, stop in penalised])
        assert expected != plain  # the penalty really reached the sampler
    assert "repeat_penalty" not in penalised[0][1].model_copy(update={"repeat_penalty": 1.0}).model_dump()
    assert penalised[0][1].model_dump()["repeat_penalty"] == 1.5


def test_result_does_not_depend_on_batch_composition(llm, engine, sampled):
    in_batch = engine.complete_many(sampled)
    alone = BatchedLlama(llm, n_seq_max=1, n_ctx_seq=N_CTX, n_threads=1, reuse_prefix=False)
    try:
        assert alone.complete_many([sampled[1]]) == [in_batch[1]]
    finally:
        alone.close()
    # a batch of 2 where the neighbour has another seed: request 1's result stays put
    other = (sampled[0][0], sampled[0][1].model_copy(update={"seed": 12345}), sampled[0][2])
    assert engine.complete_many([other, sampled[1]])[1] == in_batch[1]


def test_stops_and_max_tokens(engine, greedy, sampled):
    for requests in (greedy, sampled):
        results = engine.complete_many(requests)
        for (prompt, sampling, stop), (text, finish, n_tokens) in zip(requests, results):
            assert not any(s in text for s in stop), (stop, text)
            assert 0 < n_tokens <= sampling.max_tokens
            if finish == "length":
                assert n_tokens == sampling.max_tokens
            else:
                assert finish == "stop"
        # request 2: max_tokens=3 ends by length (no stop string fits in 3 tokens of a question)
        assert results[2][1:] == ("length", 3)
        # request 3: a stop string that never occurs: the answer runs to max_tokens
        assert results[3][1:] == ("length", 24)
        # question prompts stop at the newline before "Answer:"
        assert results[0][1] == "stop" and ANSWER_PREFIX not in results[0][0]


def test_rejects_requests_that_do_not_fit(llm, prompts):
    prompt, stop = prompts[0]
    small = BatchedLlama(llm, n_seq_max=1, n_ctx_seq=256, n_threads=1)
    try:
        with pytest.raises(ValueError, match="n_ctx_seq"):
            small.complete_many([(prompt, Sampling(temperature=0.0, top_p=1.0, max_tokens=200, seed=0), stop)])
        with pytest.raises(ValueError, match="context window"):  # create_completion's own error
            small.complete_many([(prompt * 4, Sampling(temperature=0.0, top_p=1.0, max_tokens=8, seed=0), stop)])
        assert small.complete_many([]) == []
    finally:
        small.close()


def test_prompt_pieces_never_leave_one_token_alone(engine):
    chunk = engine.chunk
    for n_tokens in (2, 3, chunk - 1, chunk, chunk + 2, 2 * chunk + 2, 3 * chunk - 5):
        for n_keep in (0, 1, n_tokens // 2, n_tokens - 2):
            if n_keep > n_tokens - 2:  # _start always evaluates >= 2 tokens after a reused prefix
                continue
            pieces = engine._pieces_for(n_keep, n_tokens)
            assert pieces[0][0] == n_keep and pieces[-1][1] == n_tokens
            assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
            assert all(hi - lo <= chunk for lo, hi in pieces)
            if n_keep > 0:
                assert all(hi - lo >= 2 for lo, hi in pieces)
            else:  # from scratch: exactly create_completion's pieces
                assert pieces == [(lo, min(lo + chunk, n_tokens)) for lo in range(0, n_tokens, chunk)]


def test_prompt_pieces_stay_on_the_wide_side_of_a_narrowed_engine(engine):
    """narrow(7) (k-quants on x86: matmul kernels change at 8 rows): every piece after a reused prefix has >= 8
    tokens, however the prompt's length falls against the chunk size."""
    chunk, before = engine.chunk, engine.min_piece
    engine.min_piece = 8  # what narrow(7) sets, without its piece check (SmolLM2 needs no narrowing)
    try:
        for n_tokens in (9, 20, chunk, chunk + 1, chunk + 7, chunk + 8, 2 * chunk + 3):
            for n_keep in (1, 5, n_tokens // 2, n_tokens - 8):
                if n_keep > n_tokens - 8:  # _start evaluates >= min_piece tokens after a reused prefix
                    continue
                pieces = engine._pieces_for(n_keep, n_tokens)
                assert pieces[0][0] == n_keep and pieces[-1][1] == n_tokens
                assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
                assert all(8 <= hi - lo <= chunk for lo, hi in pieces), (n_tokens, n_keep, pieces)
    finally:
        engine.min_piece = before


def test_batched_engine_keeps_the_contract_where_batching_moves_logits(prompts):
    """The bundled Gemma 3 Q4_K_M: on x86 CPUs its k-quant matmuls take another kernel from 8 rows on (sequences per
    decode step, or tokens per prompt piece), and sampled completions changed (4-5 of 8). open_engine's batched
    engine must then still return the sequential engine's completions: BatchedLlama.invariant_width finds the
    widest step that matches and narrow() decodes at most that many sequences, with prompt pieces after a reused
    prefix on the wide side of the boundary (or falls back to one request after another where no width matches).
    The requests come twice, so the second time every prompt is found in the KV cache and only a last piece is
    evaluated: with pieces of 2 tokens there (the pieces of an invariant model) 2 of the 8 completions changed here."""
    from isara.engines import open_engine
    from isara.engines.llama import SequentialEngine
    from isara.params import Engine

    try:
        path = base_model_path("gemma3")
    except BaseModelError as exc:
        pytest.skip(str(exc))
    requests = [(prompt, Sampling(temperature=0.8, top_p=0.95, max_tokens=24, seed=11 + i), stop)
                for i, (prompt, stop) in enumerate(prompts * 2)]
    params = Engine(kind="sequential", n_ctx=N_CTX, n_threads=2)
    with open_engine(path, params) as sequential:
        expected = sequential.complete_many(requests)
    with open_engine(path, params.model_copy(update={"kind": "batched", "batch_size": 8})) as engine:
        got = engine.complete_many(requests)
        batched = isinstance(engine, BatchedLlama)
        reused = batched and engine.stats["prompt_tokens_reused"]
        state = f"width {engine.width}, min_piece {engine.min_piece}, reused {reused}" if batched else "fell back"
    assert got == expected, f"batched engine ({state}) broke the contract"
    assert batched or isinstance(engine, SequentialEngine)
    if batched and engine.reuse_prefix:
        assert reused > 0, "the repeated prompts should have been found in the KV cache"
