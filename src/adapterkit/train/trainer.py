"""The V&L domain on the training engine: VL-BART / VL-T5 multi-task training.

:class:`VLDomain` supplies what is V&L: the feature store and the VLExample splits
(``root/<task>/<split>.jsonl`` or official files through ``data.sources``), the
score-weighted VQA loss, first-token scoring for binary tasks, generation for the others
(beam search for captions) and the tasks' metrics. :class:`Trainer` is the engine
(:class:`adapterkit.engine.Engine`: schedule, checkpoints with exact resume, signals,
distributed runs, bf16, CUDA graphs, selection, results) built from a V&L run config.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from adapterkit.engine import distributed as _d
from adapterkit.engine.domain import Domain
from adapterkit.engine.engine import (  # noqa: F401  (the V&L trainer's public names)
    FREE_TRAIN_KEYS,
    LOG_HEADER,
    LOG_NAME,
    RESUME_CHANGEABLE,
    Engine,
    TrainingError,
    TrainingInterrupted,
    check_max_steps,
    lock_output,
    versions,
)
from adapterkit.engine.engine import check_allow_changes as _check_allow_changes
from adapterkit.errors import ConfigError, DataError
from adapterkit.train.config import RunConfig, load_config
from adapterkit.vl.data import BINARY_TASKS, CAPTION_TASKS, TaskData, TextSpec
from adapterkit.vl.datasets.base import read_examples_jsonl

_dist, _rank, _world, _is_main, _barrier, init_distributed = (
    _d._dist, _d._rank, _d._world, _d._is_main, _d._barrier, _d.init_distributed)

#: data.* keys that define the training data (the others choose eval splits and limits)
_DATA_KEYS = ("root", "features", "tasks", "train_split", "max_train_examples", "sources")


def _abspath(p):
    return os.path.abspath(os.path.expanduser(p)) if isinstance(p, str) and p else p


def _config_keys() -> tuple[set[str], set[str]]:
    """(run-config keys that define the training, run-config keys free to change on resume)."""
    from adapterkit.train import config as c

    defining, free = {"preset", "adapters"}, {"name"}
    for section, cls in (("model", c.ModelConfig), ("data", c.DataConfig), ("train", c.TrainConfig),
                         ("eval", c.EvalConfig)):
        for f in dataclasses.fields(cls):
            is_free = section == "eval" or (section == "train" and f.name in FREE_TRAIN_KEYS) or (
                section == "data" and f.name not in _DATA_KEYS)
            (free if is_free else defining).add(f"{section}.{f.name}")
    return defining, free


def check_allow_changes(keys) -> tuple[str, ...]:
    """The keys ``--allow-changes`` names: each one of :data:`RESUME_CHANGEABLE` (keys that do
    not define the training, e.g. ``eval.*``, may change anyway and are accepted)."""
    defining, free = _config_keys()
    return _check_allow_changes(keys, free=free, defining=defining)


class VLDomain(Domain):
    """V&L multi-task data, loss, predictions and metrics for a VL-BART / VL-T5 model."""

    name = "vl"

    def __init__(self, cfg: RunConfig, model=None, tokenizer=None, checked: dict | None = None):
        self.cfg = cfg
        self._checked = checked or {}
        from adapterkit.vl.build import build_vl_model
        from adapterkit.vl.features import FeatureStore

        self.store = FeatureStore.open(cfg.data.features)
        if self.store.dim != cfg.model.feat_dim:
            raise ConfigError(f"the feature store {cfg.data.features} has {self.store.dim}-d features but "
                              f"model.feat_dim is {cfg.model.feat_dim}")
        self.preset = cfg.preset_dict()
        self.tasks = list(cfg.data.tasks)
        if model is None:
            spec = {"backbone": cfg.model.backbone, "feat_dim": cfg.model.feat_dim,
                    "n_images": cfg.model.n_images, "random_init": cfg.model.random_init,
                    "init_seed": cfg.model.init_seed, "device": "cpu",
                    "corpus": self._corpus() if cfg.model.backbone.startswith("tiny-") else []}
            if cfg.model.lm:
                spec["lm"] = cfg.model.lm
            model, tokenizer = build_vl_model(spec, self.preset, self.tasks)
        self.model, self.tok = model, tokenizer
        from adapterkit.vl.presets import uses_task_prefix

        self.spec = TextSpec(kind=model.kind, max_text_len=cfg.train.max_text_len,
                             max_target_len=cfg.train.max_target_len, fixed_shapes=cfg.train.cuda_graphs,
                             use_prefix=uses_task_prefix(self.preset, cfg.train.video, cfg.data.task_prefix),
                             zero_boxes=cfg.data.zero_boxes)
        self.train_data = {t: self.task_data(t, cfg.data.train_split, self.spec, True) for t in self.tasks}
        self._eval_cache: dict = {}
        self.eval_data = self.default_eval_data  # the trainer may route this through its own hook

    @property
    def lr(self) -> float:
        c = self.cfg
        return c.train.lr or (self.preset.get("video_lr") if c.train.video else self.preset.get("lr")) or 1e-3

    # --- data ---------------------------------------------------------------------------------
    def _split_file(self, task, split):
        from pathlib import Path

        return Path(self.cfg.data.root) / task / f"{split}.jsonl"

    def _corpus(self) -> list[str]:
        """Text of the training data (for tiny word-level tokenizers)."""
        c, lines = self.cfg, []
        for t in c.data.tasks:
            for s in {c.data.train_split, c.data.val_split, c.data.test_split}:
                if t in c.data.sources or self._split_file(t, s).exists():
                    try:
                        exs = self.read(t, s)
                    except DataError:
                        continue
                    for ex in exs:
                        lines.append(ex.text)
                        lines.extend(ex.targets)
                        lines.extend(ex.choices or [])
        from adapterkit.vl.data import PREFIXES
        lines += list(PREFIXES.values()) + ["answer :", "true", "false"]
        return lines

    def read(self, task, split) -> list:
        hit = self._checked.get((task, split))
        if hit is not None:
            return list(hit)
        src = self.cfg.data.sources.get(task)
        if src is None:
            return read_examples_jsonl(self._split_file(task, split))
        from adapterkit.vl.datasets import read_source

        return read_source(task, src, split)  # the source's reader options (annotations, subtitles) included

    def task_data(self, task, split, spec, train):
        exs = self.read(task, split)
        limit = self.cfg.data.max_train_examples if train else self.cfg.data.max_eval_examples
        if limit:
            exs = exs[:limit]
        if task == "vqa":
            from adapterkit.vl.metrics.vqa import soft_scored

            for e in exs:  # single-answer VQA-style data: score by soft score, not leave-one-out
                if soft_scored(e):
                    e.extra.setdefault("raw_answers", False)
        return TaskData(task, exs, self.store, self.tok, spec, self.cfg.model.n_images, train)

    def default_eval_data(self, task, split):
        key = (task, split)
        if key not in self._eval_cache:
            self._eval_cache[key] = self.task_data(task, split, self.spec, False)
        return self._eval_cache[key]

    # --- the engine's interface ----------------------------------------------------------------
    def split(self, which):
        return {"train": self.cfg.data.train_split, "val": self.cfg.data.val_split,
                "test": self.cfg.data.test_split}[which]

    def num_batches(self, task, batch_size):
        return self.train_data[task].num_batches(batch_size)

    def num_train(self, task):
        return len(self.train_data[task])

    def epoch_order(self, task, seed, epoch):
        return self.train_data[task].epoch_order(seed, epoch)

    def train_batch(self, task, rows, seed, rank, world):
        return self.train_data[task].train_batch(rows, seed, rank, world)

    def loss(self, batch, task_index):
        return self.model(**batch, task_ids=task_index)

    def eval_size(self, task, split):
        return len(self.eval_data(task, split))

    def predict_batch(self, task, split, rows):
        data = self.eval_data(task, split)
        batch = data.eval_batch(data.eval_order()[np.asarray(rows, dtype=np.int64)])  # batches of similar lengths
        uids = batch.pop("uids")
        dev = next(self.model.parameters()).device
        batch = {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        tid = self.tasks.index(task)
        return dict(zip(uids, self._predict_batch(task, tid, batch, self.tok.eos_token_id, self.tok.pad_token_id)))

    def _predict_batch(self, task, tid, batch, eos, pad) -> list[str]:
        from adapterkit.vl.data import caption_max_new_tokens, choice_first_tokens

        ecfg = self.cfg.eval
        if task in BINARY_TASKS:
            cand = choice_first_tokens(self.tok, self.model.kind, ["true", "false"])  # as targets are tokenised
            scores = self.model.first_token_scores(**batch, candidate_ids=cand, task_ids=tid)
            return ["true" if s[0] >= s[1] else "false" for s in scores.tolist()]
        cap = task in CAPTION_TASKS
        out = self.model.generate(**batch, task_ids=tid, pad_token_id=pad, eos_token_id=eos,
                                  max_new_tokens=(ecfg.caption_max_new_tokens or caption_max_new_tokens(task)) if cap
                                  else ecfg.max_new_tokens,
                                  num_beams=ecfg.caption_beams if cap else 1)
        return [t.strip() for t in self.tok.batch_decode(out, skip_special_tokens=True)]

    def score(self, task, split, predictions):
        from adapterkit.vl.metrics import TASK_METRICS

        exs = {e.uid: e for e in self.eval_data(task, split).examples}
        metric = TASK_METRICS.get(task, TASK_METRICS["gqa"])
        try:
            return metric(predictions, exs)
        except DataError as e:
            raise DataError(f"evaluating {task}/{split}: {e}") from None

    def main_score(self, metrics):
        return Trainer.main_score(metrics)

    def identity(self) -> dict:
        c = self.cfg
        data = {k: getattr(c.data, k) for k in _DATA_KEYS}
        data.update(root=_abspath(c.data.root), features=_abspath(c.data.features), tasks=list(c.data.tasks))
        return {"model": dataclasses.asdict(c.model), "preset": c.preset, "adapters": self.preset.get("adapters"),
                "data": data}

    def results(self) -> dict:
        return {"preset": self.preset.get("name")}


class Trainer(Engine):
    """The engine on a V&L run config (a RunConfig, a YAML/JSON path or a dict)."""

    def __init__(self, config, output_dir: str | os.PathLike, max_steps: int | None = None,
                 model=None, tokenizer=None, allow_changes=()):
        check_max_steps(max_steps)
        check_allow_changes(allow_changes)
        self.cfg: RunConfig = config if isinstance(config, RunConfig) else load_config(config)
        if max_steps is not None:
            self.cfg.train.max_steps = max_steps
        init_distributed()
        if self.cfg.data.generate == "tiny_fixture" and not os.path.exists(self.cfg.data.root):
            raise ConfigError(f'data.generate "tiny_fixture": {self.cfg.data.root} does not exist; the CLI '
                              "(adapterkit train) builds it, or call adapterkit.testing.fixtures.make_vl_fixture")
        # every split's rows are checked before any work; the checked examples are kept for reading
        checked = self.cfg.check_paths(("train",) + (("val",) if self.cfg.eval.select_on == "val" else ()))
        if _is_main():
            from adapterkit.safeio import write_probe

            write_probe(output_dir)  # read-only / full disk: fail before any work (and before building the model)
        self.seed_all(self.cfg.train.seed)
        self.domain = VLDomain(self.cfg, model, tokenizer, checked)
        self.domain.eval_data = self._eval_data  # a subclass's _eval_data serves the evaluation
        super().__init__(self.domain, self.cfg.train, self.cfg.eval, output_dir, name=self.cfg.name,
                         config=self.cfg, allow_changes=allow_changes, lr=self.domain.lr)

    @staticmethod
    def _free_keys():
        return _config_keys()[1]

    @staticmethod
    def _defining_keys():
        return _config_keys()[0]

    # the V&L trainer's attributes, as before the engine
    @property
    def tok(self):
        return self.domain.tok

    @property
    def store(self):
        return self.domain.store

    @property
    def spec(self):
        return self.domain.spec

    @property
    def preset(self):
        return self.domain.preset

    @property
    def train_data(self):
        return self.domain.train_data

    @property
    def _eval_cache(self):
        return self.domain._eval_cache

    def _task_data(self, task, split, spec, train):
        return self.domain.task_data(task, split, spec, train)

    def _eval_data(self, task, split):
        return self.domain.default_eval_data(task, split)

    def _read(self, task, split):
        return self.domain.read(task, split)

    def _predict_batch(self, task, tid, batch, eos, pad):
        return self.domain._predict_batch(task, tid, batch, eos, pad)

    @staticmethod
    def main_score(task_metrics: dict) -> float:
        for k in ("accuracy", "CIDEr"):
            if k in task_metrics:
                return float(task_metrics[k])
        return float(next(v for k, v in task_metrics.items() if not k.startswith("_")))


def build_engine(cfg, output_dir, max_steps=None, allow_changes=()):
    """The engine for a V&L run config (``data.generate`` is done by the caller)."""
    return Trainer(cfg, output_dir, max_steps=max_steps, allow_changes=allow_changes)
