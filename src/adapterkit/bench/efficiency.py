"""Adapter efficiency against full fine-tuning: ``adapterkit bench --efficiency``.

Three measurements after Mundra et al., "A Comprehensive Analysis of Adapter Efficiency"
(2023), on a real pretrained encoder (default: all-MiniLM-L6-v2) and a real text
classification task (default: BBC News topics, exported by
:func:`adapterkit.text.data.export_bbc`), all in one process:

1. ``train``, time to target: full fine-tuning, a bottleneck adapter and LoRA are trained on
   the same batches (same order per seed) in lockstep, one optimizer step of each method in
   turn (round-robin, so load from other processes hits every method alike). Validation
   accuracy is measured every ``eval_every`` steps. Reported per method, over the seeds: the
   training seconds (the sum of the timed steps: forward, backward, AdamW; evaluation and
   batch building excluded) and the steps until the validation accuracy first reaches each
   target (fractions of full fine-tuning's best, and fixed accuracies); a seed that never
   reaches a target within the step budget counts as unreached (``None``), never as the
   budget. Means with 95% t-intervals over the seeds that reached the target, and the median
   step time of every method against full fine-tuning's (paired per seed).
2. ``latency``: forward-only latency (eval mode, no grad) of the base encoder, LoRA merged
   into the weights, LoRA unmerged and a bottleneck adapter, over a grid of batch sizes and
   sequence lengths; the cases of a point are timed round-robin, and each ratio to the base
   model comes with a 95% bootstrap interval over the rounds (paired).
3. ``serve``, the cost of serving N tasks: N per-task adapters on one model (a mixed-task
   batch, adapterkit's per-row routing, one classification head per task), N fully
   fine-tuned copies (the batch's rows sent to their task's copy) and one multi-task model
   (one shared backbone, N heads). Reported: parameters stored, peak memory growth while the
   case is built and run (:class:`adapterkit.bench.sweep.PeakMem`) and throughput (rows/s of
   a batch whose rows are spread round-robin over the N tasks).

The text pipeline is :class:`adapterkit.text.domain.TextDomain` (loading, tokenisation,
classification heads, adapters); this module only drives it with its own timed loop.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from adapterkit.bench.report import bench_command, set_threads
from adapterkit.errors import AdapterKitError, ConfigError

PARTS = ("train", "latency", "serve")

# the trained methods; the lr of full FT and LoRA are those of examples/text_bbc_compare.py
METHODS: dict[str, dict] = {
    "full_ft": {"adapters": [], "lr": 5e-5},
    "houlsby": {"adapters": [{"method": "houlsby", "reduction_factor": 16}], "lr": 1e-3},
    "pfeiffer": {"adapters": [{"method": "pfeiffer", "reduction_factor": 16}], "lr": 1e-3},
    "lora": {"adapters": [{"method": "lora", "r": 8, "alpha": 16}], "lr": 2e-3},
}
LATENCY_CASES = ("base", "lora_merged", "lora_unmerged", "houlsby")
SERVE_CASES = ("lora_adapters", "houlsby_adapters", "full_ft_copies", "multi_task")


@dataclass
class EfficiencySettings:
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    model: str = "minilm"
    data: str = ""                  # ROOT/<task>/{train,val}.jsonl; "" = export BBC News under out_dir's parent
    task: str = "bbc"
    # time to target
    methods: list[str] = field(default_factory=lambda: ["full_ft", "houlsby", "lora"])
    seeds: int = 3
    train_examples: int = 400
    val_examples: int = 120
    max_length: int = 32
    batch: int = 8
    steps: int = 96
    eval_every: int = 8
    warmup_steps: int = 8
    rel_targets: list[float] = field(default_factory=lambda: [0.9, 0.97])   # x full FT's best val accuracy
    abs_targets: list[float] = field(default_factory=lambda: [80.0])        # val accuracy, %
    # latency
    lat_batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    lat_seqs: list[int] = field(default_factory=lambda: [16, 64, 128])
    lat_rounds: int = 7
    # serving
    serve_tasks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    serve_batch: int = 32
    serve_seq: int = 64
    serve_rounds: int = 5
    num_labels: int = 5
    seed: int = 0

    def validate(self) -> None:
        for p in self.parts:
            if p not in PARTS:
                raise ConfigError(f"efficiency: unknown part {p!r}; known: {', '.join(PARTS)}")
        if not self.parts:
            raise ConfigError(f"efficiency: no part given; known: {', '.join(PARTS)}")
        for m in self.methods:
            if m not in METHODS:
                raise ConfigError(f"efficiency: unknown method {m!r}; known: {', '.join(METHODS)}")
        if "train" in self.parts and "full_ft" not in self.methods and self.rel_targets:
            raise ConfigError("efficiency: targets relative to full fine-tuning need full_ft among the methods")
        for k in ("seeds", "train_examples", "val_examples", "max_length", "batch", "steps", "eval_every",
                  "lat_rounds", "serve_batch", "serve_seq", "serve_rounds", "num_labels"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"efficiency: {k} must be a positive integer, got {v!r}")
        for k in ("lat_batches", "lat_seqs", "serve_tasks"):
            v = getattr(self, k)
            if not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
                raise ConfigError(f"efficiency: {k} must be a non-empty list of positive integers, got {v!r}")
        if max(self.serve_tasks) > self.serve_batch:
            raise ConfigError(f"efficiency: {max(self.serve_tasks)} tasks cannot each have a row in a batch of "
                              f"{self.serve_batch}")
        if any(not 0 < r <= 1.5 for r in self.rel_targets):
            raise ConfigError(f"efficiency: rel_targets are fractions of full FT's best, got {self.rel_targets}")


# --- helpers ----------------------------------------------------------------------------

def interval(values: list[float]) -> dict:
    """Mean and 95% t-interval (low/high None under 2 values; mean None with none)."""
    from adapterkit.stats import t_interval

    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "low": None, "high": None, "n": 0}
    iv = t_interval(vals)
    return {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n}


def time_to_target(curve: list[dict], target: float) -> dict | None:
    """The first evaluation of ``curve`` (``[{"step", "train_s", "acc"}]``, in step order) whose
    accuracy reaches ``target``: ``{"step", "train_s", "acc"}``; None when none does."""
    for p in curve:
        if p["acc"] >= target:
            return {"step": p["step"], "train_s": p["train_s"], "acc": p["acc"]}
    return None


def _fmt_iv(iv: dict | None, fmt: str = ".1f") -> str:
    if not iv or iv.get("mean") is None:
        return "n/a"
    s = format(iv["mean"], fmt)
    if iv.get("low") is not None:
        s += f" [{format(iv['low'], fmt)}, {format(iv['high'], fmt)}]"
    return s


def _domain(s: EfficiencySettings, data_root: str, method: str, seed: int):
    from adapterkit.text.config import load_text_config
    from adapterkit.text.domain import TextDomain

    cfg = load_text_config({
        "domain": "text", "name": f"eff-{method}-s{seed}",
        "model": {"name_or_path": s.model, "max_length": s.max_length, "pool": "mean", "init_seed": seed},
        "adapters": copy.deepcopy(METHODS[method]["adapters"]),
        "data": {"root": data_root, "tasks": [s.task], "max_train_examples": s.train_examples,
                 "max_eval_examples": s.val_examples},
        "train": {"batch_size": s.batch, "seed": seed}})
    torch.manual_seed(seed)
    return TextDomain(cfg)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class _Run:
    """One method's model, optimizer and curve within a seed."""

    def __init__(self, s: EfficiencySettings, data_root: str, method: str, seed: int):
        self.method = method
        self.dom = _domain(s, data_root, method, seed)
        self.params = _trainable(self.dom.model)
        self.total = sum(p.numel() for p in self.dom.model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=METHODS[method]["lr"], weight_decay=0.0)
        warm = max(0, s.warmup_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: min(1.0, (i + 1) / (warm + 1)))
        self.step_s: list[float] = []
        self.curve: list[dict] = []

    def step(self, batch: dict) -> float:
        self.dom.model.train()
        t = time.perf_counter()
        loss = self.dom.loss(batch, 0)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        self.step_s.append(dt)
        return float(loss.detach())

    def evaluate(self, s: EfficiencySettings, step: int) -> float:
        d = self.dom
        n = d.eval_size(s.task, "val")
        self.dom.model.eval()
        t = time.perf_counter()
        preds: dict = {}
        with torch.no_grad():
            for i in range(0, n, 64):
                preds.update(d.predict_batch(s.task, "val", list(range(i, min(n, i + 64)))))
        acc = d.score(s.task, "val", preds)["accuracy"]
        self.curve.append({"step": step, "train_s": sum(self.step_s), "acc": acc,
                           "eval_s": time.perf_counter() - t})
        return acc


def run_train(s: EfficiencySettings, data_root: str, log=print) -> dict:
    """Time to target (see the module docstring): per-seed curves and the summary."""
    import numpy as np

    seeds = []
    for seed in range(s.seeds):
        runs = [_Run(s, data_root, m, seed) for m in s.methods]
        dom = runs[0].dom
        n_train = dom.num_train(s.task)
        rng = np.random.default_rng(seed)
        order: list[int] = []
        while len(order) < s.steps * s.batch:
            order.extend(rng.permutation(n_train).tolist())
        for step in range(1, s.steps + 1):
            batch = dom.train_batch(s.task, order[(step - 1) * s.batch: step * s.batch], seed, 0, 1)
            for r in runs:  # round-robin: one step of each method in turn
                r.step(batch)
            if step % s.eval_every == 0 or step == s.steps:
                accs = [r.evaluate(s, step) for r in runs]
                log(f"efficiency train seed {seed} step {step:>4}: " + ", ".join(
                    f"{r.method} {a:.1f}% ({sum(r.step_s):.1f} s)" for r, a in zip(runs, accs)))
        seeds.append({"seed": seed, "n_train": n_train, "n_val": dom.eval_size(s.task, "val"),
                      "runs": {r.method: {"trainable": sum(p.numel() for p in r.params), "total": r.total,
                                          "lr": METHODS[r.method]["lr"], "step_s": r.step_s, "curve": r.curve,
                                          "median_step_s": statistics.median(r.step_s),
                                          "best_acc": max(p["acc"] for p in r.curve)}
                               for r in runs}})
        del runs
    return {"seeds": seeds, "summary": summarize_train(seeds, s)}


def summarize_train(seeds: list[dict], s: EfficiencySettings) -> dict:
    """Targets, time and steps to each target per method, step-time ratios (all over seeds)."""
    methods = list(seeds[0]["runs"])
    full_best = [sd["runs"]["full_ft"]["best_acc"] for sd in seeds] if "full_ft" in methods else []
    targets = [{"name": f"{r:g} x full FT best", "kind": "relative", "fraction": r,
                "acc": r * statistics.fmean(full_best)} for r in s.rel_targets if full_best]
    targets += [{"name": f"{a:g}% accuracy", "kind": "fixed", "acc": float(a)} for a in s.abs_targets]
    out: dict = {"targets": targets, "methods": {}}
    for m in methods:
        rs = [sd["runs"][m] for sd in seeds]
        rec = {"trainable": rs[0]["trainable"], "total": rs[0]["total"],
               "trainable_pct": 100 * rs[0]["trainable"] / rs[0]["total"], "lr": rs[0]["lr"],
               "best_acc": interval([r["best_acc"] for r in rs]),
               "final_acc": interval([r["curve"][-1]["acc"] for r in rs]),
               "median_step_ms": interval([1e3 * r["median_step_s"] for r in rs]),
               "total_train_s": interval([sum(r["step_s"]) for r in rs]), "to_target": []}
        if "full_ft" in methods:
            rec["step_vs_full_ft"] = interval([r["median_step_s"] / sd["runs"]["full_ft"]["median_step_s"]
                                               for r, sd in zip(rs, seeds)])
        for t in targets:
            hits = [time_to_target(r["curve"], t["acc"]) for r in rs]
            row = {"target": t["name"], "acc": t["acc"], "reached": sum(h is not None for h in hits),
                   "seeds": len(hits), "per_seed": hits,
                   "train_s": interval([h["train_s"] for h in hits if h]),
                   "steps": interval([h["step"] for h in hits if h])}
            if "full_ft" in methods:
                full_hits = [time_to_target(sd["runs"]["full_ft"]["curve"], t["acc"]) for sd in seeds]
                pairs = [(h, f) for h, f in zip(hits, full_hits) if h and f]
                row["time_vs_full_ft"] = interval([h["train_s"] / f["train_s"] for h, f in pairs])
                row["steps_vs_full_ft"] = interval([h["step"] / f["step"] for h, f in pairs])
            rec["to_target"].append(row)
        out["methods"][m] = rec
    return out


# --- latency ----------------------------------------------------------------------------

def load_encoder(name: str, seed: int = 0, corpus: list[str] | None = None):
    """(encoder, tokenizer) for a text-domain model name (minilm, tiny-bert, a folder ...)."""
    from adapterkit.text.domain import _load_named

    model, tok, kind = _load_named(name, "encoder", corpus or ["a b c d e f g h"], seed)
    if kind != "encoder":
        raise ConfigError(f"efficiency: {name!r} is not an encoder (got {kind})")
    return model, tok


def _latency_model(base: nn.Module, case: str) -> nn.Module:
    from adapterkit.core.base import add_adapters, merge_adapters

    m = copy.deepcopy(base)
    if case.startswith("lora"):
        add_adapters(m, copy.deepcopy(METHODS["lora"]["adapters"][0]))
        _randomize(m)
        if case == "lora_merged":
            merge_adapters(m)
    elif case == "houlsby":
        add_adapters(m, copy.deepcopy(METHODS["houlsby"]["adapters"][0]))
        _randomize(m)
    return m.eval()


def _randomize(model: nn.Module) -> None:
    from adapterkit.bench.serving import randomize_adapters

    randomize_adapters(model, 1, std=0.02)


def _ids(vocab: int, batch: int, seq: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _ratio_interval(num: list[float], den: list[float]) -> dict:
    from adapterkit.stats import bootstrap_ratio

    iv = bootstrap_ratio(num, den)
    return {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n}


def run_latency(s: EfficiencySettings, base: nn.Module, log=print) -> dict:
    """Forward latency of every case at every (batch, seq) point, round-robin per point."""
    models = {c: _latency_model(base, c) for c in LATENCY_CASES}
    vocab = base.config.vocab_size
    records = []
    with torch.no_grad():
        for b in s.lat_batches:
            for q in s.lat_seqs:
                x = _ids(vocab, b, q, s.seed)
                for m in models.values():  # warm-up
                    m(**x)
                times: dict[str, list[float]] = {c: [] for c in models}
                for _ in range(s.lat_rounds):
                    for c, m in models.items():
                        t = time.perf_counter()
                        m(**x)
                        times[c].append(time.perf_counter() - t)
                for c, ts in times.items():
                    rec = {"case": c, "batch": b, "seq": q, "median_ms": 1e3 * statistics.median(ts),
                           "ms": [1e3 * t for t in ts]}
                    if c != "base":
                        rec["vs_base"] = _ratio_interval(ts, times["base"])
                    records.append(rec)
                log(f"efficiency latency batch {b:>3} seq {q:>4}: " + ", ".join(
                    f"{r['case']} {r['median_ms']:.1f} ms" for r in records[-len(models):]))
    return {"cases": list(models), "records": records}


# --- serving N tasks --------------------------------------------------------------------

def _pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from adapterkit.text.domain import mean_pool

    return mean_pool(h, mask)


def _heads_forward(weight: torch.Tensor, bias: torch.Tensor, pooled: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Each row through its task's head in one batched product (``weight`` (tasks, labels, width),
    ``bias`` (tasks, labels) stacked from the heads; rows[i] = task index of row i)."""
    idx = torch.as_tensor(rows, device=pooled.device)
    return torch.bmm(weight[idx], pooled.unsqueeze(-1)).squeeze(-1) + bias[idx]


class _Server:
    """One way of serving N tasks; ``__call__(batch, rows)`` returns the logits of every row."""

    def __init__(self, case: str, base: nn.Module, n: int, num_labels: int, seed: int):
        from adapterkit.core.base import add_adapters

        torch.manual_seed(seed)
        hidden = base.config.hidden_size
        self.case, self.n = case, n
        self.heads = nn.ModuleList(nn.Linear(hidden, num_labels) for _ in range(n))
        if case == "full_ft_copies":
            self.models = nn.ModuleList(copy.deepcopy(base).eval() for _ in range(n))
        else:
            m = copy.deepcopy(base)
            if case.endswith("_adapters"):
                method = case.split("_")[0]
                cfg = copy.deepcopy(METHODS[method]["adapters"][0])
                cfg.update(tasks=[f"task{i}" for i in range(n)], sharing="per_task")
                add_adapters(m, cfg)
                _randomize(m)
            self.models = nn.ModuleList([m.eval()])
        self.heads.eval()
        with torch.no_grad():  # the heads stacked once, for the one-product per-row head of the shared model
            self.head_weight = torch.stack([h.weight for h in self.heads])
            self.head_bias = torch.stack([h.bias for h in self.heads])

    def params_stored(self) -> int:
        """Every parameter a server of this kind keeps (heads included)."""
        return sum(p.numel() for p in self.models.parameters()) + sum(p.numel() for p in self.heads.parameters())

    def __call__(self, x: dict, rows: list[int]) -> torch.Tensor:
        import adapterkit

        if self.case == "full_ft_copies":  # requests go to their task's model
            out = None
            idx = torch.tensor(rows)
            for t in sorted(set(rows)):
                sel = (idx == t).nonzero().squeeze(1)
                h = self.models[t](input_ids=x["input_ids"][sel], attention_mask=x["attention_mask"][sel])
                logits = self.heads[t](_pool(h.last_hidden_state, x["attention_mask"][sel]))
                if out is None:
                    out = logits.new_empty(len(rows), logits.shape[1])
                out[sel] = logits
            return out
        if self.case.endswith("_adapters"):
            with adapterkit.route([f"task{t}" for t in rows]):
                h = self.models[0](**x).last_hidden_state
        else:  # multi_task: one shared backbone, N heads
            h = self.models[0](**x).last_hidden_state
        return _heads_forward(self.head_weight, self.head_bias, _pool(h, x["attention_mask"]), rows)


def run_serve(s: EfficiencySettings, base: nn.Module, log=print) -> dict:
    """Parameters stored, peak memory growth and throughput of every serving case per N."""
    from adapterkit.bench.sweep import PeakMem, _trim

    vocab = base.config.vocab_size
    x = _ids(vocab, s.serve_batch, s.serve_seq, s.seed + 1)
    base_params = sum(p.numel() for p in base.parameters())
    records = []
    with torch.no_grad():
        for n in s.serve_tasks:
            rows = [i % n for i in range(s.serve_batch)]
            servers, recs = {}, []
            for case in SERVE_CASES:
                peak = PeakMem("cpu")
                with peak:
                    srv = _Server(case, base, n, s.num_labels, s.seed)
                    srv(x, rows)  # warm-up, inside the memory window (activations)
                servers[case] = srv
                p = srv.params_stored()
                recs.append({"case": case, "tasks": n, "params_stored": p, "params_vs_base": p / base_params,
                             "stored_mib_fp32": 4 * p / 2**20, "peak_mib": peak.mib, "memory_measure": peak.measure})
            times: dict[str, list[float]] = {c: [] for c in servers}
            for _ in range(s.serve_rounds):
                for c, srv in servers.items():
                    t = time.perf_counter()
                    srv(x, rows)
                    times[c].append(time.perf_counter() - t)
            for r in recs:
                ts = times[r["case"]]
                r.update(median_ms=1e3 * statistics.median(ts), ms=[1e3 * t for t in ts],
                         rows_per_s=s.serve_batch / statistics.median(ts))
                if r["case"] != "multi_task":
                    r["time_vs_multi_task"] = _ratio_interval(ts, times["multi_task"])
                log(f"efficiency serve N={n} {r['case']:<17} {r['params_stored'] / 1e6:7.2f}M params  "
                    f"peak {r['peak_mib'] if r['peak_mib'] is not None else float('nan'):7.1f} MiB  "
                    f"{r['rows_per_s']:7.1f} rows/s")
            records.extend(recs)
            del servers, srv
            _trim()
    return {"base_params": base_params, "batch": s.serve_batch, "seq": s.serve_seq, "records": records}


# --- the whole run ----------------------------------------------------------------------

def ensure_data(s: EfficiencySettings, default_root: Path) -> str:
    """The data root: ``s.data``, or BBC News exported once under ``default_root``."""
    from adapterkit.text.data import export_bbc, split_file

    root = Path(s.data) if s.data else default_root
    if split_file(root, s.task, "train") is None:
        if s.data:
            raise ConfigError(f"efficiency: no {root}/{s.task}/train.jsonl (or .csv)")
        export_bbc(root, task=s.task)
    return str(root)


def run_efficiency(s: EfficiencySettings, data_root: str | None = None, log=print, on_part=None) -> dict:
    """Run the parts of ``s``; returns ``{"meta", "settings", "train"?, "latency"?, "serve"?}``."""
    from adapterkit.bench.report import environment

    s.validate()
    rep: dict = {"meta": environment("cpu"), "settings": asdict(s)}
    t0 = time.perf_counter()
    if "train" in s.parts:
        if data_root is None:
            raise ConfigError("efficiency: the train part needs a data root")
        rep["train"] = run_train(s, data_root, log)
        rep["train"]["wall_s"] = time.perf_counter() - t0
        if on_part:
            on_part(rep)
    if "latency" in s.parts or "serve" in s.parts:
        base, _ = load_encoder(s.model, s.seed)
        base.eval()
        rep["meta"]["encoder"] = {"class": type(base).__name__, "params": sum(p.numel() for p in base.parameters()),
                                  "hidden": base.config.hidden_size, "layers": base.config.num_hidden_layers}
        for part, fn in (("latency", run_latency), ("serve", run_serve)):
            if part in s.parts:
                t = time.perf_counter()
                rep[part] = fn(s, base, log)
                rep[part]["wall_s"] = time.perf_counter() - t
                if on_part:
                    on_part(rep)
    rep["wall_s"] = time.perf_counter() - t0
    return rep


# --- outputs ----------------------------------------------------------------------------

def to_markdown(rep: dict, command: str | None = None, plots: dict | None = None) -> str:
    s, meta = rep["settings"], rep["meta"]
    plots = plots or {}
    lines = ["# Adapter efficiency: `adapterkit bench --efficiency`", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    lines += [f"Machine: {meta['machine']} ({meta['torch_threads']} torch thread(s)); torch {meta['torch']}, "
              f"transformers {meta['transformers']}. Model: `{s['model']}`"
              + (f" ({meta['encoder']['class']}, {meta['encoder']['params'] / 1e6:.1f}M parameters, "
                 f"{meta['encoder']['layers']} layers, hidden {meta['encoder']['hidden']})" if "encoder" in meta else "")
              + f". Wall time of the run: {rep.get('wall_s', 0):.0f} s.", ""]
    if "train" in rep:
        lines += _train_md(rep["train"], s, plots.get("train"))
    if "latency" in rep:
        lines += _latency_md(rep["latency"], s, plots.get("latency"))
    if "serve" in rep:
        lines += _serve_md(rep["serve"], s)
    return "\n".join(lines) + "\n"


def _train_md(tr: dict, s: dict, plot: str | None) -> list[str]:
    sm = tr["summary"]
    sd0 = tr["seeds"][0]
    lines = ["## Time to target (training)", "",
             f"Task `{s['task']}`: {sd0['n_train']} training examples, validation {sd0['n_val']} examples, "
             f"max {s['max_length']} tokens, batch {s['batch']}, {s['steps']} steps (AdamW, {s['warmup_steps']} "
             f"warm-up steps, then a constant lr), validation every {s['eval_every']} steps, "
             f"{len(tr['seeds'])} seeds (seed = head init + data order; the methods of a seed see the same batches "
             "and are stepped in lockstep, round-robin). Training seconds = sum of the timed steps (forward, "
             "backward, optimizer); evaluation excluded. Intervals: 95% t over seeds.", ""]
    if plot:
        lines += [f"![validation accuracy against training seconds]({plot})", ""]
    lines += ["| method | lr | trainable | trainable % | median step ms | step x full FT | best val acc | "
              "final val acc |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m, r in sm["methods"].items():
        lines.append(f"| {m} | {r['lr']:g} | {r['trainable']:,} | {r['trainable_pct']:.2f} | "
                     f"{_fmt_iv(r['median_step_ms'])} | {_fmt_iv(r.get('step_vs_full_ft'), '.2f')} | "
                     f"{_fmt_iv(r['best_acc'])} | {_fmt_iv(r['final_acc'])} |")
    lines += ["", "Time and steps to each target (first validation at or above it; mean over the seeds that "
              "reached it, `reached` says how many; the ratios are paired per seed, over the seeds where both "
              "reached it):", "",
              "| target | val acc | method | reached | training s | steps | time x full FT | steps x full FT |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    for i, t in enumerate(sm["targets"]):
        for m, r in sm["methods"].items():
            row = r["to_target"][i]
            lines.append(f"| {t['name']} | {t['acc']:.1f} | {m} | {row['reached']}/{row['seeds']} | "
                         f"{_fmt_iv(row['train_s'])} | {_fmt_iv(row['steps'], '.0f')} | "
                         f"{_fmt_iv(row.get('time_vs_full_ft'), '.2f')} | "
                         f"{_fmt_iv(row.get('steps_vs_full_ft'), '.2f')} |")
    return lines + [""]


def _latency_md(lat: dict, s: dict, plot: str | None) -> list[str]:
    lines = ["## Inference latency", "",
             f"Forward only (eval mode, no grad), random token ids, all positions attended; {s['lat_rounds']} rounds "
             "after one warm-up per point, the cases of a point timed round-robin. Cells: median ms (x base, "
             "[95% bootstrap interval over rounds, paired]). LoRA and the adapter carry non-zero random weights.",
             ""]
    if plot:
        lines += [f"![latency ratio to the base model]({plot})", ""]
    cases = lat["cases"]
    lines += ["| batch | seq | " + " | ".join(cases) + " |", "|---:|---:|" + "---:|" * len(cases)]
    pts = list(dict.fromkeys((r["batch"], r["seq"]) for r in lat["records"]))
    for b, q in pts:
        cells = []
        for c in cases:
            r = next(x for x in lat["records"] if x["batch"] == b and x["seq"] == q and x["case"] == c)
            v = r.get("vs_base")
            cells.append(f"{r['median_ms']:.1f}" + (f" ({v['mean']:.2f} [{v['low']:.2f}, {v['high']:.2f}])" if v else ""))
        lines.append(f"| {b} | {q} | " + " | ".join(cells) + " |")
    return lines + [""]


def _serve_md(sv: dict, s: dict) -> list[str]:
    lines = ["## Serving N tasks", "",
             f"One batch of {sv['batch']} requests x {sv['seq']} tokens, spread round-robin over the N tasks; "
             f"{s['serve_rounds']} timed rounds after one warm-up, cases of an N timed round-robin. "
             "`*_adapters`: one model with N per-task adapters, one mixed batch (per-row routing) and a head per "
             "task; `full_ft_copies`: N model copies, each request sent to its task's copy; `multi_task`: one "
             "backbone shared by the tasks, a head per task. Parameters stored include the heads. Peak memory: "
             "growth of the process's peak resident set while the case is built (from the loaded base model) "
             "and run once. Time x multi-task: ratio of mean batch times, [95% bootstrap over rounds].", "",
             "| N | case | params stored (M) | x base | peak MiB | ms / batch | rows / s | time x multi-task |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in sv["records"]:
        v = r.get("time_vs_multi_task")
        pk = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['tasks']} | {r['case']} | {r['params_stored'] / 1e6:.2f} | {r['params_vs_base']:.2f} | "
                     f"{pk} | {r['median_ms']:.1f} | {r['rows_per_s']:.1f} | "
                     + (f"{v['mean']:.2f} [{v['low']:.2f}, {v['high']:.2f}]" if v else "1") + " |")
    return lines + [""]


def plot_train(rep: dict, path: Path) -> bool:
    """Validation accuracy against training seconds, one line per method and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = rep.get("train")
    if not tr:
        return False
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {}
    for sd in tr["seeds"]:
        for m, r in sd["runs"].items():
            c = colors.setdefault(m, f"C{len(colors)}")
            lab = m if sd["seed"] == 0 else None
            ax_t.plot([p["train_s"] for p in r["curve"]], [p["acc"] for p in r["curve"]], color=c, marker=".",
                      label=lab, alpha=0.8)
            ax_s.plot([p["step"] for p in r["curve"]], [p["acc"] for p in r["curve"]], color=c, marker=".",
                      label=lab, alpha=0.8)
    for t in tr["summary"]["targets"]:
        for ax in (ax_t, ax_s):
            ax.axhline(t["acc"], color="grey", linestyle=":", linewidth=1)
    ax_t.set_xlabel("training seconds (timed steps only)")
    ax_s.set_xlabel("optimizer steps")
    for ax in (ax_t, ax_s):
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(True, alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"time to target ({rep['meta']['machine']}, {rep['meta']['torch_threads']} thread(s))", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_latency(rep: dict, path: Path) -> bool:
    """Ratio to the base model against batch (one panel per sequence length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lat = rep.get("latency")
    if not lat:
        return False
    seqs = list(dict.fromkeys(r["seq"] for r in lat["records"]))
    fig, axes = plt.subplots(1, len(seqs), figsize=(4 * len(seqs), 3.6), squeeze=False, sharey=True)
    for ax, q in zip(axes[0], seqs):
        for c in lat["cases"][1:]:
            rs = sorted((r for r in lat["records"] if r["seq"] == q and r["case"] == c), key=lambda r: r["batch"])
            xs = [r["batch"] for r in rs]
            ys = [r["vs_base"]["mean"] for r in rs]
            lo = [r["vs_base"]["mean"] - r["vs_base"]["low"] for r in rs]
            hi = [r["vs_base"]["high"] - r["vs_base"]["mean"] for r in rs]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=c)
        ax.axhline(1.0, color="grey", linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(f"seq {q}", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("latency / base model")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_efficiency(rep: dict, out_dir: str | Path, command: str | None = None) -> dict:
    """``efficiency.json``, ``efficiency.md`` and the plots in ``out_dir``."""
    from adapterkit.safeio import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = {**rep, "command": command}
    atomic_write_json(out / "efficiency.json", rep)
    plots = {}
    for key, fn in (("train", plot_train), ("latency", plot_latency)):
        name = f"efficiency_{key}.png"
        try:
            if fn(rep, out / name):
                plots[key] = name
        except ImportError:  # matplotlib missing: tables only
            pass
    md = to_markdown(rep, command, plots)
    atomic_write_text(out / "efficiency.md", md)
    return {"markdown": md, "plots": plots}


# --- CLI --------------------------------------------------------------------------------

def add_arguments(p) -> None:
    """The ``--efficiency`` flags of ``adapterkit bench``."""
    p.add_argument("--efficiency", action="store_true",
                   help="adapter efficiency against full FT (Mundra et al. 2023): time to a target validation "
                        "accuracy, inference latency against batch and sequence length, and the cost of serving "
                        "N tasks, on a pretrained encoder and a real text task (docs/results/efficiency)")
    p.add_argument("--efficiency-parts", default=None, help="--efficiency: comma list of train, latency, serve")
    p.add_argument("--efficiency-dir", default="bench_efficiency",
                   help="--efficiency: output folder (efficiency.json, efficiency.md, plots)")
    p.add_argument("--efficiency-data", default=None,
                   help="--efficiency: data root (<task>/train.jsonl, val.jsonl); default: BBC News exported "
                        "into <dir>_data")
    p.add_argument("--efficiency-model", default=None, help="--efficiency: text-domain model name (default minilm)")
    p.add_argument("--efficiency-set", action="append", default=[], metavar="KEY=VALUE",
                   help="--efficiency: any setting of adapterkit.bench.efficiency.EfficiencySettings "
                        "(e.g. seeds=3, steps=96, lat_batches=1,8,32); repeatable")


def _parse_value(key: str, text: str, default):
    try:
        if isinstance(default, list):
            conv = float if default and isinstance(default[0], float) else (
                str if default and isinstance(default[0], str) else int)
            return [conv(x) for x in text.split(",") if x.strip()]
        if isinstance(default, bool):
            return text.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"--efficiency-set {key}: cannot read {text!r}") from None
    return text


def settings_from_args(args) -> EfficiencySettings:
    s = EfficiencySettings()
    kw: dict = {}
    if args.efficiency_parts:
        kw["parts"] = [x.strip() for x in args.efficiency_parts.split(",") if x.strip()]
    if args.efficiency_model:
        kw["model"] = args.efficiency_model
    if args.efficiency_data:
        kw["data"] = args.efficiency_data
    if getattr(args, "seed", None) is not None:
        kw["seed"] = args.seed
    known = asdict(s)
    for item in args.efficiency_set:
        key, sep, val = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ConfigError(f"--efficiency-set expects KEY=VALUE with KEY one of {', '.join(known)}, got {item!r}")
        kw[key] = _parse_value(key, val.strip(), known[key])
    return replace(s, **kw)


def run_from_args(args) -> int:
    """``adapterkit bench --efficiency``: run, write the outputs, print the markdown."""
    try:
        set_threads(args.threads)
        s = settings_from_args(args)
        s.validate()
        cmd = bench_command()
        out = Path(args.efficiency_dir)
        root = ensure_data(s, Path(str(out) + "_data")) if "train" in s.parts else None

        def keep(partial: dict) -> None:
            from adapterkit.safeio import atomic_write_json

            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "efficiency.json", {**partial, "partial": True, "command": cmd})

        rep = run_efficiency(s, root, log=lambda x: print(x, file=sys.stderr, flush=True), on_part=keep)
        res = write_efficiency(rep, out, cmd)
        print(res["markdown"])
    except AdapterKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
