"""``adapterkit sft apply|remove|diff|train|train-mlm``: sparse fine-tuning differences on HF models.

- ``apply  --model DIR --sft SFT_DIR [SFT_DIR ...] --out DIR``: compose the SFTs, add
  them to the model's weights and save the patched model (tokenizer files copied).
- ``remove --model DIR --sft SFT_DIR [...] --out DIR``: subtract them again.
- ``diff   --base DIR --tuned DIR --k K --out SFT_DIR``: the K largest differences
  between two fine-tuned checkpoints of one architecture.
- ``train  --model DIR --data FILE --k K --out SFT_DIR``: LT-SFT of a text classifier
  (mean-pooled encoder + linear head) on a JSONL or CSV file with text and label
  columns; the head is stored densely as ``head.weight`` / ``head.bias``.
- ``train-mlm --model DIR --data FILE --k K --out SFT_DIR``: a language SFT (LT-SFT with
  BERT masked-LM on raw text: a .txt file, one text per line, or JSONL/CSV with a text
  column) of a masked-LM or bare encoder (a missing MLM head is initialised and warmed
  up first); keyed like the bare encoder, so it composes with ``train`` task SFTs.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from adapterkit.cli.argtypes import (
    nonnegative_float,
    nonnegative_int,
    open_fraction,
    positive_float,
    positive_int,
)
from adapterkit.errors import ConfigError, DataError
from adapterkit.safeio import atomic_dir
from adapterkit.sft.diff import SparseDiff, apply_sft, compose, remove_sft

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".onnx")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sft", help="composable sparse fine-tuning (LT-SFT) differences",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="sft_command", required=True)
    for name, helptext in (("apply", "add SFT differences to a model"), ("remove", "subtract SFT differences")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("--model", required=True, help="HF model directory")
        q.add_argument("--sft", required=True, nargs="+", help="SFT directories (composed when several)")
        q.add_argument("--scale", type=float, default=1.0, help="multiply the differences by this factor")
        q.add_argument("--out", required=True, help="output model directory")
    q = sub.add_parser("diff", help="extract the K largest differences between two checkpoints")
    q.add_argument("--base", required=True)
    q.add_argument("--tuned", required=True)
    q.add_argument("--k", type=positive_int, required=True)
    q.add_argument("--out", required=True)
    q = sub.add_parser("train", help="LT-SFT of a text classifier on a JSONL/CSV file")
    q.add_argument("--model", required=True, help="HF encoder directory (with tokenizer)")
    q.add_argument("--data", required=True, help="JSONL or CSV file with text and label fields")
    q.add_argument("--text-field", default="text")
    q.add_argument("--label-field", default="label")
    q.add_argument("--k", type=positive_int, required=True, help="number of entries in the difference")
    q.add_argument("--iterations", type=positive_int, default=1, help="LT-SFT iterations (K/n entries each)")
    q.add_argument("--epochs", type=positive_float, default=1.0, help="epochs per phase")
    q.add_argument("--batch-size", type=positive_int, default=16)
    q.add_argument("--lr", type=positive_float, default=5e-5)
    q.add_argument("--l1", type=nonnegative_float, default=0.0, help="weight of the L1 pull towards the base weights")
    q.add_argument("--max-length", type=positive_int, default=64)
    q.add_argument("--seed", type=nonnegative_int, default=0)
    q.add_argument("--out", required=True, help="output SFT directory")
    q = sub.add_parser("train-mlm", help="language SFT: LT-SFT with masked-LM on raw text")
    q.add_argument("--model", required=True, help="HF encoder directory (with tokenizer); an MLM head is optional")
    q.add_argument("--data", required=True, help=".txt (one text per line), JSONL or CSV file")
    q.add_argument("--text-field", default="text", help="text column of a JSONL/CSV file")
    q.add_argument("--k", type=positive_int, required=True, help="number of entries in the difference")
    q.add_argument("--iterations", type=positive_int, default=1, help="LT-SFT iterations (K/n entries each)")
    q.add_argument("--steps", type=positive_int, default=100, help="optimizer steps of each full phase")
    q.add_argument("--sparse-steps", type=positive_int, default=None, help="steps of each sparse phase (default: --steps)")
    q.add_argument("--head-warmup-steps", type=nonnegative_int, default=None,
                   help="steps training a newly initialised MLM head alone first (default: --steps; 0: none)")
    q.add_argument("--batch-size", type=positive_int, default=8)
    q.add_argument("--lr", type=positive_float, default=5e-5)
    q.add_argument("--l1", type=nonnegative_float, default=0.1, help="weight of the L1 pull towards the base weights")
    q.add_argument("--mlm-probability", type=open_fraction, default=0.15)
    q.add_argument("--max-length", type=positive_int, default=128, help="chunk length (texts are concatenated and cut)")
    q.add_argument("--line-by-line", action="store_true", help="one padded sequence per text instead of chunks")
    q.add_argument("--train-decoder", action="store_true",
                   help="keep the output projection tied to the embeddings (the reference freezes a copy)")
    q.add_argument("--seed", type=nonnegative_int, default=0)
    q.add_argument("--out", required=True, help="output SFT directory")
    p.set_defaults(func=run)
    return p


def read_texts(path: str, text_field: str = "text") -> list[str]:
    """Texts from a .txt file (one per non-empty line) or a JSONL/CSV file's ``text_field``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {path}")
    if p.suffix.lower() == ".txt":
        texts = [ln for ln in p.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        if not texts:
            raise DataError(f"{path} holds no text")
        return texts
    if p.suffix.lower() not in (".jsonl", ".json", ".csv", ".tsv"):
        raise DataError(f"{path}: expected a .txt, .jsonl or .csv file")
    texts, _ = read_labelled_text(path, text_field, text_field)
    return texts


def _load_model(path: str):
    from transformers import AutoModel

    if not Path(path).is_dir():
        raise ConfigError(f"--model {path} is not a directory (give a local HF model directory)")
    return AutoModel.from_pretrained(path)


def _save_model(model, src: str, out: str) -> None:
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in Path(src).iterdir():  # tokenizer / processor files travel with the weights
            if f.is_file() and f.suffix not in _WEIGHT_SUFFIXES and f.name != "config.json" \
                    and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)


def _only_model_dense(diff: SparseDiff, model: nn.Module) -> list[str]:
    names = dict(model.named_parameters())
    skipped = [n for n in diff.dense if n not in names]
    for n in skipped:
        diff.dense.pop(n)
        diff.shapes.pop(n, None)
    return skipped


def read_labelled_text(path: str, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
    """(texts, labels) from a JSONL file (one object per line) or a CSV file with a header."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {path}")
    rows = []
    if p.suffix.lower() in (".jsonl", ".json"):
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    raise DataError(f"{path}:{i} is not valid JSON") from None
    elif p.suffix.lower() in (".csv", ".tsv"):
        with open(p, newline="", encoding="utf-8", errors="replace") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t" if p.suffix.lower() == ".tsv" else ","))
    else:
        raise DataError(f"{path}: expected a .jsonl or .csv file")
    if not rows:
        raise DataError(f"{path} holds no examples")
    for f in (text_field, label_field):
        if f not in rows[0]:
            raise DataError(f'{path} has no field "{f}"; fields: {sorted(rows[0])}')
    return [str(r[text_field]) for r in rows], [str(r[label_field]) for r in rows]


class MeanPoolClassifier(nn.Module):
    """Encoder + mean pooling over the attention mask + linear head."""

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1.0))


def _train(args) -> int:
    from transformers import AutoTokenizer

    from adapterkit.sft.lottery import LotteryTicketSFT

    torch.manual_seed(args.seed)
    texts, labels = read_labelled_text(args.data, args.text_field, args.label_field)
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(lab) for lab in labels])
    tok = AutoTokenizer.from_pretrained(args.model)
    enc = tok(texts, padding="max_length", truncation=True, max_length=args.max_length, return_tensors="pt")
    model = MeanPoolClassifier(_load_model(args.model), len(classes))
    tuner = LotteryTicketSFT(model, args.k, include=[r"^encoder\."], dense=[r"^head\."], n_iterations=args.iterations)
    n = len(texts)
    steps = max(1, int(args.epochs * ((n + args.batch_size - 1) // args.batch_size)))

    def train_fn(m: nn.Module, phase: str) -> None:
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
        m.train()
        g = torch.Generator().manual_seed(args.seed + tuner.iteration)
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(int(args.epochs) + 1)])
        for s in range(steps):
            b = order[s * args.batch_size:(s + 1) * args.batch_size]
            if b.numel() == 0:
                break
            logits = m(enc["input_ids"][b], enc["attention_mask"][b])
            loss = nn.functional.cross_entropy(logits, y[b])
            if args.l1:
                loss = loss + args.l1 * tuner.l1_penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            print(f"[{phase} {tuner.iteration}] step {s + 1}/{steps} loss {loss.item():.4f}", flush=True)
        m.eval()

    diff = tuner.run(train_fn)
    prefix = "encoder."
    renamed = SparseDiff(meta={**diff.meta, "labels": classes, "base_model": str(args.model)})
    for name in diff.indices:
        short = name[len(prefix):]
        renamed.indices[short], renamed.values[short], renamed.shapes[short] = \
            diff.indices[name], diff.values[name], diff.shapes[name]
    renamed.dense, renamed.shapes = dict(diff.dense), {**renamed.shapes, **{k: diff.shapes[k] for k in diff.dense}}
    renamed.save(args.out)
    print(f"saved LT-SFT with {renamed.nnz} entries (+ head) to {args.out}")
    return 0


def _train_mlm(args) -> int:
    from transformers import AutoTokenizer

    from adapterkit.sft.language import chunk_corpus, language_sft, load_mlm_model, mlm_loss

    torch.manual_seed(args.seed)
    texts = read_texts(args.data, args.text_field)
    model, new_head = load_mlm_model(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    if new_head:
        print(f"{args.model} has no MLM head: a new one is initialised (output projection = the word embeddings)")
    if tok.mask_token_id is None:
        raise ConfigError(f"the tokenizer of {args.model} has no mask token: masked-LM training needs one")
    chunks = chunk_corpus(tok, texts, args.max_length, line_by_line=args.line_by_line)
    vocab = model.get_input_embeddings().weight.shape[0]
    kw = dict(mask_token_id=tok.mask_token_id, vocab_size=vocab, mlm_probability=args.mlm_probability,
              seed=args.seed + 12345)
    before = mlm_loss(model, chunks, **kw)
    diff = language_sft(model, tok, texts, args.k, full_steps=args.steps, sparse_steps=args.sparse_steps,
                        n_iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, l1=args.l1,
                        max_length=args.max_length, mlm_probability=args.mlm_probability,
                        line_by_line=args.line_by_line, freeze_decoder=not args.train_decoder, new_head=new_head,
                        head_warmup_steps=args.head_warmup_steps, seed=args.seed,
                        log=lambda m: print(m, flush=True))
    after = mlm_loss(model, chunks, **kw)
    diff.meta.update({"base_model": str(args.model), "mlm_loss_before": before, "mlm_loss_after": after,
                      "train_texts": len(texts)})
    diff.save(args.out)
    print(f"saved language SFT with {diff.nnz} entries (+ MLM head {sorted(diff.dense)}) to {args.out}; "
          f"MLM loss on the training text {before:.4f} -> {after:.4f} (one fixed masking; the head's change "
          "is included)")
    return 0


def run(args) -> int:
    cmd = args.sft_command
    if cmd in ("apply", "remove"):
        diff = compose([SparseDiff.load(d) for d in args.sft])
        model = _load_model(args.model)
        skipped = _only_model_dense(diff, model)
        if cmd == "apply":
            apply_sft(model, diff, scale=args.scale)
        else:
            if diff.dense:
                raise ConfigError(f"cannot remove dense tensors {sorted(diff.dense)} from a saved model "
                                  "(their base values are not stored)")
            remove_sft(model, diff, scale=args.scale)
        _save_model(model, args.model, args.out)
        note = f" (dense tensors not in the model, left out: {skipped})" if skipped else ""
        print(f"{'applied' if cmd == 'apply' else 'removed'} {diff.nnz} entries from {len(args.sft)} SFT(s); "
              f"saved to {args.out}{note}")
        return 0
    if cmd == "diff":
        base, tuned = _load_model(args.base), _load_model(args.tuned)
        d = SparseDiff.from_states(dict(base.named_parameters()), dict(tuned.named_parameters()), k=args.k,
                                   meta={"method": "diff", "base": str(args.base), "tuned": str(args.tuned)})
        d.save(args.out)
        print(f"saved {d.nnz} entries to {args.out}")
        return 0
    if cmd == "train":
        return _train(args)
    if cmd == "train-mlm":
        return _train_mlm(args)
    raise ConfigError(f"unknown sft command {cmd!r}")  # pragma: no cover - argparse enforces the choices
