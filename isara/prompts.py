"""The only prompts ISARA uses: retrieved question/answer pairs, no instruction text at all (paper §3).

Examples are ordered farthest first, so the nearest example sits right before the slot the model fills.

Generation always uses the bare layout below: a base model continues `Question: ..\nAnswer: ..` blocks without
any instruction. Fine-tuning, evaluation and the exported model share one PromptFormat (params `base.format`):

- bare: `Question: <q>\nAnswer:` + ` <answer><eos>`, the layout of the generation prompts;
- chat: the base model's own chat template (the GGUF's tokenizer.chat_template) around one user turn, the answer
  as the assistant turn. This is how llama.cpp, llama-server, llama-cpp-python and Ollama serve a GGUF that has a
  template, so the model that is aligned and measured is the model people run (issue 10: served through its
  chat template, a model trained only in the bare layout complied with 76% of harmful prompts).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from isara.records import Record

QUESTION_PREFIX = "Question:"
ANSWER_PREFIX = "Answer:"


def render_example(record: Record) -> str:
    return f"{QUESTION_PREFIX} {record.question}\n{ANSWER_PREFIX} {record.answer}\n\n"


def _examples(neighbours: list[tuple[Record, float]]) -> str:
    ordered = sorted(neighbours, key=lambda pair: -pair[1])
    return "".join(render_example(r) for r, _ in ordered)


def question_prompt(neighbours: list[tuple[Record, float]]) -> str:
    """Stage 1: the model continues with one new question."""
    return _examples(neighbours) + QUESTION_PREFIX


def answer_prompt(neighbours: list[tuple[Record, float]], question: str) -> str:
    """Stage 2: the model answers the new question in the style of the retrieved answers."""
    return _examples(neighbours) + f"{QUESTION_PREFIX} {question}\n{ANSWER_PREFIX}"


def sft_prompt(question: str) -> str:
    """Fine-tuning and evaluation format: the same bare layout, without examples."""
    return f"{QUESTION_PREFIX} {question}\n{ANSWER_PREFIX}"


# Stop strings: the next example block starts with a blank line or a new "Question:".
QUESTION_STOP = ["\n", ANSWER_PREFIX]
ANSWER_STOP = ["\n\n", f"\n{QUESTION_PREFIX}"]
# Evaluation (and every served export: its chat template and Ollama Modelfile) stops only where a new example block
# starts. Not at "\n\n" as generate does: a base model often opens its answer with a blank line, which would cut
# the response to nothing; evaluate's `first_paragraph` trims afterwards.
EVAL_STOP = [f"\n{QUESTION_PREFIX}"]


# ----------------------------------------------------------------------------------------------- prompt formats

BARE, CHAT = "bare", "chat"
CHAT_TEMPLATE_KEY = "tokenizer.chat_template"
BASE_CHAT_TEMPLATE_KEY = "isara.base_chat_template"  # where a bare-format export keeps its base's template
PROMPT_FORMAT_KEY = "isara.prompt_format"  # an export's format: "chat" or the bare layout spelled out
# Templates that call strftime_now (Llama 3's) would put today's date into every prompt; a fixed date keeps a rerun
# byte-identical (DVC), as transformers' own tests do.
TEMPLATE_DATE = "26 Jul 2024"


@lru_cache(maxsize=8)
def _compiled(template: str):
    """The template compiled the way llama-cpp-python's Jinja2ChatFormatter and transformers compile it."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return env.from_string(template)


def render_chat(template: str, messages: Sequence[Mapping[str, str]], *, bos: str, eos: str,
                add_generation_prompt: bool) -> str:
    def raise_exception(message: str):
        raise ValueError(f"the base model's chat template refused the conversation: {message}")

    return _compiled(template).render(messages=list(messages), bos_token=bos, eos_token=eos,
                                      add_generation_prompt=add_generation_prompt, raise_exception=raise_exception,
                                      strftime_now=lambda fmt: TEMPLATE_DATE)


def chat_messages(question: str, examples: Sequence[Record] = ()) -> list[dict[str, str]]:
    """One user turn; earlier QA pairs (ICL-kNN) as earlier user/assistant turns, in the given order."""
    turns = [m for r in examples for m in ({"role": "user", "content": r.question},
                                           {"role": "assistant", "content": r.answer})]
    return [*turns, {"role": "user", "content": question}]


@dataclass(frozen=True)
class PromptFormat:
    """How a question reaches the model that is fine-tuned, evaluated and served."""

    name: str  # BARE or CHAT
    template: str | None = None  # the base's Jinja chat template (CHAT)
    bos: str = ""  # the texts of the BOS / EOS tokens, which templates may use
    eos: str = ""
    add_bos: bool = False  # the tokenizer puts BOS before plain text itself (tokenizer.ggml.add_bos_token)

    def prompt(self, question: str, examples: Sequence[Record] = ()) -> str:
        """The model's input, tokenized as llama-cpp-python's create_completion and a transformers tokenizer with
        special tokens tokenize it (BOS added by the tokenizer where the model wants one, special-token texts
        parsed). `examples`: QA pairs to put before the question, already in order (ICL-kNN)."""
        if self.name == BARE:
            return "".join(render_example(r) for r in examples) + sft_prompt(question)
        text = render_chat(self.template, chat_messages(question, examples), bos=self.bos, eos=self.eos,
                           add_generation_prompt=True)
        # A template that writes BOS itself would get a second one from the tokenizer; llama.cpp's server and chat
        # handlers strip it the same way.
        return text[len(self.bos):] if self.add_bos and self.bos and text.startswith(self.bos) else text

    def answer_text(self, question: str, answer: str) -> str:
        """What fine-tuning teaches the model to write after prompt(question). Bare: " <answer>" (the caller adds
        EOS). Chat: the assistant turn as the template closes it (e.g. "<answer><|im_end|>"), so the model learns
        the end-of-turn token that makes every server stop."""
        if self.name == BARE:
            return " " + answer
        messages = chat_messages(question)
        prompt = render_chat(self.template, messages, bos=self.bos, eos=self.eos, add_generation_prompt=True)
        full = render_chat(self.template, [*messages, {"role": "assistant", "content": answer}], bos=self.bos,
                           eos=self.eos, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise ValueError("the base model's chat template renders a conversation that does not start with its "
                             "own generation prompt; fine-tune it with params base.format: bare")
        return full[len(prompt):].rstrip()

    @property
    def stop(self) -> list[str]:
        # chat: the end-of-turn token ends generation in every engine (llama.cpp stops at end-of-generation tokens)
        return list(EVAL_STOP) if self.name == BARE else []


def prompt_format(choice: str, kv: Mapping) -> PromptFormat:
    """The PromptFormat of params `base.format` (`auto`, `chat` or `bare`) for a model whose GGUF key/values are `kv`
    (isara.cards.gguf_kv). The chat template is the base model's: kept by a chat-format export as its
    tokenizer.chat_template, by a bare-format export under isara.base_chat_template. auto: chat when there is one."""
    # a bare-format export's own tokenizer.chat_template renders the bare layout: not a chat template
    own = kv.get(CHAT_TEMPLATE_KEY) if kv.get(PROMPT_FORMAT_KEY, CHAT) == CHAT else None
    template = kv.get(BASE_CHAT_TEMPLATE_KEY) or own
    if choice == "auto":
        choice = CHAT if template else BARE
    if choice == BARE:
        return PromptFormat(BARE)
    if choice != CHAT:
        raise ValueError(f"params.yaml: base.format = {choice!r}: choose auto, chat or bare")
    if not template:
        raise ValueError(f"params.yaml: base.format is 'chat' but the base model {kv.get('general.name', '')!r} has no "
                         "chat template (tokenizer.chat_template in its GGUF): use auto or bare")
    tokens = kv.get("tokenizer.ggml.tokens") or []

    def text(key: str) -> str:
        i = kv.get(key)
        return str(tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else ""

    # llama.cpp's own default when the key is absent: SentencePiece vocabularies add BOS, BPE ones do not
    add_bos = kv.get("tokenizer.ggml.add_bos_token", kv.get("tokenizer.ggml.model") == "llama")
    return PromptFormat(CHAT, str(template), text("tokenizer.ggml.bos_token_id"), text("tokenizer.ggml.eos_token_id"),
                        bool(add_bos))
