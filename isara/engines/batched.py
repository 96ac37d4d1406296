"""Batched completions: several sequences decoded at once through llama.cpp's batch API.

Why: one `llama_decode` over N tokens (one per live sequence) costs less than N single-token calls once
N is large enough for llama.cpp's GEMM kernels (measured on 1 CPU thread, SmolLM2-135M: Q4_1 72 -> 96
tok/s at N=16, q8_0 72 -> 152 tok/s). `BatchedLlama.complete_many` keeps up to `n_seq_max` sequences in
flight, each under its own llama.cpp sequence id ("slot") with its own KV stream (`kv_unified=False`: a
sequence attends only to its own cells, so attention cost does not grow with the batch), and refills a
slot as soon as its sequence ends. Generation with few-shot prompts is dominated by prompt evaluation
(~340 prompt tokens per ~45 generated ones in the generate stage), hence the second saving:

Prompt-prefix reuse: a slot keeps its KV cells after its sequence ends. A new prompt that starts with
tokens some slot already holds (the same retrieved examples, a repeated anchor) takes those cells, in
place or copied from another slot (`llama_memory_seq_cp`), and only the rest of the prompt is evaluated.

Contract: for every request, `complete_many` returns exactly what `isara.engines.llama.complete` returns,
i.e. what `Llama.create_completion(prompt, max_tokens, temperature, top_p, seed, stop, repeat_penalty)` returns:
- the prompt is tokenized as create_completion tokenizes it;
- the sampler chain is create_completion's default chain (top_k 40, typical 1.0, top_p, min_p 0.05,
  temperature, then `dist` seeded with the request's seed; greedy when temperature == 0), built from
  llama.cpp's own samplers, one chain per request, so the random stream of a request depends on its
  seed only, never on the other requests in the batch, their order or the batch size;
- end-of-generation tokens, stop strings, max_tokens (capped by the Llama's n_ctx) and the UTF-8
  multi-byte hold-back follow create_completion's loop step by step: text cut before the first string
  of `stop` (list order) found in the text, finish_reason "stop" or "length", completion token count
  including the token that completed the stop string.
The only way a result could differ is numerical. Measured with this llama.cpp build on CPU (SmolLM2 Q4_1):
a token's logits are bit-identical whatever other sequences share its llama_decode call, and however a
prompt is cut into pieces of >= 2 tokens; but a prompt token evaluated in a one-token piece goes through
other kernels (GEMV), its K/V differ in the last bits, and that can flip a later token (logits moved by up
to ~0.5). So a prompt is evaluated in create_completion's own pieces, or after a reused prefix in pieces
of >= 2 tokens (`_pieces_for`), and decode steps carry one token per sequence, as create_completion's do.
That depends on the weights' types: f16 and bf16 logits move in any decode step of 2 or more sequences, and the
k-quants' (every *_K_M file) from 8 rows on, in a decode step or a prompt piece. So the model is checked when the
engine opens (`invariant_width`, `pieces_are_invariant`): isara.engines.open_engine narrows the engine to the
widest decode step that matches, with prompt pieces after a reused prefix above it (`narrow`), or falls back to
one request after another where no width does.
tests/test_batched.py asserts the equality on the real model. (create_completion itself reuses the previous
call's KV cache: for a prompt identical to the previous one it evaluates only the last token, in a one-token
piece, so a plain sequential loop can return something else for a request that repeats the one before it;
isara.engines.llama.complete resets the model first.)
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import _internals as internals

from isara.engines import Completion, EngineBase, Request
from isara.records import Sampling

# create_completion's defaults for the knobs that isara.engines.llama.complete does not pass.
TOP_K = 40
MIN_P = 0.05
TYPICAL_P = 1.0
PENALTY_LAST_N = 64  # Llama(last_n_tokens_size=64)

# Prompts of the invariance checks (BatchedLlama.invariant_width, pieces_are_invariant): different lengths, so the
# sequences of a decode step sit at different positions.
PROBE_TEXTS = ("Question: What is the boiling point of water?\nAnswer:", "Hello there",
               "Question: How do I pick the lock of a front door quickly?\nAnswer:",
               "Question: Name three birds.\nAnswer: Robin, crow and")


def sampler_chain(sampling: Sampling, n_vocab: int):
    """create_completion's sampler chain (Llama._init_sampler with its defaults) for one request.

    The penalties sampler that _init_sampler puts first (over the last 64 sampled tokens: llama_sampler_sample
    feeds it each token it picks, never the prompt's) is left out at repeat penalty 1.0, where it changes
    nothing. Free the chain with llama_sampler_free.
    """
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    samplers = []
    if sampling.repeat_penalty != 1.0:
        samplers.append(llama_cpp.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, sampling.repeat_penalty,
                                                               0.0, 0.0))
    if sampling.temperature < 0.0:
        samplers.append(llama_cpp.llama_sampler_init_dist(sampling.seed))
    elif sampling.temperature == 0.0:
        samplers.append(llama_cpp.llama_sampler_init_greedy())
    else:
        samplers += [
            llama_cpp.llama_sampler_init_top_k(TOP_K),
            llama_cpp.llama_sampler_init_typical(TYPICAL_P, 1),
            llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1),
            llama_cpp.llama_sampler_init_min_p(MIN_P, 1),
            llama_cpp.llama_sampler_init_temp(sampling.temperature),
            llama_cpp.llama_sampler_init_dist(sampling.seed),
        ]
    for sampler in samplers:
        llama_cpp.llama_sampler_chain_add(chain, sampler)  # the chain owns (and frees) its samplers
    return chain


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Sequence:
    """One request in flight: its slot, sampler chain, generated tokens and create_completion's stop state."""

    __slots__ = (
        "chain",
        "index",
        "max_tokens",
        "multibyte_fix",
        "n_past",
        "prompt_tokens",
        "result",
        "slot",
        "stop",
        "text",
        "tokens",
    )

    def __init__(self, index: int, slot: int, prompt_tokens: list[int], stop: list[bytes], max_tokens: int,
                 sampling: Sampling, n_vocab: int):
        self.index, self.slot = index, slot
        self.prompt_tokens, self.stop, self.max_tokens = prompt_tokens, stop, max_tokens
        self.chain = sampler_chain(sampling, n_vocab)
        self.tokens: list[int] = []  # completion tokens, end-of-generation token excluded
        self.text = b""
        self.multibyte_fix = 0
        self.n_past = 0  # position of the next token to evaluate
        self.result: Completion | None = None

    def free(self) -> None:
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None


class BatchedLlama(EngineBase):
    """Decode up to `n_seq_max` completions at once, sharing the weights of a loaded `Llama` (the engine of
    params engine.kind: batched; its width, the requests worth handing over at once, is n_seq_max).

    llm: a loaded `llama_cpp.Llama`; its model, tokenizer, n_ctx (create_completion's cap on max_tokens)
      and context settings are reused; BatchedLlama creates a second llama.cpp context for the batch.
    n_seq_max: sequences decoded together (the width of each decode step).
    cache_slots: extra KV streams that only keep recent prompts for reuse (a prompt cache): with them,
      a prompt seen up to n_seq_max + cache_slots prompts ago is found again (generate draws anchors with
      replacement, so identical question prompts recur).
    n_ctx_seq: KV cells per sequence, rounded up to a multiple of 256: a request's prompt + max_tokens must
      fit (ValueError otherwise). Default: llm.n_ctx(). The KV cache holds (n_seq_max + cache_slots) *
      n_ctx_seq cells (SmolLM2-135M: 23 KB per cell in f16, so 12 MB per slot at n_ctx_seq=512).
    n_threads / n_threads_batch: threads for decode steps / prompt batches; default: those of llm.
    reuse_prefix: take the KV cells of a prompt prefix that a slot already holds (min_prefix tokens or
      more when copied from another slot) instead of evaluating it again. Results do not change.
    """

    def __init__(self, llm: llama_cpp.Llama, n_seq_max: int = 8, n_ctx_seq: int | None = None,
                 n_threads: int | None = None, n_threads_batch: int | None = None,
                 reuse_prefix: bool = True, cache_slots: int = 0, min_prefix: int = 16):
        limit = llama_cpp.llama_max_parallel_sequences()
        if n_seq_max < 1 or cache_slots < 0 or n_seq_max + cache_slots > limit:
            raise ValueError(f"need n_seq_max >= 1, cache_slots >= 0 and n_seq_max + cache_slots <= {limit} "
                             f"(llama.cpp's limit), got {n_seq_max} and {cache_slots}")
        self.llm = llm
        self._owns_llm = False  # load() hands its own Llama over: close() closes it too
        self.n_seq_max = self.width = n_seq_max
        self.backend = None  # in-process llama.cpp: the sequential engine's completions (records name no backend)
        self.n_slots = n_seq_max + (cache_slots if reuse_prefix else 0)
        # llama.cpp rounds each sequence's KV stream up to a multiple of 256 cells anyway.
        self.n_ctx_seq = -(-int(n_ctx_seq or llm.n_ctx()) // 256) * 256
        # create_completion's prompt pieces: Llama.eval passes n_batch tokens per llama_decode, which
        # llama.cpp cuts into n_ubatch ubatches (see _pieces_for).
        self.chunk = min(llm.n_batch, llm.context_params.n_ubatch)
        self.n_batch = max(self.chunk, n_seq_max)  # the most tokens of one llama_decode call
        self.reuse_prefix = reuse_prefix
        self.min_prefix = max(1, int(min_prefix))
        # Fewest tokens a prompt piece after a reused prefix may have (see _pieces_for; narrow() raises it).
        self.min_piece = 2
        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
        params.n_seq_max = self.n_slots
        params.n_ctx = self.n_ctx_seq * self.n_slots
        params.kv_unified = False  # one KV stream per sequence
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_threads = int(n_threads or llm.context_params.n_threads)
        params.n_threads_batch = int(n_threads_batch or n_threads or llm.context_params.n_threads_batch)
        self.n_threads, self.n_threads_batch = params.n_threads, params.n_threads_batch
        # internals.LlamaContext frees the context before the model it belongs to, whatever the GC order.
        self._ctx = internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self.ctx = self._ctx.ctx
        if llama_cpp.llama_n_ctx_seq(self.ctx) < self.n_ctx_seq:
            raise RuntimeError(f"llama.cpp gave {llama_cpp.llama_n_ctx_seq(self.ctx)} KV cells per sequence, "
                               f"{self.n_ctx_seq} were asked for")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llm._model.vocab
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._batch_live = True
        # What each slot's KV stream holds: the tokens at positions 0..len-1 (kept after a sequence ends).
        self._cached: list[list[int]] = [[] for _ in range(self.n_slots)]
        self._free: list[int] = list(range(self.n_slots))  # least recently used first
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self._bos = llm.token_bos()
        # Cumulative counters, for benchmarks and tests.
        self.stats = {"decode_calls": 0, "prompt_tokens": 0, "prompt_tokens_reused": 0, "completion_tokens": 0}

    @classmethod
    def load(cls, model_path: str | Path, n_seq_max: int = 8, n_ctx_seq: int = 1024, n_threads: int = 1,
             seed: int = 0, n_gpu_layers: int = 0, **kwargs) -> BatchedLlama:
        """Load a GGUF file; the `Llama` it creates keeps a small context of its own (n_ctx_seq cells). n_gpu_layers
        as params engine.n_gpu_layers: offloaded where llama-cpp-python was built with GPU support."""
        from isara.engines.llama import load_llama

        llm = load_llama(model_path, n_ctx_seq, n_threads, seed, n_gpu_layers)
        engine = cls(llm, n_seq_max=n_seq_max, n_ctx_seq=n_ctx_seq, n_threads=n_threads, **kwargs)
        engine._owns_llm = True
        return engine

    def invariant_width(self) -> int:
        """The widest decode step (up to n_seq_max sequences) in which every sequence gets the logits it gets alone
        (one token per llama_decode, as create_completion decodes), bit for bit, and so does every narrower one;
        1 where a step of 2 already moves them.

        The contract above rests on it, and it depends on the weights' types and the build: measured here (x86
        AVX-512, Gemma 3 270M converted to 10 GGUF types), q4_0, q4_1, q5_0, q5_1 and q8_0 hold it at every width;
        f16 and bf16 at none; the k-quants (q4_K, q5_K, q6_K: every *_K_M file) up to 7 sequences, and from 8 on
        some sequences' logits move (by up to 1.1), which changed 4-5 of 8 sampled completions. So this is checked
        on the model itself, at every width, with sequences at different positions, rather than read from a list of
        types: other CPUs and GPU back ends choose their kernels differently. Costs 4 short prompts' worth of tokens
        per slot and 2 * n_seq_max decode steps; leaves the KV cache empty.
        """
        width = min(self.n_seq_max, self.n_slots)
        if width < 2:
            return width
        prompts = [self.prompt_tokens(PROBE_TEXTS[slot % len(PROBE_TEXTS)]) for slot in range(width)]
        steps = [(tokens[-1], len(tokens), slot, True) for slot, tokens in enumerate(prompts)]  # one per slot

        def undo(size: int) -> None:  # forget the step's cells, so the next step decodes the same positions
            for token, pos, slot, _ in steps[:size]:
                llama_cpp.llama_memory_seq_rm(self.memory, slot, pos, -1)

        try:
            for slot, tokens in enumerate(prompts):
                for lo, hi in self._pieces_for(0, len(tokens)):
                    self._decode([(tokens[pos], pos, slot, False) for pos in range(lo, hi)])
            alone = []
            for step in steps:
                self._decode([step])
                alone.append(self._logits(0))
                undo(width)
            for size in range(2, width + 1):
                self._decode(steps[:size])
                if not all(np.array_equal(alone[i], self._logits(i)) for i in range(size)):
                    return size - 1
                undo(size)
            return width
        finally:
            self.clear()

    def pieces_are_invariant(self, min_piece: int) -> bool:
        """Whether a prompt's last tokens evaluated as a piece of m >= min_piece tokens after the KV cells of the
        rest (what prompt-prefix reuse does) give the logits of the whole prompt evaluated as create_completion
        evaluates it, bit for bit, for m at min_piece and a few sizes above. Where decode steps are invariant only up
        to some width (k-quants), that width is a kernel boundary in the number of rows a matmul takes, which a
        prompt piece crosses too: this checks that pieces on create_completion's side of it match. Leaves the KV
        cache empty; costs about 8 * min_piece tokens."""
        tokens = self.prompt_tokens(" ".join(PROBE_TEXTS))
        n = len(tokens)
        sizes = sorted({m for m in (min_piece, min_piece + 1, min_piece + 3, 2 * min_piece + 1, 3 * min_piece + 2)
                        if m <= n - 1})
        try:
            for lo, hi in self._pieces_for(0, n):
                self._decode([(tokens[pos], pos, 0, pos == n - 1) for pos in range(lo, hi)])
            whole = self._logits(hi - lo - 1)
            for m in sizes:
                llama_cpp.llama_memory_seq_rm(self.memory, 0, n - m, -1)
                self._decode([(tokens[pos], pos, 0, pos == n - 1) for pos in range(n - m, n)])
                if not np.array_equal(whole, self._logits(m - 1)):
                    return False
            return bool(sizes)
        finally:
            self.clear()

    def narrow(self, width: int) -> None:
        """Decode at most `width` sequences at once, and evaluate prompt pieces after a reused prefix in pieces of
        more than `width` tokens (on create_completion's side of the kernel boundary), or not reuse prefixes where
        such pieces do not match either. The slots past `width` keep recent prompts (a prompt cache)."""
        self.n_seq_max = self.width = width
        self.min_piece = width + 1
        if self.reuse_prefix and not self.pieces_are_invariant(self.min_piece):
            self.reuse_prefix = False

    def _logits(self, i: int):
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, i), shape=(self.llm.n_vocab(),)).copy()

    def release_llm(self):
        """Close this engine's own context and hand its `Llama` (and the duty to close it) to the caller."""
        llm, self._owns_llm = self.llm, False
        self.close()
        return llm

    def close(self) -> None:
        if self._batch_live:
            llama_cpp.llama_batch_free(self._batch)
            self._batch_live = False
        self._ctx.close()
        if self._owns_llm:
            self._owns_llm = False
            self.llm.close()

    def __del__(self):
        with contextlib.suppress(Exception):  # at interpreter shutdown the bindings may already be gone
            self.close()

    def clear(self) -> None:
        """Forget every cached prompt (all KV cells)."""
        llama_cpp.llama_memory_clear(self.memory, True)
        self._cached = [[] for _ in range(self.n_slots)]

    # -- tokens and text, as Llama._create_completion does them ---------------------------------------

    def prompt_tokens(self, prompt: str) -> list[int]:
        """create_completion's tokens for a str prompt (no suffix): BOS/EOS only where the model asks."""
        llm, model = self.llm, self.llm._model
        cls_id, sep_id = model.token_cls(), model.token_sep()
        bos = [cls_id if cls_id != -1 else self._bos]
        eos = [sep_id if sep_id != -1 else llm.token_eos()]
        if not model.add_bos_token() or bos[:1] == [-1]:
            bos = []
        if not model.add_eos_token() and sep_id == -1:
            eos = []
        body = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) if prompt != "" else []
        return bos + body + eos

    def _max_tokens(self, n_prompt: int, max_tokens: int | None) -> int:
        n_ctx = self.llm.n_ctx()
        if n_prompt >= n_ctx:
            raise ValueError(f"Requested tokens ({n_prompt}) exceed context window of {n_ctx}")
        if max_tokens is None or max_tokens <= 0:
            max_tokens = n_ctx - n_prompt
        max_tokens = max_tokens if max_tokens + n_prompt < n_ctx else n_ctx - n_prompt
        if n_prompt + max_tokens > self.n_ctx_seq:
            raise ValueError(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceed n_ctx_seq="
                             f"{self.n_ctx_seq}: build BatchedLlama with a larger n_ctx_seq")
        return max_tokens

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.llm._model.detokenize([token])
        return piece

    def _is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))
        return eog

    def _all_text(self, seq: _Sequence) -> bytes:
        # Model.detokenize drops the leading space after a leading BOS token; keep that rule.
        if seq.tokens and seq.tokens[0] == self._bos and seq.text[:1] == b" ":
            return seq.text[1:]
        return seq.text

    def _accept(self, seq: _Sequence, token: int) -> bool:
        """One sampled token through create_completion's stop logic; True when the sequence is done."""
        if self._is_eog(token):
            seq.result = (self._all_text(seq).decode("utf-8", errors="ignore"), "stop", len(seq.tokens))
            return True
        seq.tokens.append(token)
        seq.text += self._piece(token)
        all_text = self._all_text(seq)
        # Hold back text that ends inside a multi-byte UTF-8 character, as create_completion does
        # (including its quirk: the max_tokens check is skipped while holding back).
        for k, char in enumerate(all_text[-3:]):
            k = 3 - k
            for num, pattern in ((2, 192), (3, 224), (4, 240)):
                if num > k and pattern & char == pattern:
                    seq.multibyte_fix = num - k
        if seq.multibyte_fix > 0:
            seq.multibyte_fix -= 1
            if seq.n_past >= self.n_ctx_seq:  # no KV cell left for the next token
                seq.result = (all_text.decode("utf-8", errors="ignore"), "length", len(seq.tokens))
                return True
            return False
        any_stop = [s for s in seq.stop if s in all_text]
        if any_stop:
            text = all_text[: all_text.index(any_stop[0])]
            seq.result = (text.decode("utf-8", errors="ignore"), "stop", len(seq.tokens))
            return True
        if len(seq.tokens) >= seq.max_tokens:
            seq.result = (all_text.decode("utf-8", errors="ignore"), "length", len(seq.tokens))
            return True
        return False

    # -- llama.cpp batches ----------------------------------------------------------------------------

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode over (token, position, slot, want_logits) entries, at most n_batch of them."""
        batch = self._batch
        for i, (token, pos, slot, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = slot
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        rc = llama_cpp.llama_decode(self.ctx, batch)
        self.stats["decode_calls"] += 1
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} ({len(entries)} tokens)")

    def _sample(self, seq: _Sequence, batch_index: int) -> bool:
        token = llama_cpp.llama_sampler_sample(seq.chain, self.ctx, batch_index)
        return self._accept(seq, token)

    def _claim_slot(self, tokens: list[int]) -> int:
        """A free slot for a new prompt: the one holding its longest prefix (min_prefix tokens or more),
        else the least recently used one (every prompt shares a token or two, "Question:", with all)."""
        best, best_len = self._free[0], self.min_prefix - 1
        if self.reuse_prefix:
            for slot in self._free:
                n = common_prefix(self._cached[slot], tokens)
                if n > best_len:
                    best, best_len = slot, n
        self._free.remove(best)
        return best

    def _pieces_for(self, n_keep: int, n_tokens: int) -> list[tuple[int, int]]:
        """The llama_decode calls that evaluate prompt positions [n_keep, n_tokens).

        From position 0: create_completion's own pieces (Llama.eval: n_batch tokens, split into n_ubatch),
        so every token is computed exactly as there. After a reused prefix: pieces of min_piece..chunk tokens.
        Why never a piece of one token (unless create_completion has one too): llama.cpp runs a one-token
        ubatch through different matmul kernels (GEMV) than a wider one, and the K/V it stores then differ
        in the last bits from create_completion's; the rounding can flip later tokens. Where the kernels change
        at a wider ubatch (k-quants: 8 rows, see narrow), min_piece keeps every piece on the wide side.
        """
        if n_keep == 0:
            return [(lo, min(lo + self.chunk, n_tokens)) for lo in range(0, n_tokens, self.chunk)]
        n = n_tokens - n_keep
        sizes = [self.chunk] * ((n - 1) // self.chunk) + [n - self.chunk * ((n - 1) // self.chunk)]
        if len(sizes) > 1 and sizes[-1] < self.min_piece:
            sizes[-2] -= self.min_piece - sizes[-1]
            sizes[-1] = self.min_piece
        bounds, lo = [], n_keep
        for size in sizes:
            bounds.append((lo, lo + size))
            lo += size
        return bounds

    def _reusable(self, slot: int, tokens: list[int]) -> int:
        return common_prefix(self._cached[slot], tokens) if self.reuse_prefix else 0

    def _start(self, seq: _Sequence) -> None:
        """Evaluate the prompt of `seq` in its slot (after any reusable prefix) and sample its first token.

        Each prompt gets llama_decode calls of its own: evaluating prompts of several sequences in one call
        is no faster on a CPU (prompt evaluation is compute-bound) and would let llama.cpp cut a sequence's
        tokens into ubatches of any size (one-token pieces included, see _pieces_for).
        """
        tokens, slot, n = seq.prompt_tokens, seq.slot, len(seq.prompt_tokens)
        source, n_keep = slot, self._reusable(slot, tokens)
        for other in range(self.n_slots):
            if other != slot:
                shared = self._reusable(other, tokens)
                if shared > n_keep and shared >= self.min_prefix:
                    source, n_keep = other, shared
        n_keep = min(n_keep, n - self.min_piece)  # evaluate >= min_piece tokens (see _pieces_for)
        # create_completion's last piece is narrower than min_piece (a single token, in the plain case): evaluate the
        # prompt in its pieces exactly
        narrow_end = 0 < n % self.chunk < self.min_piece
        if narrow_end or (source != slot and n_keep < self.min_prefix) or n_keep < 1:
            source, n_keep = slot, 0
        if source != slot:
            llama_cpp.llama_memory_seq_rm(self.memory, slot, -1, -1)
            llama_cpp.llama_memory_seq_cp(self.memory, source, slot, -1, -1)  # the whole stream, at next decode
        llama_cpp.llama_memory_seq_rm(self.memory, slot, n_keep, -1)
        self._cached[slot] = []
        for lo, hi in self._pieces_for(n_keep, n):
            self._decode([(tokens[pos], pos, slot, pos == n - 1) for pos in range(lo, hi)])
        # Only K/V computed in pieces of >= min_piece tokens can be reused (the generated tokens' never are).
        self._cached[slot] = list(tokens[: n - n % self.chunk] if narrow_end else tokens)
        self.stats["prompt_tokens"] += n
        self.stats["prompt_tokens_reused"] += n_keep
        seq.n_past = n
        self._sample(seq, hi - lo - 1)

    def complete_many(self, requests: Sequence[Request]) -> list[Completion]:
        """Complete every request; result i is what isara.engines.llama.complete returns for request i."""
        pending: deque[tuple[int, list[int], list[bytes], int, Sampling]] = deque()
        for index, (prompt, sampling, stop) in enumerate(requests):
            tokens = self.prompt_tokens(prompt)
            stop_list = stop if isinstance(stop, list) else [stop] if isinstance(stop, str) else []
            pending.append((index, tokens, [s.encode("utf-8") for s in stop_list],
                            self._max_tokens(len(tokens), sampling.max_tokens), sampling))
        results: list[Completion | None] = [None] * len(requests)
        live: list[_Sequence] = []
        started: list[_Sequence] = []
        try:
            while pending or live:
                running = []
                for seq in live:
                    if seq.result is None:
                        running.append(seq)
                    else:
                        self._end(seq, results)
                live = running
                new = []
                while pending and len(live) + len(new) < self.n_seq_max:
                    index, tokens, stop, max_tokens, sampling = pending.popleft()
                    seq = _Sequence(index, self._claim_slot(tokens), tokens, stop, max_tokens, sampling,
                                    self.llm.n_vocab())
                    new.append(seq)
                    started.append(seq)
                for seq in new:
                    self._start(seq)
                if new:
                    live += new
                    if any(seq.result is not None for seq in new):
                        continue  # done at their first token: free their slots and refill first
                if not live:
                    continue
                # One decode step: the last sampled token of every live sequence, one logits row each.
                self._decode([(seq.tokens[-1], seq.n_past, seq.slot, True) for seq in live])
                for i, seq in enumerate(live):
                    seq.n_past += 1
                    self._sample(seq, i)
        except BaseException:
            self.clear()
            self._free = list(range(self.n_slots))
            raise
        finally:
            for seq in started:
                seq.free()
        return results  # type: ignore[return-value]

    def _end(self, seq: _Sequence, results: list) -> None:
        """A finished sequence: record its result, free its sampler; its slot keeps its KV for reuse."""
        results[seq.index] = seq.result
        self.stats["completion_tokens"] += seq.result[2]
        seq.free()
        self._free.append(seq.slot)
