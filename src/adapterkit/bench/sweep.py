"""Cost against work: ``adapterkit bench --sweep``.

Times training steps (forward, backward, AdamW) and a forward-only pass of random-init
Llama-shaped causal LMs (built from a config, nothing downloaded) while one quantity grows
and the others stay fixed:

- ``size``: the backbone (:data:`LLAMA_SIZES`, from 8M up to a 1.1B-parameter shape);
- ``batch``: the batch size; ``seq``: the sequence length;
- ``tasks``: the number of tasks whose adapters serve one mixed training batch (the rows
  spread round-robin over the tasks).

At every point the same cases run one after another in this process through the
benchmark's runner (:func:`adapterkit.bench.runner.run_case`, fresh model per case, same
seed and batch): full fine-tuning, the frozen-backbone floor, adapterkit LoRA and a
bottleneck adapter, PEFT's LoRA configured alike, and the base model's forward. Every
training ratio is taken against full fine-tuning of the same point.

Memory on CPU is the peak resident set of the process while the case is built and
stepped, minus the resident set just before (after a full collection and ``malloc_trim``;
the kernel's peak counter ``VmHWM`` is reset through ``/proc/self/clear_refs``): weights,
gradients, optimizer state and activations as the OS sees them. On GPU it is the runner's
``torch.cuda.max_memory_allocated``. Before any model is built, the case's memory is
estimated (:func:`estimate_bytes`); a case over ``max_gib`` or over the memory the machine
has free is skipped and says so, so that full fine-tuning of the 1B shape (about 18 GB
with AdamW in fp32) is never attempted on a small machine.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import math
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from adapterkit.bench.cases import CASES_BY_NAME, BuildContext, Case, PeerMissing, Prepared, trainable
from adapterkit.bench.report import bench_command, set_threads
from adapterkit.bench.shapes import Shape, make_batch
from adapterkit.errors import ConfigError, did_you_mean

AXES = ("size", "batch", "seq", "tasks")

# Llama shapes, vocabulary 32000 (untied), grouped-query attention; named by their parameter count.
# llama-1b is TinyLlama-1.1B's shape.
LLAMA_SIZES: dict[str, Shape] = {
    "llama-8m": Shape("llama-8m", "llama", 128, 0, 2, 344, 4, 32000, 2),
    "llama-19m": Shape("llama-19m", "llama", 256, 0, 4, 688, 4, 32000, 2),
    "llama-56m": Shape("llama-56m", "llama", 512, 0, 8, 1376, 8, 32000, 4),
    "llama-125m": Shape("llama-125m", "llama", 768, 0, 12, 2048, 12, 32000, 4),
    "llama-360m": Shape("llama-360m", "llama", 1024, 0, 24, 2816, 16, 32000, 4),
    "llama-1b": Shape("llama-1b", "llama", 2048, 0, 22, 5632, 32, 32000, 4),
    # the shape of the batch, seq and tasks axes (the serving benchmark's default LM)
    "llama-small": Shape("llama-small", "llama", 256, 0, 4, 688, 4, 8192, 2),
}
DEFAULT_SIZES = ["llama-8m", "llama-19m", "llama-56m", "llama-125m", "llama-1b"]

# the methods, configured like PEFT's LoRA case (no LayerNorm training, dropout 0)
METHODS = {
    "lora": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "targets": ["q", "v"]},
    "adapter": {"method": "houlsby", "reduction_factor": 16, "positions": ["attn_out", "ffn_out"]},
}
PEFT_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


@dataclass
class SweepSettings:
    """What to sweep and the fixed values of the other quantities."""

    axes: list[str] = field(default_factory=lambda: list(AXES))
    sizes: list[str] = field(default_factory=lambda: list(DEFAULT_SIZES))
    batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    seqs: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256, 512])
    tasks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    shape: str = "llama-small"   # the backbone of the batch, seq and tasks axes
    batch: int = 4               # fixed batch of the seq axis
    seq: int = 64                # fixed sequence length of the size, batch and tasks axes
    size_batch: int = 1          # fixed batch of the size axis (a 1B step on a CPU takes seconds per row)
    tasks_batch: int = 16        # fixed batch of the tasks axis (at least the largest task count)
    device: str = "cpu"
    dtype: str = "fp32"
    steps: int = 5               # timed steps per case (fewer where one step is estimated to be slow)
    warmup: int = 1
    case_budget_s: float = 60.0  # timed steps are cut to fit this, by a FLOP estimate, but never below 3
    max_gib: float = 8.0         # a case estimated to need more memory is skipped
    interleave: bool = True      # time a point's cases round-robin when all of them fit in memory at once
    peers: bool = True
    infer: bool = True
    seed: int = 0

    def validate(self, shapes: dict[str, Shape]) -> None:
        if not self.axes:
            raise ConfigError(f"sweep: no axis given; known: {', '.join(AXES)}")
        for a in self.axes:
            if a not in AXES:
                raise ConfigError(f'sweep: unknown axis "{a}"{did_you_mean(a, AXES)}; known: {", ".join(AXES)}')
        for name in [*self.sizes, self.shape]:
            if name not in shapes:
                raise ConfigError(f'sweep: unknown backbone "{name}"{did_you_mean(name, shapes)}; '
                                  f"known: {', '.join(shapes)}")
        for key in ("batches", "seqs", "tasks"):
            vals = getattr(self, key)
            if not vals or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in vals):
                raise ConfigError(f"sweep: {key} must be a non-empty list of positive integers, got {vals!r}")
        for key in ("batch", "seq", "size_batch", "tasks_batch", "steps"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"sweep: {key} must be a positive integer, got {v!r}")
        if self.warmup < 0:
            raise ConfigError(f"sweep: warmup must be >= 0, got {self.warmup}")
        if "tasks" in self.axes and max(self.tasks) > self.tasks_batch:
            raise ConfigError(f"sweep: {max(self.tasks)} tasks cannot each have a row in a batch of "
                              f"{self.tasks_batch} (tasks_batch)")
        if not self.max_gib > 0:
            raise ConfigError(f"sweep: max_gib must be > 0, got {self.max_gib}")


def parse_int_list(text: str, flag: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; anything else is one clear error naming ``flag``."""
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be a comma list of positive integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise ConfigError(f"{flag} must be a comma list of positive integers, got {text!r}")
    return vals


def parse_name_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# --- model size and memory estimates (no model is built for these) ----------------------

def param_count(s: Shape) -> int:
    """Parameters of a llama shape (embeddings and LM head untied, as :func:`hf_config` builds it)."""
    d, f = s.d_model, s.ffn_dim
    kvd = (s.kv_heads or s.heads) * (d // s.heads)
    layer = 2 * d * d + 2 * d * kvd + 3 * d * f + 2 * d
    return 2 * s.vocab_size * d + s.decoder_layers * layer + d


def estimate_bytes(s: Shape, case: str, batch: int, seq: int, n_tasks: int = 1) -> int:
    """A deliberately generous fp32 estimate of a case's peak memory (weights, gradients,
    AdamW state, activations kept for backward, logits), used only to skip cases that
    would not fit; it is never reported as a measurement."""
    p = param_count(s)
    tokens = batch * seq
    weights = 4 * p
    logits = 3 * 4 * tokens * s.vocab_size  # logits, log-softmax, their gradient
    if case.startswith("infer"):
        return int(weights + logits + 4 * 4 * tokens * max(4 * s.d_model, 2 * s.ffn_dim) * 2)
    # activations kept per layer (Korthikanti et al.'s 34 + 5 a s / h bytes per token and width in
    # half precision, doubled for fp32, the FFN term scaled to this shape's width)
    per_layer = tokens * s.d_model * (34 + 5 * s.heads * seq / s.d_model) * 2 * max(1.0, s.ffn_dim / (4 * s.d_model))
    acts = s.decoder_layers * per_layer
    if case == "full_ft":
        return int(weights * 4 + acts + logits)  # + gradients + two AdamW moments
    extra = 0.05 * weights * max(1, n_tasks) if case != "frozen_bound" else 0  # adapters, their grads and state
    return int(weights + acts * 1.3 + logits + extra)


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), or None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"MemAvailable:\s+(\d+) kB", f.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


# --- peak resident memory of one case (CPU) --------------------------------------------

def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"{key}:\s+(\d+) kB", f.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMem:
    """Peak memory growth over a block, in MiB (``mib``; None where it cannot be read).

    CPU: ``VmHWM`` (the kernel's peak resident set, reset through ``/proc/self/clear_refs``)
    at the end minus ``VmRSS`` at the start, after gc and ``malloc_trim``. CUDA:
    ``max_memory_allocated`` (reset at the start) minus ``memory_allocated`` at the start.
    """

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.measure = "cuda max_memory_allocated growth" if self.cuda else "peak RSS growth (VmHWM)"

    def __enter__(self):
        _trim()
        self.mib: float | None = None
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.ok = True
            return self
        self.base = _status_kib("VmRSS")
        self.ok = self.base is not None
        if self.ok:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak counter to the current RSS
            except OSError:
                self.ok = False
        return self

    def __exit__(self, *exc):
        if not self.ok:
            return False
        if self.cuda:
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            hwm = _status_kib("VmHWM")
            self.mib = None if hwm is None else (hwm - self.base) / 1024
        return False


# --- cases ------------------------------------------------------------------------------

def _ak(method: str, n_tasks: int = 0):
    """adapterkit ``method``; with ``n_tasks``, one adapter per task and the rows spread over them."""
    def build(ctx: BuildContext) -> Prepared:
        from adapterkit.core.base import add_adapters

        m = ctx.fresh()
        cfg = copy.deepcopy(METHODS[method])
        route = None
        if n_tasks:
            cfg.update(tasks=[f"t{i}" for i in range(n_tasks)], sharing="per_task")
            route = torch.arange(ctx.batch.size, device=ctx.device) % n_tasks
        else:
            cfg["sharing"] = "shared"
        add_adapters(m, cfg)
        return Prepared(m, trainable(m), route=route)
    return build


def _peft_lora(n_tasks: int = 0):
    """PEFT LoRA like ``METHODS["lora"]``; with ``n_tasks``, that many LoRAs and a mixed batch
    through ``adapter_names=`` (PEFT refuses that in train mode: the step runs in eval mode)."""
    def build(ctx: BuildContext) -> Prepared:
        try:
            import peft
        except ImportError as e:
            raise PeerMissing(f"peft not installed ({e})") from None
        m = ctx.fresh()
        cfg = peft.LoraConfig(**PEFT_LORA)
        note = f"peft {peft.__version__}"
        if not n_tasks:
            pm = peft.get_peft_model(m, cfg)
            return Prepared(pm, trainable(pm), note=note)
        names = [f"t{i}" for i in range(n_tasks)]
        pm = peft.get_peft_model(m, cfg, adapter_name=names[0])
        for t in names[1:]:
            pm.add_adapter(t, copy.deepcopy(cfg))
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
        rows = [names[i % n_tasks] for i in range(ctx.batch.size)]
        return Prepared(pm, trainable(pm), kwargs={"adapter_names": rows}, train_mode=False,
                        note=note + "; eval mode (PEFT rejects adapter_names in train mode)")
    return build


def _lora_title() -> str:
    c = METHODS["lora"]
    return f"LoRA r {c['r']}, alpha {c['alpha']}, {'/'.join(c['targets'])}, dropout {c['dropout']:g}"


def point_cases(axis: str, n_tasks: int, peers: bool, infer: bool) -> list[Case]:
    """The cases timed at one point of ``axis`` (``n_tasks`` is the point's value on the tasks axis)."""
    full, floor = CASES_BY_NAME["full_ft"], CASES_BY_NAME["frozen_bound"]
    a = METHODS["adapter"]
    adapter_title = f"bottleneck adapter (houlsby, reduction {a['reduction_factor']}, after attention and FFN)"
    if axis == "tasks":
        cases = [full, floor,
                 Case("lora_mixed", "train", "adapterkit", f"{_lora_title()}, one per task, mixed batch",
                      _ak("lora", n_tasks)),
                 Case("adapter_mixed", "train", "adapterkit", f"{adapter_title}, one per task, mixed batch",
                      _ak("adapter", n_tasks))]
        if peers:
            cases.append(Case("peft_lora_mixed", "train", "peft", "PEFT LoRA, one per task, adapter_names=",
                              _peft_lora(n_tasks)))
        return cases
    cases = [full, floor,
             Case("lora", "train", "adapterkit", f"adapterkit {_lora_title()}", _ak("lora")),
             Case("adapter", "train", "adapterkit", adapter_title, _ak("adapter"))]
    if peers:
        cases.append(Case("peft_lora", "train", "peft", f"PEFT {_lora_title()}", _peft_lora()))
    if infer:
        cases.append(CASES_BY_NAME["infer_base"])
    return cases


@dataclass
class Point:
    axis: str
    value: int
    shape: Shape
    batch: int
    seq: int
    n_tasks: int = 1

    @property
    def x(self) -> float:
        """The point's coordinate on its axis (parameters for the size axis)."""
        return float(param_count(self.shape)) if self.axis == "size" else float(self.value)


def axis_points(axis: str, s: SweepSettings, shapes: dict[str, Shape]) -> list[Point]:
    base = shapes[s.shape]
    if axis == "size":
        return [Point(axis, param_count(shapes[n]), shapes[n], s.size_batch, s.seq) for n in s.sizes]
    if axis == "batch":
        return [Point(axis, b, base, b, s.seq) for b in s.batches]
    if axis == "seq":
        return [Point(axis, q, base, s.batch, q) for q in s.seqs]
    return [Point(axis, n, base, s.tasks_batch, s.seq, n) for n in s.tasks]


def _steps_for(p: Point, case: Case, s: SweepSettings) -> int:
    """Timed steps: ``s.steps``, cut so that the case's steps fit ``case_budget_s`` by a FLOP
    estimate (10 GFLOP/s, 6 x params x tokens for full FT, 4x otherwise), at least 3."""
    mult = 2 if case.kind == "infer" else (6 if case.name == "full_ft" else 4)
    est_s = mult * param_count(p.shape) * p.batch * p.seq / 1e10
    return max(min(3, s.steps), min(s.steps, int(s.case_budget_s / max(est_s, 1e-9))))


def _skip_reason(est: int, s: SweepSettings, reserved: int = 0) -> str | None:
    """Why a case estimated at ``est`` bytes must not be built (None: it may)."""
    if est > s.max_gib * 2**30:
        return f"estimated {est / 2**30:.1f} GiB > limit {s.max_gib:g} GiB"
    free = mem_available() if torch.device(s.device).type == "cpu" else None
    if free is not None and est + reserved > free - 2 * 2**30:
        return f"estimated {est / 2**30:.1f} GiB > free memory {free / 2**30:.1f} GiB - 2 GiB"
    return None


def run_points(points: list[Point], s: SweepSettings, log=None) -> list[dict]:
    """Every case of ``points``, memory guarded by an estimate before any model is built.

    Points are pooled in order while the estimates of all their cases fit in memory at
    once (``max_gib`` and the free memory; with ``s.interleave``): a pool's cases are built
    one after another (memory measured over the build and the warm-up steps of each, which
    include the optimizer's first step), then timed round-robin, one step per case per
    round, so that load from other processes hits every case and every point of the pool
    alike. A point that does not fit with others runs alone, and a point whose cases do not
    fit at once runs each case in turn (:func:`adapterkit.bench.runner.run_case`).
    """
    pools: list[tuple[list[Point], bool]] = []  # (points, interleaved)
    total = 0
    cap = s.max_gib * 2**30
    for p in points:
        need = sum(e for e in _estimates(p, s) if _skip_reason(e, s) is None)
        if not (s.interleave and need <= cap and _skip_reason(need, s) is None):
            pools.append(([p], False))
        elif pools and pools[-1][1] and total + need <= cap and _skip_reason(total + need, s) is None:
            pools[-1][0].append(p)
            total += need
        else:
            pools.append(([p], True))
            total = need
    recs: list[dict] = []
    for pool, interleave in pools:
        recs.extend(_run_pool(pool, s, log, interleave))
    return recs


def run_point(p: Point, s: SweepSettings, log=None) -> list[dict]:
    """Every case of one point (see :func:`run_points`)."""
    return run_points([p], s, log)


def _estimates(p: Point, s: SweepSettings) -> list[int]:
    return [estimate_bytes(p.shape, c.name, p.batch, p.seq, p.n_tasks)
            for c in point_cases(p.axis, p.n_tasks, s.peers, s.infer)]


def _run_pool(points: list[Point], s: SweepSettings, log, interleave: bool) -> list[dict]:
    from adapterkit.bench import runner as R

    recs, live, by_point = [], [], []
    for p in points:
        batch = make_batch(p.shape, p.batch, p.seq, 1, s.device, seed=s.seed)
        cases = point_cases(p.axis, p.n_tasks, s.peers, s.infer)
        steps = min(_steps_for(p, c, s) for c in cases)
        mine = []
        for case in cases:
            est = estimate_bytes(p.shape, case.name, p.batch, p.seq, p.n_tasks)
            rec = {"axis": p.axis, "value": p.value, "x": p.x, "shape": p.shape.name, "params": param_count(p.shape),
                   "batch": p.batch, "seq": p.seq, "tasks": p.n_tasks, "est_gib": est / 2**30,
                   "timing": "interleaved" if interleave else "sequential"}
            mine.append(rec)
            why = _skip_reason(est, s)
            if why:
                rec.update(case=case.name, kind=case.kind, group=case.group, title=case.title, status="skipped",
                           note=why)
                continue
            st = R.Settings(device=s.device, dtype=s.dtype, batch=p.batch, src=p.seq, tgt=1,
                            steps=steps if interleave else _steps_for(p, case, s), warmup=max(1, s.warmup),
                            seed=s.seed)
            peak = PeakMem(s.device)
            if not interleave:
                with peak:
                    rec.update(R.run_case(case, p.shape, st, batch))
            else:
                rec.update(R._new_record(case))
                with peak:
                    stepper = R._prepare(case, p.shape, st, batch, rec)
                    try:
                        for _ in range(st.warmup if stepper is not None else 0):
                            stepper.step()
                    except Exception as e:
                        R._fail(rec, e)
                        stepper = None
                if stepper is not None:
                    live.append((rec, stepper, steps))
            if peak.mib is not None and rec["status"] == "ok":
                rec["peak_mib"], rec["memory_measure"] = peak.mib, peak.measure
        recs.extend(mine)
        by_point.append(mine)
    if live:
        dev_type = torch.device(s.device).type
        times: dict[int, list[float]] = {id(r): [] for r, _, _ in live}
        for i in range(max(n for _, _, n in live)):
            for rec, stepper, n in live:
                if i >= n or rec["status"] != "ok":
                    continue
                try:
                    R._sync(dev_type)
                    t = time.perf_counter()
                    stepper.step()
                    R._sync(dev_type)
                    times[id(rec)].append((time.perf_counter() - t) * 1000.0)
                except Exception as e:
                    R._fail(rec, e)
        for rec, stepper, _ in live:
            ms = times[id(rec)]
            if rec["status"] == "ok" and ms:
                rec.update(median_ms=statistics.median(ms), mean_ms=statistics.fmean(ms), min_ms=min(ms), step_ms=ms)
                R._finish_loss(rec, stepper)
        del live, stepper
        _trim()
    for rec in recs:
        rec.pop("traceback", None)
        if rec["status"] == "ok" and "step_ms" in rec:
            rec["steps"] = len(rec["step_ms"])
        if log is not None:
            log(_one_line(rec))
    for mine in by_point:
        add_point_ratios(mine)
    return recs


def add_point_ratios(recs: list[dict]) -> None:
    """``time_vs_full_ft`` / ``mem_vs_full_ft`` for every training record, against full FT of the
    same axis and point (None where either is missing); ``time_vs_floor`` against the frozen floor."""
    def ok(name):
        for r in recs:
            if r["case"] == name and r["status"] == "ok":
                return r
        return None

    full, floor = ok("full_ft"), ok("frozen_bound")
    for r in recs:
        if r["kind"] != "train":
            continue
        good = r["status"] == "ok"
        r["time_vs_full_ft"] = r["median_ms"] / full["median_ms"] if good and full else None
        r["mem_vs_full_ft"] = (r["peak_mib"] / full["peak_mib"]
                               if good and full and r.get("peak_mib") and full.get("peak_mib") else None)
        r["time_vs_floor"] = r["median_ms"] / floor["median_ms"] if good and floor else None


def _one_line(r: dict) -> str:
    head = f"sweep {r['axis']:<5} {r['value']:>11,} {r['case']:<16}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('error') or r.get('note', '')}"
    mem = f"  peak {r['peak_mib']:8.1f} MiB" if r.get("peak_mib") is not None else ""
    return f"{head} {r['median_ms']:10.2f} ms ({r.get('steps', '?')} steps){mem}"


WARM_SHAPE = Shape("warm", "llama", 32, 0, 1, 64, 2, 64, 1)


def warm_process(s: SweepSettings) -> None:
    """One untimed point of every case on a micro shape, so that one-time costs of the process
    (imports, lazy initialisation, thread pools) land in no measured case."""
    w = replace(s, steps=1, warmup=1, interleave=False)
    for axis in ("batch", "tasks"):
        run_point(Point(axis, 2, WARM_SHAPE, 2, 8, 2), w)


def run_sweep(s: SweepSettings, log=None, shapes: dict[str, Shape] | None = None, on_point=None) -> dict:
    """Run every axis of ``s``; returns ``{"meta", "settings", "records", "fits"}``.

    ``on_point(report)``, if given, is called after every point with the report so far
    (``partial: true``) after every axis, e.g. to keep what was measured if a long run is stopped."""
    from adapterkit.bench.report import environment

    shapes = LLAMA_SIZES if shapes is None else shapes
    s.validate(shapes)
    used = {*s.sizes, s.shape} if "size" in s.axes else {s.shape}
    meta = {**environment(s.device), "shapes": {n: {**shapes[n].to_dict(), "params": param_count(shapes[n])}
                                                for n in shapes if n in used}}
    records: list[dict] = []
    # objects alive now outlive the sweep: keep them out of the full collections between cases
    gc.collect()
    gc.freeze()
    try:
        warm_process(s)  # imports peft and transformers' lazy modules: freeze what they brought too
        gc.collect()
        gc.freeze()
        for axis in s.axes:
            records.extend(run_points(axis_points(axis, s, shapes), s, log))
            if on_point is not None:
                on_point({"meta": meta, "settings": asdict(s), "records": records, "partial": True})
    finally:
        gc.unfreeze()
    return {"meta": meta, "settings": asdict(s), "records": records, "fits": fit_all(records)}


# --- growth fits ------------------------------------------------------------------------

def loglog_fit(xs: list[float], ys: list[float]) -> dict | None:
    """Least-squares slope of log y on log x with its 95% interval (t, n - 2 dof); None under 2 points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    n = len(pts)
    if n < 2 or len({p[0] for p in pts}) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    k = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    out = {"slope": k, "n": n, "lo": None, "hi": None}
    if n >= 3:
        from scipy.stats import t as student_t

        resid = sum((p[1] - (my + k * (p[0] - mx))) ** 2 for p in pts)
        se = math.sqrt(resid / (n - 2) / sxx)
        q = float(student_t.ppf(0.975, n - 2))
        out.update(lo=k - q * se, hi=k + q * se)
    return out


def linear_fit(xs: list[float], ys: list[float]) -> dict | None:
    """y = a + b x by least squares (memory: a fixed part plus a part per unit); None under 2 points."""
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    b = sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)
    return {"intercept": my - b * mx, "per_unit": b}


def growth_words(k: float) -> str:
    """A log-log slope in words."""
    if abs(k) < 0.15:
        return "about flat"
    for target, word in ((1.0, "linearly"), (2.0, "quadratically"), (0.5, "as the square root")):
        if abs(k - target) <= 0.15:
            return f"~{word}"
    return f"as x^{k:.2f} ({'sub' if k < 1 else 'super'}-linearly)"


def fit_all(records: list[dict]) -> list[dict]:
    """Per axis and case: log-log slopes of step time and memory (all points, and the upper
    half of the points, where fixed per-op costs matter least) and a linear memory fit."""
    fits = []
    keys = dict.fromkeys((r["axis"], r["case"]) for r in records)
    for axis, case in keys:
        rs = sorted((r for r in records if r["axis"] == axis and r["case"] == case and r["status"] == "ok"),
                    key=lambda r: r["x"])
        xs = [r["x"] for r in rs]
        t = [r["median_ms"] for r in rs]
        m = [r.get("peak_mib") for r in rs]
        half = max(3, (len(rs) + 1) // 2)
        fits.append({"axis": axis, "case": case, "points": len(rs),
                     "time": loglog_fit(xs, t), "time_upper": loglog_fit(xs[-half:], t[-half:]) if len(rs) > 3 else None,
                     "mem": loglog_fit(xs, m) if all(v for v in m) else None,
                     "mem_linear": linear_fit(xs, m) if all(v is not None for v in m) else None})
    return fits


# --- outputs ----------------------------------------------------------------------------

AXIS_LABEL = {"size": "backbone parameters", "batch": "batch size", "seq": "sequence length (tokens)",
              "tasks": "tasks in the mixed batch"}
AXIS_UNIT = {"size": "M parameters", "batch": "sample", "seq": "token", "tasks": "task"}


def _fmt_slope(f: dict | None) -> str:
    if not f:
        return "n/a"
    ci = f" [{f['lo']:.2f}, {f['hi']:.2f}]" if f.get("lo") is not None else ""
    return f"{f['slope']:.2f}{ci}"


def _cell(r: dict | None) -> tuple[str, str]:
    if r is None:
        return "", ""
    if r["status"] != "ok":
        return r["status"], ""
    t = f"{r['median_ms']:.1f}"
    if r.get("time_vs_full_ft") is not None:
        t += f" ({r['time_vs_full_ft']:.2f})"
    elif r.get("time_vs_floor") is not None and r["case"] != "frozen_bound":
        t += f" ({r['time_vs_floor']:.2f} x floor)"
    m = "n/a" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
    if r.get("mem_vs_full_ft") is not None:
        m += f" ({r['mem_vs_full_ft']:.2f})"
    return t, m


def _value_label(axis: str, r: dict) -> str:
    return f"{r['shape']} ({r['params'] / 1e6:.0f}M)" if axis == "size" else str(r["value"])


def to_markdown(rep: dict, command: str | None = None, plots: dict | None = None) -> str:
    meta, s = rep["meta"], rep["settings"]
    mem_kind = next((r.get("memory_measure") for r in rep["records"] if r.get("memory_measure")), "n/a")
    lines = ["# Cost against work: `adapterkit bench --sweep`", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    if rep.get("partial"):
        done = list(dict.fromkeys(r["axis"] for r in rep["records"]))
        lines += [f"**Partial run**: stopped before it finished; measured axes: {', '.join(done) or 'none'} "
                  f"(the last one possibly incomplete), of {', '.join(s['axes'])}.", ""]
    lines += [
        f"Machine: {meta['machine']} ({meta['torch_threads']} torch threads); torch {meta['torch']}, transformers "
        f"{meta['transformers']}, peft {meta['peft']}. Autocast: {s['dtype']}.",
        "",
        "Backbones: random-init Llama-shaped causal LMs built from a config (vocabulary, width, layers, heads, "
        "key/value heads): " + "; ".join(
            f"{n}: d {v['d_model']}, {v['decoder_layers']} layers, FFN {v['ffn_dim']}, {v['heads']}/"
            f"{v['kv_heads'] or v['heads']} heads, vocab {v['vocab_size']}, {v['params'] / 1e6:.1f}M parameters"
            for n, v in meta["shapes"].items()) + ".",
        "",
        f"Fixed values: batch/seq/tasks axes on `{s['shape']}`; sequence length {s['seq']} (size, batch, tasks "
        f"axes); batch {s['batch']} (seq axis), {s['size_batch']} (size axis), {s['tasks_batch']} (tasks axis). "
        f"Training step = forward + backward + AdamW, every case on a fresh model with the same seed, all in "
        f"one process. The points of an axis are pooled while the memory estimates of all their cases fit at "
        f"once: a pool's cases are built, warmed up, then timed round-robin (one step per case per round, so "
        f"load from other processes hits every case and point alike); a point that does not fit runs its "
        f"cases one after another ({_sequential_points(rep)}). "
        f"{s['warmup']} warm-up step(s), then up to {s['steps']} timed "
        f"steps (fewer where a FLOP estimate says one step is slow, at least {min(3, s['steps'])}; each record lists "
        f"its count); "
        f"the median is reported.",
        "",
        f"Memory: {mem_kind}"
        + (": the process's peak resident set while the case is built and stepped, minus the resident set "
           "before it (after gc and malloc_trim; the kernel's VmHWM counter reset via /proc/self/clear_refs): "
           "weights, gradients, AdamW state and activations as the OS sees them, allocator slack included."
           if "VmHWM" in mem_kind else "."),
        f" Cases estimated (before building) to need more than {s['max_gib']:g} GiB, or more than the free "
        "memory less 2 GiB, are skipped and marked so.",
        "",
        "Cells: median step ms (x full FT of the same point) | peak MiB (x full FT). `frozen_bound` is the floor "
        "(every weight frozen, one trainable scalar on the embeddings: every activation gradient, no weight "
        "gradient). The methods are configured alike (" + _lora_title() + "; bottleneck reduction "
        f"{METHODS['adapter']['reduction_factor']}); no LayerNorm training.",
        "",
    ]
    for axis in [a for a in AXES if any(r["axis"] == a for r in rep["records"])]:
        recs = [r for r in rep["records"] if r["axis"] == axis]
        cases = list(dict.fromkeys(r["case"] for r in recs))
        values = list(dict.fromkeys(r["value"] for r in recs))
        lines += [f"## {AXIS_LABEL[axis]} (`{axis}`)", ""]
        if plots and plots.get(axis):
            lines += [f"![{axis}]({plots[axis]})", ""]
        lines += ["| " + AXIS_LABEL[axis] + " | " + " | ".join(f"{c} ms" for c in cases) + " |",
                  "|---|" + "---:|" * len(cases)]
        mlines = ["| " + AXIS_LABEL[axis] + " | " + " | ".join(f"{c} MiB" for c in cases) + " |",
                  "|---|" + "---:|" * len(cases)]
        for v in values:
            row = {r["case"]: r for r in recs if r["value"] == v}
            any_r = next(iter(row.values()))
            cells = [_cell(row.get(c)) for c in cases]
            lines.append(f"| {_value_label(axis, any_r)} | " + " | ".join(c[0] for c in cells) + " |")
            mlines.append(f"| {_value_label(axis, any_r)} | " + " | ".join(c[1] for c in cells) + " |")
        lines += [""] + mlines + [""]
        skipped = [r for r in recs if r["status"] == "skipped"]
        for r in skipped:
            lines.append(f"- {r['case']} at {_value_label(axis, r)}: skipped, {r['note']}")
        if skipped:
            lines.append("")
        if axis == "tasks":
            lines += _tasks_lines(recs) + [""]
        lines += ["Growth (log-log least-squares slope of the median step time / peak memory against "
                  f"{AXIS_LABEL[axis]}, [95% interval over the points]):", "",
                  "| case | points | time slope | time slope, upper half | memory slope | memory: fixed + per "
                  f"{AXIS_UNIT[axis]} (MiB) | step time grows |", "|---|---:|---:|---:|---:|---:|---|"]
        for f in (f for f in rep["fits"] if f["axis"] == axis):
            ml = f["mem_linear"]
            per = "n/a" if not ml else (f"{ml['intercept']:.0f} + {ml['per_unit'] * (1e6 if axis == 'size' else 1):.3g}")
            grows = growth_words(f["time"]["slope"]) if f["time"] else "n/a"
            lines.append(f"| {f['case']} | {f['points']} | {_fmt_slope(f['time'])} | {_fmt_slope(f['time_upper'])} | "
                         f"{_fmt_slope(f['mem'])} | {per} | {grows} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _sequential_points(rep: dict) -> str:
    seq = list(dict.fromkeys(f"{r['axis']} {_value_label(r['axis'], r)}" for r in rep["records"]
                             if r.get("timing") == "sequential"))
    return "sequential here: " + ", ".join(seq) if seq else "none here"


def _tasks_lines(recs: list[dict]) -> list[str]:
    """Each mixed case's step time against its own one-task point."""
    out = ["Mixed batch against the same case with one task (x 1 task):", ""]
    for case in dict.fromkeys(r["case"] for r in recs if r["case"].endswith("_mixed")):
        rs = {r["value"]: r for r in recs if r["case"] == case and r["status"] == "ok"}
        one = rs.get(1)
        if one is None:
            continue
        out.append(f"- {case}: " + ", ".join(f"{n} tasks {r['median_ms'] / one['median_ms']:.2f}x"
                                              for n, r in sorted(rs.items())))
    return out


def plot_axis(rep: dict, axis: str, path: Path) -> bool:
    """One figure for ``axis``: step time and peak memory against it, one line per case, log scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    recs = [r for r in rep["records"] if r["axis"] == axis and r["status"] == "ok"]
    if not recs:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for case in dict.fromkeys(r["case"] for r in recs):
        rs = sorted((r for r in recs if r["case"] == case), key=lambda r: r["x"])
        xs = [r["x"] / (1e6 if axis == "size" else 1) for r in rs]
        style = "--" if case in ("full_ft", "frozen_bound") else (":" if case.startswith("infer") else "-")
        ax_t.plot(xs, [r["median_ms"] for r in rs], marker="o", linestyle=style, label=case)
        mp = [(x, r["peak_mib"]) for x, r in zip(xs, rs) if r.get("peak_mib")]
        if mp:
            ax_m.plot([p[0] for p in mp], [p[1] for p in mp], marker="o", linestyle=style, label=case)
    xlabel = "backbone parameters (M)" if axis == "size" else AXIS_LABEL[axis]
    for ax, ylabel in ((ax_t, "median step (ms)"), (ax_m, "peak memory (MiB)")):
        ax.set_xscale("log", base=2 if axis in ("batch", "seq", "tasks") else 10)
        ax.set_yscale("log")
        if axis != "size":
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"adapterkit bench --sweep: {AXIS_LABEL[axis]} ({rep['meta']['machine']}, "
                 f"{rep['meta']['torch_threads']} thread(s))", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_sweep(rep: dict, out_dir: str | Path, command: str | None = None) -> dict:
    """``sweep.json``, ``sweep.md`` and one ``sweep_<axis>.png`` per axis in ``out_dir``."""
    from adapterkit.safeio import atomic_write_json, atomic_write_text

    if "fits" not in rep:  # a partial report kept by a stopped run
        rep = {**rep, "fits": fit_all(rep["records"])}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sweep.json", {**rep, "command": command})  # first: the measurements are kept
    plots = {}
    for axis in dict.fromkeys(r["axis"] for r in rep["records"]):
        name = f"sweep_{axis}.png"
        if plot_axis(rep, axis, out / name):
            plots[axis] = name
    rep = {**rep, "command": command}
    atomic_write_json(out / "sweep.json", rep)
    md = to_markdown(rep, command, plots)
    atomic_write_text(out / "sweep.md", md)
    return {"markdown": md, "plots": plots}


def settings_from_args(args) -> SweepSettings:
    """The sweep's settings from ``adapterkit bench --sweep`` arguments (None = default)."""
    s = SweepSettings()
    kw: dict = {}
    if args.sweep_axes is not None:
        kw["axes"] = parse_name_list(args.sweep_axes)
    if args.sweep_sizes is not None:
        kw["sizes"] = parse_name_list(args.sweep_sizes)
    for flag, key in (("sweep_batch", "batches"), ("sweep_seq", "seqs"), ("sweep_tasks", "tasks")):
        v = getattr(args, flag)
        if v is not None:
            kw[key] = parse_int_list(v, "--" + flag.replace("_", "-"))
    for flag, key in (("sweep_shape", "shape"), ("batch", "batch"), ("src", "seq"), ("steps", "steps"),
                      ("warmup", "warmup"), ("sweep_max_gib", "max_gib"), ("seed", "seed"),
                      ("dtype", "dtype")):
        v = getattr(args, flag, None)
        if v is not None:
            kw[key] = v
    if args.device:
        kw["device"] = args.device
    if kw.get("tasks"):
        kw["tasks_batch"] = max(s.tasks_batch, max(kw["tasks"]))
    return replace(s, **kw)


def run_from_args(args) -> int:
    """``adapterkit bench --sweep``: run, write the outputs, print the markdown."""
    try:
        set_threads(args.threads)
        s = settings_from_args(args)
        cmd = bench_command()

        def keep(partial: dict) -> None:
            from adapterkit.safeio import atomic_write_json

            Path(args.sweep_dir).mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(args.sweep_dir) / "sweep.json", {**partial, "command": cmd})

        rep = run_sweep(s, log=lambda x: print(x, file=sys.stderr, flush=True), on_point=keep)
        res = write_sweep(rep, args.sweep_dir, cmd)
        print(res["markdown"])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
