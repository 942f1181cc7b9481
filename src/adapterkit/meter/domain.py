"""METER on the training engine (``domain: meter``): VQA, NLVR2 and image-text matching.

The model is :class:`adapterkit.meter.model.MeterModel` over two HF encoders
(:mod:`adapterkit.meter.encoders`). Adapters go into each encoder with
:func:`adapterkit.add_adapters` (``adapters.text`` / ``adapters.image``; each config serves
every task unless it names ``tasks``, routed by the batch's task); an encoder without adapters
is fully fine-tuned, or frozen with ``model.freeze_text`` / ``freeze_image``. The projections,
the co-attention layers, the poolers and the heads are always trained, each part at its own
learning rate (``train.lr`` x ``lr_mult_cross_modal`` / ``lr_mult_head`` /
``lr_mult_adapters``; the encoders at ``train.lr``).

Data: ``ROOT/images.npy`` (N, H, W) or (N, H, W, C) uint8, ``ROOT/images_index.json``
({image id: row}) and ``ROOT/<task>/<split>.jsonl`` (``VLExample`` lines: ``uid``,
``image_ids``, ``text``, ``targets``, optional ``target_scores`` and ``label``); a FashionVL
folder (``adapterkit fashionvl build``) is one. Per head type:

- ``vqa``: the answer vocabulary is the training answers (the most frequent
  ``model.max_answers``); soft targets from ``target_scores`` (else 1.0 for a single target, and VQA v2's
  0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / 4+ annotators among several ``targets``), BCE x answers; the score is the VQA soft
  accuracy of the argmax answer (``accuracy``).
- ``nlvr2``: two ``image_ids`` and a ``label`` (1 true, 0 false); cross-entropy; ``accuracy``.
- ``itm``: an image with its ``text`` (or, when the text is empty, one of its ``targets``, e.g.
  reference captions); half the pairs are negatives, the image swapped for another example's.
  Training draws pairs and negatives from each batch's seed; evaluation draws them once per
  split from a fixed seed (the same pairs for every run); ``accuracy`` of match / no match.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import adapterkit
from adapterkit.engine.domain import Domain, stable_seed
from adapterkit.errors import DataError
from adapterkit.meter.config import ENCODERS, MeterRunConfig
from adapterkit.meter.encoders import IMAGENET, load_image_encoder, load_text_encoder, preprocess
from adapterkit.meter.model import MeterModel, vqa_loss, vqa_soft_score

_EVAL_PAIR_SEED = 20220601


class MeterImages:
    """The image store: images.npy (memory-mapped) and images_index.json."""

    def __init__(self, root: Path):
        try:
            self.array = np.load(root / "images.npy", mmap_mode="r")
            self.index = json.loads((root / "images_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"images in {root} are missing or corrupt ({e})") from None
        if self.array.dtype != np.uint8 or self.array.ndim not in (3, 4):
            raise DataError(f"{root / 'images.npy'} must be uint8 (N, H, W) or (N, H, W, C), got "
                            f"{self.array.dtype} {self.array.shape}")
        if not isinstance(self.index, dict) or any(not isinstance(r, int) or not 0 <= r < len(self.array)
                                                   for r in self.index.values()):
            raise DataError(f"{root / 'images_index.json'} must map image ids to rows of images.npy "
                            f"(0..{len(self.array) - 1})")

    def rows(self, ids: list[str], where: str) -> np.ndarray:
        missing = [i for i in ids if i not in self.index]
        if missing:
            raise DataError(f"{where}: image {missing[0]!r} is not in images_index.json")
        return np.fromiter((self.index[i] for i in ids), dtype=np.int64, count=len(ids))

    def batch(self, ids: list[str], where: str) -> torch.Tensor:
        rows = self.rows(ids, where)
        order = np.argsort(rows, kind="stable")  # a sorted read of the memory map, then the batch order
        out = np.empty((len(rows),) + self.array.shape[1:], dtype=np.uint8)
        out[order] = self.array[rows[order]]
        return torch.from_numpy(out)


def _soft_scores(ex) -> dict[str, float]:
    """An example's answer scores: ``target_scores``; else one target scores 1.0 (a single gold
    answer, GQA-style) and several are annotators' answers (VQA v2's 0.3 / 0.6 / 0.9 / 1.0)."""
    if ex.target_scores:
        return dict(ex.target_scores)
    if len(ex.targets) == 1:
        return {ex.targets[0]: 1.0}
    return {a: vqa_soft_score(c) for a, c in Counter(ex.targets).items()}


class MeterDomain(Domain):
    """METER tasks (``data.tasks``: {task: vqa | nlvr2 | itm}) on one two-encoder model."""

    name = "meter"

    def __init__(self, cfg: MeterRunConfig):
        from adapterkit.vl.datasets.base import read_examples_jsonl

        self.cfg = cfg
        d, m = cfg.data, cfg.model
        self.root = Path(d.root)
        self.kinds = dict(d.tasks)
        self.tasks = list(self.kinds)
        self.images = MeterImages(self.root)
        self._read = read_examples_jsonl
        self.data: dict[tuple[str, str], list] = {}
        for t in self.tasks:
            self._check_task(t, self.examples(t, d.train_split), d.train_split)
        self.answers = {t: self._vocab(t) for t in self.tasks if self.kinds[t] == "vqa"}
        self.answer_ids = {t: {a: i for i, a in enumerate(v)} for t, v in self.answers.items()}
        corpus = [x for t in self.tasks for e in self.examples(t, d.train_split) for x in [e.text, *e.targets] if x]
        text_encoder, self.tok = load_text_encoder(m.text_encoder, corpus, m.init_seed, m.tiny_width)
        if m.text_encoder == "tiny-bert":  # a first token to pool, as BERT's [CLS]
            from tokenizers import processors

            self.tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
                single="<s> $A </s>", special_tokens=[("<s>", self.tok.bos_token_id), ("</s>", self.tok.eos_token_id)])
        image_encoder = load_image_encoder(m.image_encoder, m.image_size, m.init_seed + 1, m.tiny_width)
        mean, std = IMAGENET
        self.mean = tuple(m.image_mean) if m.image_mean else mean
        self.std = tuple(m.image_std) if m.image_std else std
        encoders = {"text": text_encoder, "image": image_encoder}
        self.routed = {}
        for enc, module in encoders.items():
            for a in cfg.adapter_configs(enc):
                a = dict(a)
                a.setdefault("tasks", list(self.tasks))
                adapterkit.add_adapters(module, a, name=a.pop("name", None))
            if getattr(m, f"freeze_{enc}"):
                module.requires_grad_(False)
            self.routed[enc] = adapterkit.core.base.get_container(module) is not None
        heads = {t: (k, len(self.answers[t]) if k == "vqa" else 2) for t, k in self.kinds.items()}
        torch.manual_seed(m.init_seed)
        self.model = MeterModel(text_encoder, image_encoder, heads, hidden=m.hidden_size,
                                num_layers=m.num_fusion_layers, num_heads=m.num_heads, ffn=m.ffn_size,
                                dropout=m.dropout, image_pool=m.image_pool)
        self._eval_pairs: dict[tuple[str, str], tuple] = {}

    # --- data ---------------------------------------------------------------------------------
    def examples(self, task: str, split: str) -> list:
        key = (task, split)
        if key not in self.data:
            d = self.cfg.data
            f = self.root / task / f"{split}.jsonl"
            if not f.is_file():
                raise DataError(f"missing dataset file {f}")
            exs = self._read(f)
            limit = d.max_train_examples if split == d.train_split else d.max_eval_examples
            self.data[key] = exs[:limit] if limit else exs
        return self.data[key]

    def _check_task(self, task, exs, split):
        kind, where = self.kinds[task], f"{self.root / task / split}.jsonl"
        need = 2 if kind == "nlvr2" else 1
        bad = next((e for e in exs if len(e.image_ids) != need), None)
        if bad is not None:
            raise DataError(f"{where}: example {bad.uid!r} has {len(bad.image_ids)} images; a {kind} task takes "
                            f"{need}")
        if kind == "nlvr2":
            bad = next((e for e in exs if e.label not in (0, 1)), None)
            if bad is not None:
                raise DataError(f"{where}: nlvr2 example {bad.uid!r} needs a label 0 or 1, got {bad.label!r}")
        if kind == "itm":
            bad = next((e for e in exs if not e.text and not e.targets), None)
            if bad is not None:
                raise DataError(f"{where}: itm example {bad.uid!r} has neither a text nor targets (captions)")
            if len(exs) < 2:
                raise DataError(f"{where}: an itm task needs two examples or more (negatives swap in another's image)")

    def _vocab(self, task) -> list[str]:
        exs = self.examples(task, self.cfg.data.train_split)
        counts = Counter(a for e in exs for a in _soft_scores(e))
        ranked = sorted(counts, key=lambda a: (-counts[a], a))
        if self.cfg.model.max_answers:
            ranked = ranked[: self.cfg.model.max_answers]
        if len(ranked) < 2:
            raise DataError(f"task {task!r}: the training split has {len(ranked)} distinct answer(s); a vqa head "
                            "needs two or more")
        return ranked

    def split(self, which):
        d = self.cfg.data
        return {"train": d.train_split, "val": d.val_split, "test": d.test_split}[which]

    def num_train(self, task):
        return len(self.examples(task, self.cfg.data.train_split))

    def _text(self, texts: list[str]) -> dict:
        enc = self.tok(texts, truncation=True, max_length=self.cfg.model.max_text_length, padding=True,
                       return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def _pixels(self, ids: list[str], where: str) -> torch.Tensor:
        return preprocess(self.images.batch(ids, where), self.cfg.model.image_size, self.mean, self.std)

    def _itm_pairs(self, task, split, rows: np.ndarray, rng: np.random.Generator):
        """(texts, image ids, labels) of ITM pairs for ``rows``: half positives, half negatives
        whose image is another example's."""
        exs = self.examples(task, split)
        n = len(rows)
        labels = rng.permutation(np.arange(n) % 2 == 0).astype(np.int64)  # 1 = match
        shift = rng.integers(1, len(exs), size=n)
        other = (rows + shift) % len(exs)  # never the row itself
        pick = rng.random(n)
        texts = [e.text or e.targets[int(p * len(e.targets))] for e, p in zip((exs[r] for r in rows), pick)]
        ids = [exs[r if y else o].image_ids[0] for r, o, y in zip(rows, other, labels)]
        return texts, ids, labels

    def _eval_itm(self, task, split):
        key = (task, split)
        if key not in self._eval_pairs:
            rows = np.arange(len(self.examples(task, split)))
            self._eval_pairs[key] = self._itm_pairs(task, split, rows,
                                                    np.random.default_rng(stable_seed(_EVAL_PAIR_SEED, task, split)))
        return self._eval_pairs[key]

    def _batch(self, task, split, rows, itm=None) -> dict:
        exs = self.examples(task, split)
        kind, where = self.kinds[task], f"{task}/{split}"
        rows = np.asarray(rows, dtype=np.int64)
        if kind == "itm":
            texts, ids, labels = itm
            b = self._text(texts)
            b["pixel_values"] = self._pixels(ids, where)
            b["labels"] = torch.from_numpy(labels)
            return b
        chosen = [exs[r] for r in rows]
        b = self._text([e.text for e in chosen])
        if kind == "nlvr2":
            px = self._pixels([i for e in chosen for i in e.image_ids], where)
            b["pixel_values"] = px.view(len(chosen), 2, *px.shape[1:])
            b["labels"] = torch.tensor([e.label for e in chosen], dtype=torch.long)
        else:
            b["pixel_values"] = self._pixels([e.image_ids[0] for e in chosen], where)
            if split == self.cfg.data.train_split:
                ids = self.answer_ids[task]
                target = torch.zeros(len(chosen), len(ids))
                hits = [(i, ids[a], s) for i, e in enumerate(chosen) for a, s in _soft_scores(e).items() if a in ids]
                if hits:
                    r, c, v = zip(*hits)
                    target[list(r), list(c)] = torch.tensor(v, dtype=torch.float32)
                b["soft_targets"] = target
        return b

    def train_batch(self, task, rows, seed, rank, world):
        rows = np.asarray(rows, dtype=np.int64)[rank::world]
        split = self.cfg.data.train_split
        itm = self._itm_pairs(task, split, rows, np.random.default_rng(seed)) if self.kinds[task] == "itm" else None
        return self._batch(task, split, rows, itm)

    def _route(self, task):
        on = any(self.routed.values())
        return adapterkit.route(task) if on else contextlib.nullcontext()

    def loss(self, batch, task_index):
        task = self.tasks[task_index]
        batch = dict(batch)
        labels = batch.pop("labels", None)
        soft = batch.pop("soft_targets", None)
        with self._route(task):
            logits = self.model(task, **batch)
        if self.kinds[task] == "vqa":
            return vqa_loss(logits, soft)
        return F.cross_entropy(logits.float(), labels)

    def param_groups(self, lr, weight_decay):
        """METER's learning-rate groups: the encoders at ``lr``, their adapters, the fusion part
        and the heads at their multiples (each split by weight decay as the engine does: none
        on biases, norms and 1-d weights)."""
        from adapterkit.engine.engine import exempt_from_decay

        t = self.cfg.train
        mult = {"text_encoder": 1.0, "image_encoder": 1.0, "text_adapters": t.lr_mult_adapters,
                "image_adapters": t.lr_mult_adapters, "cross_modal": t.lr_mult_cross_modal, "heads": t.lr_mult_head}
        groups: dict[tuple, list] = {}
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                groups.setdefault((mult[part_of(n)], exempt_from_decay(n, p)), []).append(p)
        return [{"params": ps, "lr": lr * m, "weight_decay": 0.0 if nd else weight_decay}
                for (m, nd), ps in sorted(groups.items())]

    def train_mode(self):
        self.model.train()
        for enc in ENCODERS:  # a frozen encoder (no adapters, nothing trained) stays in eval mode
            module = getattr(self.model, f"{enc}_encoder")
            if not any(p.requires_grad for p in module.parameters()):
                module.eval()

    # --- evaluation -----------------------------------------------------------------------------
    def eval_size(self, task, split):
        return len(self.examples(task, split))

    def predict_batch(self, task, split, rows):
        rows = np.asarray(rows, dtype=np.int64)
        kind = self.kinds[task]
        itm = None
        if kind == "itm":
            texts, ids, labels = self._eval_itm(task, split)
            itm = ([texts[r] for r in rows], [ids[r] for r in rows], labels[rows])
        b = self._batch(task, split, rows, itm)
        b.pop("labels", None)
        dev = next(self.model.parameters()).device
        b = {k: v.to(dev) for k, v in b.items()}
        with self._route(task):
            pred = self.model(task, **b).argmax(-1).tolist()
        exs = self.examples(task, split)
        if kind == "vqa":
            return {exs[r].uid: self.answers[task][p] for r, p in zip(rows, pred)}
        return {exs[r].uid: int(p) for r, p in zip(rows, pred)}

    def score(self, task, split, predictions):
        exs = self.examples(task, split)
        missing = [e.uid for e in exs if e.uid not in predictions]
        if missing:
            raise DataError(f"evaluating {task}/{split}: no prediction for {len(missing)} examples (e.g. {missing[0]!r})")
        kind = self.kinds[task]
        if kind == "vqa":
            hits = [_soft_scores(e).get(predictions[e.uid], 0.0) for e in exs]
        elif kind == "nlvr2":
            hits = [float(predictions[e.uid] == e.label) for e in exs]
        else:
            labels = self._eval_itm(task, split)[2]
            hits = [float(predictions[e.uid] == int(y)) for e, y in zip(exs, labels)]
        return {"accuracy": float(np.mean(hits) * 100) if hits else math.nan, "n": len(exs)}

    # --- the run --------------------------------------------------------------------------------
    def identity(self) -> dict:
        import dataclasses
        import os

        c = self.cfg
        data = dataclasses.asdict(c.data)
        data["root"] = os.path.abspath(c.data.root)
        for k in ("val_split", "test_split", "max_eval_examples"):
            data.pop(k)
        return {"model": dataclasses.asdict(c.model), "adapters": {e: c.adapter_configs(e) for e in ENCODERS},
                "data": data}

    def results(self) -> dict:
        trainable = {part: sum(p.numel() for p in ps if p.requires_grad) for part, ps in self.parts().items()}
        return {"kinds": dict(self.kinds), "answers": {t: len(v) for t, v in self.answers.items()},
                "trainable_by_part": trainable,
                "test_sizes": {t: len(self.examples(t, self.cfg.data.test_split)) for t in self.tasks}}

    def save(self, folder) -> None:
        from adapterkit.safeio import atomic_write_json

        atomic_write_json(Path(folder) / "labels.json", {"kinds": self.kinds, "answers": self.answers})

    def parts(self) -> dict[str, list]:
        """The model's parameters by part: text / image encoder (base), their adapters, the
        fusion part (``cross_modal*``), the heads."""
        out: dict[str, list] = {"text_encoder": [], "text_adapters": [], "image_encoder": [], "image_adapters": [],
                                "cross_modal": [], "heads": []}
        for n, p in self.model.named_parameters():
            out[part_of(n)].append(p)
        return out


def part_of(name: str) -> str:
    """Which part of a :class:`MeterModel` a parameter name belongs to."""
    for enc in ENCODERS:
        if name.startswith(f"{enc}_encoder."):
            return f"{enc}_adapters" if ".adapterkit." in f".{name}" else f"{enc}_encoder"
    return "heads" if name.startswith("heads.") else "cross_modal"


def build_engine(cfg: MeterRunConfig, output_dir, max_steps=None, allow_changes=()):
    """The engine for a METER run config."""
    from adapterkit.engine import Engine

    cfg.check_paths()
    Engine.seed_all(cfg.train.seed)
    domain = MeterDomain(cfg)
    has_adapters = any(cfg.adapter_configs(e) for e in ENCODERS)
    lr = cfg.train.lr or (1e-4 if has_adapters else 1e-5)
    return Engine(domain, cfg.train, cfg.eval, output_dir, name=cfg.name, config=cfg, max_steps=max_steps,
                           allow_changes=allow_changes, lr=lr)


def load_config(src) -> MeterRunConfig:
    from adapterkit.meter.config import load_meter_config

    return load_meter_config(src)


__all__ = ["MeterDomain", "MeterImages", "build_engine", "load_config", "part_of"]
