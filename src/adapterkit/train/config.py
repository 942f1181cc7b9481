"""The training config (YAML/JSON/dict), validated before any work starts.

```yaml
model: {backbone: tiny-bart, feat_dim: 16, n_images: 2}
preset: single_adapter          # or adapters: [ {method: ...}, ... ]
data: {root: DIR, features: DIR, tasks: [vqa, gqa, nlvr, caption]}
train: {epochs: 20, batch_size: 32, seed: 0, checkpoint_every: 100}
eval: {batch_size: 64}
```

Every field has a type and a documented range (docs/guarantees.md); names (tasks, splits,
the run) are plain names, never paths; section keys that name tasks must name tasks of
``data.tasks``. The file is read with the library's safe YAML loader (duplicate keys,
deep nesting and alias bombs are refused). Each problem is one :class:`ConfigError`
naming the key, raised before any work starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from adapterkit.core.config import bounded, check_name, choice, dataclass_from_dict
from adapterkit.errors import ConfigError, did_you_mean
from adapterkit.safeio import MAX_CONFIG_NODES, MAX_DEPTH, check_nesting, loads_yaml

DEFAULT_BATCH_SCALE = {"vqa": 1.0, "gqa": 100 / 60, "nlvr": 20 / 60, "caption": 50 / 60}
MAX_SEED = 2**63 - 1          # torch.manual_seed takes a signed 64-bit seed
MAX_BATCH = 65536
MAX_TOKENS = 8192
MAX_COUNT = 10**12            # example counts, steps
MAX_CONFIG_FILE_BYTES = 10 << 20
_SPLIT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_+.\-]{0,127}")


@dataclass
class ModelConfig:
    backbone: str = "vl-bart"
    lm: str | None = None
    feat_dim: int = bounded(2048, lo=1, hi=65536)
    n_images: int = bounded(2, lo=1, hi=16)
    random_init: bool = False
    init_seed: int = bounded(0, lo=0, hi=MAX_SEED)
    dtype: str = choice("float32", "bfloat16", "float16", default="float32")


@dataclass
class DataConfig:
    root: str = ""                     # DIR/<task>/<split>.jsonl (VLExample JSON lines)
    features: str = ""                 # feature store directory
    tasks: list[str] = field(default_factory=lambda: ["vqa", "gqa", "nlvr", "caption"])
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    max_train_examples: int | None = bounded(None, lo=1, hi=MAX_COUNT)
    max_eval_examples: int | None = bounded(None, lo=1, hi=MAX_COUNT)
    generate: str | None = choice(None, "tiny_fixture", default=None)  # build this data set if root is missing
    # Official / VL-T5 files instead of root/<task>/<split>.jsonl, per task:
    #   {vqa: {format: vqa, path: DIR_OR_FILE, splits: {train: karpathy_train, val: karpathy_val, test: karpathy_test}}}
    sources: dict = field(default_factory=dict)
    # task prefixes ("vqa: " before an image task's input, "tvqa: " after a video task's): null = as
    # the reference for the preset (its single presets' image runs, every video run), or true / false
    task_prefix: bool | None = None
    # all-zero boxes for the visual tokens, as the reference feeds its CLIP grid features
    # (false: the feature store's boxes)
    zero_boxes: bool = True

    def validate(self):
        if not self.tasks:
            raise ConfigError("data.tasks must list at least one task")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"data.tasks has duplicates: {self.tasks}")
        for t in self.tasks:
            check_name(t, "data.tasks: task")
        for key in ("train_split", "val_split", "test_split"):
            v = getattr(self, key)
            if not _SPLIT.fullmatch(v):
                raise ConfigError(f"data.{key} {v!r} is not a valid split name (letters, digits, '_', '-', '.')")
        for t, src in self.sources.items():
            where = f'data.sources["{t}"]'
            if t not in self.tasks:
                raise ConfigError(f"{where}: {t!r} is not one of data.tasks {self.tasks}{did_you_mean(t, self.tasks)}")
            if not isinstance(src, dict):
                raise ConfigError(f'{where} must be a mapping with a "path", got {type(src).__name__}')
            if not isinstance(src.get("path"), str) or not src["path"]:
                raise ConfigError(f'{where} needs a "path" string')
            fmt = src.get("format", t)
            if not isinstance(fmt, str):
                raise ConfigError(f'{where}: "format" must be a string, got {fmt!r}')
            from adapterkit.vl import datasets

            if fmt not in datasets.READERS:
                raise ConfigError(f'{where}: unknown format {fmt!r}{did_you_mean(fmt, datasets.READERS)}; '
                                  f"known: {', '.join(sorted(datasets.READERS))}")
            allowed = ("format", "path", "splits") + tuple(getattr(datasets, "READER_OPTIONS", {}).get(fmt, ()))
            unknown = [k for k in src if k not in allowed]
            if unknown:
                raise ConfigError(f'{where}: unknown key "{unknown[0]}"{did_you_mean(unknown[0], allowed)}; '
                                  f"expected: {', '.join(allowed)}")
            splits = src.get("splits", {})
            if not isinstance(splits, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in splits.items()):
                raise ConfigError(f'{where}: "splits" must map split names to strings')


@dataclass
class TrainConfig:
    epochs: int = bounded(20, lo=1, hi=100_000)
    max_steps: int | None = bounded(None, lo=1, hi=MAX_COUNT)
    batch_size: int = bounded(32, lo=1, hi=MAX_BATCH)
    task_batch_scale: dict = field(default_factory=lambda: dict(DEFAULT_BATCH_SCALE))
    lr: float | None = bounded(None, lo=0.0, hi=10.0, lo_open=True)
    warmup_ratio: float = bounded(0.1, lo=0.0, hi=1.0)
    weight_decay: float = bounded(0.01, lo=0.0, hi=10.0)
    adam_eps: float = bounded(1e-6, lo=0.0, hi=1.0, lo_open=True)
    grad_clip: float = bounded(5.0, lo=0.0, hi=1e6)
    seed: int = bounded(0, lo=0, hi=MAX_SEED)
    checkpoint_every: int = bounded(100, lo=1, hi=MAX_COUNT)
    keep_last: int = bounded(3, lo=1, hi=1000)
    eval_every_epoch: bool = True
    # null: per task as the reference (input text: VQA/GQA 20 tokens, NLVR2 untruncated, captions 40,
    # video 600; target: VQA 10, GQA/NLVR2 untruncated, captions 40, video 20); a number: every task
    max_text_len: int | None = bounded(None, lo=1, hi=MAX_TOKENS)
    max_target_len: int | None = bounded(None, lo=2, hi=MAX_TOKENS)
    video: bool = False
    log_every: int = bounded(10, lo=1, hi=MAX_COUNT)
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
            if not isinstance(t, str):
                raise ConfigError(f"train.task_batch_scale keys must be task names, got {t!r}")
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0 < s <= 1000:
                raise ConfigError(f'train.task_batch_scale["{t}"] must be a number in (0, 1000], got {s!r}')


@dataclass
class EvalConfig:
    batch_size: int = bounded(64, lo=1, hi=MAX_BATCH)
    max_new_tokens: int = bounded(10, lo=1, hi=4096)
    # null: as the reference's generation max_length (40 image captions, 20 video; it counts the
    # decoder start token, so 39 / 19 new tokens)
    caption_max_new_tokens: int | None = bounded(None, lo=1, hi=4096)
    caption_beams: int = bounded(5, lo=1, hi=64)
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
        check_name(self.name, "name: the run name")
        tasks = self.data.tasks
        scale = self.train.task_batch_scale
        if scale != DEFAULT_BATCH_SCALE:  # the default names the four VL-Adapter tasks, whichever are used
            for t in scale:
                if t not in tasks:
                    raise ConfigError(f'train.task_batch_scale["{t}"]: {t!r} is not one of data.tasks {tasks}'
                                      f"{did_you_mean(t, tasks)}")
        cfgs = get_preset(self.preset)["adapters"] if self.preset is not None else self.adapters
        if self.adapters is not None and not self.adapters:
            raise ConfigError('"adapters" must list at least one adapter config')
        for i, a in enumerate(cfgs):
            if not isinstance(a, dict):
                raise ConfigError(f"adapters[{i}] must be a mapping, got {type(a).__name__}")
            extra = [t for t in a.get("tasks", []) if isinstance(a.get("tasks"), list) and t not in tasks]
            if extra:
                raise ConfigError(f"adapters[{i}].tasks: {extra[0]!r} is not one of data.tasks {tasks}")
            try:
                config_from_dict(dict(a, tasks=a.get("tasks", self.data.tasks)))
            except ConfigError as e:
                raise ConfigError(f"adapters[{i}]: {e}") from None

    def preset_dict(self) -> dict:
        from adapterkit.vl.presets import get_preset

        if self.preset is not None:
            return get_preset(self.preset)
        return {"name": "custom", "lr": 1e-3, "video_lr": 3e-4, "adapters": [dict(a) for a in self.adapters]}

    def check_paths(self, need_splits=("train",)) -> dict:
        """Missing data files: one clear error before any work starts; returns `check_data`'s examples."""
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
        return self.check_data(need_splits)

    def check_data(self, need_splits=("train",)) -> dict:
        """Every split's rows, before any work (``adapterkit.vl.datasets.validate``): unique uids,
        targets, target scores, image counts per task, image ids present in the feature store,
        the ``task`` field. Checks the ``need_splits`` and every other split whose file exists
        (data.sources: the needed splits and the test split); one DataError naming file and line.
        Returns the checked examples, ``{(task, split file name): [VLExample]}``, so a trainer need
        not read them again."""
        from adapterkit.vl.datasets.validate import read_jsonl_checked, validate_examples
        from adapterkit.vl.features import FeatureStore

        store = FeatureStore.open(self.data.features)
        split_names = {"train": self.data.train_split, "val": self.data.val_split, "test": self.data.test_split}
        checked: dict = {}
        for t in self.data.tasks:
            src = self.data.sources.get(t)
            for s, name in split_names.items():
                checks = {"task": t, "n_images": self.model.n_images, "image_ids": store,
                          "require_targets": s == "train"}
                if src is None:
                    f = Path(self.data.root) / t / f"{name}.jsonl"
                    if s in need_splits or f.exists():
                        checked[(t, name)] = read_jsonl_checked(f, **checks)
                elif s in need_splits or s == "test":
                    from adapterkit.vl.datasets import read_source

                    exs = read_source(t, src, name)
                    validate_examples(exs, f"{src['path']} (task {t!r}, split {name!r})", **checks)
                    checked[(t, name)] = exs
        return checked


def load_config(src) -> RunConfig:
    """Load and validate a run config from a YAML/JSON path or a dict."""
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        if not p.is_file():
            raise ConfigError(f"config {p} is not a file")
        try:
            if p.stat().st_size > MAX_CONFIG_FILE_BYTES:
                raise ConfigError(f"config file {p} is larger than {MAX_CONFIG_FILE_BYTES >> 20} MiB")
            raw = p.read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
        d = loads_yaml(raw, what=f"config file {p}", error=ConfigError)
    else:
        d = check_nesting(src, what="the config", error=ConfigError, max_depth=MAX_DEPTH,
                          max_nodes=MAX_CONFIG_NODES)
    return dataclass_from_dict(RunConfig, d)
