"""Methods: one file each, each registering its config dataclass and adapter set by name."""

from adapterkit.methods import bottleneck, compacter, freeze, hyperformer, lora, prompt  # noqa: F401
