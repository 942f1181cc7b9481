"""Interop with HF PEFT: LoRA, (IA)^3, prompt and prefix tuning in PEFT's own files and key names,
lossless both ways.

``export_peft(model, dir)`` writes ``adapter_config.json`` + ``adapter_model.safetensors``
that ``peft.PeftModel.from_pretrained(base, dir)`` loads unchanged; ``import_peft``
reads such a directory into adapterkit modules. Per-task LoRAs/prompts export one PEFT
adapter per task into ``dir/<task>/`` (PEFT's multi-adapter layout). The MLP
reparameterisation of prompts is folded in (PEFT stores the final prompt vectors).

What travels besides the adapter itself (both ways):

- Biases. adapterkit's ``train_biases`` is PEFT's ``bias="all"`` (every bias of the model);
  PEFT's ``bias="lora_only"`` (the biases of the LoRA-wrapped layers) becomes
  ``trainable_modules`` naming exactly those biases, and is written back as ``lora_only``.
- Other trained base modules (``trainable_modules``: a classifier head, LayerNorms with
  ``train_layernorms``...) are PEFT's ``modules_to_save`` (each module by its full path).
- PEFT's ``lora_bias=True`` (a bias on ``lora_B``) adds ``scaling * b`` to the layer's output,
  which is what the layer's own bias does: it is folded into that bias, which becomes a trained
  tensor of the adapter (written back as ``bias="lora_only"``; same function). Like every base tensor
  a file holds (biases, heads), it is written into the model's own parameter: ``remove_adapters``
  does not restore the old value.
- With ``bias="all"`` PEFT also writes a ``modules_to_save`` module's bias twice more
  (``<m>.modules_to_save.bias``, the same value, and ``<m>.original_module.bias``, the untouched
  base value its forward does not read); the trained value is loaded, the untouched copy is not.
- PEFT's seq2seq prompt-tuning layout (``num_transformer_submodules=2``: 2 x V rows) loads: PEFT's
  forward for ``PROMPT_TUNING`` prepends only rows ``0..V-1`` (to the encoder input) and never
  reads the second V rows, so those are the prompt; the unread rows are not kept.

Every tensor of a PEFT file is either loaded or named in a :class:`CheckpointError`; every
config field adapterkit cannot represent is named in one :class:`ConfigError`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from adapterkit.core.base import CONTAINER, add_adapters, get_container
from adapterkit.errors import CheckpointError, ConfigError
from adapterkit.safeio import atomic_write_json, load_weights, save_safetensors_atomic

PREFIX = "base_model.model."        # LoRA (tuner) files
PROMPT_PREFIX = "base_model."       # prompt-learning files (the base model is wrapped directly)

# Fields that describe the file or where it came from, or only the initialisation of weights
# the file already holds: nothing to represent.
_INFO = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
         "inference_mode"}
# LoRA: targets come from the tensors themselves (target_modules, exclude_modules, layers_*),
# fan_in_fan_out from the layer type (Conv1D), init_* / loftq / eva / corda only initialise.
_LORA_INFO = {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out",
              "init_lora_weights", "loftq_config", "eva_config", "corda_config", "megatron_core", "runtime_config",
              "qalora_group_size"}
_LORA_USED = {"r", "lora_alpha", "lora_dropout", "use_rslora", "bias", "modules_to_save", "lora_bias"}
_PROMPT_INFO = {"num_attention_heads", "num_layers", "prompt_tuning_init", "prompt_tuning_init_text",
                "tokenizer_name_or_path", "tokenizer_kwargs"}
_PROMPT_USED = {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "modules_to_save"}
_IA3_INFO = {"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out",
             "init_ia3_weights"}
_IA3_USED = {"feedforward_modules", "modules_to_save"}
# prefix: PEFT stores the final table (the projection MLP, if any, is materialised on save)
_PREFIX_INFO = {"num_attention_heads", "num_layers", "encoder_hidden_size", "prefix_projection", "init_weights"}
_PREFIX_USED = {"num_virtual_tokens", "token_dim", "num_transformer_submodules", "modules_to_save"}
_WHY = {
    "use_dora": "DoRA's magnitude vector has no adapterkit counterpart",
    "rank_pattern": "one adapter has one rank in adapterkit",
    "alpha_pattern": "one adapter has one alpha in adapterkit",
    "layer_replication": "adapterkit never duplicates base layers",
    "trainable_token_indices": "trainable token rows are not an adapterkit method",
    "target_parameters": "adapterkit's LoRA wraps modules, not bare parameters",
    "use_qalora": "QA-LoRA's pooled input is not adapterkit's LoRA",
    "alora_invocation_tokens": "activated LoRA (token-dependent activation) is not adapterkit's LoRA",
    "megatron_config": "Megatron parallel layers are not supported",
    "ensure_weight_tying": "tied modules_to_save copies are not supported",
}


def _off(v) -> bool:
    return v is None or v is False or v == {} or v == [] or v == ""


def _check_fields(pcfg: dict, used: set, info: set, where: Path) -> None:
    """One ConfigError naming every field whose value adapterkit cannot represent."""
    bad = []
    for k, v in pcfg.items():
        if k in used or k in info or k in _INFO or _off(v):
            continue
        bad.append(f'"{k}" = {json.dumps(v)} ({_WHY.get(k, "adapterkit has no counterpart")})')
    if pcfg.get("peft_type") == "LORA":
        if pcfg.get("bias", "none") not in ("none", "all", "lora_only"):
            bad.append(f'"bias" = {json.dumps(pcfg["bias"])} (PEFT knows "none", "all" and "lora_only")')
    if bad:
        raise ConfigError(f"{where}: PEFT config field(s) adapterkit cannot represent: " + "; ".join(bad))


# ----------------------------------------------------------------------------- export


def export_peft(model: nn.Module, directory: str | os.PathLike) -> list[Path]:
    """Export the LoRA or prompt-tuning adapter of ``model`` in HF PEFT's format, with the base
    tensors the freeze policy trains (biases, ``trainable_modules``, LayerNorms, heads)."""
    container = get_container(model)
    if container is None:
        raise ConfigError("the model has no adapters attached")
    methods = {s.config.method for s in container.sets.values()}
    unsupported = methods - {"lora", "prompt", "ia3", "prefix"}
    if unsupported or len(container.sets) != 1:
        raise ConfigError(
            "export_peft supports exactly one LoRA, (IA)^3, prompt- or prefix-tuning adapter; this model has "
            f"{sorted(methods)}"
        )
    (name, s), = container.sets.items()
    if s.merged:
        raise ConfigError("unmerge the adapters before exporting (adapterkit.unmerge_adapters(model))")
    directory = Path(directory)
    per_task = s.per_task
    tasks = list(s.config.tasks) if per_task else [None]
    out = []
    for i, task in enumerate(tasks):
        d = directory / task if task is not None else directory
        write = {"lora": _export_lora, "ia3": _export_ia3, "prompt": _export_prompt, "prefix": _export_prefix}
        out.append(write[s.config.method](model, s, i if per_task else None, d))
    return out


def _trained_base(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base parameters the freeze policy trains, by name."""
    container = get_container(model)
    names = set(container.base_trainable)
    return {n: p.detach() for n, p in model.named_parameters() if n in names}


def _base_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _write_peft(d: Path, tensors: dict, peft_cfg: dict) -> Path:
    """adapter_model.safetensors + adapter_config.json, each written atomically."""
    save_safetensors_atomic(tensors, d / "adapter_model.safetensors")
    atomic_write_json(d / "adapter_config.json", peft_cfg)
    return d


def _base_extras(model: nn.Module, lora_paths: set[str], prefix: str, has_bias_mode: bool = True):
    """(bias mode, modules_to_save, tensors) for the trained base parameters.

    ``train_biases`` -> ``bias="all"``; trained biases exactly of the LoRA layers -> ``"lora_only"``;
    everything else trained (LayerNorms, heads, single biases) -> the owning module in ``modules_to_save``
    (PEFT then saves and trains that whole module: a superset, with the same values).
    """
    trained = _trained_base(model)
    train_biases = any(c.config.train_biases for c in get_container(model).sets.values())
    biases = {n for n in trained if n.rpartition(".")[2] == "bias"}
    lora_biases = {f"{p}.bias" for p in lora_paths}
    if not has_bias_mode:  # prompt tuning: PEFT has no bias option there
        bias_mode, in_bias = "none", set()
    elif train_biases:
        bias_mode, in_bias = "all", biases
    elif lora_paths and biases and biases <= lora_biases:
        bias_mode, in_bias = "lora_only", biases
    else:
        bias_mode, in_bias = "none", set()
    modules = sorted({n.rpartition(".")[0] for n in trained if n not in in_bias})
    clash = sorted(set(modules) & lora_paths)
    if clash:
        raise ConfigError(f"cannot export to PEFT: {clash[0]} is both a LoRA target and a trained base module "
                          "(PEFT's modules_to_save cannot wrap a LoRA layer)")
    params = dict(model.named_parameters())
    tensors = {}
    for n in sorted(in_bias):
        path, _, leaf = n.rpartition(".")
        key = f"{path}.base_layer.{leaf}" if path in lora_paths else n
        tensors[prefix + key] = trained[n]
    for m in modules:  # PEFT saves the whole module of a modules_to_save entry
        for n, p in params.items():
            if n.startswith(m + ".") and "." not in n[len(m) + 1:] and not n.startswith(CONTAINER + "."):
                tensors.setdefault(prefix + n, p.detach())
    return bias_mode, (modules or None), tensors


def _export_lora(model, s, task, d: Path) -> Path:
    cfg = s.config
    tensors, fan = {}, set()
    paths = set()
    for key, layer in s.layers.items():
        path = key.replace("__", ".")
        paths.add(path)
        a = layer.A.weight[0 if layer.A.n == 1 else task]
        b = layer.B.weight[0 if layer.B.n == 1 else task]
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.detach()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.detach()
        fan.add(layer.fan_in_fan_out)
    bias_mode, modules_to_save, extra = _base_extras(model, paths, PREFIX)
    tensors.update(extra)
    peft_cfg = {
        "peft_type": "LORA",
        "task_type": None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(paths),
        "fan_in_fan_out": any(fan),
        "use_rslora": cfg.use_rslora,
        "bias": bias_mode,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": modules_to_save,
        "base_model_name_or_path": _base_name(model),
    }
    return _write_peft(d, tensors, peft_cfg)


def _export_ia3(model, s, task, d: Path) -> Path:
    tensors, ff, fan, paths = {}, [], set(), set()
    for key, (_, input_side, transposed) in s._targets.items():
        path = key.replace("__", ".")
        paths.add(path)
        v = s.vectors[key][0 if s.vectors[key].shape[0] == 1 else task].detach()
        tensors[f"{PREFIX}{path}.ia3_l"] = v.view(1, -1) if input_side else v.view(-1, 1)  # PEFT's shapes
        if input_side:
            ff.append(path)
        fan.add(transposed)
    _, modules_to_save, extra = _base_extras(model, paths, PREFIX, has_bias_mode=False)
    tensors.update(extra)
    peft_cfg = {
        "peft_type": "IA3", "task_type": None, "target_modules": sorted(paths), "feedforward_modules": sorted(ff),
        "fan_in_fan_out": any(fan), "init_ia3_weights": True, "inference_mode": True,
        "modules_to_save": modules_to_save,
        "base_model_name_or_path": _base_name(model),
    }
    return _write_peft(d, tensors, peft_cfg)


def _export_prefix(model, s, task, d: Path) -> Path:
    if s.config.style != "peft":
        raise ConfigError('export_peft writes PEFT-style prefixes (style "peft"); this prefix set is '
                          f'style "{s.config.style}" (per-location prefixes inside attention), which PEFT cannot hold')
    table = s.tables["peft"]().detach()
    emb = table[0 if table.shape[0] == 1 else task]
    mcfg = getattr(model, "config", None)
    _, modules_to_save, extra = _base_extras(model, set(), PROMPT_PREFIX, has_bias_mode=False)
    peft_cfg = {
        "peft_type": "PREFIX_TUNING", "task_type": _task_type(model, s.enc_dec),
        "num_virtual_tokens": s.config.num_tokens, "token_dim": s.heads * s.hd,
        "num_transformer_submodules": 2 if s.enc_dec else 1, "num_attention_heads": s.heads,
        "num_layers": s.n_layers, "encoder_hidden_size": s.heads * s.hd, "prefix_projection": False,
        "inference_mode": True, "modules_to_save": modules_to_save,
        "base_model_name_or_path": getattr(mcfg, "_name_or_path", None) or None,
    }
    tensors = {"prompt_embeddings": emb.contiguous()}  # PEFT's key for every prompt-learning table
    tensors.update(extra)
    return _write_peft(d, tensors, peft_cfg)


def _task_type(model: nn.Module, enc_dec: bool) -> str:
    """PEFT's task type for a prompt-tuned model (it picks PEFT's model class, hence the forward)."""
    cls = type(model).__name__
    for part, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                       ("ForQuestionAnswering", "QUESTION_ANS")):
        if part in cls:
            return task
    if enc_dec:
        return "SEQ_2_SEQ_LM"
    if "CausalLM" in cls or "LMHead" in cls:
        return "CAUSAL_LM"
    return "FEATURE_EXTRACTION"


def _export_prompt(model, s, task, d: Path) -> Path:
    placement = getattr(s.config, "placement", "inputs_embeds")
    if placement != "inputs_embeds" or s.config.inject != "input":
        raise ConfigError(f'export_peft: PEFT prepends prompts to the input embeddings; this prompt set is placed '
                          f'"{placement}" (inject "{s.config.inject}"), a different function PEFT cannot hold')
    table = s.table().detach()
    emb = table[0 if task is None else task]
    mcfg = getattr(model, "config", None)
    enc_dec = bool(getattr(mcfg, "is_encoder_decoder", False))
    _, modules_to_save, extra = _base_extras(model, set(), PROMPT_PREFIX, has_bias_mode=False)
    peft_cfg = {
        "peft_type": "PROMPT_TUNING",
        "task_type": _task_type(model, enc_dec),
        "num_virtual_tokens": s.config.num_tokens,
        "token_dim": int(emb.shape[-1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(mcfg, "num_attention_heads", None),
        "num_layers": getattr(mcfg, "num_hidden_layers", None),
        "prompt_tuning_init": "RANDOM",
        "inference_mode": True,
        "modules_to_save": modules_to_save,
        "base_model_name_or_path": getattr(mcfg, "_name_or_path", None) or None,
    }
    tensors = {"prompt_embeddings": emb.contiguous()}
    tensors.update(extra)
    return _write_peft(d, tensors, peft_cfg)


# ----------------------------------------------------------------------------- import


def import_peft(model: nn.Module, directory: str | os.PathLike, name: str | None = None, **overrides) -> nn.Module:
    """Load a HF PEFT LoRA or prompt-tuning adapter directory into ``model``, with its trained
    biases and ``modules_to_save`` tensors (heads...) loaded into the model's own modules."""
    directory = Path(directory)
    cpath = directory / "adapter_config.json"
    if not cpath.exists():
        raise CheckpointError(f"no adapter_config.json in {directory}")
    from adapterkit.core.io import read_json_object

    pcfg = read_json_object(cpath)
    ptype = pcfg.get("peft_type")
    if ptype not in ("LORA", "PROMPT_TUNING", "IA3", "PREFIX_TUNING"):
        raise CheckpointError(f"{cpath}: PEFT type {ptype!r} is not supported (LORA, IA3, PROMPT_TUNING and "
                              "PREFIX_TUNING are)")
    wfile = directory / "adapter_model.safetensors"
    if not wfile.exists() and (directory / "adapter_model.bin").exists():
        wfile = directory / "adapter_model.bin"
    tensors = load_weights(wfile)
    if ptype == "LORA":
        _check_fields(pcfg, _LORA_USED, _LORA_INFO, cpath)
        return _import_lora(model, pcfg, tensors, wfile, name, overrides)
    if ptype == "IA3":
        _check_fields(pcfg, _IA3_USED, _IA3_INFO, cpath)
        return _import_ia3(model, pcfg, tensors, wfile, name, overrides)
    if ptype == "PREFIX_TUNING":
        _check_fields(pcfg, _PREFIX_USED, _PREFIX_INFO, cpath)
        return _import_prefix(model, pcfg, tensors, wfile, name, overrides)
    _check_fields(pcfg, _PROMPT_USED, _PROMPT_INFO, cpath)
    return _import_prompt(model, pcfg, tensors, wfile, name, overrides)


def _strip(key: str, prefix: str = PREFIX) -> str:
    key = key[len(prefix):] if key.startswith(prefix) else key
    key = key.replace(".default.", ".")  # in-memory PEFT state dicts carry the adapter name
    # with bias="all", PEFT also writes a modules_to_save module's bias as "<m>.modules_to_save.bias"
    return key.replace(".modules_to_save.", ".").replace(".base_layer.", ".")


def _rx(path: str) -> str:
    return "^" + re.escape(path) + "$"


def _modules_to_save(model: nn.Module, names) -> list[str]:
    """Module paths PEFT's ``modules_to_save`` names select (its rule: the path ends with the name)."""
    if not names:
        return []
    if isinstance(names, str):
        names = [names]
    return [p for p, _ in model.named_modules() if p and not p.startswith(CONTAINER)
            and any(p.endswith(n) for n in names)]


def _base_tensors(model, tensors: dict, prefix: str, wfile) -> dict[str, torch.Tensor]:
    """The file's tensors that belong to base parameters, by parameter name; any other key is an error."""
    params = dict(model.named_parameters())
    tied = {n: p for n, p in model.named_parameters(remove_duplicate=False) if n not in params}
    out = {}
    for k, t in tensors.items():
        if _strip(k, prefix) in tied:
            raise ConfigError(f'{wfile}: "modules_to_save" holds {_strip(k, prefix)!r}, which {type(model).__name__} '
                              "ties to another parameter; PEFT trains an untied copy, adapterkit cannot represent it")
        if ".original_module." in k:
            continue  # PEFT's untouched copy of a modules_to_save module (bias="all" saves its bias): not read
        n = _strip(k, prefix)
        if n in out and not torch.equal(out[n], t):
            raise CheckpointError(f"{wfile} holds two different values for {n!r}")
        if n not in params or n.startswith(CONTAINER + "."):
            raise CheckpointError(f"{wfile} has key {k!r}, which matches no parameter of {type(model).__name__}")
        if tuple(t.shape) != tuple(params[n].shape):
            raise CheckpointError(f"shape mismatch for {k!r}: file has {tuple(t.shape)}, model has "
                                  f"{tuple(params[n].shape)}")
        out[n] = t
    return out


def _freeze_extras(model, base: dict, bias_mode: str, lora_paths: list[str], modules: list[str]) -> dict:
    """Freeze-policy options that make exactly the file's base tensors trained."""
    extra: dict = {}
    rx = []
    if bias_mode == "all":
        extra["train_biases"] = True
    elif bias_mode == "lora_only":
        rx += [_rx(f"{p}.bias") for p in lora_paths if f"{p}.bias" in dict(model.named_parameters())]
    rx += ["^" + re.escape(m) + r"\." for m in modules]
    covered = [re.compile(r) for r in rx]
    for n in base:  # a tensor outside what the file's config trains (e.g. a hand-made file): train it too
        if not (bias_mode == "all" and n.rpartition(".")[2] == "bias") and not any(r.search(n) for r in covered):
            rx.append(_rx(n))
    if rx:
        extra["trainable_modules"] = rx
    return extra


def _load_base(model, base: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in base.items():
            params[n].copy_(t.to(params[n].dtype))


def _import_lora(model, pcfg, tensors, wfile, name, overrides):
    adapter = {k: v for k, v in tensors.items() if ".lora_A." in k or ".lora_B." in k}
    paths = sorted({_strip(k).rsplit(".lora_", 1)[0] for k in adapter if ".lora_A." in k})
    if not paths:
        raise CheckpointError(f"{wfile} holds no lora_A weights")
    bias_mode = pcfg.get("bias") or "none"
    lora_bias = {_strip(k).rsplit(".lora_B.", 1)[0]: v for k, v in adapter.items() if k.endswith(".lora_B.bias")}
    if lora_bias and not pcfg.get("lora_bias"):
        raise CheckpointError(f"{wfile} has lora_B.bias tensors but its config says lora_bias is false")
    modules = _modules_to_save(model, pcfg.get("modules_to_save"))
    base = _base_tensors(model, {k: v for k, v in tensors.items() if k not in adapter}, PREFIX, wfile)
    mods = dict(model.named_modules())
    for p in lora_bias:
        if p not in mods or getattr(mods[p], "bias", None) is None:
            raise ConfigError(f'{wfile}: "lora_bias" on {p}, which has no bias of its own to fold it into')
    fold = sorted(lora_bias)
    extras = _freeze_extras(model, base, bias_mode, paths, modules)
    if fold:
        extras.setdefault("trainable_modules", [])
        extras["trainable_modules"] += [_rx(f"{p}.bias") for p in fold if _rx(f"{p}.bias") not in
                                        extras["trainable_modules"]]
    cfg = {
        "method": "lora", "r": int(pcfg["r"]), "alpha": float(pcfg.get("lora_alpha", 8)),
        "dropout": float(pcfg.get("lora_dropout", 0.0)), "use_rslora": bool(pcfg.get("use_rslora", False)),
        "target_modules": [_rx(p) for p in paths], **extras,
    }
    cfg.update(overrides)
    add_adapters(model, cfg, name=name)
    s = get_container(model).sets[name or "lora"]
    with torch.no_grad():
        for key, layer in s.layers.items():
            path = key.replace("__", ".")
            for part, mod in (("A", layer.A), ("B", layer.B)):
                k = next((k for k in adapter if _strip(k) == f"{path}.lora_{part}.weight"), None)
                if k is None:
                    raise CheckpointError(f"{wfile} is missing key {PREFIX}{path}.lora_{part}.weight")
                t = adapter[k]
                if tuple(t.shape) != tuple(mod.weight.shape[1:]):
                    raise CheckpointError(f"shape mismatch for {k!r}: file has {tuple(t.shape)}, model needs "
                                          f"{tuple(mod.weight.shape[1:])}")
                mod.weight.copy_(t.to(mod.weight.dtype).unsqueeze(0).expand_as(mod.weight))
        _load_base(model, base)
        for p in fold:  # out += scaling * b: the layer's own bias does exactly that
            bias = mods[p].bias
            bias.add_(lora_bias[p].to(bias.dtype) * s.layers[p.replace(".", "__")].scaling)
    return model


def _import_prompt(model, pcfg, tensors, wfile, name, overrides):
    if "prompt_embeddings" not in tensors:
        raise CheckpointError(f"{wfile} is missing key 'prompt_embeddings'")
    emb = tensors["prompt_embeddings"]
    n = int(pcfg.get("num_virtual_tokens") or emb.shape[0])
    subs = pcfg.get("num_transformer_submodules") or 1
    enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if subs not in (1, 2) or (subs == 2 and not enc_dec):
        raise ConfigError(f'{wfile}: "num_transformer_submodules" = {subs} needs an encoder-decoder model '
                          f"(this is {type(model).__name__})" if subs == 2 else
                          f'{wfile}: "num_transformer_submodules" = {subs} is not a PEFT layout')
    if emb.dim() != 2 or emb.shape[0] != n * subs:
        raise CheckpointError(f"{wfile}: prompt_embeddings has shape {tuple(emb.shape)}, the config says "
                              f"{n} tokens x {subs} submodule(s)")
    emb = emb[:n]  # PEFT's PROMPT_TUNING forward prepends rows 0..n-1 to the encoder and reads no others
    modules = _modules_to_save(model, pcfg.get("modules_to_save"))
    base = _base_tensors(model, {k: v for k, v in tensors.items() if k != "prompt_embeddings"}, PROMPT_PREFIX, wfile)
    cfg = {"method": "prompt", "num_tokens": n, **_freeze_extras(model, base, "none", [], modules)}
    cfg.update(overrides)
    add_adapters(model, cfg, name=name)
    s = get_container(model).sets[name or "prompt"]
    if tuple(emb.shape) != tuple(s.embedding.shape[1:]):
        raise CheckpointError(f"shape mismatch for 'prompt_embeddings': file has {tuple(emb.shape)}, model needs "
                              f"{tuple(s.embedding.shape[1:])}")
    with torch.no_grad():
        s.embedding.copy_(emb.to(s.embedding.dtype).unsqueeze(0).expand_as(s.embedding))
        _load_base(model, base)
    return model


def _import_ia3(model, pcfg, tensors, wfile, name, overrides):
    vecs = {_strip(k).rsplit(".ia3_l", 1)[0]: v for k, v in tensors.items() if k.endswith(".ia3_l")}
    if not vecs:
        raise CheckpointError(f"{wfile} holds no ia3_l vectors")
    ff_spec = pcfg.get("feedforward_modules") or []
    if isinstance(ff_spec, str):  # PEFT: a string is a regex over the whole module path
        ff = [p for p in vecs if re.fullmatch(ff_spec, p)]
    else:
        ff = [p for p in vecs if any(p == f or p.endswith(f) for f in ff_spec)]
    for p, v in vecs.items():  # PEFT's shapes: (1, in) input-scaled, (out, 1) output-scaled
        if v.dim() != 2 or (v.shape[0] != 1 if p in ff else v.shape[1] != 1):
            raise CheckpointError(f"{wfile}: ia3_l of {p} has shape {tuple(v.shape)}, which does not match its "
                                  f"{'feed-forward (input)' if p in ff else 'output'} scaling")
    modules = _modules_to_save(model, pcfg.get("modules_to_save"))
    base = _base_tensors(model, {k: v for k, v in tensors.items() if not k.endswith(".ia3_l")}, PREFIX, wfile)
    paths = sorted(vecs)
    cfg = {"method": "ia3", "variant": "peft", "target_modules": [_rx(p) for p in paths],
           "feedforward_modules": [_rx(p) for p in sorted(ff)], **_freeze_extras(model, base, "none", [], modules)}
    cfg.update(overrides)
    add_adapters(model, cfg, name=name)
    s = get_container(model).sets[name or "ia3"]
    with torch.no_grad():
        for p, v in vecs.items():
            dst = s.vectors[p.replace(".", "__")]
            if v.numel() != dst.shape[1]:
                raise CheckpointError(f"shape mismatch for {p}.ia3_l: file has {tuple(v.shape)}, model needs "
                                      f"{dst.shape[1]} values")
            dst.copy_(v.reshape(1, -1).to(dst.dtype).expand_as(dst))
        _load_base(model, base)
    return model


def _import_prefix(model, pcfg, tensors, wfile, name, overrides):
    if "prompt_embeddings" not in tensors:
        raise CheckpointError(f"{wfile} is missing key 'prompt_embeddings'")
    emb = tensors["prompt_embeddings"]
    n = int(pcfg.get("num_virtual_tokens") or emb.shape[0])
    modules = _modules_to_save(model, pcfg.get("modules_to_save"))
    base = _base_tensors(model, {k: v for k, v in tensors.items() if k != "prompt_embeddings"}, PROMPT_PREFIX, wfile)
    cfg = {"method": "prefix", "style": "peft", "num_tokens": n, "reparam": False,
           **_freeze_extras(model, base, "none", [], modules)}
    cfg.update(overrides)
    add_adapters(model, cfg, name=name)
    s = get_container(model).sets[name or "prefix"]
    enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    subs = pcfg.get("num_transformer_submodules") or 1
    if subs != (2 if enc_dec else 1):
        raise ConfigError(f'{wfile}: "num_transformer_submodules" = {subs} does not fit {type(model).__name__}')
    if pcfg.get("token_dim") and pcfg["token_dim"] != s.heads * s.hd:
        raise ConfigError(f'{wfile}: "token_dim" = {pcfg["token_dim"]}, but the model\'s key/value width is '
                          f"{s.heads * s.hd}")
    tab = s.tables["peft"].table
    if tuple(emb.shape) != tuple(tab.shape[1:]):
        raise CheckpointError(f"shape mismatch for 'prompt_embeddings': file has {tuple(emb.shape)}, model needs "
                              f"{tuple(tab.shape[1:])}")
    with torch.no_grad():
        tab.copy_(emb.to(tab.dtype).unsqueeze(0).expand_as(tab))
        _load_base(model, base)
    return model
