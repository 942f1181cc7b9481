"""The training engine beneath every domain: one loop, whatever the data.

A :class:`~adapterkit.engine.domain.Domain` supplies the model, the batches, the loss, the
predictions and the metrics; the engine supplies the rest, the same for V&L, text,
vision, audio, speech recognition and recommendation:

- the multi-task schedule: one task per batch, in the epoch-seeded proportional order
  (:func:`task_schedule`), with per-task batch sizes (``train.task_batch_scale``);
- AdamW (per-task rows an unused task does not touch, :class:`TaskAwareAdamW`) or SGD,
  linear warm-up then linear or cosine decay, gradient clipping, bf16 autocast with the
  frozen weights stored in bf16, CUDA-graphed steps (``train.cuda_graphs``);
- crash-safe checkpoints with exact resume: the run config and every tensor are checked
  against this run before anything is copied; the RNG states and the schedule position
  are restored, so a run killed with SIGKILL and rerun ends bit-identical;
- one run per output directory (an OS lock, :mod:`adapterkit.engine.lock`); SIGTERM /
  SIGINT finish the current step, write a checkpoint and stop with
  :class:`TrainingInterrupted`; weights are checked finite before every save; the log is
  cut back to the checkpoint's step on resume and never written through a link;
- distributed runs unchanged under ``torchrun`` / ``accelerate launch`` (gloo on CPU,
  NCCL on GPU): every rank builds the same schedule, rank r takes rows r::world of each
  global batch, gradients are averaged with one all-reduce per step, rank 0 writes the
  checkpoints and every rank resumes from them; evaluation is sharded and gathered;
- validation after every epoch (``train.eval_every_epoch``) with the best checkpoint
  kept in ``best/`` (``eval.select_on: val``), the final weights in ``final/``, the test
  evaluation of the selected weights, ``results.json`` and ``predictions.json``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import platform
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

import adapterkit
from adapterkit.core.fp32_attention import use_fp32_attention
from adapterkit.core.hf import contiguous_lm_heads
from adapterkit.core.optim import TaskAwareAdamW
from adapterkit.engine.checkpoint import (
    ABSENT,
    CheckpointManager,
    capture_rng_state,
    check_optimizer_state,
    check_tensors,
    config_differences,
    restore_rng_state,
)
from adapterkit.engine.distributed import _barrier, _dist, _is_main, _rank, _world, init_distributed
from adapterkit.engine.domain import Domain, stable_seed
from adapterkit.engine.lock import RunLock
from adapterkit.errors import AdapterKitError, CheckpointError, ConfigError, did_you_mean, warn
from adapterkit.safeio import (
    atomic_write_json,
    atomic_write_text,
    estimate_checkpoint_bytes,
    remove_stale_temps,
    write_probe,
)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX-512 BF16 or AMX); without them torch
    emulates bf16 and a bf16 run is far slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(f()) for f in checks if callable(f))

class TrainingError(AdapterKitError):
    """Training stopped (non-finite loss, out of memory) with a message naming the cause."""


class TrainingInterrupted(AdapterKitError):
    """SIGTERM / SIGINT stopped the run at a step boundary, after a checkpoint was written.
    ``exit_code`` is the shell's convention for the signal (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


#: train.* keys that do not change what is trained: free to differ on resume
FREE_TRAIN_KEYS = ("checkpoint_every", "keep_last", "eval_every_epoch", "log_every", "fsdp")
#: keys a resumed run may change when asked to (``--allow-changes``): they only lengthen or
#: shorten the schedule (the LR schedule is recomputed for the new length)
RESUME_CHANGEABLE = ("train.max_steps", "train.epochs")
LOG_NAME = "train_log.csv"
LOG_HEADER = ["step", "epoch", "task", "loss", "lr"]
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _show(v) -> str:
    if v == ABSENT:
        return "(absent)"
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def check_max_steps(max_steps) -> None:
    """``max_steps`` given by a caller (the CLI's --max-steps): None or a positive integer."""
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError(f"max_steps must be a positive integer, got {max_steps!r}")


def check_allow_changes(keys, free=(), defining=()) -> tuple[str, ...]:
    """The keys ``--allow-changes`` names: each one of :data:`RESUME_CHANGEABLE`; keys in
    ``free`` (that do not define the training, e.g. ``eval.*``) may change anyway and are
    accepted; ``defining`` are the config's other keys (named as such in the error)."""
    if isinstance(keys, str):
        keys = keys.split(",")
    out = []
    for k in keys or ():
        k = str(k).strip()
        if not k or k in free:
            continue
        if k not in RESUME_CHANGEABLE:
            if k in defining:
                why = (f"{k} cannot change on resume (it changes what the checkpoint's weights mean: train into a "
                       "new --output instead)")
            else:
                why = f"unknown key {k!r} for --allow-changes{did_you_mean(k, RESUME_CHANGEABLE)}"
            raise ConfigError(f"{why}; the keys that may change on resume are {', '.join(RESUME_CHANGEABLE)}")
        out.append(k)
    return tuple(out)


@contextlib.contextmanager
def lock_output(output_dir):
    """Hold the run lock on ``output_dir`` (:class:`~adapterkit.engine.lock.RunLock`) in rank 0
    of a run (other ranks: nothing); prints a note when a dead run's lock was cleared."""
    rank = _rank() if _dist() else int(os.environ.get("RANK", "0") or 0)
    if rank != 0:
        yield None
        return
    lock = RunLock(output_dir).acquire()
    try:
        if lock.note:
            print(f"note: {lock.note}", file=sys.stderr)
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def run_folder(output_dir, prefix: str = "adapterkit-run-"):
    """The folder a run writes to: ``output_dir`` when one is given, else a temporary folder that
    is removed afterwards. No temporary folder is made when one is given: a run killed by SIGKILL
    skips the cleanup, and every such run used to leave an empty one behind."""
    if output_dir:
        yield Path(output_dir)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def quiet_hf_progress() -> None:
    """With ``ADAPTERKIT_NO_PROGRESS=1``, silence Hugging Face's own bars too (model loading,
    GGUF de-quantisation), which otherwise fill the logs of background runs."""
    if os.environ.get("ADAPTERKIT_NO_PROGRESS") != "1":
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when transformers / the hub client load
    for module, switch in (("huggingface_hub.utils", "disable_progress_bars"),
                           ("transformers.utils.logging", "disable_progress_bar")):
        if module in sys.modules:  # already imported: the variable was read, flip the switch
            getattr(sys.modules[module], switch)()
    # Some loaders (transformers' GGUF de-quantisation) call tqdm directly, past both switches.
    # tqdm reads TQDM_* defaults when it is imported: the variable covers processes started
    # from here (compare workers); an imported tqdm gets the same default, which a caller's
    # explicit disable=False still overrides.
    os.environ["TQDM_DISABLE"] = "1"
    std = sys.modules.get("tqdm.std")
    if std is not None and not getattr(std.tqdm.__dict__["__init__"], "_adapterkit_quiet", False):
        from functools import partialmethod

        quiet_init = partialmethod(std.tqdm.__init__, disable=True)
        quiet_init._adapterkit_quiet = True
        std.tqdm.__init__ = quiet_init


def _progress(iterable=None, **kw):
    from tqdm.auto import tqdm

    kw.setdefault("disable", not _is_main() or os.environ.get("ADAPTERKIT_NO_PROGRESS") == "1")
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)


def task_schedule(num_batches: dict[str, int], seed: int, epoch: int) -> list[tuple[str, int]]:
    """Each task once per batch of its loader, shuffled with a seed derived from the epoch
    (identical on every rank): sampling proportional to dataset size."""
    items = [(t, b) for t in sorted(num_batches) for b in range(num_batches[t])]
    perm = np.random.default_rng(stable_seed(seed, "schedule", epoch)).permutation(len(items))
    return [items[i] for i in perm]


def batch_seed(seed: int, epoch: int, task: str, b: int) -> int:
    """The seed of one batch (augmentation, masking): the same in every rank and run."""
    return stable_seed(seed, epoch, task, b)


def lr_factor(step: int, total: int, warm: int, kind: str = "linear", floor: float = 0.0) -> float:
    """The learning rate of ``step`` (0-based) as a fraction of train.lr: a linear warm-up over
    ``warm`` steps (step 0 at 1/warm), then ``linear`` decay to 0 at ``total``, a half-cycle
    ``cosine`` from 1 to ``floor`` (MAE / AdaptFormer), or ``constant``."""
    if step < warm:
        return (step + 1) / max(1, warm)
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        frac = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return max(0.0, (total - step) / max(1, total - warm))


def _get(cfg, key, default):
    return getattr(cfg, key, default) if cfg is not None else default



def exempt_from_decay(name: str, p: torch.Tensor) -> bool:
    """The engine's rule for weight decay: none on biases, norm weights and other 1-d tensors."""
    leaf = name.rsplit(".", 1)[-1]
    is_norm = "norm" in name.lower() or "ln_" in name.lower()
    return leaf == "bias" or (is_norm and leaf == "weight") or p.dim() == 1

class Engine:
    """Train ``domain.model`` on ``domain``'s tasks with the ``train`` / ``eval`` settings
    (any objects with the attributes of :class:`adapterkit.engine.config.TrainConfig` /
    :class:`~adapterkit.engine.config.EvalConfig`) into ``output_dir``.

    ``config``: the whole run config (recorded in results.json); ``allow_changes``: keys of
    :data:`RESUME_CHANGEABLE` that may differ from the run config recorded in the checkpoint
    a resume starts from (else a mismatch is refused).
    """

    def __init__(self, domain: Domain, train, evaluation, output_dir, *, name: str = "run", config=None,
                 max_steps: int | None = None, allow_changes=(), lr: float | None = None):
        check_max_steps(max_steps)
        self.allow_changes = check_allow_changes(allow_changes, free=self._free_keys(),
                                                 defining=self._defining_keys())
        self.domain, self.tcfg, self.ecfg = domain, train, evaluation
        if max_steps is not None:
            self.tcfg.max_steps = max_steps
        self.name, self.config = name, config
        self.out = Path(output_dir)
        init_distributed()
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() \
            else torch.device("cpu")
        if _is_main():
            write_probe(self.out)  # read-only / full disk: fail before any work
        self.tasks = list(domain.tasks)
        self.model = domain.model.to(self.device)
        domain.model = self.model
        contiguous_lm_heads(self.model)  # a strided head input is a per-row weight copy on the CPU
        if getattr(self.tcfg, "bf16", False):  # frozen weights in bf16: autocast reads them so anyway
            if self.device.type == "cpu" and not cpu_has_native_bf16():
                warn("train.bf16 on a CPU without native bf16 (no AVX-512 BF16 or AMX): bf16 is emulated "
                              "there and much slower than fp32 (a FashionVL training step 22x, its evaluation 6x on "
                              "one such CPU); leave bf16 off on this machine")
            adapterkit.cast_frozen(self.model, torch.bfloat16)
            if self.device.type == "cpu":  # the CPU's bf16 attention backward is several times slower than fp32's
                use_fp32_attention(self.model)
        self.sharded = False
        if getattr(self.tcfg, "fsdp", False) and _dist():  # FSDP2: the frozen model (and adapters) sharded
            from adapterkit.engine import fsdp

            fsdp.shard_model(self.model, mp_policy=fsdp.mixed_precision(True) if getattr(self.tcfg, "bf16", False)
                             else None)
            self.sharded = True
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("nothing to train: the model has no trainable parameter")
        self.named_trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        scale = _get(self.tcfg, "task_batch_scale", {}) or {}
        self.batch_sizes = {t: max(1, round(self.tcfg.batch_size * scale.get(t, 1.0))) * _world() for t in self.tasks}
        self.num_batches = {t: domain.num_batches(t, self.batch_sizes[t]) for t in self.tasks}
        empty = [t for t, n in self.num_batches.items() if n == 0]
        if empty:
            raise ConfigError(f"task {empty[0]!r} has no training examples")
        self.steps_per_epoch = sum(self.num_batches.values())
        total = self.steps_per_epoch * self.tcfg.epochs
        if self.tcfg.max_steps:  # whichever comes first: epochs full passes or max_steps steps
            if self.tcfg.max_steps > total and _is_main():
                print(f"note: train.max_steps {self.tcfg.max_steps} is more than train.epochs {self.tcfg.epochs} x "
                      f"{self.steps_per_epoch} steps per epoch: training stops after {total} steps "
                      "(raise train.epochs to train longer)", file=sys.stderr)
            total = min(total, self.tcfg.max_steps)
        self.total_steps = total
        self.lr = float(lr if lr is not None else (self.tcfg.lr or 1e-3))
        self.optimizer = self._make_optimizer()
        warm = int(self.tcfg.warmup_ratio * total)
        kind = _get(self.tcfg, "schedule", "linear")
        floor = float(_get(self.tcfg, "min_lr_ratio", 0.0) or 0.0)

        def schedule(step):
            return lr_factor(step, total, warm, kind, floor)

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        # the probe reserves what one checkpoint needs (weights + the optimizer's moments): a full disk fails now
        self.ckpt = CheckpointManager(self.out, keep_last=self.tcfg.keep_last, probe=_is_main(),
                                      min_free_bytes=estimate_checkpoint_bytes(self.named_trainable))
        self.state = {"epoch": 0, "pos": 0, "step": 0, "best": None, "best_step": None, "history": [],
                      "resume_changes": []}
        # when the run started, had it never stopped: a resume moves it back by the checkpoint's
        # train_s, so now - _started is the whole run's time (what every checkpoint records)
        self._started = time.time()
        self.graph = None  # GraphedStep, made at the first step (after a resume has loaded the optimizer)
        self._graph_task = 0
        self.run_identity = json.loads(json.dumps(self._run_identity(), default=str))
        self._last_ckpt = None  # (step, path, largest |weight|) of the newest checkpoint of this run
        self._stop_signal = None  # set by the SIGTERM / SIGINT handler
        self._eval_interruptible = False  # training finished and saved: the test evaluation may stop at once

    # --- setup helpers ----------------------------------------------------------------------
    @staticmethod
    def _free_keys() -> set[str]:
        from adapterkit.engine.config import EvalConfig

        return {f"train.{k}" for k in FREE_TRAIN_KEYS} | {f"eval.{f.name}" for f in dataclasses.fields(EvalConfig)} | {
            "name"}

    @staticmethod
    def _defining_keys() -> set[str]:
        from adapterkit.engine.config import TrainConfig

        return {f"train.{f.name}" for f in dataclasses.fields(TrainConfig)}

    def _run_identity(self) -> dict:
        """What defines this run's training (stored in every checkpoint, compared on resume):
        the domain's identity (model, adapters, data) and every train.* key but the free ones."""
        train = dataclasses.asdict(self.tcfg) if dataclasses.is_dataclass(self.tcfg) else dict(vars(self.tcfg))
        for k in FREE_TRAIN_KEYS:
            train.pop(k, None)
        train["lr"] = self.lr  # as resolved
        ident = dict(self.domain.identity())
        if self.domain.name != "vl":  # (V&L checkpoints keep the identity they always had)
            ident["domain"] = self.domain.name
        return {**ident, "train": train, "world_size": _world()}

    @staticmethod
    def seed_all(seed):
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)

    def _param_groups(self):
        groups = self.domain.param_groups(self.lr, self.tcfg.weight_decay)
        if groups is not None:
            return groups
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if exempt_from_decay(n, p) else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.tcfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]] or groups[:1]

    def _make_optimizer(self):
        kind = _get(self.tcfg, "optimizer", "adamw")
        if kind == "sgd":
            return torch.optim.SGD(self._param_groups(), lr=self.lr, momentum=_get(self.tcfg, "momentum", 0.9))
        if kind != "adamw":
            raise ConfigError(f'train.optimizer must be "adamw" or "sgd", got {kind!r}{did_you_mean(kind, ["adamw", "sgd"])}')
        betas = tuple(_get(self.tcfg, "betas", (0.9, 0.999)))
        # the fused CPU kernel: one pass over each tensor instead of a dozen (full fine-tuning of
        # SmolLM2's 108M weights, one thread: 0.14 s a step against 0.58 s); not for sharded (DTensor)
        # parameters; on a GPU the default (foreach) stays, CUDA graphs capture it
        fused = self.device.type == "cpu" and not self.sharded
        return TaskAwareAdamW(self._param_groups(), lr=self.lr, eps=self.tcfg.adam_eps, betas=betas,
                              **({"fused": True} if fused else {}))

    # --- checkpoints ------------------------------------------------------------------------
    def _largest_weight(self, weights: dict | None = None) -> float:
        vals = [p.detach().abs().max() for p in (weights.values() if weights is not None else self.params) if p.numel()]
        return float(torch.stack(vals).max()) if vals else 0.0

    def _kept(self) -> str:
        """What a rerun would start from, exactly."""
        if self._last_ckpt is None:
            return (f"kept: no checkpoint was written (the first comes at step {self.tcfg.checkpoint_every}, "
                    "train.checkpoint_every); a rerun starts from step 0")
        step, path, big = self._last_ckpt
        return (f"kept: checkpoint step {step} ({path}; finite weights, largest |weight| {big:.3g}), "
                "which a rerun resumes from")

    def _weights(self) -> dict:
        """``{name: tensor}`` of the trainable weights, whole (gathered from the shards under
        FSDP: a collective, every rank calls it)."""
        if self.sharded:
            from adapterkit.engine import fsdp

            return fsdp.full_trainable_state(self.model)
        return {n: p.detach() for n, p in self.named_trainable.items()}

    def _optimizer_state(self) -> dict:
        if self.sharded:
            from adapterkit.engine import fsdp

            return fsdp.full_optimizer_state(self.optimizer)
        return self.optimizer.state_dict()

    def _check_finite_weights(self, consequence: str, weights: dict | None = None, opt_state: dict | None = None) -> None:
        """Refuse to save non-finite trainable weights or optimizer moments (``weights`` /
        ``opt_state``: the gathered ones of a sharded model, the same on every rank)."""
        if weights is None:
            tensors = [(n, p) for n, p in self.named_trainable.items()]
            names = {p: n for n, p in tensors}
            states = [(names.get(p, "?"), st) for p, st in self.optimizer.state.items()]
        else:
            tensors = list(weights.items())
            by_id = {id(p): n for n, p in self.named_trainable.items()}
            order = [by_id.get(id(p), "?") for g in self.optimizer.param_groups for p in g["params"]]
            states = [(order[int(i)] if str(i).isdigit() and int(i) < len(order) else str(i), st)
                      for i, st in (opt_state or {}).get("state", {}).items()]
        for pname, st in states:
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "step":
                    tensors.append((f"the optimizer's {k} of {pname}", v))
        if not tensors:
            return
        flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in tensors])
        if bool(flags.all()):
            return
        bad = [n for (n, _), ok in zip(tensors, flags.tolist()) if not ok]
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise TrainingError(f"the trainable weights are not finite after step {self.state['step']} "
                            f"({', '.join(bad[:3])}{more}): {consequence}; {self._kept()}")

    def _save_checkpoint(self):
        step = self.state["step"]
        weights = self._weights()
        opt = self._optimizer_state() if (self.sharded or _is_main()) else None
        self._check_finite_weights(f"no checkpoint was written for step {step}", *(
            (weights, opt) if self.sharded else ()))
        path = self.ckpt.path_for(step)
        if _is_main():
            state = {
                "adapter": weights,
                "optimizer": opt,
                "scheduler": self.scheduler.state_dict(),
                "rng": capture_rng_state(),
                "trainer": {**self.state, "train_s": time.time() - self._started},
                "extra": {"run": self.run_identity},
            }
            path = self.ckpt.save(step, state)
        self._last_ckpt = (step, path, self._largest_weight(weights))
        _barrier()

    def _check_run_config(self, extra, path, step) -> list[dict]:
        """Refuse a checkpoint written with another run config (but for allowed keys);
        returns the allowed changes."""
        stored = extra.get("run") if isinstance(extra, dict) else None
        if not isinstance(stored, dict):
            msg = (f"the checkpoint {path} does not record the run config it was trained with (an older "
                   "adapterkit wrote it): resuming without checking that it belongs to this config")
            warn(msg, stacklevel=3)  # once: a warning, not a log line as well
            return []
        diffs = config_differences(stored, self.run_identity)
        refused = {k: v for k, v in diffs.items() if k not in self.allow_changes}
        if refused:
            listing = "; ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in refused.items())
            changeable = [k for k in refused if k in RESUME_CHANGEABLE]
            if changeable and len(changeable) == len(refused):
                hint = f", or continue with the new value: --allow-changes {','.join(changeable)}"
            else:
                hint = f" (only {', '.join(RESUME_CHANGEABLE)} may change on resume, with --allow-changes)"
            raise ConfigError(f"the checkpoint {path} (step {step}) was trained with another config: {listing}. "
                              f"Rerun with the config it was trained with, or train into a new --output{hint}")
        changes = [{"step": step, "key": k, "old": a, "new": b} for k, (a, b) in diffs.items()]
        if changes and _is_main():
            print("resuming with changed " + "; ".join(f"{c['key']} {_show(c['old'])} -> {_show(c['new'])}"
                                                      for c in changes) + " (--allow-changes)")
        return changes

    def _checked_trainer_state(self, ts, step, where) -> dict:
        if not isinstance(ts, dict):
            raise CheckpointError(f"{where}: the trainer state is missing or malformed")
        for k in ("epoch", "pos", "step"):
            v = ts.get(k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise CheckpointError(f"{where}: the trainer state's {k!r} must be a non-negative integer, got {v!r}")
        if ts["step"] != step:
            raise CheckpointError(f"{where}: the trainer state is at step {ts['step']}, the checkpoint at step {step}")
        if ts["pos"] > self.steps_per_epoch:
            raise CheckpointError(f"{where}: the trainer state's position {ts['pos']} is past the end of an epoch "
                                  f"({self.steps_per_epoch} steps)")
        best, best_step = ts.get("best"), ts.get("best_step")
        if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float)) or not math.isfinite(best)):
            raise CheckpointError(f"{where}: the trainer state's 'best' must be a finite number or null, got {best!r}")
        if best_step is not None and (isinstance(best_step, bool) or not isinstance(best_step, int)):
            raise CheckpointError(f"{where}: the trainer state's 'best_step' must be an integer or null")
        train_s = ts.get("train_s", 0.0)  # absent in checkpoints of older adapterkit: unknown, 0
        if isinstance(train_s, bool) or not isinstance(train_s, (int, float)) or not 0 <= train_s < math.inf:
            raise CheckpointError(f"{where}: the trainer state's 'train_s' must be a non-negative number of "
                                  f"seconds, got {train_s!r}")
        for k in ("history", "resume_changes"):
            if not isinstance(ts.get(k, []), list):
                raise CheckpointError(f"{where}: the trainer state's {k!r} must be a list")
        return ts

    def _resume(self) -> bool:
        if _is_main():
            self.ckpt.recover_interrupted()  # a checkpoint a kill left under its .old name
        _barrier()
        found = self.ckpt.load_latest(recover=False)
        if found is None:
            return False
        state, step = found
        path = self.ckpt.path_for(step)
        where = f"the checkpoint {path}"
        # every check before anything is copied in
        changes = self._check_run_config(state.get("extra"), path, step)
        check_tensors(state.get("adapter") or {}, self.named_trainable, where)
        opt = state.get("optimizer")
        if not isinstance(opt, dict):
            raise CheckpointError(f"{where} holds no optimizer state")
        check_optimizer_state(opt, self.optimizer, where, names={p: n for n, p in self.named_trainable.items()})
        sched = state.get("scheduler")
        if not isinstance(sched, dict) or sched.get("last_epoch") != step:
            raise CheckpointError(f"{where}: the LR scheduler state is missing or not at step {step} "
                                  f"(last_epoch {sched.get('last_epoch') if isinstance(sched, dict) else None!r})")
        trainer_state = self._checked_trainer_state(state.get("trainer"), step, where)
        restore_rng_state(state.get("rng") or {})  # raises CheckpointError on a malformed state: before copying
        if self.sharded:  # every rank its shard of the whole tensors
            from adapterkit.engine import fsdp

            fsdp.load_trainable_state(self.model, state["adapter"])
            fsdp.load_optimizer_state(self.optimizer, opt)
        else:
            with torch.no_grad():
                for n, t in state["adapter"].items():
                    self.named_trainable[n].copy_(t.to(self.named_trainable[n].device))
            self.optimizer.load_state_dict(opt)
        if not (getattr(self.tcfg, "cuda_graphs", False) and self.device.type == "cuda"):
            # a checkpoint of a CUDA-graphed run holds a capturable optimizer with a tensor LR
            for g in self.optimizer.param_groups:
                g["capturable"] = False
                if isinstance(g["lr"], torch.Tensor):
                    g["lr"] = float(g["lr"])
        self.scheduler.load_state_dict(sched)
        self.state.update(trainer_state)
        self._started -= float(trainer_state.get("train_s", 0.0))  # the processes before this one
        self.state["resume_changes"] = list(self.state.get("resume_changes") or []) + changes
        self._last_ckpt = (step, path, self._largest_weight(self._weights() if self.sharded else None))
        if _is_main():
            print(f"resumed from step {step} (epoch {self.state['epoch']}, position {self.state['pos']})")
        return True

    def _clean_temps(self) -> None:
        """Leftovers of interrupted atomic writes in the run directory (we hold its lock)."""
        for d in (self.out, self.ckpt.root, self.out / "best", self.out / "final"):
            remove_stale_temps(d)

    # --- the log -------------------------------------------------------------------------------
    def _open_log(self):
        """``train_log.csv`` cut back to the rows up to the resumed step (a resume never
        repeats rows), rewritten atomically, then opened for appending; a link planted
        at its path is refused, never followed."""
        path = self.out / LOG_NAME
        if path.is_symlink():
            raise CheckpointError(f"{path} is a symbolic link (to {os.readlink(path)}); adapterkit writes only "
                                  "regular files in a run directory: remove the link and rerun")
        if path.exists() and not path.is_file():
            raise CheckpointError(f"{path} is not a regular file; remove it and rerun")
        step = self.state["step"]
        rows, seen = [], set()
        if step > 0 and path.exists():
            try:
                fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
            except OSError as exc:
                raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
            with os.fdopen(fd, encoding="utf-8", errors="replace", newline="") as f:
                for row in csv.reader(f):
                    if row and row[0].isdigit() and int(row[0]) <= step and row[0] not in seen:
                        seen.add(row[0])
                        rows.append(row)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(LOG_HEADER)
        w.writerows(rows)
        atomic_write_text(path, buf.getvalue())  # a rename: replaces the path itself, follows nothing
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | _NOFOLLOW)
        except OSError as exc:
            raise CheckpointError(f"cannot open {path} for writing: {exc.strerror}") from None
        return os.fdopen(fd, "a", newline="")

    # --- signals -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stop_on_signals(self):
        """SIGTERM / SIGINT set a flag; the loop finishes the step, saves and stops. A second
        signal stops at once (every file on disk is whole: writes are atomic)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_signal is not None:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            self._stop_signal = signum
            with contextlib.suppress(OSError):
                os.write(2, f"\n{signal.Signals(signum).name} received: finishing the current step, then writing a "
                            "checkpoint (send it again to stop at once)\n".encode())

        previous = {}
        try:
            for s in (signal.SIGTERM, signal.SIGINT):
                previous[s] = signal.signal(s, handler)
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)  # None: set outside Python

    def _stop_requested(self) -> bool:
        flag = self._stop_signal or 0
        if _dist():  # every rank stops at the same step
            t = torch.tensor([flag], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = int(t.item())
            if flag and self._stop_signal is None:
                self._stop_signal = flag
        return bool(flag)

    def _interrupt(self, logf):
        step = self.state["step"]
        if logf:
            logf.flush()
        if self._last_ckpt is None or self._last_ckpt[0] != step:
            self._save_checkpoint()
        name = signal.Signals(self._stop_signal).name
        raise TrainingInterrupted(f"stopped by {name} after step {step} of {self.total_steps}: checkpoint "
                                  f"{self._last_ckpt[1]} written; rerun the same command to resume",
                                  self._stop_signal)

    # --- the loop ----------------------------------------------------------------------------
    def _move(self, batch):
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def _all_reduce_grads(self):
        if not _dist() or self.sharded:  # FSDP reduce-scatters the gradients itself
            return
        # one all-reduce: the gradients, then one flag per parameter (did any rank's graph use it?).
        # A parameter no rank used (another task's head) keeps no gradient, as in a one-process run,
        # so the optimizer leaves it (and its moments) alone
        ref = self.params[0]
        used = torch.tensor([float(p.grad is not None) for p in self.params], dtype=ref.dtype, device=ref.device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params]
                         + [used])
        torch.distributed.all_reduce(flat)
        used = flat[-len(self.params):].tolist()
        flat = flat[:-len(self.params)] / _world()
        i = 0
        for p, u in zip(self.params, used):
            n = p.numel()
            g = flat[i:i + n].view_as(p)
            if not u:
                p.grad = None
            elif p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            i += n

    def _amp(self):
        """bf16 autocast when ``train.bf16`` is set (a no-op context otherwise)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bool(getattr(self.tcfg, "bf16", False)))

    def _graphed_loss(self, batch):
        return self.domain.loss(batch, self._graph_task)

    def _graphed_step(self, task, tid, batch):
        """One CUDA-graphed step (train.cuda_graphs); None where it must run eagerly."""
        if self.graph is None:
            from adapterkit.core.graphs import GraphedStep

            clip = self.tcfg.grad_clip if self.tcfg.grad_clip > 0 else None
            self.graph = GraphedStep(self.model, self.optimizer, self._graphed_loss, clip_grad_norm=clip,
                                     params=self.params, enabled=not _dist(),
                                     amp_dtype=torch.bfloat16 if getattr(self.tcfg, "bf16", False) else None)
            if self.graph.mode != "graph" and _is_main():
                reason = "multi-process run" if _dist() else self.graph.fallback_reason
                print(f"train.cuda_graphs: training eagerly ({reason})")
        if self.graph.mode != "graph":
            return None
        self._graph_task = tid  # a Python-side branch: one graph per (task, batch size)
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        first = next(iter(tensors.values()))
        loss = self.graph(tensors, key=(tid, first.shape[0]))
        # a failed capture (a host sync) ran this step eagerly and GraphedStep said so, once
        self.scheduler.step()
        val = float(loss)
        self._check_loss(val, task)
        return val

    def _check_loss(self, val: float, task) -> None:
        if not math.isfinite(val):
            raise TrainingError(f"the loss is {val} at step {self.state['step'] + 1} (task {task!r}); the run "
                                f"stopped (lower train.lr or raise train.grad_clip?). {self._kept()}")

    def train_step(self, task, rows, seed):
        self.domain.train_mode()
        tid = self.tasks.index(task)
        batch = self._move(self.domain.train_batch(task, rows, seed, _rank(), _world()))
        if getattr(self.tcfg, "cuda_graphs", False):
            val = self._graphed_step(task, tid, batch)
            if val is not None:
                return val
        try:
            with self._amp():
                loss = self.domain.loss(batch, tid)
        except torch.OutOfMemoryError:
            raise TrainingError(f"out of memory at step {self.state['step']} (task {task!r}, {len(rows)} examples "
                                f"per step); try train.batch_size {max(1, self.tcfg.batch_size // 2)}") from None
        self._check_loss(loss.item(), task)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._all_reduce_grads()
        if self.tcfg.grad_clip and self.tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.tcfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        val = loss.detach()
        if _dist():
            torch.distributed.all_reduce(val)
            val /= _world()
        return float(val)

    def fit(self) -> dict:
        """Train (resuming from the newest valid checkpoint in the output directory), then
        test; returns the results (also written to ``results.json``)."""
        err = None
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(lock_output(self.out))
            except CheckpointError as e:
                err = e
            if _dist():  # every rank learns whether rank 0 holds the lock
                ok = torch.tensor([0 if err is not None else 1], device=self.device)
                torch.distributed.broadcast(ok, 0)
                if not int(ok.item()) and err is None:
                    err = CheckpointError(f"rank 0 could not lock the output directory {self.out}")
            if err is not None:
                raise err
            stack.enter_context(self._stop_on_signals())
            return self._fit()

    def _fit(self) -> dict:
        t0 = self._started = time.time()
        self._resume()
        cfg = self.tcfg
        logf = None
        if _is_main():
            self._clean_temps()
            logf = self._open_log()
        writer = csv.writer(logf) if logf else None
        bar = _progress(total=self.total_steps, initial=self.state["step"], desc="train")
        log_every = int(_get(cfg, "log_every", 1) or 1)  # the progress bar's loss; the log has every step
        done = self.state["step"] >= self.total_steps
        try:
            while not done and self.state["epoch"] < cfg.epochs:
                ep = self.state["epoch"]
                sched = task_schedule(self.num_batches, cfg.seed, ep)
                orders = {t: self.domain.epoch_order(t, cfg.seed, ep) for t in self.tasks}
                while self.state["pos"] < len(sched):
                    task, b = sched[self.state["pos"]]
                    bs = self.batch_sizes[task]
                    rows = orders[task][b * bs:(b + 1) * bs]
                    loss = self.train_step(task, rows, batch_seed(cfg.seed, ep, task, b))
                    self.state["pos"] += 1
                    self.state["step"] += 1
                    step = self.state["step"]
                    if writer:
                        writer.writerow([step, ep, task, f"{loss:.6f}", f"{self.scheduler.get_last_lr()[0]:.3e}"])
                    bar.update(1)
                    if step % log_every == 0 or step == 1:
                        bar.set_postfix(task=task, loss=f"{loss:.3f}")
                        if logf:  # the log on disk follows the run (a run without a bar can be watched)
                            logf.flush()
                    if step % cfg.checkpoint_every == 0:
                        if logf:
                            logf.flush()
                        self._save_checkpoint()
                    if step >= self.total_steps:
                        done = True
                        break
                    if self._stop_requested():
                        self._interrupt(logf)
                if self.state["pos"] >= len(sched):
                    self.state["epoch"] += 1
                    self.state["pos"] = 0
                if cfg.eval_every_epoch or done:
                    self._validate()
                if logf:
                    logf.flush()
                self._save_checkpoint()
                if not done and self._stop_requested():
                    self._interrupt(logf)
        finally:
            bar.close()
            if logf:
                logf.close()
        self._save_best("final")  # the final weights, always: adapter files (+ everything trainable) in OUTPUT/final
        if self._stop_requested():
            name = signal.Signals(self._stop_signal).name
            raise TrainingInterrupted(f"stopped by {name} after training finished (step {self.state['step']}, "
                                      f"checkpoint {self._last_ckpt[1]}), before the test evaluation; rerun the "
                                      "same command to evaluate", self._stop_signal)
        self._eval_interruptible = not _dist()
        try:
            results = self.test()
        finally:
            self._eval_interruptible = False
        # the whole run's time: the processes before a resume (to the checkpoint it resumed from;
        # the steps redone after it count once) and this one
        end = time.time()
        results["wall_time_s_this_process"], results["wall_time_s"] = end - t0, end - self._started
        if _is_main():
            atomic_write_json(self.out / "results.json", results)
            self._clean_temps()
        _barrier()
        return results

    # --- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, task, split, desc=None) -> dict:
        """``{example id: prediction}`` for every example of (task, split), sharded over the
        ranks and gathered."""
        self.model.eval()
        n = self.domain.eval_size(task, split)
        if self.sharded:  # every rank runs as many batches (a sharded forward is a collective)
            from adapterkit.engine import fsdp

            rows = fsdp.even_rows(n, _rank(), _world())
        else:
            rows = np.arange(n)[_rank()::_world()]
        bs = self.ecfg.batch_size
        preds = {}
        for i in _progress(range(0, len(rows), bs), desc=desc or f"eval {task}/{split}", leave=False):
            if self._eval_interruptible and self._stop_signal is not None:
                raise TrainingInterrupted(
                    f"stopped by {signal.Signals(self._stop_signal).name} during the test evaluation, after training "
                    f"finished (step {self.state['step']}); rerun the same command to evaluate", self._stop_signal)
            with self._amp():
                preds.update(self.domain.predict_batch(task, split, rows[i:i + bs]))
        if _dist():
            gathered = [None] * _world()
            torch.distributed.all_gather_object(gathered, preds)
            preds = {k: v for g in gathered for k, v in g.items()}
        return preds

    def evaluate(self, split) -> dict:
        """``{task: metrics}`` (each with its ``_predictions``) on ``split``."""
        out = {}
        for t in self.tasks:
            preds = self.predict(t, split)
            out[t] = dict(self.domain.score(t, split, preds))
            out[t]["_predictions"] = preds
        return out

    def main_score(self, task_metrics: dict) -> float:
        return self.domain.main_score(task_metrics)

    def _validate(self):
        if self.ecfg.select_on != "val":
            return
        m = self.evaluate(self.domain.split("val"))
        avg = float(np.mean([self.main_score(v) for v in m.values()]))
        entry = {"step": self.state["step"], "epoch": self.state["epoch"], "val_avg": avg,
                 **{t: self.main_score(v) for t, v in m.items()}}
        self.state["history"].append(entry)
        if _is_main():
            print("val", json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in entry.items()}))
        if self.domain.keep_val_metrics:
            entry["metrics"] = {t: {k: x for k, x in v.items() if not k.startswith("_")} for t, v in m.items()}
        if self.state["best"] is None or avg > self.state["best"]:
            self.state["best"], self.state["best_step"] = avg, self.state["step"]
            self._save_best()  # (every rank: gathering a sharded model's weights is a collective)
        _barrier()

    def _save_best(self, name: str = "best"):
        """Write ``OUT/name`` (rank 0; every rank calls it: a sharded model's weights are gathered)."""
        weights = self._weights() if (self.sharded or _is_main()) else None
        adapters = None
        if self.sharded:
            from adapterkit.core.base import get_container
            from adapterkit.engine import fsdp

            adapters = fsdp.full_adapter_state(self.model) if get_container(self.model) is not None else None
        if not _is_main():
            return
        self._check_finite_weights(f"{name}/ was not written", *((weights, None) if self.sharded else ()))
        folder = self.out / name
        best = self.out / "best"
        if name == "final" and self.state.get("best_step") == self.state["step"] and _same_weights(best, weights):
            link_folder(best, folder)  # the final weights are the best: stored once, hard-linked
        else:
            save_trained(self.model, weights, folder, adapter_state=adapters)
        self.domain.save(folder)

    def _load_best(self, name: str = "best"):
        folder = self.out / name
        if not (folder / TRAINABLE_FILE).exists():
            return False
        t = read_trained(folder)
        check_tensors({n: v for n, v in t.items() if n in self.named_trainable or not self.sharded},
                      self.named_trainable, str(folder))
        if self.sharded:
            from adapterkit.engine import fsdp

            fsdp.load_trainable_state(self.model, {n: v for n, v in t.items() if n in self.named_trainable})
            return True
        with torch.no_grad():
            for n, v in t.items():
                self.named_trainable[n].copy_(v.to(self.named_trainable[n].device))
        return True

    def test(self) -> dict:
        _barrier()
        used_best = self.ecfg.select_on == "val" and self._load_best()
        m = self.evaluate(self.domain.split("test"))
        preds = {t: v.pop("_predictions") for t, v in m.items()}
        rep = adapterkit.trainable_report(self.model)
        res = {
            "name": self.name,
            "domain": self.domain.name,
            **self.domain.results(),
            "config": _jsonable(self.config),
            "versions": versions(),
            "steps": self.state["step"],
            "checkpoint": f"best (step {self.state['best_step']}, val avg {self.state['best']:.2f})"
            if used_best and self.state["best"] is not None else "last",
            "test": m,
            "test_avg": float(np.mean([self.main_score(v) for v in m.values()])),
            "val_history": self.state["history"],
            "resume_changes": self.state.get("resume_changes", []),
            "trainable": rep["trainable"], "total": rep["total"], "percent": rep["percent"],
        }
        if _is_main():
            atomic_write_json(self.out / "predictions.json", preds)
        return res


TRAINABLE_FILE = "trainable.safetensors"


def save_trained(model, weights: dict, folder, adapter_state: dict | None = None) -> None:
    """The trained weights of a run, each tensor once: the adapters as an adapter folder
    (``adapterkit.save_adapters``: loadable into the base model) and, in
    ``trainable.safetensors``, every other trainable tensor (a new head, the visual
    projection, all weights of full fine-tuning)."""
    from adapterkit.core.base import get_container
    from adapterkit.safeio import save_safetensors_atomic

    folder = Path(folder)
    covered: set[str] = set()
    if get_container(model) is not None:
        from adapterkit.core.io import adapter_state_dict

        adapterkit.save_adapters(model, folder, state_dict=adapter_state)
        covered = set(adapter_state if adapter_state is not None else adapter_state_dict(model))
    rest = {n: p.detach() for n, p in weights.items() if n not in covered}
    save_safetensors_atomic(rest, folder / TRAINABLE_FILE, metadata={"adapters_in": "adapter_model.safetensors"
                                                                     if covered else ""})


def read_trained(folder) -> dict:
    """``{parameter name: tensor}`` of what :func:`save_trained` wrote (adapters + the rest),
    each file checked (a corrupt or truncated file is one CheckpointError naming it)."""
    from adapterkit.safeio import load_safetensors_checked

    folder = Path(folder)
    out = dict(load_safetensors_checked(folder / TRAINABLE_FILE))
    adapters = folder / "adapter_model.safetensors"
    if adapters.exists():
        for k, v in load_safetensors_checked(adapters).items():
            out.setdefault(k, v)
    return out


def _same_weights(folder: Path, cur: dict) -> bool:
    """Whether ``folder`` holds exactly the trainable weights ``cur`` ({name: tensor})."""
    if not (folder / TRAINABLE_FILE).exists():
        return False
    try:
        saved = read_trained(folder)
    except AdapterKitError:
        return False
    return saved.keys() >= cur.keys() and all(torch.equal(saved[n], p.detach().cpu()) for n, p in cur.items())


def link_folder(src: Path, dst: Path) -> None:
    """``dst`` made of hard links to ``src``'s files (copies where links are not possible),
    replacing what ``dst`` held, file by file atomically."""
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if not f.is_file() or f.is_symlink() or f.name.startswith("."):
            continue
        tmp = dst / f".{f.name}.{os.getpid()}.link.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(f, tmp)
        except OSError:
            shutil.copy2(f, tmp)
        os.replace(tmp, dst / f.name)
    for f in dst.iterdir():  # a file an earlier final/ had and best/ has not
        if f.is_file() and not (src / f.name).exists() and not f.name.startswith("."):
            f.unlink()


def _jsonable(cfg):
    if cfg is None:
        return None
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return json.loads(json.dumps(cfg, default=str))


def cpu_name() -> str:
    """The processor's model name ("AMD EPYC", "Intel(R) Xeon(R) Platinum ...") and the vector ISA
    torch's kernels use on it ("AVX512"): two machines with one name and ISA run the same kernels.
    (``platform.processor()`` is empty on most Linux machines.)"""
    name = ""
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "cpu"
    try:
        return f"{name} ({torch.backends.cpu.get_cpu_capability()})"
    except Exception:  # an older torch without the query
        return name


def versions() -> dict:
    """What a run's numbers depend on besides its config: package versions, the device and the
    thread count (a kernel's rounding depends on the processor and on how it splits its sums)."""
    import transformers

    return {"adapterkit": adapterkit.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": torch.cuda.get_device_name() if torch.cuda.is_available()
            else cpu_name(), "threads": torch.get_num_threads()}
