"""Lottery-ticket sparse fine-tuning (LT-SFT, cambridgeltl/composable-sft).

theta_0 is the model's weights when :class:`LotteryTicketSFT` is built (the pretrained
weights, or pretrained + a language SFT when a task SFT is trained on top of one). Each
of the ``n_iterations`` iterations (reference ``LotteryTicketSparseFineTuner.train``):

1. Snapshot the iteration's start and train **all** maskable parameters
   (``train_fn(model, "full")``).
2. Unmask the K/n not-yet-selected entries with the largest ``|theta - theta_0|``,
   always measured from the **original** theta_0 (the reference's ``_original_params``),
   never from the iteration's start.
3. Reset the model (maskable and dense parameters) to the iteration's start; for the
   first iteration that is theta_0, later it is theta_0 plus the earlier iterations'
   sparse training (the reference's ``previous_params``).
4. Retrain with gradients multiplied by the mask (``train_fn(model, "sparse")``);
   masked-out entries are also reset afterwards, so optimizer weight decay cannot leak
   into them.

Because of that reset, every entry that is not selected yet holds theta_0 at the start
of each iteration, so on those entries the change from the iteration's start and the
change from theta_0 agree; :meth:`LotteryTicketSFT.run` refuses a model that no longer
holds theta_0 (a second ``run`` without ``restore=True``, or weights changed after the
tuner was built), where they would not.

The result is a :class:`~adapterkit.sft.diff.SparseDiff` phi = (theta - theta_0) over
the mask (entries with ``|phi| <= 1e-7`` dropped); ``dense`` parameters (task heads)
are trained in both phases and stored whole. LayerNorms are excluded by default.
``train_fn`` owns the training loop (build the optimizer inside it, over
``model.parameters()`` with ``requires_grad``); it may add :meth:`LotteryTicketSFT.l1_penalty`
to its loss (the reference's L1 pull towards theta_0).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from adapterkit.errors import ConfigError
from adapterkit.sft.diff import SparseDiff, top_k_masks

DEFAULT_EXCLUDE = (r"(?i)layer_?norm", r"(?i)\bln_?\w*\.", r"(?i)norm\.(weight|bias)$")


class LotteryTicketSFT:
    """Runs LT-SFT on ``model`` with a user training function.

    ``k``: number of entries in the difference. ``include`` / ``exclude``: regexes
    over parameter names choosing the maskable parameters (default: every floating
    parameter except LayerNorms). ``dense``: regexes of parameters trained densely
    and stored whole (heads). Everything else is frozen during both phases.
    """

    def __init__(
        self,
        model: nn.Module,
        k: int,
        *,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] = DEFAULT_EXCLUDE,
        dense: Iterable[str] = (),
        n_iterations: int = 1,
        threshold: float = 1e-7,
    ):
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        if n_iterations < 1:
            raise ConfigError(f"n_iterations must be >= 1, got {n_iterations}")
        self.model, self.k, self.n_iterations, self.threshold = model, int(k), int(n_iterations), threshold
        inc = [re.compile(p) for p in include] if include is not None else None
        exc = [re.compile(p) for p in exclude]
        den = [re.compile(p) for p in dense]
        self.params: dict[str, nn.Parameter] = {}
        self.dense: dict[str, nn.Parameter] = {}
        for n, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            if any(r.search(n) for r in den):
                self.dense[n] = p
            elif (inc is None or any(r.search(n) for r in inc)) and not any(r.search(n) for r in exc):
                self.params[n] = p
        if not self.params:
            raise ConfigError("no maskable parameters: include/exclude patterns select nothing")
        total = sum(p.numel() for p in self.params.values())
        if self.k > total:
            raise ConfigError(f"k={self.k} exceeds the {total} maskable entries")
        self.theta0 = {n: p.detach().clone() for n, p in self.params.items()}
        self.dense0 = {n: p.detach().clone() for n, p in self.dense.items()}
        self.masks: dict[str, torch.Tensor] = {}
        self.iteration = 0
        self.phase = ""

    def l1_penalty(self) -> torch.Tensor:
        """sum |theta - theta_0| / N over the maskable parameters (differentiable)."""
        total = sum(p.numel() for p in self.params.values())
        s = sum((p - self.theta0[n].to(p.device)).abs().sum() for n, p in self.params.items())
        return s / total

    def _set_trainable(self, flags: dict[str, bool]) -> dict[str, bool]:
        before = {}
        for n, p in self.model.named_parameters():
            before[n] = p.requires_grad
            p.requires_grad_(flags.get(n, False))
        return before

    @torch.no_grad()
    def _reset(self, start: dict[str, torch.Tensor], dense_start: dict[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            p.copy_(start[n])
        for n, p in self.dense.items():
            p.copy_(dense_start[n])

    def _check_at_theta0(self) -> None:
        moved = [n for n, p in self.params.items() if not torch.equal(p.detach(), self.theta0[n].to(p.device))]
        if moved:
            raise ConfigError(
                f"the model no longer holds the weights LotteryTicketSFT took as theta_0 ({len(moved)} parameters "
                f"changed, e.g. {moved[0]!r}): run() was already called without restore=True, or the weights were "
                "changed after the tuner was built; build a new LotteryTicketSFT on the model to fine-tune")

    @torch.no_grad()
    def select(self, selected: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        """The ``k`` entries, among those not ``selected`` yet, whose current value moved
        furthest from the original theta_0 (``|theta - theta_0|``); boolean masks."""
        scores = {n: (p.detach() - self.theta0[n].to(p.device)).abs().float().masked_fill(selected[n], -1.0).cpu()
                  for n, p in self.params.items()}
        return top_k_masks(scores, k)

    def run(self, train_fn: Callable[[nn.Module, str], None], restore: bool = False) -> SparseDiff:
        """Run LT-SFT; return the difference. The model ends fine-tuned (theta_0 + phi),
        or back at theta_0 (bit for bit) with ``restore=True``."""
        self._check_at_theta0()
        flags = {n: True for n in list(self.params) + list(self.dense)}
        before = self._set_trainable(flags)
        selected = {n: torch.zeros(p.shape, dtype=torch.bool, device=p.device) for n, p in self.params.items()}
        per_iter = [self.k // self.n_iterations + (1 if i < self.k % self.n_iterations else 0)
                    for i in range(self.n_iterations)]
        try:
            for it, k_it in enumerate(per_iter):
                self.iteration = it
                start = {n: p.detach().clone() for n, p in self.params.items()}
                dense_start = {n: p.detach().clone() for n, p in self.dense.items()}
                self.phase = "full"
                train_fn(self.model, "full")
                new = self.select(selected, k_it)
                for n in selected:
                    selected[n] |= new[n].to(selected[n].device)
                self._reset(start, dense_start)
                masks = {n: m.to(self.params[n].dtype) for n, m in selected.items()}
                self.masks = selected
                handles = [p.register_hook(lambda g, m=masks[n]: g * m) for n, p in self.params.items()]
                self.phase = "sparse"
                try:
                    train_fn(self.model, "sparse")
                finally:
                    for h in handles:
                        h.remove()
                with torch.no_grad():
                    for n, p in self.params.items():
                        p.copy_(torch.where(selected[n], p, start[n]))
        finally:
            for n, p in self.model.named_parameters():
                p.requires_grad_(before.get(n, p.requires_grad))
        tuned = {n: p.detach() for n, p in self.params.items()}
        diff = SparseDiff.from_states(self.theta0, tuned, names=list(self.params), threshold=self.threshold,
                                      meta={"method": "lt-sft", "k": self.k, "n_iterations": self.n_iterations})
        for n, p in self.dense.items():
            diff.dense[n] = p.detach().clone()
            diff.shapes[n] = tuple(p.shape)
        if restore:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.theta0[n])
                for n, p in self.dense.items():
                    p.copy_(self.dense0[n])
        return diff


def lt_sft(model: nn.Module, train_fn: Callable[[nn.Module, str], None], k: int, **kw) -> SparseDiff:
    """Functional form: ``LotteryTicketSFT(model, k, **kw).run(train_fn)`` (``restore`` in ``kw``)."""
    restore = kw.pop("restore", False)
    return LotteryTicketSFT(model, k, **kw).run(train_fn, restore=restore)


__all__ = ["DEFAULT_EXCLUDE", "LotteryTicketSFT", "lt_sft"]
