"""Method configs: dataclasses validated before any work starts.

Every method registers a config dataclass (a subclass of :class:`AdapterConfig`).
``config_from_dict`` turns a plain dict (from YAML/JSON) into the right dataclass,
rejecting unknown keys (with a "did you mean"), wrong types and out-of-range values
with one :class:`~adapterkit.errors.ConfigError` each.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from adapterkit.errors import ConfigError, did_you_mean

SHARING = ("shared", "per_task", "half_shared_up", "half_shared_down")
ACTIVATIONS = ("relu", "gelu", "gelu_new", "swish", "silu", "tanh", "identity")

# Bounds every method config gets where its field declares none (documented in docs/guarantees.md):
#: largest integer option (ranks, bottleneck sizes, token counts, experts...)
MAX_SIZE = 8192
#: largest magnitude of a float option (alpha, scales, reduction factors...): alpha 1e308 gives NaN outputs
MAX_FLOAT = 1e6
#: most tasks one adapter config may serve (each per-task copy is allocated)
MAX_TASKS = 1024
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_+\-]{0,127}")


def check_name(value, what: str, error=ConfigError) -> str:
    """A task, adapter or run name: 1-128 characters of letters, digits, ``_``, ``-``, ``+``,
    not starting with ``-``/``+`` (so never a path like ``../x`` nor a module path like ``a.b``)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise error(f"{what} {value!r} is not a valid name (use 1-128 letters, digits, '_', '-', '+'; "
                    "no '.', '/' or spaces)")
    return value


def choice(*options, default=dataclasses.MISSING, **kw):
    return field(default=default, metadata={"choices": options}, **kw)


def bounded(default, lo=None, hi=None, lo_open=False):
    return field(default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open})


@dataclass
class AdapterConfig:
    """Options every method shares.

    - ``tasks``: the task names this model serves (default: one task, "default").
    - ``sharing``: ``shared`` (one module for all tasks), ``per_task``, ``half_shared_up``
      (up-projection shared, down per task) or ``half_shared_down``.
    - Freeze policy: with ``freeze_base`` the base model is frozen, then
      ``train_layernorms`` unfreezes every LayerNorm (weight and bias), ``train_biases``
      every bias (BitFit), and ``trainable_modules`` any module path regex (heads,
      visual embeddings...).
    - ``profile``: architecture profile name (auto-detected from ``config.model_type``).
    - ``layers``: restrict to these layer indices (None = all).
    """

    method: str = ""
    tasks: list[str] = field(default_factory=lambda: ["default"])
    sharing: str = choice(*SHARING, default="shared")
    freeze_base: bool = True
    train_layernorms: bool = False
    train_biases: bool = False
    trainable_modules: list[str] = field(default_factory=list)
    profile: str | None = None
    layers: list[int] | None = None

    # -- helpers -------------------------------------------------------------
    def copies(self, part: str) -> int:
        """How many weight copies a part ("down"/"up"/"all") has under the sharing mode."""
        n = len(self.tasks)
        if self.sharing == "shared":
            return 1
        if self.sharing == "per_task":
            return n
        if self.sharing == "half_shared_up":
            return 1 if part == "up" else n
        return 1 if part == "down" else n  # half_shared_down

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Method-specific checks beyond types and ranges (override)."""
        if not self.tasks:
            raise ConfigError("tasks must list at least one task name")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks has duplicates: {self.tasks}")
        if len(self.tasks) > MAX_TASKS:
            raise ConfigError(f"tasks lists {len(self.tasks)} tasks; at most {MAX_TASKS} are supported")
        for t in self.tasks:
            check_name(t, "task name")


_REGISTRY: dict[str, tuple[type[AdapterConfig], Any]] = {}


def register_method(name: str, config_cls: type[AdapterConfig], builder) -> None:
    _REGISTRY[name] = (config_cls, builder)


def registered_methods() -> list[str]:
    _ensure_methods_loaded()
    return sorted(_REGISTRY)


def method_entry(name: str):
    _ensure_methods_loaded()
    if name not in _REGISTRY:
        raise ConfigError(f'unknown method "{name}"{did_you_mean(name, _REGISTRY)}; known methods: {sorted(_REGISTRY)}')
    return _REGISTRY[name]


def _ensure_methods_loaded() -> None:
    import adapterkit.methods  # noqa: F401  (registers every method)


def config_from_dict(d: dict | AdapterConfig) -> AdapterConfig:
    """Build and validate a method config from a dict (or validate a dataclass)."""
    if isinstance(d, AdapterConfig):
        cfg = d
        if not cfg.method:
            raise ConfigError(f"{type(cfg).__name__} has no method name")
        _check_fields(cfg, default_caps=True)
        cfg.validate()
        return cfg
    if isinstance(d, str) or (isinstance(d, dict) and "preset" in d):  # a peer preset: "adapterhub:seq_bn"
        from adapterkit.core.peer_presets import resolve_preset

        d = resolve_preset(d)
    if not isinstance(d, dict):
        raise ConfigError(f"an adapter config must be a dict or config dataclass, got {type(d).__name__}")
    if "method" not in d:
        raise ConfigError('adapter config is missing "method"; known methods: ' + ", ".join(registered_methods()))
    method = d["method"]
    if not isinstance(method, str):
        raise ConfigError(f'"method" must be a string, got {method!r}')
    cls, _ = method_entry(method)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            raise ConfigError(f'unknown key "{k}" for method "{method}"{did_you_mean(k, names)}')
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in d:
            kwargs[f.name] = _coerce(f.name, d[f.name], hints[f.name])
    cfg = cls(**kwargs)
    _check_fields(cfg, default_caps=True)
    cfg.validate()
    return cfg


def _coerce(name: str, value, tp):
    """Check ``value`` against a simple type annotation; allow int->float and tuple->list."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f'"{name}" has an invalid value {value!r}')
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f'"{name}" must be a list, got {type(value).__name__} {value!r}')
        (inner,) = args or (Any,)
        return [_coerce(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f'"{name}" must be a mapping, got {type(value).__name__}')
        return dict(value)
    if tp is Any:
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f'"{name}" must be a mapping, got {type(value).__name__} {value!r}')
        return dict(value)
    if tp is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f'"{name}" must be a list, got {type(value).__name__} {value!r}')
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f'"{name}" must be true or false, got {value!r}')
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f'"{name}" must be an integer, got {value!r}')
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f'"{name}" must be a number, got {value!r}')
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f'"{name}" must be a string, got {value!r}')
        return value
    return value


def _check_fields(cfg, default_caps: bool = False) -> None:
    """Choices and ranges of every field. With ``default_caps`` (method configs), a numeric
    field that declares no upper bound gets :data:`MAX_SIZE` (integers) or
    :data:`MAX_FLOAT` (magnitude of floats)."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        md = f.metadata
        if "choices" in md and v not in md["choices"]:
            raise ConfigError(
                f'"{f.name}" must be one of {list(md["choices"])}, got {v!r}{did_you_mean(v, md["choices"])}'
            )
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f'"{f.name}" must be finite, got {v}')
        lo, hi = md.get("lo"), md.get("hi")
        if lo is not None and (v < lo or (md.get("lo_open") and v == lo)):
            raise ConfigError(f'"{f.name}" must be {">" if md.get("lo_open") else ">="} {lo}, got {v}')
        if hi is not None and v > hi:
            raise ConfigError(f'"{f.name}" must be <= {hi}, got {v}')
        if hi is None and default_caps:
            if isinstance(v, int) and v > MAX_SIZE:
                raise ConfigError(f'"{f.name}" must be <= {MAX_SIZE}, got {v}')
            if isinstance(v, float) and abs(v) > MAX_FLOAT:
                raise ConfigError(f'"{f.name}" must be between -{MAX_FLOAT:g} and {MAX_FLOAT:g}, got {v:g}')


def dataclass_from_dict(cls, d, where: str = ""):
    """Build any (nested) config dataclass from a dict with the same checks as method configs:
    unknown keys with "did you mean", types, choices and ranges, each one ConfigError."""
    prefix = f"{where}." if where else ""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f'"{where or "config"}" must be a mapping, got {type(d).__name__}')
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if not isinstance(k, str) or k not in names:
            raise ConfigError(f'unknown key "{prefix}{k}"{did_you_mean(k, names)}')
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = dataclass_from_dict(tp, d[f.name], prefix + f.name)
        else:
            kwargs[f.name] = _coerce(prefix + f.name, d[f.name], tp)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None
    try:
        _check_fields(obj)
        if hasattr(obj, "validate"):
            obj.validate()
    except ConfigError as e:
        if where:  # name the section: 'train: "epochs" must be >= 1, got 0'
            raise ConfigError(f"{where}: {e}") from None
        raise
    return obj
