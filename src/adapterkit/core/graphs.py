"""Whole-step CUDA graphs: one training step (forward, loss, backward, optimizer step) or
one forward, captured once and replayed, so the host launches one graph instead of a
few thousand kernels.

Why: on a fast GPU an adapter step is bound by the host (Python, dispatch, kernel
launches), not by arithmetic: a BART-base step does about 0.7x the GPU work of full
fine-tuning, yet takes as long in eager mode (docs/benchmarks.md). A replayed graph
costs the GPU time alone.

    step = adapterkit.GraphedStep(model, optimizer, lambda b: model(**b).loss,
                                  amp_dtype=torch.bfloat16)
    for batch in loader:          # same shapes every call (pad to a fixed length)
        loss = step(batch)        # a dict of tensors; returns the loss (a tensor)

What replay keeps from capture time, so what must not change between calls: tensor
shapes and dtypes (a new shape raises), Python-side branches (a routed task given as
an int or name is a branch: pass ``key=`` so each task gets its own graph, or route a
per-example task *tensor* that is part of the batch), and the learning rate unless it
is a tensor (:meth:`GraphedStep.set_lr` updates it in place). Dropout draws fresh
masks on every replay. Each graph keeps its own memory pool (the step's activations and
gradients stay allocated between replays), so every extra ``key`` costs about one
step's activation memory; :meth:`GraphedStep.reset` frees them all. Before the first
capture the step runs ``warmup`` eager iterations on a side stream, then puts the
trainable parameters, buffers and optimizer state back exactly as they were, so warming
up trains nothing.

Anywhere a graph cannot be used (a CPU model, ``enabled=False``, or a capture that
fails because the forward syncs with the host) the step runs eagerly with the same
results; ``mode`` says which (``"graph"`` or ``"eager"``) and ``fallback_reason`` why.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import nn

from adapterkit.errors import ConfigError, warn


def _tensor_signature(batch: Mapping) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (k, "py", repr(v))
                 for k, v in sorted(batch.items()))


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


class GraphedStep:
    """A training step (with ``optimizer``) or a forward (``optimizer=None``) replayed as a CUDA graph.

    ``fn(batch) -> tensor or tuple/dict of tensors``: for training it must return the loss
    (a scalar tensor) or a tuple whose first item is the loss; it is called inside
    autocast when ``amp_dtype`` is set (autocast's weight cache is off, as graphs need).
    Training calls ``loss.backward()`` and ``optimizer.step()`` (optionally clipping the
    gradient norm to ``clip_grad_norm``) inside the graph; the optimizer must be
    capturable (torch's Adam/AdamW family: ``capturable`` is switched on here).
    Returned tensors are fresh copies (the graph's own outputs are overwritten by the
    next replay), unless ``clone_outputs=False``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, fn: Callable,
                 *, amp_dtype: torch.dtype | None = None, warmup: int = 3, clip_grad_norm: float | None = None,
                 enabled: bool = True, params: list | None = None, clone_outputs: bool = True):
        self.model, self.optimizer, self.fn = model, optimizer, fn
        self.amp_dtype, self.warmup, self.clip = amp_dtype, max(1, int(warmup)), clip_grad_norm
        self.training = optimizer is not None
        self.clone_outputs = clone_outputs
        self.device = _device_of(model)
        self.params = list(params) if params is not None else (
            [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else [])
        self._graphs: dict = {}       # key -> (graph, static inputs, static outputs, signature)
        self.fallback_reason = ""
        if not enabled:
            self.fallback_reason = "disabled"
        elif self.device.type != "cuda":
            self.fallback_reason = f"model is on {self.device.type}, CUDA graphs need a CUDA device"
        elif optimizer is not None:
            self._make_capturable(optimizer)

    @property
    def mode(self) -> str:
        return "eager" if self.fallback_reason else "graph"

    # --- the step itself -----------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=False)

    def _body(self, batch):
        """forward (+ backward + optimizer step); returns the outputs (loss first when training)."""
        if not self.training:
            with torch.no_grad(), self._autocast():
                return self.fn(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            out = self.fn(batch)
        loss = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ConfigError("GraphedStep: a training fn must return the loss (a scalar tensor) first")
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.optimizer.step()
        return out

    def __call__(self, batch: Mapping, key=None):
        if self.fallback_reason:
            out = self._body(batch)
            if self.training:
                self.optimizer.zero_grad(set_to_none=True)
            return _detach_out(out)
        sig = _tensor_signature(batch)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(batch, key, sig)
            if entry is None:  # capture failed: eager from now on
                return self(batch, key)
        graph, static_in, static_out, sig0 = entry
        if sig != sig0:
            raise ConfigError(
                f"GraphedStep: this batch's shapes/dtypes {sig} differ from the captured ones {sig0}; "
                "pad batches to one shape, or pass a different key= for each shape")
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                static_in[k].copy_(v, non_blocking=True)
        graph.replay()
        return _clone_out(static_out) if self.clone_outputs else static_out

    # --- capture -----------------------------------------------------------------------------
    @staticmethod
    def _make_capturable(opt: torch.optim.Optimizer) -> None:
        if "capturable" not in opt.defaults:
            raise ConfigError(
                f"GraphedStep: optimizer {type(opt).__name__} cannot run inside a CUDA graph "
                "(it has no `capturable` option); use torch.optim.AdamW / Adam or enabled=False")
        for g in opt.param_groups:
            g["capturable"] = True
            dev = g["params"][0].device if g["params"] else None
            if not isinstance(g["lr"], torch.Tensor) or g["lr"].device != dev:
                g["lr"] = torch.tensor(float(g["lr"]), device=dev)  # a tensor: the graph reads it on every replay
        for p, st in opt.state.items():
            s = st.get("step")
            if isinstance(s, torch.Tensor) and s.device != p.device:
                st["step"] = s.to(p.device)

    def reset(self) -> None:
        """Drop every captured graph and its memory pool (the next call captures again)."""
        for graph, *_ in self._graphs.values():
            graph.reset()
        self._graphs.clear()

    def set_lr(self, lr: float, group: int | None = None) -> None:
        """Set the learning rate in place (the graph reads the tensor on every replay)."""
        if self.optimizer is None:
            return
        groups = self.optimizer.param_groups if group is None else [self.optimizer.param_groups[group]]
        for g in groups:
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr

    def _snapshot(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        saved_p = [p.detach().clone() for p in params]
        bufs = [b for b in self.model.buffers() if b.is_floating_point() or b.dtype in (torch.int64, torch.int32)]
        saved_b = [b.detach().clone() for b in bufs]
        state = {}
        if self.optimizer is not None:
            for p, st in self.optimizer.state.items():
                state[p] = {k: v.detach().clone() for k, v in st.items() if isinstance(v, torch.Tensor)}
        return params, saved_p, bufs, saved_b, state

    @torch.no_grad()
    def _restore(self, snap) -> None:
        params, saved_p, bufs, saved_b, state = snap
        for p, s in zip(params, saved_p):
            p.copy_(s)
        for b, s in zip(bufs, saved_b):
            b.copy_(s)
        if self.optimizer is not None:
            for p, st in self.optimizer.state.items():
                old = state.get(p)
                for k, v in st.items():
                    if not isinstance(v, torch.Tensor):
                        continue
                    if old is not None and k in old:
                        v.copy_(old[k])
                    else:  # created by the warm-up: a fresh Adam state is all zeros
                        v.zero_()

    def _capture(self, batch: Mapping, key, sig):
        static_in = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        snap = self._snapshot()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._body(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
        finally:
            self._restore(snap)
        if self.training:
            self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_out = self._body(static_in)
        except Exception as e:  # a host sync in the forward, an uncapturable op...
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
            _reset_capture_state(self.device)
            self._restore(snap)
            self.fallback_reason = f"CUDA graph capture failed ({type(e).__name__}: {str(e)[:200]})"
            warn(f"GraphedStep: {self.fallback_reason}; running eagerly", stacklevel=3)
            self._graphs.clear()
            return None
        # keep the outputs' storage, not their autograd graph (its nodes would outlive the capture)
        entry = (graph, static_in, _detach_out(static_out), sig)
        self._graphs[key] = entry
        return entry


def _reset_capture_state(device) -> None:
    """After a failed capture the CUDA RNG still believes it is capturing (every later dropout
    then fails with "Offset increment outside graph capture"); one empty capture that ends
    normally puts it back."""
    with contextlib.suppress(Exception):
        g = torch.cuda.CUDAGraph()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.cuda.graph(g):
                pass
        del g


def _map_out(out, fn):
    """``fn`` applied to every tensor of an output (tensor, tuple/list or dict)."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_map_out(o, fn) for o in out)
    if isinstance(out, dict):
        return {k: _map_out(v, fn) for k, v in out.items()}
    return out


def _clone_out(out):
    return _map_out(out, lambda t: t.detach().clone())


def _detach_out(out):
    return _map_out(out, torch.Tensor.detach)
