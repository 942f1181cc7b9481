"""``adapterkit train CONFIG --output DIR`` and ``adapterkit eval CONFIG --checkpoint DIR``.

``adapterkit train CONFIG --dry-run`` prints the plan (tasks, examples, batch sizes,
steps, learning rate, trainable parameters) without training; ``--preset NAME`` trains
another preset with the same config (one config per paper table, one command per method).
"""

from __future__ import annotations

import json
import math

from adapterkit.cli.argtypes import positive_int

DOMAINS_HELP = """domains (the config's `domain:` key; docs/config.md lists every key of each):
  vl      VL-BART / VL-T5 multi-task V&L (the keys below); data ROOT/<task>/<split>.jsonl + a feature store
  text    any HF model: classification (a head per task) or generation; data ROOT/<task>/<split>.jsonl|csv
          rows {"text": ..., "label": ...} or {"text": ..., "target": ...}; sections model/adapters|preset/data/train/eval
  vision  image classification (AdaptFormer, VPT, LoRA, linear probe ...): the vision pipeline's config
  audio   audio classification (PETL-AST methods on AST / Whisper encoders): the audio pipeline's config
  rec     Adapter4Rec transferable recommendation (source pre-training, target adaptation)"""


def add_parser(sub):
    import argparse
    import sys

    epilog = None
    if any(a in ("-h", "--help") for a in sys.argv[1:]) and "train" in sys.argv[1:]:  # built only when shown
        from adapterkit.train.config import config_help_text

        epilog = (DOMAINS_HELP + "\n\n" + config_help_text())
    t = sub.add_parser("train", help="multi-task training from a config file (resumes in the same --output)",
                       description="Train any domain from a config file; the config's `domain:` key picks it "
                                   "(vl, the default; text; vision; audio; rec). Rerun the same command to resume.",
                       epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config")
    t.add_argument("--output", default=None, help="the run directory (required unless --dry-run)")
    t.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps (> 0)")
    t.add_argument("--allow-changes", default="", metavar="KEY[,KEY]",
                   help="resume although these keys differ from the checkpoint's run config "
                        "(only train.max_steps, train.epochs); any other difference is refused")
    t.add_argument("--preset", default=None,
                   help="train this preset instead of the config's (with --dry-run: 'all' lists every preset)")
    t.add_argument("--dry-run", action="store_true",
                   help="print the plan (tasks, examples, steps per epoch, batch sizes, learning rate, "
                        "trainable %%) and exit without training")
    t.set_defaults(_run=run_train)
    e = sub.add_parser("eval", help="evaluate a trained run (its best checkpoint) on the test split")
    e.add_argument("config")
    e.add_argument("--checkpoint", required=True, help="the --output directory of a training run")
    e.add_argument("--split", default="test")
    e.set_defaults(_run=run_eval)
    return [t, e]


def _print_results(res):
    for task, m in res["test"].items():
        shown = []
        for k, v in m.items():
            if k.startswith("_") or k.endswith("_ci95"):
                continue
            iv = m.get(f"{k}_ci95")
            shown.append(f"{k} {v:.2f}" + (f" [{iv[0]:.1f}, {iv[1]:.1f}]" if isinstance(iv, list) else "")
                         if isinstance(v, float) else f"{k} {v}")
        print(f"  {task:<10}" + "  ".join(shown))
    print(f"  trainable {res['trainable']:,} / {res['total']:,} ({res['percent']:.2f}%)")


def _load(args):
    from adapterkit.train.config import load_config

    cfg = load_config(args.config)
    if args.preset and args.preset != "all":
        cfg.preset, cfg.adapters = args.preset, None
        cfg.validate()
    return cfg


def generate_data(cfg) -> None:
    """``data.generate: tiny_fixture``: build the tiny V&L data set at ``data.root`` if it is
    missing (rank 0 of a distributed run; the others wait for it)."""
    if cfg.data.generate != "tiny_fixture":
        return
    from pathlib import Path

    from adapterkit.engine import distributed as d

    d.init_distributed()
    if d.is_main() and not Path(cfg.data.root).exists():
        from adapterkit.testing.fixtures import make_vl_fixture

        make_vl_fixture(cfg.data.root, feat_dim=cfg.model.feat_dim)
    d.barrier()


def run_train(args) -> int:
    from adapterkit.errors import ConfigError

    if args.dry_run:
        return run_dry(args)
    if args.output is None:
        raise ConfigError("--output DIR is required (the run directory), unless --dry-run")
    if args.preset == "all":
        raise ConfigError("--preset all only goes with --dry-run; train one preset per --output")
    import sys

    from adapterkit.engine import engine as eng
    from adapterkit.engine.registry import domain_module, domain_of

    domain = domain_of(args.config)
    if domain == "vl":
        from adapterkit.train import trainer as tr

        allow = tr.check_allow_changes(args.allow_changes)
        cfg = _load(args)
        generate_data(cfg)
        build = tr.build_engine
    else:
        allow = eng.check_allow_changes(args.allow_changes)
        mod = domain_module(domain)
        if hasattr(mod, "run_training"):  # a pipeline with its own config format / stages
            if args.preset:
                raise ConfigError(f"--preset goes with V&L and text configs, not domain {domain!r}")
            with eng.lock_output(args.output):
                try:
                    res = mod.run_training(args.config, args.output, max_steps=args.max_steps, allow_changes=allow)
                except eng.TrainingInterrupted as e:
                    print(f"adapterkit train: {e}", file=sys.stderr)
                    return e.exit_code
            from adapterkit.engine.distributed import is_main

            if is_main():
                shown = {k: v for k, v in res.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
                print(f"results: {args.output}/results.json")
                print(json.dumps(shown, indent=1))
            return 0
        cfg = mod.load_config(args.config)
        if args.preset:
            cfg.preset, cfg.adapters = args.preset, None
            cfg.validate()
        build = mod.build_engine
    # the run lock before building anything: a second run on this output refuses at once;
    # SIGTERM / SIGINT: the step finishes, a checkpoint is written, exit 143 / 130
    with eng.lock_output(args.output):
        engine = build(cfg, args.output, max_steps=args.max_steps, allow_changes=allow)
        try:
            res = engine.fit()
        except eng.TrainingInterrupted as e:
            print(f"adapterkit train: {e}", file=sys.stderr)
            return e.exit_code
    from adapterkit.engine.distributed import is_main

    if is_main():
        print(f"results: {args.output}/results.json ({res['checkpoint']})")
        _print_results(res)
    return 0


def run_eval(args) -> int:
    from pathlib import Path

    from adapterkit.errors import CheckpointError
    from adapterkit.train.trainer import Trainer

    run_dir = Path(args.checkpoint)
    which = next((n for n in ("best", "final") if (run_dir / n / "trainable.safetensors").exists()), None)
    if which is None:
        raise CheckpointError(f"no trained run in {run_dir} (expected best/ or final/trainable.safetensors)")
    trainer = Trainer(args.config, run_dir)
    trainer._load_best(which)
    trainer.cfg.eval.select_on = "last"  # evaluate the weights just loaded
    trainer.cfg.data.test_split = {"val": trainer.cfg.data.val_split, "test": trainer.cfg.data.test_split}.get(
        args.split, args.split)
    res = trainer.test()
    print(json.dumps({t: {k: round(v, 2) for k, v in m.items()} for t, m in res["test"].items()}))
    return 0


def run_dry_engine(args, domain: str) -> int:
    """The plan of an engine domain's config: the engine is built (data read, model loaded,
    adapters attached) in a scratch folder and nothing trains."""
    import tempfile

    from adapterkit.engine.registry import domain_module

    mod = domain_module(domain)
    if not hasattr(mod, "build_engine") or hasattr(mod, "run_training"):
        from adapterkit.errors import ConfigError

        raise ConfigError(f"--dry-run plans vl, text and asr configs; a {domain} config: run it with --max-steps 1 "
                          "into a scratch --output")
    cfg = mod.load_config(args.config)
    if args.preset and args.preset != "all":
        cfg.preset, cfg.adapters = args.preset, None
        cfg.validate()
    with tempfile.TemporaryDirectory(prefix="adapterkit-plan-") as tmp:
        from adapterkit.engine import Engine

        eng = mod.build_engine(cfg, tmp, max_steps=args.max_steps)
        if not isinstance(eng, Engine):  # a pipeline of stages (rec) builds each stage's engine as it runs
            from adapterkit.errors import ConfigError

            raise ConfigError(f"--dry-run cannot plan a {domain} run (its stages are built as they run): run it "
                              "with --max-steps 1 into a scratch --output")
        _print_engine_plan(eng, domain)
    return 0


def _print_engine_plan(e, title: str) -> None:
    import adapterkit

    rep = adapterkit.trainable_report(e.model)
    print(f"plan ({title}): {len(e.tasks)} task(s), {e.steps_per_epoch} steps per epoch, {e.total_steps} steps, "
          f"lr {e.lr:g}")
    for t in e.tasks:
        print(f"  {t:<12} {e.domain.num_train(t):>7} train examples  batch {e.batch_sizes[t]:>4}  "
              f"{e.num_batches[t]:>5} batches per epoch")
    print(f"  trainable {rep['trainable']:,} / {rep['total']:,} ({rep['percent']:.2f}%)")


def run(args) -> int:  # pragma: no cover - dispatch is per sub-command
    return args._run(args)


# --- the dry run --------------------------------------------------------------------------------

def _read_split(cfg, task, split):
    """The examples the trainer reads for (task, split): data.sources or root/<task>/<split>.jsonl."""
    from pathlib import Path

    from adapterkit.vl.datasets import read_examples_jsonl, read_source

    src = cfg.data.sources.get(task)
    if src is not None:
        return read_source(task, src, split)
    return read_examples_jsonl(Path(cfg.data.root) / task / f"{split}.jsonl")


def _where(cfg, task, split) -> str:
    src = cfg.data.sources.get(task)
    if src is None:
        return f"{cfg.data.root}/{task}/{split}.jsonl"
    return f"{src['path']} [{(src.get('splits') or {}).get(split, split)}]"


def _corpus(cfg, read) -> list[str]:
    """The text a tiny word-level tokenizer is built from (as the trainer builds it)."""
    from adapterkit.vl.data import PREFIXES

    lines = []
    for t in cfg.data.tasks:
        for s in {cfg.data.train_split, cfg.data.val_split, cfg.data.test_split}:
            exs = read(t, s)
            for ex in exs or []:
                lines.append(ex.text)
                lines.extend(ex.targets)
                lines.extend(ex.choices or [])
    return lines + list(PREFIXES.values()) + ["answer :", "true", "false"]


def _trainable(cfg, preset: dict, corpus) -> dict:
    """trainable / total / percent of `preset` on the config's backbone, built without weights
    (meta device) where the backbone allows it; {"error": why} when it cannot be built offline."""
    import adapterkit
    from adapterkit.errors import AdapterKitError
    from adapterkit.vl.build import build_vl_model

    m = cfg.model
    spec = {"backbone": m.backbone, "feat_dim": m.feat_dim, "n_images": m.n_images, "init_seed": m.init_seed}
    if m.backbone.startswith("tiny-"):
        spec.update(device="cpu", corpus=corpus())
    elif m.backbone != "smollm2":
        spec.update(random_init=True, device="meta")
        if m.lm:
            spec["lm"] = m.lm
    try:
        model, _ = build_vl_model(spec, preset, cfg.data.tasks)
    except (AdapterKitError, OSError, ValueError) as e:
        return {"error": str(e).splitlines()[0]}
    return adapterkit.trainable_report(model)


def training_plan(cfg, world: int = 1, presets: list[str] | None = None) -> dict:
    """What ``adapterkit train`` would do with `cfg`, computed from the config and the dataset
    readers as the trainer computes it: per task the training examples (captions: one per
    reference caption), the batch size (``round(batch_size * task_batch_scale) * world``) and
    batches per epoch; the schedule (steps, warm-up), the learning rate (``train.lr``, else the
    preset's ``lr`` / ``video_lr``), the trainable parameters, and which weights are reported.
    `presets` adds the learning rate and trainable parameters of each named preset. A training
    split that cannot be read is listed in ``plan["missing"]`` (its counts and the step totals are
    then None) instead of stopping the plan."""
    from adapterkit.errors import DataError
    from adapterkit.vl.data import CAPTION_TASKS
    from adapterkit.vl.presets import get_preset

    generate_data(cfg)
    cache: dict = {}
    errors: dict = {}

    def read(task, split):
        if (task, split) not in cache:
            try:
                cache[(task, split)] = _read_split(cfg, task, split)
            except DataError as e:
                cache[(task, split)], errors[(task, split)] = None, str(e)
        return cache[(task, split)]

    tr = cfg.train
    tasks = {}
    missing = []
    for t in cfg.data.tasks:
        exs = read(t, cfg.data.train_split)
        bs = max(1, round(tr.batch_size * tr.task_batch_scale.get(t, 1.0))) * world
        row = {"examples": None, "batch_size": bs, "steps_per_epoch": None,
               "train_from": _where(cfg, t, cfg.data.train_split)}
        if exs is None:
            missing.append(f"{t}/{cfg.data.train_split}: {errors[(t, cfg.data.train_split)]}")
        else:
            if cfg.data.max_train_examples:
                exs = exs[: cfg.data.max_train_examples]
            n = sum(len(e.targets) for e in exs) if t in CAPTION_TASKS else len(exs)
            row.update(examples=n, steps_per_epoch=math.ceil(n / bs))
        for name, split in (("val", cfg.data.val_split), ("test", cfg.data.test_split)):
            ev = read(t, split)
            if ev is not None and cfg.data.max_eval_examples:
                ev = ev[: cfg.data.max_eval_examples]
            row[name] = None if ev is None else len(ev)
            row[f"{name}_from"] = _where(cfg, t, split)
        tasks[t] = row
    spe = total = None
    if not missing:
        spe = sum(r["steps_per_epoch"] for r in tasks.values())
        total = spe * tr.epochs
        if tr.max_steps:
            total = min(total, tr.max_steps)
    preset = cfg.preset_dict()

    def lr_of(p):
        return tr.lr or (p.get("video_lr") if tr.video else p.get("lr")) or 1e-3

    lr_source = "train.lr" if tr.lr else (f"preset {'video_lr' if tr.video else 'lr'}")
    plan = {
        "name": cfg.name,
        "preset": preset.get("name"),
        "backbone": cfg.model.backbone + (f" ({cfg.model.lm})" if cfg.model.lm else ""),
        "tasks": tasks,
        "steps_per_epoch": spe,
        "epochs": tr.epochs,
        "total_steps": total,
        "warmup_steps": None if total is None else int(tr.warmup_ratio * total),
        "lr": lr_of(preset),
        "lr_from": lr_source,
        "optimizer": {"adam_eps": tr.adam_eps, "weight_decay": tr.weight_decay, "grad_clip": tr.grad_clip},
        "select_on": cfg.eval.select_on,
        "world": world,
        "missing": missing,
        "trainable": _trainable(cfg, preset, lambda: _corpus(cfg, read)),
    }
    if presets:
        plan["presets"] = {n: {"lr": lr_of(get_preset(n)), **_trainable(cfg, get_preset(n),
                                                                          lambda: _corpus(cfg, read))}
                           for n in presets}
    return plan


def _pct(r: dict) -> str:
    if "error" in r:
        return f"unknown ({r['error']})"
    return f"{r['trainable']:,} / {r['total']:,} ({r['percent']:.2f}%)"


def format_plan(plan: dict) -> str:
    """The plan as the text ``--dry-run`` prints."""
    out = [f"plan of {plan['name']!r}: preset {plan['preset']}, backbone {plan['backbone']}"
           + (f", {plan['world']} processes" if plan["world"] > 1 else "")]
    head = f"  {'task':<9}{'train examples':>15}{'batch':>7}{'steps/epoch':>13}{'val':>9}{'test':>9}"
    out += [head, "  " + "-" * (len(head) - 2)]
    def num(v):
        return "-" if v is None else f"{v:,}"

    for t, r in plan["tasks"].items():
        out.append(f"  {t:<9}{'missing' if r['examples'] is None else num(r['examples']):>15}{r['batch_size']:>7}"
                   f"{num(r['steps_per_epoch']):>13}{num(r['val']):>9}{num(r['test']):>9}")
    if plan["total_steps"] is None:
        out.append(f"  steps: unknown until every training split can be read ({plan['epochs']} epochs)")
    else:
        out.append(f"  steps: {plan['steps_per_epoch']:,} per epoch x {plan['epochs']} epochs = "
                   f"{plan['total_steps']:,} (linear warm-up {plan['warmup_steps']:,} steps, then linear decay to 0)")
    o = plan["optimizer"]
    out.append(f"  learning rate {plan['lr']:.2e} ({plan['lr_from']}); AdamW eps {o['adam_eps']:g}, "
               f"weight decay {o['weight_decay']:g}, grad clip {o['grad_clip']:g}")
    out.append(f"  trainable {_pct(plan['trainable'])}")
    out.append("  reported: " + ("the best-validation checkpoint on test" if plan["select_on"] == "val"
                                 else "the last epoch's weights on test (as the reference)"))
    for t, r in plan["tasks"].items():
        out.append(f"  {t}: train {r['train_from']}; val {r['val_from']}; test {r['test_from']}")
    if plan.get("presets"):
        out.append(f"  {'preset':<22}{'lr':>10}  trainable")
        for n, r in plan["presets"].items():
            out.append(f"  {n:<22}{r['lr']:>10.1e}  {_pct(r)}")
    for m in plan.get("missing", []):
        out.append(f"  missing training data: {m}")
    return "\n".join(out)


def run_dry(args) -> int:
    import os

    from adapterkit.engine.registry import domain_of

    domain = domain_of(args.config)
    if domain != "vl":
        return run_dry_engine(args, domain)
    from adapterkit.vl.presets import PRESET_ORDER

    cfg = _load(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    presets = list(PRESET_ORDER) if args.preset == "all" else None
    plan = training_plan(cfg, world=world, presets=presets)
    print(format_plan(plan))
    if plan["missing"]:
        import sys

        print(f"adapterkit train: error: {len(plan['missing'])} training split(s) cannot be read (listed above)",
              file=sys.stderr)
        return 2
    return 0
