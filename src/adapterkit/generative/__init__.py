"""GenerativeAdapter: LoRA weights generated from a context by a learned generator.

Importing this package registers the method ``generative_adapter``.
"""

from adapterkit.generative.adapter import (
    GenerativeAdapterConfig,
    GenerativeAdapterSet,
    GenLoraLayer,
    absorb_context,
    generative_set,
    merged_context,
    normalize_state,
)
from adapterkit.generative.train import (
    completion_loss,
    continuation_loss,
    evaluate_completion,
    split_documents,
)

__all__ = [
    "GenLoraLayer",
    "GenerativeAdapterConfig",
    "GenerativeAdapterSet",
    "absorb_context",
    "completion_loss",
    "continuation_loss",
    "evaluate_completion",
    "generative_set",
    "merged_context",
    "normalize_state",
    "split_documents",
]
