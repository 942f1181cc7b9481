"""Language SFT: LT-SFT with the masked-LM objective (composable-sft ``run_mlm.py``).

A language SFT phi_lang is the K-entry difference that masked-LM training on a
language's raw text makes to a pretrained encoder. It composes with a task SFT by
addition, theta = theta_0 + phi_lang + phi_task (:func:`adapterkit.sft.compose`);
the task SFT is trained with the source-language SFT applied and, at test time, the
target-language SFT is swapped in.

Reference settings kept here (``examples/language-modeling/train_mlm.sh``):

- BERT masking (HF ``DataCollatorForLanguageModeling``): each non-special token is
  chosen with ``mlm_probability`` (0.15); of the chosen, 80% become ``[MASK]``, 10% a
  uniformly random token, 10% stay; the loss is over the chosen tokens only.
- Texts are tokenized, concatenated and cut into ``max_length`` chunks, the
  remainder dropped (``line_by_line`` pads each text instead); a corpus shorter than
  one chunk is one chunk.
- Maskable: every base-model parameter (``model.base_model_prefix``) except
  LayerNorms. ``--freeze_decoder``: the output projection is untied from the input
  embeddings and frozen (a frozen copy), so the embeddings stay maskable. The rest of
  the MLM head (transform, output bias) is trained densely and stored whole, named as
  in the masked-LM model (``cls.predictions.*``).
- L1 pull towards theta_0 with weight 0.1 in both phases (``full_l1_reg``,
  ``sparse_l1_reg``); AdamW without weight decay, a fresh optimizer and linearly
  decaying learning rate in every phase.

The sparse entries are keyed like the bare encoder (``AutoModel``; the base-model
prefix ``bert.`` is stripped), the same as ``adapterkit sft train`` task SFTs, so the
two compose and ``adapterkit sft apply`` adds them to an encoder directory (it leaves
out the MLM-head tensors, which the encoder does not have; in Python, compose
:meth:`SparseDiff.sparse_only` copies, the reference's ``apply(with_abs=False)``).

Encoders saved without an MLM head (sentence-transformers checkpoints such as
all-MiniLM-L6-v2 are a bare ``BertModel``): :func:`load_mlm_model` loads them into
``AutoModelForMaskedLM``; the output projection is the (tied) word embeddings, the
new transform and bias start from HF's initialisation, and :func:`language_sft` first
trains that new head alone (``head_warmup_steps``, encoder frozen) so that the
encoder's full-fine-tuning phase is not spent adapting to a random head.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import nn

from adapterkit.errors import ConfigError, DataError
from adapterkit.sft.diff import SparseDiff
from adapterkit.sft.lottery import DEFAULT_EXCLUDE, LotteryTicketSFT

IGNORE_INDEX = -100


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_tokens_mask: torch.Tensor | None = None,
    mlm_probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a batch: ``(inputs, labels)``.

    Each entry with ``special_tokens_mask == 0`` is chosen with ``mlm_probability``;
    chosen entries become ``mask_token_id`` (80%), a token drawn uniformly from
    ``[0, vocab_size)`` (10%) or stay (10%). ``labels`` hold the original id at the
    chosen entries and -100 elsewhere.
    """
    if not 0.0 < mlm_probability < 1.0:
        raise ConfigError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    if not 0 <= mask_token_id < vocab_size:
        raise ConfigError(f"mask token id {mask_token_id} is outside the vocabulary of {vocab_size}")
    ids = input_ids.long()
    dev = ids.device
    u = torch.rand(ids.shape, generator=generator).to(dev)
    chosen = u < mlm_probability
    if special_tokens_mask is not None:
        chosen &= ~special_tokens_mask.to(dev).bool()
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    r = torch.rand(ids.shape, generator=generator).to(dev)
    to_mask = chosen & (r < 0.8)
    to_random = chosen & (r >= 0.8) & (r < 0.9)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator).to(dev)
    inputs = torch.where(to_mask, torch.full_like(ids, mask_token_id), ids)
    inputs = torch.where(to_random, random_ids, inputs)
    return inputs, labels


def load_mlm_model(path: str):
    """``(model, new_head)``: an ``AutoModelForMaskedLM`` from a local directory;
    ``new_head`` is True when the checkpoint had no MLM head (its weights were
    initialised here, the output projection tied to the word embeddings)."""
    from pathlib import Path

    from transformers import AutoModelForMaskedLM

    if not Path(path).is_dir():
        raise ConfigError(f"--model {path} is not a directory (give a local HF model directory)")
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    except ValueError as e:  # an architecture with no masked-LM class
        raise ConfigError(f"{path}: no masked-LM model for this architecture ({e})") from None
    prefix = model.base_model_prefix + "."
    new_head = any(not k.startswith(prefix) for k in info.get("missing_keys", ()))
    return model, new_head


def chunk_corpus(tokenizer, texts: Sequence[str], max_length: int, line_by_line: bool = False) -> dict:
    """Tokenized training chunks: ``input_ids``, ``attention_mask``, ``special_tokens_mask``
    (n_chunks x length). Concatenate-and-cut (the reference default) or one padded row per text."""
    texts = [t for t in texts if t and not t.isspace()]
    if not texts:
        raise DataError("the language corpus holds no non-empty text")
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2, got {max_length}")
    if line_by_line:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                        return_special_tokens_mask=True, return_tensors="pt")
        am = enc["attention_mask"]
        return {"input_ids": enc["input_ids"], "attention_mask": am,
                "special_tokens_mask": enc["special_tokens_mask"] | (am == 0).long()}
    enc = tokenizer(texts, return_special_tokens_mask=True)
    ids = torch.tensor([i for row in enc["input_ids"] for i in row], dtype=torch.long)
    special = torch.tensor([i for row in enc["special_tokens_mask"] for i in row], dtype=torch.long)
    length = min(max_length, ids.numel())
    n = ids.numel() // length
    ids, special = ids[: n * length].view(n, length), special[: n * length].view(n, length)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "special_tokens_mask": special}


@torch.no_grad()
def mlm_loss(model: nn.Module, chunks: dict, *, mask_token_id: int, vocab_size: int, mlm_probability: float = 0.15,
             seed: int = 0, batch_size: int = 32) -> float:
    """Mean masked-LM loss of ``model`` over ``chunks`` with a fixed (seeded) masking."""
    g = torch.Generator().manual_seed(seed)
    inputs, labels = mask_tokens(chunks["input_ids"], mask_token_id=mask_token_id, vocab_size=vocab_size,
                                 special_tokens_mask=chunks["special_tokens_mask"],
                                 mlm_probability=mlm_probability, generator=g)
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, inputs.shape[0], batch_size):
        lab = labels[s:s + batch_size].to(dev)
        n = int((lab != IGNORE_INDEX).sum())
        if not n:
            continue
        out = model(input_ids=inputs[s:s + batch_size].to(dev),
                    attention_mask=chunks["attention_mask"][s:s + batch_size].to(dev), labels=lab)
        total += float(out.loss) * n
        count += n
    model.train(was)
    if not count:
        raise DataError("no token of the corpus was masked: the corpus is too small for an MLM loss")
    return total / count


def _mlm_parameters(model: nn.Module, freeze_decoder: bool, freeze_layer_norm: bool):
    """Untie/freeze the decoder as the reference does; return (maskable, dense head) names."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not any(n.startswith(prefix + ".") for n, _ in model.named_parameters()):
        raise ConfigError(f"{type(model).__name__} has no base model under a prefix; give an AutoModelForMaskedLM")
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or inp is None:
        raise ConfigError(f"{type(model).__name__} has no input/output embeddings: not a masked-LM model")
    decoder = None
    if freeze_decoder:
        if out.weight is inp.weight:  # untie: a frozen copy of the embeddings
            out.weight = nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
        decoder = out.weight
    ln = [re.compile(p) for p in DEFAULT_EXCLUDE] if freeze_layer_norm else []
    maskable, dense = [], []
    for n, p in model.named_parameters():
        if not p.is_floating_point() or p is decoder or any(r.search(n) for r in ln):
            continue
        (maskable if n.startswith(prefix + ".") else dense).append(n)
    return prefix, maskable, dense


def _exact(names: Sequence[str]) -> list[str]:
    return [f"^{re.escape(n)}$" for n in names]


def language_sft(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    k: int,
    *,
    full_steps: int = 100,
    sparse_steps: int | None = None,
    n_iterations: int = 1,
    batch_size: int = 8,
    lr: float = 5e-5,
    l1: float = 0.1,
    max_length: int = 128,
    mlm_probability: float = 0.15,
    line_by_line: bool = False,
    freeze_decoder: bool = True,
    freeze_layer_norm: bool = True,
    new_head: bool = False,
    head_warmup_steps: int | None = None,
    head_lr: float = 1e-3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> SparseDiff:
    """LT-SFT of a masked-LM ``model`` on ``texts``; returns the language SFT.

    ``k`` entries over the base model (keyed without its prefix); the MLM head's
    trained tensors are stored dense under their masked-LM names. ``full_steps`` /
    ``sparse_steps`` (default: ``full_steps``) optimizer steps per phase and
    iteration. ``new_head`` (from :func:`load_mlm_model`): train the freshly
    initialised head alone for ``head_warmup_steps`` (default ``full_steps``) at
    ``head_lr`` first. The model ends holding theta_0 + phi (head included).
    """
    for name, v in (("full_steps", full_steps), ("batch_size", batch_size)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    sparse_steps = full_steps if sparse_steps is None else sparse_steps
    if sparse_steps < 1:
        raise ConfigError(f"sparse_steps must be >= 1, got {sparse_steps}")
    if l1 < 0:
        raise ConfigError(f"l1 must be >= 0, got {l1}")
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise ConfigError("the tokenizer has no mask token: masked-LM training needs one")
    vocab = model.get_input_embeddings().weight.shape[0]
    chunks = chunk_corpus(tokenizer, texts, max_length, line_by_line=line_by_line)
    if int(chunks["input_ids"].max()) >= vocab:
        raise ConfigError(f"the tokenizer produces ids up to {int(chunks['input_ids'].max())} but the model's "
                          f"vocabulary has {vocab} entries: tokenizer and model do not match")
    prefix, maskable, head = _mlm_parameters(model, freeze_decoder, freeze_layer_norm)
    dev = next(model.parameters()).device
    n = chunks["input_ids"].shape[0]
    g = torch.Generator().manual_seed(seed)
    say = log or (lambda s: None)

    def loop(m: nn.Module, steps: int, rate: float, tag: str, penalty: Callable[[], torch.Tensor] | None) -> None:
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=rate, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
        m.train()
        order = torch.cat([torch.randperm(n, generator=g) for _ in range(steps * batch_size // n + 1)])
        for s in range(steps):
            b = order[s * batch_size:(s + 1) * batch_size]
            inputs, labels = mask_tokens(chunks["input_ids"][b], mask_token_id=mask_id, vocab_size=vocab,
                                         special_tokens_mask=chunks["special_tokens_mask"][b],
                                         mlm_probability=mlm_probability, generator=g)
            if not bool((labels != IGNORE_INDEX).any()):
                continue  # nothing masked in this batch: no loss to take
            loss = m(input_ids=inputs.to(dev), attention_mask=chunks["attention_mask"][b].to(dev),
                     labels=labels.to(dev)).loss
            if penalty is not None:
                loss = loss + penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if (s + 1) % 50 == 0 or s + 1 == steps:
                say(f"[{tag}] step {s + 1}/{steps} mlm loss {loss.item():.4f}")
        m.eval()

    warm = (full_steps if head_warmup_steps is None else head_warmup_steps) if new_head else 0
    if warm and head:
        flags = {nm: p.requires_grad for nm, p in model.named_parameters()}
        for nm, p in model.named_parameters():
            p.requires_grad_(nm in head)
        try:
            loop(model, warm, head_lr, "head warm-up", None)
        finally:
            for nm, p in model.named_parameters():
                p.requires_grad_(flags[nm])

    tuner = LotteryTicketSFT(model, k, include=_exact(maskable), exclude=(), dense=_exact(head),
                             n_iterations=n_iterations)

    def train_fn(m: nn.Module, phase: str) -> None:
        loop(m, full_steps if phase == "full" else sparse_steps, lr, f"{phase} {tuner.iteration}",
             (lambda: l1 * tuner.l1_penalty()) if l1 else None)

    diff = tuner.run(train_fn)
    cut = len(prefix) + 1
    out = SparseDiff(meta={**diff.meta, "method": "lt-sft-language", "objective": "mlm",
                           "mlm_probability": mlm_probability, "base_model_prefix": prefix,
                           "head": sorted(diff.dense), "new_head": bool(new_head), "head_warmup_steps": warm,
                           "freeze_decoder": freeze_decoder, "l1": l1, "full_steps": full_steps,
                           "sparse_steps": sparse_steps,
                           "mask_entries": int(sum(int(m.sum()) for m in tuner.masks.values()))})
    for name in diff.indices:
        out.indices[name[cut:]], out.values[name[cut:]], out.shapes[name[cut:]] = \
            diff.indices[name], diff.values[name], diff.shapes[name]
    for name, t in diff.dense.items():
        out.dense[name], out.shapes[name] = t, diff.shapes[name]
    return out


def with_base_prefix(diff: SparseDiff, prefix: str) -> SparseDiff:
    """A copy of ``diff`` whose sparse entries are keyed under ``prefix.`` (to apply an
    encoder-keyed SFT to the masked-LM model it came from); dense tensors keep their names."""
    out = SparseDiff(meta=dict(diff.meta))
    for n in diff.indices:
        out.indices[f"{prefix}.{n}"], out.values[f"{prefix}.{n}"] = diff.indices[n], diff.values[n]
        out.shapes[f"{prefix}.{n}"] = diff.shapes[n]
    for n, t in diff.dense.items():
        out.dense[n], out.shapes[n] = t, diff.shapes[n]
    return out


__all__ = ["IGNORE_INDEX", "chunk_corpus", "language_sft", "load_mlm_model", "mask_tokens", "mlm_loss",
           "with_base_prefix"]
