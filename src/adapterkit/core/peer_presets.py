"""Named presets that reproduce the peers' configs: ``"adapterhub:seq_bn"``, ``"peft:lora"``...

The presets are data (``adapterkit/presets/peers/<peer>.yaml``); ``add_adapters(model,
"adapterhub:double_seq_bn")`` or ``add_adapters(model, {"preset": "peft:prompt_tuning",
"num_tokens": 10})`` (keys next to ``preset`` override it) resolve them here. What no option
reproduces is listed under ``differs`` in the data and in docs/defaults.md.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from adapterkit.errors import ConfigError, did_you_mean
from adapterkit.safeio import loads_yaml


@cache
def peer_presets() -> dict[str, dict]:
    """``{"peer:name": entry}`` for every preset file (entry: source, config, differs, required)."""
    out = {}
    folder = resources.files("adapterkit.presets").joinpath("peers")
    for f in sorted(folder.iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml"):
            data = loads_yaml(f.read_text(), what=f"peer preset file {f.name}", error=ConfigError)
            for name, entry in data["presets"].items():
                out[f"{data['peer']}:{name}"] = {**entry, "peer": data["peer"], "version": data["version"]}
    return out


def resolve_preset(spec: str | dict) -> dict:
    """A method config dict from ``"peer:name"`` or ``{"preset": "peer:name", **overrides}``."""
    overrides = {}
    if isinstance(spec, dict):
        overrides = {k: v for k, v in spec.items() if k != "preset"}
        spec = spec["preset"]
    if not isinstance(spec, str):
        raise ConfigError(f'"preset" must be a name such as "adapterhub:seq_bn", got {spec!r}')
    presets = peer_presets()
    if spec not in presets:
        raise ConfigError(f'unknown preset "{spec}"{did_you_mean(spec, presets)}; known: {sorted(presets)}')
    entry = presets[spec]
    missing = [k for k in entry.get("required", []) if k not in overrides]
    if missing:
        raise ConfigError(f'preset "{spec}" needs {missing} ({entry["peer"]} has no default for them)')
    if "method" in overrides and overrides["method"] != entry["config"]["method"]:
        raise ConfigError(f'preset "{spec}" is method "{entry["config"]["method"]}", not "{overrides["method"]}"')
    return {**entry["config"], **overrides}
