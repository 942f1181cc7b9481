"""Serving many tasks' adapters from one model: generation with a different adapter per row.

``adapterkit bench --serve`` builds a random-init Llama-shaped causal LM from a config,
attaches per-task adapters (LoRA and/or a bottleneck adapter) for up to ``max(tasks)``
tasks, and times greedy generation (KV cache on, a fixed number of new tokens) of one
batch in these ways, in one process:

- ``base``: the model with its adapters suspended (the floor: no adapter work at all);
- ``single``: every row routed to one task (the single-adapter throughput);
- ``mixed/N``: the rows spread over N tasks, one batched ``generate`` (``adapterkit.route``);
- ``sequential/N``: the same N tasks served one after another (one ``generate`` per task
  on its rows), what a server without mixed batches does;
- ``peft_mixed/N`` (LoRA): PEFT's mixed-adapter batch (``generate(adapter_names=...)``)
  on the same base weights with N LoRA adapters of the same rank.

Reported per case: seconds per batch (median over repeats), tokens per second
(batch x new tokens / seconds) and the ratio to ``single``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from adapterkit.core.base import get_container
from adapterkit.errors import ConfigError

METHODS = {
    "lora": {"method": "lora", "r": 16, "alpha": 32, "targets": ["q", "v"]},
    "houlsby": {"method": "houlsby", "reduction_factor": 16},
}


@dataclass
class ServeSettings:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 688
    vocab: int = 8192
    batch: int = 64
    prompt: int = 32
    new_tokens: int = 16
    tasks: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    methods: list[str] = field(default_factory=lambda: ["lora", "houlsby"])
    repeats: int = 3
    peft: bool = True
    sequential: bool = True
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        for k in ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab", "batch", "prompt", "new_tokens", "repeats"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"serve: {k} must be a positive integer, got {v!r}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ConfigError(f"serve: heads {self.heads} must divide hidden {self.hidden} and be a multiple of "
                              f"kv_heads {self.kv_heads}")
        if not self.tasks or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.tasks):
            raise ConfigError(f"serve: tasks must be positive integers, got {self.tasks!r}")
        if max(self.tasks) > self.batch:
            raise ConfigError(f"serve: {max(self.tasks)} tasks cannot each have a row in a batch of {self.batch}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"serve: unknown method(s) {unknown}; known: {sorted(METHODS)}")


def build_lm(s: ServeSettings) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(s.seed)
    cfg = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.ffn, num_hidden_layers=s.layers,
                      num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                      max_position_embeddings=s.prompt + s.new_tokens + 8, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval().to(s.device)


def randomize_adapters(model: nn.Module, seed: int, std: float = 0.05) -> None:
    """Non-zero random weights in every trainable (adapter) tensor, so tasks really differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def task_names(n: int) -> list[str]:
    return [f"task{i}" for i in range(n)]


def row_tasks(batch: int, n: int) -> list[str]:
    """Rows spread round-robin over n tasks."""
    names = task_names(n)
    return [names[i % n] for i in range(batch)]


def _generate(model, ids, new_tokens: int, **kw):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kw)


def generate_per_row(model, ids: torch.Tensor, tasks: list[str], new_tokens: int) -> torch.Tensor:
    """One batched greedy generate with row i using task ``tasks[i]``'s adapter."""
    import adapterkit

    with adapterkit.route(tasks):
        return _generate(model, ids, new_tokens)


def generate_sequential(model, ids: torch.Tensor, tasks: list[str], new_tokens: int) -> torch.Tensor:
    """The same rows served task by task (one generate per task), reassembled in row order."""
    import adapterkit

    out = torch.empty(ids.shape[0], ids.shape[1] + new_tokens, dtype=ids.dtype, device=ids.device)
    for t in dict.fromkeys(tasks):
        rows = torch.tensor([i for i, x in enumerate(tasks) if x == t], device=ids.device)
        with adapterkit.route(t):
            out[rows] = _generate(model, ids[rows], new_tokens)
    return out


def _time(fn, repeats: int, device: str) -> float:
    from adapterkit.bench.runner import _sync

    kind = torch.device(device).type
    fn()  # warm-up (allocations, first-call paths)
    times = []
    for _ in range(repeats):
        _sync(kind)
        t0 = time.perf_counter()
        fn()
        _sync(kind)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peft_mixed(base_state: dict, s: ServeSettings, n: int, ours: nn.Module):
    """PEFT model with n LoRA adapters whose weights equal our tasks 0..n-1 (same function), or None."""
    try:
        import peft
    except ImportError:
        return None
    lm = build_lm(s)
    lm.load_state_dict(base_state)
    cfg = METHODS["lora"]
    pc = peft.LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    names = task_names(n)
    pm = peft.get_peft_model(lm, pc, adapter_name=names[0])
    for t in names[1:]:
        pm.add_adapter(t, pc)
    _copy_lora_into_peft(ours, pm, names)
    return pm.eval()


def _copy_lora_into_peft(ours: nn.Module, pm, names: list[str]) -> None:
    """Our per-task A/B (stacked over tasks) into PEFT's per-adapter lora_A/lora_B."""
    ours_p = dict(ours.named_parameters())
    with torch.no_grad():
        for mname, mod in pm.named_modules():
            if not hasattr(mod, "lora_A") or not isinstance(mod.lora_A, nn.ModuleDict) or not len(mod.lora_A):
                continue
            path = mname.split("base_model.model.", 1)[-1].replace(".", "__")
            a = ours_p.get(f"adapterkit.sets.lora.layers.{path}.A.weight")
            b = ours_p.get(f"adapterkit.sets.lora.layers.{path}.B.weight")
            if a is None or b is None:
                raise ConfigError(f"serve: no adapterkit LoRA for {mname} (key naming changed?)")
            for i, t in enumerate(names):
                mod.lora_A[t].weight.copy_(a[i])
                mod.lora_B[t].weight.copy_(b[i])


def _bench_method(method: str, s: ServeSettings, ids: torch.Tensor, log) -> list[dict]:
    import adapterkit

    model = build_lm(s)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    adapterkit.add_adapters(model, {**METHODS[method], "tasks": task_names(max(s.tasks)), "sharing": "per_task"})
    randomize_adapters(model, s.seed + 2)
    model.eval()
    results = []

    def rec(case, n, fn):
        sec = _time(fn, s.repeats, s.device)
        r = {"method": method, "case": case, "tasks": n, "seconds": sec, "tokens_per_s": s.batch * s.new_tokens / sec}
        results.append(r)
        log(f"serve {method:<8} {case:<14} tasks={n:<3} {sec * 1e3:9.1f} ms/batch  {r['tokens_per_s']:9.0f} tok/s")

    sets = list(get_container(model).sets.values())
    for st in sets:
        st.suspend_hooks()
    rec("base", 0, lambda: _generate(model, ids, s.new_tokens))
    for st in sets:
        st.resume_hooks()
    rec("single", 1, lambda: generate_per_row(model, ids, ["task0"] * s.batch, s.new_tokens))
    for n in s.tasks:
        tasks = row_tasks(s.batch, n)
        rec("mixed", n, lambda tasks=tasks: generate_per_row(model, ids, tasks, s.new_tokens))
        if s.sequential and n > 1:
            rec("sequential", n, lambda tasks=tasks: generate_sequential(model, ids, tasks, s.new_tokens))
    if method == "lora" and s.peft:
        for n in s.tasks:
            pm = _peft_mixed(base_state, s, n, model)
            if pm is None:
                log("serve: peft not installed, PEFT cases skipped")
                break
            tasks = row_tasks(s.batch, n)
            rec("peft_mixed", n, lambda pm=pm, tasks=tasks: _generate(pm, ids, s.new_tokens, adapter_names=tasks))
    return results


def serve_bench(s: ServeSettings, log=print) -> dict:
    """Time every case; returns {"settings", "results": [{method, case, tasks, seconds, tokens_per_s, ...}]}."""
    s.validate()
    gen = torch.Generator().manual_seed(s.seed + 1)
    ids = torch.randint(1, s.vocab, (s.batch, s.prompt), generator=gen).to(s.device)
    results = [r for method in s.methods for r in _bench_method(method, s, ids, log)]
    single = {r["method"]: r["seconds"] for r in results if r["case"] == "single"}
    for r in results:
        r["vs_single"] = r["seconds"] / single[r["method"]]
    return {"settings": asdict(s), "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}


def to_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"Serving: Llama shape d {s['hidden']}, {s['layers']} layers, vocab {s['vocab']}; batch {s['batch']}, "
             f"prompt {s['prompt']}, {s['new_tokens']} new tokens (greedy, KV cache), {report['threads']} threads, "
             f"median of {s['repeats']}", "",
             "| method | case | tasks | ms / batch | tokens / s | x single |", "|---|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['method']} | {r['case']} | {r['tasks']} | {r['seconds'] * 1e3:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {r['vs_single']:.2f} |")
    return "\n".join(lines) + "\n"
