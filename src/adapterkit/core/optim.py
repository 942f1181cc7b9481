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
    @torch.no_grad()
    def step(self, closure=None):
        tagged = [p for g in self.param_groups for p in g["params"]
                  if p.grad is not None and getattr(p, TAG, False) and p.shape[0] > 1]
        saved = []
        if tagged:
            masks = [(p.grad.reshape(p.shape[0], -1) == 0).all(1) for p in tagged]
            flags = torch.cat(masks).cpu()  # one host sync for all tagged parameters
            i = 0
            for p, m in zip(tagged, masks):
                rows = flags[i:i + m.numel()].nonzero().squeeze(1)
                i += m.numel()
                if rows.numel() == 0:
                    continue
                rows = rows.to(p.device)
                st = self.state.get(p, {})
                moments = {k: st[k].index_select(0, rows).clone() for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
                           if k in st and isinstance(st[k], torch.Tensor) and st[k].shape == p.shape}
                saved.append((p, rows, p.index_select(0, rows).clone(), moments))
        loss = super().step(closure)
        for p, rows, old, moments in saved:
            p.index_copy_(0, rows, old)
            st = self.state[p]
            for k, v in moments.items():
                st[k].index_copy_(0, rows, v)
        return loss
