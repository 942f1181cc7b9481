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
import typing
from dataclasses import dataclass, field
from pathlib import Path

from adapterkit.core.config import _NAME, bounded, check_name, choice, dataclass_from_dict, option
from adapterkit.engine.config import check_adapter_list, check_batch_scale_tasks, check_batch_scale_values
from adapterkit.errors import ConfigError, did_you_mean
from adapterkit.safeio import MAX_CONFIG_NODES, MAX_DEPTH, check_nesting, loads_yaml

DEFAULT_BATCH_SCALE = {"vqa": 1.0, "gqa": 100 / 60, "nlvr": 20 / 60, "caption": 50 / 60}
MAX_SEED = 2**63 - 1          # torch.manual_seed takes a signed 64-bit seed
MAX_BATCH = 65536
MAX_TOKENS = 8192
MAX_COUNT = 10**12            # example counts, steps
MAX_CONFIG_FILE_BYTES = 10 << 20
_SPLIT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_+.\-]{0,127}")
_NAME_PATTERN = "^" + _NAME.pattern + "$"  # check_name's names, for the JSON schema


@dataclass
class ModelConfig:
    backbone: str = option("vl-bart", help="vl-bart (facebook/bart-base), vl-t5 (t5-base), smollm2 (SmolLM2-135M, "
                                           "offline GGUF), tiny-bart / tiny-t5 / tiny-llama (random-init tiny "
                                           "models for tests and smoke runs), or a hub id / local path")
    lm: str | None = option(None, help="hub id or local path of the language model (null: the backbone's)")
    feat_dim: int = bounded(2048, lo=1, hi=65536, help="width of the visual features (the feature store's dim)")
    n_images: int = bounded(2, lo=1, hi=16, help="most images one example may have (NLVR2 pairs need 2)")
    random_init: bool = option(False, help="build the backbone from its config with random weights (no download)")
    init_seed: int = bounded(0, lo=0, hi=MAX_SEED, help="seed of the random initial weights of tiny-* backbones")
    dtype: str = choice("float32", "bfloat16", "float16", default="float32", help="dtype of the model weights")


@dataclass
class DataConfig:
    root: str = option("", help="data directory: ROOT/<task>/<split>.jsonl, one VLExample JSON object a line")
    features: str = option("", help="feature store directory (adapterkit extract-features --out DIR)")
    tasks: list[str] = option(factory=lambda: ["vqa", "gqa", "nlvr", "caption"],
                              help="the tasks trained and evaluated: built-in ones (vqa, gqa, nlvr, caption, "
                                   "tvqa, how2qa, tvc, yc2c) or custom ones with ROOT/<task>/ files")
    train_split: str = option("train", help="file name (without .jsonl) of the training split")
    val_split: str = option("val", help="file name of the validation split")
    test_split: str = option("test", help="file name of the test split")
    max_train_examples: int | None = bounded(None, lo=1, hi=MAX_COUNT,
                                             help="use only the first N training examples of each task")
    max_eval_examples: int | None = bounded(None, lo=1, hi=MAX_COUNT,
                                            help="evaluate only the first N examples of each task and split")
    generate: str | None = choice(None, "tiny_fixture", default=None,
                                  help="tiny_fixture: the CLI builds the tiny V&L test data set at root "
                                       "(and its features) if root is missing")
    sources: dict = option(factory=dict,
                           help="official / VL-T5 files instead of ROOT/<task>/<split>.jsonl, per task: "
                                "{vqa: {format: vqa, path: DIR_OR_FILE, splits: {train: karpathy_train, "
                                "val: karpathy_val, test: karpathy_test}}}")
    task_prefix: bool | None = option(None, help='task prefixes ("vqa: " before an image task\'s input, '
                                                 '"tvqa: " after a video task\'s); null: as the reference '
                                                 "for the preset (its single presets' image runs, every video "
                                                 "run)")
    zero_boxes: bool = option(True, help="all-zero boxes for the visual tokens, as the reference feeds its CLIP "
                                         "grid features (false: the feature store's boxes)")

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
    epochs: int = bounded(20, lo=1, hi=100_000, help="passes over the training data")
    max_steps: int | None = bounded(None, lo=1, hi=MAX_COUNT,
                                    help="stop after this many optimizer steps (null: epochs decide)")
    batch_size: int = bounded(32, lo=1, hi=MAX_BATCH, help="examples per step (times task_batch_scale per task)")
    task_batch_scale: dict = option(factory=lambda: dict(DEFAULT_BATCH_SCALE),
                                    help="{task: factor}: a task's batch is batch_size x factor (default: "
                                         "VL-Adapter's VQA 1, GQA 100/60, NLVR2 20/60, captions 50/60)")
    lr: float | None = bounded(None, lo=0.0, hi=10.0, lo_open=True,
                               help="learning rate (null: the preset's lr, or video_lr with train.video)")
    warmup_ratio: float = bounded(0.1, lo=0.0, hi=1.0, help="fraction of the steps with a linear warm-up")
    weight_decay: float = bounded(0.01, lo=0.0, hi=10.0, help="AdamW weight decay")
    adam_eps: float = bounded(1e-6, lo=0.0, hi=1.0, lo_open=True, help="AdamW epsilon")
    grad_clip: float = bounded(5.0, lo=0.0, hi=1e6, help="max gradient norm")
    seed: int = bounded(0, lo=0, hi=MAX_SEED, help="seed of the data order and dropout")
    checkpoint_every: int = bounded(100, lo=1, hi=MAX_COUNT, help="steps between checkpoints")
    keep_last: int = bounded(3, lo=1, hi=1000, help="checkpoints kept")
    eval_every_epoch: bool = option(True, help="validate after every epoch (false: after the last)")
    max_text_len: int | None = bounded(None, lo=1, hi=MAX_TOKENS,
                                       help="input tokens kept (null: per task as the reference: VQA/GQA 20, "
                                            "NLVR2 untruncated, captions 40, video 600)")
    max_target_len: int | None = bounded(None, lo=2, hi=MAX_TOKENS,
                                         help="target tokens kept (null: per task as the reference: VQA 10, "
                                              "GQA/NLVR2 untruncated, captions 40, video 20)")
    video: bool = option(False, help="the video setting (the preset's video_lr, video task prefixes)")
    log_every: int = bounded(10, lo=1, hi=MAX_COUNT, help="steps between log lines")
    cuda_graphs: bool = option(False, help="replay each training step as a CUDA graph (adapterkit.GraphedStep): "
                                           "batches padded to max_text_len / max_target_len, one graph per "
                                           "(task, batch size); eager on CPU or multi-process runs; a resumed "
                                           "graphed run's dropout masks are not bit-identical to an "
                                           "uninterrupted run's")
    bf16: bool = option(False, help="bf16 autocast for training and evaluation; frozen weights stored in bf16, "
                                    "trainable weights and optimizer state fp32")
    fsdp: bool = option(False, help="multi-process runs: FSDP2-shard the model (the frozen weights and the "
                                   "adapters; docs/distributed.md)")

    def validate(self):
        check_batch_scale_values(self.task_batch_scale)


@dataclass
class EvalConfig:
    batch_size: int = bounded(64, lo=1, hi=MAX_BATCH, help="examples per evaluation batch")
    max_new_tokens: int = bounded(10, lo=1, hi=4096, help="tokens generated for an answer (non-caption tasks)")
    caption_max_new_tokens: int | None = bounded(None, lo=1, hi=4096,
                                                 help="tokens generated for a caption (null: as the reference's "
                                                      "max_length, 39 image / 19 video)")
    caption_beams: int = bounded(5, lo=1, hi=64, help="beam width of caption generation")
    select_on: str = choice("val", "last", default="val",
                            help="the weights tested: the best on validation, or the last")


@dataclass
class RunConfig:
    domain: str = choice("vl", default="vl", help="the domain (adapterkit train dispatches on it; vl is the default)")
    model: ModelConfig = field(default_factory=ModelConfig)
    preset: str | None = option(None, help="a VL-Adapter preset (its adapters, lr and video_lr); "
                                           "give either preset or adapters")
    adapters: list[dict] | None = option(None, help="adapter configs, each {method: NAME, ...its keys} (the "
                                                    "adapter config keys); each serves data.tasks unless "
                                                    "it names tasks")
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = option("run", help="the run's name (a plain name, not a path)")

    def validate(self):
        from adapterkit.vl.presets import get_preset

        if self.preset is not None and self.adapters is not None:
            raise ConfigError('give either "preset" or "adapters", not both')
        if self.preset is None and self.adapters is None:
            raise ConfigError('the config needs a "preset" (e.g. single_adapter) or an "adapters" list')
        check_name(self.name, "name: the run name")
        tasks = self.data.tasks
        if self.train.task_batch_scale != DEFAULT_BATCH_SCALE:  # the default names the four VL-Adapter tasks
            check_batch_scale_tasks(self.train.task_batch_scale, tasks)
        cfgs = get_preset(self.preset)["adapters"] if self.preset is not None else self.adapters
        if self.adapters is not None and not self.adapters:
            raise ConfigError('"adapters" must list at least one adapter config')
        check_adapter_list(cfgs, tasks)

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
            problem = self.task_data_problem(t)
            if problem:
                raise ConfigError(problem)
            for s in need_splits:
                f = root / t / f"{split_names[s]}.jsonl"
                if not f.exists():
                    raise ConfigError(f"missing dataset file {f} (task {t!r}, split {split_names[s]!r})")
        return self.check_data(need_splits)

    def task_data_problem(self, task: str) -> str | None:
        """Why ``task`` has no data, or None: a task with neither a data.sources entry nor a
        directory ROOT/<task> is an unknown name (a typo, or a custom task whose files are
        elsewhere), or a built-in task whose data is missing (``adapterkit train --dry-run``
        lists this too)."""
        from adapterkit.vl.datasets import READERS

        root = Path(self.data.root)
        if task in self.data.sources or (root / task).is_dir():
            return None
        where = f"no directory {root / task} and no data.sources entry"
        if task in READERS:
            return (f"no data for task {task!r}: {where} (write {root / task / self.data.train_split}.jsonl, "
                    f'or name the official files in data.sources["{task}"])')
        dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and any(d.glob("*.jsonl"))) \
            if root.is_dir() else []
        return (f"unknown task {task!r}: {where}; known built-in tasks: {', '.join(READERS)}"
                + (f"; task directories in {root}: {', '.join(dirs[:20])}" if dirs else "")
                + did_you_mean(task, [*READERS, *dirs]))

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


# ----------------------------------------------------------------------------- documentation

#: the meaning of each VLExample field (a JSON-lines row); tests check every field is covered
EXAMPLE_FIELDS = {
    "uid": "unique id of the example within its split (scores are keyed by it)",
    "task": "the task name; must equal the split's task (the directory name)",
    "image_ids": "keys into the feature store: one image (two for nlvr; the video id for video tasks)",
    "text": "the question / statement / prompt, without a task prefix",
    "targets": "every acceptable target string (VQA: the raw answers; GQA: [answer]; nlvr: "
               '["true"] or ["false"]; captions: all reference captions); may be [] outside training splits',
    "target_scores": "optional {answer: score in [0, 1]} (VQA soft scores)",
    "choices": "optional answer candidates (multiple-choice video QA)",
    "label": "optional index of the correct choice",
    "extra": "optional free-form metadata, carried through",
}


def describe_config() -> list:
    """Every key of the run config, as :class:`adapterkit.core.config.KeyDoc` rows (``key`` dotted:
    ``model.backbone``, ``train.lr``...), read from the dataclasses so the docs cannot drift."""
    from dataclasses import replace

    from adapterkit.core.config import describe_dataclass
    from adapterkit.vl.datasets import READERS
    from adapterkit.vl.presets import list_presets

    rows = describe_dataclass(RunConfig)
    filled = {"preset": ", ".join(list_presets()),
              "data.tasks": "names; built-in: " + ", ".join(READERS)}
    return [replace(r, allowed=filled[r.key]) if r.key in filled else r for r in rows]


def data_layout_text(width: int = 100, markdown: bool = True) -> str:
    """The V&L data layout (``data.root``, ``data.sources``, ``data.features``), wrapped to
    ``width``: Markdown for docs/config.md, plain text (``markdown=False``) for ``--help``."""
    import dataclasses as dc
    import textwrap

    from adapterkit.core.config import _type_name
    from adapterkit.vl.datasets import READER_OPTIONS, READERS
    from adapterkit.vl.datasets.base import VLExample
    from adapterkit.vl.datasets.validate import IMAGES_PER_TASK

    missing = [f.name for f in dc.fields(VLExample) if f.name not in EXAMPLE_FIELDS]
    if missing:  # a new VLExample field must be documented here
        raise RuntimeError(f"EXAMPLE_FIELDS does not document {missing}")
    hints = typing.get_type_hints(VLExample)
    builtin = ", ".join(READERS)
    items: list[tuple[int, str]] = [  # (level, paragraph): 0 a bullet, 1 a sub-bullet, 2 text under a bullet
        (0, "`ROOT/<task>/<split>.jsonl` for each task of `data.tasks` and each split (`data.train_split`, "
            "`data.val_split`, `data.test_split`: `train.jsonl`, `val.jsonl`, `test.jsonl` by default). "
            "Training needs the train split (and the val split with `eval.select_on: val`); the test split "
            "is scored at the end. One JSON object a line, with the fields of "
            "`adapterkit.vl.datasets.VLExample`:"),
    ]
    for f in dc.fields(VLExample):
        required = f.default is dc.MISSING and f.default_factory is dc.MISSING
        items.append((1, f"`{f.name}` ({_type_name(hints[f.name])}{', required' if required else ''}): "
                         f"{EXAMPLE_FIELDS[f.name]}"))
    items += [
        (2, 'Example: `{"uid": "q1", "task": "vqa", "image_ids": ["img0001"], "text": "what colour is the '
            'cup?", "targets": ["red"]}`. Images per example: '
            + ", ".join(f"{t} {n}" for t, n in IMAGES_PER_TASK.items())
            + "; a custom task 1 .. `model.n_images`. Every row is checked before training (unique uids, "
              "targets, scores, image counts, image ids present in the feature store); an error names the "
              "file and line."),
        (0, "A custom task is any plain name with a directory `ROOT/<task>/`: its answers are generated "
            "(`eval.max_new_tokens`) and scored by exact-match accuracy, as gqa's. Built-in tasks: "
            f"{builtin}."),
        (0, "`data.sources.<task>`: read official / VL-T5 files instead: `{format: FORMAT, path: DIR_OR_FILE, "
            f"splits: {{train: NAME, val: NAME, test: NAME}}}}`. Formats: {builtin}; their extra options: "
            + "; ".join(f"{k}: {', '.join(v)}" for k, v in READER_OPTIONS.items()) + "."),
        (0, "`data.features`: a feature store directory (`adapterkit extract-features --images DIR --out "
            "FEATURES`, or `adapterkit import-features`): `features.npy` (N, K, D) float16, `boxes.npy` "
            "(N, K, 4) float32 normalised x1, y1, x2, y2, `index.json` {ids, num_boxes, dim, dtype, backend, "
            "complete, version}. D must equal `model.feat_dim` and every image id of the data must be in ids."),
    ]
    lines = []
    for level, text in items:
        if not markdown:
            text = text.replace("`", "")
        first, rest = {0: ("- ", "  "), 1: ("  - ", "    "), 2: ("  ", "  ")}[level]
        if level == 2 and markdown:
            lines.append("")
        lines += textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest,
                               break_on_hyphens=False, break_long_words=False)
        if level == 2 and markdown:
            lines.append("")
    return "\n".join(lines)


def config_help_text(width: int = 100) -> str:
    """The run config's keys (default, allowed values, meaning), the adapter config keys and the
    data layout, for ``adapterkit train --help``'s epilog (use
    ``argparse.RawDescriptionHelpFormatter`` to keep the layout)."""
    import textwrap

    from adapterkit.core.config import describe_shared_keys, registered_methods

    def block(rows, indent="  "):
        out = []
        for r in rows:
            head = f"{r.key} ({r.type}; default {r.default}" + (f"; {r.allowed})" if r.allowed else ")")
            out += textwrap.wrap(head, width, initial_indent=indent, subsequent_indent=indent + "      ",
                                 break_on_hyphens=False)
            if r.meaning:
                out += textwrap.wrap(r.meaning, width, initial_indent=indent + "    ",
                                     subsequent_indent=indent + "    ")
        return out

    lines = ["run config keys (YAML or JSON; docs/config.md has them all with the adapter keys per method,",
             "docs/config.schema.json is a JSON schema for editors):", ""]
    lines += block(describe_config())
    lines += ["", "adapter config keys every method has (adapters: [{method: ..., ...}]):", ""]
    lines += block(r for r in describe_shared_keys() if r.key != "method")
    lines += [""] + textwrap.wrap("methods: " + ", ".join(registered_methods())
                                  + " (each method's own keys: docs/config.md)", width) + [""]
    lines += ["V&L data layout:", "", data_layout_text(width, markdown=False)]
    return "\n".join(lines)


def json_schema() -> dict:
    """A JSON schema of the run config (for editors: YAML language servers read it too): every
    key with its type, default, allowed values and meaning; adapter configs per method."""
    from adapterkit.core.config import adapter_config_schema, dataclass_schema
    from adapterkit.vl.datasets import READER_OPTIONS, READERS
    from adapterkit.vl.presets import list_presets

    schema = dataclass_schema(RunConfig)
    props = schema["properties"]
    props["preset"]["enum"] = [*list_presets(), None]
    props["preset"].pop("type", None)
    props["adapters"] = {"type": ["array", "null"], "minItems": 1, "items": adapter_config_schema(),
                         "default": None, "description": props["adapters"].get("description", "")}
    options = sorted({o for opts in READER_OPTIONS.values() for o in opts})
    source = {"type": "object", "required": ["path"], "additionalProperties": False,
              "properties": {"format": {"enum": list(READERS), "description": "the reader (default: the task name)"},
                             "path": {"type": "string", "minLength": 1, "description": "a file or directory"},
                             "splits": {"type": "object", "additionalProperties": {"type": "string"},
                                        "description": "{split: file name} (train/val/test)"},
                             **{o: {"type": "string", "description": "reader option of "
                                    + ", ".join(t for t, v in READER_OPTIONS.items() if o in v)} for o in options}}}
    data = props["data"]["properties"]
    data["sources"].update({"additionalProperties": source})
    name_pattern = _NAME_PATTERN
    data["tasks"].update({"items": {"type": "string", "pattern": name_pattern}, "minItems": 1, "uniqueItems": True})
    for key in ("train_split", "val_split", "test_split"):
        data[key]["pattern"] = "^" + _SPLIT.pattern + "$"
    props["name"]["pattern"] = name_pattern
    props["train"]["properties"]["task_batch_scale"].update(
        {"additionalProperties": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000}})
    # draft-07 keywords only (if/then, const, numeric exclusiveMinimum): what editors' JSON and
    # YAML language servers support best
    return {"$schema": "http://json-schema.org/draft-07/schema#",
            "title": "adapterkit V&L run config (adapterkit train CONFIG)", **schema}
