"""Peak memory of a LoRA training step on a Llama-shaped causal LM (random init from a
config, nothing downloaded), adapterkit against PEFT, in one process on the CPU.

    python -m adapterkit.bench.memory [--hidden 768 --layers 8 --heads 12 --ffn 2048 --vocab 32000]
        [--batch 2 --seq 256 --r 16 --alpha 32] [--cases LIST] [--out r.json] [--markdown r.md]

Every case builds the same model (same seed), adds LoRA (r, alpha, q/v, dropout 0) and runs
one warm-up step (forward with labels, backward, AdamW step, ``zero_grad(set_to_none=True)``:
the optimizer state exists afterwards), then one step under ``torch.profiler`` with
``profile_memory`` (its wall time is reported too). **Peak** = the bytes of every tensor alive when the
step starts (weights, optimizer state) + the highest rise of the allocator's live bytes during
the step (the profiler's allocation and free events summed in time order: activations,
gradients, temporaries). These are allocator bytes, not RSS (RSS keeps freed pages cached
and is shared by the cases of one process).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import platform
import sys
import time

import torch

from adapterkit.bench.report import write_outputs

CASES = {
    "full_ft": "full fine-tuning (fp32, reference)",
    "ours_fp32": "adapterkit LoRA, fp32 weights",
    "peft_fp32": "PEFT LoRA, fp32 weights",
    "ours_bf16_frozen": "adapterkit LoRA, frozen weights bf16 (cast_frozen), bf16 autocast",
    "peft_bf16_base": "PEFT LoRA, base model in bf16 (LoRA fp32 by PEFT's autocast_adapter_dtype), bf16 autocast",
    "ours_int8_frozen": "adapterkit LoRA, frozen Linear weights int8 (quantize_frozen), fp32 compute",
    "ours_fp32_ckpt": "adapterkit LoRA, fp32, activation checkpointing (enable_activation_checkpointing)",
    "peft_fp32_ckpt": "PEFT LoRA, fp32, HF gradient checkpointing (non-reentrant)",
    "ours_int8_ckpt": "adapterkit LoRA, int8 frozen weights + activation checkpointing",
}


# PEFT's case set up alike (same weights dtype / checkpointing); PEFT has no int8 path without
# bitsandbytes, so the int8 cases are set against PEFT's fp32 ones of the same checkpointing
PEFT_ALIKE = {"ours_fp32": "peft_fp32", "ours_bf16_frozen": "peft_bf16_base", "ours_int8_frozen": "peft_fp32",
              "ours_fp32_ckpt": "peft_fp32_ckpt", "ours_int8_ckpt": "peft_fp32_ckpt"}

_TEMPLATE: dict = {}


def build(args):
    """The model of every case: built (random init, slow at 100M parameters) once, then copied."""
    key = tuple(sorted(vars(args).items()))
    if key not in _TEMPLATE:
        _TEMPLATE.clear()
        _TEMPLATE[key] = _build(args)
    return copy.deepcopy(_TEMPLATE[key])


def _build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=max(args.seq, 64), tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


def prepare(case: str, args):
    """(model, amp dtype or None, note) for a case."""
    import adapterkit

    model = build(args)
    amp = None
    if case == "full_ft":
        return model, amp
    if case.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        if case == "peft_bf16_base":
            model = model.to(torch.bfloat16)
            amp = torch.bfloat16
        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]))
        if case.endswith("ckpt"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, amp
    adapterkit.add_adapters(model, {"method": "lora", "r": args.r, "alpha": args.alpha, "dropout": 0.0,
                                    "targets": ["q", "v"], "train_layernorms": False})
    if case == "ours_bf16_frozen":
        adapterkit.cast_frozen(model, torch.bfloat16)
        amp = torch.bfloat16
    if "int8" in case:
        adapterkit.quantize_frozen(model)
    if case.endswith("ckpt"):
        adapterkit.enable_activation_checkpointing(model)
    return model, amp


def _live_bytes(model, opt) -> int:
    """Bytes of the distinct storages of the model's parameters, buffers, grads and the optimizer state."""
    seen, n = set(), 0

    def add(t):
        nonlocal n
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                n += s.nbytes()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
        add(t.grad)
    for st in opt.state.values():
        for v in st.values():
            add(v)
    return n


def _peak_rise(prof) -> int:
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def run_case(case: str, args, batch) -> dict:
    from adapterkit.core.quant import frozen_weight_bytes

    rec = {"case": case, "what": CASES[case]}
    model, amp = prepare(case, args)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    rec["trainable"] = sum(p.numel() for p in params)
    rec["frozen_weight_mib"] = frozen_weight_bytes(model) / 2**20

    def step():
        ctx = torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
        with ctx:
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step()  # warm-up: the optimizer state exists from here on
    gc.collect()
    base = _live_bytes(model, opt)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        rec["loss"] = step()
    rec["step_s"] = time.perf_counter() - t0  # under the profiler (a few % more than a plain step)
    rise = _peak_rise(prof)
    rec.update(resident_mib=base / 2**20, rise_mib=rise / 2**20, peak_mib=(base + rise) / 2**20)
    return rec


def to_markdown(rep: dict) -> str:
    m = rep["meta"]
    lines = [f"Llama shape: hidden {m['hidden']}, {m['layers']} layers, FFN {m['ffn']}, {m['heads']} heads, "
             f"vocabulary {m['vocab']} ({m['params'] / 1e6:.1f}M parameters, random init); batch {m['batch']} x "
             f"{m['seq']} tokens; LoRA r {m['r']}, alpha {m['alpha']}, q/v, dropout 0; one CPU thread.",
             f"Command: `{m['command']}`" if m.get("command") else "",
             f"Machine: {m['machine']}; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}.",
             "Memory: allocator bytes (torch.profiler memory events), not RSS: resident = weights + optimizer "
             "state alive when the step starts; rise = highest growth during the step (activations, gradients, "
             "temporaries); peak = resident + rise.", "",
             "`vs PEFT alike`: against PEFT's case with the same weights dtype and checkpointing (the int8 "
             "cases against PEFT fp32, which has no int8 path without bitsandbytes).", "",
             "| case | what | trainable | frozen weights MiB | resident MiB | rise MiB | peak MiB | peak vs PEFT fp32 "
             "| peak vs PEFT alike | step s |", "|---|---|---|---|---|---|---|---|---|---|"]
    by = {r["case"]: r for r in rep["results"] if "error" not in r}

    def ratio(r, peer):
        ref = by.get(peer, {}).get("peak_mib")
        return f"{r['peak_mib'] / ref:.2f} ({peer})" if ref else "n/a"

    for r in rep["results"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['what']} | error: {r['error']} | | | | | | | |")
            continue
        alike = ratio(r, PEFT_ALIKE[r["case"]]) if r["case"] in PEFT_ALIKE else ""
        lines.append(f"| {r['case']} | {r['what']} | {r['trainable']:,} | {r['frozen_weight_mib']:.0f} | "
                     f"{r['resident_mib']:.0f} | {r['rise_mib']:.0f} | {r['peak_mib']:.0f} | "
                     f"{ratio(r, 'peft_fp32').split(' ')[0]} | {alike} | {r['step_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m adapterkit.bench.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--out", default=None)
    p.add_argument("--markdown", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad:
        print(f"error: unknown case(s) {bad}; known: {list(CASES)}", file=sys.stderr)
        return 2
    import transformers

    try:
        import peft
        peft_v = peft.__version__
    except ImportError:
        peft_v = "not installed"
    params = sum(t.numel() for t in build(args).parameters())
    meta = {**{k: getattr(args, k) for k in ("hidden", "layers", "heads", "ffn", "vocab", "batch", "seq", "r",
                                             "alpha", "seed", "threads")},
            "params": params, "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s)",
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft_v,
            "command": "python -m adapterkit.bench.memory " + " ".join(argv if argv is not None else sys.argv[1:])}
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    results = []
    for c in cases:
        print(f"memory bench: {c}", file=sys.stderr, flush=True)
        try:
            results.append(run_case(c, args, batch))
        except Exception as e:  # a missing peer or a failing case is reported, the run goes on
            results.append({"case": c, "what": CASES[c], "error": f"{type(e).__name__}: {e}"[:300]})
        gc.collect()  # the case's model and optimizer went out of scope with run_case
        print(f"  {results[-1]}", file=sys.stderr, flush=True)
    rep = {"meta": meta, "results": results}
    md = to_markdown(rep)
    write_outputs(rep, args.out, args.markdown, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
