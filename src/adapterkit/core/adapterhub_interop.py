"""Load AdapterHub (``adapters``) saved adapter directories into adapterkit, on transformers 5.

``import_adapterhub(model, directory)`` reads what AdapterHub's ``model.save_adapter(dir, name)``
or ``model.save_adapter_setup(dir, setup, head_setup)`` writes:

- ``adapter_config.json`` (``{"config": {...}, "model_type", "hidden_size", "name", ...}``),
- ``pytorch_adapter.bin`` or ``adapter.safetensors`` with AdapterHub's key names,
- optionally ``head_config.json`` + ``pytorch_model_head.bin`` / ``model_head.safetensors``,
- for a setup: ``adapter_setup.json`` and one sub-directory per adapter / head (and fusion); a
  Stack / Average / Fuse / Parallel of single bottleneck adapters with one config becomes one
  adapterkit set with a copy per adapter, composed with adapterkit's block of the same name,

maps the config to an adapterkit method config (:func:`adapterhub_config`), attaches it and copies
every tensor. AdapterHub's default heads go into the model's own head modules: its 2-layer tanh
classification head is a BERT ``*ForSequenceClassification``'s pooler dense + classifier, a RoBERTa
one's ``classifier.dense`` + ``out_proj``, BART's ``classification_head`` (on the last ``<eos>``); its
tagging and question-answering heads are ``classifier`` / ``qa_outputs``. ``.bin`` files are pickles: they are read only through
:func:`adapterkit.safeio.load_legacy_weights` (``torch.load(weights_only=True)``), never unpickled
freely.

What cannot be mapped is said, one line per thing, in one :class:`ConfigError` (gating,
invertible adapters, per-layer reduction factors, ``leave_out`` on encoder-decoders, factorised
PHM rules, VeRA/DoRA, nested compositions, ...); a tensor that maps nowhere is a :class:`CheckpointError`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from adapterkit.core.base import add_adapters, get_container, paired_places, sublayer_places
from adapterkit.core.io import read_json_object
from adapterkit.core.profiles import profile_for_model
from adapterkit.errors import CheckpointError, ConfigError
from adapterkit.safeio import load_weights

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter.safetensors", "pytorch_adapter.bin")
HEAD_CONFIG_NAME = "head_config.json"
HEAD_WEIGHT_NAMES = ("model_head.safetensors", "pytorch_model_head.bin")
SETUP_NAME = "adapter_setup.json"

# AdapterHub non_linearity (transformers' get_activation names) -> adapterkit activation
_ACT = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new", "swish": "swish", "silu": "silu", "tanh": "tanh",
        "linear": "identity"}
# BnConfig fields that only initialise weights the file holds, or describe the file
_BN_INFO = {"init_weights", "init_weights_seed", "phm_c_init", "phm_init_range", "hypercomplex_nonlinearity",
            "architecture"}
# BnConfig fields that must keep this value (anything else: unmappable, with the reason)
_BN_FIXED = {
    "use_gating": (False, "gating modules (UniPELT) are not an adapterkit option"),
    "inv_adapter": (None, "invertible adapters (MAD-X) are not an adapterkit method"),
    "inv_adapter_reduction_factor": (None, "invertible adapters (MAD-X) are not an adapterkit method"),
    "invertible_adapter": (None, "invertible adapters (MAD-X) are not an adapterkit method"),  # adapters 0.x name
    "original_ln_after": (True, "adapterkit keeps the block's own LayerNorm after the adapter"),
    "stochastic_depth": (0.0, "stochastic depth (DropPath) is not an adapterkit option"),
    "factorized_phm_rule": (False, "factorised PHM rules are not an adapterkit option"),
    "shared_W_phm": (False, "PHM weights shared across layers are not an adapterkit option"),
    "learn_phm": (True, "frozen PHM rules are not an adapterkit option"),
    "phm_bias": (True, "adapterkit's PHM layers always have a bias"),
}
_BN_USED = {"ln_before", "ln_after", "mh_adapter", "output_adapter", "cross_adapter", "reduction_factor", "non_linearity",
            "original_ln_before", "residual_before_ln", "adapter_residual_before_ln", "is_parallel", "scaling",
            "leave_out", "dropout", "phm_layer", "phm_dim", "shared_phm_rule", "factorized_phm_W", "phm_rank"}
_LORA_INFO = {"init_weights", "init_weights_seed", "dtype", "architecture"}
_LORA_FIXED = {
    "use_gating": (False, "gating modules (UniPELT) are not an adapterkit option"),
    "use_dora": (False, "DoRA is not an adapterkit method"),
    "vera_d": (None, "VeRA is not an adapterkit method"),
    "vera_b": (None, "VeRA is not an adapterkit method"),
}
_LORA_USED = {"selfattn_lora", "intermediate_lora", "output_lora", "leave_out", "r", "alpha", "dropout",
              "attn_matrices", "composition_mode"}


class _Problems(list):
    def fixed(self, cfg: dict, table: dict) -> None:
        for k, (want, why) in table.items():
            if k in cfg and cfg[k] != want:
                self.append(f'"{k}" = {json.dumps(cfg[k])}: {why}')

    def unknown(self, cfg: dict, *known: set) -> None:
        for k in cfg:  # an unknown field that is off (null, false, empty) changes nothing
            if not any(k in s for s in known) and cfg[k] not in (None, False, [], {}, ""):
                self.append(f'"{k}" = {json.dumps(cfg[k])}: not an AdapterHub 1.x field adapterkit knows')


# ----------------------------------------------------------------------------- config mapping


def _layers(model, leave_out, problems: _Problems):
    if not leave_out:
        return None
    mcfg = getattr(model, "config", None)
    if getattr(mcfg, "is_encoder_decoder", False):
        problems.append(f'"leave_out" = {json.dumps(leave_out)}: AdapterHub numbers decoder layers after the encoder '
                        "layers; adapterkit's layers filter is per stack")
        return None
    n = getattr(mcfg, "num_hidden_layers", None)
    if n is None:
        problems.append('"leave_out": the model config has no num_hidden_layers')
        return None
    return [i for i in range(n) if i not in set(leave_out)]


def _reduction(c: dict, hidden: int | None, problems: _Problems) -> dict:
    rf = c.get("reduction_factor", 16)
    if isinstance(rf, dict):
        vals = set(rf.values())
        if len(vals) != 1:
            problems.append(f'"reduction_factor" = {json.dumps(rf)}: one reduction factor per layer is not an '
                            "adapterkit option")
            return {}
        rf = vals.pop()
    rf = float(rf)
    if hidden and (hidden % rf or hidden // rf < 1):  # AdapterHub: int(hidden // rf), at least 1
        return {"bottleneck_dim": max(1, int(hidden // rf))}
    return {"reduction_factor": rf}


def _bottleneck_config(c: dict, model, hidden, problems: _Problems) -> dict:
    problems.fixed(c, _BN_FIXED)
    problems.unknown(c, _BN_USED, _BN_INFO, set(_BN_FIXED))
    act = str(c.get("non_linearity", "relu")).lower()
    if act not in _ACT:
        problems.append(f'"non_linearity" = "{act}": no adapterkit activation of that name')
    parallel = bool(c.get("is_parallel"))
    phm = bool(c.get("phm_layer"))
    enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    where = [("mh_adapter", "attn"), ("cross_adapter", "cross_attn"), ("output_adapter", "ffn")]
    spots = [s for k, s in where if c.get(k) and (s != "cross_attn" or enc_dec)]
    if not spots:
        problems.append('"mh_adapter", "output_adapter", "cross_adapter": no adapter position is on')
    out: dict = {"activation": _ACT.get(act, "relu"), **_reduction(c, hidden, problems)}
    scaling = c.get("scaling", 1.0)
    if parallel:
        if "cross_attn" in spots:
            problems.append('"cross_adapter" with "is_parallel": parallel adapters next to cross-attention are not mapped')
        if phm:
            problems.append('"phm_layer" with "is_parallel": parallel Compacter adapters are not an adapterkit method')
        out.update(method="parallel", positions=[s for s in spots if s != "cross_attn"], parallel_input="stream")
    else:
        before = c.get("original_ln_before", False)
        res = c.get("residual_before_ln", True)
        if res is not True:
            problems.append(f'"residual_before_ln" = {json.dumps(res)}: adapterkit\'s adapters add their residual '
                            "around the sublayer output")
        out["adapter_input"] = "normed_sum" if before else "sublayer"
        positions = [f"{s}_out" for s in spots]
        if phm:
            out.update(method="compacter++" if positions == ["ffn_out"] else "compacter", positions=positions)
        else:
            out.update(method="pfeiffer" if positions == ["ffn_out"] else "houlsby", positions=positions)
    if phm:
        out.update(phm_dim=int(c.get("phm_dim", 4)), shared_phm_rule=bool(c.get("shared_phm_rule", True)),
                   factorized_phm=bool(c.get("factorized_phm_W", True)), phm_rank=int(c.get("phm_rank", 1)),
                   phm_init_std=float(c.get("phm_init_range", 1e-4)))
        if float(scaling) != 1.0:
            problems.append(f'"scaling" = {json.dumps(scaling)}: Compacter adapters have no output scale in adapterkit')
        if c.get("dropout"):
            problems.append(f'"dropout" = {c["dropout"]}: Compacter adapters have no dropout in adapterkit')
    else:
        if scaling == "learned":
            out.update(scale=1.0, learned_scale=True)
        elif scaling == "channel":
            problems.append('"scaling" = "channel": a per-channel learned scale is not an adapterkit option')
        else:
            out["scale"] = float(scaling)
        out["dropout"] = float(c.get("dropout", 0.0))
        init = c.get("init_weights", "bert")
        out["init"] = {"mam_adapter": "lora", "houlsby": "houlsby"}.get(init, "bert")
    lb, la = bool(c.get("ln_before")), bool(c.get("ln_after"))
    if lb and la:
        problems.append('"ln_before" and "ln_after": adapterkit\'s adapter has one LayerNorm, before or after')
    elif (lb or la) and phm:
        problems.append(f'"{"ln_before" if lb else "ln_after"}": Compacter adapters have no LayerNorm of their own')
    elif la and (c.get("adapter_residual_before_ln") or float(scaling if scaling != "learned" else 0) != 1.0):
        problems.append('"ln_after" with "adapter_residual_before_ln" or a scale: adapterkit normalises the '
                        "branch output before scaling it and adds the residual after")
    elif lb or la:
        out["adapter_layernorm"] = "before" if lb else "after"
    layers = _layers(model, c.get("leave_out"), problems)
    if layers is not None:
        out["layers"] = layers
    return out


def _lora_config(c: dict, model, paths: list[str], problems: _Problems) -> dict:
    problems.fixed(c, _LORA_FIXED)
    problems.unknown(c, _LORA_USED, _LORA_INFO, set(_LORA_FIXED))
    if c.get("init_weights") == "vera":
        problems.append('"init_weights" = "vera": VeRA is not an adapterkit method')
    mode = c.get("composition_mode", "add")
    layers = _layers(model, c.get("leave_out"), problems)
    targets = [_rx(p) for p in paths]
    if mode == "scale":  # (IA)^3 as AdapterHub has it: every vector scales its layer's output
        if c.get("dropout"):
            problems.append(f'"dropout" = {c["dropout"]}: AdapterHub refuses dropout with (IA)^3 too')
        out = {"method": "ia3", "variant": "adapterhub", "target_modules": targets}
    elif mode == "add":
        out = {"method": "lora", "r": int(c.get("r", 8)), "alpha": float(c.get("alpha", 8)),
               "dropout": float(c.get("dropout", 0.0)), "target_modules": targets}
    else:
        problems.append(f'"composition_mode" = {json.dumps(mode)}: AdapterHub knows "add" (LoRA) and "scale" ((IA)^3)')
        out = {}
    if layers is not None:
        out["layers"] = layers
    return out


def _prompt_config(c: dict, model, problems: _Problems) -> dict:
    problems.unknown(c, {"prompt_length", "prompt_init", "prompt_init_text", "combine", "random_uniform_scale",
                         "init_weights_seed", "architecture"})
    if c.get("combine", "prefix") != "prefix":
        problems.append(f'"combine" = {json.dumps(c["combine"])}: only "prefix" prompts are mapped')
    # AdapterHub inserts the prompt after the embedding layer (positions, token types and the embedding
    # LayerNorm apply to the real tokens only): adapterkit's placement "after_embeddings"
    return {"method": "prompt", "num_tokens": int(c.get("prompt_length", 10)), "placement": "after_embeddings"}


def adapterhub_config(ah_config: dict, model: nn.Module, paths: list[str] | None = None) -> dict:
    """The adapterkit config for an AdapterHub adapter config (the ``"config"`` of its
    adapter_config.json). ``paths``: the module paths LoRA / (IA)^3 tensors sit on (from the
    file). Raises one ConfigError listing every field that cannot be mapped."""
    problems = _Problems()
    cfg = _map_config(ah_config, model, paths or [], problems)
    if problems:
        raise ConfigError("this AdapterHub adapter cannot be mapped to adapterkit:\n  - " + "\n  - ".join(problems))
    return cfg


def _prefix_config(c: dict, model, locations: list[str], problems: _Problems) -> dict:
    problems.fixed(c, {"use_gating": (False, "gated prefixes (UniPELT) are not an adapterkit option")})
    problems.unknown(c, {"encoder_prefix", "cross_prefix", "leave_out", "flat", "prefix_length", "bottleneck_size",
                         "non_linearity", "dropout", "use_gating", "shared_gating", "init_weights_seed",
                         "architecture"})
    if c.get("leave_out"):
        problems.append(f'"leave_out" = {json.dumps(c["leave_out"])}: AdapterHub sizes a location\'s prefixes for '
                        "every layer and skips some; adapterkit sizes them for the layers it attaches to")
    act = str(c.get("non_linearity", "tanh")).lower()
    if act not in _ACT:
        problems.append(f'"non_linearity" = "{act}": no adapterkit activation of that name')
    flat = bool(c.get("flat", False))
    out = {"method": "prefix", "style": "adapterhub", "num_tokens": int(c.get("prefix_length", 30)),
           "reparam": not flat, "activation": _ACT.get(act, "tanh"), "dropout": float(c.get("dropout", 0.0))}
    if not flat:
        out["bottleneck_size"] = int(c.get("bottleneck_size", 512))
    # the locations AdapterHub made (its file holds one module per location): encoder / self / cross
    order = ["encoder", "self", "cross"]
    out["locations"] = [x for x in order if x in locations] or [x for x in order if x == "self" or
                                                                 c.get(f"{x}_prefix", True)]
    return out


def _map_config(c: dict, model, paths, problems: _Problems, hidden: int | None = None,
                locations: list[str] | None = None) -> dict:
    arch = c.get("architecture")
    if arch is None:
        return _bottleneck_config(c, model, hidden or _hidden(model), problems)
    if arch == "lora":
        return _lora_config(c, model, paths, problems)
    if arch == "prompt_tuning":
        return _prompt_config(c, model, problems)
    if arch == "union":
        problems.append('"architecture" = "union": config unions (MAM, UniPELT) are not mapped; load each part')
    elif arch == "prefix_tuning":
        return _prefix_config(c, model, locations or [], problems)
    else:
        problems.append(f'"architecture" = {json.dumps(arch)}: no adapterkit method for it')
    return {}


def _hidden(model) -> int | None:
    mcfg = getattr(model, "config", None)
    return getattr(mcfg, "hidden_size", None) or getattr(mcfg, "d_model", None)


# ----------------------------------------------------------------------------- files


def _weights(directory: Path, names) -> dict[str, torch.Tensor]:
    for n in names:
        if (directory / n).exists():
            return load_weights(directory / n)  # .bin: weights-only torch.load, never a free unpickle
    raise CheckpointError(f"no {' or '.join(names)} in {directory}")


def _read_setup(directory: Path) -> tuple[str, list[str], dict, Path | None]:
    """(block type, adapter names, block kwargs, head directory) of a save_adapter_setup directory."""
    setup = read_json_object(directory / SETUP_NAME)
    kind, names, kwargs = _flat_block(setup.get("adapter_setup"), directory / SETUP_NAME)
    head = setup.get("head_setup")
    if head is not None and not isinstance(head, str):
        raise ConfigError(f"{directory / SETUP_NAME}: head setup {head!r} (several heads) is not mapped")
    return kind, names, kwargs, (directory / head if head else None)


def _flat_block(block, where) -> tuple[str, list[str], dict]:
    """A composition of single adapters: (type, names, kwargs); nested compositions are not mapped."""
    if isinstance(block, str):
        return "single", [block], {}
    if not isinstance(block, dict) or not isinstance(block.get("children"), list):
        raise ConfigError(f"{where}: unreadable adapter setup {block!r}")
    kind = block.get("type", "single")
    if kind == "single":
        return kind, [str(c) for c in block["children"]], {}
    names = []
    for ch in block["children"]:
        k, n, _ = _flat_block(ch, where)
        if k != "single" or len(n) != 1:
            raise ConfigError(f"{where}: nested composition {block!r} is not mapped; compose single adapters")
        names += n
    if len(names) == 1 and kind in ("Stack", "Fuse", "Average", "Parallel"):
        return "single", names, {}
    return kind, names, dict(block.get("kwargs") or {})


# ----------------------------------------------------------------------------- keys


def _rx(path: str) -> str:
    return "^" + re.escape(path) + "$"


class _Paths:
    """AdapterHub module paths -> this model's: AdapterHub's *AdapterModel classes put the base model
    under ``base_model_prefix`` (``model.``, ``bert.``); a bare model or an HF class may or may not."""

    def __init__(self, model: nn.Module):
        self.bp = getattr(model, "base_model_prefix", "") or ""
        self.target = f"{self.bp}." if self.bp and hasattr(model, self.bp) else ""
        self.modules = dict(model.named_modules())

    def __call__(self, ah_path: str) -> str:
        p = ah_path[len(self.bp) + 1:] if self.bp and ah_path.startswith(self.bp + ".") else ah_path
        return self.target + p


_BN_KEY = re.compile(r"^(?P<loc>.+)\.adapters\.(?P<a>[^.]+)\.(?P<part>adapter_down\.\d|adapter_up|adapter_norm_before|"
                     r"adapter_norm_after)\."
                     r"(?P<p>weight|bias|W_left|W_right|W|b|phm_rule)$")
_SCALE_KEY = re.compile(r"^(?P<loc>.+)\.adapters\.(?P<a>[^.]+)\.scaling$")
_RULE_KEY = re.compile(r"^(?:.*\.)?shared_parameters\.(?P<a>[^.]+)\.phm_rule$")
_LORA_KEY = re.compile(r"^(?P<path>.+)\.loras\.(?P<a>[^.]+)\.lora_(?P<w>A|B)$")
_PREFIX_KEY = re.compile(r"^(?P<pool>.*\.pool\.)?(?:.*\.)?prefix_tunings\.(?P<a>[^.]+)\.(?P<loc>encoder|self|cross)_prefix\."
                         r"(?P<p>wte\.weight|control_trans(?:\.[02]\.(?:weight|bias))?)$")
_PROMPT_KEY = re.compile(r"^(?:.*\.)?prompt_tuning\.prompt_tunings\.(?P<a>[^.]+)\.prompt_embedding\.weight$")
# where AdapterHub's bottleneck layers sit, relative to the transformer layer, in its two naming styles
_LOCS = ((".cross_attention_adapters", "cross_attn"), (".attention_adapters", "attn"), (".output_adapters", "ffn"),
         (".crossattention.output", "cross_attn"), (".attention.output", "attn"), (".output", "ffn"))


def _bn_places(model, s) -> dict[tuple[str, str], str]:
    """(layer path, position) -> adapter key of this set's bottleneck places."""
    cfg = s.config
    profile = profile_for_model(model, cfg.profile)
    if cfg.method == "parallel":
        places = []
        for pos in cfg.positions:
            src = f"{pos}_stream" if cfg.parallel_input == "stream" else f"{pos}_in"
            places += [dst for _, dst in paired_places(model, profile, cfg, src, f"{pos}_out", cfg.places)]
    else:
        places = sublayer_places(model, profile, cfg, cfg.positions, getattr(cfg, "places", None))
    return {(p.path, p.kind.removesuffix("_out")): p.key for p in places}


def _bn_key(loc: str, index: dict, paths: _Paths, key: str, wfile) -> str:
    for suffix, pos in _LOCS:
        if loc.endswith(suffix):
            layer = paths(loc[: -len(suffix)])
            hits = [k for (path, p), k in index.items() if p == pos and path.startswith(layer + ".")]
            if len(hits) == 1:
                return hits[0]
            break
    raise CheckpointError(f"{wfile}: {key!r} maps to no adapter place of this model")


# ----------------------------------------------------------------------------- heads


def _head_modules(meta, hc, htype, layers, cls, mods, pooler, model, problems: _Problems) -> dict | None:
    """AdapterHub head layer index -> the model's own module, or None (a problem said why)."""
    head = f'head "{meta.get("name")}"'
    tanh2 = layers == 2 and not hc.get("use_pooler") and hc.get("activation_function") == "tanh"
    kinds = {"classification": "ForSequenceClassification", "multilabel_classification": "ForSequenceClassification",
             "tagging": "ForTokenClassification", "question_answering": "ForQuestionAnswering"}
    if htype not in kinds:
        problems.append(f'{head}: head_type "{htype}" is not mapped (classification, tagging and question answering '
                        "heads are)")
        return None
    if not cls.endswith(kinds[htype]):
        problems.append(f"{head}: a {htype} head loads into a *{kinds[htype]} model's own head, not into {cls}")
        return None
    want = hc.get("num_labels")
    have = 2 if htype == "question_answering" else getattr(model.config, "num_labels", None)
    if want != have:
        problems.append(f"{head}: num_labels {want} but the model has {have}")
        return None
    if hc.get("bias", True) is not True:
        problems.append(f"{head}: a head without bias is not mapped")
        return None
    if htype == "tagging" and layers == 1 and "classifier" in mods:
        return {"1": "classifier"}
    if htype == "question_answering" and layers == 1 and "qa_outputs" in mods:
        return {"1": "qa_outputs"}
    if htype in ("classification", "multilabel_classification"):
        if tanh2 and "classification_head.dense" in mods and "classification_head.out_proj" in mods:
            # BART: both on the last <eos> token, Dropout, Linear, Tanh, Dropout, Linear
            return {"1": "classification_head.dense", "4": "classification_head.out_proj"}
        if tanh2 and "classifier.dense" in mods and "classifier.out_proj" in mods:
            # RoBERTa's classification head on the first token
            return {"1": "classifier.dense", "4": "classifier.out_proj"}
        if tanh2 and pooler in mods and "classifier" in mods:
            # BERT: the pooler (Linear + tanh on the first token) and the classifier
            return {"1": pooler, "4": "classifier"}
        if layers == 1 and hc.get("use_pooler") and pooler in mods and "classifier" in mods:
            return {"1": "classifier"}
    problems.append(f"{head}: {htype} with {layers} layer(s), activation {hc.get('activation_function')!r}, use_pooler "
                    f"{hc.get('use_pooler')} has no counterpart among {cls}'s own modules (AdapterHub's default "
                    "heads do)")
    return None


def _head(model, directory: Path, problems: _Problems):
    """(trainable_modules, {model parameter name: tensor}) for the head saved in ``directory``."""
    meta = read_json_object(directory / HEAD_CONFIG_NAME)
    hc = meta.get("config") or {}
    tensors = _weights(directory, HEAD_WEIGHT_NAMES)
    htype, layers = hc.get("head_type"), hc.get("layers", 1)
    cls = type(model).__name__
    bp = getattr(model, "base_model_prefix", "")
    mods = dict(model.named_modules())
    pooler = f"{bp}.pooler.dense"
    where = _head_modules(meta, hc, htype, layers, cls, mods, pooler, model, problems)
    if where is None:
        return [], {}
    params = dict(model.named_parameters())
    out = {}
    for k, t in tensors.items():
        m = re.match(r"^heads\.[^.]+\.(?P<i>\d+)\.(?P<p>weight|bias)$", k)
        if not m or m["i"] not in where:
            raise CheckpointError(f"{directory}: head tensor {k!r} maps to no module of {cls}")
        n = f"{where[m['i']]}.{m['p']}"
        if tuple(params[n].shape) != tuple(t.shape):
            raise CheckpointError(f"shape mismatch for head tensor {k!r}: file has {tuple(t.shape)}, {n} has "
                                  f"{tuple(params[n].shape)}")
        out[n] = t
    return ["^" + re.escape(m) + r"\." for m in sorted(set(where.values()))], out


# ----------------------------------------------------------------------------- import


def import_adapterhub(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Load an AdapterHub saved adapter (or adapter setup) directory into ``model``.

    The adapter is attached as an adapterkit set named ``name`` (default: AdapterHub's adapter
    name) and a saved head is loaded into the model's own head modules (classifier, pooler, ...),
    which then train with the adapter (``remove_adapters`` does not restore their old values). A
    composed setup is composed again here; after ``load_adapters`` call ``compose`` yourself.
    Everything that cannot be mapped is named, one line each, in one ConfigError before anything
    is attached.
    """
    directory = Path(directory)
    head_dir = None
    if (directory / SETUP_NAME).exists():
        kind, names, kwargs, head_dir = _read_setup(directory)
        if kind != "single":
            return _import_composition(model, directory, kind, names, kwargs, head_dir, name)
        directory = directory / names[0]
    elif (directory / HEAD_CONFIG_NAME).exists():
        head_dir = directory
    if not (directory / CONFIG_NAME).exists():
        raise CheckpointError(f"no {CONFIG_NAME} in {directory}: not an AdapterHub adapter directory")
    meta = read_json_object(directory / CONFIG_NAME)
    if "config" not in meta or not isinstance(meta["config"], dict):
        raise CheckpointError(f"{directory / CONFIG_NAME} is not an AdapterHub adapter config (no \"config\")")
    tensors = _weights(directory, WEIGHT_NAMES)
    problems = _Problems()
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if meta.get("model_type") and mtype and meta["model_type"] != mtype:
        problems.append(f'"model_type" = "{meta["model_type"]}", but the model is a {mtype}')
    hidden = meta.get("hidden_size") or _hidden(model)
    if _hidden(model) and meta.get("hidden_size") and meta["hidden_size"] != _hidden(model):
        problems.append(f'"hidden_size" = {meta["hidden_size"]}, but the model has {_hidden(model)}')
    paths = _Paths(model)
    lora_paths = sorted({paths(m["path"]) for k in tensors if (m := _LORA_KEY.match(k))})
    for p in lora_paths:
        if p not in paths.modules:
            problems.append(f"a LoRA/(IA)^3 tensor sits on {p}, which {type(model).__name__} does not have")
    locations = sorted({m["loc"] for k in tensors if (m := _PREFIX_KEY.match(k))})
    cfg = _map_config(meta["config"], model, lora_paths, problems, hidden, locations)
    head_rx, head_tensors = _head(model, head_dir, problems) if head_dir is not None else ([], {})
    if problems:
        raise ConfigError(f"{directory}: this AdapterHub adapter cannot be mapped to adapterkit:\n  - "
                          + "\n  - ".join(problems))
    if head_rx:
        cfg["trainable_modules"] = head_rx
    name = name or meta.get("name") or cfg["method"]
    add_adapters(model, cfg, name=name)
    s = get_container(model).sets[name]
    wfile = next(directory / n for n in WEIGHT_NAMES if (directory / n).exists())
    with torch.no_grad():
        _copy(model, s, tensors, paths, wfile, meta["config"])
        params = dict(model.named_parameters())
        for n, t in head_tensors.items():
            params[n].copy_(t.to(params[n].dtype))
    return model


def _copy(model, s, tensors: dict, paths: _Paths, wfile, ah_cfg: dict, task: int | None = None) -> None:
    method = s.config.method
    index = _bn_places(model, s) if method in ("houlsby", "pfeiffer", "parallel", "compacter", "compacter++") else {}
    done = set()
    for k, t in tensors.items():
        m = _BN_KEY.match(k)
        if m and index:
            ad = s.adapters[_bn_key(m["loc"], index, paths, k, wfile)]
            ln_first = bool(ah_cfg.get("ln_before"))  # then adapter_down is (LayerNorm, Linear, act)
            if m["part"] in ("adapter_norm_before", "adapter_norm_after") or (ln_first and m["part"] == "adapter_down.0"):
                # the adapter's own LayerNorm (AdapterHub registers the "before" one twice: the same tensor)
                dst = getattr(ad, "ln_weight" if m["p"] == "weight" else "ln_bias", None) if m["p"] in ("weight", "bias") \
                    else None
                _put(dst, t, k, wfile, task=task)
                done.add(k)
                continue
            if m["part"] != ("adapter_down.1" if ln_first else "adapter_down.0") and m["part"] != "adapter_up":
                raise CheckpointError(f"{wfile}: {k!r} maps to nothing in adapterkit's adapter")
            down = m["part"].startswith("adapter_down")
            if m["p"] == "phm_rule":  # per-layer rules (shared_phm_rule false): one for down, one for up
                rules = getattr(ad, "rules", None)
                _put(None if rules is None else rules[0 if down else 1], t, k, wfile, stacked=False)
                done.add(k)
                continue
            attr = {"b": "bias"}.get(m["p"], m["p"])
            dst = getattr(ad.down if down else ad.up, attr, None)
            _put(dst if isinstance(dst, torch.Tensor) else None, t, k, wfile, task=task)
            done.add(k)
            continue
        m = _SCALE_KEY.match(k)
        if m and index:  # scaling: "learned" (one value)
            scale = s.adapters[_bn_key(m["loc"], index, paths, k, wfile)].scale
            _put(scale, t.reshape(()), k, wfile, task=task)
            done.add(k)
            continue
        m = _RULE_KEY.match(k)
        if m and getattr(s, "phm_rules", None) is not None:
            # AdapterHub shares one rule between the down and up projections; adapterkit holds two
            # (the same values here, so the same function)
            _put(s.phm_rules, t.unsqueeze(0).expand(s.phm_rules.shape[0], *t.shape), k, wfile, stacked=False)
            done.add(k)
            continue
        m = _LORA_KEY.match(k)
        if m and method == "lora":
            layer = s.layers[paths(m["path"]).replace(".", "__")]
            _put((layer.A if m["w"] == "A" else layer.B).weight, t, k, wfile)
            done.add(k)
            continue
        if m and method == "ia3":
            key = paths(m["path"]).replace(".", "__")
            if m["w"] == "A":
                raise CheckpointError(f"{wfile}: {k!r}: (IA)^3 has no lora_A")
            # AdapterHub: y * (lora_B * alpha)
            _put(s.vectors[key], t.reshape(-1) * float(ah_cfg.get("alpha", 1)), k, wfile)
            done.add(k)
            continue
        m = _PREFIX_KEY.match(k)
        if m and method == "prefix":
            if m["pool"]:  # every attention's pool holds the location's module again: the same tensor
                continue
            tab = s.tables[m["loc"]]
            dst = {"wte.weight": tab.embedding, "control_trans": tab.table,
                   "control_trans.0.weight": tab.mlp_in.weight if tab.mlp_in is not None else None,
                   "control_trans.0.bias": tab.mlp_in.bias if tab.mlp_in is not None else None,
                   "control_trans.2.weight": tab.mlp_out.weight if tab.mlp_out is not None else None,
                   "control_trans.2.bias": tab.mlp_out.bias if tab.mlp_out is not None else None}[m["p"]]
            if dst is not None and m["p"] == "control_trans":
                t = t.reshape(dst.shape[1:]) if t.numel() == dst[0].numel() else t
            _put(dst, t, k, wfile)
            done.add(k)
            continue
        m = _PROMPT_KEY.match(k)
        if m and method == "prompt":
            _put(s.embedding, t, k, wfile)
            done.add(k)
            continue
    if method == "prefix":  # the per-attention copies must equal the location's module
        for k, t in tensors.items():
            m = _PREFIX_KEY.match(k)
            if m and m["pool"]:
                top = next((k2 for k2 in done if k2.endswith(k[m.end("pool"):].split("prefix_tunings.", 1)[-1])
                            and _PREFIX_KEY.match(k2)["loc"] == m["loc"]), None)
                if top is None or not torch.equal(tensors[top], t):
                    raise CheckpointError(f"{wfile}: {k!r} differs from its location's prefix module")
                done.add(k)
    left = [k for k in tensors if k not in done]
    if left:
        raise CheckpointError(f"{wfile}: tensor {left[0]!r} maps to nothing in adapterkit's {method} adapter"
                              + (f" (and {len(left) - 1} more)" if len(left) > 1 else ""))
    if method in ("compacter", "compacter++") and s.phm_rules is not None and \
            not any(_RULE_KEY.match(k) for k in tensors):
        raise CheckpointError(f"{wfile} has no shared phm_rule: AdapterHub 1.x does not save it for a bare base "
                              "model (adapters.init(BartModel(...))); save from an *AdapterModel")


def _put(dst, t: torch.Tensor, key: str, wfile, stacked: bool = True, task: int | None = None) -> None:
    """Copy ``t`` into every task copy of the stacked parameter ``dst`` (n, *shape), or into copy ``task``."""
    if dst is None:
        raise CheckpointError(f"{wfile}: {key!r} maps to nothing in adapterkit's adapter")
    shape = tuple(dst.shape[1:]) if stacked else tuple(dst.shape)
    if tuple(t.shape) != shape:
        raise CheckpointError(f"shape mismatch for {key!r}: file has {tuple(t.shape)}, adapterkit needs {shape}")
    t = t.to(dst.dtype)
    if stacked and task is not None and dst.shape[0] > 1:
        dst[task].copy_(t)
    else:
        dst.copy_(t.unsqueeze(0).expand_as(dst) if stacked else t)


_FUSION_KEY = re.compile(r"^(?P<loc>.+)\.adapter_fusion_layer\.(?P<f>[^.]+)\.(?P<m>query|key|value)\."
                         r"(?P<p>weight|bias)$")
# AdapterHub's dynamic AdapterFusion, which adapterkit's Fuse computes; regularization / value_initialized
# / dropout_prob only shape training
_FUSION_FIXED = {"key": True, "query": True, "value": True, "value_before_softmax": True, "residual_before": False,
                 "temperature": False, "query_before_ln": False}


def _import_composition(model, directory: Path, kind: str, names: list[str], kwargs: dict, head_dir, name):
    """Stack / Average / Fuse / Parallel over AdapterHub adapters with one config: one adapterkit set with a
    copy per adapter (``tasks`` = the adapter names), composed with adapterkit's block of the same name."""
    from adapterkit.core import composition as comp

    blocks = {"Stack": comp.Stack, "Average": comp.Average, "Fuse": comp.Fuse, "Parallel": comp.Parallel}
    problems = _Problems()
    if kind not in blocks:
        raise ConfigError(f"{directory / SETUP_NAME}: {kind} composition is not mapped "
                          f"(Stack, Average, Fuse and Parallel are)")
    paths = _Paths(model)
    parts = []
    for n in names:
        meta = read_json_object(directory / n / CONFIG_NAME)
        tensors = _weights(directory / n, WEIGHT_NAMES)
        cfg = _map_config(meta.get("config") or {}, model, [], problems, meta.get("hidden_size") or _hidden(model))
        parts.append((n, meta, tensors, cfg))
    cfgs = [p[3] for p in parts]
    if any(c != cfgs[0] for c in cfgs):
        problems.append(f"{kind}({', '.join(names)}): the adapters' configs differ; adapterkit composes the copies of "
                        "one adapter set (one config)")
    method = cfgs[0].get("method")
    if method not in ("houlsby", "pfeiffer"):
        problems.append(f"{kind}: composing {method} adapters is not mapped (sequential bottleneck adapters are)")
    cfg = dict(cfgs[0], tasks=list(names), sharing="per_task")
    fusion = {}
    if kind == "Fuse":
        fdir = directory / ",".join(names)
        fmeta = read_json_object(fdir / "adapter_fusion_config.json")
        fc = fmeta.get("config") or {}
        for k, want in _FUSION_FIXED.items():
            if fc.get(k, want) != want:
                problems.append(f'fusion "{k}" = {json.dumps(fc.get(k))}: only AdapterHub\'s dynamic fusion is mapped')
        fusion = _weights(fdir, ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin"))
        drop = fc.get("dropout_prob")
        if drop is None:  # AdapterHub falls back to the model's attention dropout
            drop = getattr(getattr(model, "config", None), "attention_probs_dropout_prob", 0.0) or 0.0
        cfg.update(fusion=list(names), fusion_value=True, fusion_dropout=float(drop))
    head_rx, head_tensors = _head(model, head_dir, problems) if head_dir is not None else ([], {})
    if problems:
        raise ConfigError(f"{directory}: this AdapterHub setup cannot be mapped to adapterkit:\n  - "
                          + "\n  - ".join(problems))
    if head_rx:
        cfg["trainable_modules"] = head_rx
    name = name or ",".join(names)
    add_adapters(model, cfg, name=name)
    s = get_container(model).sets[name]
    with torch.no_grad():
        for i, (n, meta, tensors, _) in enumerate(parts):
            wfile = next(directory / n / w for w in WEIGHT_NAMES if (directory / n / w).exists())
            _copy(model, s, tensors, paths, wfile, meta["config"], task=i)
        index = _bn_places(model, s) if fusion else {}
        for k, t in fusion.items():
            m = _FUSION_KEY.match(k)
            if not m:
                raise CheckpointError(f"{directory}: fusion tensor {k!r} maps to nothing in adapterkit")
            lin = getattr(s.fusions[_bn_key(m["loc"], index, paths, k, directory)], m["m"])
            _put(getattr(lin, m["p"], None) if lin is not None else None, t, k, directory, stacked=False)
        params = dict(model.named_parameters())
        for n, t in head_tensors.items():
            params[n].copy_(t.to(params[n].dtype))
    block = blocks[kind](*names, weights=kwargs["weights"]) if kind == "Average" and kwargs.get("weights") \
        else blocks[kind](*names)
    comp.compose(model, block)
    return model


__all__ = ["adapterhub_config", "import_adapterhub"]

