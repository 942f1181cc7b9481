"""On the CPU the engine's AdamW is torch's fused kernel: the same update as the default loop
to rounding, and the per-task rows that got no gradient stay untouched."""

from __future__ import annotations

import torch
from reliability_helpers import tiny_config

from adapterkit.core.optim import TaskAwareAdamW, mark_task_stacked
from adapterkit.testing.fixtures import make_vl_fixture
from adapterkit.train.config import load_config
from adapterkit.train.trainer import Trainer


def test_engine_uses_the_fused_kernel_on_the_cpu(tmp_path):
    data = make_vl_fixture(tmp_path / "data", n_images=20)
    tr = Trainer(load_config(tiny_config(data, max_steps=1)), tmp_path / "run")
    assert all(g.get("fused") for g in tr.optimizer.param_groups)


def test_fused_matches_the_loop_and_keeps_unrouted_task_rows():
    def params():
        torch.manual_seed(0)
        return [torch.nn.Parameter(torch.randn(40, 30)), mark_task_stacked(torch.nn.Parameter(torch.randn(3, 8, 5)))]
    a, b = params(), params()
    oa = TaskAwareAdamW(a, lr=1e-2, weight_decay=0.1)
    ob = TaskAwareAdamW(b, lr=1e-2, weight_decay=0.1, fused=True)
    for step in range(10):
        g = [torch.randn(40, 30), torch.randn(3, 8, 5)]
        g[1][step % 3] = 0  # one task unrouted in this batch
        before = b[1][step % 3].detach().clone()
        for p, q, x in zip(a, b, g):
            p.grad, q.grad = x.clone(), x.clone()
        oa.step()
        ob.step()
        assert torch.equal(b[1][step % 3], before)
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-6)
