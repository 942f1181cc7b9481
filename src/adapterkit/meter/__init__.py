"""METER (Dou et al., 2022): an end-to-end vision-and-language transformer built from any HF
image encoder and any HF text encoder, joined by co-attention fusion layers, with VQA, NLVR2
and image-text-matching heads; adapters in both encoders (``adapterkit.add_adapters``) or
full fine-tuning. ``domain: meter`` runs it on the training engine (docs/meter.md)."""

from adapterkit.meter.model import HEAD_TYPES, CoAttentionLayer, MeterModel

__all__ = ["HEAD_TYPES", "CoAttentionLayer", "MeterModel"]
