"""What the adapters do to a FashionVL model before any step: per preset, the losses of the
first training batches (the same batches and seed for every preset) and the largest absolute
output of the LM's attention / FFN output projections (where Houlsby adapters read and add).
A preset whose adapters start as the identity gives frozen_lm's losses exactly.

    python scripts/fashionvl_init_loss.py --presets frozen_lm,single_adapter,single_adapter_zero_init --threads 1

Prints one JSON line per preset. Needs data_cache/fashionvl (``adapterkit demo`` or
``adapterkit compare`` builds it).
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="frozen_lm,single_adapter,single_adapter_zero_init,single_compacter,"
                                         "single_lora,full_finetune")
    ap.add_argument("--data", default="data_cache/fashionvl")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch

    from adapterkit.vl.benchmark import first_batches, scratch_trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    for preset in [p for p in args.presets.split(",") if p]:
        with scratch_trainer(args.data, preset, seed=args.seed) as tr:
            tr.domain.train_mode()
            peak: dict[str, float] = {}

            def record(name, peak=peak):
                def hook(module, inputs, out):
                    peak[name] = max(peak.get(name, 0.0), float(out.detach().abs().max()))
                return hook

            hooks = [m.register_forward_hook(record(n)) for n, m in tr.model.named_modules()
                     if n.endswith(("mlp.down_proj", "self_attn.o_proj", "fc2", "out_proj", "wo", ".o"))]
            losses = []
            with torch.no_grad():
                for task, tid, batch in first_batches(tr, args.seed, args.batches):
                    losses.append({"task": task, "loss": round(float(tr.domain.loss(tr._move(batch), tid)), 4)})
            for h in hooks:
                h.remove()
            top = sorted(peak.items(), key=lambda kv: -kv[1])[:3]
            print(json.dumps({"preset": preset, "seed": args.seed, "losses": losses,
                              "largest_outputs": {k: round(v, 1) for k, v in top}}), flush=True)

if __name__ == "__main__":
    main()
