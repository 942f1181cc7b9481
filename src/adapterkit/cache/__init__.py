"""Training-free CLIP cache adapters: Tip-Adapter(-F), TIP-X (SuS-X), CapS-Adapter, DualAdapter.

Entry point: :func:`adapterkit.cache.pipeline.run_cache_adapter` (and the
``adapterkit cache`` CLI). Each method lives in its own module; shared pieces
(cache building, prototypes, validation-only grid search) are in ``common``.

A CLIP-like model to run them with offline: ``dual_encoder`` (frozen EfficientNet-Lite0 +
MiniLM with contrastively trained heads, on ``openclipart`` pairs); SuS-X's support sets
built from class names: ``susx``.
"""

from adapterkit.cache.pipeline import METHODS, run_cache_adapter

__all__ = ["METHODS", "run_cache_adapter"]
