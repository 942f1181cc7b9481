"""The recommendation domain on the training engine (Adapter4Rec, ``domain: rec``).

A run is two engine runs (see :mod:`adapterkit.rec.pipeline` for the config):

1. source pre-training (``OUTPUT/source``), when the config has a ``source`` domain and the
   method is not ``scratch``: the item encoder's projection and the SASRec user encoder
   train (the text model too unless ``source_train.freeze_text``);
2. target adaptation (``OUTPUT/target``): a model over the target catalogue starts from the
   source run's selected weights (the ones its test reports), the method's adapters are
   attached and trained.

Each stage resumes exactly after a kill (its checkpoints record the run config and, for
the target, a fingerprint of the weights it started from); rerunning a finished source
stage only re-tests it. Without an output folder the runs go to a temporary one.

:class:`RecDomain`: the training rows are the users' leave-one-out training sequences
(all but the last two items; users with fewer than two are skipped), the loss the BCE
next-item loss with one sampled negative per position (sampled for the whole global batch
from the batch's seed, so a multi-process run sees the negatives a single process sees);
the evaluation rows are the users (``val``: the second-to-last item from the items before
it, ``test``: the last item), a prediction is the 1-based full-ranking rank of the target
with the history masked, and the metrics HR@10 / NDCG@10 (fractions in [0, 1]);
validation selection maximises NDCG@10.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from adapterkit.core.base import get_container, trainable_report
from adapterkit.core.config import bounded, choice
from adapterkit.engine.config import MAX_BATCH, EvalConfig, TrainConfig
from adapterkit.engine.domain import Domain
from adapterkit.engine.engine import LOG_NAME, Engine, lock_output, task_schedule, versions
from adapterkit.errors import ConfigError, did_you_mean
from adapterkit.rec.data import RecData
from adapterkit.rec.metrics import rank_metrics
from adapterkit.rec.model import REC_METHODS, Adapter4Rec, attach_rec_method, sample_negatives
from adapterkit.rec.pipeline import (
    DATA_DEFAULTS,
    MODEL_DEFAULTS,
    build_model,
    eval_tensors,
    left_pad,
    load_domain,
    load_text_model,
    split_leave_one_out,
    user_ranks,
)

K = 10  # HR@K / NDCG@K
TOP_KEYS = ("domain", "source", "target", "model", "source_train", "target_train", "eval", "method", "adapter",
            "train_layernorms", "output_dir", "name")


# ----------------------------------------------------------------------------- config


@dataclass
class RecTrainConfig(TrainConfig):
    """``target_train``: the engine's train keys with the reference loop's defaults (AdamW with
    torch's eps, one weight decay for every weight, a constant learning rate, no clipping)."""

    epochs: int = bounded(5, lo=1, hi=100_000)
    batch_size: int = bounded(64, lo=1, hi=MAX_BATCH)
    lr: float | None = bounded(1e-3, lo=0.0, hi=10.0, lo_open=True)
    schedule: str = choice("linear", "cosine", "constant", default="constant")
    warmup_ratio: float = bounded(0.0, lo=0.0, hi=1.0)
    weight_decay: float = bounded(0.0, lo=0.0, hi=10.0)     # on every trainable weight (biases and norms too)
    adam_eps: float = bounded(1e-8, lo=0.0, hi=1.0, lo_open=True)
    grad_clip: float = bounded(0.0, lo=0.0, hi=1e6)


@dataclass
class RecSourceTrainConfig(RecTrainConfig):
    """``source_train``: as ``target_train``, and whether the text model stays frozen."""

    freeze_text: bool = True


@dataclass
class RecEvalConfig(EvalConfig):
    batch_size: int = bounded(256, lo=1, hi=MAX_BATCH)      # users per evaluation batch


@dataclass
class RecRunConfig:
    """A validated rec config (:func:`load_config`); ``raw`` is the config as given."""

    raw: dict
    model: dict
    source: dict | None
    target: dict
    source_train: RecSourceTrainConfig
    target_train: RecTrainConfig
    eval: RecEvalConfig
    method: str = "houlsby"
    adapter: dict | None = None
    train_layernorms: bool = True
    name: str = "rec"
    output_dir: str | None = None
    preset: str | None = None       # (``adapterkit train --preset``: the rec domain has none)
    adapters: list | None = field(default=None, repr=False)

    def validate(self) -> None:
        if self.preset is not None:
            raise ConfigError(f"the rec domain has no presets (got --preset {self.preset!r}): set \"method\" "
                              f"({', '.join(REC_METHODS)}) and \"adapter\" in the config")


def load_config(src) -> RecRunConfig:
    """Load and validate a rec config (a YAML/JSON path or a dict): one ConfigError per problem."""
    from adapterkit.core.config import dataclass_from_dict
    from adapterkit.vision.common import section, top_level

    if isinstance(src, RecRunConfig):
        return src
    if not isinstance(src, dict):
        from adapterkit.text.config import read_config_dict

        src = read_config_dict(src)
    top_level(src, TOP_KEYS, "rec")
    if src.get("domain", "rec") != "rec":
        raise ConfigError(f'a rec config has domain "rec", got {src["domain"]!r}')
    method = src.get("method", "houlsby")
    if not isinstance(method, str) or method not in REC_METHODS:
        raise ConfigError(f'unknown rec method {method!r}{did_you_mean(str(method), REC_METHODS)}; known: '
                          f"{list(REC_METHODS)}")
    adapter = src.get("adapter")
    if adapter is not None and not isinstance(adapter, dict):
        raise ConfigError(f'"adapter" must be a mapping {{item: ..., user: ...}} or null, got {adapter!r}')
    tl = src.get("train_layernorms", True)
    if not isinstance(tl, bool):
        raise ConfigError(f'"train_layernorms" must be true or false, got {tl!r}')
    name = src.get("name") or "rec"
    out = src.get("output_dir")
    if not isinstance(name, str) or (out is not None and not isinstance(out, (str, os.PathLike))):
        raise ConfigError('"name" must be a string and "output_dir" a path or null')
    m = section(src.get("model"), MODEL_DEFAULTS, "model")
    if src.get("target") is None:
        raise ConfigError('the rec config needs a "target" domain ({source: bbc|mind|amazon|movielens, ...})')
    return RecRunConfig(
        raw=json.loads(json.dumps(src, default=str)), model=m,
        source=section(src["source"], DATA_DEFAULTS, "source") if src.get("source") is not None else None,
        target=section(src["target"], DATA_DEFAULTS, "target"),
        source_train=dataclass_from_dict(RecSourceTrainConfig, src.get("source_train"), "source_train"),
        target_train=dataclass_from_dict(RecTrainConfig, src.get("target_train"), "target_train"),
        eval=dataclass_from_dict(RecEvalConfig, src.get("eval"), "eval"),
        method=method, adapter=adapter, train_layernorms=tl, name=name,
        output_dir=os.fspath(out) if out is not None else None)


# ----------------------------------------------------------------------------- the domain


def _fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors (names, dtypes, shapes and bytes), for a run's identity."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_fingerprint(data: RecData) -> str:
    return hashlib.sha256(json.dumps([data.titles, data.sequences]).encode()).hexdigest()


class RecDomain(Domain):
    """One stage of Adapter4Rec (task ``stage``) on ``data`` (see the module docstring).

    ``full``: the whole model trains in train mode (else the text model stays in eval mode,
    its adapters in train mode); ``identity``: what else defines the run (config, start weights)."""

    name = "rec"
    keep_val_metrics = True  # HR@10 too, per validation, in the history (the stage's epoch table)

    def __init__(self, model: Adapter4Rec, data: RecData, max_len: int, stage: str = "target", full: bool = True,
                 identity: dict | None = None):
        self.model, self.data, self.max_len, self.full = model, data, int(max_len), bool(full)
        self.tasks = [stage]
        train, valid, test = split_leave_one_out(data.sequences)
        train = [s for s in train if len(s) >= 2]
        if not train:
            raise ConfigError("no user has enough interactions to train (need >= 4 per user)")
        self.train_seqs = left_pad(train, self.max_len + 1)  # (N, max_len + 1): a batch is rows of it
        self.eval_sets = {"val": eval_tensors(*valid, self.max_len), "test": eval_tensors(*test, self.max_len)}
        users = list(data.users)
        self.uids = users if len(users) == len(data.sequences) and len(set(users)) == len(users) else [
            str(i) for i in range(len(data.sequences))]
        self.cached = model.item_encoder.text_frozen()  # frozen, unadapted text model: pooled features cached
        self._identity = dict(identity or {})
        self._items = None  # (weights' versions, every item's embedding) of the last evaluation

    # --- training -----------------------------------------------------------------------------
    def num_train(self, task):
        return int(self.train_seqs.shape[0])

    def param_groups(self, lr, weight_decay):
        """The reference loop's optimizer: one weight decay for every trainable weight, as
        ``torch.optim.AdamW(model.parameters())``."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "weight_decay": weight_decay}]

    def train_batch(self, task, rows, seed, rank, world):
        seq = self.train_seqs[torch.as_tensor(np.asarray(rows), dtype=torch.long)]
        neg = sample_negatives(seq, self.data.num_items, torch.Generator().manual_seed(seed % (2**63)))
        terms = 2 * int(((seq[:, :-1] > 0) & (seq[:, 1:] > 0)).sum())  # BCE terms of the global batch
        return {"seq": seq[rank::world], "neg": neg[rank::world],
                "normalizer": torch.tensor(terms / world, dtype=torch.float32)}

    def _ensure_cache(self):
        enc = self.model.item_encoder
        if self.cached and enc._cache is None:
            enc.build_cache(self.model.tokens, self.model.token_mask)

    def loss(self, batch, task_index):
        self._ensure_cache()
        if batch["seq"].shape[0] == 0:  # this rank's share of a short last batch: no term, zero gradients
            return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
        return self.model.loss(batch["seq"], negatives=batch["neg"], normalizer=batch["normalizer"])

    def train_mode(self):
        self.model.train()
        if not self.full:
            self.model.item_encoder.text.eval()  # frozen text model: no dropout; its adapters still train
            c = get_container(self.model.item_encoder.text)
            if c is not None:
                c.train()

    # --- evaluation ---------------------------------------------------------------------------
    def eval_size(self, task, split):
        return int(self.eval_sets[split][2].shape[0])

    def _item_embeddings(self) -> torch.Tensor:
        """Every item's embedding, recomputed when a trainable weight changed since the last call."""
        key = tuple(p._version for p in self.model.parameters() if p.requires_grad)
        if self._items is None or self._items[0] != key:
            self._ensure_cache()
            self._items = (key, self.model.all_items())
        return self._items[1]

    def predict_batch(self, task, split, rows):
        emb = self._item_embeddings()
        idx = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        inp, hist, tgt = (t[idx].to(emb.device) for t in self.eval_sets[split])
        ranks = user_ranks(self.model, emb, inp, hist, tgt).tolist()
        return {self.uids[i]: int(r) for i, r in zip(np.asarray(rows).tolist(), ranks)}

    def score(self, task, split, predictions):
        from adapterkit.errors import DataError

        missing = [u for u in self.uids if u not in predictions]
        if missing:
            raise DataError(f"evaluating {task}/{split}: no prediction for {len(missing)} users (e.g. {missing[0]!r})")
        return rank_metrics(torch.tensor([predictions[u] for u in self.uids]), K)

    def main_score(self, metrics):
        return float(metrics[f"NDCG@{K}"])

    def identity(self):
        return {**self._identity, "data_sha256": data_fingerprint(self.data), "full": self.full}

    def results(self):
        return {"stage": self.tasks[0], "data": self.data.stats()}


# ----------------------------------------------------------------------------- the two stages


def _epoch_history(engine: Engine, task: str) -> list[dict]:
    """Per epoch trained: its last step, the mean training loss over its examples (from the
    log) and the validation metrics when it was validated (``valid_HR@10``, ``valid_NDCG@10``)."""
    path = engine.out / LOG_NAME
    rows: dict[int, list[tuple[int, float]]] = {}
    if path.is_file():
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.reader(f):
                if row and row[0].isdigit():
                    rows.setdefault(int(row[1]), []).append((int(row[0]), float(row[3])))
    val = {h["step"]: (h.get("metrics") or {}).get(task, {}) for h in engine.state["history"]}
    n, bs = engine.domain.num_train(task), engine.batch_sizes[task]
    out = []
    for ep in sorted(rows):
        steps, losses = zip(*rows[ep])
        sched = task_schedule(engine.num_batches, engine.tcfg.seed, ep)[:len(losses)]
        sizes = np.array([min(bs, n - b * bs) for _, b in sched], dtype=float)
        entry = {"epoch": ep + 1, "step": steps[-1], "loss": float(np.dot(losses, sizes) / sizes.sum())}
        entry.update({f"valid_{k}": v for k, v in val.get(steps[-1], {}).items()})
        out.append(entry)
    return out


class RecRun:
    """Source pre-training then target adaptation of one rec config, as two engine runs in
    ``output_dir/source`` and ``output_dir/target`` (a temporary folder when ``output_dir``
    is None). ``fit()`` runs (or resumes) both and returns the results, also written to
    ``output_dir/results.json``. ``max_steps`` caps each stage; ``allow_changes``: the
    train keys (``train.max_steps``, ``train.epochs``) a resumed stage may change."""

    def __init__(self, cfg, output_dir=None, max_steps=None, allow_changes=(), log=print):
        self.cfg = load_config(cfg)
        self.output_dir = output_dir if output_dir is not None else self.cfg.output_dir
        self.max_steps, self.allow_changes, self.log = max_steps, allow_changes, log

    def fit(self) -> dict:
        if self.output_dir is None:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ConfigError("a multi-process rec run needs an output folder (output_dir or --output)")
            with tempfile.TemporaryDirectory(prefix="adapterkit-rec-") as tmp:
                return self._fit(Path(tmp), keep=False)
        out = Path(self.output_dir)
        with lock_output(out):
            res = self._fit(out, keep=True)
        return res

    def _say(self, msg):
        if int(os.environ.get("RANK", "0") or 0) == 0:
            self.log(msg)

    def _stage(self, stage, model, data, train_cfg, out, full, identity) -> tuple[dict, Engine]:
        c = self.cfg
        domain = RecDomain(model, data, c.model["max_len"], stage, full=full, identity=identity)
        eng = Engine(domain, train_cfg, c.eval, out / stage, name=f"{c.name}-{stage}", config=c.raw,
                        max_steps=self.max_steps, allow_changes=self.allow_changes, lr=train_cfg.lr or 1e-3)
        t0 = time.time()
        res = eng.fit()
        model.item_encoder.clear_cache()
        best = eng.state["best"]
        summary = {"test": res["test"][stage], "best_valid_NDCG@10": best if best is not None else -1.0,
                   "history": _epoch_history(eng, stage), "train_seconds": round(time.time() - t0, 2),
                   "checkpoint": res["checkpoint"], "steps": res["steps"], "data": data.stats()}
        return summary, eng

    def _fit(self, out: Path, keep: bool) -> dict:
        from adapterkit.engine.distributed import _is_main
        from adapterkit.safeio import atomic_write_json

        c, m = self.cfg, self.cfg.model
        t0 = time.time()
        text_model, tokenizer = load_text_model(m)
        base_ident = {"model": m, "method": c.method, "adapter": c.adapter, "train_layernorms": c.train_layernorms}
        res: dict = {"domain": "rec", "name": c.name, "method": c.method}
        source_state = None
        if c.source is not None and c.method != "scratch":
            sdata = load_domain(c.source)
            smodel = build_model(m, sdata, text_model, tokenizer)
            if c.source_train.freeze_text:
                smodel.item_encoder.text.requires_grad_(False)
            self._say(f"source pre-training on {sdata.stats()}")
            Engine.seed_all(c.source_train.seed)
            res["source"], _ = self._stage("source", smodel, sdata, c.source_train, out, True,
                                           {**base_ident, "data": c.source})
            smodel.cpu()  # (with the shared text model) the target model is built on the CPU, as the source was
            source_state = {k: v.detach().clone() for k, v in smodel.state_dict().items()}
            text_model.requires_grad_(True)
            del smodel
        tdata = load_domain(c.target)
        if source_state is None:  # fresh text model weights for training from scratch
            text_model, tokenizer = load_text_model(m)
        model = build_model(m, tdata, text_model, tokenizer)
        ident = {**base_ident, "data": c.target}
        if source_state is not None:
            model.load_state_dict(source_state)
            ident["start_sha256"] = _fingerprint(source_state)
            del source_state
        Engine.seed_all(c.target_train.seed)  # the adapters' initialisation, then the training's randomness
        full = attach_rec_method(model, c.method, c.adapter, c.train_layernorms)
        rep = trainable_report(model)
        self._say(f"target adaptation ({c.method}) on {tdata.stats()}, trainable {rep['trainable']:,} / "
                  f"{rep['total']:,}")
        target, eng = self._stage("target", model, tdata, c.target_train, out, full, ident)
        res.update({
            "target": {k: target[k] for k in ("test", "best_valid_NDCG@10", "history", "train_seconds", "checkpoint",
                                              "steps")},
            "target_data": tdata.stats(), "trainable_params": rep["trainable"], "total_params": rep["total"],
            "trainable_percent": 100.0 * rep["trainable"] / max(rep["total"], 1),
            "wall_seconds": round(time.time() - t0, 2),
            # what `adapterkit train` prints, as for every domain
            "checkpoint": target["checkpoint"], "test": {"target": target["test"]}, "steps": target["steps"],
            "trainable": rep["trainable"], "total": rep["total"], "percent": rep["percent"],
        })
        if keep:
            res["runs"] = {s: str(out / s) for s in ("source", "target") if s in res}
            if _is_main():
                atomic_write_json(out / "results.json", {**res, "config": c.raw, "versions": versions()})
        self.model = model
        return res


# ----------------------------------------------------------------------------- the registry's entry points


def build_engine(cfg, output_dir, max_steps=None, allow_changes=()) -> RecRun:
    """The run of a rec config for ``adapterkit train``: an object whose ``fit()`` runs both
    stages (each an :class:`~adapterkit.engine.Engine` run in ``output_dir/<stage>``) and
    returns the results with the keys every domain's results have (``test``, ``checkpoint``,
    ``trainable``, ``total``, ``percent``)."""
    from adapterkit.engine.engine import check_allow_changes, check_max_steps

    check_max_steps(max_steps)
    allow = check_allow_changes(allow_changes, free=Engine._free_keys(), defining=Engine._defining_keys())
    return RecRun(load_config(cfg), output_dir, max_steps=max_steps, allow_changes=allow)


def run(cfg, output_dir, max_steps=None, allow_changes=()) -> dict:
    """Both stages of a rec config into ``output_dir``; the results (``build_engine(...).fit()``)."""
    return build_engine(cfg, output_dir, max_steps, allow_changes).fit()


__all__ = ["RecDomain", "RecEvalConfig", "RecRun", "RecRunConfig", "RecSourceTrainConfig",
           "RecTrainConfig", "build_engine", "load_config", "run"]

