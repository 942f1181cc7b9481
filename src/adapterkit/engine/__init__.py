"""One training engine beneath every domain (:class:`Engine`); a domain supplies its data,
loss, predictions and metrics (:class:`Domain`). See :mod:`adapterkit.engine.engine`."""

from adapterkit.engine.domain import Domain, stable_seed
from adapterkit.engine.engine import (
    Engine,
    TrainingError,
    TrainingInterrupted,
    lock_output,
    task_schedule,
)

__all__ = ["Domain", "Engine", "TrainingError", "TrainingInterrupted", "lock_output", "stable_seed", "task_schedule"]
