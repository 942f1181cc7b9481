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

The bottleneck is d -> d/RR -> d with GELU, initialised N(0, 0.02) for *both*
projections (the reference zero-initialises everything, so only the up-projection bias
ever learns; here both projections receive gradients from the first step). The
adapterkit bottleneck adapters keep their own residual in sequential placement and
have none in parallel placement, which is PETL-AST's recommended setting ("parallel
adapters should drop the residual, sequential ones benefit from it"); the conformer
block supports both settings. Trainable besides the adapters: the touched LayerNorms
(FFN LN; + attention LN for Houlsby), the final LayerNorm and the head.
"""

from __future__ import annotations

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
PETL_DEFAULTS = {"adapter_type": "pfeiffer", "placement": "parallel", "block": "conformer", "reduction_rate": 64,
                 "residual": None, "kernel_size": 31, "input_layernorm": False}
SPECIAL = ("petl_adapter", "lora", "prompt", "linear_probe", "full")


class WhisperEncoderOnly(nn.Module):
    """Holds a Whisper encoder under ``.encoder`` (so the bart/whisper profile's paths match)
    without the decoder; forward(input_features) -> encoder outputs."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config

    def forward(self, input_features: torch.Tensor, **kw):
        return self.encoder(input_features=input_features, **kw)


def build_audio_backbone(m: dict) -> tuple[nn.Module, str]:
    """(backbone, family "ast"|"whisper") from the ``model`` section."""
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
        from adapterkit.audio.whisper import is_backbone_name, load_whisper

        if is_backbone_name(m["name_or_path"]):  # real Whisper weights from the offline packages
            return WhisperEncoderOnly(load_whisper(m["name_or_path"])[0].get_encoder()), "whisper"
        net = load_pretrained(AutoModel, m["name_or_path"], "audio model", CheckpointError)
        mt = net.config.model_type
        if mt == "whisper":
            return WhisperEncoderOnly(net.get_encoder()), "whisper"
        if mt == "audio-spectrogram-transformer":
            return net, "ast"
        raise ConfigError(f'audio backbone "{m["name_or_path"]}" is a {mt} model; supported: AST and Whisper')
    raise ConfigError(f'"model.backbone" must be "ast", "whisper" or "hf", got "{kind}"'
                      f"{did_you_mean(kind, ['ast', 'whisper', 'hf'])}")


def petl_config(opts: dict, model_type: str) -> dict:
    """The adapterkit config of a PETL-AST adapter configuration (see the module table)."""
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
    residual = o["residual"] if o["residual"] is not None else pl == "sequential"
    positions = ["ffn"] if at == "pfeiffer" else ["ffn", "attn"]
    ffn_ln, attn_ln, final_ln = _LN_PATTERNS.get(model_type, _LN_PATTERNS["audio-spectrogram-transformer"])
    lns = [ffn_ln, final_ln] + ([attn_ln] if at == "houlsby" else [])
    rr = float(o["reduction_rate"])
    if block == "conformer":
        return {"method": "conformer", "reduction_factor": rr, "placement": pl, "positions": positions,
                "residual": bool(residual), "kernel_size": int(o["kernel_size"]),
                "input_layernorm": bool(o["input_layernorm"]), "trainable_modules": lns}
    if residual != (pl == "sequential"):
        raise ConfigError(f"bottleneck adapters in {pl} placement {'keep' if pl == 'sequential' else 'have no'} "
                          f"their own residual here; set adapter.residual: {str(pl == 'sequential').lower()} "
                          "or use block: conformer")
    base = {"reduction_factor": rr, "activation": "gelu", "init": "bert", "trainable_modules": lns}
    if pl == "parallel":
        return {"method": "parallel", "scale": 1.0, "parallel_input": "normalized", "positions": positions, **base}
    if at == "pfeiffer":
        return {"method": "pfeiffer", "positions": ["ffn_out"], **base}
    return {"method": "houlsby", "positions": ["attn_out", "ffn_out"], **base}


def attach_audio_method(backbone: nn.Module, family: str, method: str, overrides: dict | None) -> bool:
    """Attach the method; True when the whole backbone trains."""
    o = dict(overrides or {})
    mt = backbone.config.model_type
    d = int(backbone.config.hidden_size if hasattr(backbone.config, "hidden_size") else backbone.config.d_model)
    if method == "full":
        for p in backbone.parameters():
            p.requires_grad_(True)
        return True
    if method == "linear_probe":
        for p in backbone.parameters():
            p.requires_grad_(False)
        return False
    if method == "petl_adapter":
        cfg = petl_config(o, mt)
    elif method == "lora":  # PETL-AST: W_q and W_v, rank d/RR, scale alpha/RR = 8/RR
        rr = float(o.pop("reduction_rate", 64))
        r = max(1, int(d // rr))
        cfg = {"method": "lora", "r": r, "alpha": r * 8.0 / rr, "targets": ["q", "v"], **o}
    elif method == "prompt":  # PETL-AST prompt tuning: VPT-deep, 25 tokens
        cfg = {"method": "vpt", "num_tokens": 25, "deep": True, **o}
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
