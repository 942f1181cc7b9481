"""APoLLo: unified adapter and prompt learning for a CLIP-like dual encoder (Chowdhury et al., 2023).

Reference: ``schowdhury671/APoLLo`` (``src/trainers/apollo.py``, ``src/clip/model.py``); the
paper body was not readable, so this follows the released code and its figure, with the
code's defects fixed (see "Differences from the released code" below).

What trains (everything else stays frozen):

* **Text prompts** (MaPLe scheme). The class prompt is ``[CLS] c1..cn "of a" <class> "." [SEP]``:
  the ``n_ctx`` context vectors replace the word embeddings right after the leading special
  token and start from the embeddings of the first ``n_ctx`` tokens of ``ctx_init`` ("a
  photo of a" -> "a photo"). Deep prompts ``P_i`` (``prompt_depth - 1`` sets, N(0, 0.02))
  overwrite the same positions at the input of text layers ``1 .. prompt_depth - 1``.
* **Image prompts**. ``Linear_0(ctx)`` (text width -> image width) is appended after the
  image embeddings (CLS + patches, positions added; before any pre-LN, as CLIP's ``ln_pre``);
  ``Linear_i(P_i)`` overwrites these last ``n_ctx`` visual tokens at the input of image layers
  ``1 .. prompt_depth - 1``.
* **Cross-modal adapters** on the final projected features, image ``I`` (B x D) and class
  texts ``T`` (C x D): the image adapter attends from ``I`` to ``T``, the text adapter from
  ``T`` to ``I`` (inputs are 2-D, so attention runs across the batch's images / the class
  prompts). ``adapter_form="figure"`` (default, the paper figure): self-attention -> cross-
  attention (queries: the self-attention output) -> FFN, each post-LN with dropout;
  ``"code"`` (the released code): ``x <- LN1(x + Drop(MHA(x,x,x)) + Drop(MHA(x,y,y)))`` with one
  MHA module for both, then ``x <- LN2(x + Drop(FFN(x)))``.

Logits: ``exp(logit_scale) * cos(I', T')``. Loss (:meth:`Apollo.loss`)::

    L = CE(logits, y) + image_consistency * L_co2(I', I~) + text_consistency * L_co2(T', T~)

with ``I~`` the frozen, prompt-free image features of a second augmented view of each image
and ``T~`` the frozen, prompt-free features of a second text view of each class (the paper
figure uses an LLM-written class description; pass ``text_views``). The released code uses
the image term only (``text_consistency=0``, the default).

``L_co2`` (:func:`co2_loss`, the reference ``co2.loss_cal``), for adapted features ``x`` and
view features ``x~`` (B x D)::

    s_ij  = cos(x_i, x~_j) / T                         (T = 0.2)
    L_con = -mean_i log( e^{s_ii} / sum_{j != i} e^{s_ij} )      (positive not in the denominator)
    P_i(j) ∝ exp(cos(x_i, x_j) / T_con),  Q_i(j) ∝ exp(cos(x~_i, x_j) / T_con),  over j != i  (T_con = 0.04)
    L_co2 = L_con + weight * mean_i D(P_i, Q_i)                  (weight = 2, D = Jensen-Shannon)

Note: the cross-modal adapters attend across the batch, so a test image's logits depend on
the other images of its batch (as in the reference, whose test batch is 100); evaluate with
a fixed batch size and order.

Differences from the released code (on purpose):

* the adapters are trainable (its freezing loop leaves only the prompt learner trainable);
  the MHA outputs are indexed ``[0]``; the consistency loss is actually computed (its
  ``self.co2(...)`` calls an empty ``forward``) on an augmented view the trainer supplies
  (its ``transform_img`` is undefined);
* ``D`` is computed on the normalised ``P_i`` / ``Q_i``. The code extracts columns of the
  row-normalised matrices (dropping the last one), then re-applies ``log_softmax`` to these
  probabilities; ``log_softmax_quirk=True`` re-applies the ``log_softmax`` (over ``j != i``),
  the column/row mix-up is not reproduced;
* ``js`` is the Jensen-Shannon divergence ``(KL(P||M) + KL(Q||M)) / 2`` with ``M = (P + Q) / 2``
  (the code averages log-probabilities instead); ``renyi`` is ``D_alpha(P||Q)`` per row, averaged
  over rows (the code takes the log of a mean over all entries and divides by the batch size).
  ``forward_kl`` is ``KL(Q||P)`` and ``reverse_kl`` ``KL(P||Q)``, the code's naming
  (``nn.KLDivLoss(p, q)`` is ``KL(q||p)``).

The encoders are Hugging Face models used unchanged: the text prompts go in through a forward
hook on the text model's input embeddings and pre-hooks on its layers, the image prompts
through a forward hook on the image embeddings module and pre-hooks on its layers.
:class:`DualEncoder` builds the CLIP-like model from any BERT-like text ``AutoModel`` + tokenizer
and any ViT-like image ``AutoModel`` (ViT, DeiT, DINOv2, CLIP vision) with linear projections
into a shared space; it also has the ``encode_image`` / ``encode_text`` pair the cache methods
(``adapterkit.cache``) use.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.config import _check_fields, bounded, choice, dataclass_from_dict, option
from adapterkit.core.hooks import first, replace_first
from adapterkit.errors import ConfigError, DataError

__all__ = [
    "DIVERGENCES",
    "Apollo",
    "ApolloConfig",
    "CrossModalAdapter",
    "CrossModalLayer",
    "DualEncoder",
    "co2_loss",
    "find_layers",
]

DIVERGENCES = ("js", "forward_kl", "reverse_kl", "symmetric_kl", "renyi")


@dataclass
class ApolloConfig:
    """APoLLo's options (defaults: the reference base-to-novel config)."""

    n_ctx: int = bounded(2, lo=1, hi=64, help="learnable context vectors in the text prompt")
    ctx_init: str = option("a photo of a", help='prompt words; the first n_ctx tokens initialise the context '
                                                '("": random N(0, 0.02) context, prompt "X X ... <class>.")')
    prompt_depth: int = bounded(9, lo=1, hi=1000, help="layers with prompts: the input + deep prompts at "
                                                       "layers 1..prompt_depth-1 of both encoders")
    adapter_heads: int = bounded(8, lo=1, hi=1024, help="attention heads of the cross-modal adapters")
    adapter_ffn: int | None = bounded(None, lo=1, help="FFN width of the adapters (null: 4 x the feature width)")
    adapter_dropout: float = bounded(0.1, lo=0.0, hi=0.99, help="dropout in the adapters")
    adapter_form: str = choice("figure", "code", default="figure",
                               help="figure: self-attn -> cross-attn -> FFN; code: the released code's "
                                    "LN(x + MHA(x,x,x) + MHA(x,y,y)) with one shared MHA")
    use_adapter: bool = option(True, help="apply the cross-modal adapters (false: prompts only, MaPLe)")
    temperature: float = bounded(0.2, lo=0.0, hi=100.0, lo_open=True, help="T of the contrastive term")
    consistency_temperature: float = bounded(0.04, lo=0.0, hi=100.0, lo_open=True, help="T_con of P and Q")
    divergence: str = choice(*DIVERGENCES, default="js", help="divergence between P and Q")
    consistency_weight: float = bounded(2.0, lo=0.0, hi=1e6, help="weight of the divergence inside L_co2")
    renyi_alpha: float = bounded(0.5, lo=0.0, hi=1e3, lo_open=True, help="alpha of the Renyi divergence")
    log_softmax_quirk: bool = option(False, help="re-apply log_softmax to P and Q as the released code does")
    image_consistency: float = bounded(1.0, lo=0.0, hi=1e6, help="weight of L_co2 on the image features")
    text_consistency: float = bounded(0.0, lo=0.0, hi=1e6, help="weight of L_co2 on the class text features "
                                                                "(needs text views)")
    template: str = option("{ctx} {name}.", help="class prompt; {ctx} = ctx_init, {name} = the class name")

    def validate(self) -> None:
        _check_fields(self)
        if "{name}" not in self.template or not self.template.lstrip().startswith("{ctx}"):
            raise ConfigError(f'template must start with "{{ctx}}" and contain "{{name}}", got {self.template!r}')
        if self.renyi_alpha == 1.0:
            raise ConfigError("renyi_alpha must not be 1 (the Renyi divergence of order 1 is the KL divergence: "
                              'use divergence "reverse_kl")')

    @classmethod
    def from_dict(cls, d: dict | None) -> ApolloConfig:
        cfg = dataclass_from_dict(cls, d or {}, "apollo")
        cfg.validate()
        return cfg


# ----------------------------------------------------------------------------- the loss


def _masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log-softmax over the entries outside ``mask``; the masked entries are set to 0
    (finite, so no NaN reaches a gradient; every sum below skips them)."""
    return torch.log_softmax(logits.masked_fill(mask, float("-inf")), dim=1).masked_fill(mask, 0.0)


def _kl_rows(logp: torch.Tensor, logq: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """KL(P_i || Q_i) per row over the kept entries."""
    terms = torch.where(keep, logp.exp() * (logp - logq), torch.zeros_like(logp))
    return terms.sum(1)


def co2_loss(x: torch.Tensor, x_view: torch.Tensor, temperature: float = 0.2, consistency_temperature: float = 0.04,
             divergence: str = "js", weight: float = 2.0, renyi_alpha: float = 0.5,
             log_softmax_quirk: bool = False, return_parts: bool = False):
    """The consistency-guided contrastive loss ``L_con + weight * mean_i D(P_i, Q_i)`` (module docstring).

    ``x``: adapted features (B, D); ``x_view``: the frozen features of the other view (B, D).
    """
    if x.ndim != 2 or x.shape != x_view.shape:
        raise DataError(f"co2_loss needs two (B, D) feature matrices of one shape; got {tuple(x.shape)} and "
                        f"{tuple(x_view.shape)}")
    b = x.shape[0]
    if b < 2:
        raise DataError(f"the contrastive term needs at least 2 examples in a batch (negatives); got {b}")
    if divergence not in DIVERGENCES:
        raise ConfigError(f"unknown divergence {divergence!r}; expected one of {list(DIVERGENCES)}")
    x, x_view = x.float(), x_view.float()
    xn, vn = F.normalize(x, dim=1), F.normalize(x_view, dim=1)
    eye = torch.eye(b, dtype=torch.bool, device=x.device)
    s = xn @ vn.T / temperature
    l_con = (s.masked_fill(eye, float("-inf")).logsumexp(1) - s.diagonal()).mean()
    if weight == 0:
        return (l_con, {"contrastive": l_con, "divergence": l_con * 0}) if return_parts else l_con
    logp = _masked_log_softmax(xn @ xn.T / consistency_temperature, eye)
    logq = _masked_log_softmax(vn @ xn.T / consistency_temperature, eye)
    if log_softmax_quirk:
        logp = _masked_log_softmax(logp.exp(), eye)
        logq = _masked_log_softmax(logq.exp(), eye)
    keep = ~eye
    if divergence == "js":
        logm = torch.logaddexp(logp, logq) - math.log(2.0)
        d = 0.5 * _kl_rows(logp, logm, keep) + 0.5 * _kl_rows(logq, logm, keep)
    elif divergence == "forward_kl":
        d = _kl_rows(logq, logp, keep)
    elif divergence == "reverse_kl":
        d = _kl_rows(logp, logq, keep)
    elif divergence == "symmetric_kl":
        d = 0.5 * _kl_rows(logq, logp, keep) + 0.5 * _kl_rows(logp, logq, keep)
    else:  # renyi
        a = float(renyi_alpha)
        mix = (a * logp + (1 - a) * logq).masked_fill(eye, float("-inf")).logsumexp(1)
        d = mix / (a - 1.0)
    div = d.mean()
    loss = l_con + weight * div
    return (loss, {"contrastive": l_con, "divergence": div}) if return_parts else loss


# ----------------------------------------------------------------------------- cross-modal adapters


class CrossModalLayer(nn.Module):
    """One attention adapter: ``x`` (N, D) attends to itself and to ``y`` (M, D)."""

    def __init__(self, dim: int, heads: int = 8, ffn: int | None = None, dropout: float = 0.1,
                 form: str = "figure"):
        super().__init__()
        if dim % heads:
            raise ConfigError(f"the adapter width {dim} is not divisible by adapter_heads {heads}")
        if form not in ("figure", "code"):
            raise ConfigError(f'adapter_form must be "figure" or "code", got {form!r}')
        self.form = form
        ffn = ffn or 4 * dim
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        if form == "figure":
            self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.norm3 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Linear(ffn, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def _attend(mha: nn.MultiheadAttention, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return mha(q.unsqueeze(0), kv.unsqueeze(0), kv.unsqueeze(0), need_weights=False)[0].squeeze(0)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        drop = self.dropout
        if self.form == "code":
            x = self.norm1(x + drop(self._attend(self.self_attn, x, x)) + drop(self._attend(self.self_attn, x, y)))
            return self.norm2(x + drop(self.ffn(x)))
        x = self.norm1(x + drop(self._attend(self.self_attn, x, x)))
        x = self.norm2(x + drop(self._attend(self.cross_attn, x, y)))
        return self.norm3(x + drop(self.ffn(x)))


class CrossModalAdapter(nn.Module):
    """The image adapter (queries: images, keys/values: class texts) and the text adapter (the reverse)."""

    def __init__(self, dim: int, heads: int = 8, ffn: int | None = None, dropout: float = 0.1, form: str = "figure"):
        super().__init__()
        self.image_adapter = CrossModalLayer(dim, heads, ffn, dropout, form)
        self.text_adapter = CrossModalLayer(dim, heads, ffn, dropout, form)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image_adapter(image, text), self.text_adapter(text, image)


# ----------------------------------------------------------------------------- the dual encoder


def find_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The transformer layer list of an HF encoder: ``path`` if given, else the one ModuleList
    named ``layer`` / ``layers`` under an ``encoder`` (BERT, ViT, DINOv2, CLIP), else anywhere."""
    if path is not None:
        mod = model.get_submodule(path)
        if not isinstance(mod, nn.ModuleList):
            raise ConfigError(f"{path!r} in {type(model).__name__} is a {type(mod).__name__}, not a ModuleList of layers")
        return path, mod
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and re.search(r"(?:^|\.)layers?$", n)]
    under_encoder = [(n, m) for n, m in found if re.search(r"(?:^|\.)encoder\.layers?$", n)]
    found = under_encoder or found
    if len(found) != 1:
        raise ConfigError(f"cannot tell the transformer layers of {type(model).__name__} (candidates: "
                          f"{[n for n, _ in found]}); pass the layer list's module path")
    return found[0]


def _find_embeddings(model: nn.Module, path: str | None = None) -> nn.Module:
    if path is not None:
        return model.get_submodule(path)
    hits = [(n, m) for n, m in model.named_modules() if re.search(r"(?:^|\.)embeddings$", n)]
    if len(hits) != 1:
        raise ConfigError(f"cannot find one embeddings module in {type(model).__name__} (found {[n for n, _ in hits]}); "
                          "pass image_embeddings")
    return hits[0][1]


def _width(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("hidden_size", "d_model", "dim"):
        if isinstance(getattr(cfg, attr, None), int):
            return int(getattr(cfg, attr))
    raise ConfigError(f"cannot tell the hidden width of {type(model).__name__} (its config has no hidden_size)")


class DualEncoder(nn.Module):
    """A CLIP-like model from two HF encoders: ``encode_text`` / ``encode_image`` give (N, D)
    features in a shared space (linear projections; not normalised).

    ``text_pool``: ``mean`` (masked mean of the last hidden states, sentence-transformers'
    MiniLM), ``cls`` (token 0) or ``pooler`` (``pooler_output``); ``image_pool``: ``cls``
    (token 0 of ``last_hidden_state``: ViT / DINOv2 after their final LN), ``pooler`` or
    ``mean`` (over every token). ``embed_dim``: the shared width (projections made here,
    random init); or pass ``text_projection`` / ``image_projection`` modules (e.g. trained ones).
    """

    def __init__(self, text_model: nn.Module, tokenizer, image_model: nn.Module, embed_dim: int | None = None,
                 text_projection: nn.Module | None = None, image_projection: nn.Module | None = None,
                 text_pool: str = "mean", image_pool: str = "cls", logit_scale: float = math.log(100.0),
                 max_length: int = 77, text_layers: str | None = None, image_layers: str | None = None,
                 image_embeddings: str | None = None):
        super().__init__()
        if text_pool not in ("mean", "cls", "pooler") or image_pool not in ("cls", "pooler", "mean"):
            raise ConfigError(f"text_pool must be mean|cls|pooler and image_pool cls|pooler|mean; got {text_pool!r}, "
                              f"{image_pool!r}")
        if not callable(getattr(text_model, "get_input_embeddings", None)):
            raise ConfigError(f"the text model {type(text_model).__name__} has no get_input_embeddings()")
        self.text_model, self.image_model, self.tokenizer = text_model, image_model, tokenizer
        self.text_width, self.image_width = _width(text_model), _width(image_model)
        if embed_dim is None and (text_projection is None or image_projection is None):
            if self.text_width != self.image_width:
                raise ConfigError(f"text width {self.text_width} != image width {self.image_width}: set embed_dim "
                                  "or pass projections")
        self.text_projection = text_projection if text_projection is not None else (
            nn.Linear(self.text_width, embed_dim, bias=False) if embed_dim else nn.Identity())
        self.image_projection = image_projection if image_projection is not None else (
            nn.Linear(self.image_width, embed_dim, bias=False) if embed_dim else nn.Identity())
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        self.text_pool, self.image_pool, self.max_length = text_pool, image_pool, int(max_length)
        self.text_layers = find_layers(text_model, text_layers)[1]
        self.image_layers = find_layers(image_model, image_layers)[1]
        self.image_embeddings = _find_embeddings(image_model, image_embeddings)
        with torch.no_grad():
            probe = torch.zeros(1, self.text_width)
            self.embed_dim = int(self.text_projection(probe).shape[-1])
            if int(self.image_projection(torch.zeros(1, self.image_width)).shape[-1]) != self.embed_dim:
                raise ConfigError("the text and image projections map to different widths")

    def tokenize(self, texts: Sequence[str]) -> dict:
        dev = self.logit_scale.device
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v.to(dev) for k, v in tok.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def encode_text(self, texts) -> torch.Tensor:
        """Features (N, D) of a list of strings or of a tokenizer output (``input_ids``, ``attention_mask``)."""
        tok = self.tokenize(texts) if isinstance(texts, (list, tuple)) else texts
        out = self.text_model(**tok)
        if self.text_pool == "pooler":
            pooled = out.pooler_output
        elif self.text_pool == "cls":
            pooled = out.last_hidden_state[:, 0]
        else:
            h = out.last_hidden_state
            m = tok.get("attention_mask", torch.ones(h.shape[:2], device=h.device)).to(h.dtype).unsqueeze(-1)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return self.text_projection(pooled)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.image_model(pixel_values=pixel_values)
        if self.image_pool == "pooler":
            pooled = out.pooler_output
        elif self.image_pool == "cls":
            pooled = out.last_hidden_state[:, 0]
        else:
            pooled = out.last_hidden_state.mean(1)
        return self.image_projection(pooled)


# ----------------------------------------------------------------------------- APoLLo


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise ConfigError("a transformer layer was called without hidden states")


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor):
    if args:
        return (h,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


class Apollo(nn.Module):
    """APoLLo on a :class:`DualEncoder` (frozen) for the classes ``classnames``.

    ``forward(pixels)`` -> logits (B, C); :meth:`loss` -> the training loss. Only the prompts,
    their projections and the adapters are trainable (:meth:`trainable_parameters`).
    ``set_classes(names)`` switches the class set (base -> novel) without touching the weights.
    """

    def __init__(self, clip: DualEncoder, classnames: Sequence[str], config: ApolloConfig | dict | None = None,
                 text_views: Sequence[str] | None = None):
        super().__init__()
        cfg = config if isinstance(config, ApolloConfig) else ApolloConfig.from_dict(config)
        cfg.validate()
        self.config, self.clip = cfg, clip
        clip.requires_grad_(False)
        n_text, n_image = len(clip.text_layers), len(clip.image_layers)
        if cfg.prompt_depth > min(n_text, n_image):
            raise ConfigError(f"prompt_depth {cfg.prompt_depth} exceeds the encoders' depth (text {n_text}, image "
                              f"{n_image} layers)")
        dt, di, n = clip.text_width, clip.image_width, cfg.n_ctx
        emb = clip.text_model.get_input_embeddings()
        if cfg.ctx_init:
            ids = clip.tokenizer(cfg.ctx_init, add_special_tokens=False)["input_ids"]
            if len(ids) < n:
                raise ConfigError(f"ctx_init {cfg.ctx_init!r} has {len(ids)} tokens; n_ctx {n} needs at least that many")
            with torch.no_grad():
                ctx = emb(torch.tensor(ids[:n], device=emb.weight.device)).detach().clone().float().cpu()
            self.ctx_words = cfg.ctx_init
        else:
            ctx = torch.empty(n, dt).normal_(0.0, 0.02)
            self.ctx_words = " ".join(["X"] * n)
        self.ctx = nn.Parameter(ctx)
        self.deep_text = nn.ParameterList([nn.Parameter(torch.empty(n, dt).normal_(0.0, 0.02))
                                           for _ in range(cfg.prompt_depth - 1)])
        self.visual_proj = nn.ModuleList([nn.Linear(dt, di) for _ in range(cfg.prompt_depth)])  # 0: shallow
        d = clip.embed_dim
        self.adapter = CrossModalAdapter(d, cfg.adapter_heads, cfg.adapter_ffn, cfg.adapter_dropout,
                                         cfg.adapter_form) if cfg.use_adapter else None
        self._prompting = False
        self._handles = []
        self._attach()
        self.set_classes(classnames, text_views)
        self.to(clip.logit_scale.device)

    # --- wiring ---------------------------------------------------------------------------------
    def _attach(self) -> None:
        c = self.clip
        self._handles.append(c.text_model.get_input_embeddings().register_forward_hook(self._text_input_hook))
        self._handles.append(c.image_embeddings.register_forward_hook(self._image_input_hook))
        for i in range(1, self.config.prompt_depth):
            self._handles.append(c.text_layers[i].register_forward_pre_hook(self._text_deep(i), with_kwargs=True))
            self._handles.append(c.image_layers[i].register_forward_pre_hook(self._image_deep(i), with_kwargs=True))

    def detach_hooks(self) -> None:
        """Remove every hook from the encoders (the dual encoder is as it was)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def prompting(self):
        """Inside, the encoders run with APoLLo's prompts; outside they are the frozen originals."""
        old, self._prompting = self._prompting, True
        try:
            yield
        finally:
            self._prompting = old

    def _replace(self, h: torch.Tensor, start: int, p: torch.Tensor) -> torch.Tensor:
        n = p.shape[0]
        p = p.to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
        end = h.shape[1] if start < 0 else start + n
        s = h.shape[1] - n if start < 0 else start
        return torch.cat([h[:, :s], p, h[:, end:]], dim=1)

    def _text_input_hook(self, module, args, out):
        if not self._prompting:
            return None
        return replace_first(out, self._replace(first(out), self._ctx_start, self.ctx))

    def _image_input_hook(self, module, args, out):
        if not self._prompting:
            return None
        h = first(out)
        p = self.visual_proj[0](self.ctx).to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
        return replace_first(out, torch.cat([h, p], dim=1))

    def _text_deep(self, i: int):
        def hook(module, args, kwargs):
            if not self._prompting:
                return None
            return _with_hidden(args, kwargs, self._replace(_hidden(args, kwargs), self._ctx_start, self.deep_text[i - 1]))
        return hook

    def _image_deep(self, i: int):
        def hook(module, args, kwargs):
            if not self._prompting:
                return None
            p = self.visual_proj[i](self.deep_text[i - 1])
            return _with_hidden(args, kwargs, self._replace(_hidden(args, kwargs), -1, p))
        return hook

    # --- classes ---------------------------------------------------------------------------------
    def set_classes(self, classnames: Sequence[str], text_views: Sequence[str] | None = None) -> None:
        """Tokenise the class prompts (and the optional per-class text views) for ``classnames``."""
        names = [str(c).replace("_", " ") for c in classnames]
        if len(names) < 1:
            raise DataError("APoLLo needs at least one class name")
        if text_views is not None and len(text_views) != len(names):
            raise DataError(f"{len(text_views)} text views for {len(names)} classes")
        prompts = [self.config.template.format(ctx=self.ctx_words, name=c) for c in names]
        tok = self.clip.tokenize(prompts)
        ids = tok["input_ids"]
        special = set(getattr(self.clip.tokenizer, "all_special_ids", []) or [])
        self._ctx_start = 1 if int(ids[0, 0]) in special else 0
        ctx_ids = self.clip.tokenizer(self.ctx_words, add_special_tokens=False)["input_ids"][: self.config.n_ctx]
        want = torch.tensor(ctx_ids, device=ids.device)
        s = self._ctx_start
        if ids.shape[1] < s + len(ctx_ids) or not bool((ids[:, s:s + len(ctx_ids)] == want).all()):
            raise ConfigError(f"the class prompts do not start with the context tokens of {self.ctx_words!r} "
                              f"(template {self.config.template!r}); use a template starting with {{ctx}}")
        self.classnames, self._tokens = names, tok
        self._view_tokens = self.clip.tokenize(list(text_views)) if text_views is not None else None

    # --- forward ---------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()  # the frozen encoders keep their pretrained dropout off
        return self

    def text_features(self) -> torch.Tensor:
        with self.prompting():
            return self.clip.encode_text(self._tokens)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.prompting():
            return self.clip.encode_image(pixels)

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(I', T'): adapted image (B, D) and class text (C, D) features."""
        img, txt = self.image_features(pixels), self.text_features()
        if self.adapter is not None:
            img, txt = self.adapter(img.float(), txt.float())
        return img, txt

    def logits_from(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        scale = self.clip.logit_scale.exp()
        return scale * F.normalize(img.float(), dim=-1) @ F.normalize(txt.float(), dim=-1).T

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.logits_from(*self.features(pixels))

    def loss(self, pixels: torch.Tensor, labels: torch.Tensor, pixels_view: torch.Tensor | None = None,
             return_parts: bool = False):
        """``CE + image_consistency * L_co2(I', I~) + text_consistency * L_co2(T', T~)``.

        ``pixels_view``: a second augmented view of the same images (frozen, prompt-free
        encoder); required when ``image_consistency > 0``.
        """
        cfg = self.config
        img, txt = self.features(pixels)
        ce = F.cross_entropy(self.logits_from(img, txt), labels)
        parts = {"ce": ce}
        total = ce
        kw = dict(temperature=cfg.temperature, consistency_temperature=cfg.consistency_temperature,
                  divergence=cfg.divergence, weight=cfg.consistency_weight, renyi_alpha=cfg.renyi_alpha,
                  log_softmax_quirk=cfg.log_softmax_quirk)
        if cfg.image_consistency > 0:
            if pixels_view is None:
                raise DataError("image_consistency > 0 needs pixels_view, a second augmented view of the batch")
            with torch.no_grad():
                view = self.clip.encode_image(pixels_view)
            parts["co2_image"] = co2_loss(img, view, **kw)
            total = total + cfg.image_consistency * parts["co2_image"]
        if cfg.text_consistency > 0:
            if self._view_tokens is None:
                raise ConfigError("text_consistency > 0 needs text_views (one text per class) in set_classes")
            with torch.no_grad():
                tview = self.clip.encode_text(self._view_tokens)
            parts["co2_text"] = co2_loss(txt, tview, **kw)
            total = total + cfg.text_consistency * parts["co2_text"]
        return (total, parts) if return_parts else total

    def prompt_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors (prompts, projections, adapters), for saving."""
        return {n: p.detach().cpu() for n, p in self.named_parameters() if p.requires_grad}
