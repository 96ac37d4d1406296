"""index stage: MiniLM embeddings of the questions of D(t-1) and an Annoy (angular) index over them
(artifacts/<t>/index; the index itself and its Retriever: isara/retrieval.py).
"""

from __future__ import annotations

import time

from isara.io import write_json
from isara.params import Index
from isara.paths import iter_paths
from isara.records import read_records
from isara.retrieval import build_index


def run_index(iteration: str, prev: str, cfg: Index) -> dict:
    start = time.perf_counter()
    here = iter_paths(iteration)
    records = read_records(iter_paths(prev).dataset)
    build_index(records, here.index, cfg.n_trees, cfg.seed)
    metrics = {"indexed": len(records), "seconds": round(time.perf_counter() - start, 2)}
    write_json(here.metrics("index"), metrics)
    return metrics
