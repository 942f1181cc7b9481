"""The text run config (``domain: text``), validated before any work starts.

```yaml
domain: text
model: {name_or_path: minilm, max_length: 128}    # minilm | smollm2 | a hub id | a folder | tiny-bert ...
adapters: [{method: lora, r: 8, alpha: 16}]        # or preset: single_lora; [] = full fine-tuning
data: {root: data/text, tasks: [bbc]}              # ROOT/<task>/<split>.jsonl or .csv
train: {epochs: 3, batch_size: 16, lr: 1.0e-3}
eval: {batch_size: 64}
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from adapterkit.core.config import bounded, check_name, choice
from adapterkit.engine.config import (
    MAX_BATCH,
    MAX_COUNT,
    EvalConfig,
    TrainConfig,
    check_adapter_list,
    check_batch_scale_tasks,
)
from adapterkit.errors import ConfigError, did_you_mean

#: model names that need no hub: the offline packages, and tiny random-init models over a word vocabulary
NAMED_MODELS = ("minilm", "smollm2", "tiny-bert", "tiny-bart", "tiny-t5", "tiny-llama")


@dataclass
class TextModelConfig:
    name_or_path: str = "minilm"       # minilm | smollm2 | tiny-bert | tiny-bart | tiny-t5 | tiny-llama | hub id | folder
    # auto: an encoder (BERT-like) gets a classification head per task; an encoder-decoder or a
    # causal LM is trained text-to-text (a classification label is generated as its text)
    type: str = choice("auto", "encoder", "seq2seq", "causal", default="auto")
    pool: str = choice("cls", "mean", default="cls")  # encoder heads: the first token or the mean of the tokens
    max_length: int = bounded(128, lo=1, hi=8192)     # input tokens (longer inputs are truncated)
    max_target_length: int = bounded(32, lo=1, hi=8192)
    head_dropout: float = bounded(0.1, lo=0.0, hi=0.99)
    # with adapters: [] a frozen encoder and the new heads only (a linear probe); else full fine-tuning
    freeze_backbone: bool = False
    init_seed: int = bounded(0, lo=0, hi=2**63 - 1)   # a tiny random-init model's and the heads' initialisation


@dataclass
class TextDataConfig:
    root: str = ""                     # ROOT/<task>/<split>.jsonl (or .csv)
    tasks: list[str] = field(default_factory=list)
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    target_field: str = "target"
    max_train_examples: int | None = bounded(None, lo=1, hi=MAX_COUNT)
    max_eval_examples: int | None = bounded(None, lo=1, hi=MAX_COUNT)

    def validate(self):
        if not self.tasks:
            raise ConfigError("data.tasks must list at least one task (a folder of data.root)")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"data.tasks has duplicates: {self.tasks}")
        for t in self.tasks:
            check_name(t, "data.tasks: task")
        for key in ("train_split", "val_split", "test_split"):
            check_name(getattr(self, key), f"data.{key}")


@dataclass
class TextEvalConfig(EvalConfig):
    batch_size: int = bounded(64, lo=1, hi=MAX_BATCH)


@dataclass
class TextRunConfig:
    domain: str = "text"
    model: TextModelConfig = field(default_factory=TextModelConfig)
    preset: str | None = None
    adapters: list[dict] | None = None
    data: TextDataConfig = field(default_factory=TextDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: TextEvalConfig = field(default_factory=TextEvalConfig)
    name: str = "run"

    def validate(self):
        if self.domain != "text":
            raise ConfigError(f'a text run config has domain "text", got {self.domain!r}')
        check_name(self.name, "name: the run name")
        self.validate_adapters(self)

    @staticmethod
    def validate_adapters(cfg) -> None:
        """``preset`` xor ``adapters``; each adapter config valid, its tasks among data.tasks (any
        domain config with these keys)."""

        if cfg.preset is not None and cfg.adapters is not None:
            raise ConfigError('give either "preset" or "adapters", not both')
        if cfg.preset is None and cfg.adapters is None:
            raise ConfigError('the config needs "adapters" (a list of adapter configs; [] for full fine-tuning) '
                              'or a "preset" (e.g. single_lora)')
        check_batch_scale_tasks(cfg.train.task_batch_scale, cfg.data.tasks)
        check_adapter_list(cfg.adapter_configs(), cfg.data.tasks)

    def adapter_configs(self) -> list[dict]:
        """The adapter configs: ``adapters``, or the preset's (without its V&L-only keys)."""
        if self.adapters is not None:
            return [dict(a) if isinstance(a, dict) else a for a in self.adapters]
        from adapterkit.vl.presets import get_preset

        out = []
        for a in get_preset(self.preset)["adapters"]:
            a = dict(a)
            keep = [m for m in a.pop("trainable_modules", []) or [] if "visual" not in m]
            if keep:
                a["trainable_modules"] = keep
            out.append(a)
        return out

    def preset_lr(self) -> float | None:
        if self.preset is None:
            return None
        from adapterkit.vl.presets import get_preset

        return get_preset(self.preset).get("lr")

    def check_paths(self) -> None:
        """Missing data files: one clear error before any work starts."""
        from adapterkit.text.data import split_file

        root = Path(self.data.root)
        if not self.data.root or not root.is_dir():
            raise ConfigError(f"data.root {self.data.root!r} is not a directory (it holds <task>/<split>.jsonl)")
        needed = [self.data.train_split, self.data.test_split] + (
            [self.data.val_split] if self.eval.select_on == "val" else [])
        for t in self.data.tasks:
            if not (root / t).is_dir():
                have = sorted(p.name for p in root.iterdir() if p.is_dir())
                raise ConfigError(f"unknown task {t!r}: no folder {root / t}{did_you_mean(t, have)}; the tasks "
                                  f"under {root} are {have}")
            for s in needed:
                if split_file(root, t, s) is None:
                    raise ConfigError(f"missing dataset file {root / t / s}.jsonl (or .csv) (task {t!r}, split {s!r})")


def load_text_config(src) -> TextRunConfig:
    """Load and validate a text run config from a YAML/JSON path or a dict."""
    from adapterkit.core.config import dataclass_from_dict
    from adapterkit.safeio import MAX_CONFIG_NODES, MAX_DEPTH, check_nesting

    d = read_config_dict(src) if not isinstance(src, dict) else check_nesting(
        src, what="the config", error=ConfigError, max_depth=MAX_DEPTH, max_nodes=MAX_CONFIG_NODES)
    return dataclass_from_dict(TextRunConfig, d)


def read_config_dict(path) -> dict:
    """A config file (YAML or JSON) as a dict, read with the safe loader."""
    from adapterkit.safeio import loads_yaml

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    if not p.is_file():
        raise ConfigError(f"config {p} is not a file")
    try:
        if p.stat().st_size > 10 << 20:
            raise ConfigError(f"config file {p} is larger than 10 MiB")
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    d = loads_yaml(raw, what=f"config file {p}", error=ConfigError)
    if not isinstance(d, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return d
