"""Architecture profiles: where the places of a model family are, as data.

A profile (``adapterkit/profiles/<family>.json``) maps place names (``attn_out``,
``cross_attn_out``, ``ffn_out``, ``ffn_in``, ``ffn_stream``, ``attn_in``,
``attn_stream``, ``q``, ``k``, ``v``, ``o``) to regular expressions over module
paths, with named groups ``layer`` (and ``stack`` for encoder/decoder). No modelling
code is forked: methods attach hooks at the modules these patterns find.

Place semantics:
- ``attn_out`` / ``cross_attn_out`` / ``ffn_out``: the sublayer's output projection;
  its output is the sublayer output before dropout and the residual add.
- ``ffn_in`` / ``attn_in``: the sublayer module itself (its input is what the sublayer sees).
- ``ffn_stream`` / ``attn_stream``: a module whose *input* is the residual stream
  entering the sublayer (pre-LN: the LayerNorm; post-LN: the first linear).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from torch import nn

from adapterkit.errors import ConfigError, did_you_mean

PLACE_NAMES = (
    "attn_out", "cross_attn_out", "ffn_out", "ffn_in", "ffn_stream", "attn_in", "attn_stream",
    "q", "k", "v", "o", "qkv",
)


@dataclass(frozen=True)
class Place:
    """One attachment point found in a model."""

    path: str          # module path in the model
    kind: str          # place name (attn_out, ffn_out, q, ...)
    layer: int         # layer index within its stack (-1 if unknown)
    stack: str         # "encoder" / "decoder" / "" ...
    module: nn.Module

    @property
    def key(self) -> str:
        """A ModuleDict-safe key for this place."""
        return self.path.replace(".", "__")


def resolve_extends(raw: dict[str, dict]) -> dict[str, dict]:
    """Profiles with ``"extends": "<parent>"`` take the parent's keys and override them with their own:
    dict values (``places``, ``ia3``) merge one level deep (a place named in the child replaces the
    parent's), others are replaced; ``model_types`` are never inherited (a child names its own)."""
    done: dict[str, dict] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> dict:
        if name in done:
            return done[name]
        p = raw[name]
        parent = p.get("extends")
        if parent is None:
            out = p
        else:
            if parent not in raw:
                raise ConfigError(f'architecture profile "{name}" extends unknown profile "{parent}"'
                                  f"{did_you_mean(parent, raw)}")
            if parent in chain:
                raise ConfigError(f"architecture profiles extend each other in a cycle: {' -> '.join(chain + (name, parent))}")
            base = {k: v for k, v in resolve(parent, chain + (name,)).items() if k != "model_types"}
            out = {**base, **p}
            for k, v in p.items():
                if isinstance(v, dict) and isinstance(base.get(k), dict):
                    out[k] = {**base[k], **v}
            out.setdefault("model_types", [])
        done[name] = out
        return out

    return {name: resolve(name, ()) for name in raw}


@cache
def _all_profiles() -> dict[str, dict]:
    raw = {}
    for f in resources.files("adapterkit.profiles").iterdir():
        if f.name.endswith(".json"):
            p = json.loads(f.read_text())
            raw[p["name"]] = p
    return resolve_extends(raw)


def list_profiles() -> list[str]:
    return sorted(_all_profiles())


def get_profile(name: str) -> dict:
    profiles = _all_profiles()
    if name not in profiles:
        raise ConfigError(f'unknown architecture profile "{name}"{did_you_mean(name, profiles)}; known: {sorted(profiles)}')
    return profiles[name]


def profile_for_model(model: nn.Module, name: str | None = None) -> dict | None:
    """The profile named, or the one whose model_types include ``model.config.model_type``."""
    if name:
        return get_profile(name)
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type is None:
        return None
    for p in _all_profiles().values():
        if model_type in p["model_types"]:
            return p
    return None


def norm_style(profile: dict | None, model: nn.Module) -> str:
    if profile is None:
        return "pre"
    mt = getattr(getattr(model, "config", None), "model_type", None)
    return profile.get("norm_overrides", {}).get(mt, profile["norm"])


def find_places(model: nn.Module, profile: dict | None, kind: str, patterns: list[str] | None = None) -> list[Place]:
    """All modules of ``model`` matching the profile's patterns for ``kind`` (or explicit patterns).

    Explicit ``patterns`` are regexes searched in module paths, or plain names that
    must equal the last path component(s) (PEFT-style ``target_modules``).
    """
    if patterns is None:
        if profile is None:
            raise ConfigError(
                f"model {type(model).__name__} has no architecture profile: give module paths "
                "explicitly (e.g. target_modules / places) or a profile name"
            )
        patterns = profile["places"].get(kind)
        if not patterns:
            raise ConfigError(
                f'place "{kind}" is not defined for architecture "{profile["name"]}"; '
                f"it defines {sorted(profile['places'])}"
            )
        compiled = [re.compile(p) for p in patterns]
    else:
        compiled = [_compile_user_pattern(p) for p in patterns]
    places, seen = [], set()
    for path, mod in model.named_modules():
        if not path or path in seen:
            continue
        for rx in compiled:
            m = rx.search(path)
            if m:
                gd = m.groupdict()
                layer = int(gd["layer"]) if gd.get("layer") is not None else _guess_layer(path)
                places.append(Place(path, kind, layer, gd.get("stack") or _guess_stack(path), mod))
                seen.add(path)
                break
    return places


def _compile_user_pattern(p: str) -> re.Pattern:
    if re.fullmatch(r"[\w.]+", p):  # a plain name: match whole trailing components
        return re.compile(r"(?:^|\.)" + re.escape(p) + r"$")
    try:
        return re.compile(p)
    except re.error as e:
        raise ConfigError(f"invalid module path pattern {p!r}: {e}") from None


_LAYER_RX = re.compile(r"\.(\d+)(?:\.|$)")


def _guess_layer(path: str) -> int:
    m = _LAYER_RX.findall(path)
    return int(m[0]) if m else -1


def _guess_stack(path: str) -> str:
    for s in ("encoder", "decoder", "vision_model", "text_model"):
        if s in path.split("."):
            return s
    return ""
