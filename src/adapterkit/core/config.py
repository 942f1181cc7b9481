"""Method configs: dataclasses validated before any work starts.

Every method registers a config dataclass (a subclass of :class:`AdapterConfig`).
``config_from_dict`` turns a plain dict (from YAML/JSON) into the right dataclass,
rejecting unknown keys (with a "did you mean"), wrong types and out-of-range values
with one :class:`~adapterkit.errors.ConfigError` each.
"""

from __future__ import annotations

import dataclasses
import functools
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


def _metadata(help: str | None, **md) -> dict:
    return {**md, "help": help} if help else md


def choice(*options, default=dataclasses.MISSING, help: str | None = None, **kw):
    """A field whose value must be one of ``options``; ``help`` is its documented meaning."""
    return field(default=default, metadata=_metadata(help, choices=options), **kw)


def bounded(default, lo=None, hi=None, lo_open=False, help: str | None = None):
    """A numeric field in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); ``help`` is its meaning."""
    return field(default=default, metadata=_metadata(help, lo=lo, hi=hi, lo_open=lo_open))


def option(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, help: str):
    """A field with no range or choices, documented with ``help`` (``factory`` for lists/dicts)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


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
    - ``layers``: restrict to these layer indices (None = all; negative ones count from the top).
    """

    method: str = option("", help="the method name (one of the registered methods)")
    tasks: list[str] = option(factory=lambda: ["default"], help="the task names this adapter serves")
    sharing: str = choice(*SHARING, default="shared",
                          help="shared: one module for all tasks; per_task: one per task; half_shared_up / "
                               "half_shared_down: that projection shared, the other per task")
    freeze_base: bool = option(True, help="freeze the base model (only adapters and the modules below train)")
    train_layernorms: bool = option(False, help="also train every LayerNorm (weight and bias)")
    train_biases: bool = option(False, help="also train every bias (BitFit)")
    trainable_modules: list[str] = option(factory=list, help="module path regexes that also train (heads, "
                                                             "visual embeddings...)")
    profile: str | None = option(None, help="architecture profile name (null: from config.model_type)")
    layers: list[int] | None = option(None, help="only these layer indices (null: every layer; -1 is the last layer, "
                                                  "-2 the one below...)")

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


#: other libraries' (PEFT, AdapterHub, Hugging Face) and common names for config keys -> the
#: keys they may mean here, in order of preference; a suggestion names the first the config has
KEY_ALIASES: dict[str, tuple[str, ...]] = {
    "rank": ("r", "phm_rank", "max_rank"),
    "lora_r": ("r",),
    "lora_rank": ("r",),
    "lora_alpha": ("alpha",),
    "scaling": ("alpha", "scale"),
    "lora_dropout": ("dropout",),
    "adapter_dropout": ("dropout",),
    "dropout_rate": ("dropout",),
    "dropout_prob": ("dropout",),
    "reduction": ("reduction_factor",),
    "reduction_ratio": ("reduction_factor",),
    "reduction_rate": ("reduction_factor",),
    "bottleneck": ("bottleneck_dim", "bottleneck_size"),
    "bottleneck_size": ("bottleneck_dim",),
    "bottleneck_dim": ("bottleneck_size",),
    "adapter_size": ("bottleneck_dim", "adapter_dim"),
    "adapter_dim": ("bottleneck_dim",),
    "non_linearity": ("activation",),
    "nonlinearity": ("activation",),
    "act": ("activation",),
    "act_fn": ("activation",),
    "hidden_act": ("activation",),
    "num_virtual_tokens": ("num_tokens", "prefix_length"),
    "prefix_length": ("num_tokens",),
    "n_tokens": ("num_tokens",),
    "target": ("targets", "target_modules"),
    "layers_to_transform": ("layers",),
    "task": ("tasks",),
    "task_names": ("tasks",),
    "modules_to_save": ("trainable_modules",),
    "rslora": ("use_rslora",),
    "init_weights": ("init",),
    "init_lora_weights": ("init",),
    # run config keys
    "learning_rate": ("lr",),
    "num_epochs": ("epochs",),
    "num_train_epochs": ("epochs",),
    "steps": ("max_steps",),
    "num_steps": ("max_steps",),
    "bs": ("batch_size",),
    "batch": ("batch_size",),
    "per_device_train_batch_size": ("batch_size",),
    "features_dir": ("features",),
    "feature_dir": ("features",),
    "data_dir": ("root",),
    "warmup": ("warmup_ratio",),
    "max_grad_norm": ("grad_clip",),
    "clip": ("grad_clip",),
}


def suggest_key(key, names) -> str:
    """' (did you mean "x"?)' for an unknown config ``key``: a known alias of one of ``names``
    (``rank`` -> ``r``, ``lora_alpha`` -> ``alpha``...), else the closest spelling, else ''."""
    names = [str(n) for n in names]
    for cand in KEY_ALIASES.get(str(key).lower(), ()):
        if cand in names:
            return f' (did you mean "{cand}"?)'
    lowered = {n.lower(): n for n in names}
    if str(key).lower() in lowered:
        return f' (did you mean "{lowered[str(key).lower()]}"?)'
    return did_you_mean(key, names)


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
    names = [f.name for f in dataclasses.fields(cls)]
    for k in d:
        if k not in names:
            hint = suggest_key(k, names)
            raise ConfigError(f'unknown key "{k}" for method "{method}"'
                              + (hint or f"; its keys: {', '.join(names)}"))
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
    names = [f.name for f in dataclasses.fields(cls)]
    for k in d:
        if not isinstance(k, str) or k not in names:
            hint = suggest_key(k, names)
            raise ConfigError(f'unknown key "{prefix}{k}"' + (hint or f"; expected one of: {', '.join(names)}"))
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


# ----------------------------------------------------------------------------- documentation

#: meanings of keys several methods share, for method fields that document none themselves
#: (a field's ``help`` metadata, then a comment on or above its line, come first)
KEY_MEANINGS: dict[str, str] = {
    "r": "rank of the low-rank update",
    "alpha": "scale numerator of the low-rank update (the update is scaled by alpha / rank)",
    "dropout": "dropout probability inside the adapter",
    "targets": "profile places the method attaches to (q, k, v, o, ...)",
    "target_modules": "module names / regexes to attach to instead of `targets` (PEFT-style)",
    "reduction_factor": "bottleneck width = model width / reduction_factor (unless bottleneck_dim is set)",
    "bottleneck_dim": "bottleneck width (null: from reduction_factor)",
    "activation": "non-linearity of the adapter",
    "positions": "where in each block the adapter sits (attn_out, cross_attn_out, ffn_out, ffn, ...)",
    "init": "weight initialisation scheme",
    "num_tokens": "number of trained prompt / prefix tokens",
    "use_rslora": "rank-stabilised scale alpha / sqrt(r) instead of alpha / r",
    "scale": "the adapter output's scale s (h + s * adapter(h))",
    "learned_scale": "train the scale s as a parameter",
    "adapter_layernorm": "a LayerNorm of the adapter's own, before or after it (none: no LayerNorm)",
    "adapter_input": "what a sequential adapter reads: sublayer (the sublayer output h) or normed_sum "
                     "(LN(h + x), AdapterHub's seq_bn form)",
    "parallel_input": "what a parallel adapter reads: the residual stream entering the block, or the "
                      "block's normalized input",
    "phm_dim": "PHM dimension n (number of Kronecker terms)",
    "shared_phm_rule": "one set of PHM rules shared by every adapter layer (false: one per layer)",
    "factorized_phm": "low-rank PHM weights s_i t_i^T (rank phm_rank) instead of full ones",
    "phm_rank": "rank of the factorized PHM weights",
    "phm_init_std": "standard deviation of the PHM rules' initialisation",
    "task_embedding_dim": "width of the learned task embedding",
    "hidden_dim": "hidden width of the hypernetwork's task projector",
    "projected_dim": "width of the projected task/layer embedding the generators read",
    "generator_init_std": "standard deviation of the weight generators' initialisation",
}


@dataclass(frozen=True)
class KeyDoc:
    """One documented config key: its dotted name, type, default, allowed values and meaning."""

    key: str
    type: str
    default: str
    allowed: str
    meaning: str


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin is dict:
        return "mapping"
    return {type(None): "null", int: "int", float: "float", bool: "bool", str: "str", dict: "mapping",
            list: "list", Any: "any"}.get(tp, getattr(tp, "__name__", str(tp)))


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _show(value) -> str:
    """A value as it is written in YAML/JSON (null, true, "text" unquoted, lists as JSON)."""
    import json

    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(_rounded(value))


def _rounded(value):
    """Floats to 6 significant digits, for display (5/3 shows as 1.66667)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def _num(v) -> str:
    """A bound for display: 2^63 - 1 and powers of ten >= 10^6 spelt out, else as written."""
    if isinstance(v, int) and not isinstance(v, bool):
        if v == 2**63 - 1:
            return "2^63 - 1"
        if v >= 10**6 and str(v).rstrip("0") == "1":
            return f"10^{len(str(v)) - 1}"
        return str(v)
    return f"{v:g}"


def _bounds(f: dataclasses.Field, tp, default_caps: bool):
    """(lo, hi, lo_open) a numeric field is checked against (``_check_fields``); Nones if not numeric."""
    md = f.metadata
    numeric = {a for a in (typing.get_args(tp) or (tp,)) if a in (int, float)}
    lo, hi = md.get("lo"), md.get("hi")
    if not numeric:
        return None, None, False
    if hi is None and default_caps:
        if float in numeric:
            hi, lo = MAX_FLOAT, (-MAX_FLOAT if lo is None else lo)
        else:
            hi = MAX_SIZE
    return lo, hi, bool(md.get("lo_open"))


def _allowed(f: dataclasses.Field, tp, default_caps: bool) -> str:
    if "choices" in f.metadata:
        return ", ".join(_show(c) for c in f.metadata["choices"])
    lo, hi, lo_open = _bounds(f, tp, default_caps)
    left = "" if lo is None else (f"> {_num(lo)}" if lo_open else f">= {_num(lo)}")
    right = "" if hi is None else f"<= {_num(hi)}"
    return ", ".join(p for p in (left, right) if p)


def _source_comments(cls) -> dict[str, str]:
    """``{field: comment}`` from the class source: the ``# comment`` on the field's line, and the
    group a comment line above a run of fields names (``# LoRA experts``), appended in brackets."""
    return _module_comments(cls.__module__).get(cls.__qualname__, {})


@functools.cache
def _module_comments(module: str) -> dict[str, dict[str, str]]:
    """:func:`_source_comments` of every top-level class of ``module`` (its source read and
    tokenized once)."""
    import ast
    import inspect
    import io
    import sys
    import tokenize

    try:
        src = inspect.getsource(sys.modules[module])
        tree = ast.parse(src)
        comments = {t.start[0]: t.string.lstrip("#").strip()
                    for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    except (KeyError, OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    lines = src.splitlines()
    field_line = re.compile(r"^(\s+)([A-Za-z_]\w*)\s*:")
    out: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields: dict[str, str] = {}
        indent, group, heading = None, "", False
        first = node.body[0]
        start = first.end_lineno + 1 if isinstance(first, ast.Expr) and isinstance(
            getattr(first, "value", None), ast.Constant) else node.lineno + 1   # after the docstring
        for i in range(start, (node.end_lineno or node.lineno) + 1):
            stripped = lines[i - 1].strip()
            if not stripped:
                group, heading = "", False
                continue
            if stripped.startswith("#"):
                group = f"{group} {comments.get(i, '')}".strip() if heading else comments.get(i, "")
                heading = True
                continue
            heading = False
            m = field_line.match(lines[i - 1])
            if m and indent in (None, len(m.group(1))):
                indent = len(m.group(1))
                text = comments.get(i, "")
                if group:
                    text = f"{text} ({group})" if text else f"({group})"
                if text:
                    fields[m.group(2)] = text
        out[node.name] = fields
    return out


def _meanings(cls) -> dict[str, str]:
    """Each field's meaning: the ``help`` metadata or source comment of the nearest class (in the
    MRO) that documents it."""
    import inspect

    out: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        out.update(_source_comments(klass))
        own = inspect.get_annotations(klass)  # the fields this class itself declares
        out.update({f.name: f.metadata["help"] for f in dataclasses.fields(klass)
                    if f.name in own and f.metadata.get("help")})
    return out


def _combine(own: str, generic: str) -> str:
    """A field's own meaning, else the generic one; a bare group note ``(LoRA experts)`` is appended
    to the generic meaning."""
    if own.startswith("(") and own.endswith(")") and generic:
        return f"{generic} {own}"
    return own or generic


def describe_dataclass(cls, prefix: str = "", default_caps: bool = False, glossary: dict | None = None,
                       skip: frozenset | set = frozenset()) -> list[KeyDoc]:
    """One :class:`KeyDoc` per field of a config dataclass (nested dataclasses flattened to
    ``section.key`` rows), read from the fields themselves so the docs cannot drift."""
    hints = typing.get_type_hints(cls)
    meanings = _meanings(cls)
    rows: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_dataclass(tp, key + ".", default_caps, glossary))
            continue
        meaning = _combine(meanings.get(f.name, ""), (glossary or {}).get(f.name, ""))
        rows.append(KeyDoc(key, _type_name(tp), _show(_default(f)), _allowed(f, tp, default_caps), meaning))
    return rows


def _own_doc(klass) -> str:
    import inspect

    doc = klass.__dict__.get("__doc__") or ""
    if not doc or doc.startswith(klass.__name__ + "("):  # the signature dataclass() writes
        return ""
    return inspect.cleandoc(doc)


def method_summary(name: str) -> str:
    """A method's description: its config class's docstring (or its nearest documented base
    below :class:`AdapterConfig`), else the first paragraph of its module's docstring."""
    import sys

    cls, _ = method_entry(name)
    parts = []
    mod = sys.modules.get(cls.__module__)
    mod_doc = (mod.__doc__ or "").strip() if mod else ""
    if mod_doc:
        parts.append(" ".join(mod_doc.split("\n\n")[0].split()))
    for klass in cls.__mro__:
        if klass is AdapterConfig or not dataclasses.is_dataclass(klass):
            break
        doc = _own_doc(klass)
        if doc:
            parts.append(" ".join(doc.split()))
            break
    return _plain(" ".join(parts))


def _plain(text: str) -> str:
    """reST markup as Markdown: ``x`` and :func:`x` -> `x`."""
    text = re.sub(r":[a-z]+:`([^`]+)`", r"`\1`", text)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


#: longest docstring sentence used as a key's meaning
_MAX_MENTION = 240


def _doc_mentions(cls) -> dict[str, str]:
    """``{field: sentence}``: the first sentence of the config class's or its module's docstring
    that names the field (``name``, ``name: value``), for fields documented nowhere else."""
    import inspect
    import sys

    mod = sys.modules.get(cls.__module__)
    sentences = []
    for doc in (_own_doc(cls), (mod.__doc__ or "") if mod else ""):
        for block in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
            if all(line.startswith(" ") for line in block.splitlines()):
                continue  # an indented (formula / code) block
            for para in re.split(r"\n\s*- ", block):
                sentences += re.split(r"(?<=[.;])\s+(?=[A-Z`(])", " ".join(para.split()))
    out = {}
    for f in dataclasses.fields(cls):
        pattern = re.compile("``" + re.escape(f.name) + "(``|[:=])")
        hit = next((x for x in sentences if pattern.search(x) and len(x) <= _MAX_MENTION), None)
        if hit:
            out[f.name] = _plain(hit.rstrip(";:"))
    return out


def _method_glossary(cls) -> dict[str, str]:
    return {**_doc_mentions(cls), **KEY_MEANINGS}


def describe_method(name: str) -> list[KeyDoc]:
    """The keys of method ``name``'s config beyond those every method shares
    (:func:`describe_shared_keys`), with defaults, allowed values and meanings (a field's ``help``
    or comment, else :data:`KEY_MEANINGS`, else the method docstring's sentence naming it)."""
    cls, _ = method_entry(name)
    shared = {f.name for f in dataclasses.fields(AdapterConfig)}
    own = [r for r in describe_dataclass(cls, default_caps=True, glossary=_method_glossary(cls))
           if r.key not in shared]
    # a shared key whose default this method changes (e.g. bitfit's train_biases) is listed too
    changed = [r for r in describe_dataclass(cls, default_caps=True)
               if r.key in shared and r.key != "method" and r.default != _shared_defaults()[r.key]]
    return changed + own


@functools.cache
def _shared_defaults() -> dict[str, str]:
    return {r.key: r.default for r in describe_dataclass(AdapterConfig)}


def describe_shared_keys() -> list[KeyDoc]:
    """The keys every method's config has (:class:`AdapterConfig`)."""
    return describe_dataclass(AdapterConfig, default_caps=True)


# ----------------------------------------------------------------------------- JSON schema

def _schema_for_type(tp) -> dict:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        subs = [_schema_for_type(a) for a in args]
        if all(set(s) == {"type"} and isinstance(s["type"], str) for s in subs):
            return {"type": [s["type"] for s in subs]}
        return {"anyOf": subs}
    if origin is list or tp is list:
        return {"type": "array", "items": _schema_for_type(args[0])} if args else {"type": "array"}
    if origin is dict or tp is dict:
        return {"type": "object"}
    if dataclasses.is_dataclass(tp):
        return dataclass_schema(tp)
    simple = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string"}
    return {"type": simple[tp]} if tp in simple else {}


def field_schema(f: dataclasses.Field, tp, default_caps: bool = False, glossary: dict | None = None,
                 meaning: str = "") -> dict:
    """The JSON schema of one config field: type, enum / bounds, default and description."""
    s = _schema_for_type(tp)
    if "choices" in f.metadata:
        s = {"enum": list(f.metadata["choices"])}
    lo, hi, lo_open = _bounds(f, tp, default_caps)
    if lo is not None:
        s["exclusiveMinimum" if lo_open else "minimum"] = lo
    if hi is not None:
        s["maximum"] = hi
    default = _default(f)
    if default is not dataclasses.MISSING and not dataclasses.is_dataclass(default):
        s["default"] = default
    text = _combine(meaning, (glossary or {}).get(f.name, ""))
    if text:
        s["description"] = text
    return s


def dataclass_schema(cls, default_caps: bool = False, glossary: dict | None = None,
                     overrides: dict | None = None) -> dict:
    """A JSON schema (draft-07 keywords) of a config dataclass: its keys (no others),
    their types, choices, ranges, defaults and meanings; ``overrides`` replace fields' schemas."""
    hints = typing.get_type_hints(cls)
    meanings = _meanings(cls)
    props = {}
    for f in dataclasses.fields(cls):
        if overrides and f.name in overrides:
            props[f.name] = overrides[f.name]
            continue
        props[f.name] = field_schema(f, hints[f.name], default_caps, glossary, meanings.get(f.name, ""))
    return {"type": "object", "properties": props, "additionalProperties": False}


def adapter_config_schema() -> dict:
    """The JSON schema of one adapter config: a ``method`` and that method's keys, or a peer
    ``preset`` ("adapterhub:seq_bn", ...) with overrides."""
    from adapterkit.core.peer_presets import peer_presets

    methods = registered_methods()
    branches = []
    for name in methods:
        cls, _ = method_entry(name)
        s = dataclass_schema(cls, default_caps=True, glossary=_method_glossary(cls),
                             overrides={"method": {"const": name, "description": method_summary(name)}})
        branches.append({"if": {"required": ["method"], "properties": {"method": {"const": name}},
                                "not": {"required": ["preset"]}},
                         "then": s})
    return {
        "type": "object",
        "properties": {
            "method": {"enum": methods, "description": "the adapter method"},
            "preset": {"enum": sorted(peer_presets()),
                       "description": "a peer library's preset (its other keys override the preset's)"},
        },
        "anyOf": [{"required": ["method"]}, {"required": ["preset"]}],
        "allOf": branches,
    }
