"""The text domain: classification and generation on any HF model, on the training engine."""

from adapterkit.text.config import TextRunConfig
from adapterkit.text.data import TextExample, export_bbc, read_split

__all__ = ["TextExample", "TextRunConfig", "export_bbc", "read_split"]
