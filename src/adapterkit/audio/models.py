"""Audio classifiers (AST or Whisper encoder -> mean-pooled tokens -> linear head) and the
PETL-AST method configurations mapped onto adapterkit methods.

PETL-AST (``src/AST_adapters.py``) -> adapterkit:

================  ==========  ==========================================================
adapter_type      placement   adapterkit config
================  ==========  ==========================================================
Pfeiffer (FFN)    parallel    bottleneck: ``parallel`` on ``ffn`` reading the normalised FFN
                              input LN2(h) (``parallel_input: normalized``), out added to FFN(LN2 h)
Houlsby (+MHSA)   parallel    the same on ``ffn`` and ``attn`` (A(LN1 x) added next to Attn)
Pfeiffer          sequential  bottleneck: ``pfeiffer`` on ``ffn_out``: FFN + A(FFN)
Houlsby           sequential  bottleneck: ``houlsby`` on ``attn_out`` + ``ffn_out``
any               any         conformer block: ``conformer`` with the same placement
================  ==========  ==========================================================

The defaults are the reference's (``main.py`` / ``src/AST_adapters.py``): residual off
(``--apply_residual False``) in both placements, so a *sequential* adapter replaces the
sublayer output (out = A(FFN(LN2 h)) + h) and a parallel one adds nothing besides A; the
bottleneck is d -> round(d/RR) -> d with GELU and **every weight and bias zero**
(``Bottleneck_adapter``; with GELU(0) = 0 only the up-projection bias then learns, so the
adapter is a learned bias vector: ``adapter.init: bert`` gives N(0, 0.02) projections that
both learn); reduction rate 64 for the bottleneck (the release whose default block is the
bottleneck) and 96 for the Conformer (the release whose default block is the Conformer);
``residual: true`` adds FFN(LN2 h) (sequential) or LN2 h (parallel) as the reference's
``apply_residual``. Trainable besides the adapters: the touched LayerNorms (FFN LN; +
attention LN for Houlsby), the final LayerNorm and the head.

Baselines (PETL-AST): LoRA on W_q, W_v with rank d/RR (RR 64) and scale 8/RR; prompt tuning
as deep VPT with 25 tokens; prefix tuning with 24 tokens (12 keys + 12 values per layer,
learned directly, no MLP); each also trains the final LayerNorm, as the reference's prompt
and prefix models do. ``linear_probe`` freezes the whole encoder, ``full`` trains it all.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from adapterkit.core.base import add_adapters
from adapterkit.core.config import registered_methods
from adapterkit.errors import CheckpointError, ConfigError, did_you_mean
from adapterkit.vision.common import hf_config, load_pretrained

# which LayerNorms PETL-AST trains, per backbone family: (ffn LN, attention LN, final LN)
_LN_PATTERNS = {
    "audio-spectrogram-transformer": (r"layernorm_after\.", r"layernorm_before\.", r"^layernorm\."),
    "whisper": (r"final_layer_norm\.", r"self_attn_layer_norm\.", r"^encoder\.layer_norm\."),
}
ADAPTER_TYPES = ("pfeiffer", "houlsby")
BLOCKS = ("bottleneck", "conformer")
PETL_DEFAULTS = {"adapter_type": "pfeiffer", "placement": "parallel", "block": "conformer", "reduction_rate": None,
                 "residual": False, "init": None, "kernel_size": 31, "input_layernorm": False}
REDUCTION_RATES = {"bottleneck": 64, "conformer": 96}  # the reference's defaults per block
BOTTLENECK_INITS = ("zeros", "bert", "houlsby", "lora", "zeros_up_bert")
SPECIAL = ("petl_adapter", "lora", "prompt", "prefix", "linear_probe", "full")


class WhisperEncoderOnly(nn.Module):
    """Holds a Whisper encoder under ``.encoder`` (so the bart/whisper profile's paths match)
    without the decoder; forward(input_features) -> encoder outputs."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config

    def forward(self, input_features: torch.Tensor, **kw):
        return self.encoder(input_features=input_features, **kw)


_PRETRAINED: dict[str, nn.Module] = {}  # named Whisper encoders read once per process (copied per run)


def _named_whisper_encoder(name: str) -> nn.Module:
    from adapterkit.audio.whisper import load_whisper

    if name not in _PRETRAINED:
        _PRETRAINED.clear()  # one model kept
        _PRETRAINED[name] = load_whisper(name)[0].get_encoder()
    return copy.deepcopy(_PRETRAINED[name])


def shorten_whisper_window(backbone: nn.Module, seconds: float) -> None:
    """Whisper's 30 s input window cut to ``seconds``: the encoder keeps the first
    round(seconds * 100) / 2 rows of its position table (features are then that many frames x 2)."""
    enc = backbone.encoder
    pos = int(round(float(seconds) * 100)) // 2
    n = enc.embed_positions.weight.shape[0]
    if not 1 <= pos <= n:
        raise ConfigError(f'"model.window_seconds" {seconds} must give 1..{n} encoder positions (0.02 s each), '
                          f"got {pos}")
    if pos < n:
        old = enc.embed_positions
        new = nn.Embedding(pos, old.weight.shape[1])
        with torch.no_grad():
            new.weight.copy_(old.weight[:pos])
        new.weight.requires_grad_(old.weight.requires_grad)
        enc.embed_positions = new
        enc.config.max_source_positions = pos


def build_audio_backbone(m: dict) -> tuple[nn.Module, str]:
    """(backbone, family "ast"|"whisper") from the ``model`` section (``window_seconds``:
    a shorter Whisper input window, see :func:`shorten_whisper_window`)."""
    net, family = _build_audio_backbone(m)
    if m.get("window_seconds") is not None:
        if family != "whisper":
            raise ConfigError('"model.window_seconds" shortens the Whisper encoder window; the backbone is AST')
        shorten_whisper_window(net, m["window_seconds"])
    return net, family


def _build_audio_backbone(m: dict) -> tuple[nn.Module, str]:
    kind = m["backbone"]
    if kind == "ast":
        from transformers import ASTConfig, ASTModel

        torch.manual_seed(int(m.get("init_seed") or 0))
        return ASTModel(hf_config(ASTConfig, m.get("ast"), "model.ast")), "ast"
    if kind == "whisper":
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        torch.manual_seed(int(m.get("init_seed") or 0))
        return WhisperEncoderOnly(WhisperEncoder(hf_config(WhisperConfig, m.get("whisper"), "model.whisper"))), "whisper"
    if kind == "hf":
        from transformers import AutoModel

        if not m.get("name_or_path"):
            raise ConfigError('backbone "hf" needs "model.name_or_path" (an AST or Whisper checkpoint)')
        from adapterkit.audio.whisper import is_backbone_name

        if is_backbone_name(m["name_or_path"]):  # real Whisper weights from the offline packages
            return WhisperEncoderOnly(_named_whisper_encoder(m["name_or_path"])), "whisper"
        net = load_pretrained(AutoModel, m["name_or_path"], "audio model", CheckpointError)
        mt = net.config.model_type
        if mt == "whisper":
            return WhisperEncoderOnly(net.get_encoder()), "whisper"
        if mt == "audio-spectrogram-transformer":
            return net, "ast"
        raise ConfigError(f'audio backbone "{m["name_or_path"]}" is a {mt} model; supported: AST and Whisper')
    raise ConfigError(f'"model.backbone" must be "ast", "whisper" or "hf", got "{kind}"'
                      f"{did_you_mean(kind, ['ast', 'whisper', 'hf'])}")


def petl_config(opts: dict, model_type: str, d: int | None = None) -> dict:
    """The adapterkit config of a PETL-AST adapter configuration (see the module table).
    With the hidden width ``d`` the adapter width is round(d / RR) as the reference's;
    without it the reduction rate is passed on (it must then divide the width)."""
    unknown = set(opts) - set(PETL_DEFAULTS)
    if unknown:
        k = sorted(unknown)[0]
        raise ConfigError(f'unknown key "adapter.{k}" for petl_adapter{did_you_mean(k, PETL_DEFAULTS)}; '
                          f"allowed: {sorted(PETL_DEFAULTS)}")
    o = {**PETL_DEFAULTS, **opts}
    at, pl, block = str(o["adapter_type"]).lower(), o["placement"], o["block"]
    if at not in ADAPTER_TYPES:
        raise ConfigError(f'"adapter.adapter_type" must be one of {list(ADAPTER_TYPES)}, got "{o["adapter_type"]}"')
    if pl not in ("parallel", "sequential"):
        raise ConfigError(f'"adapter.placement" must be "parallel" or "sequential", got "{pl}"')
    if block not in BLOCKS:
        raise ConfigError(f'"adapter.block" must be one of {list(BLOCKS)}, got "{block}"{did_you_mean(block, BLOCKS)}')
    residual = o["residual"]
    if not isinstance(residual, bool):
        raise ConfigError(f'"adapter.residual" must be true or false, got {residual!r}')
    rr = float(o["reduction_rate"] if o["reduction_rate"] is not None else REDUCTION_RATES[block])
    if rr <= 0 or (d is not None and round(d / rr) < 1):
        raise ConfigError(f'"adapter.reduction_rate" {rr:g} leaves no adapter width'
                          + (f" for hidden size {d}" if d is not None else ""))
    width = {"bottleneck_dim": max(1, round(d / rr))} if d is not None else {"reduction_factor": rr}
    positions = ["ffn"] if at == "pfeiffer" else ["ffn", "attn"]
    ffn_ln, attn_ln, final_ln = _LN_PATTERNS.get(model_type, _LN_PATTERNS["audio-spectrogram-transformer"])
    lns = [ffn_ln, final_ln] + ([attn_ln] if at == "houlsby" else [])
    if block == "conformer":
        if o["init"] is not None:
            raise ConfigError('"adapter.init" sets the bottleneck initialisation; the conformer block has its own')
        return {"method": "conformer", **width, "placement": pl, "positions": positions,
                "residual": residual, "kernel_size": int(o["kernel_size"]),
                "input_layernorm": bool(o["input_layernorm"]), "trainable_modules": lns}
    init = o["init"] if o["init"] is not None else "zeros"
    if init not in BOTTLENECK_INITS:
        raise ConfigError(f'"adapter.init" must be one of {list(BOTTLENECK_INITS)}, got "{init}"'
                          f"{did_you_mean(str(init), BOTTLENECK_INITS)}")
    base = {**width, "activation": "gelu", "init": init, "trainable_modules": lns}
    if pl == "parallel":  # residual: + LN2 h (the reference's apply_residual)
        return {"method": "parallel", "scale": 1.0, "parallel_input": "normalized", "positions": positions,
                "residual": True if residual else None, **base}
    seq = {"residual": None if residual else False}  # no residual: A(FFN(LN2 h)) replaces FFN(LN2 h)
    if at == "pfeiffer":
        return {"method": "pfeiffer", "positions": ["ffn_out"], **seq, **base}
    return {"method": "houlsby", "positions": ["attn_out", "ffn_out"], **seq, **base}


def final_layernorm(model_type: str) -> list[str]:
    """The final-LayerNorm pattern of a backbone family (trained by the PETL-AST baselines)."""
    return [_LN_PATTERNS.get(model_type, _LN_PATTERNS["audio-spectrogram-transformer"])[2]]


def attach_audio_method(backbone: nn.Module, family: str, method: str, overrides: dict | None) -> bool:
    """Attach the method; True when the whole backbone trains."""
    o = dict(overrides or {})
    mt = backbone.config.model_type
    d = int(backbone.config.hidden_size if hasattr(backbone.config, "hidden_size") else backbone.config.d_model)
    if method == "full":
        backbone.requires_grad_(True)
        return True
    if method == "linear_probe":
        backbone.requires_grad_(False)
        return False
    if method == "petl_adapter":
        cfg = petl_config(o, mt, d)
    elif method == "lora":  # PETL-AST: W_q and W_v, rank d/RR, scale alpha/RR = 8/RR
        rr = float(o.pop("reduction_rate", 64))
        r = max(1, int(d // rr))
        cfg = {"method": "lora", "r": r, "alpha": r * 8.0 / rr, "targets": ["q", "v"],
               "trainable_modules": final_layernorm(mt), **o}
    elif method == "prompt":  # PETL-AST prompt tuning: VPT-deep, 25 tokens
        cfg = {"method": "vpt", "num_tokens": 25, "deep": True, "trainable_modules": final_layernorm(mt), **o}
    elif method == "prefix":  # PETL-AST prefix tuning: 24 tokens = 12 keys + 12 values per layer, no MLP
        cfg = {"method": "prefix", "style": "adapterhub", "num_tokens": 12, "reparam": False,
               "trainable_modules": final_layernorm(mt), **o}
    elif method in registered_methods():
        cfg = {"method": method, **o}
    else:
        known = list(SPECIAL) + registered_methods()
        raise ConfigError(f'unknown audio method "{method}"{did_you_mean(method, known)}; known: {known}')
    add_adapters(backbone, cfg)
    return False


class AudioClassifier(nn.Module):
    """Encoder tokens -> mean over tokens -> Linear head."""

    def __init__(self, backbone: nn.Module, family: str, num_classes: int):
        super().__init__()
        self.backbone, self.family = backbone, family
        cfg = backbone.config
        d = int(getattr(cfg, "hidden_size", None) or cfg.d_model)
        self.head = nn.Linear(d, num_classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if self.family == "whisper":
            h = self.backbone(input_features=feats).last_hidden_state
        else:
            h = self.backbone(input_values=feats).last_hidden_state
        return self.head(h.mean(1))
