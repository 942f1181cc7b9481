"""Time benchmark cases in one process: training steps and forward-only inference.

Method (the peer script's, plus per-step medians): a fresh model per case, the same
seed and batch; ``warmup`` untimed steps; then ``steps`` timed steps. On GPU each step
is bracketed by CUDA events (no host sync inside the timed window, so host-side
dispatch can overlap as in the peer script) and the window is also timed with
``time.perf_counter`` after ``torch.cuda.synchronize``; on CPU each step is timed
with ``perf_counter``. Reported: the median step, the window mean, the minimum,
peak memory (``torch.cuda.max_memory_allocated``, reset after warm-up) on GPU or the
process RSS growth on CPU, and the trainable share.

``interleave`` (for a busy CPU): every case is built up front and the timed steps
run round-robin, one step per case per round, so load from other processes hits all
cases alike; memory is then not measured.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass

import torch

from adapterkit.bench.cases import BuildContext, Case, PeerMissing, Prepared
from adapterkit.bench.shapes import Batch, Shape, make_batch
from adapterkit.core.routing import route
from adapterkit.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class Settings:
    """How to run: device, autocast dtype, batch, lengths, step counts."""

    device: str
    dtype: str
    batch: int
    src: int
    tgt: int
    steps: int
    warmup: int
    seed: int = 0
    lr: float = 1e-4
    compile: bool = False
    mode: str = "eager"  # eager | graph | both: graph replays each step as a CUDA graph (adapterkit.GraphedStep)
    frozen_dtype: str | None = None  # "bf16"/"fp16": adapterkit.cast_frozen on every case (full FT has none)

    @property
    def variants(self) -> tuple[str, ...]:
        return ("eager", "graph") if self.mode == "both" else (self.mode,)

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f'--dtype must be one of {list(DTYPES)}, got "{self.dtype}"')
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f'--device "{self.device}" asked for, but torch sees no CUDA device')
        if self.mode not in ("eager", "graph", "both"):
            raise ConfigError(f'--mode must be eager, graph or both, got "{self.mode}"')
        if self.mode != "eager" and not self.device.startswith("cuda"):
            raise ConfigError(f'--mode {self.mode} replays CUDA graphs and needs a CUDA device; use --mode eager')
        if self.frozen_dtype not in (None, "bf16", "fp16"):
            raise ConfigError(f'--frozen-dtype must be bf16 or fp16, got "{self.frozen_dtype}"')
        if self.frozen_dtype is not None and self.frozen_dtype != self.dtype:
            raise ConfigError(f"--frozen-dtype {self.frozen_dtype} needs --dtype {self.frozen_dtype} autocast "
                              "(frozen weights are stored in the autocast dtype)")
        if self.dtype == "fp16" and not self.device.startswith("cuda"):
            raise ConfigError("--dtype fp16 autocast needs a CUDA device; use bf16 or fp32 on CPU")

    def to_dict(self) -> dict:
        return asdict(self)


def _rss_bytes() -> int | None:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.Process(os.getpid()).memory_info().rss)
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _Stepper:
    """Runs one training step or one forward for a prepared case."""

    def __init__(self, prep: Prepared, kind: str, batch: Batch, settings: Settings, variant: str = "eager"):
        self.prep, self.kind, self.batch = prep, kind, batch
        self.device_type = torch.device(settings.device).type
        self.amp_dtype = DTYPES[settings.dtype]
        model = prep.model
        if kind == "train":
            model.train(prep.train_mode)
        else:
            model.eval()
        self.fn = torch.compile(model) if settings.compile else model
        params = [p for p in prep.params if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=settings.lr) if (kind == "train" and params) else None
        self.last_loss: torch.Tensor | None = None
        self.graph = None
        if variant == "graph":
            from adapterkit.core.graphs import GraphedStep

            self.graph = GraphedStep(model, self.opt, self._graph_fn, amp_dtype=self.amp_dtype,
                                     warmup=2, clone_outputs=False)
            self.graph_batch = ({"input_ids": batch.input_ids, "labels": batch.labels} if kind == "train" else
                                {"input_ids": batch.input_ids, **self._dec()})

    def _dec(self) -> dict:  # a causal LM's batch has no decoder inputs
        d = self.batch.decoder_input_ids
        return {} if d is None else {"decoder_input_ids": d}

    def _route(self):
        return route(self.prep.route) if self.prep.route is not None else contextlib.nullcontext()

    def _graph_fn(self, b: dict):  # GraphedStep enters autocast itself
        with self._route():
            out = self.fn(**b, **self.prep.kwargs)
        return out.loss if self.kind == "train" else out.logits

    def _ctx(self):
        stack = contextlib.ExitStack()
        if self.amp_dtype is not None:
            stack.enter_context(torch.autocast(self.device_type, dtype=self.amp_dtype))
        stack.enter_context(self._route())
        return stack

    def step(self) -> None:
        b = self.batch
        if self.graph is not None:
            out = self.graph(self.graph_batch)
            self.last_loss = out if self.kind == "train" else None
            return
        if self.kind == "train":
            with self._ctx():
                out = self.fn(input_ids=b.input_ids, labels=b.labels, **self.prep.kwargs)
            out.loss.backward()
            if self.opt is not None:
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
            self.last_loss = out.loss.detach()
        else:
            with torch.no_grad(), self._ctx():
                out = self.fn(input_ids=b.input_ids, **self._dec(), **self.prep.kwargs)
            self.last_loss = None


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def time_steps(stepper: _Stepper, steps: int, warmup: int) -> dict:
    """Warm up, then time ``steps`` steps; returns per-step times (ms) and window stats."""
    dev = stepper.device_type
    for _ in range(warmup):
        stepper.step()
    _sync(dev)
    if dev == "cuda":
        if stepper.graph is not None:
            torch.cuda.empty_cache()  # drop the eager warm-up's cached blocks: reserved = what the graph holds
        torch.cuda.reset_peak_memory_stats()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        t0 = time.perf_counter()
        events[0].record()
        for i in range(steps):
            stepper.step()
            events[i + 1].record()
        torch.cuda.synchronize()
        window = time.perf_counter() - t0
        per_step = [events[i].elapsed_time(events[i + 1]) for i in range(steps)]
    else:
        per_step = []
        t0 = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            stepper.step()
            per_step.append((time.perf_counter() - t) * 1000.0)
        window = time.perf_counter() - t0
    return {
        "median_ms": statistics.median(per_step),
        "mean_ms": window * 1000.0 / steps,
        "min_ms": min(per_step),
        "step_ms": per_step,
    }


def _cleanup(device_type: str) -> None:
    gc.collect()
    if device_type == "cuda":
        torch.cuda.empty_cache()


def record_name(case: Case, variant: str) -> str:
    """A result's key: the case name, with ``@graph`` for the CUDA-graphed variant."""
    return case.name if variant == "eager" else f"{case.name}@{variant}"


def _new_record(case: Case, variant: str = "eager") -> dict:
    return {"case": record_name(case, variant), "base": case.name, "variant": variant, "kind": case.kind,
            "group": case.group, "title": case.title, "status": "ok", "note": ""}


def _fail(rec: dict, e: BaseException) -> None:
    rec.update(status="error", error=f"{type(e).__name__}: {e}".strip()[:500],
               traceback=traceback.format_exc(limit=4)[-2000:])


def _prepare(case: Case, shape: Shape, settings: Settings, batch: Batch, rec: dict,
             variant: str = "eager") -> _Stepper | None:
    """Build the case's model and stepper; on failure fill ``rec`` and return None."""
    ctx = BuildContext(shape, torch.device(settings.device), settings.seed, batch)
    try:
        prep = case.build(ctx)
    except PeerMissing as e:
        rec.update(status="not installed", note=str(e))
        return None
    except Exception as e:
        _fail(rec, e)
        return None
    rec["note"] = prep.note
    if settings.frozen_dtype:
        from adapterkit.core.base import cast_frozen

        if case.kind == "infer":  # nothing trains at inference: every case stores all its weights alike
            prep.model.requires_grad_(False)
        cast_frozen(prep.model, DTYPES[settings.frozen_dtype])
    rec.update(_param_counts(prep))
    try:
        return _Stepper(prep, case.kind, batch, settings, variant)
    except Exception as e:
        _fail(rec, e)
        return None


def _finish_loss(rec: dict, stepper: _Stepper) -> None:
    if stepper.last_loss is not None:
        loss = float(stepper.last_loss)
        rec["loss"] = loss
        if not math.isfinite(loss):
            rec.update(status="error", error=f"non-finite loss {loss}")


def run_case(case: Case, shape: Shape, settings: Settings, batch: Batch, variant: str = "eager") -> dict:
    """Build and time one case; failures become a record with ``status`` and ``error``."""
    dev_type = torch.device(settings.device).type
    rec = _new_record(case, variant)
    _cleanup(dev_type)
    rss0 = _rss_bytes()
    reserved0 = torch.cuda.memory_reserved() if dev_type == "cuda" else 0
    stepper = _prepare(case, shape, settings, batch, rec, variant)
    if stepper is None:
        return rec
    try:
        rec.update(time_steps(stepper, settings.steps, settings.warmup))
        _finish_loss(rec, stepper)
        if stepper.graph is not None and stepper.graph.fallback_reason:
            rec["note"] = "; ".join(x for x in (rec.get("note"), f"ran eagerly: {stepper.graph.fallback_reason}")
                                    if x)
        if dev_type == "cuda":
            if variant == "eager":
                rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            else:  # a graph's private pool is reserved, not allocated, between replays
                rec["peak_gib"] = (torch.cuda.max_memory_reserved() - reserved0) / 2**30
                rec["memory_measure"] = "reserved by the case (weights, optimizer state, graph pool)"
        else:
            rss1 = _rss_bytes()
            rec["rss_delta_mib"] = None if rss0 is None or rss1 is None else (rss1 - rss0) / 2**20
    except Exception as e:  # one failing case (e.g. under --compile) must not end the run
        _fail(rec, e)
    finally:
        if stepper.graph is not None:
            stepper.graph.reset()  # free the graph's private pool before the next case
        del stepper
        if settings.compile:
            torch._dynamo.reset()
        if dev_type == "cuda":
            _cleanup(dev_type)
    return rec


def run_interleaved(cases: list[Case], shape: Shape, settings: Settings, batch: Batch) -> list[dict]:
    """CPU noise control: build every case, warm each up, then time one step of each case
    per round for ``steps`` rounds, so bursts of load from other processes hit all cases
    alike. Memory is not measured in this mode (all models are alive at once)."""
    dev_type = torch.device(settings.device).type
    recs = [_new_record(c) for c in cases]
    steppers: list[_Stepper | None] = [_prepare(c, shape, settings, batch, r) for c, r in zip(cases, recs)]
    live = [i for i, st in enumerate(steppers) if st is not None]
    times: dict[int, list[float]] = {i: [] for i in live}
    for i in list(live):
        try:
            for _ in range(settings.warmup):
                steppers[i].step()
        except Exception as e:
            _fail(recs[i], e)
            live.remove(i)
    for _ in range(settings.steps):
        for i in list(live):
            try:
                _sync(dev_type)
                t = time.perf_counter()
                steppers[i].step()
                _sync(dev_type)
                times[i].append((time.perf_counter() - t) * 1000.0)
            except Exception as e:
                _fail(recs[i], e)
                live.remove(i)
    for i in live:
        ms = times[i]
        recs[i].update(median_ms=statistics.median(ms), mean_ms=sum(ms) / len(ms), min_ms=min(ms), step_ms=ms)
        _finish_loss(recs[i], steppers[i])
    del steppers
    _cleanup(dev_type)
    return recs


def _param_counts(prep: Prepared) -> dict:
    from adapterkit.core.base import trainable_report

    r = trainable_report(prep.model)
    return {"trainable": r["trainable"], "total": r["total"], "trainable_pct": r["percent"]}


def run_bench(shape: Shape, settings: Settings, cases: list[Case], log=None, interleave: bool = False) -> dict:
    """Run ``cases`` in order; returns ``{"meta", "results", "ratios", "targets"}``."""
    from adapterkit.bench.report import add_ratios, check_targets, environment

    settings.validate()
    batch = make_batch(shape, settings.batch, settings.src, settings.tgt, settings.device, seed=settings.seed)
    # objects alive now outlive the run: keep them out of the per-case full collections
    gc.collect()
    gc.freeze()
    try:
        if interleave:
            if settings.mode != "eager":
                raise ConfigError("--interleave times eager steps only; use --mode eager")
            results = run_interleaved(cases, shape, settings, batch)
            if log is not None:
                for rec in results:
                    log(_one_line(rec))
        else:
            results = []
            for variant in settings.variants:
                for case in cases:
                    rec = run_case(case, shape, settings, batch, variant)
                    results.append(rec)
                    if log is not None:
                        log(_one_line(rec))
    finally:
        gc.unfreeze()
    meta = {**environment(settings.device), "shape": shape.to_dict(), "settings": settings.to_dict(),
            "mode": "interleaved" if interleave else "sequential"}
    out = {"meta": meta,
           "results": results}
    out["ratios"] = add_ratios(results, {c.name: c for c in cases})
    out["targets"] = check_targets(results, out["meta"])
    return out


def _one_line(rec: dict) -> str:
    if rec["status"] != "ok":
        return f"{rec['case']:<32} {rec['status']}: {rec.get('error') or rec.get('note', '')}"
    extra = f"  trainable {rec['trainable_pct']:.3g}%" if rec["kind"] == "train" else ""
    return f"{rec['case']:<32} {rec['median_ms']:9.2f} ms{extra}"
