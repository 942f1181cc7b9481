"""Benchmark cases: what is attached to a fresh model, how it is routed, what trains.

Every case builds a fresh random-init model (same seed) and returns a :class:`Prepared`
bundle; the runner times it. Case names are stable (they key the JSON output).

- Baselines: full fine-tuning and the frozen-backbone bound (every weight frozen, one
  trainable scalar multiplying the token-embedding output, so every activation
  gradient still flows but no weight gradient is computed: no adapter can train
  faster than this).
- adapterkit: VL-Adapter's method presets on the plain seq2seq LM (each also trains
  every LayerNorm, as VL-Adapter does), and per-task adapters/LoRAs served to a batch
  routed to one task or to 4 tasks interleaved (per-example task tensor).
- Peers, when importable: HF PEFT LoRA / prompt tuning / multi-LoRA batches
  (``adapter_names=``), AdapterHub ``adapters``.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapterkit.bench.shapes import Batch, Shape, build_model
from adapterkit.core.base import add_adapters, merge_adapters
from adapterkit.errors import ConfigError, did_you_mean

N_TASKS = 4
TASKS = [f"t{i}" for i in range(N_TASKS)]
ADAPTER_POSITIONS = ["attn_out", "cross_attn_out", "ffn_out"]

# VL-Adapter's method settings (specs/vl-adapter.md), applied to the plain seq2seq LM.
# Every parameter-efficient method also trains the LM's LayerNorms, as VL-Adapter does.
PRESETS: dict[str, dict] = {
    "single_adapter": {"method": "houlsby", "reduction_factor": 8, "activation": "gelu_new",
                       "positions": ADAPTER_POSITIONS, "sharing": "shared", "train_layernorms": True},
    "single_lora": {"method": "lora", "r": 128, "alpha": 32, "dropout": 0.1, "targets": ["q", "v"],
                    "sharing": "shared", "train_layernorms": True},
    "single_lora_do0": {"method": "lora", "r": 128, "alpha": 32, "dropout": 0.0, "targets": ["q", "v"],
                        "sharing": "shared", "train_layernorms": True},
    "single_compacter": {"method": "compacter", "phm_dim": 2, "shared_phm_rule": False, "factorized_phm": False,
                         "reduction_factor": 8, "positions": ADAPTER_POSITIONS, "sharing": "shared",
                         "train_layernorms": True},
    "hyperformer": {"method": "hyperformer", "task_embedding_dim": 512, "projected_dim": 8, "reduction_factor": 8,
                    "tasks": TASKS, "positions": ADAPTER_POSITIONS, "train_layernorms": True},
    "single_prompt": {"method": "prompt", "num_tokens": 40, "reparam_dim": 800, "sharing": "shared",
                      "train_layernorms": True},
    "pfeiffer": {"method": "pfeiffer", "reduction_factor": 8, "sharing": "shared", "train_layernorms": True},
    # the same methods configured exactly like the peers (no LayerNorm training, no prompt reparameterisation)
    "lora_peer": {"method": "lora", "r": 128, "alpha": 32, "dropout": 0.1, "targets": ["q", "v"], "sharing": "shared"},
    "lora_do0_peer": {"method": "lora", "r": 128, "alpha": 32, "dropout": 0.0, "targets": ["q", "v"],
                      "sharing": "shared"},
    "prompt_peer": {"method": "prompt", "num_tokens": 40, "sharing": "shared"},
    # AdapterHub double_seq_bn / Compacter: after self-attention and FFN (no cross-attention adapter), swish / gelu,
    # the adapter reading the sublayer output; seq_bn: after the FFN, reading LN(h + x) with the block's LayerNorm
    # applied again after (adapter_input normed_sum). Output parity: tests/test_adapterhub_parity.py
    "houlsby_peer": {"method": "houlsby", "reduction_factor": 8, "activation": "swish",
                     "positions": ["attn_out", "ffn_out"], "sharing": "shared"},
    "pfeiffer_peer": {"method": "pfeiffer", "reduction_factor": 8, "adapter_input": "normed_sum", "sharing": "shared"},
    "compacter_peer": {"method": "compacter", "phm_dim": 4, "reduction_factor": 8, "activation": "gelu",
                       "phm_init_std": 1e-4, "positions": ["attn_out", "ffn_out"], "sharing": "shared"},
    "multiple_adapters": {"method": "houlsby", "reduction_factor": 8, "activation": "gelu_new",
                          "positions": ADAPTER_POSITIONS, "tasks": TASKS, "sharing": "per_task",
                          "train_layernorms": True},
    "multiple_lora": {"method": "lora", "r": 128, "alpha": 32, "dropout": 0.1, "targets": ["q", "v"],
                      "tasks": TASKS, "sharing": "per_task", "train_layernorms": True},
}


class PeerMissing(Exception):
    """A peer library is not importable in this environment."""


@dataclass
class BuildContext:
    """What a case builder needs: the shape, device, seed and the fixed batch."""

    shape: Shape
    device: torch.device
    seed: int
    batch: Batch

    def fresh(self) -> nn.Module:
        return build_model(self.shape, self.seed, self.device)

    def mixed_tasks(self) -> torch.Tensor:
        """Per-example task ids, 4 tasks interleaved (0, 1, 2, 3, 0, ...), on the device."""
        return torch.arange(self.batch.size, device=self.device) % N_TASKS

    def mixed_names(self) -> list[str]:
        return [TASKS[i % N_TASKS] for i in range(self.batch.size)]


@dataclass
class Prepared:
    """A model ready to time: trainable parameters, routing and extra forward kwargs."""

    model: nn.Module
    params: list[nn.Parameter]
    route: Any = None              # task spec for adapterkit.route(), or None
    kwargs: dict = field(default_factory=dict)  # extra forward kwargs (PEFT adapter_names=...)
    train_mode: bool = True        # False: time the training step with the model in eval mode
    note: str = ""


@dataclass(frozen=True)
class Case:
    name: str
    kind: str                      # "train" or "infer"
    group: str                     # "baseline", "adapterkit", "peft", "adapterhub"
    title: str
    build: Callable[[BuildContext], Prepared]
    pair: str | None = None        # the single-task case a mixed-batch case is compared with

    @property
    def ref(self) -> str:
        """The case every ratio of this one is taken against (same run)."""
        return "full_ft" if self.kind == "train" else "infer_base"


def trainable(model: nn.Module) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def input_embeddings(model: nn.Module) -> list[nn.Module]:
    """The token-embedding modules a forward calls (input embeddings + every ``*embed_tokens``)."""
    mods = {}
    get = getattr(model, "get_input_embeddings", None)
    if get is not None and get() is not None:
        mods[id(get())] = get()
    for name, mod in model.named_modules():
        if name.endswith("embed_tokens") and isinstance(mod, nn.Embedding):
            mods[id(mod)] = mod
    return list(mods.values())


# --- builders ---------------------------------------------------------------------------

def _full_ft(ctx: BuildContext) -> Prepared:
    m = ctx.fresh()
    return Prepared(m, trainable(m))


def add_frozen_bound(model: nn.Module) -> nn.Parameter:
    """Freeze every weight; add one scalar ``gate`` multiplying the token-embedding outputs."""
    model.requires_grad_(False)
    ref = next(model.parameters())
    gate = nn.Parameter(torch.ones((), device=ref.device))
    model.register_parameter("bench_gate", gate)

    def hook(module, args, out):
        return out * gate

    for emb in input_embeddings(model):
        emb.register_forward_hook(hook)
    return gate


def _frozen_bound(ctx: BuildContext) -> Prepared:
    m = ctx.fresh()
    gate = add_frozen_bound(m)
    return Prepared(m, [gate])


def _ak(preset: str, routing: str | None = None, merge: bool = False) -> Callable[[BuildContext], Prepared]:
    def build(ctx: BuildContext) -> Prepared:
        m = ctx.fresh()
        add_adapters(m, copy.deepcopy(PRESETS[preset]))
        route = None
        if routing == "single":
            route = TASKS[0]
        elif routing == "mixed":
            route = ctx.mixed_tasks()
        if merge:
            merge_adapters(m)
        return Prepared(m, trainable(m), route=route)
    return build


def _import_peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - peft is installed in this project's env
        raise PeerMissing(f"peft not installed ({e})") from None
    return peft


def _peft_targets(shape: Shape) -> list[str]:
    return ["q_proj", "v_proj"] if shape.family in ("bart", "llama") else ["q", "v"]


def _peft_lora(dropout: float) -> Callable[[BuildContext], Prepared]:
    def build(ctx: BuildContext) -> Prepared:
        peft = _import_peft()
        m = ctx.fresh()
        cfg = peft.LoraConfig(r=128, lora_alpha=32, lora_dropout=dropout, target_modules=_peft_targets(ctx.shape))
        pm = peft.get_peft_model(m, cfg)
        return Prepared(pm, trainable(pm), note=f"peft {peft.__version__}")
    return build


def _peft_prompt(ctx: BuildContext) -> Prepared:
    peft = _import_peft()
    m = ctx.fresh()
    pm = peft.get_peft_model(m, peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=40))
    return Prepared(pm, trainable(pm), note=f"peft {peft.__version__}")


def _peft_multi_lora(routing: str, train: bool) -> Callable[[BuildContext], Prepared]:
    """4 PEFT LoRAs (r 128, alpha 32, q/v, dropout 0.1); single task active, or a mixed batch
    with ``adapter_names=`` (PEFT refuses that argument in train mode, so a mixed training
    step runs with the model in eval mode: dropout off, every LoRA trainable)."""
    def build(ctx: BuildContext) -> Prepared:
        peft = _import_peft()
        m = ctx.fresh()
        cfg = peft.LoraConfig(r=128, lora_alpha=32, lora_dropout=0.1, target_modules=_peft_targets(ctx.shape))
        pm = peft.get_peft_model(m, cfg, adapter_name=TASKS[0])
        for t in TASKS[1:]:
            pm.add_adapter(t, copy.deepcopy(cfg))
        pm.set_adapter(TASKS[0])
        note = f"peft {peft.__version__}"
        if routing == "mixed":
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.requires_grad_(True)
            kwargs = {"adapter_names": ctx.mixed_names()}
            if train:
                note += "; train step in eval mode (PEFT rejects adapter_names in train mode)"
            return Prepared(pm, trainable(pm), kwargs=kwargs, train_mode=False, note=note)
        return Prepared(pm, trainable(pm), note=note)
    return build


def _adapterhub(config_name: str) -> Callable[[BuildContext], Prepared]:
    def build(ctx: BuildContext) -> Prepared:
        try:
            import adapters
        except ImportError:
            raise PeerMissing("not installed (AdapterHub `adapters` needs transformers 4.57.x)") from None
        m = ctx.fresh()
        adapters.init(m)
        m.add_adapter("t", config=getattr(adapters, config_name)(reduction_factor=8))
        m.train_adapter("t")
        m.set_active_adapters("t")
        m.to(ctx.device)  # AdapterHub creates its modules on the CPU, whatever the model's device
        return Prepared(m, trainable(m), note=f"adapters {adapters.__version__}")
    return build


def _infer_base(ctx: BuildContext) -> Prepared:
    return Prepared(ctx.fresh(), [])


def _c(name, kind, group, title, build, pair=None) -> Case:
    return Case(name, kind, group, title, build, pair)


CASES: list[Case] = [
    # training steps
    _c("full_ft", "train", "baseline", "full fine-tuning", _full_ft),
    _c("frozen_bound", "train", "baseline", "frozen-backbone bound (1 scalar on embeddings)", _frozen_bound),
    _c("single_adapter", "train", "adapterkit", "single adapter (houlsby r=8, shared)", _ak("single_adapter")),
    _c("single_lora", "train", "adapterkit", "single LoRA (r 128, a 32, q/v, dropout 0.1)", _ak("single_lora")),
    _c("single_lora_do0", "train", "adapterkit", "single LoRA, dropout 0", _ak("single_lora_do0")),
    _c("single_compacter", "train", "adapterkit", "single Compacter (phm 2, per-layer rules, full W)",
       _ak("single_compacter")),
    _c("hyperformer", "train", "adapterkit", "Hyperformer (4 tasks, one routed)", _ak("hyperformer", "single")),
    _c("single_prompt", "train", "adapterkit", "single prompt (40 tokens, reparam 800)", _ak("single_prompt")),
    _c("pfeiffer", "train", "adapterkit", "Pfeiffer adapter (r=8, after FFN)", _ak("pfeiffer")),
    _c("multiple_adapters_single", "train", "adapterkit", "multiple adapters (4 per-task), 1-task batch",
       _ak("multiple_adapters", "single")),
    _c("multiple_adapters_mixed", "train", "adapterkit", "multiple adapters (4 per-task), mixed 4-task batch",
       _ak("multiple_adapters", "mixed"), pair="multiple_adapters_single"),
    _c("multiple_lora_single", "train", "adapterkit", "multiple LoRA (4 per-task), 1-task batch",
       _ak("multiple_lora", "single")),
    _c("multiple_lora_mixed", "train", "adapterkit", "multiple LoRA (4 per-task), mixed 4-task batch",
       _ak("multiple_lora", "mixed"), pair="multiple_lora_single"),
    _c("lora_peer", "train", "adapterkit", "LoRA as peft_lora (r 128, a 32, q/v, dropout 0.1, no LayerNorms)",
       _ak("lora_peer")),
    _c("lora_do0_peer", "train", "adapterkit", "LoRA as peft_lora_do0 (dropout 0, no LayerNorms)", _ak("lora_do0_peer")),
    _c("prompt_peer", "train", "adapterkit", "prompt as peft_prompt (40 tokens, no reparam, no LayerNorms)",
       _ak("prompt_peer")),
    _c("houlsby_peer", "train", "adapterkit", "Houlsby as adapterhub_houlsby (r=8, swish, attn+FFN, no LayerNorms)",
       _ak("houlsby_peer")),
    _c("pfeiffer_peer", "train", "adapterkit", "Pfeiffer as adapterhub_pfeiffer (r=8, relu, reads LN(h+x), no LayerNorms)",
       _ak("pfeiffer_peer")),
    _c("compacter_peer", "train", "adapterkit", "Compacter as adapterhub_compacter (phm 4, r=8, attn+FFN, no LayerNorms)",
       _ak("compacter_peer")),
    _c("peft_lora", "train", "peft", "PEFT LoRA (r 128, a 32, q/v, dropout 0.1)", _peft_lora(0.1)),
    _c("peft_lora_do0", "train", "peft", "PEFT LoRA, dropout 0", _peft_lora(0.0)),
    _c("peft_prompt", "train", "peft", "PEFT prompt tuning (40 tokens)", _peft_prompt),
    _c("peft_multi_lora_single", "train", "peft", "PEFT 4 LoRAs, 1 active", _peft_multi_lora("single", True)),
    _c("peft_multi_lora_mixed", "train", "peft", "PEFT 4 LoRAs, mixed batch (adapter_names=)",
       _peft_multi_lora("mixed", True), pair="peft_multi_lora_single"),
    _c("adapterhub_houlsby", "train", "adapterhub", "AdapterHub double_seq_bn r=8", _adapterhub("DoubleSeqBnConfig")),
    _c("adapterhub_pfeiffer", "train", "adapterhub", "AdapterHub seq_bn r=8", _adapterhub("SeqBnConfig")),
    _c("adapterhub_compacter", "train", "adapterhub", "AdapterHub Compacter r=8", _adapterhub("CompacterConfig")),
    # inference (forward only, no grad, eval mode)
    _c("infer_base", "infer", "baseline", "base model", _infer_base),
    _c("infer_single_adapter", "infer", "adapterkit", "single adapter, unmerged", _ak("single_adapter")),
    _c("infer_single_lora_merged", "infer", "adapterkit", "single LoRA, merged (merge_adapters)",
       _ak("single_lora", merge=True)),
    _c("infer_single_lora", "infer", "adapterkit", "single LoRA, unmerged", _ak("single_lora")),
    _c("infer_multiple_lora_single", "infer", "adapterkit", "multiple LoRA, 1-task batch",
       _ak("multiple_lora", "single")),
    _c("infer_multiple_lora_mixed", "infer", "adapterkit", "multiple LoRA, mixed 4-task batch",
       _ak("multiple_lora", "mixed"), pair="infer_multiple_lora_single"),
    _c("infer_multiple_adapters_mixed", "infer", "adapterkit", "multiple adapters, mixed 4-task batch",
       _ak("multiple_adapters", "mixed")),
    _c("infer_peft_lora", "infer", "peft", "PEFT LoRA, unmerged", _peft_lora(0.1)),
    _c("infer_peft_multi_lora_single", "infer", "peft", "PEFT 4 LoRAs, 1 active",
       _peft_multi_lora("single", False)),
    _c("infer_peft_multi_lora_mixed", "infer", "peft", "PEFT 4 LoRAs, mixed batch (adapter_names=)",
       _peft_multi_lora("mixed", False), pair="infer_peft_multi_lora_single"),
]
CASES_BY_NAME = {c.name: c for c in CASES}


def select_cases(spec: str | None, with_refs: bool = True) -> list[Case]:
    """Cases named by a comma list of names, globs (``single_*``), groups or kinds (None = all).

    With ``with_refs`` the reference cases (full_ft / infer_base) and the single-task
    partner of every mixed-batch case are added, so every ratio can be computed.
    """
    if not spec:
        return list(CASES)
    wanted: set[str] = set()
    groups = {c.group for c in CASES} | {c.kind for c in CASES}
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            continue
        if tok in groups:
            wanted |= {c.name for c in CASES if tok in (c.group, c.kind)}
            continue
        hits = [c.name for c in CASES if fnmatch.fnmatchcase(c.name, tok)]
        if not hits:
            raise ConfigError(f'unknown benchmark case "{tok}"{did_you_mean(tok, CASES_BY_NAME)}; '
                              f"known: {', '.join(CASES_BY_NAME)} (or groups {sorted(groups)})")
        wanted |= set(hits)
    if with_refs:
        for name in list(wanted):
            c = CASES_BY_NAME[name]
            wanted.add(c.ref)
            if c.pair:
                wanted.add(c.pair)
    return [c for c in CASES if c.name in wanted]
