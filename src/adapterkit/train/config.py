"""The training config (YAML/JSON/dict), validated before any work starts.

```yaml
model: {backbone: tiny-bart, feat_dim: 16, n_images: 2}
preset: single_adapter          # or adapters: [ {method: ...}, ... ]
data: {root: DIR, features: DIR, tasks: [vqa, gqa, nlvr, caption]}
train: {epochs: 20, batch_size: 32, seed: 0, checkpoint_every: 100}
eval: {batch_size: 64}
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from adapterkit.core.config import bounded, choice, dataclass_from_dict
from adapterkit.errors import ConfigError

DEFAULT_BATCH_SCALE = {"vqa": 1.0, "gqa": 100 / 60, "nlvr": 20 / 60, "caption": 50 / 60}


@dataclass
class ModelConfig:
    backbone: str = "vl-bart"
    lm: str | None = None
    feat_dim: int = bounded(2048, lo=1)
    n_images: int = bounded(2, lo=1, hi=16)
    random_init: bool = False
    init_seed: int = 0
    dtype: str = choice("float32", "bfloat16", "float16", default="float32")


@dataclass
class DataConfig:
    root: str = ""                     # DIR/<task>/<split>.jsonl (VLExample JSON lines)
    features: str = ""                 # feature store directory
    tasks: list[str] = field(default_factory=lambda: ["vqa", "gqa", "nlvr", "caption"])
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    max_train_examples: int | None = bounded(None, lo=1)
    max_eval_examples: int | None = bounded(None, lo=1)
    generate: str | None = choice(None, "tiny_fixture", default=None)  # build this data set if root is missing
    # Official / VL-T5 files instead of root/<task>/<split>.jsonl, per task:
    #   {vqa: {format: vqa, path: DIR_OR_FILE, splits: {train: karpathy_train, val: karpathy_val, test: karpathy_test}}}
    sources: dict = field(default_factory=dict)

    def validate(self):
        if not self.tasks:
            raise ConfigError("data.tasks must list at least one task")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"data.tasks has duplicates: {self.tasks}")


@dataclass
class TrainConfig:
    epochs: int = bounded(20, lo=1)
    max_steps: int | None = bounded(None, lo=1)
    batch_size: int = bounded(32, lo=1)
    task_batch_scale: dict = field(default_factory=lambda: dict(DEFAULT_BATCH_SCALE))
    lr: float | None = bounded(None, lo=0.0, lo_open=True)
    warmup_ratio: float = bounded(0.1, lo=0.0, hi=1.0)
    weight_decay: float = bounded(0.01, lo=0.0)
    adam_eps: float = bounded(1e-6, lo=0.0, lo_open=True)
    grad_clip: float = bounded(5.0, lo=0.0)
    seed: int = 0
    checkpoint_every: int = bounded(100, lo=1)
    keep_last: int = bounded(3, lo=1)
    eval_every_epoch: bool = True
    max_text_len: int = bounded(40, lo=1)
    max_target_len: int = bounded(20, lo=2)
    video: bool = False
    log_every: int = bounded(10, lo=1)
    # replay each training step as a CUDA graph (adapterkit.GraphedStep): batches are padded to
    # max_text_len / max_target_len; one graph per (task, batch size); eager on CPU or multi-process runs.
    # A resumed graphed run continues from the same weights and optimizer state, but its dropout
    # masks are not bit-identical to an uninterrupted run (graph replays draw from CUDA's RNG their own way)
    cuda_graphs: bool = False
    # bf16 autocast for training and evaluation; frozen weights are stored in bf16
    # (adapterkit.cast_frozen), trainable weights and optimizer state stay fp32
    bf16: bool = False

    def validate(self):
        for t, s in self.task_batch_scale.items():
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not s > 0:
                raise ConfigError(f'train.task_batch_scale["{t}"] must be a positive number, got {s!r}')


@dataclass
class EvalConfig:
    batch_size: int = bounded(64, lo=1)
    max_new_tokens: int = bounded(10, lo=1)
    caption_max_new_tokens: int = bounded(25, lo=1)
    caption_beams: int = bounded(5, lo=1)
    select_on: str = choice("val", "last", default="val")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    preset: str | None = None
    adapters: list[dict] | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = "run"

    def validate(self):
        from adapterkit.core.config import config_from_dict
        from adapterkit.vl.presets import get_preset

        if self.preset is not None and self.adapters is not None:
            raise ConfigError('give either "preset" or "adapters", not both')
        if self.preset is None and self.adapters is None:
            raise ConfigError('the config needs a "preset" (e.g. single_adapter) or an "adapters" list')
        cfgs = get_preset(self.preset)["adapters"] if self.preset is not None else self.adapters
        for i, a in enumerate(cfgs):
            if not isinstance(a, dict):
                raise ConfigError(f"adapters[{i}] must be a mapping, got {type(a).__name__}")
            try:
                config_from_dict(dict(a, tasks=a.get("tasks", self.data.tasks)))
            except ConfigError as e:
                raise ConfigError(f"adapters[{i}]: {e}") from None

    def preset_dict(self) -> dict:
        from adapterkit.vl.presets import get_preset

        if self.preset is not None:
            return get_preset(self.preset)
        return {"name": "custom", "lr": 1e-3, "video_lr": 3e-4, "adapters": [dict(a) for a in self.adapters]}

    def check_paths(self, need_splits=("train",)) -> None:
        """Missing data files: one clear error before any work starts."""
        root = Path(self.data.root)
        if not root.is_dir() and not all(t in self.data.sources for t in self.data.tasks):
            raise ConfigError(f"data.root {str(root)!r} is not a directory")
        if not Path(self.data.features).is_dir():
            raise ConfigError(f"data.features {self.data.features!r} is not a directory (run adapterkit extract-features)")
        split_names = {"train": self.data.train_split, "val": self.data.val_split, "test": self.data.test_split}
        for t in self.data.tasks:
            src = self.data.sources.get(t)
            if src is not None:
                if not isinstance(src, dict) or "path" not in src:
                    raise ConfigError(f'data.sources["{t}"] needs a "path" (and optionally "format", "splits")')
                if not Path(src["path"]).exists():
                    raise ConfigError(f"missing dataset file {src['path']} (data.sources for task {t!r})")
                continue
            for s in need_splits:
                f = root / t / f"{split_names[s]}.jsonl"
                if not f.exists():
                    raise ConfigError(f"missing dataset file {f} (task {t!r}, split {split_names[s]!r})")


def load_config(src) -> RunConfig:
    """Load and validate a run config from a YAML/JSON path or a dict."""
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        try:
            d = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML/JSON: {e}") from None
    else:
        d = src
    return dataclass_from_dict(RunConfig, d)
