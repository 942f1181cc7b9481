"""Linear maps with one weight copy per task (or one shared copy), served in one op.

Weights are stacked (n, out, in): n == 1 means shared by every task. A batch routed to
one task uses a plain ``F.linear``. A mixed batch (a per-example task tensor) is served
without loops over tasks or examples, in one of two ways:

- a down/up pair (bottleneck adapters, LoRA) with few tasks (<= ``MASKED_MAX_TASKS``, and
  all tasks' widths together within ``MASKED_MAX_WIDTH_RATIO`` x the model width):
  :func:`task_pair` runs every task's down-projection in one GEMM, zeroes the blocks
  of the other tasks with a one-hot mask, and runs one up-projection GEMM whose inner
  dimension spans all tasks' blocks. n times the adapter FLOPs (tiny next to the
  model), no per-example weight copies, no scatter in the backward;
- otherwise each example's weight is gathered and one batched matmul runs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.optim import mark_task_stacked
from adapterkit.core.routing import Resolved, expand_to_batch, task_one_hot


def task_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, task: Resolved | None):
    """y = x W_t^T + b_t. ``weight`` (n, out, in); ``bias`` (n, out) or None; x (B, ..., in)."""
    if weight.shape[0] == 1 or task is None:
        # squeeze (a view) rather than weight[0]: select's backward would allocate a zero tensor and copy
        return F.linear(x, weight.squeeze(0) if weight.shape[0] == 1 else weight[0],
                        None if bias is None else (bias.squeeze(0) if bias.shape[0] == 1 else bias[0]))
    if isinstance(task, int):
        return F.linear(x, weight[task], None if bias is None else bias[task])
    task = expand_to_batch(task, x.shape[0])
    shape = x.shape
    x3 = x.reshape(shape[0], -1, shape[-1])
    w = weight.index_select(0, task)  # (B, out, in)
    if bias is None:
        y = torch.bmm(x3, w.transpose(1, 2))
    else:
        y = torch.baddbmm(bias.index_select(0, task).unsqueeze(1), x3, w.transpose(1, 2))
    return y.reshape(*shape[:-1], weight.shape[1])


MASKED_MAX_TASKS = 8  # task_pair's masked path up to this many tasks; gathered bmm above
# ... and while all tasks' bottleneck widths together (n * m) stay within this many times the
# model width (the masked path does n times the adapter FLOPs: cheap for r 96 / 128 on d 768,
# not for r 128 on a d 128 toy model)
MASKED_MAX_WIDTH_RATIO = 1.0


def task_pair(x: torch.Tensor, down: TaskLinear, up: TaskLinear, task: Resolved | None, mid=None) -> torch.Tensor:
    """``up(mid(down(x)))`` with each example routed to its task's copies of ``down``/``up``.

    ``mid`` (e.g. activation + dropout, or a scale) acts on the down output. With a
    single task (``task`` None/int, or both maps shared) this is two plain linears.
    """
    nd, nu = down.weight.shape[0], up.weight.shape[0]
    mixed = isinstance(task, torch.Tensor) and (nd > 1 or nu > 1)
    n, m, d = max(nd, nu), down.out_features, up.out_features
    if not mixed or n > MASKED_MAX_TASKS or n * m > MASKED_MAX_WIDTH_RATIO * max(down.in_features, d):
        z = down(x, task)
        return up(mid(z) if mid is not None else z, task)
    b = x.shape[0]
    task = expand_to_batch(task, b)
    lead = x.shape[:-1]
    bshape = (b,) + (1,) * (x.dim() - 2)  # broadcasts a per-example value over the sequence
    if nd > 1:  # all tasks' down-projections in one GEMM: (..., n*m)
        z = F.linear(x, down.weight.reshape(nd * m, -1), None if down.bias is None else down.bias.reshape(-1))
    else:
        z = F.linear(x, down.weight.squeeze(0), None if down.bias is None else down.bias.squeeze(0))
    if mid is not None:
        z = mid(z)
    mask = task_one_hot(task, n, z.dtype).view(bshape + (n, 1))
    if nu > 1:
        zb = (z.view(lead + (nd, m)) * mask).reshape(lead + (n * m,))  # shared down: broadcast to n blocks
        y = F.linear(zb, up.weight.transpose(0, 1).reshape(d, n * m))
        if up.bias is not None:
            y = y + up.bias.index_select(0, task).view(bshape + (d,)).to(y.dtype)
        return y
    zs = (z.view(lead + (n, m)) * mask).sum(-2)  # per-task down, shared up: keep each example's block
    return F.linear(zs, up.weight.squeeze(0), None if up.bias is None else up.bias.squeeze(0))


def init_weight(w: torch.Tensor, scheme: str) -> None:
    """Initialise a stacked (n, out, in) weight in place by a named scheme."""
    with torch.no_grad():
        if scheme == "zeros":
            w.zero_()
        elif scheme == "bert":
            w.normal_(0.0, 0.02)
        elif scheme == "houlsby":  # truncated normal, std 1e-3 (google-research/adapter-bert)
            nn.init.trunc_normal_(w, std=1e-3, a=-2e-3, b=2e-3)
        elif scheme == "kaiming":  # nn.Linear / LoRA A: kaiming-uniform(a=sqrt(5)) per copy
            for i in range(w.shape[0]):
                nn.init.kaiming_uniform_(w[i], a=math.sqrt(5))
        elif scheme == "xavier":
            for i in range(w.shape[0]):
                nn.init.xavier_uniform_(w[i])
        elif scheme.startswith("normal:"):
            w.normal_(0.0, float(scheme.split(":", 1)[1]))
        else:
            raise ValueError(f"unknown init scheme {scheme!r}")


class TaskLinear(nn.Module):
    """Linear layer with ``n`` stacked copies (1 = shared across tasks)."""

    def __init__(self, in_features: int, out_features: int, n: int = 1, bias: bool = True, init: str = "kaiming"):
        super().__init__()
        self.in_features, self.out_features, self.n = in_features, out_features, n
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(n, out_features)) if bias else None
        init_weight(self.weight, init)
        if n > 1:
            for p in (self.weight, self.bias):
                if p is not None:
                    mark_task_stacked(p)

    def forward(self, x: torch.Tensor, task: Resolved | None = None) -> torch.Tensor:
        return task_linear(x, self.weight, self.bias, task)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, copies={self.n}, bias={self.bias is not None}"
