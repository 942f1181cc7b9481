"""Adapter composition as AdapterHub has it: Stack, Fuse (AdapterFusion), Average, Parallel.

The adapters composed are the *tasks* of one adapter set (each task has its own adapter
copy, stacked in one tensor), so every composed forward is a few batched ops over the
stacked copies, never a Python loop over adapters::

    model = add_adapters(model, {"method": "pfeiffer", "adapter_input": "normed_sum",
                                 "tasks": ["a", "b", "c"], "sharing": "per_task", "fusion": ["a", "b", "c"]})
    compose(model, Fuse("a", "b", "c"))          # persistent, like AdapterHub's active_adapters
    with compose(model, Stack("a", Average("b", "c", weights=[0.7, 0.3]))):
        out = model(**batch)                     # the previous composition is restored afterwards

- ``Stack(a, b)``: ``a``'s adapter, then ``b``'s on its output (AdapterHub: each adapter's
  ``pre_forward`` on the running hidden state, the same sublayer residual).
- ``Average(a, b, weights=)``: AdapterHub 1.3's ``mean(stack(out_i) * w_i)`` over the adapters'
  outputs ``out_i = A_i(.) + residual``; weights are normalised to sum 1 by default. Note that
  this is ``sum_i w_i out_i / N``: the residual enters scaled by ``1/N`` (what AdapterHub computes).
- ``Fuse(a, b, ...)``: AdapterFusion (Pfeiffer et al. 2021) over the adapters' up-projections:
  query from the adapter input, key/value from each adapter's output, softmax over adapters,
  plus the residual; the set needs ``fusion: [...]`` (the trainable fusion layers).
- ``Parallel(a, b)``: the batch is repeated once per adapter and each copy routed to its
  adapter through :func:`adapterkit.route` (per-example task ids), so every method that serves
  mixed batches serves it; outputs have ``N * batch`` rows, adapter-major (as AdapterHub).

Stacking adapters of *different* sets needs no block: sets attached at the same place apply
in attachment order.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from adapterkit.errors import ConfigError


class Block:
    """A composition block over task names (or nested blocks)."""

    allowed: tuple = (str,)

    def __init__(self, *children):
        if not children:
            raise ConfigError(f"{type(self).__name__} needs at least one adapter")
        for c in children:
            if not isinstance(c, self.allowed):
                names = ", ".join(t.__name__ for t in self.allowed)
                raise ConfigError(f"{type(self).__name__} may hold {names}, got {type(c).__name__} {c!r}")
        self.children = tuple(children)

    def leaves(self) -> list[str]:
        out = []
        for c in self.children:
            out += c.leaves() if isinstance(c, Block) else [c]
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.children))})"


class Fuse(Block):
    def __init__(self, *children):
        super().__init__(*children)
        if len(children) < 2:
            raise ConfigError("Fuse needs at least two adapters")


class Average(Block):
    def __init__(self, *children, weights: list[float] | None = None, normalize_weights: bool = True):
        super().__init__(*children)
        if weights is None:
            w = [1.0 / len(children)] * len(children)
        else:
            w = [float(x) for x in weights]
            if len(w) != len(children):
                raise ConfigError(f"Average got {len(w)} weights for {len(children)} adapters")
            if normalize_weights:
                s = sum(w)
                if s == 0:
                    raise ConfigError("Average weights sum to zero; they cannot be normalised")
                w = [x / s for x in w]
        self.weights = w


class Parallel(Block):
    pass


class Stack(Block):
    allowed = (str, Fuse, Average)


def _check_tasks(block: Block, tasks: tuple[str, ...]) -> None:
    leaves = block.leaves()
    unknown = [t for t in leaves if t not in tasks]
    if unknown:
        raise ConfigError(f"{block!r} names {unknown}, which the adapter set does not declare (tasks: {list(tasks)})")
    if len(set(leaves)) != len(leaves):
        raise ConfigError(f"{block!r} names an adapter twice")


class Fusion(nn.Module):
    """AdapterFusion at one place, over ``k`` adapters (AdapterHub's dynamic/static fusion).

    scores_i = (W_q q + b_q) . (W_k u_i + b_k); p = softmax_i(scores); out = sum_i p_i W_v u_i + residual,
    with u_i the adapters' (scaled) up-projections. W_v (no bias) starts at the identity
    (1e-6 off the diagonal); without ``value`` the u_i are summed directly (static fusion).
    """

    def __init__(self, d: int, value: bool = True, dropout: float = 0.0):
        super().__init__()
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        for lin in (self.query, self.key):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self.value = None
        if value:
            self.value = nn.Linear(d, d, bias=False)
            with torch.no_grad():
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        self.p = dropout

    def forward(self, query: torch.Tensor, ups: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """query, residual (..., d); ups (..., k, d) -> (..., d)."""
        q = self.query(query)
        keys = self.key(ups)
        scores = (keys @ q.unsqueeze(-1)).squeeze(-1)              # (..., k)
        if self.p and self.training:
            scores = nn.functional.dropout(scores, self.p, True)
        probs = torch.softmax(scores, dim=-1)
        vals = self.value(ups) if self.value is not None else ups
        return (probs.unsqueeze(-2) @ vals).squeeze(-2) + residual

    def regularization(self) -> torch.Tensor:
        """AdapterHub's fusion regularisation term: 0.01 * ||I - W_v||_F^2 (zero without a value matrix)."""
        if self.value is None:
            return self.query.weight.new_zeros(())
        eye = torch.eye(self.value.weight.shape[0], device=self.value.weight.device, dtype=self.value.weight.dtype)
        return 0.01 * (eye - self.value.weight).pow(2).sum()


# -- attaching a composition to a model ----------------------------------------------------

_PARALLEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> (handles, block)


class _Handle:
    """Returned by :func:`compose`: usable as a context manager that restores the previous setup."""

    def __init__(self, restore):
        self._restore = restore

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


def current(model: nn.Module) -> Block | None:
    """The composition active on ``model`` (None: plain routing)."""
    if model in _PARALLEL:
        return _PARALLEL[model][1]
    from adapterkit.core.base import get_container

    c = get_container(model)
    for s in (c.sets.values() if c is not None else ()):
        blk = getattr(s, "composition", None)
        if blk is not None:
            return blk
    return None


def compose(model: nn.Module, block: Block | None) -> _Handle:
    """Make ``block`` the composition of ``model``'s adapters (None: back to plain routing)."""
    from adapterkit.core.base import get_container

    if block is not None and not isinstance(block, Block):
        raise ConfigError(f"compose() takes a Stack/Fuse/Average/Parallel block or None, got {type(block).__name__}")
    container = get_container(model)
    if container is None or not container.sets:
        raise ConfigError("the model has no adapters to compose")
    previous = current(model)
    _clear(model, container)
    if isinstance(block, Parallel):
        _install_parallel(model, block, container)
    elif block is not None:
        leaves = set(block.leaves())
        targets = [s for s in container.sets.values() if leaves <= set(s.config.tasks)]
        if not targets:
            raise ConfigError(f"no attached adapter set declares all of {sorted(leaves)} as tasks")
        for s in targets:
            if not hasattr(s, "set_composition"):
                raise ConfigError(f'method "{s.config.method}" does not support {type(block).__name__} '
                                  "composition (bottleneck adapters do; Parallel works with every routed method)")
        for s in targets:
            _check_tasks(block, s.config.tasks)
            s.set_composition(block)
    return _Handle(lambda: compose(model, previous) if get_container(model) is not None else None)


def _clear_parallel(model: nn.Module) -> None:
    entry = _PARALLEL.pop(model, None)
    if entry is not None:
        for h in entry[0]:
            h.remove()


def _clear(model: nn.Module, container) -> None:
    _clear_parallel(model)
    for s in container.sets.values():
        if getattr(s, "composition", None) is not None:
            s.set_composition(None)


def _install_parallel(model: nn.Module, block: Parallel, container) -> None:
    from adapterkit.core.routing import route

    names = block.leaves()
    if len(set(names)) != len(names):
        raise ConfigError(f"{block!r} names an adapter twice")
    declared = set().union(*(s.config.tasks for s in container.sets.values()))
    missing = [n for n in names if n not in declared]
    if missing:
        raise ConfigError(f"{block!r} names {missing}, which no attached adapter set declares as a task")
    n = len(names)
    active: list = []

    def batch_size(args, kwargs) -> int | None:
        for key in ("input_ids", "inputs_embeds", "pixel_values", "input_features"):
            t = kwargs.get(key)
            if isinstance(t, torch.Tensor):
                return t.shape[0]
        t = args[0] if args else None
        return t.shape[0] if isinstance(t, torch.Tensor) else None

    def pre(module, args, kwargs):
        from adapterkit.core.base import get_container

        if get_container(module) is None:  # the adapters were removed: Parallel ends with them
            _clear_parallel(module)
            return None
        b = batch_size(args, kwargs)
        if b is None:
            raise ConfigError("Parallel composition needs the batch as input_ids=/inputs_embeds= (or a first tensor)")

        def rep(t):
            return t.repeat(n, *([1] * (t.dim() - 1))) if isinstance(t, torch.Tensor) and t.dim() and \
                t.shape[0] == b else t
        args = tuple(rep(a) for a in args)
        kwargs = {k: rep(v) for k, v in kwargs.items()}
        ids = [i for i in range(n) for _ in range(b)]
        cm = route([names[i] for i in ids])
        cm.__enter__()
        active.append(cm)
        return args, kwargs

    def post(module, args, out):
        if active:
            active.pop().__exit__(None, None, None)

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, always_call=True)]
    _PARALLEL[model] = (handles, block)


def fusion_regularization(model: nn.Module) -> torch.Tensor:
    """Sum of every fusion layer's regularisation term (add it to the loss while training fusion)."""
    terms = [m.regularization() for m in model.modules() if isinstance(m, Fusion)]
    if not terms:
        raise ConfigError("the model has no fusion layers (set fusion: [...] in a bottleneck adapter config)")
    return torch.stack(terms).sum()


__all__ = ["Average", "Block", "Fuse", "Fusion", "Parallel", "Stack", "compose", "current", "fusion_regularization"]
