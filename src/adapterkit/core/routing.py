"""Task routing: which task's adapter weights each example of a batch uses.

One small explicit state object, set with ``with adapterkit.route(tasks):`` and read
by every attached module. ``tasks`` is a task name, a task id, or a per-example list
or LongTensor of names/ids. A batch that uses a single task resolves to a plain int
(fast path: ordinary matmuls); a mixed batch resolves to a LongTensor of ids that
modules serve with gathered/batched matmuls.

Rows and tasks: a per-example list (or 1-D tensor) of ``n`` tasks must match a batch of
``n`` rows. The one exception is a batch of ``k * n`` rows, which is read as each example
repeated ``k`` times in a row (what ``generate(num_beams=k)`` and ``num_return_sequences``
do to the batch with ``repeat_interleave``): example ``i``'s task then serves rows
``i*k .. i*k + k-1``. Any other row count is one :class:`ConfigError`; a model with
adapters attached checks this once per forward (``check_rows``) as well as at every place
that gathers per-row weights.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Union

import torch

from adapterkit.errors import ConfigError, did_you_mean

TaskSpec = Union[str, int, Sequence[Union[str, int]], torch.Tensor]
Resolved = Union[int, torch.Tensor]

_CURRENT: ContextVar[Route | None] = ContextVar("adapterkit_route", default=None)
# The same request as a plain global, for torch.compile: Dynamo cannot trace ContextVar.get
# (a graph break at every adapter), but reads a global (a task tensor becomes a graph input).
# Compiled code therefore sees the innermost route of the process, not of its thread.
_ACTIVE_SPEC: TaskSpec | None = None


class Route:
    """The active routing request; resolves lazily against each model's task list."""

    __slots__ = ("spec", "rows", "_cache")

    def __init__(self, spec: TaskSpec):
        self.spec = spec
        # how many rows the request names (None: one task for any batch)
        if isinstance(spec, torch.Tensor):
            self.rows = int(spec.shape[0]) if spec.dim() == 1 else None
        elif isinstance(spec, (str, numbers.Integral)):
            self.rows = None
        elif hasattr(spec, "__len__") and hasattr(spec, "__iter__"):
            self.rows = len(spec)
        else:
            raise ConfigError(f"route() takes a task name or id, a list / tuple of them (one per row) or an integer "
                              f"tensor; got {type(spec).__name__}")
        self._cache: dict = {}

    def resolve(self, tasks: tuple[str, ...], device: torch.device) -> Resolved:
        key = (tasks, device)
        hit = self._cache.get(key)
        if hit is None:
            hit = _resolve(self.spec, tasks, device)
            self._cache[key] = hit
        return hit


def _task_index(t, tasks: tuple[str, ...]) -> int:
    if isinstance(t, str):
        try:
            return tasks.index(t)
        except ValueError:
            raise ConfigError(
                f'unknown task "{t}": this model declares tasks {list(tasks)}{did_you_mean(t, tasks)}'
            ) from None
    i = int(t)
    if not 0 <= i < len(tasks):
        raise ConfigError(f"task id {i} out of range: this model declares {len(tasks)} tasks {list(tasks)}")
    return i


def _resolve(spec: TaskSpec, tasks: tuple[str, ...], device) -> Resolved:
    if isinstance(spec, torch.Tensor):
        if spec.dim() == 0:
            return _task_index(int(spec), tasks)
        if spec.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ConfigError(f"a task tensor must hold integer task ids, got dtype {spec.dtype}")
        return spec.to(device=device, dtype=torch.long, non_blocking=True)
    if isinstance(spec, (str, numbers.Integral)):
        return _task_index(spec, tasks)
    ids = [_task_index(t, tasks) for t in spec]
    if not ids:
        raise ConfigError("route() got an empty task list")
    if all(i == ids[0] for i in ids):
        return ids[0]
    return torch.tensor(ids, dtype=torch.long, device=device)


def route(tasks: TaskSpec):
    """Route the forward passes inside the block to ``tasks``: one name/id for the whole batch,
    or one per example. ``n`` per-example tasks fit a batch of ``n`` rows, or of ``k * n`` rows
    read as each example repeated ``k`` times (``generate(num_beams=k)``); any other row count
    is a :class:`ConfigError` (see the module docstring)."""
    return reenter(Route(tasks))


@contextlib.contextmanager
def reenter(r: Route | None):
    """Make ``r`` the active route inside the block (None: leave the routing as it is); e.g. to
    recompute a checkpointed block under the route it first ran with, keeping its resolve cache."""
    global _ACTIVE_SPEC
    if r is None:
        yield
        return
    token = _CURRENT.set(r)
    prev, _ACTIVE_SPEC = _ACTIVE_SPEC, r.spec
    try:
        yield
    finally:
        _CURRENT.reset(token)
        _ACTIVE_SPEC = prev


def current_route() -> Route | None:
    return _CURRENT.get()


class TaskRouter:
    """Per-adapter-set view of the routing state (holds the declared task names)."""

    def __init__(self, tasks: Sequence[str]):
        self.tasks = tuple(tasks)

    def resolve(self, device: torch.device) -> Resolved:
        if torch.compiler.is_compiling():
            spec = _ACTIVE_SPEC
            if spec is None:
                return self._unrouted()
            return _resolve(spec, self.tasks, device)
        r = _CURRENT.get()
        if r is None:
            return self._unrouted()
        return r.resolve(self.tasks, device)

    def resolve_or(self, default: Resolved, device: torch.device) -> Resolved:
        """Like :meth:`resolve`, but ``default`` when no route is active (e.g. a merged task)."""
        if torch.compiler.is_compiling():
            spec = _ACTIVE_SPEC
            return default if spec is None else _resolve(spec, self.tasks, device)
        r = _CURRENT.get()
        return default if r is None else r.resolve(self.tasks, device)

    def _unrouted(self) -> int:
        if len(self.tasks) == 1:
            return 0
        raise ConfigError(
            f"no task is routed and this adapter has per-task weights for {list(self.tasks)}: "
            "wrap the forward in `with adapterkit.route(task_or_tasks):`"
        )


def task_one_hot(task: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``one_hot(task, n)`` in ``dtype``, made once per routed block for a given task tensor
    (every adapter place of a forward reuses it) rather than once per place."""
    r = None if torch.compiler.is_compiling() else _CURRENT.get()
    if r is None:
        return torch.nn.functional.one_hot(task, n).to(dtype)
    key = ("one_hot", id(task), n, dtype)
    hit = r._cache.get(key)
    if hit is None or hit[0] is not task:  # the tensor is held, so its id cannot be reused meanwhile
        hit = r._cache[key] = (task, torch.nn.functional.one_hot(task, n).to(dtype))
    return hit[1]


def _rows_error(n: int, batch: int) -> ConfigError:
    return ConfigError(
        f"route() was given {n} per-example tasks but the batch has {batch} rows: give one task per row "
        f"or one task for the whole batch (a batch of k*{n} rows is read as each example repeated k times, "
        "as generate(num_beams=k) expands it)")


def check_rows(batch: int) -> None:
    """Raise unless the active route fits a batch of ``batch`` rows: one task for any batch,
    ``n`` per-example tasks for ``n`` rows, or ``k * n`` rows (beam / repeat expansion)."""
    if torch.compiler.is_compiling():
        return
    r = _CURRENT.get()
    if r is None or r.rows is None or batch == r.rows:
        return
    if r.rows == 0 or batch == 0 or batch % r.rows:
        raise _rows_error(r.rows, batch)


def expand_to_batch(task: Resolved, batch: int) -> Resolved:
    """Match a per-example task tensor to a batch expanded by beams/repeats (B*k rows)."""
    if isinstance(task, int) or task.shape[0] == batch:
        return task
    n = task.shape[0]
    if n == 0 or batch % n:
        raise _rows_error(n, batch)
    return task.repeat_interleave(batch // n)
