"""Task data for VL training: examples + a memory-mapped feature store -> tensor batches.

Batches are addressed by (epoch, batch index): each epoch's order of a task's examples is
a permutation seeded by (seed, epoch, task), so a resumed run rebuilds exactly the
batches it would have seen, and every rank of a distributed run agrees on them (rank r
takes rows r::world of each global batch).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from adapterkit.engine.domain import stable_seed
from adapterkit.engine.engine import task_schedule  # noqa: F401  (re-exported)
from adapterkit.errors import DataError
from adapterkit.vl.datasets.base import VLExample

PREFIXES = {"vqa": "vqa: ", "gqa": "gqa: ", "nlvr": "nlvr: ", "caption": "caption: ", "tvqa": "tvqa: ",
            "how2qa": "how2qa: ", "tvc": "tvc: ", "yc2c": "yc2c: "}
CAPTION_TASKS = {"caption", "tvc", "yc2c"}
BINARY_TASKS = {"nlvr"}
# video inputs carry the prompt after the text ("<subtitles, question, choices> tvqa: "), image
# inputs before it ("vqa: <question>"), as the reference builds them
VIDEO_TASKS = {"tvqa", "how2qa", "tvc", "yc2c"}
# the reference's truncation (tokens, special tokens included; None: untruncated): input text,
# training target, and generated captions (HF max_length, which counts the decoder start token)
TEXT_LEN = {"vqa": 20, "gqa": 20, "nlvr": None, "caption": 40, "tvqa": 600, "how2qa": 600, "tvc": 600, "yc2c": 600}
TARGET_LEN = {"vqa": 10, "gqa": None, "nlvr": None, "caption": 40, "tvqa": 20, "how2qa": 20, "tvc": 20, "yc2c": 20}
CAPTION_MAX_LENGTH = {"caption": 40, "tvc": 20, "yc2c": 20}
DEFAULT_TEXT_LEN, DEFAULT_TARGET_LEN = 40, 20  # tasks the reference does not have
ANSWER_CUE = " answer:"  # causal LMs read "<input text> answer:" and continue with the answer


def caption_max_new_tokens(task: str) -> int:
    """New tokens of a generated caption: the reference's max_length less the decoder start token."""
    return CAPTION_MAX_LENGTH.get(task, DEFAULT_TEXT_LEN) - 1


def answer_prefix(tok, kind: str) -> list[int]:
    """The special tokens the tokenizer puts before every seq2seq target (BART: [<s>], T5: []):
    the decoder must read them before the answer's first content token is predicted."""
    if kind != "seq2seq":
        return []
    plain = tok("a", add_special_tokens=False).input_ids
    full = tok("a").input_ids
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i])
    raise DataError("cannot locate the target text inside the tokenizer's encoding of it")


def choice_first_tokens(tok, kind: str, choices: list[str]) -> list[int]:
    """Each choice's first content token, tokenised exactly as training targets are."""
    if kind != "seq2seq":
        ids = [tok(" " + c, add_special_tokens=False).input_ids for c in choices]
    else:
        n = len(answer_prefix(tok, kind))
        ids = [tok(c).input_ids[n:] for c in choices]
    if any(not i for i in ids):
        raise DataError(f"a choice of {choices} tokenises to nothing")
    first = [i[0] for i in ids]
    if len(set(first)) != len(first):
        raise DataError(f"choices {choices} share their first token: first-token scoring cannot tell them apart")
    return first


_seed = stable_seed  # one seed function for every domain (adapterkit.engine.domain)


@dataclass
class TextSpec:
    kind: str                         # "seq2seq" | "causal"
    max_text_len: int | None = None   # None: per task, as the reference (TEXT_LEN)
    max_target_len: int | None = None  # None: per task, as the reference (TARGET_LEN)
    use_prefix: bool = True           # task prefixes ("vqa: "...)
    fixed_shapes: bool = False  # pad training batches to the maximum lengths (CUDA-graphed steps need one shape)
    zero_boxes: bool = True     # all-zero boxes for the visual tokens (the reference's CLIP grid features)


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
        self.text_len = spec.max_text_len or TEXT_LEN.get(task, DEFAULT_TEXT_LEN)
        self.target_len = spec.max_target_len or TARGET_LEN.get(task, DEFAULT_TARGET_LEN)
        self._caps: dict[str, int] = {}

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
        if self.spec.zero_boxes:
            boxes = torch.zeros(b, n_img * k, 4)
        else:
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
        if not self.prefix:
            return [e.text for e in exs]
        if self.task in VIDEO_TASKS:
            return [f"{e.text} {self.prefix}" for e in exs]
        return [self.prefix + e.text for e in exs]

    @functools.cached_property
    def _answer_cue(self) -> list[int]:
        return self.tok(ANSWER_CUE, add_special_tokens=False).input_ids

    def _causal_prompts(self, texts, n) -> list[list[int]]:
        """Causal LMs: the (truncated) input text, then the answer cue, which truncation never cuts."""
        ids = self.tok(texts, add_special_tokens=False, max_length=n, truncation=n is not None).input_ids
        cue = self._answer_cue
        return [i + cue for i in ids]

    def _cap(self, what: str) -> int | None:
        """Truncation length of the input text / target (None: untruncated); with fixed shapes an
        untruncated one is the longest in this task's data (computed once)."""
        n = self.text_len if what == "text" else self.target_len
        if n is not None or not self.spec.fixed_shapes:
            return n
        if what not in self._caps:
            causal = self.spec.kind != "seq2seq"
            if what == "text":
                texts = self._texts(self.examples)
            else:
                texts = sorted({t for e in self.examples for t in [*e.targets, *(e.target_scores or {})]})
                texts = [" " + t for t in texts] if causal else texts
            enc = self.tok(texts, add_special_tokens=not causal).input_ids if texts else [[]]
            self._caps[what] = max(map(len, enc)) + (1 if causal and what == "target" else 0)
        return self._caps[what]

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
        n_text, n_tgt = self._cap("text"), self._cap("target")
        if sp.kind == "seq2seq":
            padding = "max_length" if sp.fixed_shapes else True
            enc = tok(texts, max_length=n_text, truncation=n_text is not None, padding=padding, return_tensors="pt")
            lab = tok(targets, max_length=n_tgt, truncation=n_tgt is not None, padding=padding, return_tensors="pt")
            labels = lab.input_ids.masked_fill(lab.attention_mask == 0, -100)
            return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "labels": labels}
        q = self._causal_prompts(texts, n_text)
        a = tok([" " + t for t in targets], add_special_tokens=False, max_length=None if n_tgt is None else n_tgt - 1,
                truncation=n_tgt is not None)
        seqs = [qi + ai + [eos] for qi, ai in zip(q, a.input_ids)]
        n = n_text + len(self._answer_cue) + n_tgt if sp.fixed_shapes else max(map(len, seqs))
        pad = tok.pad_token_id
        ids = torch.full((len(seqs), n), pad, dtype=torch.long)
        labels = torch.full((len(seqs), n), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, (s, qi) in enumerate(zip(seqs, q)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            labels[i, len(qi): len(s)] = torch.tensor(s[len(qi):])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def eval_order(self) -> np.ndarray:
        """The examples' indices by input length (stable): evaluation batches of neighbours in this
        order pad little (FashionVL's test questions: 19-34% padding in file order, 1-2% sorted).
        Predictions are keyed by example id, so the order changes no score beyond float rounding."""
        n = len(self.examples)
        if getattr(self, "_eval_order", None) is None or len(self._eval_order) != n:
            texts = self._texts(self.examples)
            kw = dict(max_length=self.text_len, truncation=self.text_len is not None)
            lens = [len(i) for i in self.tok(texts, add_special_tokens=self.spec.kind == "seq2seq", **kw).input_ids]
            lens = np.asarray(lens) + np.array([len(e.image_ids) for e in self.examples])  # 2-image rows: more tokens
            self._eval_order = np.argsort(lens, kind="stable")
        return self._eval_order

    def eval_batch(self, rows) -> dict:
        exs = [self.examples[i] for i in rows]
        feats, boxes, order = self._visual(exs)
        texts = self._texts(exs)
        tok, sp = self.tok, self.spec
        n = self.text_len
        if sp.kind == "seq2seq":
            enc = tok(texts, max_length=n, truncation=n is not None, padding=True, return_tensors="pt")
        else:
            q = self._causal_prompts(texts, n)  # left-padded: the last position predicts the answer
            width = max(map(len, q))
            ids = torch.full((len(q), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(q), width), dtype=torch.long)
            for i, qi in enumerate(q):
                ids[i, width - len(qi):] = torch.tensor(qi)
                mask[i, width - len(qi):] = 1
            enc = SimpleNamespace(input_ids=ids, attention_mask=mask)
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "vis_feats": feats,
                "vis_boxes": boxes, "img_order": order, "uids": [e.uid for e in exs]}


