"""The VL model of VL-Adapter: a pretrained LM (seq2seq BART/T5, or a causal LM such as
Llama/SmolLM2) that reads projected visual features next to the text. No modelling
code is forked: the visual tokens enter through ``inputs_embeds`` and two hooks make
BART's visual tokens skip its position embedding and ``layernorm_embedding``.

Visual embedding (always trainable), per the spec:
- ``feat_embedding``: Linear(feat_dim -> d) + LayerNorm(d)  (T5: weight-only RMS norm)
- ``absolute_vis_pos_embedding``: Linear(5 -> d) + LayerNorm(d) on (x1, y1, x2, y2, area)
- ``img_order_embedding``: Embedding(n_images, d)
- object order: the LM's own token embeddings of ``<vis_extra_id_k>`` (no new parameters)

Encoder input: seq2seq ``[prompt?; text; visual]``; causal ``[visual; prompt?; text]``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

import adapterkit
from adapterkit.core.base import get_container
from adapterkit.errors import ConfigError

N_VIS_TOKENS = 100
N_EXTRA_IDS = 100


def special_tokens(kind: str) -> list[str]:
    """The added tokens: 100 ``<extra_id_*>`` (BART only; T5 has them) and 100 ``<vis_extra_id_*>``."""
    vis = [f"<vis_extra_id_{i}>" for i in range(N_VIS_TOKENS)]
    if kind == "bart":
        return [f"<extra_id_{i}>" for i in range(N_EXTRA_IDS - 1, -1, -1)] + vis
    return vis


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding (as HF generate computes them), so a left-padded row
    scores like the same row unpadded."""
    return (mask.long().cumsum(1) - 1).clamp_min(0)


class RMSNorm(nn.Module):
    """T5-style weight-only RMS LayerNorm."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class VisualEmbedding(nn.Module):
    def __init__(self, feat_dim: int, d: int, n_images: int = 2, rms: bool = False):
        super().__init__()
        norm = (lambda: RMSNorm(d)) if rms else (lambda: nn.LayerNorm(d))
        self.feat_embedding = nn.Sequential(nn.Linear(feat_dim, d), norm())
        self.absolute_vis_pos_embedding = nn.Sequential(nn.Linear(5, d), norm())
        self.img_order_embedding = nn.Embedding(n_images, d)
        self.feat_dim = feat_dim

    def forward(self, feats, boxes, img_order, obj_order_emb):
        """feats (B, N, F), boxes (B, N, 4), img_order (B, N) long, obj_order_emb (B, N, d) -> (B, N, d)."""
        if feats.shape[-1] != self.feat_dim:
            raise ConfigError(f"visual features have dimension {feats.shape[-1]}, the model expects {self.feat_dim}")
        area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).unsqueeze(-1)
        pos = self.absolute_vis_pos_embedding(torch.cat([boxes, area], dim=-1))
        return self.feat_embedding(feats) + pos + self.img_order_embedding(img_order) + obj_order_emb


class VLModel(nn.Module):
    """A pretrained LM plus the visual embedding. ``kind`` is "seq2seq" or "causal".

    ``inner_model_prefix`` names the wrapped HF model (``self.lm``): adapters saved from a
    VLModel record it, so :func:`adapterkit.load_adapters` loads them into the plain HF
    model too (module paths without the ``lm.`` prefix; the visual embedding stays behind)."""

    inner_model_prefix = "lm"

    def __init__(self, lm: nn.Module, feat_dim: int, vis_token_ids: list[int], n_images: int = 2):
        super().__init__()
        self.lm = lm
        cfg = lm.config
        self.kind = "seq2seq" if getattr(cfg, "is_encoder_decoder", False) else "causal"
        self.family = getattr(cfg, "model_type", "")
        d = lm.get_input_embeddings().weight.shape[1]
        self.visual = VisualEmbedding(feat_dim, d, n_images, rms=self.family in ("t5", "mt5"))
        self.register_buffer("vis_token_ids", torch.tensor(vis_token_ids, dtype=torch.long), persistent=False)
        self._layout: tuple[int, int, int] | None = None  # (prompt, text, visual) lengths, BART hooks
        # special tokens the tokenizer puts before every target (BART: <s>); set by build_vl_model
        self.answer_prefix_ids: list[int] = []
        self._hooks = []
        if self.family in ("bart", "mbart"):
            enc = lm.get_encoder()
            self._hooks.append(enc.embed_positions.register_forward_hook(self._positions_hook))
            self._hooks.append(enc.layernorm_embedding.register_forward_hook(self._layernorm_hook))

    @property
    def config(self):
        return self.lm.config

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    # --- BART: only text tokens get positions (0..T-1) and layernorm_embedding ------------
    def _positions_hook(self, module, args, out):
        if self._layout is None:
            return out
        p, t, v = self._layout
        out = out if out.dim() == 3 else out.unsqueeze(0)
        z = out.new_zeros(out.shape[0], p + t + v, out.shape[-1])
        z[:, p:p + t] = out[:, :t]
        return z

    def _layernorm_hook(self, module, args, out):
        if self._layout is None:
            return out
        p, t, v = self._layout
        return torch.cat([out[:, : p + t], args[0][:, p + t:]], dim=1)

    # --- inputs ---------------------------------------------------------------------------
    def _prompt_set(self):
        c = get_container(self)
        if c is None:
            return None
        for s in c.sets.values():
            if s.config.method == "prompt":
                return s
        return None

    def _visual_context(self, feats):
        """Adapters conditioned on the image (HyperPELT's visual embedding) get pooled features."""
        c = get_container(self)
        if c is None:
            return
        for s in c.sets.values():
            if hasattr(s, "set_visual") and getattr(s.config, "visual_dim", None):
                s.set_visual(feats.mean(1))

    def object_order(self, img_order):
        """(B, N) index of each visual token within its own image: 0..K-1 for every image, as the
        reference numbers them (NLVR2: 0..35 for each of the two images)."""
        onehot = F.one_hot(img_order, self.visual.img_order_embedding.num_embeddings)
        return (onehot.cumsum(1) * onehot).sum(-1) - 1

    def visual_embeds(self, feats, boxes, img_order):
        per_img = int(self.vis_token_ids.numel())
        obj_ids = self.vis_token_ids[self.object_order(img_order) % per_img]
        obj = self.lm.get_input_embeddings()(obj_ids)
        return self.visual(feats, boxes, img_order, obj)

    def build_inputs(self, input_ids, attention_mask, vis_feats, vis_boxes, img_order, task=None):
        """(inputs_embeds, attention_mask, n_prefix) of the joint sequence."""
        emb = self.lm.get_input_embeddings()
        text = emb(input_ids)
        vis = self.visual_embeds(vis_feats, vis_boxes, img_order).to(text.dtype)
        self._visual_context(vis_feats)
        b = text.shape[0]
        vis_mask = attention_mask.new_ones(b, vis.shape[1])
        ps = self._prompt_set()
        prompts = ps.prompts(b, task).to(text.dtype) if ps is not None else text[:, :0]
        p_mask = attention_mask.new_ones(b, prompts.shape[1])
        if self.kind == "seq2seq":
            self._layout = (prompts.shape[1], text.shape[1], vis.shape[1])
            embeds = torch.cat([prompts, text, vis], dim=1)
            mask = torch.cat([p_mask, attention_mask, vis_mask], dim=1)
            return embeds, mask, 0
        embeds = torch.cat([vis, prompts, text], dim=1)
        mask = torch.cat([vis_mask, p_mask, attention_mask], dim=1)
        return embeds, mask, vis.shape[1] + prompts.shape[1]

    @contextlib.contextmanager
    def _routed(self, task_ids):
        ctx = adapterkit.route(task_ids) if task_ids is not None and get_container(self) is not None \
            else contextlib.nullcontext()
        try:
            with ctx:
                yield
        finally:
            self._layout = None

    # --- training forward ---------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, vis_feats, vis_boxes, img_order, labels, task_ids=None,
                label_weights=None):
        """Token-mean cross-entropy per example (weighted by ``label_weights`` if given), averaged."""
        with self._routed(task_ids):
            embeds, mask, n_prefix = self.build_inputs(input_ids, attention_mask, vis_feats, vis_boxes, img_order)
            if self.kind == "seq2seq":
                out = self.lm(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=self._shift_right(labels))
                logits = out.logits
                tgt = labels
            else:
                # causal: the sequence is [prefix; text], where text = prompt tokens + answer tokens;
                # labels are aligned with input_ids (-100 where no loss)
                # the LM head only on positions that have a target: most positions are visual
                # prefix, question and padding, and the head is a 49k-wide matmul
                hidden = self.lm.base_model(inputs_embeds=embeds, attention_mask=mask,
                                            position_ids=_positions(mask)).last_hidden_state
                tgt = labels[:, 1:]
                if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
                    # inside a CUDA graph (train.cuda_graphs) shapes must not depend on the data:
                    # the head on every text position, the same token-mean loss
                    logits = self.lm.get_output_embeddings()(hidden[:, n_prefix:-1])
                    return self._loss(logits, tgt, label_weights)
                sel = tgt != -100
                logits = self.lm.get_output_embeddings()(hidden[:, n_prefix:-1][sel])
                lp = F.cross_entropy(logits.float(), tgt[sel], reduction="none")
                rows = sel.nonzero()[:, 0]
                b = labels.shape[0]
                per_ex = lp.new_zeros(b).index_add_(0, rows, lp) / sel.sum(1).clamp_min(1).to(lp.dtype)
                if label_weights is not None:
                    per_ex = per_ex * label_weights
                return per_ex.mean()
        return self._loss(logits, tgt, label_weights)

    def _shift_right(self, labels):
        cfg = self.lm.config
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        shifted = labels.new_full(labels.shape, pad)
        shifted[:, 1:] = labels[:, :-1]
        shifted[:, 0] = start
        return shifted.masked_fill(shifted == -100, pad)

    @staticmethod
    def _loss(logits, tgt, weights):
        lp = F.cross_entropy(logits.float().transpose(1, 2), tgt, ignore_index=-100, reduction="none")  # (B, T)
        valid = (tgt != -100).float()
        per_ex = (lp * valid).sum(1) / valid.sum(1).clamp_min(1.0)
        if weights is not None:
            per_ex = per_ex * weights
        return per_ex.mean()

    # --- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, attention_mask, vis_feats, vis_boxes, img_order, task_ids=None,
                 max_new_tokens: int = 10, num_beams: int = 1, pad_token_id=None, eos_token_id=None):
        with self._routed(task_ids):
            embeds, mask, _ = self.build_inputs(input_ids, attention_mask, vis_feats, vis_boxes, img_order)
            kw = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                      pad_token_id=pad_token_id, eos_token_id=eos_token_id)
            if self.kind == "seq2seq":
                enc = self.lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
                self._layout = None
                return self.lm.generate(encoder_outputs=enc, attention_mask=mask, **kw)
            return self.lm.generate(inputs_embeds=embeds, attention_mask=mask, **kw)

    @torch.no_grad()
    def first_token_scores(self, input_ids, attention_mask, vis_feats, vis_boxes, img_order, candidate_ids,
                           task_ids=None, answer_prefix=None):
        """Logits of each candidate's first token where the answer's first content token is
        predicted (NLVR2 true/false), the step greedy decoding would emit it at.

        seq2seq: the decoder reads its start token plus the special tokens the tokenizer puts
        before every target (``answer_prefix``; default ``self.answer_prefix_ids``): BART's
        targets are ``<s> true </s>``, so the decoder reads ``[</s>, <s>]`` and step 1 is
        scored (as the reference does); T5's targets start with the answer, step 0 is scored.
        causal: the last position of the left-padded prompt."""
        with self._routed(task_ids):
            embeds, mask, _ = self.build_inputs(input_ids, attention_mask, vis_feats, vis_boxes, img_order)
            if self.kind == "seq2seq":
                prefix = self.answer_prefix_ids if answer_prefix is None else list(answer_prefix)
                dec = torch.tensor([self.lm.config.decoder_start_token_id, *prefix], dtype=torch.long,
                                   device=embeds.device).expand(embeds.shape[0], -1)
                logits = self.lm(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec).logits[:, -1]
            else:
                # eval batches are left-padded for causal LMs: the last position predicts the answer
                logits = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask),
                                 logits_to_keep=1).logits[:, -1]
        return logits[:, candidate_ids]
