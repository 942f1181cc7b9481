"""Model shapes for the benchmark: random-init seq2seq LMs built from a transformers config.

No weights are downloaded: every case builds a fresh model from a config with the same
seed, so cases differ only in what is attached to the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from adapterkit.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Shape:
    """An LM shape: family (bart or t5 seq2seq, llama causal), width, depth, FFN width, heads, vocabulary.

    A llama shape has ``encoder_layers`` 0 (its layers are ``decoder_layers``) and may use
    grouped-query attention (``kv_heads``; 0 = as many as ``heads``).
    """

    name: str
    family: str
    d_model: int
    encoder_layers: int
    decoder_layers: int
    ffn_dim: int
    heads: int
    vocab_size: int
    kv_heads: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


SHAPES: dict[str, Shape] = {
    # BART-base: d 768, 6+6 layers, FFN 3072, 12 heads, vocabulary 50265
    "bart-base": Shape("bart-base", "bart", 768, 6, 6, 3072, 12, 50265),
    # T5-base: d 768, 12+12 layers, FFN 3072, 12 heads, vocabulary 32128
    "t5-base": Shape("t5-base", "t5", 768, 12, 12, 3072, 12, 32128),
    # a BART-shaped model small enough for a 2-core CPU to step in milliseconds
    "tiny": Shape("tiny", "bart", 128, 2, 2, 512, 4, 1024),
}
FAMILIES = ("bart", "t5", "llama")


def get_shape(name: str, **custom) -> Shape:
    """A named shape, or ``custom`` built from keyword fields (missing ones taken from ``tiny``)."""
    if name == "custom":
        base = SHAPES["tiny"].to_dict()
        base.update({k: v for k, v in custom.items() if v is not None})
        base["name"] = "custom"
        shape = Shape(**base)
    elif name in SHAPES:
        shape = SHAPES[name]
    else:
        raise ConfigError(f'unknown shape "{name}"{did_you_mean(name, [*SHAPES, "custom"])}; '
                          f"known: {sorted(SHAPES) + ['custom']}")
    _validate(shape)
    return shape


def _validate(s: Shape) -> None:
    if s.family not in FAMILIES:
        raise ConfigError(f'shape family must be one of {list(FAMILIES)}, got "{s.family}"')
    for key in ("d_model", "encoder_layers", "decoder_layers", "ffn_dim", "heads", "vocab_size"):
        if key == "encoder_layers" and s.family == "llama":
            continue
        if int(getattr(s, key)) < 1:
            raise ConfigError(f"shape {key} must be >= 1, got {getattr(s, key)}")
    if s.d_model % s.heads:
        raise ConfigError(f"shape d_model {s.d_model} is not divisible by heads {s.heads}")
    if s.kv_heads and s.heads % s.kv_heads:
        raise ConfigError(f"shape heads {s.heads} is not a multiple of kv_heads {s.kv_heads}")
    if s.vocab_size < 16:
        raise ConfigError(f"shape vocab_size must be >= 16, got {s.vocab_size}")


def hf_config(shape: Shape):
    """(transformers config, model class) for ``shape``."""
    import transformers as tf

    if shape.family == "bart":
        cfg = tf.BartConfig(
            vocab_size=shape.vocab_size, d_model=shape.d_model, encoder_layers=shape.encoder_layers,
            decoder_layers=shape.decoder_layers, encoder_attention_heads=shape.heads,
            decoder_attention_heads=shape.heads, encoder_ffn_dim=shape.ffn_dim, decoder_ffn_dim=shape.ffn_dim,
            max_position_embeddings=1024, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            decoder_start_token_id=2, forced_eos_token_id=None,
        )
        return cfg, tf.BartForConditionalGeneration
    if shape.family == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=shape.vocab_size, hidden_size=shape.d_model, intermediate_size=shape.ffn_dim,
            num_hidden_layers=shape.decoder_layers, num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads or shape.heads, max_position_embeddings=4096,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        )
        return cfg, tf.LlamaForCausalLM
    cfg = tf.T5Config(
        vocab_size=shape.vocab_size, d_model=shape.d_model, d_kv=shape.d_model // shape.heads, d_ff=shape.ffn_dim,
        num_layers=shape.encoder_layers, num_decoder_layers=shape.decoder_layers, num_heads=shape.heads,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return cfg, tf.T5ForConditionalGeneration


def build_model(shape: Shape, seed: int, device: str | torch.device) -> nn.Module:
    """A fresh random-init model of ``shape`` on ``device`` (same ``seed`` = same weights)."""
    cfg, cls = hf_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(cfg)
    return model


@dataclass
class Batch:
    """One fixed batch: source ids, target labels and the decoder inputs derived from them
    (a causal LM: labels are the input ids, no decoder inputs)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    decoder_input_ids: torch.Tensor | None

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def make_batch(shape: Shape, batch: int, src: int, tgt: int, device, seed: int = 0) -> Batch:
    """Random token ids (ids 5.. so no special token appears), generated on CPU for reproducibility."""
    if min(batch, src, tgt) < 1:
        raise ConfigError(f"batch, source and target lengths must be >= 1, got {batch}, {src}, {tgt}")
    g = torch.Generator().manual_seed(seed)
    hi = min(50000, shape.vocab_size)
    ids = torch.randint(5, hi, (batch, src), generator=g)
    if shape.family == "llama":  # causal LM: next-token loss over the src tokens; tgt is not used
        return Batch(ids.to(device), ids.clone().to(device), None)
    labels = torch.randint(5, hi, (batch, tgt), generator=g)
    start = 2 if shape.family == "bart" else 0
    dec = torch.cat([torch.full((batch, 1), start, dtype=labels.dtype), labels[:, :-1]], dim=1)
    return Batch(ids.to(device), labels.to(device), dec.to(device))
