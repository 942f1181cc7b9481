"""``adapterkit bench``: time training steps and inference of adapter methods and peers.

Examples::

    adapterkit bench                                   # GPU: BART-base shape; CPU: tiny shape
    adapterkit bench --cases "single_*,hyperformer" --steps 10 --out r.json --markdown r.md
    adapterkit bench --shape custom --d-model 256 --layers 3 --ffn 1024 --heads 4 --vocab 8000
    adapterkit bench --list
"""

from __future__ import annotations

import argparse
import sys

import torch

from adapterkit.cli.argtypes import nonnegative_int, positive_float, positive_int
from adapterkit.errors import AdapterKitError

GPU_DEFAULTS = {"shape": "bart-base", "batch": 64, "src": 128, "tgt": 16, "dtype": "bf16", "steps": 20, "warmup": 5}
CPU_DEFAULTS = {"shape": "tiny", "batch": 8, "src": 32, "tgt": 8, "dtype": "fp32", "steps": 5, "warmup": 2}


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--shape", default=None, help="bart-base | t5-base | tiny | custom (default: bart-base on GPU, tiny on CPU)")
    p.add_argument("--family", choices=["bart", "t5"], default=None, help="custom shape: model family")
    p.add_argument("--d-model", type=positive_int, default=None, help="custom shape: hidden width")
    p.add_argument("--layers", type=positive_int, default=None, help="custom shape: encoder and decoder layers each")
    p.add_argument("--encoder-layers", type=positive_int, default=None)
    p.add_argument("--decoder-layers", type=positive_int, default=None)
    p.add_argument("--ffn", type=positive_int, default=None, help="custom shape: FFN width")
    p.add_argument("--heads", type=positive_int, default=None, help="custom shape: attention heads")
    p.add_argument("--vocab", type=positive_int, default=None, help="custom shape: vocabulary size")
    p.add_argument("--batch", type=positive_int, default=None, help="batch size (GPU 64, CPU 8)")
    p.add_argument("--src", type=positive_int, default=None, help="source tokens (GPU 128, CPU 32)")
    p.add_argument("--tgt", type=positive_int, default=None, help="target tokens (GPU 16, CPU 8)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="autocast dtype (GPU bf16, CPU fp32)")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps per case (GPU 20, CPU 5)")
    p.add_argument("--warmup", type=nonnegative_int, default=None, help="untimed warm-up steps per case (GPU 5, CPU 2)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--cases", default=None,
                   help="comma list of case names, globs (single_*), groups (adapterkit, peft, adapterhub, "
                        "baseline) or kinds (train, infer); references are added automatically")
    p.add_argument("--interleave", action="store_true",
                   help="build all cases first and time them round-robin (steadier on a busy CPU; no memory)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each model (failures reported per case); with --mode graph the compiled "
                        "model's step is captured as the CUDA graph (fused kernels + no host cost; not yet "
                        "measured in docs/benchmarks.md)")
    p.add_argument("--frozen-dtype", choices=["bf16", "fp16"], default=None,
                   help="store every frozen weight in the autocast dtype (adapterkit.cast_frozen), in every case")
    p.add_argument("--mode", choices=["eager", "graph", "both"], default=None,
                   help="eager steps, CUDA-graphed steps (adapterkit.GraphedStep; every case, baselines and "
                        "peers too), or both in one run (default: both on GPU, eager on CPU)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--markdown", default=None, help="write the markdown table here")
    p.add_argument("--profile", type=nonnegative_int, default=0, metavar="N",
                   help="after timing, print the top N ops (torch.profiler) of each adapterkit case")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--serve", action="store_true",
                   help="serving benchmark instead: greedy generation with a different adapter per row on a "
                        "Llama-shaped LM (--d-model, --layers, --heads, --ffn, --vocab, --batch; --src = prompt "
                        "tokens, --tgt = new tokens), against single-adapter, task-by-task and PEFT mixed batches")
    p.add_argument("--serve-tasks", default="1,4,16,64", help="--serve: comma list of task counts per batch")
    p.add_argument("--serve-methods", default="lora,houlsby", help="--serve: comma list (lora, houlsby)")
    p.add_argument("--repeats", type=positive_int, default=3, help="--serve: timed repeats per case (median reported)")
    p.add_argument("--sweep", action="store_true",
                   help="cost against work instead: step time and peak memory of full FT, the frozen floor, "
                        "adapterkit LoRA / bottleneck adapter and PEFT LoRA on Llama-shaped LMs while backbone "
                        "size, batch, sequence length or tasks per mixed batch grow (docs/benchmarks.md, Sweep); "
                        "--batch = the seq axis' batch, --src = the sequence length of the other axes")
    p.add_argument("--sweep-axes", default=None, help="--sweep: comma list of size, batch, seq, tasks (default all)")
    p.add_argument("--sweep-sizes", default=None,
                   help="--sweep: backbones of the size axis (default llama-8m,llama-19m,llama-56m,llama-125m,llama-1b)")
    p.add_argument("--sweep-batch", default=None, help="--sweep: batch sizes (default 1,2,4,8,16,32)")
    p.add_argument("--sweep-seq", default=None, help="--sweep: sequence lengths (default 16,32,64,128,256,512)")
    p.add_argument("--sweep-tasks", default=None, help="--sweep: tasks per mixed batch (default 1,2,4,8,16)")
    p.add_argument("--sweep-shape", default=None, help="--sweep: backbone of the batch, seq and tasks axes "
                                                        "(default llama-small)")
    p.add_argument("--sweep-max-gib", type=positive_float, default=None,
                   help="--sweep: skip a case whose memory estimate exceeds this (default 8)")
    p.add_argument("--sweep-dir", default="bench_sweep",
                   help="--sweep: output folder (sweep.json, sweep.md, sweep_<axis>.png)")
    from adapterkit.bench.efficiency import add_arguments as add_efficiency_arguments

    add_efficiency_arguments(p)
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on an argparse subparsers object."""
    p = subparsers.add_parser("bench", help="benchmark training steps and inference of adapter methods",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _configure(p)
    p.set_defaults(func=run)
    return p


def _resolve(args) -> tuple:
    from adapterkit.bench.runner import Settings
    from adapterkit.bench.shapes import get_shape

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    d = GPU_DEFAULTS if device.startswith("cuda") else CPU_DEFAULTS

    def pick(name):
        v = getattr(args, name)
        return d[name] if v is None else v

    custom = {}
    if pick("shape") == "custom":
        enc = args.encoder_layers if args.encoder_layers is not None else args.layers
        dec = args.decoder_layers if args.decoder_layers is not None else args.layers
        custom = {"family": args.family, "d_model": args.d_model, "encoder_layers": enc, "decoder_layers": dec,
                  "ffn_dim": args.ffn, "heads": args.heads, "vocab_size": args.vocab}
    shape = get_shape(pick("shape"), **custom)
    settings = Settings(device=device, dtype=pick("dtype"), batch=pick("batch"), src=pick("src"), tgt=pick("tgt"),
                        steps=pick("steps"), warmup=pick("warmup"), seed=args.seed, compile=args.compile,
                        frozen_dtype=args.frozen_dtype, mode=args.mode or ("both" if device.startswith("cuda") and not args.compile else "eager"))
    settings.validate()
    return shape, settings


def run(args) -> int:
    """Run the benchmark; prints the markdown table; returns the exit status."""
    from adapterkit.bench.cases import CASES, select_cases
    from adapterkit.bench.report import to_markdown, write_outputs
    from adapterkit.bench.runner import run_bench

    if args.serve:
        return _run_serve(args)
    if args.sweep:
        from adapterkit.bench.sweep import run_from_args

        return run_from_args(args)
    if args.efficiency:
        from adapterkit.bench.efficiency import run_from_args as run_efficiency

        return run_efficiency(args)
    if args.list:
        for c in CASES:
            print(f"{c.name:<32} {c.kind:<6} {c.group:<11} {c.title}")
        return 0
    try:
        from adapterkit.bench.report import set_threads

        set_threads(args.threads)
        shape, settings = _resolve(args)
        cases = select_cases(args.cases)
        print(f"adapterkit bench: {len(cases)} cases, shape {shape.name}, {settings.device}, {settings.dtype}",
              file=sys.stderr)
        report = run_bench(shape, settings, cases, log=lambda s: print(s, file=sys.stderr, flush=True),
                           interleave=args.interleave)
        md = to_markdown(report)
        write_outputs(report, args.out, args.markdown, md)
        print(md)
        if args.profile:
            _profile(cases, shape, settings, args.profile)
    except AdapterKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [r["case"] for r in report["results"] if r["status"] == "error"]
    if failed:
        print(f"{len(failed)} case(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed and len(failed) == len(report["results"]) else 0


def _run_serve(args) -> int:
    from adapterkit.bench.report import set_threads, write_outputs
    from adapterkit.bench.serving import ServeSettings, serve_bench, to_markdown

    try:
        set_threads(args.threads)  # --threads 0 is an error here as in every bench command
        kw = {"hidden": args.d_model, "layers": args.layers, "heads": args.heads, "ffn": args.ffn,
              "vocab": args.vocab, "batch": args.batch, "prompt": args.src, "new_tokens": args.tgt}
        try:
            tasks = [int(x) for x in args.serve_tasks.split(",") if x.strip()]
        except ValueError:
            raise AdapterKitError(f"--serve-tasks must be a comma list of integers, got {args.serve_tasks!r}") from None
        s = ServeSettings(**{k: v for k, v in kw.items() if v is not None}, tasks=tasks,
                          methods=[m.strip() for m in args.serve_methods.split(",") if m.strip()],
                          repeats=args.repeats, seed=args.seed,
                          device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        report = serve_bench(s, log=lambda x: print(x, file=sys.stderr, flush=True))
        md = to_markdown(report)
        write_outputs(report, args.out, args.markdown, md)
        print(md)
    except AdapterKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _profile(cases, shape, settings, top: int) -> None:
    from adapterkit.bench.profile import profile_case
    from adapterkit.bench.shapes import make_batch

    batch = make_batch(shape, settings.batch, settings.src, settings.tgt, settings.device, seed=settings.seed)
    for c in cases:
        if c.group not in ("adapterkit", "baseline"):
            continue
        print(f"\n#### profile: {c.name}\n")
        try:
            print(profile_case(c, shape, settings, batch, row_limit=top))
        except Exception as e:  # profiling is diagnostic: report and go on
            print(f"profile failed: {type(e).__name__}: {e}")


def main(argv: list[str] | None = None) -> int:
    p = _configure(argparse.ArgumentParser(prog="adapterkit bench", description=__doc__,
                                           formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
