"""How fast N training processes share one GPU, measured on a stand-in for the FashionVL model.

A random-init model of SmolLM2-135M's shape (the real weights need not be on the machine yet),
N processes at once, each: bf16-autocast training steps of full fine-tuning (AdamW over every
weight: the heaviest preset) on (batch, seq) token batches, then greedy generation of new tokens
for a batch of prompts. All processes start each phase together (a barrier), so the times are
those of N runs sharing the device, as a ``compare --jobs N`` would. Prints and writes JSON:
the median per-process seconds per training step and per generated token-step.

    python3 scripts/gpu_vl_probe.py --procs 24 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time


def _worker(rank, args, barrier, queue):
    try:
        _measure(rank, args, barrier, queue)
    except BaseException as e:  # reported, and the barrier broken: the others stop waiting for this one
        queue.put({"rank": rank, "error": f"{type(e).__name__}: {e}"})
        barrier.abort()


def _measure(rank, args, barrier, queue):
    import torch
    import transformers as tf

    torch.manual_seed(rank)
    cfg = tf.LlamaConfig(vocab_size=49160, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)
    dev = torch.device(args.device)
    with torch.device(dev):  # initialised on the device: 24 CPU inits would cost more than the probe
        model = tf.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 49152, (args.batch, args.seq), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync()
    barrier.wait(timeout=args.timeout)
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    step_s = (time.perf_counter() - t) / args.steps
    queue.put({"rank": rank, "step_s": step_s})  # kept even if the generation below fails
    model.eval()
    prompts = torch.randint(0, 49152, (args.gen_batch, args.prompt), device=dev)
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        model.generate(prompts, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        sync()
        barrier.wait(timeout=args.timeout)
        t = time.perf_counter()
        model.generate(prompts, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                       pad_token_id=0)
        sync()
    token_s = (time.perf_counter() - t) / args.new_tokens
    queue.put({"rank": rank, "gen_token_step_s": token_s,
               "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=24)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=72, help="tokens per training example (prefix + text + target)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--gen-batch", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cuda (cpu: a check of this script)")
    ap.add_argument("--layers", type=int, default=30, help="SmolLM2-135M has 30 (fewer: a check of this script)")
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds for the whole probe")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(args.procs), ctx.Queue()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_worker, args=(r, args, barrier, queue)) for r in range(args.procs)]
    for p in procs:
        p.start()
    got: dict[int, dict] = {}
    errors = []
    deadline = time.perf_counter() + args.timeout
    while len(errors) + sum("gen_token_step_s" in r for r in got.values()) < args.procs:
        try:
            m = queue.get(timeout=max(1.0, deadline - time.perf_counter()))
        except Exception:  # queue.Empty: some process neither finished nor failed in time
            errors.append(f"timed out after {args.timeout:.0f} s")
            break
        if "error" in m:
            errors.append(f"process {m['rank']}: {m['error']}")
        else:
            got.setdefault(m["rank"], {"rank": m["rank"]}).update(m)
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
    rows = list(got.values())
    steps = [r["step_s"] for r in rows if "step_s" in r]
    gens = [r["gen_token_step_s"] for r in rows if "gen_token_step_s" in r]
    res = {"procs": args.procs, "batch": args.batch, "seq": args.seq, "gen_batch": args.gen_batch,
           "processes_measured": len(steps), "errors": sorted(set(errors)),
           "step_s": statistics.median(steps) if steps else None, "step_s_max": max(steps) if steps else None,
           "gen_token_step_s": statistics.median(gens) if gens else None,
           "max_memory_gib": max((r.get("max_memory_gib") or 0) for r in rows) if rows else None,
           "wall_s": time.perf_counter() - t0, "per_process": sorted(rows, key=lambda r: r["rank"])}
    print(json.dumps({k: v for k, v in res.items() if k != "per_process"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    if errors or not steps:
        raise SystemExit("probe incomplete: " + "; ".join(sorted(set(errors))))


if __name__ == "__main__":
    main()
