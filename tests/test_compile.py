"""torch.compile friendliness: adapters trace into one graph (no graph breaks), and a
routed per-example task tensor is a graph input (new task mixes do not recompile)."""

from __future__ import annotations

import pytest
import torch

import adapterkit
from adapterkit.testing.tiny import main_output, tiny_inputs, tiny_model

TASKS = ["vqa", "gqa", "nlvr"]


@pytest.mark.parametrize("cfg", [
    {"method": "houlsby", "reduction_factor": 4},
    {"method": "lora", "r": 4},
    {"method": "compacter", "phm_dim": 2, "reduction_factor": 4},
    {"method": "houlsby", "reduction_factor": 4, "tasks": TASKS, "sharing": "per_task"},
    {"method": "lora", "r": 4, "tasks": TASKS, "sharing": "per_task"},
    {"method": "hyperformer", "tasks": TASKS, "task_embedding_dim": 8, "hidden_dim": 8, "projected_dim": 4},
])
def test_adapters_trace_without_graph_breaks(cfg):
    torch._dynamo.reset()
    model = tiny_model("bart")
    adapterkit.add_adapters(model, cfg)
    inputs = tiny_inputs("bart", batch=3)
    with adapterkit.route(torch.tensor([0, 1, 2])):
        ex = torch._dynamo.explain(model)(**inputs)
    assert ex.graph_break_count == 0, [b.reason for b in ex.break_reasons]


@pytest.mark.parametrize("cfg", [
    {"method": "houlsby", "reduction_factor": 4, "tasks": TASKS, "sharing": "per_task"},
    {"method": "compacter", "phm_dim": 2, "reduction_factor": 4, "tasks": TASKS, "sharing": "per_task"},
    {"method": "hyperformer", "tasks": TASKS, "task_embedding_dim": 8, "hidden_dim": 8, "projected_dim": 4},
])
def test_compiled_per_task_model_matches_eager_without_recompiling(cfg):
    """Per-forward caches (Compacter's stack H, Hyperformer's generated weights) and the
    routed task tensor must not be guarded on: one graph serves every call."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_model("bart").eval()
    adapterkit.add_adapters(model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapterkit" in n:
                p.normal_(0, 0.05)
    inputs = tiny_inputs("bart", batch=3)
    compiled = torch.compile(model, backend="eager")
    counters.clear()
    with torch.no_grad():
        for tasks in ([0, 1, 2], [2, 2, 0], [1, 0, 1]):
            t = torch.tensor(tasks)
            with adapterkit.route(t):
                got = main_output(compiled(**inputs))
                ref = main_output(model(**inputs))
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
