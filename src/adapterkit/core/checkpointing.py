"""Activation checkpointing that works with adapters and task routing.

Checkpointed blocks drop their activations after the forward and run again during the
backward. Two things go wrong with adapters if nothing is done:

- the recomputation runs inside ``loss.backward()``, usually *after* the ``with
  adapterkit.route(...)`` block has exited (or in an autograd worker thread, which never saw
  the context variable), so per-task adapters there find no route, or another one;
- the reentrant variant needs the block's inputs to require grad, which they do not when
  the embeddings are frozen, so adapter weights inside would get no gradient.

:func:`enable_activation_checkpointing` uses PyTorch's non-reentrant checkpoint and a
``context_fn`` that captures the route active at forward time and re-enters it for the
recomputation, so adapter gradients equal those of the plain model (dropout included: the
RNG state is preserved as usual). HF models go through ``gradient_checkpointing_enable``; any
other model names its blocks (module path regexes).
"""

from __future__ import annotations

import contextlib
import functools
import re

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from adapterkit.core import routing
from adapterkit.errors import ConfigError


def route_context():
    """``context_fn`` for ``torch.utils.checkpoint``: (forward ctx, recompute ctx), the second
    re-entering the route that was active when the block first ran."""
    return contextlib.nullcontext(), routing.reenter(routing.current_route())


def checkpoint_kwargs() -> dict:
    return {"use_reentrant": False, "context_fn": route_context}


def enable_activation_checkpointing(model: nn.Module, modules: list[str] | None = None) -> list[str]:
    """Checkpoint the model's blocks; returns the checkpointed module paths ("<hf>" for HF models).

    ``modules``: regexes of module paths to checkpoint (for models without HF's
    ``gradient_checkpointing_enable``, or to choose other blocks)."""
    if modules is None:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"{type(model).__name__} has no gradient_checkpointing_enable(): name the blocks to "
                              "checkpoint, e.g. enable_activation_checkpointing(model, modules=[r'layers\\.\\d+$'])")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs())
        return ["<hf>"]
    try:
        pats = [re.compile(p) for p in modules]
    except re.error as e:
        raise ConfigError(f"activation checkpointing: bad module regex: {e}") from None
    done = []
    for name, mod in model.named_modules():
        if name and any(p.search(name) for p in pats) and not getattr(mod, "_adapterkit_checkpointed", False):
            mod.forward = functools.partial(_checkpointed_forward, mod.forward)
            mod._adapterkit_checkpointed = True
            done.append(name)
    if not done:
        raise ConfigError(f"activation checkpointing: no module path matches {modules}")
    return done


def _checkpointed_forward(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, **checkpoint_kwargs(), **kwargs)
