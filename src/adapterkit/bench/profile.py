"""Operator-level profiles of benchmark cases (torch.profiler), to find per-call overheads."""

from __future__ import annotations

import torch

from adapterkit.bench.cases import BuildContext, Case
from adapterkit.bench.runner import Settings, _Stepper
from adapterkit.bench.shapes import Batch, Shape

#: ops that only re-describe a tensor (no kernel of their own): left out of :func:`count_ops`
VIEW_OPS = ("aten::view", "aten::_unsafe_view", "aten::t", "aten::transpose", "aten::expand", "aten::squeeze",
            "aten::unsqueeze", "aten::reshape", "aten::alias", "aten::detach", "aten::slice", "aten::select",
            "aten::permute", "aten::as_strided", "aten::unbind", "aten::split")


def count_ops(fn) -> int:
    """The number of aten ops (forward and backward, views left out) that ``fn()`` dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func._schema.name.startswith(VIEW_OPS):
                self.n += 1
            return func(*args, **(kwargs or {}))

    counter = Count()
    with counter:
        fn()
    return counter.n


def count_step_ops(model, input_ids, labels, route=None) -> int:
    """Ops of one training step (loss and backward) of ``model`` under ``route``, after one
    uncounted step (lazy initialisation out of the count); gradients are cleared after."""
    import contextlib

    from adapterkit.core.routing import route as route_ctx

    def step():
        with route_ctx(route) if route is not None else contextlib.nullcontext():
            model(input_ids=input_ids, labels=labels).loss.backward()

    step()
    n = count_ops(step)
    model.zero_grad(set_to_none=True)
    return n


def profile_case(case: Case, shape: Shape, settings: Settings, batch: Batch, steps: int = 3,
                 row_limit: int = 15) -> str:
    """Profile ``steps`` steps of ``case`` after its warm-up; returns the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    ctx = BuildContext(shape, torch.device(settings.device), settings.seed, batch)
    prep = case.build(ctx)
    stepper = _Stepper(prep, case.kind, batch, settings)
    for _ in range(max(settings.warmup, 1)):
        stepper.step()
    activities = [ProfilerActivity.CPU]
    on_gpu = torch.device(settings.device).type == "cuda"
    if on_gpu:
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            stepper.step()
        if on_gpu:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if on_gpu else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=row_limit)
