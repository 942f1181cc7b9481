"""SuS-X support sets: SuS-LC retrieval from a local pool by text query, SuS-SD through a given pipeline."""

from __future__ import annotations

import pytest
import torch

from adapterkit.cache.common import l2_normalize
from adapterkit.cache.susx import generate_support_images, retrieve_support_set, support_cache, sus_lc_cache
from adapterkit.cache.tipx import search_tipx, tipx_logits
from adapterkit.errors import ConfigError, DataError


def _pool(seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = l2_normalize(torch.randn(40, 6, generator=g))
    queries = l2_normalize(torch.randn(3, 6, generator=g))
    return pool, queries


def test_retrieval_returns_the_nearest_pool_items():
    pool, q = _pool()
    idx, scores = retrieve_support_set(pool, q, shots=4)
    assert idx.shape == (3, 4) and scores.shape == (3, 4)
    sim = q @ pool.T
    for c in range(3):  # brute force: the 4 most similar pool rows, best first
        order = sorted(range(40), key=lambda p: -float(sim[c, p]))[:4]
        assert idx[c].tolist() == order
        assert torch.allclose(scores[c], sim[c, order])
    # unnormalised inputs give the same ranking (cosine similarity)
    idx2, _ = retrieve_support_set(pool * 3.0, q * 0.2, shots=4)
    assert torch.equal(idx, idx2)


def test_unique_retrieval_gives_each_item_to_its_nearest_class():
    pool, q = _pool(1)
    idx, _ = retrieve_support_set(pool, q, shots=3, unique=True)
    owner = (q @ pool.T).argmax(0)
    assert all(int(owner[p]) == c for c in range(3) for p in idx[c].tolist())
    assert len(set(idx.flatten().tolist())) == 9
    with pytest.raises(DataError, match="nearest class of only"):
        retrieve_support_set(pool, q, shots=30, unique=True)
    with pytest.raises(DataError, match="share D"):
        retrieve_support_set(pool, q[:, :4], shots=2)
    with pytest.raises(ConfigError, match="shots"):
        retrieve_support_set(pool, q, shots=0)


def test_sus_lc_cache_feeds_tipx():
    # pool: 3 clusters around the class text directions; the cache must pick each class's own cluster
    g = torch.Generator().manual_seed(2)
    w = l2_normalize(torch.randn(8, 3, generator=g), dim=0)  # (D, C) zero-shot weights
    labels = torch.arange(3).repeat_interleave(10)
    pool = l2_normalize(w.T[labels] + 0.3 * torch.randn(30, 8, generator=g))
    cache, idx = sus_lc_cache(pool, w, shots=5)
    assert cache.keys.shape == (15, 8) and cache.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert (labels[idx] == torch.arange(3).unsqueeze(1)).float().mean() > 0.9
    assert torch.allclose(cache.keys, pool[idx.reshape(-1)])
    assert cache.keys_by_class().shape == (3, 5, 8)
    q = l2_normalize(w.T[labels] + 0.3 * torch.randn(30, 8, generator=g))
    grid = {"alpha": [0.5, 1.0], "beta": [1.0, 5.0], "gamma": [0.1, 1.0]}
    params, _ = search_tipx(q, labels, w, cache.keys, cache.values, grid)
    logits = tipx_logits(q, w, cache.keys, cache.values, params["alpha"], params["beta"], params["gamma"])
    assert logits.shape == (30, 3)


def test_support_cache_shape_check():
    with pytest.raises(DataError, match=r"\(C=3, K, D\)"):
        support_cache(torch.zeros(2, 4, 5), 3)


class FakePipeline:
    """Stands in for a diffusers text-to-image pipeline (no diffusion model installs offline)."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, num_images_per_prompt, generator, **kw):
        self.calls.append((prompt, num_images_per_prompt, kw))
        seed = int(torch.randint(0, 1000, (1,), generator=generator))
        return type("Out", (), {"images": [f"{prompt[0]}#{seed}#{i}" for i in range(num_images_per_prompt)]})()


def test_sus_sd_uses_the_given_pipeline_and_needs_one():
    pipe = FakePipeline()
    out = generate_support_images(pipe, ["cat", "dog"], shots=3, guidance_scale=9.5)
    assert [len(x) for x in out] == [3, 3]
    assert pipe.calls[0] == (["A photo of a cat."], 3, {"guidance_scale": 9.5})
    assert out[1][0].startswith("A photo of a dog.")
    assert generate_support_images(FakePipeline(), ["cat", "dog"], shots=3, guidance_scale=9.5) == out  # seeded
    with pytest.raises(ConfigError, match="needs a text-to-image diffusion pipeline"):
        generate_support_images(None, ["cat"], shots=1)
