"""``copy.deepcopy`` and ``pickle`` / ``torch.save`` of a model with adapters attached.

An adapter set wires itself in with forward hooks whose functions close over the set that
registered them. ``copy.deepcopy`` copies modules but not functions, so a plain deep copy of
an adapted model would run the *original* model's adapters (editing the copy's adapter
weights would change nothing), and ``pickle`` refuses the hook functions outright.

While adapters are attached, :func:`install` gives the model *instance* a ``__deepcopy__``
and a ``__reduce_ex__`` (nothing of the class is patched; :func:`uninstall` takes them away):

- deep copy: the model is copied as usual, the copied hooks are removed from the copy, and
  every adapter set is attached afresh to the copy (same config, same name, same order), its
  parameters and buffers then taking the copied values (their dtype and device too) and
  every parameter its ``requires_grad``. The original is not touched.
- pickle: what is pickled is the model's copy without adapterkit (one deep copy, so for a
  moment twice the memory) plus the adapter configs and tensors; unpickling attaches the
  adapters again in the same way. For large models prefer :func:`adapterkit.save_adapters`
  (adapter-size files) and the base model's own checkpoint.

A model whose adapters are merged into the base weights is refused with one error
(unmerge first, or :func:`adapterkit.merge_and_unload` for a plain model).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from adapterkit.core.hf import _Bound  # fn bound to one model, stored on the instance
from adapterkit.errors import ConfigError

_ATTRS = ("__deepcopy__", "__reduce_ex__")


def install(model: nn.Module) -> None:
    d = model.__dict__
    if not isinstance(d.get("__deepcopy__"), _Bound):
        d["__deepcopy__"] = _Bound(_deepcopy, model)
        d["__reduce_ex__"] = _Bound(_reduce_ex, model)


def uninstall(model: nn.Module) -> None:
    d = model.__dict__
    for k in _ATTRS:
        if isinstance(d.get(k), _Bound):
            del d[k]


def _check_copyable(model: nn.Module, what: str) -> None:
    from adapterkit.core.base import get_container

    merged = [n for n, s in get_container(model).sets.items() if s.merged]
    if merged:
        raise ConfigError(f"{what} of a model whose adapter {merged} is merged into the base weights: call "
                          "adapterkit.unmerge_adapters(model) first, or adapterkit.merge_and_unload(model) "
                          "for a plain model without adapters")


def _stripped_copy(model: nn.Module, memo: dict) -> tuple[nn.Module, nn.Module]:
    """(the model's deep copy without adapterkit's container and hooks, the copied container)."""
    from adapterkit.core.base import CONTAINER

    d = model.__dict__
    saved = {k: d.pop(k) for k in _ATTRS if k in d}
    try:
        new = copy.deepcopy(model, memo)
    finally:
        d.update(saved)
    stale = new._modules.pop(CONTAINER)
    # the copied handles point at the copy's hook dicts: removing them unhooks the copy only
    for s in stale.sets.values():
        s.suspend_hooks()
    if stale.root_hook is not None:
        stale.root_hook.remove()
        stale.root_hook = None
    return new, stale


def _spec(model: nn.Module, stale: nn.Module) -> tuple:
    """What :func:`_rebuild` needs besides the stripped model: the adapter sets (name, config),
    the copied container's tensors and modes, every parameter's ``requires_grad``."""
    sets = [(name, s.config.to_dict()) for name, s in stale.sets.items()]
    params = {n: p.detach() for n, p in stale.named_parameters()}
    buffers = dict(stale.named_buffers())
    training = {n: m.training for n, m in stale.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return sets, params, buffers, training, grads, list(stale.base_trainable)


def _deepcopy(model: nn.Module, memo: dict) -> nn.Module:
    _check_copyable(model, "copy.deepcopy")
    new, stale = _stripped_copy(model, memo)
    return _rebuild(new, *_spec(model, stale))


def _reduce_ex(model: nn.Module, protocol: int):
    _check_copyable(model, "pickling")
    new, stale = _stripped_copy(model, {})
    return _rebuild, (new, *_spec(model, stale))


def _rebuild(model: nn.Module, sets: list, params: dict, buffers: dict, training: dict, grads: dict,
             base_trainable: list) -> nn.Module:
    """Attach the adapter sets to the stripped copy again (also what unpickling calls)."""
    from adapterkit.core.base import add_adapters, get_container

    for name, cfg in sets:
        add_adapters(model, cfg, name=name, train_head=False)
    container = get_container(model)
    got_p, got_b = dict(container.named_parameters()), dict(container.named_buffers())
    if got_p.keys() != params.keys() or got_b.keys() != buffers.keys():
        diff = sorted(set(got_p) ^ set(params) | set(got_b) ^ set(buffers))
        methods = [cfg.get("method") for _, cfg in sets]
        raise ConfigError(f"copying a model with adapters {methods}: attached again they hold other tensors than "
                          f"the original ({diff[:4]}); save_adapters / load_adapters are the way to copy these")
    with torch.no_grad():
        for n, p in got_p.items():
            p.data = params[n].data  # keeps the Parameter (hooks may hold it); takes dtype and device
        for n in got_b:
            owner, _, leaf = n.rpartition(".")
            container.get_submodule(owner)._buffers[leaf] = buffers[n]
    for n, m in container.named_modules():
        if n in training:
            m.training = training[n]
    for n, p in model.named_parameters():
        if n in grads:
            p.requires_grad_(grads[n])
    container.base_trainable = base_trainable
    return model
