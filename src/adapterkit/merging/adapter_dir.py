"""Read and write adapterkit adapter directories without a model.

Merging and pruning work on the saved tensors alone; these helpers read a directory
written by :func:`adapterkit.save_adapters` (checking its checksum) and write a new
one in exactly the same layout, atomically (the whole directory appears at once),
so the result loads with :func:`adapterkit.load_adapters`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterkit.core.io import WEIGHTS_NAME, read_adapter_config, write_adapter_files
from adapterkit.errors import CheckpointError
from adapterkit.safeio import atomic_dir, load_safetensors_checked

SET_PREFIX = "adapterkit.sets."


@dataclass
class AdapterDir:
    """An adapter directory in memory: its config dict and its tensors."""

    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    adapters: dict[str, dict] = field(init=False)

    def __post_init__(self) -> None:
        self.adapters = self.config["adapters"]

    def set_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors of adapter set ``name``, keyed by the name inside the set."""
        prefix = f"{SET_PREFIX}{name}."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def base_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors of base-model parameters the freeze policy unfroze (heads, norms...)."""
        return {k: v for k, v in self.tensors.items() if not k.startswith(SET_PREFIX)}


def read_adapter_dir(directory: str | os.PathLike) -> AdapterDir:
    """Load an adapterkit adapter directory (config + safetensors, checksum checked)."""
    directory = Path(directory)
    cfg = read_adapter_config(directory)
    wfile = directory / WEIGHTS_NAME
    if not wfile.exists():
        raise CheckpointError(f"no {WEIGHTS_NAME} in {directory}")
    tensors = load_safetensors_checked(wfile, expected_sha256=cfg.get("weights_sha256"))
    return AdapterDir(directory, cfg, tensors)


def write_adapter_dir(
    directory: str | os.PathLike,
    adapters: dict[str, dict],
    tensors: dict[str, torch.Tensor],
    *,
    base_trainable: list[str] | None = None,
    base_model: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a new adapter directory atomically, in the layout ``save_adapters`` uses.

    ``adapters`` maps set name to config dict; ``tensors`` are keyed by model
    parameter names (``adapterkit.sets.<name>.<...>`` and base parameter names).
    """
    directory = Path(directory)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_dir(directory) as tmp:
        write_adapter_files(tmp, tensors, adapters, base_trainable or [],
                            base_model or {"class": None, "model_type": None}, extra)
    return directory


__all__ = ["AdapterDir", "SET_PREFIX", "read_adapter_dir", "write_adapter_dir"]
