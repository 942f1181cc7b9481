"""ResAdapter (bytedance/res-adapter) on diffusers UNets: resolution LoRA + resolution norms.

- ResCLoRA: conv LoRA (method ``conv_lora``) on every ``downsamplers.N.conv`` and
  ``upsamplers.N.conv`` of the UNet, r = 16, alpha = 8 (scale 0.5): a 3x3 down conv
  C -> 16 and a 1x1 up conv 16 -> C, no biases.
- ResENorm: the GroupNorm affine parameters (``norm1``/``norm2``) of every ResNet block
  are unfrozen (the rest of the UNet stays frozen).

Files. adapterkit's own format works as for any method (``save_adapters``/``load_adapters``).
The released layout is also read and written: a directory with
``resolution_lora.safetensors`` (older releases: ``pytorch_lora_weights.safetensors``)
and ``resolution_normalization.safetensors`` (older: ``diffusion_pytorch_model.safetensors``).
The norm file holds UNet state-dict keys (``down_blocks.0.resnets.0.norm1.weight``,
optionally prefixed ``unet.``). LoRA key styles read:

- kohya: ``lora_unet_<path with . -> _>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` (scalar; the released parameter counts include one per conv);
- PEFT/diffusers: ``[unet.|base_model.model.]<path>.lora_A.weight`` / ``.lora_B.weight``
  (alpha from an optional ``<path>.alpha`` key or the ``lora_alpha`` file metadata);
- old diffusers: ``[unet.]<path>.lora.down.weight`` / ``.lora.up.weight``.

Kohya names are mapped back through the UNet's own module paths (never by guessing
where underscores were dots). Written: kohya (default) or PEFT style.

Training (the release has none; the paper's recipe: the denoising loss on mixed
resolutions, base UNet frozen) and multi-resolution sampling: :mod:`adapterkit.diffusion.train`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from adapterkit.core.base import add_adapters, get_container
from adapterkit.errors import CheckpointError, ConfigError
from adapterkit.methods.conv_lora import ConvLoraSet
from adapterkit.safeio import load_safetensors_checked, read_safetensors_metadata, save_safetensors_atomic

CONV_PATTERN = r"(?:^|\.)(?:downsamplers|upsamplers)\.\d+\.conv$"
NORM_PATTERN = r"(?:^|\.)resnets\.\d+\.norm[12]\.(?:weight|bias)$"
LORA_FILES = ("resolution_lora.safetensors", "pytorch_lora_weights.safetensors")
NORM_FILES = ("resolution_normalization.safetensors", "diffusion_pytorch_model.safetensors")
KOHYA_PREFIX = "lora_unet_"


def resadapter_config(r: int = 16, alpha: float = 8.0) -> dict:
    """The adapterkit config of ResAdapter: conv LoRA on the resamplers + unfrozen ResNet norms."""
    return {"method": "conv_lora", "r": r, "alpha": alpha, "target_modules": [CONV_PATTERN],
            "trainable_modules": [NORM_PATTERN]}


def add_resadapter(unet: nn.Module, r: int = 16, alpha: float = 8.0, name: str = "resadapter") -> nn.Module:
    """Attach ResAdapter to a diffusers UNet (UNet2DModel / UNet2DConditionModel)."""
    return add_adapters(unet, resadapter_config(r, alpha), name=name)


def resampler_convs(unet: nn.Module) -> dict[str, nn.Conv2d]:
    rx = re.compile(CONV_PATTERN)
    return {n: m for n, m in unet.named_modules() if rx.search(n) and isinstance(m, nn.Conv2d)
            and not n.startswith("adapterkit")}


def norm_parameters(unet: nn.Module) -> dict[str, nn.Parameter]:
    rx = re.compile(NORM_PATTERN)
    return {n: p for n, p in unet.named_parameters() if rx.search(n) and not n.startswith("adapterkit")}


def resadapter_param_count(unet: nn.Module, r: int = 16) -> dict[str, int]:
    """Expected trainable parameters from the UNet's shapes (no adapters needed):
    LoRA Σ r·C_in·k_h·k_w + C_out·r over the resampler convs, norms Σ numel of norm1/norm2
    weight and bias of every ResNet block."""
    lora = sum(r * c.in_channels * c.kernel_size[0] * c.kernel_size[1] + c.out_channels * r
               for c in resampler_convs(unet).values())
    norm = sum(p.numel() for p in norm_parameters(unet).values())
    return {"lora": lora, "norm": norm, "total": lora + norm, "convs": len(resampler_convs(unet)),
            "norm_tensors": len(norm_parameters(unet))}


def _resadapter_set(unet: nn.Module, name: str) -> ConvLoraSet:
    c = get_container(unet)
    s = c.sets[name] if c is not None and name in c.sets else None
    if not isinstance(s, ConvLoraSet):
        raise ConfigError(f'the UNet has no ResAdapter (conv_lora set) named "{name}"')
    return s


def _kohya(path: str) -> str:
    return KOHYA_PREFIX + path.replace(".", "_")


def save_resadapter(unet: nn.Module, directory: str | os.PathLike, name: str = "resadapter",
                    lora_format: str = "kohya") -> Path:
    """Write ResAdapter in the released layout (``resolution_lora`` + ``resolution_normalization``)."""
    if lora_format not in ("kohya", "peft"):
        raise ConfigError(f'lora_format must be "kohya" or "peft", got {lora_format!r}')
    s = _resadapter_set(unet, name)
    if s.merged:
        raise ConfigError("unmerge the ResAdapter before saving (adapterkit.unmerge_adapters(unet))")
    directory = Path(directory)
    lora: dict[str, torch.Tensor] = {}
    for path in s.paths:
        layer = s.layers[path.replace(".", "__")]
        down, up = layer.lora_down[0].detach(), layer.lora_up[0].detach()
        if lora_format == "kohya":
            k = _kohya(path)
            lora[f"{k}.lora_down.weight"] = down
            lora[f"{k}.lora_up.weight"] = up
            lora[f"{k}.alpha"] = torch.tensor(float(s.config.alpha), dtype=down.dtype)
        else:
            lora[f"unet.{path}.lora_A.weight"] = down
            lora[f"unet.{path}.lora_B.weight"] = up
    meta = {"format": "resadapter", "lora_format": lora_format, "r": str(s.config.r), "lora_alpha": str(s.config.alpha)}
    save_safetensors_atomic(lora, directory / LORA_FILES[0], metadata=meta)
    norms = {n: p.detach() for n, p in norm_parameters(unet).items()}
    save_safetensors_atomic(norms, directory / NORM_FILES[0], metadata={"format": "resadapter"})
    return directory


def _find(directory: Path, names: tuple[str, ...]) -> Path | None:
    return next((directory / n for n in names if (directory / n).exists()), None)


def parse_lora_state(tensors: dict[str, torch.Tensor], conv_paths: list[str], meta: dict | None = None,
                     source: str = "LoRA file") -> dict[str, dict]:
    """Map a LoRA state dict (kohya / PEFT / old-diffusers keys) to {conv path: {down, up, alpha}}."""
    by_kohya = {_kohya(p): p for p in conv_paths}
    known = set(conv_paths)
    out: dict[str, dict] = {}
    rx = re.compile(r"^(?P<mod>.+?)\.(?P<part>lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|"
                    r"lora\.down\.weight|lora\.up\.weight|alpha)$")
    for key, t in tensors.items():
        m = rx.match(key)
        if m is None:
            raise CheckpointError(f"{source}: unrecognised LoRA key {key!r} (expected kohya lora_down/lora_up, "
                                  "PEFT lora_A/lora_B or diffusers lora.down/lora.up)")
        mod, part = m["mod"], m["part"]
        if mod.startswith(KOHYA_PREFIX):
            path = by_kohya.get(mod)
        else:
            for pre in ("base_model.model.", "unet."):
                mod = mod.removeprefix(pre)
            path = mod if mod in known else None
        if path is None:
            raise CheckpointError(f"{source}: key {key!r} names no down/up-sampler conv of this UNet")
        slot = out.setdefault(path, {})
        if part == "alpha":
            slot["alpha"] = float(t.reshape(-1)[0])
        else:
            slot["down" if part in ("lora_down.weight", "lora_A.weight", "lora.down.weight") else "up"] = t
    default_alpha = float(meta["lora_alpha"]) if meta and "lora_alpha" in meta else None
    for path, slot in out.items():
        if "down" not in slot or "up" not in slot:
            raise CheckpointError(f"{source}: conv {path} has {'no down' if 'down' not in slot else 'no up'} weight")
        slot.setdefault("alpha", default_alpha)
    return out


def load_resadapter(unet: nn.Module, path: str | os.PathLike, name: str = "resadapter",
                    alpha: float | None = None) -> nn.Module:
    """Load ResAdapter weights in the released layout (a directory, or one LoRA file).

    Attaches the adapter first when the UNet has none named ``name`` (r from the file,
    alpha from the file, else ``alpha``, else 8). Every resampler conv must be covered.
    """
    path = Path(path)
    if path.is_dir():
        lora_file, norm_file = _find(path, LORA_FILES), _find(path, NORM_FILES)
        if lora_file is None and norm_file is None:
            raise CheckpointError(f"{path} holds no ResAdapter files (looked for {list(LORA_FILES + NORM_FILES)})")
    elif path.exists():
        lora_file, norm_file = path, None
    else:
        raise CheckpointError(f"ResAdapter path not found: {path}")
    convs = resampler_convs(unet)
    parsed: dict[str, dict] = {}
    if lora_file is not None:
        parsed = parse_lora_state(load_safetensors_checked(lora_file), list(convs),
                                  read_safetensors_metadata(lora_file), str(lora_file))
        missing = [p for p in convs if p not in parsed]
        if missing:
            raise CheckpointError(f"{lora_file} has no LoRA for conv {missing[0]}"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    c = get_container(unet)
    if c is None or name not in c.sets:
        r = next(iter(parsed.values()))["down"].shape[0] if parsed else 16
        alphas = {s["alpha"] for s in parsed.values() if s["alpha"] is not None}
        if len(alphas) > 1:
            raise CheckpointError(f"{lora_file} uses several alphas {sorted(alphas)}; adapterkit needs one per set")
        a = alphas.pop() if alphas else (alpha if alpha is not None else 8.0)
        add_resadapter(unet, r=r, alpha=a, name=name)
    s = _resadapter_set(unet, name)
    with torch.no_grad():
        for cpath, slot in parsed.items():
            if slot["alpha"] is not None and abs(slot["alpha"] - s.config.alpha) > 1e-6:
                raise CheckpointError(f"{lora_file}: conv {cpath} has alpha {slot['alpha']:g} but the attached "
                                      f"adapter uses {s.config.alpha:g}")
            layer = s.layers[cpath.replace(".", "__")]
            for part, param in (("down", layer.lora_down), ("up", layer.lora_up)):
                t = slot[part]
                if t.dim() == 2:  # linear-style (out, in) for 1x1 kernels
                    t = t[:, :, None, None]
                if tuple(t.shape) != tuple(param.shape[1:]):
                    raise CheckpointError(f"{lora_file}: shape mismatch for the {part} weight of {cpath}: file has "
                                          f"{tuple(t.shape)}, adapter has {tuple(param.shape[1:])}")
                param[0].copy_(t.to(param.dtype))
        if norm_file is not None:
            norms = norm_parameters(unet)
            for k, t in load_safetensors_checked(norm_file).items():
                k2 = k.removeprefix("unet.")
                if k2 not in norms:
                    raise CheckpointError(f"{norm_file}: key {k!r} is not a ResNet norm1/norm2 parameter of this UNet")
                if tuple(t.shape) != tuple(norms[k2].shape):
                    raise CheckpointError(f"{norm_file}: shape mismatch for {k!r}: file has {tuple(t.shape)}, "
                                          f"UNet has {tuple(norms[k2].shape)}")
                norms[k2].copy_(t.to(norms[k2].dtype))
    return unet
