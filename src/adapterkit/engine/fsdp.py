"""FSDP2 sharding of a frozen backbone with its adapters trained (``train.fsdp``).

For backbones too large for one device: PyTorch's FSDP2 (:func:`torch.distributed.fsdp.fully_shard`)
splits every parameter along its first dimension over the processes of the run (a 1-D device mesh
over the world: gloo on CPU, NCCL on GPU), so each process stores 1/world of the frozen weights.
A block's weights are all-gathered just before its forward (and again before its backward) and
freed after; the gradients of the trainable parameters are averaged and reduce-scattered by FSDP
itself, so a sharded run **must not** also all-reduce gradients (:func:`is_sharded` tells).

What is sharded (:func:`shard_model`):

- each transformer block, one FSDP unit each: the modules of the classes the Hugging Face model
  names in ``_no_split_modules`` (any submodule's, so a wrapper around an HF backbone works too),
  or the classes given in ``layer_classes``, or else the items of the model's ``nn.ModuleList`` s;
- the input and output embeddings, each a unit of its own, when they are not tied to anything;
- the root: everything else (the final norm, a task head, and the adapterkit container, which
  holds the adapters' parameters: see below).

Adapterkit adapters keep their parameters in ``model.adapterkit`` (a child of the model, outside
the blocks) and reach the blocks through hooks, so they belong to the root unit: stored sharded
like every other parameter, all-gathered once at the start of the model's forward and kept whole
until the end of its backward (adapters are small: this costs their full size, not the
backbone's). A method that wraps a block's module instead holds its parameters inside the block
and is sharded with it. Either way every trainable parameter's gradient is the one a
single process gets on the whole global batch (each process the mean loss of its equal share of
rows; FSDP averages over the processes).

The checkpoint of a sharded run holds full tensors, the same file a one-process run writes:
:func:`full_trainable_state` / :func:`full_optimizer_state` gather them (collectives: every rank
calls them), :func:`load_trainable_state` / :func:`load_optimizer_state` give each rank its shard
of full tensors it has read (no communication).

bf16: :func:`mixed_precision` (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``):
the weights are all-gathered and used in bf16, the gradients reduced in fp32 into fp32 trainable
shards.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from adapterkit.core.base import CONTAINER
from adapterkit.errors import ConfigError

__all__ = [
    "block_modules",
    "even_rows",
    "fsdp_unavailable",
    "full_adapter_state",
    "full_optimizer_state",
    "full_trainable_state",
    "is_sharded",
    "load_optimizer_state",
    "load_trainable_state",
    "local_numel",
    "mixed_precision",
    "shard_model",
]


def fsdp_unavailable() -> str | None:
    """Why FSDP2 cannot be used in this PyTorch (None when it can)."""
    if not torch.distributed.is_available():
        return "this PyTorch build has no torch.distributed"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
        from torch.distributed.tensor import DTensor  # noqa: F401
    except ImportError as e:  # PyTorch < 2.6
        return f"this PyTorch ({torch.__version__}) has no FSDP2 (torch.distributed.fsdp.fully_shard): {e}"
    return None


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


def _fsdp_module_cls():
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def is_sharded(model: nn.Module) -> bool:
    """True when :func:`shard_model` sharded ``model`` (then FSDP reduces the gradients: the
    engine's own gradient all-reduce must be skipped)."""
    if fsdp_unavailable() is not None:
        return False
    return isinstance(model, _fsdp_module_cls())


def _outside_container(path: str) -> bool:
    return not (path == CONTAINER or path.startswith(CONTAINER + ".") or f".{CONTAINER}." in f".{path}.")


def _class_names(layer_classes) -> set[str]:
    names = set()
    for c in layer_classes:
        if isinstance(c, str):
            names.add(c)
        elif isinstance(c, type) and issubclass(c, nn.Module):
            names.add(c.__name__)
        else:
            raise ConfigError(f"layer_classes takes nn.Module classes or class names, got {c!r}")
    return names


def _outermost(found: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Drop the modules nested inside another of ``found`` (named_modules order: parents first)."""
    out = []
    for path, m in found:
        if not any(path.startswith(p + ".") for p, _ in out):
            out.append((path, m))
    return out


def block_modules(model: nn.Module, layer_classes=None) -> list[tuple[str, nn.Module]]:
    """The ``(path, module)`` of the transformer blocks :func:`shard_model` makes FSDP units of
    (outermost matches, outside the adapterkit container): the modules of ``layer_classes``
    (classes or class names), else of the classes in any submodule's ``_no_split_modules``
    (Hugging Face models name their blocks there), else the items of every ``nn.ModuleList``."""
    mods = [(p, m) for p, m in model.named_modules() if p and _outside_container(p)]
    if layer_classes is not None:
        names = _class_names(layer_classes)
        found = [(p, m) for p, m in mods if type(m).__name__ in names]
        if not found:
            have = sorted({type(m).__name__ for _, m in mods})
            raise ConfigError(f"no module of {type(model).__name__} is of the layer_classes {sorted(names)} "
                              f"(its module classes: {', '.join(have[:12])}{'...' if len(have) > 12 else ''})")
        return _outermost(found)
    names = set()
    for m in [model] + [m for _, m in mods]:
        names |= set(getattr(m, "_no_split_modules", None) or ())
    found = [(p, m) for p, m in mods if type(m).__name__ in names]
    if found:
        return _outermost(found)
    lists = _outermost([(p, m) for p, m in mods if isinstance(m, nn.ModuleList)])
    return [(f"{p}.{i}", m) for p, lst in lists for i, m in enumerate(lst)
            if next(m.parameters(), None) is not None]


def _embedding_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    paths = {id(m): p for p, m in model.named_modules()}
    out = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        try:
            m = fn() if callable(fn) else None
        except (NotImplementedError, AttributeError):
            m = None
        if isinstance(m, nn.Module) and id(m) in paths and paths[id(m)] and next(m.parameters(), None) is not None:
            out.append((paths[id(m)], m))
    return out


def _shares_parameters(module: nn.Module, model: nn.Module) -> bool:
    """Does a parameter of ``module`` also belong to a module outside it (tied weights)? Such a
    module cannot be a unit of its own: FSDP shards each parameter in one unit only."""
    inside = {id(p) for p in module.parameters()}
    mine = {id(m) for m in module.modules()}
    for m in model.modules():
        if id(m) in mine:
            continue
        if any(id(p) in inside for p in m.parameters(recurse=False)):
            return True
    return False


def mixed_precision(bf16: bool = True, reduce_dtype: torch.dtype = torch.float32):
    """The FSDP2 mixed-precision policy of a bf16 run: weights all-gathered and computed in bf16,
    gradients reduced in ``reduce_dtype`` (fp32) into the (fp32) trainable shards; None (full
    precision) when ``bf16`` is False."""
    if not bf16:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce_dtype)


def _placement(world: int):
    """Shard each parameter along dim 0, or, where dim 0 is shorter than the world (a shared
    adapter's weights are stacked (1, ...)), along its longest dim: every rank holds a share."""
    from torch.distributed.tensor import Shard

    def fn(p: nn.Parameter):
        if p.dim() == 0:
            return None
        if p.shape[0] >= world:
            return Shard(0)
        dim = max(range(p.dim()), key=lambda d: p.shape[d])
        return Shard(dim if p.shape[dim] >= world else 0)

    return fn


def _world_mesh(device: torch.device | None):
    from torch.distributed.device_mesh import init_device_mesh

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return init_device_mesh(torch.device(device).type, (torch.distributed.get_world_size(),))


def shard_model(model: nn.Module, mesh=None, *, layer_classes=None, reshard_after_forward: bool = True,
                mp_policy=None, shard_embeddings: bool = True, device: torch.device | None = None) -> nn.Module:
    """Shard ``model`` (adapters attached, on its device) with FSDP2 over the processes of the run
    and return it (the same object, now also a ``FSDPModule``).

    ``mesh``: a 1-D DeviceMesh (default: every process of the initialised process group, on
    ``device`` / the current CUDA device / the CPU); ``layer_classes``: the block classes (see
    :func:`block_modules`); ``reshard_after_forward``: free each block's gathered weights after
    its forward (False keeps them until the backward: faster, more memory); ``mp_policy``: a
    ``MixedPrecisionPolicy`` (:func:`mixed_precision` for bf16); ``shard_embeddings``: untied
    input / output embeddings as units of their own.

    Call it before the optimizer is made: the model's parameters are replaced by sharded ones
    (``DTensor`` s; names, shapes, dtypes and ``requires_grad`` stay, and attributes set on a
    parameter, such as the task-stacked tag of :class:`~adapterkit.core.optim.TaskAwareAdamW`,
    are carried over). Without a process group (one process) the model is returned unchanged.
    """
    reason = fsdp_unavailable()
    if reason is not None:
        raise ConfigError(f"train.fsdp: {reason}")
    if is_sharded(model):
        return model
    if not torch.distributed.is_initialized():
        return model
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        mesh = _world_mesh(device)
    elif mesh.ndim != 1:
        raise ConfigError(f"shard_model takes a 1-D device mesh, got one of {mesh.ndim} dimensions")
    # attributes set on parameters (FSDP makes new Parameter objects)
    attrs = {n: dict(vars(p)) for n, p in model.named_parameters(remove_duplicate=False) if vars(p)}
    kw = {"mesh": mesh, "shard_placement_fn": _placement(mesh.size())}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    units = block_modules(model, layer_classes)
    if shard_embeddings:
        taken = [p for p, _ in units]
        units += [(p, m) for p, m in _embedding_modules(model)
                  if not any(p == t or p.startswith(t + ".") or t.startswith(p + ".") for t in taken)]
    for _, m in units:
        if not _shares_parameters(m, model):
            fully_shard(m, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    _generation_ready(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    for n, a in attrs.items():
        if n in params:
            for k, v in a.items():
                if not hasattr(params[n], k):
                    setattr(params[n], k, v)
    return model


def _generation_ready(model: nn.Module) -> None:
    """``generate()`` on a sharded model: the root unit is gathered around the whole call (an
    encoder-decoder's generate runs its encoder before any forward of the root), and Hugging Face
    models generate with ``synced_gpus`` (every rank keeps stepping until all ranks are done:
    each step's gathers are collectives), which transformers turns on for models marked as
    FSDP-managed."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    if callable(getattr(model, "generate", None)):
        register_fsdp_forward_method(model, "generate")
    for m in model.modules():
        if callable(getattr(m, "generate", None)) and hasattr(m, "config"):
            m._is_fsdp_managed_module = True


def _fsdp_modules(model: nn.Module) -> list:
    cls = _fsdp_module_cls()
    return [m for m in model.modules() if isinstance(m, cls)]


def _resharded(model: nn.Module) -> None:
    """Every unit back to its shards (local: frees gathered weights, which a load would leave
    stale), so the model's parameters are the sharded ones."""
    for m in _fsdp_modules(model):
        m.reshard()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, _dtensor_cls()) else t


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    if is_sharded(model):
        _resharded(model)
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: full tensor}`` of the trainable parameters (detached), gathered from the shards;
    a collective on a sharded model: every rank calls it (each gets the whole state). On an
    unsharded model: the parameters themselves."""
    return {n: _full(p.detach()) for n, p in _trainable(model).items()}


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What :func:`adapterkit.save_adapters` writes (the adapters' parameters and buffers, the
    base modules the freeze policy trains), as full tensors: pass it as ``state_dict=`` to
    ``save_adapters`` on rank 0. A collective on a sharded model: every rank calls it."""
    from adapterkit.core.io import adapter_state_dict

    if is_sharded(model):
        _resharded(model)
    return {n: _full(t) for n, t in adapter_state_dict(model).items()}


def _shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``full`` laid out as the parameter / state ``like`` (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    full = full.detach().to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy full tensors (as :func:`full_trainable_state` / :func:`full_adapter_state` give them,
    or a checkpoint holds them; every rank has them) into the model, each rank its shard of a
    sharded parameter (no communication). Keys are parameter or buffer names of the model (an
    adapter's buffers, a frozen adapter tensor may come with the trainable ones); ``strict``:
    every trainable parameter must be there. A key the model lacks or a shape that differs is
    one :class:`ConfigError` naming it."""
    trainable = _trainable(model)
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    if strict:
        missing = [n for n in trainable if not isinstance(state.get(n), torch.Tensor)]
        if missing:
            raise ConfigError(f"the trainable state has no tensor for {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for n, t in state.items():
        if n not in tensors:
            raise ConfigError(f"the trainable state has {n!r}, which is not a parameter or buffer of the model")
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"the trainable state's {n!r} is not a tensor ({type(t).__name__})")
        if tuple(t.shape) != tuple(tensors[n].shape):
            raise ConfigError(f"the trainable state's {n!r} has shape {tuple(t.shape)}, "
                              f"the model's {tuple(tensors[n].shape)}")
    DTensor = _dtensor_cls() if fsdp_unavailable() is None else ()
    with torch.no_grad():
        for n, t in state.items():
            p = tensors[n]
            if DTensor and isinstance(p, DTensor):
                p.to_local().copy_(_shard_of(t, p))
            else:
                p.copy_(t.to(p.device))


def _map_state(state: dict, fn) -> dict:
    return {"state": {k: {s: fn(k, s, v) for s, v in st.items()} for k, st in state["state"].items()},
            "param_groups": state["param_groups"]}


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor (Adam's moments) gathered to
    its full tensor: the state dict a one-process run has. A collective on a sharded model."""
    return _map_state(optimizer.state_dict(), lambda k, s, v: _full(v) if isinstance(v, torch.Tensor) else v)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state dict (:func:`full_optimizer_state`, read by every rank):
    each state tensor of a sharded parameter becomes this rank's shard (no communication)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    DTensor = _dtensor_cls() if fsdp_unavailable() is None else ()

    def shard(k, s, v):
        p = params[k] if isinstance(k, int) and 0 <= k < len(params) else None
        if DTensor and isinstance(p, DTensor) and isinstance(v, torch.Tensor) and not isinstance(v, DTensor) \
                and tuple(v.shape) == tuple(p.shape):
            from torch.distributed.tensor import DTensor as DT

            local = _shard_of(v.to(p.dtype) if v.is_floating_point() else v, p)
            return DT.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        return v

    optimizer.load_state_dict(_map_state(state, shard))


def even_rows(n: int, rank: int, world: int) -> np.ndarray:
    """Rows ``rank::world`` of ``range(n)``, padded to ``ceil(n / world)`` by repeating the rank's
    last row (row 0 for a rank with none): under FSDP every rank must run the same number of
    forward passes, and a repeated row only repeats a prediction under the same example id."""
    if n < 1 or world < 1 or not 0 <= rank < world:
        raise ConfigError(f"even_rows needs n >= 1 and 0 <= rank < world, got n={n}, rank={rank}, world={world}")
    rows = np.arange(n)[rank::world]
    need = -(-n // world)
    if len(rows) < need:
        rows = np.concatenate([rows, np.full(need - len(rows), rows[-1] if len(rows) else 0)])
    return rows


def local_numel(model: nn.Module) -> dict[str, int]:
    """How many elements this process stores: ``{"frozen_local", "frozen_full",
    "trainable_local", "trainable_full"}`` (a sharded parameter counts its local shard)."""
    DTensor = _dtensor_cls() if fsdp_unavailable() is None else ()
    if is_sharded(model):
        _resharded(model)
    out = {"frozen_local": 0, "frozen_full": 0, "trainable_local": 0, "trainable_full": 0}
    for p in model.parameters():
        kind = "trainable" if p.requires_grad else "frozen"
        out[f"{kind}_full"] += p.numel()
        out[f"{kind}_local"] += p.to_local().numel() if DTensor and isinstance(p, DTensor) else p.numel()
    return out
