"""export stage: M(t)'s transformers checkpoint -> artifacts/<t>/model.gguf, the llama.cpp model that generates round
t+1. The conversion itself (grafting the weights onto the base GGUF's metadata) is a capability: isara/gguf.py.
"""

from __future__ import annotations

from isara.gguf import export_gguf, release_metadata


def run_export(iteration: str, cfg, seeds=None, base=None) -> dict:
    """export@t: M(t)'s checkpoint -> artifacts/<t>/model.gguf, the model that generates round t+1.

    With `seeds` and `base` (params sections; the stage passes them) the GGUF names itself, its base model and
    seed set, and carries the bare-layout chat template (release_metadata)."""
    import time

    from isara.io import write_json
    from isara.paths import iter_paths

    start = time.perf_counter()
    here = iter_paths(iteration)
    metadata = release_metadata(here.hf, iteration, seeds, base) if seeds is not None and base is not None else None
    export_gguf(here.hf, here.gguf, cfg.outtype, metadata=metadata)
    metrics = {"outtype": cfg.outtype, "gguf_bytes": here.gguf.stat().st_size, "seconds": round(time.perf_counter() - start, 2)}
    write_json(here.metrics("export"), metrics)
    return metrics
