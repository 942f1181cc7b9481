"""Hugging Face integration: an HF model with adapters attached saves, loads and reports as
adapters, with ``transformers.Trainer`` unchanged.

While :func:`~adapterkit.add_adapters` has adapters on a model, the model *instance* gets
(nothing of the class or of transformers is patched; :func:`~adapterkit.remove_adapters`
and :func:`~adapterkit.merge_and_unload` take it all away again):

- ``save_pretrained(dir, ...)`` (HF models): writes the adapters only, in adapterkit's
  folder format (``adapter_config.json`` + ``adapter_model.safetensors``: every adapter
  tensor plus the base modules the freeze policy trains: a new classification head,
  LayerNorms, biases), never the base weights and no ``config.json``. ``Trainer.save_model``
  and the Trainer's checkpoints call it, so they write adapter-size folders. The folder also
  holds ``model.safetensors``, a hard link to the same file (a copy where the filesystem has
  no hard links): that is the file the Trainer's ``load_best_model_at_end`` and
  ``resume_from_checkpoint`` read, with ``load_state_dict(strict=False)``, which restores
  exactly the adapter tensors. The instance's ``_keys_to_ignore_on_save`` lists the base
  keys that are not saved, so the Trainer takes them as intentionally absent (no
  missing-keys warning).
- ``print_trainable_parameters()``: PEFT's one line,
  ``trainable params: X || all params: Y || trainable%: Z``.
- ``merge_and_unload(task=None)``: :func:`adapterkit.merge_and_unload`.

Loading a saved folder back: :func:`adapterkit.load_adapters` into a fresh base model, or
:func:`from_pretrained` (a base model, its hub id / path, or the name recorded at save time,
then the adapters). ``AutoModel.from_pretrained(adapter_dir)`` does not work: transformers
reads an ``adapter_config.json`` as a PEFT adapter.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from adapterkit.errors import ConfigError

_SAVED_ATTRS = "_adapterkit_hf_saved"  # the instance's own values we replaced, restored on uninstall
_METHODS = ("save_pretrained", "print_trainable_parameters", "merge_and_unload")


class _Bound:
    """``fn`` bound to one model, stored on the instance (picklable, unlike a bound method
    whose function is not an attribute of the class)."""

    def __init__(self, fn, model: nn.Module):
        self.fn, self.model = fn, model

    def __call__(self, *args, **kwargs):
        return self.fn(self.model, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<adapterkit {self.fn.__name__} of {type(self.model).__name__}>"


def is_hf_model(model: nn.Module) -> bool:
    return callable(getattr(type(model), "save_pretrained", None)) and hasattr(model, "config")


def install(model: nn.Module) -> None:
    """Give ``model`` (with adapters attached) the instance methods above; idempotent."""
    d = model.__dict__
    if _SAVED_ATTRS not in d:
        saved = {k: d[k] for k in ("_keys_to_ignore_on_save",) if k in d}
        d[_SAVED_ATTRS] = saved
        d["print_trainable_parameters"] = _Bound(print_trainable_parameters, model)
        if not hasattr(type(model), "merge_and_unload"):
            from adapterkit.core.base import merge_and_unload

            d["merge_and_unload"] = _Bound(merge_and_unload, model)
        if is_hf_model(model):
            d["save_pretrained"] = _Bound(save_pretrained, model)
    sync_ignored_keys(model)


def uninstall(model: nn.Module) -> None:
    """Undo :func:`install` (the container is already gone)."""
    d = model.__dict__
    saved = d.pop(_SAVED_ATTRS, None)
    if saved is None:
        return
    for k in _METHODS:
        if isinstance(d.get(k), _Bound):
            del d[k]
    d.pop("_keys_to_ignore_on_save", None)
    d.update(saved)


def sync_ignored_keys(model: nn.Module) -> None:
    """``_keys_to_ignore_on_save`` = the state-dict keys ``save_pretrained`` leaves out (HF models)."""
    if _SAVED_ATTRS not in model.__dict__ or not is_hf_model(model):
        return
    from adapterkit.core.io import adapter_state_dict

    keep = adapter_state_dict(model)
    model.__dict__["_keys_to_ignore_on_save"] = {k for k in model.state_dict() if k not in keep}


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
                    state_dict: dict | None = None, push_to_hub: bool = False, **kwargs) -> None:
    """``model.save_pretrained`` while adapters are attached: the adapters only (see the module
    docstring). ``state_dict`` (what the Trainer passes after gathering a sharded model) supplies
    the tensors when given. The weights are always safetensors (``safe_serialization`` and the
    sharding options do not apply to adapter-size files)."""
    if push_to_hub:
        raise ConfigError("save_pretrained(push_to_hub=True) is not supported for a model with adapterkit adapters: "
                          "save the folder, then upload it with huggingface_hub.upload_folder")
    if not is_main_process:
        return
    from adapterkit.core.io import save_adapters

    save_adapters(model, save_directory, state_dict=state_dict, trainer_copy=True)
    sync_ignored_keys(model)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's summary line for ``model``: ``trainable params: X || all params: Y || trainable%: Z``
    (a tensor shared by several places or tasks counts once)."""
    from adapterkit.core.base import trainable_report

    r = trainable_report(model)
    print(f"trainable params: {r['trainable']:,d} || all params: {r['total']:,d} || trainable%: {r['percent']:.4f}")


def from_pretrained(base, adapter_dir: str | os.PathLike, *, model_class=None, **hf_kwargs) -> nn.Module:
    """A model with the adapters of ``adapter_dir`` (written by ``save_pretrained`` /
    ``Trainer.save_model`` / :func:`~adapterkit.save_adapters`) loaded.

    ``base``: a model instance (the adapters are loaded into it), an HF hub id or local path
    of the base model, or None for the base model name recorded when the folder was saved.
    A name is loaded with ``model_class.from_pretrained(base, **hf_kwargs)``; the class
    defaults to the one recorded at save time (e.g. ``BertForSequenceClassification``), and
    ``num_labels`` to the saved head's, so the head the adapters were trained with fits.
    """
    from adapterkit.core.io import load_adapters, read_adapter_config
    from adapterkit.errors import CheckpointError

    if isinstance(base, nn.Module):
        if hf_kwargs or model_class is not None:
            raise ConfigError("from_pretrained: model_class and loading options apply only when base is a name or path")
        return load_adapters(base, adapter_dir)
    info = read_adapter_config(adapter_dir).get("base_model", {})
    if base is None:
        base = info.get("name_or_path")
        if not base:
            raise ConfigError(f"{Path(adapter_dir)} does not record the base model's name (it was built from a "
                              "config, not loaded): pass the base model or its hub id / path")
    if not isinstance(base, (str, os.PathLike)):
        raise ConfigError(f"from_pretrained: base must be a model, a hub id / path or None, got {type(base).__name__}")
    if model_class is None:
        import transformers

        name = info.get("class")
        model_class = getattr(transformers, name, None) if isinstance(name, str) else None
        if model_class is None or not hasattr(model_class, "from_pretrained"):
            raise CheckpointError(f"{Path(adapter_dir)} records base class {name!r}, which transformers does not "
                                  "have: pass model_class=")
    if isinstance(info.get("num_labels"), int) and "num_labels" not in hf_kwargs and "config" not in hf_kwargs:
        hf_kwargs["num_labels"] = info["num_labels"]
    model = model_class.from_pretrained(base, **hf_kwargs)
    return load_adapters(model, adapter_dir)


# --- the LM head reads a contiguous input ---------------------------------------------------
_HEAD_HOOKED = "_adapterkit_contiguous_head"


def _contiguous_input(module, args):
    x = args[0] if args else None
    if x is not None and x.dim() > 2 and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def contiguous_lm_heads(model: nn.Module) -> int:
    """Make every HF output head (``get_output_embeddings()``, a Linear) in ``model`` read a
    contiguous input; returns how many heads it hooked (already hooked ones are skipped).

    HF causal LMs slice the last position before the head (``hidden[:, -1:, :]`` under
    ``logits_to_keep=1``, every prefill of ``generate``). On the CPU, torch 2.13 runs
    ``linear`` on such a strided 3-D input as a batched matmul over the weight expanded per
    row and copied: measured with one thread for a (32, 1, 576) slice of a (32, 13, 576)
    tensor against SmolLM2's 49,252 x 576 head, 271 ms against 36 ms for the same input made
    contiguous in fp32, and 5.6 s against 14 ms in bf16. The copy made here is one row per
    example; the head's output is unchanged."""
    n = 0
    for m in model.modules():
        get = getattr(m, "get_output_embeddings", None)
        if not callable(get) or not hasattr(m, "config"):
            continue
        try:
            head = get()
        except (AttributeError, NotImplementedError):
            continue
        if isinstance(head, nn.Linear) and not getattr(head, _HEAD_HOOKED, False):
            head.register_forward_pre_hook(_contiguous_input)
            setattr(head, _HEAD_HOOKED, True)
            n += 1
    return n


def remove_contiguous_lm_heads(model: nn.Module) -> None:
    """Undo :func:`contiguous_lm_heads` (``merge_and_unload`` / ``remove_adapters`` leave no hook)."""
    for m in model.modules():
        if getattr(m, _HEAD_HOOKED, False):
            for k in [k for k, f in m._forward_pre_hooks.items() if f is _contiguous_input]:
                del m._forward_pre_hooks[k]
            delattr(m, _HEAD_HOOKED)
