"""VL-Adapter presets: one YAML file each in ``adapterkit/presets/`` (data, not code)."""

from __future__ import annotations

from functools import cache
from importlib import resources

import yaml

from adapterkit.errors import ConfigError, did_you_mean

PRESET_ORDER = ("full_finetune", "multiple_adapters", "half_shared_adapters", "single_adapter", "hyperformer",
                "multiple_compacters", "single_compacter", "multiple_lora", "single_lora", "multiple_prompts",
                "single_prompt", "frozen_lm")


@cache
def _load_all() -> dict[str, dict]:
    out = {}
    for f in resources.files("adapterkit.presets").iterdir():
        if f.name.endswith(".yaml"):
            p = yaml.safe_load(f.read_text())
            out[p["name"]] = p
    return out


def list_presets() -> list[str]:
    names = _load_all()
    return [n for n in PRESET_ORDER if n in names] + sorted(set(names) - set(PRESET_ORDER))


def get_preset(name: str) -> dict:
    presets = _load_all()
    if name not in presets:
        raise ConfigError(f'unknown preset "{name}"{did_you_mean(name, presets)}; known: {list_presets()}')
    p = presets[name]
    return {**p, "adapters": [dict(a) for a in p["adapters"]]}


def uses_task_prefix(preset: dict, video: bool = False, override: bool | None = None) -> bool:
    """Whether the inputs carry task prefixes ("vqa: ", "tvqa: "...). As the reference's scripts:
    image runs of the single (fully shared) presets, and every video run; ``override`` (the
    config's ``data.task_prefix``) wins when set. Presets without the field (custom adapter
    lists) use prefixes."""
    if override is not None:
        return bool(override)
    return bool(preset.get("video_task_prefix" if video else "task_prefix", True))
