"""SuS-X support-set construction (Udandarao et al., 2023; vishaal27/SuS-X): a cache from class names only.

SuS-X never sees a labelled target image. It builds the support set ("SuS") for
TIP-X (see :mod:`adapterkit.cache.tipx`) from the class names:

* **SuS-LC** (retrieval): for each class, embed its name prompts with the text tower and
  take the K pool images whose image embeddings are closest to that query. The reference
  retrieves from LAION-5B; :func:`retrieve_support_set` retrieves from any local image
  pool (here: unlabelled pictures the user has, embedded once with ``encode_image``).
* **SuS-SD** (generation): K images per class from Stable Diffusion v1-4 prompted with the
  class name. :func:`generate_support_images` runs any diffusers-style text-to-image
  pipeline the caller passes; no diffusion model installs offline here, so it is only
  tested with a stand-in pipeline and the SD variant is not measured in this repository.

The retrieved (or generated) images, labelled with the class whose query found them,
become the cache keys; :func:`support_cache` returns a :class:`~adapterkit.cache.common.CacheModel`
ordered class-major, which TIP-X, Tip-Adapter, CapS-Adapter and DualAdapter all take.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from adapterkit.cache.common import CacheModel, l2_normalize, one_hot
from adapterkit.errors import ConfigError, DataError

__all__ = ["generate_support_images", "retrieve_support_set", "support_cache", "sus_lc_cache"]


def retrieve_support_set(
    pool_features: torch.Tensor, query_features: torch.Tensor, shots: int, unique: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (C, K) of the K pool items nearest (cosine) to each class query, best first.

    ``pool_features``: (P, D) image embeddings; ``query_features``: (C, D) text embeddings
    (one query per class, e.g. a prompt-ensemble mean). ``unique=False`` retrieves for
    each class independently, as SuS-LC does (a pool item may serve two classes);
    ``unique=True`` lets each pool item serve only the class it is most similar to.
    Returns (indices, similarities), both (C, K). One ``topk`` over the (C, P) matrix.
    """
    pool = l2_normalize(torch.as_tensor(pool_features).float())
    q = l2_normalize(torch.as_tensor(query_features).float().to(pool.device))
    if pool.ndim != 2 or q.ndim != 2 or pool.shape[1] != q.shape[1]:
        raise DataError(
            f"pool features (P, D) and class queries (C, D) must share D; got {tuple(pool.shape)} and {tuple(q.shape)}"
        )
    if shots < 1:
        raise ConfigError(f"shots must be >= 1, got {shots}")
    sim = q @ pool.T  # (C, P)
    if unique:
        owner = sim.argmax(0)  # the class each pool item is closest to
        keep = owner.unsqueeze(0) == torch.arange(q.shape[0], device=sim.device).unsqueeze(1)
        avail = keep.sum(1)
        if bool((avail < shots).any()):
            c = int((avail < shots).nonzero()[0])
            raise DataError(f"class {c} is the nearest class of only {int(avail[c])} pool items; {shots} requested (use unique=False)")
        sim = sim.masked_fill(~keep, float("-inf"))
    if shots > pool.shape[0]:
        raise DataError(f"the pool has {pool.shape[0]} items; {shots} per class requested")
    scores, idx = sim.topk(shots, dim=1)
    return idx, scores


def support_cache(keys: torch.Tensor, num_classes: int) -> CacheModel:
    """A class-major cache from (C, K, D) support features (class c's K keys first)."""
    keys = torch.as_tensor(keys).float()
    if keys.ndim != 3 or keys.shape[0] != num_classes:
        raise DataError(f"support keys must be (C={num_classes}, K, D); got {tuple(keys.shape)}")
    c, k, _ = keys.shape
    labels = torch.arange(c, device=keys.device).repeat_interleave(k)
    return CacheModel(keys=l2_normalize(keys.reshape(c * k, -1)), values=one_hot(labels, c), labels=labels, num_classes=c)


def sus_lc_cache(
    pool_features: torch.Tensor, text_weights: torch.Tensor, shots: int, unique: bool = False
) -> tuple[CacheModel, torch.Tensor]:
    """SuS-LC: retrieve ``shots`` pool images per class with the zero-shot text weights (D, C) as queries.

    Returns the cache (keys = the retrieved pool embeddings, values = the querying class)
    and the retrieved pool indices (C, K), e.g. to check them against true labels.
    """
    w = torch.as_tensor(text_weights).float()
    idx, _ = retrieve_support_set(pool_features, w.T, shots, unique)
    pool = l2_normalize(torch.as_tensor(pool_features).float())
    cache = support_cache(pool[idx], w.shape[1])
    cache.index = idx.reshape(-1)
    return cache, idx


def generate_support_images(
    pipeline: Callable[..., Any],
    class_names: Sequence[str],
    shots: int,
    template: str = "A photo of a {}.",
    seed: int = 0,
    **pipeline_kwargs: Any,
) -> list[list[Any]]:
    """SuS-SD: ``shots`` generated images per class from a text-to-image pipeline.

    ``pipeline`` is a diffusers ``StableDiffusionPipeline`` (SuS-X uses SD v1-4, e.g.
    ``StableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4")``; it needs
    the model weights, which are not available offline here) or anything called as
    ``pipeline(prompt=[...], num_images_per_prompt=K, generator=g, **kw)`` that returns an
    object with ``.images``. Returns a list per class of K images; embed them with
    ``encode_image`` and pass the (C, K, D) stack to :func:`support_cache`.
    """
    if pipeline is None:
        raise ConfigError(
            "SuS-SD needs a text-to-image diffusion pipeline (e.g. diffusers StableDiffusionPipeline with "
            "CompVis/stable-diffusion-v1-4 weights); none is available offline: use SuS-LC retrieval instead"
        )
    if "{}" not in template:
        raise ConfigError("the SuS-SD prompt template needs a '{}' for the class name")
    out = []
    for i, name in enumerate(class_names):  # one pipeline call per class: K images in one batch
        gen = torch.Generator().manual_seed(int(seed) + i)
        result = pipeline(prompt=[template.format(name)], num_images_per_prompt=int(shots), generator=gen, **pipeline_kwargs)
        images = list(getattr(result, "images", result))
        if len(images) != shots:
            raise DataError(f"the pipeline returned {len(images)} images for class {name!r}; {shots} requested")
        out.append(images)
    return out
