"""The CPU kernels behind a FashionVL step, each beside its alternative, at SmolLM2-135M's shapes
(one thread unless --threads): what made the bf16 compare fit in about two hours.

    python scripts/cpu_kernels_bench.py [--threads 1] [--json out.json]

1. a linear layer (448 x 576 @ 576 x 1536): fp32 against bf16 (AMX / AVX-512 BF16 where the CPU
   has them; emulated, and slow, where it does not);
2. the LM head (49,252 x 576) on the last position of a (32, 13, 576) batch: the strided slice HF
   passes against the same rows made contiguous (``core/hf.contiguous_lm_heads``);
3. attention forward + backward of one layer of a training batch (16 x 9 heads x 33 tokens x 64,
   causal): bf16 against the inputs cast to fp32 (``core/fp32_attention``);
4. one AdamW step over 108M fp32 weights (full fine-tuning): torch's default loop against the
   fused kernel (the engine's choice on the CPU).

Prints one line per kernel (milliseconds, best of a few repeats, and the ratio).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def best_ms(fn, repeats: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the timings here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []

    def row(name, a_label, a_ms, b_label, b_ms, **extra):
        rows.append({"kernel": name, a_label: round(a_ms, 3), b_label: round(b_ms, 3),
                     "ratio": round(a_ms / b_ms, 2), **extra})
        print(f"{name:<34} {a_label} {a_ms:9.2f} ms   {b_label} {b_ms:9.2f} ms   x{a_ms / b_ms:.1f}", flush=True)

    # 1. a linear layer
    ms = {}
    for dt in (torch.float32, torch.bfloat16):
        x, w = torch.randn(448, 576, dtype=dt), torch.randn(1536, 576, dtype=dt)
        ms[dt] = best_ms(lambda x=x, w=w: F.linear(x, w), repeats=20)
    gflop = 2 * 448 * 576 * 1536 / 1e9
    row("linear 448x576 @ 576x1536", "fp32", ms[torch.float32], "bf16", ms[torch.bfloat16],
        gflops_fp32=round(gflop / ms[torch.float32] * 1000), gflops_bf16=round(gflop / ms[torch.bfloat16] * 1000))

    # 2. the LM head on the strided last position
    for dt, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        w = torch.randn(49252, 576, dtype=dt)
        last = torch.randn(32, 13, 576, dtype=dt)[:, -1:, :]
        row(f"LM head, last position, {label}", "strided", best_ms(lambda last=last, w=w: F.linear(last, w), repeats=2, warmup=1),
            "contiguous", best_ms(lambda last=last, w=w: F.linear(last.contiguous(), w)))

    # 3. attention forward + backward, bf16 inputs
    q, k, v = (torch.randn(16, 9, 33, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def native():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    def upcast():
        F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(torch.bfloat16).sum().backward()

    row("attention fwd+bwd, bf16 inputs", "bf16", best_ms(native), "fp32", best_ms(upcast))

    # 4. AdamW over 108M weights
    params = [torch.nn.Parameter(torch.randn(1536, 576)) for _ in range(90)] + [torch.nn.Parameter(torch.randn(49152, 576))]
    for p in params:
        p.grad = torch.randn_like(p)
    loop = torch.optim.AdamW(params, lr=1e-4)
    fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    row("AdamW step, 108M fp32 weights", "loop", best_ms(loop.step, repeats=3, warmup=1),
        "fused", best_ms(fused.step, repeats=3, warmup=1))

    if args.json:
        from adapterkit.safeio import atomic_write_json

        atomic_write_json(args.json, {"threads": torch.get_num_threads(), "torch": torch.__version__,
                                      "cpu_capability": torch.backends.cpu.get_cpu_capability(), "kernels": rows})


if __name__ == "__main__":
    main()
