"""isara.engines without a model: params, the server engine's URLs and errors, the backend on records.

The engines on the real model: tests/test_batched.py (batched = sequential), tests/test_generate.py and
tests/test_evaluate.py (every engine kind through the stages, a server killed mid-generate), tests/test_llm.py.
"""

from __future__ import annotations

import pytest

from isara.engines.server import ServerEngine, ServerError, completions_url, free_port
from isara.params import Engine
from isara.records import Backend, Neighbour, Record, Sampling


def test_completions_url_accepts_a_base_url_or_the_endpoint():
    assert completions_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080/v1/completions"
    assert completions_url("http://h:1/v1/") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/completions") == "http://h:1/v1/completions"


def test_engine_params_check_the_url():
    assert Engine(kind="server", url="http://127.0.0.1:8080").url == "http://127.0.0.1:8080"
    with pytest.raises(ValueError, match="must start with http"):
        Engine(kind="server", url="127.0.0.1:8080")


def test_no_server_at_the_url_is_a_clear_error_naming_it():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    engine = ServerEngine(url, slots=2, timeout=5)
    request = ("Question:", Sampling(temperature=0.0, top_p=1.0, max_tokens=4, seed=0), ["\n"])
    try:
        with pytest.raises(ServerError, match=f"LLM server {url}/v1/completions: no answer .*Connection"):
            engine.complete_many([request, request])
    finally:
        engine.close()
    assert engine.backend == Backend(server="openai-compatible", endpoint=f"{url}/v1/completions", slots=2)
    assert isinstance(ServerError("x"), ConnectionError)  # the stages' guard prints it as one line


def lineage_record(**extra) -> Record:
    return Record(iteration=1, question="How do I pick a lock?", answer="I cannot help with that.", anchor_id="abc",
                  question_context=[Neighbour(id="abc", distance=0.5)],
                  answer_context=[Neighbour(id="abc", distance=0.25)], model_sha256="0" * 64,
                  question_sampling=Sampling(temperature=0.8, top_p=0.95, max_tokens=64, seed=1),
                  answer_sampling=Sampling(temperature=0.3, top_p=0.95, max_tokens=128, seed=2),
                  raw_question=" How do I pick a lock?", raw_answer=" I cannot help with that.", stance="declines",
                  **extra)


def test_in_process_records_keep_their_ids_and_server_records_name_the_backend():
    # The id this record had before Record.backend existed (isara/records.py at the commit before it).
    plain = lineage_record()
    assert plain.id == "951eaf1514181c9b" and "backend" not in plain.model_dump_json()
    served = lineage_record(backend=Backend(server="llama-server", slots=4))
    assert served.id != plain.id  # the backend is lineage: part of the content hash
    assert Record.model_validate_json(served.model_dump_json()) == served
    assert '"backend":{"kind":"server","server":"llama-server","endpoint":null,"slots":4}' in served.model_dump_json()


def test_asking_for_a_llama_server_that_is_not_there_names_the_param(tmp_path):
    from isara.engines.server import LocalServer

    params = Engine(kind="server", server="llama-server", server_binary=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"engine.server_binary .*nope is not a file.*build_llama_server"):
        LocalServer.choose(params)
    assert LocalServer.choose(Engine(kind="server", server="llama-cpp-python")) == ("llama-cpp-python", None)
