"""What a domain supplies to the training engine (:class:`adapterkit.engine.Engine`).

The engine knows no domain: it owns the multi-task schedule, the optimizer and LR
schedule, checkpoints with exact resume, the run lock, signals, distributed runs, bf16,
CUDA graphs, evaluation sharding, validation selection, the log and results.json. A
domain (V&L, text, vision, audio, speech recognition, recommendation) supplies:

- the model (``domain.model``, adapters attached, trainable parameters marked) and its tasks;
- the training data: ``num_batches`` / ``epoch_order`` / ``train_batch`` (tensors);
- the loss of one batch of one task (``loss``);
- prediction on one batch of evaluation rows (``predict_batch``) and the metrics of a
  split's predictions (``score``);
- what defines the run for a resume check (``identity``).

A domain is a plain object; subclass :class:`Domain` for the defaults (a seeded
permutation per task and epoch, ``accuracy`` as the main score, train mode for the whole
model). Every method is called on every rank of a distributed run.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def stable_seed(*parts) -> int:
    """A 64-bit seed from any parts (str/int), the same in every process and run."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little")


class Domain:
    """Base class of the engine's domains (see the module docstring)."""

    #: the domain's name in configs (``domain: text``) and in results.json
    name = "custom"
    #: the task names, in the order of their task ids
    tasks: Sequence[str] = ()
    #: the model being trained (adapters attached)
    model: nn.Module
    #: keep every task's validation metrics in the validation history (``history[i]["metrics"]``),
    #: not only the main scores
    keep_val_metrics = False

    # --- training data ---------------------------------------------------------------------
    def num_train(self, task: str) -> int:
        """Number of training examples of ``task``."""
        raise NotImplementedError

    def num_batches(self, task: str, batch_size: int) -> int:
        return max(1, math.ceil(self.num_train(task) / batch_size)) if self.num_train(task) else 0

    def epoch_order(self, task: str, seed: int, epoch: int) -> np.ndarray:
        """The order of the training rows of ``task`` in ``epoch`` (a seeded permutation)."""
        return np.random.default_rng(stable_seed(seed, epoch, task)).permutation(self.num_train(task))

    def train_batch(self, task: str, rows: np.ndarray, seed: int, rank: int, world: int) -> dict:
        """The tensors of one training batch: this rank's share (``rows[rank::world]``) of the
        global batch ``rows``; ``seed`` is this batch's own (for augmentation / masking)."""
        raise NotImplementedError

    def loss(self, batch: dict, task_index: int) -> torch.Tensor:
        """The scalar training loss of ``batch`` (a batch of task ``tasks[task_index]``)."""
        raise NotImplementedError

    def param_groups(self, lr: float, weight_decay: float) -> list[dict] | None:
        """The optimizer's parameter groups over ``self.model``'s trainable parameters (a group
        may set its own ``lr``, e.g. a multiple of the run's ``lr``); None (default): the
        engine's, with no weight decay on biases, norms and other 1-d tensors."""
        return None

    def train_mode(self) -> None:
        """Put the model in training mode (a frozen backbone may stay in eval mode)."""
        self.model.train()

    # --- evaluation -------------------------------------------------------------------------
    def eval_size(self, task: str, split: str) -> int:
        raise NotImplementedError

    def predict_batch(self, task: str, split: str, rows: np.ndarray) -> dict:
        """``{example id: prediction}`` for the evaluation rows ``rows`` of (task, split); runs
        under ``torch.no_grad()``, autocast and eval mode."""
        raise NotImplementedError

    def score(self, task: str, split: str, predictions: dict) -> dict:
        """The metrics of a whole split's predictions, ``{name: value}`` (percent)."""
        raise NotImplementedError

    def main_score(self, metrics: dict) -> float:
        """The number validation selection maximises (default: accuracy, CIDEr, or the first metric)."""
        for k in ("accuracy", "CIDEr", "ndcg@10", "NDCG@10"):
            if k in metrics:
                return float(metrics[k])
        return float(next(v for k, v in metrics.items() if not k.startswith("_")))

    # --- the run ------------------------------------------------------------------------------
    def split(self, which: str) -> str:
        """The configured name of the ``"train"`` / ``"val"`` / ``"test"`` split."""
        return which

    def identity(self) -> dict:
        """What defines this run besides the train.* keys (model, adapters, data), JSON-able;
        stored in every checkpoint and compared on resume."""
        return {}

    def results(self) -> dict:
        """Extra keys for results.json."""
        return {}

    def save(self, folder) -> None:
        """Extra files in ``best/`` and ``final/`` beside the trained weights (e.g. a tokenizer, a label map)."""
