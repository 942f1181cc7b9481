"""Training and sampling for ResAdapter on a diffusers UNet (the base UNet stays frozen).

ResAdapter (bytedance/res-adapter) releases weights and inference code only; its paper
trains the resolution LoRA (``conv_lora`` on the down/up-sampler convs) and the ResNet
GroupNorms with the UNet's own denoising objective on mixed-resolution data, the rest
frozen. This module does that with diffusers' schedulers:

- :func:`diffusion_loss`: t ~ U{0..T-1}, x_t = ``scheduler.add_noise(x_0, ε, t)``, MSE
  between the UNet output and the scheduler's target (ε, v = ``get_velocity``, or x_0,
  following ``scheduler.config.prediction_type``).
- :func:`train_resadapter`: AdamW over the trainable parameters only (after
  :func:`adapterkit.diffusion.resadapter.add_resadapter`: the LoRA and the norms), one
  batch per step cycling through ``batches``; each batch may have its own resolution
  (bucketed mixed-resolution training: one resolution per batch).
- :func:`sample`: the scheduler's reverse loop (DDPM, DDIM, ...) at any height/width the
  UNet accepts, optional classifier-free guidance.

Inputs are whatever the UNet denoises (latents for a latent-diffusion UNet, images for a
pixel UNet); ``cond`` is ``encoder_hidden_states`` for a ``UNet2DConditionModel`` (None for
a ``UNet2DModel``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.errors import ConfigError, DataError

__all__ = ["diffusion_loss", "sample", "train_resadapter"]


def _unet_out(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    out = unet(x, t, encoder_hidden_states=cond) if cond is not None else unet(x, t)
    return out.sample if hasattr(out, "sample") else out[0]


def _target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ConfigError(f"unsupported scheduler prediction_type {kind!r} (epsilon, v_prediction or sample)")


def diffusion_loss(unet: nn.Module, scheduler, x0: torch.Tensor, cond: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The denoising MSE of one batch ``x0`` (B, C, H, W) at random timesteps and noise.

    ``generator`` (a CPU generator) fixes the timesteps and the noise.
    """
    if x0.dim() != 4:
        raise DataError(f"diffusion_loss expects a (batch, channels, height, width) tensor, got shape {tuple(x0.shape)}")
    b = x0.shape[0]
    n_train = int(scheduler.config.num_train_timesteps)
    t = torch.randint(0, n_train, (b,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device=x0.device, dtype=x0.dtype)
    xt = scheduler.add_noise(x0, noise, t)
    pred = _unet_out(unet, xt, t, cond)
    return F.mse_loss(pred.float(), _target(scheduler, x0, noise, t).float())


def _check_batches(batches, unet: nn.Module) -> None:
    if not batches:
        raise DataError("train_resadapter needs at least one batch")
    want = getattr(getattr(unet, "config", None), "in_channels", None)
    for i, b in enumerate(batches):
        if not isinstance(b, (tuple, list)) or len(b) != 2:
            raise DataError(f"batch {i} must be a pair (x0, cond); cond may be None")
        x0 = b[0]
        if not isinstance(x0, torch.Tensor) or x0.dim() != 4:
            raise DataError(f"batch {i}: x0 must be a (batch, channels, height, width) tensor")
        if want is not None and x0.shape[1] != want:
            raise DataError(f"batch {i} has {x0.shape[1]} channels; the UNet takes {want}")


def train_resadapter(unet: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]], scheduler=None,
                     steps: int = 100, lr: float = 1e-4, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                     seed: int = 0) -> list[float]:
    """Train the UNet's trainable parameters (the attached ResAdapter) on ``batches``.

    ``batches``: pairs (x0, cond); step i uses ``batches[i % len(batches)]``, so batches of
    different resolutions interleave. ``scheduler`` defaults to a 1000-step DDPM schedule.
    Returns the loss of every step. The UNet's mode (train/eval) is restored afterwards.
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a positive number, got {lr}")
    _check_batches(batches, unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the UNet has no trainable parameters: attach ResAdapter first "
                          "(adapterkit.diffusion.resadapter.add_resadapter)")
    if scheduler is None:
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    was_training = unet.training
    unet.train()
    losses: list[float] = []
    try:
        for step in range(steps):
            x0, cond = batches[step % len(batches)]
            loss = diffusion_loss(unet, scheduler, x0, cond, gen)
            if not torch.isfinite(loss):
                raise DataError(f"non-finite diffusion loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        unet.train(was_training)
    return losses


@torch.no_grad()
def sample(unet: nn.Module, scheduler, batch: int, height: int, width: int, cond: torch.Tensor | None = None,
           steps: int = 10, generator: torch.Generator | None = None, guidance_scale: float = 1.0,
           uncond: torch.Tensor | None = None) -> torch.Tensor:
    """Denoise (batch, C, height, width) Gaussian noise with ``scheduler``'s reverse process.

    With ``guidance_scale`` != 1 and ``uncond`` (the unconditional ``encoder_hidden_states``),
    classifier-free guidance: ε = ε_u + s·(ε_c − ε_u), both halves in one UNet call.
    """
    if height < 1 or width < 1 or batch < 1 or steps < 1:
        raise ConfigError(f"batch, height, width and steps must be >= 1, got {batch}, {height}, {width}, {steps}")
    guided = guidance_scale != 1.0
    if guided and (cond is None or uncond is None):
        raise ConfigError("classifier-free guidance needs both cond and uncond encoder_hidden_states")
    p = next(unet.parameters())
    channels = int(unet.config.in_channels)
    scheduler.set_timesteps(steps)
    x = torch.randn((batch, channels, height, width), generator=generator, dtype=torch.float32)
    x = (x * scheduler.init_noise_sigma).to(device=p.device, dtype=p.dtype)
    ctx = torch.cat([uncond.expand_as(cond), cond]) if guided else cond
    was_training = unet.training
    unet.eval()
    try:
        for t in scheduler.timesteps:
            inp = torch.cat([x, x]) if guided else x
            inp = scheduler.scale_model_input(inp, t)
            eps = _unet_out(unet, inp, t, ctx)
            if guided:
                eu, ec = eps.chunk(2)
                eps = eu + guidance_scale * (ec - eu)
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
    finally:
        unet.train(was_training)
    return x
