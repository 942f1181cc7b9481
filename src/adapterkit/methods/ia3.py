"""(IA)^3 (Liu et al. 2022): learned vectors that rescale activations, initialised to ones.

Two variants, as the two peers have them (they differ, e.g. on BART):

- ``peft`` (HF PEFT ``IA3Config``): output-scaled targets ``(W x + b) * l`` and input-scaled
  feed-forward targets ``W (x * l)`` (the down-projection's input, i.e. after the FFN's
  nonlinearity: the paper's ``l_ff``). BART: q, v and the input of fc2; BERT: key, value and
  the input of both ``output.dense`` modules; Llama: k, v and the input of down_proj.
- ``adapterhub`` (AdapterHub ``IA3Config``): every target output-scaled: k and v of every
  attention (cross-attention included) and the FFN's first linear, before its activation
  (Llama: down_proj's output).

The per-architecture defaults are data (``ia3`` in the profiles); ``scale_output`` /
``scale_input`` (profile places) or ``target_modules`` / ``feedforward_modules`` (module
names, PEFT-style; feed-forward ones input-scaled) override them. Merging multiplies the
weights (rows for output scaling, with the bias; columns for input scaling).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from adapterkit.core.base import AdapterSet, places_for
from adapterkit.core.config import AdapterConfig, choice, register_method
from adapterkit.core.hooks import first as _first
from adapterkit.core.hooks import replace_first as _replace_first
from adapterkit.core.optim import mark_task_stacked
from adapterkit.core.routing import expand_to_batch
from adapterkit.errors import ConfigError


@dataclass
class IA3Config(AdapterConfig):
    method: str = "ia3"
    variant: str = choice("peft", "adapterhub", default="peft")
    scale_output: list[str] | None = None      # profile places, output-scaled (None: the variant's default)
    scale_input: list[str] | None = None       # profile places, input-scaled
    target_modules: list[str] | None = None    # module names / regexes (replaces the places)
    feedforward_modules: list[str] = field(default_factory=list)  # subset of target_modules, input-scaled

    def validate(self) -> None:
        super().validate()
        if self.feedforward_modules and not self.target_modules:
            raise ConfigError("feedforward_modules must be a subset of target_modules, which is not set")
        extra = set(self.feedforward_modules) - set(self.target_modules or [])
        if extra:
            raise ConfigError(f"feedforward_modules {sorted(extra)} are not in target_modules {self.target_modules}")


def _widths(module: nn.Module) -> tuple[int, int, bool]:
    """(in, out, weight stored transposed) of a Linear or GPT-2 Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    w = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and w is not None:
        return w.shape[0], w.shape[1], True
    raise ConfigError(f"(IA)^3 scales linear layers, but {type(module).__name__} is not one")


class IA3Set(AdapterSet):
    can_merge = True

    def __init__(self, cfg: IA3Config):
        super().__init__(cfg)
        self.vectors = nn.ParameterDict()
        self.per_task = cfg.copies("all") > 1
        self._targets: dict[str, tuple[nn.Module, bool, bool]] = {}  # key -> (module, input side, transposed)
        self._merged_task = None

    def _find(self, model, profile) -> list[tuple[object, bool]]:
        cfg: IA3Config = self.config
        if cfg.target_modules:
            ff = [t for t in cfg.target_modules if t in cfg.feedforward_modules]
            plain = [t for t in cfg.target_modules if t not in cfg.feedforward_modules]
            out = [(p, True) for p in places_for(model, profile, "ia3_ff", cfg, ff)] if ff else []
            taken = {p.path for p, _ in out}
            if plain:
                out += [(p, False) for p in places_for(model, profile, "ia3", cfg, plain) if p.path not in taken]
            return out
        default = (profile or {}).get("ia3", {}).get(cfg.variant, {})
        outs = cfg.scale_output if cfg.scale_output is not None else default.get("scale_output")
        ins = cfg.scale_input if cfg.scale_input is not None else default.get("scale_input", [])
        if outs is None:
            raise ConfigError(f'(IA)^3 has no "{cfg.variant}" defaults for {type(model).__name__}: give '
                              "scale_output / scale_input places or target_modules")
        found, seen = [], {}
        for kinds, side in ((ins, True), (outs, False)):
            for kind in kinds:
                for p in places_for(model, profile, kind, cfg):
                    if p.path in seen:
                        if seen[p.path] != side:
                            raise ConfigError(f"{p.path} is both output- and input-scaled")
                        continue
                    seen[p.path] = side
                    found.append((p, side))
        return found

    def attach(self, model, profile):
        n = self.config.copies("all")
        for place, input_side in self._find(model, profile):
            d_in, d_out, transposed = _widths(place.module)
            width = d_in if input_side else d_out
            v = nn.Parameter(torch.ones(n, width))
            self.vectors[place.key] = mark_task_stacked(v) if n > 1 else v
            self._targets[place.key] = (place.module, input_side, transposed)
            if input_side:
                self.add_pre_hook(place.module, self._in_hook(place.key))
            else:
                self.add_forward_hook(place.module, self._out_hook(place.key))
        if not self._targets:
            raise ConfigError("(IA)^3 found no module to scale")
        self.paths = {k: ("input" if s else "output") for k, (_, s, _) in self._targets.items()}

    def _vector(self, key: str, x: torch.Tensor) -> torch.Tensor:
        v = self.vectors[key]
        if not self.per_task:
            return v[0]
        task = self.router.resolve(x.device)
        if isinstance(task, int):
            return v[task]
        task = expand_to_batch(task, x.shape[0])
        return v.index_select(0, task).view((x.shape[0],) + (1,) * (x.dim() - 2) + (v.shape[1],))

    def _in_hook(self, key: str):
        def hook(module, args):
            x = args[0]
            return (x * self._vector(key, x).to(x.dtype),) + tuple(args[1:])
        return hook

    def _out_hook(self, key: str):
        def hook(module, args, out):
            h = _first(out)
            return _replace_first(out, h * self._vector(key, h).to(h.dtype))
        return hook

    # -- merging -----------------------------------------------------------------------
    @torch.no_grad()
    def _scale_weights(self, t: int, inverse: bool) -> None:
        for key, (mod, input_side, transposed) in self._targets.items():
            v = self.vectors[key][t].to(mod.weight.dtype)
            op = torch.Tensor.div_ if inverse else torch.Tensor.mul_
            # nn.Linear weight (out, in); Conv1D weight (in, out)
            if input_side:
                op(mod.weight, v.view(-1, 1) if transposed else v.view(1, -1))
            else:
                op(mod.weight, v.view(1, -1) if transposed else v.view(-1, 1))
                if getattr(mod, "bias", None) is not None:
                    op(mod.bias, v)

    def merge(self, task=None) -> None:
        if self.merged:
            raise ConfigError("(IA)^3 vectors are already merged; unmerge first")
        if self.per_task and task is None:
            raise ConfigError(f"this (IA)^3 has per-task vectors for {list(self.config.tasks)}: "
                              "merge_adapters(model, task=...) must name the task to merge")
        t = 0 if not self.per_task else (self.router.tasks.index(task) if isinstance(task, str) else int(task))
        self._scale_weights(t, inverse=False)
        self._merged_task = t
        self.merged = True
        self.suspend_hooks()

    def unmerge(self) -> None:
        if not self.merged:
            return
        self._scale_weights(self._merged_task, inverse=True)
        self.merged = False
        self._merged_task = None
        self.resume_hooks()


register_method("ia3", IA3Config, IA3Set)

__all__ = ["IA3Config", "IA3Set"]
