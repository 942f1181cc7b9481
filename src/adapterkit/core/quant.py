"""Frozen backbone weights stored int8 (weight-only, one scale per output channel).

For big backbones the frozen weights are most of the memory of adapter training. After
``add_adapters``, :func:`quantize_frozen` stores the weight of every frozen ``nn.Linear``
as int8 with a float32 scale per output row (symmetric: ``scale = max|w_row| / 127``):
about a quarter of its fp32 bytes. The module stays the same object (its hooks, the
adapters attached to it and its place in the model are kept); only its class becomes
:class:`Int8Linear`, whose forward is ``x W_deq^T + b`` with ``W_deq = W_int8 * scale``:

- on the CPU through torch's weight-only int8 GEMM (``aten::_weight_int8pack_mm``: the
  dequantised weight is never materialised), elsewhere by dequantising the weight into the
  compute dtype for the matmul;
- under autocast in the autocast dtype, as an ``nn.Linear`` would be;
- the backward is exact for the quantised model: the input's gradient is ``g W_deq``
  (so every adapter before the layer trains with the gradients of the dequantised weights),
  a trainable bias gets its gradient; the int8 weight itself never trains.

Reading ``module.weight`` returns the dequantised weight (a new tensor each time); writing it
is refused, so merging a LoRA into quantised weights is an error that says to
:func:`dequantize_frozen` first. Linears whose weight trains, is tied to another module
(an LM head tied to the embeddings), or is not floating point are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from adapterkit.core.fused import compute_dtype
from adapterkit.errors import ConfigError

QMAX = 127


def _int8pack_ok(x: torch.Tensor, dt: torch.dtype) -> bool:
    """torch's weight-only int8 CPU GEMM: fp32 any width; bf16/fp16 with the inner width a
    multiple of 32 (narrower bf16 shapes crashed in torch 2.13)."""
    if x.device.type != "cpu" or not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return False
    return dt == torch.float32 or (dt in (torch.bfloat16, torch.float16) and x.shape[-1] % 32 == 0)


def dequantize(wq: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return wq.to(dtype) * scale.to(dtype).unsqueeze(1)


class _Int8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wq, scale, bias):
        dt = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        if _int8pack_ok(x2, dt):
            y = torch.ops.aten._weight_int8pack_mm(x2, wq, scale.to(dt))
        else:
            y = torch.mm(x2, dequantize(wq, scale, dt).t())
        if bias is not None:
            y = y.add_(bias.to(dt))
        ctx.save_for_backward(wq, scale)
        ctx.dt, ctx.x_shape = dt, x.shape
        return y.view(x.shape[:-1] + (wq.shape[0],))

    @staticmethod
    def backward(ctx, g):
        wq, scale = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1]).to(ctx.dt)
        gx = torch.mm(g2, dequantize(wq, scale, ctx.dt)).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        gb = g2.sum(0) if ctx.needs_input_grad[3] else None
        return gx, None, None, gb


def int8_linear(x, wq, scale, bias=None):
    """``x (wq * scale)^T + bias``, differentiable in x and bias."""
    return _Int8Linear.apply(x, wq, scale, bias)


class Int8Linear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is stored int8 (``weight_int8``, (out, in)) with a
    float32 scale per output channel (``weight_scale``). Made by :func:`quantize_frozen`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight_int8, self.weight_scale, self.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (in the dtype the layer had), computed on every read."""
        return dequantize(self.weight_int8, self.weight_scale, self.weight_dtype)

    @weight.setter
    def weight(self, value) -> None:
        raise ConfigError("this Linear's frozen weight is stored int8 (adapterkit.quantize_frozen): it cannot be "
                          "written (merging a LoRA into it, loading weights); call "
                          "adapterkit.dequantize_frozen(model) first")

    def extra_repr(self) -> str:
        return super().extra_repr() + ", weight=int8 per-channel"


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (w_int8, scale) with ``w ~ w_int8 * scale[:, None]``."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / QMAX
    wq = torch.round(w / scale.unsqueeze(1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return wq, scale


def quantize_frozen(model: nn.Module, dtype: torch.dtype = torch.int8) -> list[str]:
    """Store the weight of every frozen ``nn.Linear`` of ``model`` int8 (see the module doc);
    returns the paths of the quantised modules. Call it after ``add_adapters`` (the freeze
    policy decides what is frozen); adapters and every trainable weight stay as they are."""
    if dtype != torch.int8:
        raise ConfigError(f"quantize_frozen stores int8 weights (dtype=torch.int8), got {dtype!r}")
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    done = []
    for path, mod in model.named_modules():
        if type(mod) is not nn.Linear or path.split(".")[0] == "adapterkit":
            continue
        w = mod.weight
        if w.requires_grad or not w.is_floating_point() or counts.get(id(w), 0) > 1:
            continue
        wq, scale = quantize_weight(w)
        dt = w.dtype
        del mod._parameters["weight"]
        mod.__class__ = Int8Linear
        mod.register_buffer("weight_int8", wq.to(w.device))
        mod.register_buffer("weight_scale", scale.to(w.device))
        mod.weight_dtype = dt
        done.append(path)
    if not done:
        raise ConfigError(f"quantize_frozen: {type(model).__name__} has no frozen nn.Linear to quantise "
                          "(add_adapters first: it freezes the backbone)")
    return done


def dequantize_frozen(model: nn.Module) -> list[str]:
    """Undo :func:`quantize_frozen`: every :class:`Int8Linear` becomes an ``nn.Linear`` again
    with its dequantised (frozen) weight. Returns the paths."""
    done = []
    for path, mod in model.named_modules():
        if isinstance(mod, Int8Linear):
            w = nn.Parameter(mod.weight, requires_grad=False)
            del mod._buffers["weight_int8"], mod._buffers["weight_scale"]
            del mod.weight_dtype
            mod.__class__ = nn.Linear
            mod.weight = w
            done.append(path)
    return done


def frozen_weight_bytes(model: nn.Module) -> int:
    """Bytes of the frozen weights: frozen parameters plus the int8 weights and their scales."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen and not p.requires_grad:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    for mod in model.modules():
        if isinstance(mod, Int8Linear):
            n += mod.weight_int8.numel() * mod.weight_int8.element_size()
            n += mod.weight_scale.numel() * mod.weight_scale.element_size()
    return n


__all__ = ["Int8Linear", "quantize_frozen", "dequantize_frozen", "quantize_weight", "int8_linear",
           "frozen_weight_bytes"]
