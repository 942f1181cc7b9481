"""How far a bf16 FashionVL step is from the fp32 one, per preset: the same model (same seed,
same initial weights) and the same batches, once in fp32 and once as ``--bf16`` trains it
(frozen weights stored in bf16, bf16 autocast), no optimizer step; for each batch the loss
difference and, over the trainable parameters, the cosine and the relative error of the
bf16 gradient against the fp32 one (per group: adapter weights, norms, the visual
projection, the rest).

    python scripts/bf16_drift.py --presets single_adapter,single_compacter --batches 4 --threads 1

Prints one JSON line per preset. Needs data_cache/fashionvl (``adapterkit demo`` or
``adapterkit compare`` builds it).
"""

from __future__ import annotations

import argparse
import json


def _group(name: str) -> str:
    if name.startswith("visual."):
        return "visual"
    if "norm" in name:
        return "norm"
    if "adapter" in name or "lora" in name or "prompt" in name or "phm" in name:
        return "adapter"
    return "other"


def _grads(tr, batches):
    """Per batch: (loss, {param name: grad}) of the trainer's model, without a step."""
    out = []
    for _, tid, batch in batches:
        tr.model.zero_grad(set_to_none=True)
        with tr._amp():
            loss = tr.domain.loss(tr._move(batch), tid).float()
        loss.backward()
        out.append((float(loss.detach()), {n: p.grad.detach().float().clone() for n, p in tr.model.named_parameters()
                                  if p.requires_grad and p.grad is not None}))
    return out


def _patch_fp32_add() -> None:
    """A probe, not the library's behaviour: under autocast, ``res + adapter(x)`` in fp32."""
    import torch

    from adapterkit.methods.bottleneck import Bottleneck

    orig = Bottleneck.residual

    def residual(self, x, res, task, mode="eager", backend="inductor"):
        if res is not None and res.dtype != torch.float32 and torch.is_autocast_enabled(res.device.type):
            return res.float() + orig(self, x, None, task, mode, backend)
        return orig(self, x, res, task, mode, backend)

    Bottleneck.residual = residual


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="single_adapter,single_compacter,single_lora,full_finetune")
    ap.add_argument("--data", default="data_cache/fashionvl")
    ap.add_argument("--batches", type=int, default=4, help="batches, one task after another")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--modes", default="fp32,bf16",
                    help="the reference and the compared run (fp32,fp32: the harness's own noise, zero)")
    ap.add_argument("--fp32-adapter-add", action="store_true",
                    help="bf16 runs add the bottleneck adapter's output to an fp32 copy of the sublayer output")
    args = ap.parse_args()
    ref, other = args.modes.split(",")
    if args.fp32_adapter_add:
        _patch_fp32_add()

    import torch

    from adapterkit.vl.benchmark import first_batches, scratch_trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    for preset in [p for p in args.presets.split(",") if p]:
        res = []
        for mode in (ref, other):
            with scratch_trainer(args.data, preset, seed=args.seed, bf16=mode == "bf16") as tr:
                tr.domain.train_mode()
                res.append(_grads(tr, first_batches(tr, args.seed, args.batches)))
        rows = []
        for (l32, g32), (l16, g16) in zip(*res):
            groups: dict[str, list[tuple]] = {}
            for n, g in g32.items():
                groups.setdefault(_group(n), []).append((g.flatten(), g16[n].flatten()))
            row = {"loss_fp32": round(l32, 5), "loss_diff": round(l16 - l32, 5)}
            for k, pairs in sorted(groups.items()):
                a = torch.cat([p[0] for p in pairs]).double()
                b = torch.cat([p[1] for p in pairs]).double()
                row[f"{k}_cos"] = round(float(torch.nn.functional.cosine_similarity(a, b, dim=0)), 4)
                row[f"{k}_relerr"] = round(float((b - a).norm() / a.norm().clamp_min(1e-30)), 4)
            rows.append(row)
        print(json.dumps({"preset": preset, "modes": [ref, other], "fp32_adapter_add": args.fp32_adapter_add,
                          "batches": rows}), flush=True)


if __name__ == "__main__":
    main()
