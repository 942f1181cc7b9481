"""Operator-level profiles of benchmark cases (torch.profiler), to find per-call overheads."""

from __future__ import annotations

import torch

from adapterkit.bench.cases import BuildContext, Case
from adapterkit.bench.runner import Settings, _Stepper
from adapterkit.bench.shapes import Batch, Shape


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
