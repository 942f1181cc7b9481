"""MetaAdapter (Hou et al., ICASSP 2021; ``train_maml_epoch`` of the reference code): a shared
adapter initialisation meta-learned over the source languages, first order, then fine-tuned
on a low-resource target language (an ordinary ASR run with ``init_from`` the output folder).

Per meta-batch (one batch of ``batch_size`` rows from every source language, each split in
two halves), with θ the trainable weights (the shared adapter) and one Adam optimiser
(lr ``inner_lr``, betas ``(0, 0.999)``) whose state carries across languages and meta-batches::

    for each source language l:
        θ0 = θ;  one Adam step on half 1;  θ1 = θ;  one Adam step on half 2;  Δ_l = θ - θ1;  θ = θ0
    θ ← θ0 + ε · mean_l Δ_l,      ε = meta_lr · (1 − progress)         (progress = meta-batch / all)

Only the adapter trains (configure a ``sharing: shared`` adapter over the source tasks; the
backbone stays frozen). The number of meta-batches per epoch is the smallest source's
``len(train) // batch_size``; each language's rows follow a permutation seeded by
(seed, epoch, language), so a run is deterministic. The output folder holds
``trainable.safetensors`` (what ``init_from`` reads), ``meta_log.csv`` (the two half losses
per language and meta-batch) and ``meta.json``.

::

    from adapterkit.audio.asr import load_config
    from adapterkit.audio.meta_adapter import MetaConfig, meta_train
    meta_train(load_config({... "data": {"tasks": ["es", "fr", "ru"], ...},
                            "adapters": [{"method": "pfeiffer", "sharing": "shared"}]}),
               "runs/meta", MetaConfig(epochs=2, batch_size=10))
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapterkit.core.config import bounded
from adapterkit.errors import ConfigError


@dataclass
class MetaConfig:
    epochs: int = bounded(2, lo=1, hi=100_000)
    batch_size: int = bounded(8, lo=2, hi=65536)       # rows per language per meta-batch (two halves)
    inner_lr: float = bounded(1e-3, lo=0.0, hi=10.0, lo_open=True)
    beta2: float = bounded(0.999, lo=0.0, hi=1.0)       # Adam betas (0, beta2)
    meta_lr: float = bounded(1.0, lo=0.0, hi=10.0)
    seed: int = bounded(0, lo=0, hi=2**63 - 1)


def meta_step(params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
              halves: Sequence[tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]],
              epsilon: float) -> list[tuple[float, float]]:
    """One first-order meta update of ``params`` in place. ``halves``: per language, the two
    closures returning the loss on half 1 and half 2. Returns the (half 1, half 2) losses."""
    if not halves:
        raise ConfigError("meta_step needs at least one language")
    theta0 = [p.detach().clone() for p in params]
    deltas = [torch.zeros_like(p) for p in theta0]
    losses = []
    for first, second in halves:
        pair = []
        for k, closure in enumerate((first, second)):
            optimizer.zero_grad(set_to_none=True)
            loss = closure()
            loss.backward()
            if k == 1:
                before = [p.detach().clone() for p in params]
            optimizer.step()
            pair.append(float(loss.detach()))
        with torch.no_grad():
            for d, p, b, t0 in zip(deltas, params, before, theta0):
                d.add_(p - b)
                p.copy_(t0)
        losses.append((pair[0], pair[1]))
    with torch.no_grad():
        for p, t0, d in zip(params, theta0, deltas):
            p.copy_(t0 + epsilon * d / len(halves))
    optimizer.zero_grad(set_to_none=True)
    return losses


def meta_train(cfg, output_dir, meta: MetaConfig | None = None, domain=None) -> dict:
    """Meta-train the trainable weights (the adapter) of an ASR config over its tasks (the
    source languages); write ``trainable.safetensors`` to ``output_dir``. Returns a summary."""
    from safetensors.torch import save_file

    from adapterkit.audio.asr import ASRDomain

    meta = meta or MetaConfig()
    if not cfg.adapter_configs():
        raise ConfigError("MetaAdapter meta-trains an adapter: the config needs adapters (e.g. one shared pfeiffer)")
    torch.manual_seed(meta.seed)
    dom = domain if domain is not None else ASRDomain(cfg)
    named = [(n, p) for n, p in dom.model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("MetaAdapter: the model has no trainable weights")
    if any(not n.startswith("adapterkit.") for n, _ in named):
        bad = next(n for n, _ in named if not n.startswith("adapterkit."))
        raise ConfigError(f"MetaAdapter trains only adapters; {bad!r} of the backbone is trainable")
    params = [p for _, p in named]
    opt = torch.optim.Adam(params, lr=meta.inner_lr, betas=(0.0, meta.beta2))
    tasks = dom.tasks
    per_epoch = min(dom.num_train(t) for t in tasks) // meta.batch_size
    if per_epoch < 1:
        raise ConfigError(f"MetaAdapter: batch_size {meta.batch_size} exceeds the smallest source's "
                          f"{min(dom.num_train(t) for t in tasks)} training utterances")
    total = per_epoch * meta.epochs
    half = meta.batch_size // 2
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = []
    t0 = time.time()
    dom.model.train()
    step = 0
    for epoch in range(meta.epochs):
        perms = {t: np.random.default_rng([meta.seed, epoch, i]).permutation(dom.num_train(t))
                 for i, t in enumerate(tasks)}
        for b in range(per_epoch):
            closures = []
            for ti, t in enumerate(tasks):
                rows = perms[t][b * meta.batch_size:(b + 1) * meta.batch_size]

                def make(r, ti=ti, t=t):
                    return lambda: dom.loss(dom.train_batch(t, r, 0, 0, 1), ti)
                closures.append((make(rows[:half]), make(rows[half:])))
            eps = meta.meta_lr * (1.0 - step / total)
            losses = meta_step(params, opt, closures, eps)
            for t, (l1, l2) in zip(tasks, losses):
                log.append({"step": step, "epoch": epoch, "task": t, "loss_half1": l1, "loss_half2": l2,
                            "epsilon": eps})
            step += 1
    state = {n: p.detach().cpu().contiguous() for n, p in named}
    save_file(state, str(out / "trainable.safetensors"))
    with open(out / "meta_log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(log[0]))
        w.writeheader()
        w.writerows(log)
    summary = {"meta": dataclasses.asdict(meta), "sources": tasks, "meta_batches": total,
               "train_sizes": {t: dom.num_train(t) for t in tasks}, "seconds": time.time() - t0,
               "trainable_parameters": int(sum(p.numel() for p in params))}
    (out / "meta.json").write_text(json.dumps(summary, indent=1))
    return summary


__all__ = ["MetaConfig", "meta_step", "meta_train"]
