"""The one way isara builds a llama.cpp model (llama-cpp-python's `Llama`): `open_llama(path, **kwargs)`.

Why not `Llama(...)` directly: with llama.cpp's "extra buffer types" on (the default), a llama-cpp-python build for
a CPU with AMX (Intel Sapphire Rapids and newer; pip compiles llama.cpp with -march=native) puts Q4_1, Q4_K and
Q8_0 weights in its AMX buffer type, and the first llama_decode segfaults (measured with llama-cpp-python 0.3.36
on the bundled SmolLM2 Q4_1 and Gemma 3 Q4_K_M models: a general protection fault in libggml-cpu.so). With them
off, the weights stay in ordinary CPU buffers; six completions of the generate stage's prompt shape took the same
time either way here (11.3-11.8 s vs 12.2-12.3 s for a portable build that has no AMX code at all). Llama builds
its model params inside its constructor, so the switch is made on the defaults it reads, for that call only.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

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
