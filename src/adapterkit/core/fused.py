"""Fused adapter branches: the LoRA and bottleneck branches in fewer ops per step.

An eager step is bound by its op count (each op a dispatch and, on a GPU, a launch; see
docs/benchmarks.md), and an adapter branch is a handful of small ops. Two fused forms
compute the same function as the plain ops (within floating-point rounding):

- ``"eager"`` (the default of every LoRA and bottleneck set): an autograd function per
  branch with a hand-written backward.

  LoRA, ``out + s * (x A^T) B^T``: forward ``mm`` + ``addmm(out, z, B^T, alpha=s)`` (the
  scale and the add fold into the GEMM); backward ``addmm(beta=0, alpha=s)`` for the
  rank-r gradient and for B's, ``mm`` for A's and the input's: 5-6 ops instead of 8-9.

  Bottleneck, ``res + s * (f(x W_d^T + b_d) W_u^T + b_u)``: the residual's gradient and the
  adapter input's are summed inside one ``addmm`` of the backward (not by a separate add),
  the scale is one multiply of the incoming gradient, and a ReLU bottleneck runs its
  down-projection, bias and activation as one ``_addmm_activation`` (cuBLASLt epilogue
  on a GPU): one to three ops fewer per place.

- ``"compile"`` (opt-in, :func:`fuse`): the plain branch function under ``torch.compile``
  (inductor by default), so that its pointwise ops (bias, activation, scale, residual) fuse
  into the GEMMs' neighbours; a function on tensors, so every place of a width shares
  one compiled graph.

``"off"`` runs the plain ops (the reference the tests compare against). Under autocast
the fused forms cast inputs and weights to the autocast dtype exactly as autocast does for
the plain ops. A batch that mixes tasks with per-task weights is not fused: it already
runs every task's branch in one masked GEMM pair (:func:`adapterkit.core.task_linear.task_pair`),
nor are bottlenecks with their own LayerNorm, a learned scale or an active dropout.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.activations import ACT
from adapterkit.errors import ConfigError

MODES = ("off", "eager", "compile")

# activation name -> (forward on the pre-activation z, backward (grad, z, a) -> grad of z)
_ACT_BACKWARD = {
    "relu": lambda g, z, a: torch.ops.aten.threshold_backward(g, a, 0),
    "gelu": lambda g, z, a: torch.ops.aten.gelu_backward(g, z),
    "gelu_new": lambda g, z, a: torch.ops.aten.gelu_backward(g, z, approximate="tanh"),
    "swish": lambda g, z, a: torch.ops.aten.silu_backward(g, z),
    "silu": lambda g, z, a: torch.ops.aten.silu_backward(g, z),
    "tanh": lambda g, z, a: torch.ops.aten.tanh_backward(g, a),
    "identity": lambda g, z, a: g,
}
FUSABLE_ACTIVATIONS = tuple(_ACT_BACKWARD)

def _scaled_mm(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """``s * a @ b`` in one op (``addmm`` with beta 0 ignores its input: a row of b, a view)."""
    return torch.mm(a, b) if s == 1.0 else torch.addmm(b[0], a, b, beta=0, alpha=s)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the plain ops would compute a matmul of ``x`` in (the autocast dtype, if on)."""
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _LoraAdd(torch.autograd.Function):
    """out + scale * (x A^T) B^T, with x, out (..., in/out) and A (r, in), B (out, r)."""

    @staticmethod
    def forward(ctx, out, x, a, b, scale):
        dt = out.dtype
        x2, ac, bc = _flat(x).to(dt), a.to(dt), b.to(dt)
        z = torch.mm(x2, ac.t())
        y = torch.addmm(_flat(out), z, bc.t(), alpha=scale)
        ctx.save_for_backward(x2, ac, bc, z)
        ctx.scale, ctx.x_shape = scale, x.shape
        return y.view(out.shape)

    @staticmethod
    def backward(ctx, g):
        x2, ac, bc, z = ctx.saved_tensors
        s = ctx.scale
        g2 = _flat(g)
        gz = _scaled_mm(g2, bc, s)                                      # (N, r)
        ga = torch.mm(gz.t(), x2) if ctx.needs_input_grad[2] else None
        gb = _scaled_mm(g2.t(), z, s) if ctx.needs_input_grad[3] else None
        gx = torch.mm(gz, ac).view(ctx.x_shape) if ctx.needs_input_grad[1] else None
        return g, gx, ga, gb, None


class _BottleneckAdd(torch.autograd.Function):
    """[res +] scale * (f(x W_d^T + b_d) W_u^T + b_u); ``res_is_x``: the residual is x itself
    (its two gradients are summed inside one addmm)."""

    @staticmethod
    def forward(ctx, x, res, wd, bd, wu, bu, act, scale, res_is_x):
        dt = compute_dtype(x)
        x2 = _flat(x).to(dt)
        wdc, bdc, wuc, buc = wd.to(dt), bd.to(dt), wu.to(dt), bu.to(dt)
        if act == "relu":
            z, a = None, torch._addmm_activation(bdc, x2, wdc.t())
        else:
            z = torch.addmm(bdc, x2, wdc.t())
            a = ACT[act](z)
        r = x2 if res_is_x else (None if res is None else _flat(res))
        if r is None:
            y = torch.addmm(buc, a, wuc.t(), beta=scale, alpha=scale)
        elif scale == 1.0:
            y = torch.addmm(buc, a, wuc.t()).add_(r)
        else:
            y = torch.addmm(r, a, wuc.t(), alpha=scale).add_(buc, alpha=scale)
        ctx.save_for_backward(x2, wdc, wuc, a, z)
        ctx.act, ctx.scale, ctx.res_is_x, ctx.has_res = act, scale, res_is_x, r is not None
        ctx.x_shape = x.shape
        return y.view(x.shape[:-1] + (wu.shape[0],))

    @staticmethod
    def backward(ctx, g):
        x2, wdc, wuc, a, z = ctx.saved_tensors
        need = ctx.needs_input_grad
        g2 = _flat(g)
        gs = g2 if ctx.scale == 1.0 else g2 * ctx.scale
        gwu = torch.mm(gs.t(), a) if need[4] else None
        gbu = gs.sum(0) if need[5] else None
        gz = _ACT_BACKWARD[ctx.act](torch.mm(gs, wuc), z, a)
        gwd = torch.mm(gz.t(), x2) if need[2] else None
        gbd = gz.sum(0) if need[3] else None
        gx = None
        if need[0]:
            gx = torch.addmm(g2, gz, wdc) if ctx.res_is_x else torch.mm(gz, wdc)
            gx = gx.view(ctx.x_shape)
        gres = g if (need[1] and ctx.has_res and not ctx.res_is_x) else None
        return gx, gres, gwd, gbd, gwu, gbu, None, None, None


# -- the plain branch functions (what "off" computes, and what "compile" compiles) -------------
def lora_plain(out, x, a, b, scale: float):
    return out + F.linear(F.linear(x, a) * scale, b)


def bottleneck_plain(x, res, wd, bd, wu, bu, act: str, scale: float, res_is_x: bool):
    y = F.linear(ACT[act](F.linear(x, wd, bd)), wu, bu)
    if scale != 1.0:
        y = y * scale
    r = x if res_is_x else res
    return y if r is None else r + y


@functools.cache
def _compiled(fn, backend: str):
    return torch.compile(fn, backend=backend)


def lora_add(out, x, a, b, scale: float, mode: str = "eager", backend: str = "inductor"):
    """``out + scale * (x a^T) b^T`` by ``mode`` (a, b: one task's 2-D weights)."""
    if mode == "eager" and out.dtype == compute_dtype(x) and out.is_floating_point():
        return _LoraAdd.apply(out, x, a, b, scale)
    if mode == "compile":
        return _compiled(lora_plain, backend)(out, x, a, b, scale)
    return lora_plain(out, x, a, b, scale)


def bottleneck_add(x, res, wd, bd, wu, bu, act: str, scale: float = 1.0, mode: str = "eager",
                   backend: str = "inductor"):
    """``res + scale * up(act(down(x)))`` (``res`` None: no residual; ``res is x``: the adapter's
    own input) by ``mode``; wd (m, d), bd (m,), wu (d, m), bu (d,): one task's weights."""
    res_is_x = res is x
    dt = compute_dtype(x)
    if mode == "eager" and act in _ACT_BACKWARD and (res is None or res.dtype == dt):
        return _BottleneckAdd.apply(x, None if res_is_x else res, wd, bd, wu, bu, act, float(scale), res_is_x)
    if mode == "compile":
        return _compiled(bottleneck_plain, backend)(x, None if res_is_x else res, wd, bd, wu, bu, act, float(scale),
                                                    res_is_x)
    return bottleneck_plain(x, None if res_is_x else res, wd, bd, wu, bu, act, float(scale), res_is_x)


def one_task_weight(weight: torch.Tensor, task) -> torch.Tensor:
    """The 2-D weight of one task from a stacked (n, ...) one: shared (n == 1) as a view
    (``squeeze``: no copy in the backward), else ``weight[task]`` (task None: copy 0)."""
    if weight.shape[0] == 1:
        return weight.squeeze(0)
    return weight[0 if task is None else task]


def fuse_branches(model: nn.Module, mode: str = "compile", backend: str = "inductor") -> nn.Module:
    """Set how the LoRA and bottleneck branches of ``model`` run: ``"compile"`` (their branch
    function under ``torch.compile(backend=backend)``), ``"eager"`` (the default: hand-fused
    autograd functions, fewer ops) or ``"off"`` (the plain ops). Returns ``model``."""
    from adapterkit.core.base import get_container

    if mode not in MODES:
        raise ConfigError(f'fuse: mode must be one of {list(MODES)}, got "{mode}"')
    if not isinstance(backend, str) or not backend:
        raise ConfigError(f"fuse_branches: backend must be a torch.compile backend name, got {backend!r}")
    container = get_container(model)
    sets = [s for s in (container.sets.values() if container is not None else []) if hasattr(s, "fused")]
    if not sets:
        raise ConfigError("fuse_branches: the model has no LoRA or bottleneck adapters (add_adapters first)")
    for s in sets:
        s.fused, s.fused_backend = mode, backend
    return model


__all__ = ["MODES", "FUSABLE_ACTIVATIONS", "fuse_branches", "lora_add", "bottleneck_add", "lora_plain", "bottleneck_plain",
           "compute_dtype", "one_task_weight"]
