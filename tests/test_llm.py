"""isara.engines.llama.open_llama: the one way isara builds a llama.cpp model (see its module docstring for why)."""

from __future__ import annotations

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from isara.base_models import base_model_path  # noqa: E402
from isara.engines.llama import open_llama  # noqa: E402

pytestmark = pytest.mark.slow


def test_open_llama_turns_extra_buffer_types_off_for_that_call_only():
    import llama_cpp.llama as llama_module

    defaults = llama_module.llama_cpp.llama_model_default_params
    llm = open_llama(base_model_path("smollm2"), n_ctx=256, n_threads=1, seed=0)
    try:
        assert llm.model_params.use_extra_bufts is False
        assert llama_module.llama_cpp.llama_model_default_params is defaults  # restored
        assert defaults().use_extra_bufts is True  # llama.cpp's own default is untouched for other callers
        # On a CPU with AMX this decode segfaulted with the extra buffer types on (llama-cpp-python 0.3.36).
        out = llm.create_completion("Question: What is 2 + 2?\nAnswer:", max_tokens=4, temperature=0.0)
        assert out["usage"]["completion_tokens"] >= 1
    finally:
        llm.close()


def test_open_llama_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf: model file not found"):
        open_llama(tmp_path / "nope.gguf")
