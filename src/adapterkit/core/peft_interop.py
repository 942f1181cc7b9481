"""Interop with HF PEFT: LoRA and prompt tuning in PEFT's own files and key names.

``export_peft(model, dir)`` writes ``adapter_config.json`` + ``adapter_model.safetensors``
that ``peft.PeftModel.from_pretrained(base, dir)`` loads unchanged; ``import_peft``
reads such a directory into adapterkit modules. Per-task LoRAs/prompts export one PEFT
adapter per task into ``dir/<task>/`` (PEFT's multi-adapter layout). The MLP
reparameterisation of prompts is folded in (PEFT stores the final prompt vectors).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from adapterkit.core.base import add_adapters, get_container
from adapterkit.errors import CheckpointError, ConfigError
from adapterkit.safeio import atomic_write_json, load_weights, save_safetensors_atomic

PREFIX = "base_model.model."


def _sets(model, kind):
    container = get_container(model)
    if container is None:
        raise ConfigError("the model has no adapters attached")
    found = [(n, s) for n, s in container.sets.items() if s.config.method == kind]
    return container, found


def export_peft(model: nn.Module, directory: str | os.PathLike) -> list[Path]:
    """Export the LoRA or prompt-tuning adapter of ``model`` in HF PEFT's format."""
    container = get_container(model)
    if container is None:
        raise ConfigError("the model has no adapters attached")
    methods = {s.config.method for s in container.sets.values()}
    unsupported = methods - {"lora", "prompt"}
    if unsupported or len(container.sets) != 1:
        raise ConfigError(
            f"export_peft supports exactly one LoRA or prompt-tuning adapter; this model has {sorted(methods)}"
        )
    (name, s), = container.sets.items()
    directory = Path(directory)
    per_task = s.per_task
    tasks = list(s.config.tasks) if per_task else [None]
    out = []
    for i, task in enumerate(tasks):
        d = directory / task if task is not None else directory
        if s.config.method == "lora":
            out.append(_export_lora(model, s, i if per_task else None, d))
        else:
            out.append(_export_prompt(model, s, i if per_task else None, d))
    return out


def _export_lora(model, s, task, d: Path) -> Path:
    cfg = s.config
    tensors, fan = {}, set()
    for key, layer in s.layers.items():
        path = key.replace("__", ".")
        a = layer.A.weight[0 if layer.A.n == 1 else task]
        b = layer.B.weight[0 if layer.B.n == 1 else task]
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.detach()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.detach()
        fan.add(layer.fan_in_fan_out)
    peft_cfg = {
        "peft_type": "LORA",
        "task_type": None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(k.replace("__", ".") for k in s.layers),
        "fan_in_fan_out": any(fan),
        "use_rslora": cfg.use_rslora,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    }
    save_safetensors_atomic(tensors, d / "adapter_model.safetensors")
    atomic_write_json(d / "adapter_config.json", peft_cfg)
    return d


def _export_prompt(model, s, task, d: Path) -> Path:
    table = s.table().detach()
    emb = table[0 if task is None else task]
    mcfg = getattr(model, "config", None)
    enc_dec = bool(getattr(mcfg, "is_encoder_decoder", False))
    peft_cfg = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "SEQ_2_SEQ_LM" if enc_dec else "CAUSAL_LM",
        "num_virtual_tokens": s.config.num_tokens,
        "token_dim": int(emb.shape[-1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(mcfg, "num_attention_heads", None),
        "num_layers": getattr(mcfg, "num_hidden_layers", None),
        "prompt_tuning_init": "RANDOM",
        "inference_mode": True,
        "base_model_name_or_path": getattr(mcfg, "_name_or_path", None) or None,
    }
    save_safetensors_atomic({"prompt_embeddings": emb.contiguous()}, d / "adapter_model.safetensors")
    atomic_write_json(d / "adapter_config.json", peft_cfg)
    return d


def import_peft(model: nn.Module, directory: str | os.PathLike, name: str | None = None, **overrides) -> nn.Module:
    """Load a HF PEFT LoRA or prompt-tuning adapter directory into ``model``."""
    directory = Path(directory)
    cpath = directory / "adapter_config.json"
    if not cpath.exists():
        raise CheckpointError(f"no adapter_config.json in {directory}")
    try:
        pcfg = json.loads(cpath.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cpath} is not valid JSON: {e}") from None
    ptype = pcfg.get("peft_type")
    wfile = directory / "adapter_model.safetensors"
    if not wfile.exists() and (directory / "adapter_model.bin").exists():
        wfile = directory / "adapter_model.bin"
    tensors = load_weights(wfile)
    if ptype == "LORA":
        return _import_lora(model, pcfg, tensors, wfile, name, overrides)
    if ptype == "PROMPT_TUNING":
        return _import_prompt(model, pcfg, tensors, wfile, name, overrides)
    raise CheckpointError(f"{cpath}: PEFT type {ptype!r} is not supported (LORA and PROMPT_TUNING are)")


def _strip(key: str) -> str:
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    return key.replace(".default.", ".")  # in-memory PEFT state dicts carry the adapter name


def _import_lora(model, pcfg, tensors, wfile, name, overrides):
    if pcfg.get("use_dora"):
        raise CheckpointError(f"{wfile}: DoRA adapters are not supported")
    if pcfg.get("rank_pattern") or pcfg.get("alpha_pattern"):
        raise CheckpointError(f"{wfile}: per-module rank/alpha patterns are not supported")
    paths = sorted({_strip(k).rsplit(".lora_", 1)[0] for k in tensors if ".lora_A." in k})
    if not paths:
        raise CheckpointError(f"{wfile} holds no lora_A weights")
    cfg = {
        "method": "lora", "r": int(pcfg["r"]), "alpha": float(pcfg.get("lora_alpha", 8)),
        "dropout": float(pcfg.get("lora_dropout", 0.0)), "use_rslora": bool(pcfg.get("use_rslora", False)),
        "target_modules": ["^" + p.replace(".", r"\.") + "$" for p in paths],
    }
    cfg.update(overrides)
    add_adapters(model, cfg, name=name)
    container = get_container(model)
    s = container.sets[name or "lora"]
    with torch.no_grad():
        for key, layer in s.layers.items():
            path = key.replace("__", ".")
            for part, mod in (("A", layer.A), ("B", layer.B)):
                k = next((k for k in tensors if _strip(k) == f"{path}.lora_{part}.weight"), None)
                if k is None:
                    raise CheckpointError(f"{wfile} is missing key {PREFIX}{path}.lora_{part}.weight")
                t = tensors[k]
                if tuple(t.shape) != tuple(mod.weight.shape[1:]):
                    raise CheckpointError(f"shape mismatch for {k!r}: file has {tuple(t.shape)}, model needs {tuple(mod.weight.shape[1:])}")
                mod.weight.copy_(t.to(mod.weight.dtype).unsqueeze(0).expand_as(mod.weight))
    return model


def _import_prompt(model, pcfg, tensors, wfile, name, overrides):
    if "prompt_embeddings" not in tensors:
        raise CheckpointError(f"{wfile} is missing key 'prompt_embeddings'")
    emb = tensors["prompt_embeddings"]
    n = int(pcfg.get("num_virtual_tokens", emb.shape[0]))
    if pcfg.get("num_transformer_submodules", 1) not in (1, None):
        raise CheckpointError(f"{wfile}: prompts for {pcfg['num_transformer_submodules']} submodules (encoder and decoder) are not supported")
    cfg = {"method": "prompt", "num_tokens": n}
    cfg.update(overrides)
    add_adapters(model, cfg, name=name)
    s = get_container(model).sets[name or "prompt"]
    if tuple(emb.shape) != tuple(s.embedding.shape[1:]):
        raise CheckpointError(f"shape mismatch for 'prompt_embeddings': file has {tuple(emb.shape)}, model needs {tuple(s.embedding.shape[1:])}")
    with torch.no_grad():
        s.embedding.copy_(emb.to(s.embedding.dtype).unsqueeze(0).expand_as(s.embedding))
    return model
