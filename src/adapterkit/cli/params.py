"""``adapterkit params``: trainable/total parameters of VL-Adapter presets (random init, no weights)."""

from __future__ import annotations

import json

from adapterkit.vl.presets import list_presets

PAPER = {  # VL-Adapter Table 1 (VL-BART, image-text), % trainable, for reference
    "full_finetune": 100.0, "multiple_adapters": 12.22, "half_shared_adapters": 8.36, "single_adapter": 4.18,
    "hyperformer": 5.79, "multiple_compacters": 7.05, "single_compacter": 2.70, "multiple_lora": 17.72,
    "single_lora": 5.93, "multiple_prompts": 4.53, "single_prompt": 2.00,
}
# multiple_lora: the paper prints 17.72; the reference code's own count is 17.714 (30,020,352 / 169,468,416)
PAPER_VIDEO = {"full_finetune": 100.0, "single_adapter": 3.39}  # VL-BART, video-text (the paper's text)


def add_parser(sub):
    p = sub.add_parser("params", help="trainable/total parameters of the VL-Adapter presets")
    p.add_argument("--model", default="vl-bart", choices=["vl-bart", "vl-t5"])
    p.add_argument("--preset", default=None, help="one preset (default: all, as a table)")
    p.add_argument("--setting", default="image", choices=["image", "video"])
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def run(args) -> int:
    from adapterkit.vl.build import count_params

    if args.preset and args.json:
        print(json.dumps(count_params(args.model, args.preset, args.setting)))
        return 0
    names = [args.preset] if args.preset else list_presets()
    rows = {n: count_params(args.model, n, args.setting) for n in names}
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{args.model} ({args.setting} setting: {'2048-d x 36 CLIP RN101' if args.setting == 'image' else '512-d x 64 frames'})")
    paper = (PAPER if args.setting == "image" else PAPER_VIDEO) if args.model == "vl-bart" else None
    show_paper = paper is not None
    head = f"{'preset':<22}{'trainable':>14}{'total':>14}{'%':>8}" + (f"{'paper %':>9}" if show_paper else "")
    print(head)
    print("-" * len(head))
    for n, r in rows.items():
        line = f"{n:<22}{r['trainable']:>14,}{r['total']:>14,}{r['percent']:>8.2f}"
        if show_paper:
            line += f"{paper.get(n, float('nan')):>9.2f}"
        print(line)
    return 0
