"""Training-step time and op count of the benchmark cases with the adapter branches plain,
hand-fused (the default) and compiled (:func:`adapterkit.fuse_branches`), on the CPU (or
``--device cuda --dtype bf16 --shape bart-base`` on a GPU).

    python -m adapterkit.bench.fusedbench [--cases single_adapter,single_lora_do0,pfeiffer,lora_do0_peer]
        [--refs frozen_bound,peft_lora_do0]
        [--batch 8 --src 32 --tgt 8] [--steps 30] [--backend inductor] [--out r.json] [--markdown r.md]

Each case (``adapterkit bench``'s tiny shape and presets) is built once per mode: ``off``
(plain ops), ``eager`` (hand-fused autograd functions) and ``compile`` (the branch functions
under ``torch.compile``); ``peft_lora_do0`` and ``frozen_bound`` (``--refs``) run as
references. Steps (forward, backward, AdamW, zero_grad) are timed round-robin over every
(case, mode), one step each per round, so load from other processes hits all alike; the
median and a 95% interval of the median (order statistics) are reported, and the non-view aten
ops of one forward + backward (as ``tests/test_bench.py`` counts them) for off and eager.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import statistics
import sys
import time

import torch

from adapterkit.bench.profile import count_step_ops
from adapterkit.bench.report import write_outputs

MODES = ("off", "eager", "compile")
REFS = ("frozen_bound", "peft_lora_do0")


def _median_ci(xs: list[float]) -> tuple[float, float, float]:
    """Median and a distribution-free 95% interval (binomial order statistics)."""
    s = sorted(xs)
    n = len(s)
    half = 1.96 * math.sqrt(n) / 2
    lo, hi = max(0, int(math.floor(n / 2 - half))), min(n - 1, int(math.ceil(n / 2 + half)))
    return statistics.median(s), s[lo], s[hi]


class _Runner:
    def __init__(self, name, mode, shape, batch, backend, device="cpu", amp=None):
        import adapterkit
        from adapterkit.bench.cases import CASES_BY_NAME, BuildContext

        self.name, self.mode = name, mode
        self.prep = CASES_BY_NAME[name].build(BuildContext(shape, torch.device(device), 0, batch))
        self.device, self.amp = torch.device(device), amp
        self.model = self.prep.model.train(self.prep.train_mode)
        fusable = name not in ("full_ft", "frozen_bound") and not name.startswith("peft")
        if fusable:
            adapterkit.fuse_branches(self.model, mode, backend=backend)
        self.ops = count_step_ops(self.model, batch.input_ids, batch.labels, self.prep.route) if mode != "compile" and device == "cpu" else None
        params = [p for p in self.prep.params if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.batch, self.times = batch, []

    def step(self) -> float:
        from adapterkit.core.routing import route

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        amp = torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()
        with amp, route(self.prep.route) if self.prep.route is not None else contextlib.nullcontext():
            loss = self.model(input_ids=self.batch.input_ids, labels=self.batch.labels).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def to_markdown(rep: dict) -> str:
    m = rep["meta"]
    lines = [f"Shape `{m['shape']}`; batch {m['batch']}, {m['src']}/{m['tgt']} tokens, {m['dtype']}, {m['steps']} timed "
             f"steps per row after {m['warmup']} warm-up, interleaved round-robin; compile backend "
             f"`{m['backend']}`. Machine: {m['machine']}; torch {m['torch']}.", "",
             "| case | mode | median ms | 95% CI | vs off | ops / fwd+bwd | compile s |", "|---|---|---|---|---|---|---|"]
    by = {(r["case"], r["mode"]): r for r in rep["results"]}
    for r in rep["results"]:
        off = by.get((r["case"], "off"))
        vs = f"{r['median_ms'] / off['median_ms']:.2f}" if off and r["mode"] != "off" else ""
        ops = "" if r["ops"] is None else str(r["ops"])
        cs = f"{r['first_step_s']:.1f}" if r["mode"] == "compile" else ""
        lines.append(f"| {r['case']} | {r['mode']} | {r['median_ms']:.2f} | {r['ci_lo_ms']:.2f}-{r['ci_hi_ms']:.2f} "
                     f"| {vs} | {ops} | {cs} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from adapterkit.bench.shapes import get_shape, make_batch

    p = argparse.ArgumentParser(prog="python -m adapterkit.bench.fusedbench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="single_adapter,single_lora_do0")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--refs", default=",".join(REFS))
    p.add_argument("--shape", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--src", type=int, default=32)
    p.add_argument("--tgt", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--device", default="cpu", help="cpu or cuda (ops are counted on the CPU only)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="autocast dtype")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = get_shape(args.shape)
    batch = make_batch(shape, args.batch, args.src, args.tgt, args.device)
    amp = torch.bfloat16 if args.dtype == "bf16" else None
    modes = [m for m in args.modes.split(",") if m]
    rows = [(c, m) for c in args.cases.split(",") if c for m in modes] + \
        [(c, "off") for c in args.refs.split(",") if c]
    runners = []
    for c, m in rows:
        print(f"fusedbench: building {c} / {m}", file=sys.stderr, flush=True)
        r = _Runner(c, m, shape, batch, args.backend, args.device, amp)
        r.first_step_s = r.step()  # includes the compilation for "compile"
        for _ in range(args.warmup - 1):
            r.step()
        runners.append(r)
    for _ in range(args.steps):
        for r in runners:
            r.times.append(r.step())
    results = []
    for r in runners:
        med, lo, hi = _median_ci(r.times)
        results.append({"case": r.name, "mode": r.mode, "median_ms": med * 1e3, "ci_lo_ms": lo * 1e3,
                        "ci_hi_ms": hi * 1e3, "ops": r.ops, "first_step_s": r.first_step_s,
                        "step_ms": [t * 1e3 for t in r.times]})
    meta = {"shape": shape.name, "device": args.device, "dtype": args.dtype, "batch": args.batch, "src": args.src, "tgt": args.tgt, "steps": args.steps,
            "warmup": args.warmup, "backend": args.backend, "threads": args.threads,
            "machine": (torch.cuda.get_device_name() if args.device.startswith("cuda") else
                        f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s)"), "torch": torch.__version__,
            "command": "python -m adapterkit.bench.fusedbench " + " ".join(argv if argv is not None else sys.argv[1:])}
    rep = {"meta": meta, "results": results}
    md = to_markdown(rep)
    write_outputs(rep, args.out, args.markdown, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
