"""Multi-task VL trainer: one task per batch, the epoch-seeded proportional schedule,
per-task batch sizes, score-weighted VQA loss, AdamW with linear warm-up, grad clip,
crash-safe checkpoints with exact resume, best-validation selection, results JSON.

Distributed: runs unchanged under ``torchrun`` / ``accelerate launch`` (torch.distributed
with gloo on CPU, NCCL on GPU). Every rank builds the same schedule; rank r takes rows
r::world of each global batch; gradients are averaged with one all-reduce per step
(robust to per-task adapters that a batch does not use); rank 0 writes checkpoints and
all ranks resume from them; evaluation is sharded and gathered.

Reliability: one run per output directory (an OS lock, :mod:`adapterkit.train.lock`); a
resume checks the checkpoint's run config and every tensor against this run before
copying anything; SIGTERM / SIGINT finish the current step, write a checkpoint and stop
with :class:`TrainingInterrupted`; weights are checked finite before every save; the
log is cut back to the checkpoint's step on resume and never written through a link.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import platform
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

import adapterkit
from adapterkit.core.optim import TaskAwareAdamW
from adapterkit.errors import AdapterKitError, CheckpointError, ConfigError, DataError, did_you_mean, warn
from adapterkit.safeio import (
    atomic_write_json,
    atomic_write_text,
    estimate_checkpoint_bytes,
    remove_stale_temps,
    write_probe,
)
from adapterkit.train.checkpoint import (
    ABSENT,
    CheckpointManager,
    capture_rng_state,
    check_optimizer_state,
    check_tensors,
    config_differences,
    restore_rng_state,
)
from adapterkit.train.config import RunConfig, load_config
from adapterkit.train.lock import RunLock
from adapterkit.vl.data import BINARY_TASKS, CAPTION_TASKS, TaskData, TextSpec, _seed, task_schedule
from adapterkit.vl.datasets.base import read_examples_jsonl

logger = logging.getLogger(__name__)


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
FREE_TRAIN_KEYS = ("checkpoint_every", "keep_last", "eval_every_epoch", "log_every")
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


def _abspath(p):
    return os.path.abspath(os.path.expanduser(p)) if isinstance(p, str) and p else p


def check_max_steps(max_steps) -> None:
    """``max_steps`` given by a caller (the CLI's --max-steps): None or a positive integer."""
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError(f"max_steps must be a positive integer, got {max_steps!r}")


#: data.* keys that define the training data (the others choose eval splits and limits)
_DATA_KEYS = ("root", "features", "tasks", "train_split", "max_train_examples", "sources")


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
    if isinstance(keys, str):
        keys = keys.split(",")
    defining, free = _config_keys()
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
    """Hold the run lock on ``output_dir`` (:class:`~adapterkit.train.lock.RunLock`) in rank 0
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


def _progress(iterable=None, **kw):
    from tqdm.auto import tqdm

    kw.setdefault("disable", not _is_main() or os.environ.get("ADAPTERKIT_NO_PROGRESS") == "1")
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)


# --- distributed ----------------------------------------------------------------------------

def _dist():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank():
    return torch.distributed.get_rank() if _dist() else 0


def _world():
    return torch.distributed.get_world_size() if _dist() else 1


def _is_main():
    return _rank() == 0


def init_distributed() -> None:
    """Join the process group torchrun / accelerate launch describe in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _dist():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _barrier():
    if _dist():
        torch.distributed.barrier()


# --- the trainer ----------------------------------------------------------------------------

class Trainer:
    def __init__(self, config, output_dir: str | os.PathLike, max_steps: int | None = None,
                 model=None, tokenizer=None, allow_changes=()):
        """``allow_changes``: keys of :data:`RESUME_CHANGEABLE` that may differ from the run
        config recorded in the checkpoint a resume starts from (else a mismatch is refused)."""
        check_max_steps(max_steps)
        self.allow_changes = check_allow_changes(allow_changes)
        self.cfg: RunConfig = config if isinstance(config, RunConfig) else load_config(config)
        if max_steps is not None:
            self.cfg.train.max_steps = max_steps
        self.out = Path(output_dir)
        init_distributed()
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() \
            else torch.device("cpu")
        if self.cfg.data.generate == "tiny_fixture" and not Path(self.cfg.data.root).exists():
            if _is_main():
                from adapterkit.testing.fixtures import make_vl_fixture

                make_vl_fixture(self.cfg.data.root, feat_dim=self.cfg.model.feat_dim)
            _barrier()
        # every split's rows are checked before any work; the checked examples are kept for _read
        self._checked = self.cfg.check_paths(("train",) + (("val",) if self.cfg.eval.select_on == "val" else ()))
        if _is_main():
            write_probe(self.out)  # read-only / full disk: fail before any work
        self._seed_all(self.cfg.train.seed)
        from adapterkit.vl.build import build_vl_model
        from adapterkit.vl.features import FeatureStore

        self.store = FeatureStore.open(self.cfg.data.features)
        if self.store.dim != self.cfg.model.feat_dim:
            raise ConfigError(f"the feature store {self.cfg.data.features} has {self.store.dim}-d features but "
                              f"model.feat_dim is {self.cfg.model.feat_dim}")
        self.preset = self.cfg.preset_dict()
        tasks = self.cfg.data.tasks
        if model is None:
            spec = {"backbone": self.cfg.model.backbone, "feat_dim": self.cfg.model.feat_dim,
                    "n_images": self.cfg.model.n_images, "random_init": self.cfg.model.random_init,
                    "init_seed": self.cfg.model.init_seed, "device": "cpu",
                    "corpus": self._corpus() if self.cfg.model.backbone.startswith("tiny-") else []}
            if self.cfg.model.lm:
                spec["lm"] = self.cfg.model.lm
            model, tokenizer = build_vl_model(spec, self.preset, tasks)
        self.model, self.tok = model.to(self.device), tokenizer
        from adapterkit.vl.presets import uses_task_prefix

        spec = TextSpec(kind=self.model.kind, max_text_len=self.cfg.train.max_text_len,
                        max_target_len=self.cfg.train.max_target_len, fixed_shapes=self.cfg.train.cuda_graphs,
                        use_prefix=uses_task_prefix(self.preset, self.cfg.train.video, self.cfg.data.task_prefix),
                        zero_boxes=self.cfg.data.zero_boxes)
        self.train_data = {t: self._task_data(t, self.cfg.data.train_split, spec, True) for t in tasks}
        self.spec = spec
        self._eval_cache: dict = {}
        if self.cfg.train.bf16:  # frozen weights in bf16: autocast reads them so anyway, half the memory
            adapterkit.cast_frozen(self.model, torch.bfloat16)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.named_trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.batch_sizes = {t: max(1, round(self.cfg.train.batch_size * self.cfg.train.task_batch_scale.get(t, 1.0)))
                            * _world() for t in tasks}
        self.num_batches = {t: d.num_batches(self.batch_sizes[t]) for t, d in self.train_data.items()}
        self.steps_per_epoch = sum(self.num_batches.values())
        total = self.steps_per_epoch * self.cfg.train.epochs
        if self.cfg.train.max_steps:
            total = min(total, self.cfg.train.max_steps)
        self.total_steps = total
        lr = self.cfg.train.lr or (self.preset.get("video_lr") if self.cfg.train.video else self.preset.get("lr")) or 1e-3
        self.lr = lr
        self.optimizer = TaskAwareAdamW(self._param_groups(), lr=lr, eps=self.cfg.train.adam_eps)
        warm = int(self.cfg.train.warmup_ratio * total)

        def schedule(step):
            if step < warm:
                return (step + 1) / max(1, warm)
            return max(0.0, (total - step) / max(1, total - warm))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        # the probe reserves what one checkpoint needs (weights + AdamW's two moments): a full disk fails now
        self.ckpt = CheckpointManager(self.out, keep_last=self.cfg.train.keep_last, probe=_is_main(),
                                      min_free_bytes=estimate_checkpoint_bytes(self.named_trainable))
        self.state = {"epoch": 0, "pos": 0, "step": 0, "best": None, "best_step": None, "history": [],
                      "resume_changes": []}
        self.graph = None  # GraphedStep, made at the first step (after a resume has loaded the optimizer)
        self._graph_task = 0
        self.run_identity = json.loads(json.dumps(self._run_identity(), default=str))
        self._last_ckpt = None  # (step, path, largest |weight|) of the newest checkpoint of this run
        self._stop_signal = None  # set by the SIGTERM / SIGINT handler
        self._eval_interruptible = False  # training finished and saved: the test evaluation may stop at once

    # --- setup helpers ----------------------------------------------------------------------
    def _run_identity(self) -> dict:
        """What defines this run's training (stored in every checkpoint, compared on resume):
        the model, the adapters, the training data and every train.* key but the free ones."""
        c = self.cfg
        train = dataclasses.asdict(c.train)
        for k in FREE_TRAIN_KEYS:
            train.pop(k, None)
        train["lr"] = self.lr  # as resolved (the preset's when train.lr is unset)
        data = {k: getattr(c.data, k) for k in _DATA_KEYS}
        data.update(root=_abspath(c.data.root), features=_abspath(c.data.features), tasks=list(c.data.tasks))
        return {"model": dataclasses.asdict(c.model), "preset": c.preset, "adapters": self.preset.get("adapters"),
                "data": data, "train": train, "world_size": _world()}

    @staticmethod
    def _seed_all(seed):
        random.seed(seed)
        np.random.seed(seed % (2**32))
        torch.manual_seed(seed)

    def _split_file(self, task, split):
        return Path(self.cfg.data.root) / task / f"{split}.jsonl"

    def _corpus(self) -> list[str]:
        """Text of the training data (for tiny word-level tokenizers)."""
        lines = []
        for t in self.cfg.data.tasks:
            for s in {self.cfg.data.train_split, self.cfg.data.val_split, self.cfg.data.test_split}:
                if t in self.cfg.data.sources or self._split_file(t, s).exists():
                    try:
                        exs = self._read(t, s)
                    except DataError:
                        continue
                    for ex in exs:
                        lines.append(ex.text)
                        lines.extend(ex.targets)
                        lines.extend(ex.choices or [])
        from adapterkit.vl.data import PREFIXES
        lines += list(PREFIXES.values()) + ["answer :", "true", "false"]
        return lines

    def _read(self, task, split) -> list:
        hit = getattr(self, "_checked", {}).get((task, split))
        if hit is not None:
            return list(hit)
        src = self.cfg.data.sources.get(task)
        if src is None:
            return read_examples_jsonl(self._split_file(task, split))
        from adapterkit.vl.datasets import read_source

        return read_source(task, src, split)  # the source's reader options (annotations, subtitles) included

    def _task_data(self, task, split, spec, train):
        exs = self._read(task, split)
        limit = self.cfg.data.max_train_examples if train else self.cfg.data.max_eval_examples
        if limit:
            exs = exs[:limit]
        if task == "vqa":
            from adapterkit.vl.metrics.vqa import soft_scored

            for e in exs:  # single-answer VQA-style data: score by soft score, not leave-one-out
                if soft_scored(e):
                    e.extra.setdefault("raw_answers", False)
        return TaskData(task, exs, self.store, self.tok, spec, self.cfg.model.n_images, train)

    def _param_groups(self):
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            leaf = n.rsplit(".", 1)[-1]
            is_norm = "norm" in n.lower() or "ln_" in n.lower() or n.endswith("ln_weight") or n.endswith("ln_bias")
            (no_decay if leaf == "bias" or (is_norm and leaf == "weight") or p.dim() == 1 else decay).append(p)
        return [{"params": decay, "weight_decay": self.cfg.train.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    # --- checkpoints ------------------------------------------------------------------------
    def _largest_weight(self) -> float:
        vals = [p.detach().abs().max() for p in self.params if p.numel()]
        return float(torch.stack(vals).max()) if vals else 0.0

    def _kept(self) -> str:
        """What a rerun would start from, exactly."""
        if self._last_ckpt is None:
            return (f"kept: no checkpoint was written (the first comes at step {self.cfg.train.checkpoint_every}, "
                    "train.checkpoint_every); a rerun starts from step 0")
        step, path, big = self._last_ckpt
        return (f"kept: checkpoint step {step} ({path}; finite weights, largest |weight| {big:.3g}), "
                "which a rerun resumes from")

    def _check_finite_weights(self, consequence: str) -> None:
        """Refuse to save non-finite trainable weights or optimizer moments."""
        tensors = [(n, p) for n, p in self.named_trainable.items()]
        names = {p: n for n, p in tensors}
        for p, st in self.optimizer.state.items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "step":
                    tensors.append((f"the optimizer's {k} of {names.get(p, '?')}", v))
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
        self._check_finite_weights(f"no checkpoint was written for step {step}")
        path = self.ckpt.path_for(step)
        if _is_main():
            state = {
                "adapter": {n: p.detach() for n, p in self.named_trainable.items()},
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": capture_rng_state(),
                "trainer": dict(self.state),
                "extra": {"run": self.run_identity},
            }
            path = self.ckpt.save(step, state)
        self._last_ckpt = (step, path, self._largest_weight())
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
        with torch.no_grad():
            for n, t in state["adapter"].items():
                self.named_trainable[n].copy_(t.to(self.named_trainable[n].device))
        self.optimizer.load_state_dict(opt)
        if not (self.cfg.train.cuda_graphs and self.device.type == "cuda"):
            # a checkpoint of a CUDA-graphed run holds a capturable optimizer with a tensor LR
            for g in self.optimizer.param_groups:
                g["capturable"] = False
                if isinstance(g["lr"], torch.Tensor):
                    g["lr"] = float(g["lr"])
        self.scheduler.load_state_dict(sched)
        self.state.update(trainer_state)
        self.state["resume_changes"] = list(self.state.get("resume_changes") or []) + changes
        self._last_ckpt = (step, path, self._largest_weight())
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
        if not _dist():
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        torch.distributed.all_reduce(flat)
        flat /= _world()
        i = 0
        for p in self.params:
            n = p.numel()
            g = flat[i:i + n].view_as(p)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            i += n

    def _amp(self):
        """bf16 autocast when ``train.bf16`` is set (a no-op context otherwise)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.bf16)

    def _graphed_loss(self, batch):
        return self.model(**batch, task_ids=self._graph_task)

    def _graphed_step(self, task, tid, batch):
        """One CUDA-graphed step (train.cuda_graphs); None where it must run eagerly."""
        if self.graph is None:
            from adapterkit.core.graphs import GraphedStep

            clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else None
            self.graph = GraphedStep(self.model, self.optimizer, self._graphed_loss, clip_grad_norm=clip,
                                     params=self.params, enabled=not _dist(),
                                     amp_dtype=torch.bfloat16 if self.cfg.train.bf16 else None)
            if self.graph.mode != "graph" and _is_main():
                reason = "multi-process run" if _dist() else self.graph.fallback_reason
                print(f"train.cuda_graphs: training eagerly ({reason})")
        if self.graph.mode != "graph":
            return None
        self._graph_task = tid  # a Python-side branch: one graph per (task, batch size)
        loss = self.graph({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)},
                          key=(tid, batch["input_ids"].shape[0]))
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
        self.model.train()
        tid = self.cfg.data.tasks.index(task)
        batch = self._move(self.train_data[task].train_batch(rows, seed, _rank(), _world()))
        if self.cfg.train.cuda_graphs:
            val = self._graphed_step(task, tid, batch)
            if val is not None:
                return val
        try:
            with self._amp():
                loss = self.model(**batch, task_ids=tid)
        except torch.OutOfMemoryError:
            bs = batch["input_ids"].shape[0]
            raise TrainingError(f"out of memory at step {self.state['step']} (task {task!r}, {bs} examples per "
                                f"device); try train.batch_size {max(1, self.cfg.train.batch_size // 2)}") from None
        self._check_loss(loss.item(), task)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._all_reduce_grads()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
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
        t0 = time.time()
        self._resume()
        cfg = self.cfg.train
        logf = None
        if _is_main():
            self._clean_temps()
            logf = self._open_log()
        writer = csv.writer(logf) if logf else None
        bar = _progress(total=self.total_steps, initial=self.state["step"], desc="train")
        done = self.state["step"] >= self.total_steps
        try:
            while not done and self.state["epoch"] < cfg.epochs:
                ep = self.state["epoch"]
                sched = task_schedule(self.num_batches, cfg.seed, ep)
                orders = {t: d.epoch_order(cfg.seed, ep) for t, d in self.train_data.items()}
                while self.state["pos"] < len(sched):
                    task, b = sched[self.state["pos"]]
                    bs = self.batch_sizes[task]
                    rows = orders[task][b * bs:(b + 1) * bs]
                    loss = self.train_step(task, rows, _seed(cfg.seed, ep, task, b))
                    self.state["pos"] += 1
                    self.state["step"] += 1
                    step = self.state["step"]
                    if writer:
                        writer.writerow([step, ep, task, f"{loss:.6f}", f"{self.scheduler.get_last_lr()[0]:.3e}"])
                    bar.update(1)
                    bar.set_postfix(task=task, loss=f"{loss:.3f}")
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
        if _is_main():  # the final weights, always: adapter files (+ everything trainable) in OUTPUT/final
            self._save_best("final")
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
        results["wall_time_s"] = time.time() - t0
        if _is_main():
            atomic_write_json(self.out / "results.json", results)
            self._clean_temps()
        _barrier()
        return results

    # --- evaluation ---------------------------------------------------------------------------
    def _eval_data(self, task, split):
        key = (task, split)
        if key not in self._eval_cache:
            self._eval_cache[key] = self._task_data(task, split, self.spec, False)
        return self._eval_cache[key]

    @torch.no_grad()
    def predict(self, task, split, desc=None) -> dict[str, str]:
        data = self._eval_data(task, split)
        self.model.eval()
        tid = self.cfg.data.tasks.index(task)
        rows = np.arange(len(data))[_rank()::_world()]
        bs = self.cfg.eval.batch_size
        preds = {}
        eos = self.tok.eos_token_id
        pad = self.tok.pad_token_id
        for i in _progress(range(0, len(rows), bs), desc=desc or f"eval {task}/{split}", leave=False):
            if self._eval_interruptible and self._stop_signal is not None:
                raise TrainingInterrupted(
                    f"stopped by {signal.Signals(self._stop_signal).name} during the test evaluation, after training "
                    f"finished (step {self.state['step']}); rerun the same command to evaluate", self._stop_signal)
            batch = data.eval_batch(rows[i:i + bs])
            uids = batch.pop("uids")
            batch = self._move(batch)
            with self._amp():
                texts = self._predict_batch(task, tid, batch, eos, pad)
            preds.update(zip(uids, texts))
        if _dist():
            gathered = [None] * _world()
            torch.distributed.all_gather_object(gathered, preds)
            preds = {k: v for g in gathered for k, v in g.items()}
        return preds

    def _predict_batch(self, task, tid, batch, eos, pad) -> list[str]:
        from adapterkit.vl.data import caption_max_new_tokens, choice_first_tokens

        if task in BINARY_TASKS:
            cand = choice_first_tokens(self.tok, self.model.kind, ["true", "false"])  # as targets are tokenised
            scores = self.model.first_token_scores(**batch, candidate_ids=cand, task_ids=tid)
            texts = ["true" if s[0] >= s[1] else "false" for s in scores.tolist()]
        else:
            cap = task in CAPTION_TASKS
            out = self.model.generate(**batch, task_ids=tid, pad_token_id=pad, eos_token_id=eos,
                                      max_new_tokens=(self.cfg.eval.caption_max_new_tokens
                                                      or caption_max_new_tokens(task)) if cap
                                      else self.cfg.eval.max_new_tokens,
                                      num_beams=self.cfg.eval.caption_beams if cap else 1)
            texts = [t.strip() for t in self.tok.batch_decode(out, skip_special_tokens=True)]
        return texts

    def evaluate(self, split) -> dict:
        from adapterkit.vl.metrics import TASK_METRICS

        out = {}
        for t in self.cfg.data.tasks:
            data = self._eval_data(t, split)
            preds = self.predict(t, split)
            exs = {e.uid: e for e in data.examples}
            metric = TASK_METRICS.get(t, TASK_METRICS["gqa"])
            try:
                out[t] = metric(preds, exs)
            except DataError as e:
                raise DataError(f"evaluating {t}/{split}: {e}") from None
            out[t]["_predictions"] = preds
        return out

    @staticmethod
    def main_score(task_metrics: dict) -> float:
        for k in ("accuracy", "CIDEr"):
            if k in task_metrics:
                return float(task_metrics[k])
        return float(next(v for k, v in task_metrics.items() if not k.startswith("_")))

    def _validate(self):
        if self.cfg.eval.select_on != "val":
            return
        m = self.evaluate(self.cfg.data.val_split)
        avg = float(np.mean([self.main_score(v) for v in m.values()]))
        entry = {"step": self.state["step"], "epoch": self.state["epoch"], "val_avg": avg,
                 **{t: self.main_score(v) for t, v in m.items()}}
        self.state["history"].append(entry)
        if _is_main():
            print("val", json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in entry.items()}))
        if self.state["best"] is None or avg > self.state["best"]:
            self.state["best"], self.state["best_step"] = avg, self.state["step"]
            if _is_main():
                self._save_best()
        _barrier()

    def _save_best(self, name: str = "best"):
        from adapterkit.core.base import get_container
        from adapterkit.safeio import save_safetensors_atomic

        self._check_finite_weights(f"{name}/ was not written")
        best = self.out / name
        if get_container(self.model) is not None:
            adapterkit.save_adapters(self.model, best)
        # the visual embedding / full weights of full fine-tuning: everything trainable
        save_safetensors_atomic({n: p.detach() for n, p in self.named_trainable.items()}, best / "trainable.safetensors")

    def _load_best(self, name: str = "best"):
        from adapterkit.safeio import load_safetensors_checked

        f = self.out / name / "trainable.safetensors"
        if not f.exists():
            return False
        t = load_safetensors_checked(f)
        check_tensors(t, self.named_trainable, str(f))
        with torch.no_grad():
            for n, v in t.items():
                self.named_trainable[n].copy_(v.to(self.named_trainable[n].device))
        return True

    def test(self) -> dict:
        _barrier()
        used_best = self.cfg.eval.select_on == "val" and self._load_best()
        m = self.evaluate(self.cfg.data.test_split)
        preds = {t: v.pop("_predictions") for t, v in m.items()}
        rep = adapterkit.trainable_report(self.model)
        res = {
            "name": self.cfg.name,
            "preset": self.preset.get("name"),
            "config": _jsonable(self.cfg),
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


def _jsonable(cfg):
    import dataclasses

    return dataclasses.asdict(cfg)


def versions() -> dict:
    import transformers

    return {"adapterkit": adapterkit.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": torch.cuda.get_device_name() if torch.cuda.is_available()
            else platform.processor() or "cpu"}


