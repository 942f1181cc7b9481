"""An AdamW that treats per-task weight copies like separate modules.

Per-task weights are stored stacked (n_tasks, ...) so one op serves any mix of tasks.
In a batch that routes only some tasks, the other tasks' rows get exactly zero
gradient. Plain AdamW would still move them (stale momentum) and decay them, unlike
the reference implementations, whose unused per-task modules get no gradient and are
skipped. ``TaskAwareAdamW`` restores such rows (parameter and both moments) after the
step, so an unused task's weights and optimizer state do not change. (The shared step
counter still advances; it only affects Adam's bias correction.)
"""

from __future__ import annotations

import torch

TAG = "_adapterkit_task_stacked"


def mark_task_stacked(p: torch.nn.Parameter) -> torch.nn.Parameter:
    """Tag a parameter whose dim 0 indexes tasks."""
    setattr(p, TAG, True)
    return p


class TaskAwareAdamW(torch.optim.AdamW):
    """AdamW that leaves per-task rows with an all-zero gradient untouched.

    Free of host syncs (the rows to keep are a device mask, applied with ``torch.where``),
    so it also runs inside a CUDA graph (:class:`adapterkit.GraphedStep`).
    """

    @torch.no_grad()
    def step(self, closure=None):
        saved = []
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None or not getattr(p, TAG, False) or p.shape[0] < 2:
                    continue
                keep = (p.grad.reshape(p.shape[0], -1) == 0).all(1).view((-1,) + (1,) * (p.dim() - 1))
                st = self.state.get(p, {})
                moments = {k: st[k].clone() for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
                           if isinstance(st.get(k), torch.Tensor) and st[k].shape == p.shape}
                saved.append((p, keep, p.clone(), moments))
        loss = super().step(closure)
        for p, keep, old, moments in saved:
            p.copy_(torch.where(keep, old, p))
            st = self.state[p]
            for k, v in moments.items():
                st[k].copy_(torch.where(keep, v, st[k]))
        return loss
