"""Task data for VL training: examples + a memory-mapped feature store -> tensor batches.

Batches are addressed by (epoch, batch index): each epoch's order of a task's examples is
a permutation seeded by (seed, epoch, task), so a resumed run rebuilds exactly the
batches it would have seen, and every rank of a distributed run agrees on them (rank r
takes rows r::world of each global batch).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from adapterkit.errors import DataError
from adapterkit.vl.datasets.base import VLExample

PREFIXES = {"vqa": "vqa: ", "gqa": "gqa: ", "nlvr": "nlvr: ", "caption": "caption: ", "tvqa": "tvqa: ",
            "how2qa": "how2qa: ", "tvc": "tvc: ", "yc2c": "yc2c: "}
CAPTION_TASKS = {"caption", "tvc", "yc2c"}
BINARY_TASKS = {"nlvr"}


def _seed(*parts) -> int:
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little")


@dataclass
class TextSpec:
    kind: str                 # "seq2seq" | "causal"
    max_text_len: int = 40
    max_target_len: int = 20
    use_prefix: bool = True
    fixed_shapes: bool = False  # pad training batches to the maximum lengths (CUDA-graphed steps need one shape)


class TaskData:
    """One task's examples, features and tokenisation."""

    def __init__(self, task: str, examples: list[VLExample], store, tokenizer, spec: TextSpec, n_images: int,
                 train: bool):
        if not examples:
            raise DataError(f"task {task!r} has no examples")
        self.task, self.store, self.tok, self.spec, self.n_images = task, store, tokenizer, spec, n_images
        missing = [i for ex in examples for i in ex.image_ids if i not in store]
        if missing:
            raise DataError(f"task {task!r}: image id {missing[0]!r} is not in the feature store {store.path}"
                            f" ({len(missing)} missing)")
        if train and task in CAPTION_TASKS:  # one training example per reference caption
            examples = [VLExample(f"{ex.uid}#{j}", ex.task, ex.image_ids, ex.text, [c], extra=ex.extra)
                        for ex in examples for j, c in enumerate(ex.targets)]
        self.examples = examples
        self.prefix = PREFIXES.get(task, f"{task}: ") if spec.use_prefix else ""

    def __len__(self):
        return len(self.examples)

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self.examples) / batch_size)

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng(_seed(seed, epoch, self.task)).permutation(len(self.examples))

    # --- features -----------------------------------------------------------------------
    def _visual(self, exs: list[VLExample]):
        n_img = self.n_images if any(len(e.image_ids) > 1 for e in exs) else 1
        ids = []
        for e in exs:
            ii = list(e.image_ids)[:n_img]
            ids += ii + [ii[-1]] * (n_img - len(ii))
        feats, boxes = self.store.gather(ids)
        b, k = len(exs), feats.shape[1]
        feats = torch.from_numpy(np.asarray(feats, dtype=np.float32)).view(b, n_img * k, -1)
        boxes = torch.from_numpy(np.asarray(boxes, dtype=np.float32)).view(b, n_img * k, 4)
        order = torch.arange(n_img).repeat_interleave(k).unsqueeze(0).expand(b, -1).contiguous()
        return feats, boxes, order

    # --- targets --------------------------------------------------------------------------
    def _target(self, ex: VLExample, rng: np.random.Generator) -> tuple[str, float]:
        if ex.target_scores:
            answers = list(ex.target_scores)
            scores = np.array([ex.target_scores[a] for a in answers], dtype=np.float64)
            if scores.sum() <= 0:
                return answers[0], 0.0
            i = rng.choice(len(answers), p=scores / scores.sum())
            return answers[i], float(scores[i])
        if not ex.targets:
            raise DataError(f"training example {ex.uid!r} of task {self.task!r} has no target")
        return ex.targets[int(rng.integers(len(ex.targets)))] if len(ex.targets) > 1 else ex.targets[0], 1.0

    def _texts(self, exs):
        return [self.prefix + e.text for e in exs]

    def train_batch(self, rows: np.ndarray, rng_seed: int, rank: int = 0, world: int = 1) -> dict:
        rows = rows[rank::world]
        exs = [self.examples[i] for i in rows]
        rng = np.random.default_rng(rng_seed)
        tg = [self._target(e, rng) for e in exs]
        feats, boxes, order = self._visual(exs)
        batch = {"vis_feats": feats, "vis_boxes": boxes, "img_order": order,
                 "label_weights": torch.tensor([w for _, w in tg], dtype=torch.float32)}
        batch.update(self._encode_train(self._texts(exs), [t for t, _ in tg]))
        return batch

    def _encode_train(self, texts, targets):
        tok, sp = self.tok, self.spec
        eos = tok.eos_token_id
        if sp.kind == "seq2seq":
            padding = "max_length" if sp.fixed_shapes else True
            enc = tok(texts, max_length=sp.max_text_len, truncation=True, padding=padding, return_tensors="pt")
            lab = tok(targets, max_length=sp.max_target_len, truncation=True, padding=padding, return_tensors="pt")
            labels = lab.input_ids.masked_fill(lab.attention_mask == 0, -100)
            return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}
        q = tok([t + " answer:" for t in texts], add_special_tokens=False, max_length=sp.max_text_len, truncation=True)
        a = tok([" " + t for t in targets], add_special_tokens=False, max_length=sp.max_target_len - 1, truncation=True)
        seqs = [qi + ai + [eos] for qi, ai in zip(q.input_ids, a.input_ids)]
        n = sp.max_text_len + sp.max_target_len if sp.fixed_shapes else max(map(len, seqs))
        pad = tok.pad_token_id
        ids = torch.full((len(seqs), n), pad, dtype=torch.long)
        labels = torch.full((len(seqs), n), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, (s, qi) in enumerate(zip(seqs, q.input_ids)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            labels[i, len(qi): len(s)] = torch.tensor(s[len(qi):])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def eval_batch(self, rows) -> dict:
        exs = [self.examples[i] for i in rows]
        feats, boxes, order = self._visual(exs)
        texts = self._texts(exs)
        tok, sp = self.tok, self.spec
        if sp.kind == "seq2seq":
            enc = tok(texts, max_length=sp.max_text_len, truncation=True, padding=True, return_tensors="pt")
        else:
            side = tok.padding_side
            tok.padding_side = "left"
            enc = tok([t + " answer:" for t in texts], add_special_tokens=False, max_length=sp.max_text_len,
                      truncation=True, padding=True, return_tensors="pt")
            tok.padding_side = side
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "vis_feats": feats,
                "vis_boxes": boxes, "img_order": order, "uids": [e.uid for e in exs]}


def task_schedule(num_batches: dict[str, int], seed: int, epoch: int) -> list[tuple[str, int]]:
    """Each task once per batch of its loader, shuffled with a seed derived from the epoch
    (identical on every rank): sampling proportional to dataset size."""
    items = [(t, b) for t in sorted(num_batches) for b in range(num_batches[t])]
    perm = np.random.default_rng(_seed(seed, "schedule", epoch)).permutation(len(items))
    return [items[i] for i in perm]
