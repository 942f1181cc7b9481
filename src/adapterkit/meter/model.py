"""The METER model: an HF image encoder and an HF text encoder joined by co-attention fusion.

Dou et al., "An Empirical Study of Training End-to-End Vision-and-Language Transformers"
(CVPR 2022), the paper's best design (reference: ``zdou0830/METER``, ``meter_module.py``,
``bert_model.py`` ``BertCrossLayer``, ``heads.py``):

- each encoder's last hidden states are projected into the fusion width
  (``cross_modal_text_transform`` / ``cross_modal_image_transform``) and get a token-type
  embedding: 0 for text, 1 for an image, 2 for the second image of an NLVR2 pair;
- ``num_fusion_layers`` co-attention layers per stream, separate parameters per stream; both
  streams update in parallel from the other stream's previous-layer output. Each layer is three
  post-LN BERT sublayers: self-attention over its own stream (its own padding mask),
  cross-attention (queries from its stream, keys and values from the other stream, the other
  stream's padding mask), FFN (GELU);
- a pooler ``tanh(Linear)`` on token 0 of each stream; ``cls = [pool_text; pool_image]``;
- heads: ``vqa`` (``Linear(2H,2H) -> LN -> GELU -> Linear(2H, answers)``, soft-score BCE),
  ``nlvr2`` (the text once with each image, the two ``cls`` concatenated:
  ``Linear(4H,2H) -> LN -> GELU -> Linear(2H,2)``) and ``itm`` (``Linear(2H,2)``).

The encoders are ordinary HF modules (``AutoModel``), never copied or forked: adapters go into
them with :func:`adapterkit.add_adapters` (each encoder its own adapters, found by the
architecture profiles or by module paths), and their outputs are read from
``last_hidden_state``. New modules are initialised N(0, 0.02), zero biases, LayerNorms (1, 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: head types and what they classify
HEAD_TYPES = ("vqa", "nlvr2", "itm")


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/o projections (adapters can name them by path).

    ``key_mask``: (B, Lk) with 1 for real tokens, 0 for padding; padded keys get no weight."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"the fusion width {hidden} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.output = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, lq, h = x.shape
        lk = context.shape[1]
        d = h // self.heads
        q = self.query(x).view(b, lq, self.heads, d).transpose(1, 2)
        k = self.key(context).view(b, lk, self.heads, d).transpose(1, 2)
        v = self.value(context).view(b, lk, self.heads, d).transpose(1, 2)
        mask = key_mask.bool()[:, None, None, :]  # (B, 1, 1, Lk): True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.output(out.transpose(1, 2).reshape(b, lq, h))


class CoAttentionLayer(nn.Module):
    """One stream's co-attention layer: post-LN self-attention, cross-attention, FFN."""

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float, eps: float = 1e-12):
        super().__init__()
        self.self_attn = Attention(hidden, heads, dropout)
        self.self_norm = nn.LayerNorm(hidden, eps=eps)
        self.cross_attn = Attention(hidden, heads, dropout)
        self.cross_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn_in = nn.Linear(hidden, ffn)
        self.ffn_out = nn.Linear(ffn, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, own_mask, other, other_mask):
        h = self.self_norm(x + self.drop(self.self_attn(x, x, own_mask)))
        h = self.cross_norm(h + self.drop(self.cross_attn(h, other, other_mask)))
        return self.ffn_norm(h + self.drop(self.ffn_out(F.gelu(self.ffn_in(h)))))


class Pooler(nn.Module):
    """``tanh(Linear(x[:, 0]))``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x):
        return torch.tanh(self.dense(x[:, 0]))


def _mlp_head(d_in: int, d_mid: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_mid), nn.LayerNorm(d_mid), nn.GELU(), nn.Linear(d_mid, n_out))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """METER's initialisation of new modules: N(0, std) weights, zero biases, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _width(encoder: nn.Module, what: str) -> int:
    cfg = getattr(encoder, "config", None)
    for key in ("hidden_size", "d_model", "dim"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    sizes = getattr(cfg, "hidden_sizes", None)
    if isinstance(sizes, (list, tuple)) and sizes:
        return int(sizes[-1])
    raise ValueError(f"the {what} encoder {type(encoder).__name__} has no config.hidden_size; wrap it so that "
                     "it has one (the width of its last_hidden_state)")


class MeterModel(nn.Module):
    """Two HF encoders, ``num_fusion_layers`` co-attention layers per stream, poolers and one
    head per task (``heads = {task: (head type, classes)}``, head type in :data:`HEAD_TYPES`).

    ``forward(task, input_ids, attention_mask, pixel_values, ...)`` returns the task head's
    logits: (B, answers) for ``vqa``, (B, 2) for ``nlvr2`` (``pixel_values`` (B, 2, C, H, W))
    and ``itm``."""

    def __init__(self, text_encoder: nn.Module, image_encoder: nn.Module, heads: dict[str, tuple[str, int]],
                 hidden: int = 768, num_layers: int = 6, num_heads: int = 12, ffn: int = 3072,
                 dropout: float = 0.1, image_pool: str = "cls"):
        super().__init__()
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        self.image_pool = image_pool
        d_t, d_i = _width(text_encoder, "text"), _width(image_encoder, "image")
        # everything named cross_modal* is the fusion part (its own learning-rate multiplier)
        self.cross_modal_text_transform = nn.Linear(d_t, hidden)
        self.cross_modal_image_transform = nn.Linear(d_i, hidden)
        self.cross_modal_token_type = nn.Embedding(3, hidden)
        self.cross_modal_text_layers = nn.ModuleList(
            CoAttentionLayer(hidden, num_heads, ffn, dropout) for _ in range(num_layers))
        self.cross_modal_image_layers = nn.ModuleList(
            CoAttentionLayer(hidden, num_heads, ffn, dropout) for _ in range(num_layers))
        self.cross_modal_text_pooler = Pooler(hidden)
        self.cross_modal_image_pooler = Pooler(hidden)
        for t, (kind, _n) in heads.items():
            if kind not in HEAD_TYPES:
                raise ValueError(f"task {t!r}: unknown head type {kind!r}; known: {', '.join(HEAD_TYPES)}")
        self.head_types = {t: k for t, (k, _) in heads.items()}
        self.heads = nn.ModuleDict({
            t: _mlp_head(2 * hidden, 2 * hidden, n) if k == "vqa" else
            _mlp_head(4 * hidden, 2 * hidden, n) if k == "nlvr2" else nn.Linear(2 * hidden, n)
            for t, (k, n) in heads.items()})
        fusion = [m for n, m in self.named_children() if n.startswith("cross_modal") or n == "heads"]
        for m in fusion:
            init_weights(m)
        with torch.no_grad():  # the second image's token type starts as the first's (reference)
            self.cross_modal_token_type.weight[2].copy_(self.cross_modal_token_type.weight[1])
        self.hidden = hidden

    # --- encoders -----------------------------------------------------------------------------
    def encode_text(self, input_ids, attention_mask, token_type_ids=None):
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        h = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        return self.cross_modal_text_transform(h)

    def encode_image(self, pixel_values):
        out = self.image_encoder(pixel_values=pixel_values)
        h = out.last_hidden_state
        if h.dim() == 4:  # a CNN-style encoder: (B, C, H, W) grid -> tokens
            h = h.flatten(2).transpose(1, 2)
        if self.image_pool == "mean":  # Swin-style: the mean token stands first, as the CLS
            h = torch.cat([h.mean(1, keepdim=True), h], 1)
        return self.cross_modal_image_transform(h)

    # --- fusion -------------------------------------------------------------------------------
    def fuse(self, text, text_mask, image, image_mask, image_type=1):
        """The co-attention stack; returns ``cls = [pool_text; pool_image]`` (B, 2H).
        ``image_type``: the image token type, one for the batch or a (B,) tensor per row."""
        types = self.cross_modal_token_type
        it = types.weight[image_type] if isinstance(image_type, int) else types(image_type)[:, None]
        x, y = text + types.weight[0], image + it
        for lt, li in zip(self.cross_modal_text_layers, self.cross_modal_image_layers):
            x, y = lt(x, text_mask, y, image_mask), li(y, image_mask, x, text_mask)
        return torch.cat([self.cross_modal_text_pooler(x), self.cross_modal_image_pooler(y)], -1)

    def forward(self, task: str, input_ids, attention_mask, pixel_values, token_type_ids=None, image_mask=None):
        kind = self.head_types[task]
        text = self.encode_text(input_ids, attention_mask, token_type_ids)
        b = text.shape[0]
        if kind == "nlvr2":
            if pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
                raise ValueError(f"task {task!r} (nlvr2) takes pixel_values (B, 2, C, H, W), "
                                 f"got {tuple(pixel_values.shape)}")
            # the text once with each image, the 2B (text, image) rows fused as one batch:
            # rows 2i and 2i+1 are pair i's first (token type 1) and second (type 2) image
            image = self.encode_image(pixel_values.flatten(0, 1))
            text, attention_mask = text.repeat_interleave(2, 0), attention_mask.repeat_interleave(2, 0)
            if image_mask is not None:
                image_mask = image_mask.flatten(0, 1)
            image_type = torch.tensor([1, 2], device=text.device).repeat(b)
        else:
            image = self.encode_image(pixel_values)
            image_type = 1
        if image_mask is None:
            image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        cls = self.fuse(text, attention_mask, image, image_mask, image_type)
        return self.heads[task](cls.reshape(b, -1))

    def fusion_parameters(self):
        """(name, parameter) of the projections, fusion layers and poolers (``cross_modal*``)."""
        return [(n, p) for n, p in self.named_parameters() if n.startswith("cross_modal")]


def vqa_loss(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """METER's VQA loss: BCE-with-logits against the soft scores, mean x the number of answers."""
    return F.binary_cross_entropy_with_logits(logits.float(), soft_targets.float()) * soft_targets.shape[1]


def vqa_soft_score(count: int) -> float:
    """The VQA v2 soft score of an answer ``count`` annotators gave: 0.3 / 0.6 / 0.9 / 1.0."""
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


__all__ = ["HEAD_TYPES", "Attention", "CoAttentionLayer", "MeterModel", "Pooler", "init_weights", "vqa_loss",
           "vqa_soft_score"]
