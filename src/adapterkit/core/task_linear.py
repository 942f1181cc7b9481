"""Linear maps with one weight copy per task (or one shared copy), served in one op.

Weights are stacked (n, out, in): n == 1 means shared by every task. A batch routed to
one task uses a plain ``F.linear``; a mixed batch gathers each example's weight and
runs one batched matmul (no loop over tasks or examples).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.optim import mark_task_stacked
from adapterkit.core.routing import Resolved, expand_to_batch


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
