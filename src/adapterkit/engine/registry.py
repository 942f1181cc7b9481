"""The domains ``adapterkit train CONFIG`` runs, by the config's ``domain:`` key (default ``vl``).

Each entry is a module with ``load_config(path_or_dict)`` (validated, one ConfigError per
problem) and ``build_engine(cfg, output_dir, max_steps=None, allow_changes=())`` returning an
:class:`adapterkit.engine.Engine` ready to ``fit()``; or, for a pipeline of several stages or
with its own config format, ``run_training(config_path, output_dir, max_steps=None,
allow_changes=())`` returning the results dict.
"""

from __future__ import annotations

import importlib

from adapterkit.errors import ConfigError, did_you_mean

DOMAINS = {
    "vl": "adapterkit.train.trainer",
    "text": "adapterkit.text.domain",
    "vision": "adapterkit.vision.pipeline",
    "audio": "adapterkit.audio.pipeline",
    "rec": "adapterkit.rec.domain",
    "asr": "adapterkit.audio.asr",
    "meter": "adapterkit.meter.domain",
}


def domain_of(config) -> str:
    """The ``domain`` a config names (a path or a dict); ``vl`` when it names none."""
    if not isinstance(config, dict):
        from adapterkit.text.config import read_config_dict

        config = read_config_dict(config)
    d = config.get("domain", "vl")
    if not isinstance(d, str) or d not in DOMAINS:
        raise ConfigError(f"unknown domain {d!r}{did_you_mean(str(d), DOMAINS)}; known: {', '.join(DOMAINS)}")
    return d


def domain_module(name: str):
    if name not in DOMAINS:
        raise ConfigError(f"unknown domain {name!r}{did_you_mean(name, DOMAINS)}; known: {', '.join(DOMAINS)}")
    return importlib.import_module(DOMAINS[name])
