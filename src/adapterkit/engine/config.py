"""The engine's settings: the ``train:`` and ``eval:`` sections every domain's config shares.

Each key has a type and a range, checked before any work starts (one ConfigError naming
the key). A domain's config adds its own ``model:`` and ``data:`` sections (and may add
keys of its own to these two, e.g. the V&L token lengths).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adapterkit.core.config import bounded, choice
from adapterkit.errors import ConfigError, did_you_mean

MAX_SEED = 2**63 - 1          # torch.manual_seed takes a signed 64-bit seed
MAX_BATCH = 65536
MAX_COUNT = 10**12            # example counts, steps


@dataclass
class TrainConfig:
    epochs: int = bounded(3, lo=1, hi=100_000)             # passes over every task's training data
    max_steps: int | None = bounded(None, lo=1, hi=MAX_COUNT)  # stop after this many steps, or epochs, whichever first
    batch_size: int = bounded(16, lo=1, hi=MAX_BATCH)       # examples per step (over all processes: x world size)
    task_batch_scale: dict = field(default_factory=dict)    # {task: factor} of batch_size per task
    lr: float | None = bounded(None, lo=0.0, hi=10.0, lo_open=True)  # null: the method's / preset's (else 1e-3)
    optimizer: str = choice("adamw", "sgd", default="adamw")  # AdamW (per-task rows a step does not use are left alone) or SGD
    momentum: float = bounded(0.9, lo=0.0, hi=1.0)          # sgd only
    schedule: str = choice("linear", "cosine", "constant", default="linear")  # after the linear warm-up
    min_lr_ratio: float = bounded(0.0, lo=0.0, hi=1.0)      # cosine: the final lr as a fraction of lr
    warmup_ratio: float = bounded(0.1, lo=0.0, hi=1.0)      # fraction of the steps with a linear warm-up
    weight_decay: float = bounded(0.01, lo=0.0, hi=10.0)    # not on biases, norms, 1-d weights
    adam_eps: float = bounded(1e-6, lo=0.0, hi=1.0, lo_open=True)  # AdamW's epsilon
    grad_clip: float = bounded(1.0, lo=0.0, hi=1e6)         # max gradient norm (0: none)
    seed: int = bounded(0, lo=0, hi=MAX_SEED)               # data order, dropout, augmentation
    checkpoint_every: int = bounded(100, lo=1, hi=MAX_COUNT)  # steps between checkpoints (and at every epoch's end)
    keep_last: int = bounded(3, lo=1, hi=1000)              # checkpoints kept
    eval_every_epoch: bool = True                           # validate after every epoch (else after the last)
    log_every: int = bounded(10, lo=1, hi=MAX_COUNT)          # steps between loss updates of the progress bar (train_log.csv has every step)
    cuda_graphs: bool = False                               # CUDA-graphed steps (fixed shapes; eager on CPU)
    bf16: bool = False                                      # bf16 autocast; frozen weights stored in bf16
    fsdp: bool = False                                      # multi-process runs: FSDP2-shard the model (docs/distributed.md)

    def validate(self):
        check_batch_scale_values(self.task_batch_scale)


@dataclass
class EvalConfig:
    batch_size: int = bounded(64, lo=1, hi=MAX_BATCH)       # examples per evaluation batch (per process)
    max_new_tokens: int = bounded(16, lo=1, hi=4096)        # generation tasks
    num_beams: int = bounded(1, lo=1, hi=64)                # generation tasks
    select_on: str = choice("val", "last", default="val")   # the weights tested: best on validation, or the last


def check_batch_scale_values(scale: dict) -> None:
    """``train.task_batch_scale`` maps task names to numbers in (0, 1000]."""
    for t, s in scale.items():
        if not isinstance(t, str):
            raise ConfigError(f"train.task_batch_scale keys must be task names, got {t!r}")
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0 < s <= 1000:
            raise ConfigError(f'train.task_batch_scale["{t}"] must be a number in (0, 1000], got {s!r}')


def check_batch_scale_tasks(scale: dict, tasks) -> None:
    """``train.task_batch_scale`` names only tasks of ``data.tasks``."""
    for t in scale:
        if t not in tasks:
            raise ConfigError(f'train.task_batch_scale["{t}"]: {t!r} is not one of data.tasks {tasks}'
                              f"{did_you_mean(t, tasks)}")


def check_adapter_list(adapters: list, tasks, where: str = "adapters") -> None:
    """Each entry of a run config's adapter list is a mapping whose tasks are among
    ``data.tasks`` and that validates as an adapter config (serving ``data.tasks`` unless it
    names its own); errors name the entry (``adapters[2]``, ``adapters.text[0]``...)."""
    from adapterkit.core.config import config_from_dict

    for i, a in enumerate(adapters):
        if not isinstance(a, dict):
            raise ConfigError(f"{where}[{i}] must be a mapping, got {type(a).__name__}")
        extra = [t for t in a.get("tasks", []) if isinstance(a.get("tasks"), list) and t not in tasks]
        if extra:
            raise ConfigError(f"{where}[{i}].tasks: {extra[0]!r} is not one of data.tasks {tasks}")
        try:
            config_from_dict(dict(a, tasks=a.get("tasks", tasks)))
        except ConfigError as e:
            raise ConfigError(f"{where}[{i}]: {e}") from None
