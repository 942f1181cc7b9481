"""Training the GenerativeAdapter generator with the completion objective.

A document is split into a context and a continuation. The adapter generated from the
context must help the model predict the continuation *without* the context in the
prompt: loss = next-token cross-entropy on the continuation tokens only, computed with
the generated adapter active. Only the generator parameters (A1, A2, A3, B, RMSNorm
weight) are trained; the base model stays frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from adapterkit.generative.adapter import GenerativeAdapterSet, generative_set


def continuation_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token loss over the (non-padding) tokens of ``ids`` (labels = ids, padding -100)."""
    labels = ids.clone()
    if mask is not None:
        labels = labels.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def completion_loss(model: nn.Module, context_ids: torch.Tensor, target_ids: torch.Tensor,
                    context_mask: torch.Tensor | None = None, target_mask: torch.Tensor | None = None,
                    name: str | None = None) -> torch.Tensor:
    """Loss on ``target_ids`` with the adapter generated from ``context_ids`` (context not in the prompt)."""
    s: GenerativeAdapterSet = generative_set(model, name)
    s.absorb(model, context_ids, context_mask)
    try:
        return continuation_loss(model, target_ids, target_mask)
    finally:
        s.reset()


@torch.no_grad()
def evaluate_completion(model: nn.Module, context_ids: torch.Tensor, target_ids: torch.Tensor,
                        context_mask: torch.Tensor | None = None, target_mask: torch.Tensor | None = None,
                        name: str | None = None) -> dict[str, float]:
    """``{"base": loss without adapter, "adapted": loss with the generated adapter}`` on the continuation."""
    s = generative_set(model, name)
    s.reset()
    base = float(continuation_loss(model, target_ids, target_mask))
    adapted = float(completion_loss(model, context_ids, target_ids, context_mask, target_mask, name))
    return {"base": base, "adapted": adapted}


def split_documents(token_lists: list[list[int]], context_len: int, target_len: int,
                    pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(context_ids, context_mask, target_ids, target_mask): the first ``context_len`` tokens of each
    document as context, the next up to ``target_len`` as continuation (right-padded)."""
    b = len(token_lists)
    ctx = torch.full((b, context_len), pad_id, dtype=torch.long)
    tgt = torch.full((b, target_len), pad_id, dtype=torch.long)
    cm = torch.zeros(b, context_len, dtype=torch.long)
    tm = torch.zeros(b, target_len, dtype=torch.long)
    for i, toks in enumerate(token_lists):
        c, t = toks[:context_len], toks[context_len:context_len + target_len]
        ctx[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        cm[i, : len(c)] = 1
        tgt[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        tm[i, : len(t)] = 1
    return ctx, cm, tgt, tm
