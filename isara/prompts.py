"""The only prompts ISARA uses: retrieved question/answer pairs, no instruction text at all (paper §3).

Examples are ordered farthest first, so the nearest example sits right before the slot the model fills.
"""

from __future__ import annotations

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
