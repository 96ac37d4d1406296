"""isara: iterative self-alignment with retrieval-augmented in-context learning (Guo et al., arXiv 2401.06785)."""

__version__ = "0.1.0"
