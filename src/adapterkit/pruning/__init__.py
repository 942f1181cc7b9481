"""Pruning adapters: MiMi iterative structured pruning of bottleneck adapters."""

from adapterkit.pruning.mimi import prune_adapter_dir, prune_model, schedule, select_units, unit_scores

__all__ = ["prune_adapter_dir", "prune_model", "schedule", "select_units", "unit_scores"]
