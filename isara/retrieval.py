"""Retrieval over a data set's questions: MiniLM embeddings in an Annoy (angular) index (a capability; the index
stage, isara/index.py, builds one per iteration, generate and the ICL-kNN baseline query it).

The folder holds the Annoy file, the record ids in index order and the embeddings themselves, so that
generate@t can filter near duplicates against D(t-1) without embedding it again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from annoy import AnnoyIndex

from isara.embed import EMBED_DIM, embed
from isara.io import atomic_directory
from isara.records import Record, read_records

INDEX_FILE = "questions.ann"
IDS_FILE = "ids.json"
VECTORS_FILE = "embeddings.npy"


def build_index(records: list[Record], out_dir: Path, n_trees: int, seed: int) -> None:
    vectors = embed([r.question for r in records])
    with atomic_directory(out_dir) as tmp:
        index = AnnoyIndex(EMBED_DIM, "angular")
        index.set_seed(seed)
        for i, v in enumerate(vectors):
            index.add_item(i, v)
        index.build(n_trees, n_jobs=1)  # one job: Annoy's multi-threaded build is not deterministic
        index.save(str(tmp / INDEX_FILE))
        (tmp / IDS_FILE).write_text(json.dumps([r.id for r in records]) + "\n")
        np.save(tmp / VECTORS_FILE, vectors)


@dataclass
class Retriever:
    """kNN over D(t-1)'s questions; `records[i]` is the record of Annoy item i."""

    index: AnnoyIndex
    records: list[Record]
    vectors: np.ndarray

    @classmethod
    def load(cls, index_dir: Path, dataset: Path) -> Retriever:
        index_dir = Path(index_dir)
        ids = json.loads((index_dir / IDS_FILE).read_text())
        by_id = {r.id: r for r in read_records(dataset)}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(f"{index_dir}: index cites {len(missing)} ids absent from {dataset} (e.g. {missing[0]}); "
                             "the index is stale: rerun the index stage")
        index = AnnoyIndex(EMBED_DIM, "angular")
        index.load(str(index_dir / INDEX_FILE))
        return cls(index, [by_id[i] for i in ids], np.load(index_dir / VECTORS_FILE))

    def nearest_to_item(self, item: int, k: int) -> list[tuple[Record, float]]:
        ids, dists = self.index.get_nns_by_item(item, k, include_distances=True)
        return [(self.records[i], float(d)) for i, d in zip(ids, dists)]

    def nearest_to_vector(self, vector: np.ndarray, k: int) -> list[tuple[Record, float]]:
        ids, dists = self.index.get_nns_by_vector(vector.tolist(), k, include_distances=True)
        return [(self.records[i], float(d)) for i, d in zip(ids, dists)]
