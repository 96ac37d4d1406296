"""The data contract: one `Record` per question/answer pair, seeds and generated samples alike.

A record's `id` is a content hash over every other field, so editing any field (question, answer or
lineage) breaks the id, and two records can only share an id if they are identical.
Lineage lives on the record itself: the ids (and retrieval distances) of the examples that were in the
question prompt and in the answer prompt point one hop back; `isara lineage` follows them to the seeds.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

ID_LENGTH = 16  # hex chars of sha256: 64 bits, collision-free at any data-set size this tool will see


class Neighbour(BaseModel):
    """One in-context example: which record, and how far it was from the retrieval query (Annoy angular)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    distance: float


class Sampling(BaseModel):
    """Exactly the llama.cpp sampling settings and seed of one completion, so it can be replayed."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    # llama.cpp's repeat penalty over the last 64 generated tokens (create_completion's). Left out of the dump (and
    # so of the content id) at 1.0, the value that changes nothing, so records written before it existed keep their ids.
    repeat_penalty: float = 1.0

    @model_serializer(mode="wrap")
    def _omit_neutral_penalty(self, handler):
        data = handler(self)
        if isinstance(data, dict) and data.get("repeat_penalty") == 1.0:
            del data["repeat_penalty"]
        return data


class Backend(BaseModel):
    """Where a record's completions ran, when not in isara's own process (params engine.kind: server).

    The in-process engines (sequential, batched) return the same completions bit for bit and are not recorded
    (Record.backend None). A server is: which one, and the endpoint when params engine.url named it. A server that
    isara started itself listens on 127.0.0.1 at a port that changes from run to run, so its endpoint is None
    (recording the port would change every record's content id from one run to the next)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["server"] = "server"
    server: str  # "llama-server" or "llama-cpp-python" (started by isara), "openai-compatible" (engine.url)
    endpoint: str | None = None  # the /v1/completions URL of engine.url; None: a server isara started locally
    slots: int = Field(1, ge=1)  # completions the server ran at once (llama-server's --parallel)


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = ""
    iteration: int = Field(ge=0, description="0 for seeds, t for samples generated in iteration t")
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    # Lineage: empty for seeds.
    anchor_id: str | None = None
    question_context: list[Neighbour] = []
    answer_context: list[Neighbour] = []
    model_sha256: str | None = None
    question_sampling: Sampling | None = None
    answer_sampling: Sampling | None = None
    raw_question: str | None = None
    raw_answer: str | None = None
    # The answer's stance as generate's judge labelled it (issue 10's stance filters); None where not labelled
    # (seeds, records generated with both stance filters off). Left out of the content hash when None, so
    # records from before the field keep their ids.
    stance: Literal["declines", "complies"] | None = None
    # The LLM backend that wrote raw_question / raw_answer when it was a server (isara.engines); None for isara's
    # in-process llama.cpp. Left out of the content hash when None, as stance: in-process records keep their ids.
    backend: Backend | None = None

    @model_serializer(mode="wrap")
    def _omit_unset_stance(self, handler):
        # Files written before these fields (stance filters off, in-process engine) stay byte for byte the same.
        data = handler(self)
        if isinstance(data, dict):
            for key in ("stance", "backend"):
                if key in data and data[key] is None:
                    del data[key]
        return data

    @model_validator(mode="after")
    def _id_is_content_hash(self) -> Record:
        expected = content_id(self)
        if not self.id:
            object.__setattr__(self, "id", expected)
        elif self.id != expected:
            raise ValueError(f"id {self.id!r} is not the content hash of the record (expected {expected!r})")
        return self

    @property
    def is_seed(self) -> bool:
        return self.iteration == 0

    def parent_ids(self) -> list[str]:
        """Every record this one was generated from, question prompt first, without repeats."""
        seen: dict[str, None] = {}
        for n in [*self.question_context, *self.answer_context]:
            seen.setdefault(n.id, None)
        return list(seen)


def content_id(record: Record) -> str:
    payload = record.model_dump(mode="json", exclude={"id"})
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:ID_LENGTH]


class RecordFileError(ValueError):
    """A JSONL line that is not a valid record; the message names the file and line."""


def read_records(path: str | os.PathLike) -> list[Record]:
    return list(iter_records(path))


def iter_records(path: str | os.PathLike) -> Iterator[Record]:
    path = Path(path)
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield Record.model_validate_json(line)
            except ValidationError as exc:
                raise RecordFileError(f"{path}:{lineno}: invalid record: {exc}") from exc


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
