"""The offline flagship benchmark: multi-task VL-Adapter on FashionVL.

``prepare`` builds FashionVL from the real Fashion-MNIST photos and extracts frozen
EfficientNet-Lite0 grid features (cached); ``run_preset`` trains one preset on all four
tasks with a causal VL model (SmolLM2-135M with visual prefix tokens by default) and
evaluates on test; ``demo`` prints the table and writes results + a plot.

``compare`` runs several presets, each with several seeds, on the same budget. Every run
is scored per test example (the whole test split by default), which gives bootstrap 95%
intervals per task and for the average (`adapterkit.stats`); over seeds it reports the
mean and the t-interval. A validation subset is scored every ``curve_every`` steps (the
learning curves). Before it starts, ``compare`` measures a few training steps and one
evaluation batch per task of every preset and prints the estimated duration.

Layout of a compare folder: ``<preset>/seed<k>/`` holds the trainer's output (results.json,
predictions.json, final/) and ``run.json`` (per-example scores, intervals, curve, timings);
``compare.json`` / ``compare.md`` / ``compare.png`` / ``differences.png`` / ``curves.png`` summarise them
(the figures: `adapterkit.vl.plots`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from adapterkit.errors import AdapterKitError, ConfigError, DataError
from adapterkit.safeio import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json_file

TASKS = ["vqa", "gqa", "nlvr", "caption"]
REFERENCE = "full_finetune"  # the preset the others are compared with (paired differences)
MARGIN = 2.0  # points: "matches full fine-tuning" read as a difference of averages inside +-2

SCALES = {
    # fashionvl sizes (None = package default), backbone, steps, batch, test examples per task (None = all),
    # feature px, validation curve (every K steps, examples per task), eval batch, bf16 autocast (opt-in:
    # 1.3x faster per training step and 2x per evaluation on a CPU with AVX-512 BF16, but 22x / 6x
    # slower on one without it (emulated); its effect on the scores is not measured; over 12 steps its
    # losses left the fp32 run's from step 7 on)
    "tiny": dict(fashionvl_tiny=True, backbone="tiny-llama", steps=24, batch_size=8, eval_examples=None,
                 resolution=64, curve_every=8, curve_examples=6, eval_batch_size=32, bf16=False),
    "default": dict(fashionvl_tiny=False, backbone="smollm2", steps=260, batch_size=16, eval_examples=None,
                    resolution=112, curve_every=65, curve_examples=100, eval_batch_size=64, bf16=False),
    "large": dict(fashionvl_tiny=False, backbone="smollm2", steps=3000, batch_size=32, eval_examples=None,
                  resolution=224, curve_every=300, curve_examples=300, eval_batch_size=64, bf16=False),
}
#: the demo's test examples per task at the default scale (its 15-minute budget); compare uses all
DEMO_EVAL_EXAMPLES = 500


def feature_dir(data_dir: str | Path, resolution: int, grid: int = 2) -> Path:
    """Where :func:`prepare` keeps the EfficientNet-Lite0 features of ``data_dir``."""
    return Path(data_dir) / f"features-effnet-lite0-{resolution}px-g{grid}"


def prepare(data_dir: str | Path, tiny: bool, resolution: int, grid: int = 2, seed: int = 0,
            device: str = "cpu") -> tuple[Path, Path]:
    """Build FashionVL (if missing) and its EfficientNet-Lite0 feature store (if missing or stale),
    the features computed on ``device`` ("auto": a GPU where there is one)."""
    from adapterkit.vl.datasets.fashionvl import build_fashionvl, iter_fashionvl_images
    from adapterkit.vl.features import FeatureStore, extract_features

    data_dir = Path(data_dir)
    print(f"[1/4] FashionVL from Fashion-MNIST photos -> {data_dir}")
    build_fashionvl(data_dir, seed=seed, tiny=tiny)
    feats = feature_dir(data_dir, resolution, grid)
    images = iter_fashionvl_images(data_dir)
    try:
        store = FeatureStore.open(feats)
        stale = store.ids != images.ids  # a store of an earlier build (other sizes): extract again
    except Exception:
        stale = None
    if stale is False:
        print(f"[2/4] features cached in {feats}")
    else:
        if stale:
            shutil.rmtree(feats)
        print(f"[2/4] extracting EfficientNet-Lite0 features ({resolution}px, {grid}x{grid} grid) -> {feats}")
        extract_features(images, "efficientnet-lite0", feats, batch_size=64, grid=grid, resolution=resolution,
                         device=device)
    return data_dir, feats


def run_config(data_dir, feats, preset: str, scale: dict, seed: int = 0, lr: float | None = None) -> dict:
    cpu_eval = {"batch_size": scale.get("eval_batch_size", 32), "max_new_tokens": 4, "caption_max_new_tokens": 16,
                "caption_beams": 1, "select_on": "last"}
    return {
        "name": f"fashionvl-{preset}",
        "model": {"backbone": scale["backbone"], "feat_dim": 1280, "n_images": 2},
        "preset": preset,
        "data": {"root": str(data_dir), "features": str(feats), "tasks": TASKS,
                 "max_eval_examples": scale["eval_examples"]},
        "train": {"epochs": 100, "max_steps": scale["steps"], "batch_size": scale["batch_size"],
                  "task_batch_scale": {t: 1.0 for t in TASKS}, "seed": seed,
                  "checkpoint_every": scale.get("checkpoint_every", 100),
                  "max_text_len": 32, "max_target_len": 24, "eval_every_epoch": False, "warmup_ratio": 0.05,
                  "bf16": bool(scale.get("bf16", False)), **({"lr": lr} if lr else {})},
        "eval": cpu_eval,
    }


# ----------------------------------------------------------------------------- the trainer, with a curve

def _bench_trainer_class():
    from adapterkit.train.trainer import Trainer

    class BenchTrainer(Trainer):
        """The trainer plus a validation learning curve: before the first step and every
        ``curve_every`` steps, the average score on the first ``curve_examples`` validation
        examples of each task (a fixed subset). The RNG states are restored after each
        point, so a run with a curve trains exactly as one without."""

        CURVE = "curve"  # the split name of the validation subset

        def __init__(self, config, output_dir, curve_every: int = 0, curve_examples: int = 100):
            super().__init__(config, output_dir)
            self.curve_every, self.curve_examples = int(curve_every or 0), int(curve_examples)
            self.curve_file = self.out / "curve.json"
            self.curve: list[dict] = json.loads(self.curve_file.read_text()) if self.curve_file.exists() else []
            self.curve_eval_s = 0.0

        def _eval_data(self, task, split):
            if split != self.CURVE:
                return super()._eval_data(task, split)
            key = (task, split)
            if key not in self._eval_cache:
                data = self._task_data(task, self.cfg.data.val_split, self.spec, False)
                data.examples = data.examples[: self.curve_examples]
                self._eval_cache[key] = data
            return self._eval_cache[key]

        def curve_point(self, step: int) -> dict:
            from adapterkit.engine.checkpoint import capture_rng_state, restore_rng_state

            t0 = time.perf_counter()
            rng = capture_rng_state()
            try:
                m = self.evaluate(self.CURVE)
            finally:
                restore_rng_state(rng)
            point = {"step": int(step), **{t: self.main_score(v) for t, v in m.items()}}
            point["average"] = float(np.mean([point[t] for t in m]))
            self.curve = [c for c in self.curve if c["step"] < step] + [point]
            atomic_write_json(self.curve_file, self.curve)
            self.curve_eval_s += time.perf_counter() - t0
            return point

        def train_step(self, task, rows, seed):
            if self.curve_every and self.state["step"] == 0:
                self.curve_point(0)
            loss = super().train_step(task, rows, seed)
            step = self.state["step"] + 1  # the trainer counts the step after train_step returns
            if self.curve_every and (step % self.curve_every == 0 or step == self.total_steps):
                self.curve_point(step)
            return loss

    return BenchTrainer


def make_trainer(data_dir, feats, preset, scale, out_dir, seed=0, lr=None, curve=True):
    cls = _bench_trainer_class()
    return cls(run_config(data_dir, feats, preset, scale, seed, lr), out_dir,
               curve_every=scale.get("curve_every", 0) if curve else 0,
               curve_examples=scale.get("curve_examples", 100))


def init_digest(model) -> str:
    """SHA-256 of the trainable parameters (names, dtypes, shapes, values) as they are now: taken
    before the first step, two runs with one digest start from the same weights. Runs meant as
    pairs (one setting changed, same seed) are only pairs when their digests agree."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_preset(data_dir, feats, preset, scale, out_dir, seed=0, lr=None, curve=False) -> dict:
    """Train and test one preset; the trainer's results dict (+ the curve when asked, and the
    digest of the initial trainable weights)."""
    trainer = make_trainer(data_dir, feats, preset, scale, out_dir, seed, lr, curve)
    digest = init_digest(trainer.model)  # built from the seed; a resume loads its checkpoint in fit()
    res = trainer.fit()
    res["init_digest"] = digest
    res["lr"] = trainer.lr  # the learning rate used (the preset's own unless one was given)
    if trainer.curve_every:
        res["curve"] = trainer.curve
        res["curve_eval_s"] = trainer.curve_eval_s
    return res


# ----------------------------------------------------------------------------- per-example scores

def _main_key(m: dict) -> str:
    return "CIDEr" if "CIDEr" in m else "accuracy"


def per_example_scores(task: str, preds: dict, examples: list) -> np.ndarray:
    """Percent-scale score of each example (in `examples` order) whose mean is the task's metric:
    VQA soft score, exact match (gqa / nlvr), CIDEr-D per image with the document
    frequencies of the whole evaluated set (caption)."""
    from adapterkit.vl.metrics import exact_match
    from adapterkit.vl.metrics.captions import cider_d, tokenize_corpus
    from adapterkit.vl.metrics.vqa import soft_scored, vqa_example_scores

    missing = [e.uid for e in examples if e.uid not in preds]
    if missing:
        raise DataError(f"{task}: {len(missing)} test example(s) have no prediction, e.g. {missing[0]!r}")
    if task == "caption":
        refs = tokenize_corpus({e.uid: e.targets for e in examples})
        cands = tokenize_corpus({e.uid: preds[e.uid] for e in examples})
        _, items = cider_d(refs, cands, return_per_item=True)
        return 100.0 * np.array([items[e.uid] for e in examples])
    if task == "vqa":
        # marked as the trainer marks them: single-answer VQA-style data is scored by its soft score
        marked = {e.uid: dataclasses.replace(e, extra={"raw_answers": not soft_scored(e),
                                                       **e.extra}) for e in examples}
        return 100.0 * vqa_example_scores(preds, marked)
    return 100.0 * np.array([exact_match(preds[e.uid], e.targets) for e in examples], dtype=float)


def caption_check(preds: dict, examples: list) -> dict:
    """Does the captioner look at the image? The number of distinct test captions, the most common
    one and its share, and the CIDEr-D that caption alone scores when given for every test image
    (same document frequencies as the run's score): a run whose score is near that constant's has
    learnt the caption template, not the pictures."""
    from collections import Counter

    from adapterkit.vl.datasets.fashionvl import caption_item_recall

    counts = Counter(preds[e.uid] for e in examples)
    top, n_top = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    const = per_example_scores("caption", {e.uid: top for e in examples}, examples)
    out = {"examples": len(examples), "distinct": len(counts), "most_common": top,
           "most_common_share": n_top / len(examples), "most_common_alone_cider_d": float(const.mean())}
    if all("labels" in e.extra for e in examples):  # FashionVL: which items does each caption name?
        from adapterkit.stats import bootstrap_interval

        items = 100.0 * np.array([caption_item_recall(preds[e.uid], e.extra["labels"]) for e in examples])
        iv = bootstrap_interval(items)
        out["item_recall"], out["item_recall_interval"] = float(items.mean()), [iv.low, iv.high]
        out["most_common_item_recall"] = 100.0 * float(np.mean([caption_item_recall(top, e.extra["labels"])
                                                               for e in examples]))
    return out


def score_run(res: dict, run_dir: Path, data_dir, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Per-example test scores of one finished run and their bootstrap intervals."""
    from adapterkit.stats import bootstrap_tasks
    from adapterkit.vl.datasets.fashionvl import load_fashionvl_examples

    preds = json.loads((Path(run_dir) / "predictions.json").read_text())
    scores, uids, check = {}, {}, None
    for t in TASKS:
        exs = [e for e in load_fashionvl_examples(data_dir, t, "test") if e.uid in preds[t]]
        s = per_example_scores(t, preds[t], exs)
        reported = float(res["test"][t][_main_key(res["test"][t])])
        if not math.isclose(float(s.mean()), reported, rel_tol=1e-6, abs_tol=1e-6):
            raise DataError(f"{t}: the per-example scores average {s.mean():.6f} but the trainer reported "
                            f"{reported:.6f}; the two scorers disagree")
        scores[t], uids[t] = s, [e.uid for e in exs]
        if t == "caption":
            check = caption_check(preds[t], exs)
    iv = bootstrap_tasks(scores, n_resamples=n_resamples, seed=seed)
    return {"scores": {k: v.mean for k, v in iv.items()}, "caption_check": check,
            "intervals": {k: [v.low, v.high] for k, v in iv.items()},
            "test_sizes": {t: len(uids[t]) for t in TASKS},
            "per_example": {t: {"uids": uids[t], "scores": [round(float(x), 6) for x in scores[t]]} for t in TASKS}}


def _refresh_caption_check(run: dict, run_dir: Path, data_dir) -> dict:
    """Recompute a finished run's caption check from its predictions file (same test examples)."""
    from adapterkit.vl.datasets.fashionvl import load_fashionvl_examples

    preds = json.loads((run_dir / "predictions.json").read_text())["caption"]
    uids = set(run["per_example"]["caption"]["uids"])
    exs = [e for e in load_fashionvl_examples(data_dir, "caption", "test") if e.uid in uids]
    run = {**run, "caption_check": caption_check(preds, exs)}
    atomic_write_json(run_dir / "run.json", run)
    return run


def _read_run(path: Path, hint: str = "") -> dict:
    """A run.json, or one DataError naming it (``hint`` says what to do about it)."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable run record ({e}){hint}") from None


def _budget(scale: dict, lr) -> dict:
    """What a finished run must share with this compare to be reused: steps, bf16, and lr if one is set."""
    return {"steps": scale["steps"], "bf16": bool(scale.get("bf16", False)), **({"lr": lr} if lr else {})}


def _check_budget(path: Path, run: dict, scale: dict, lr) -> None:
    want = _budget(scale, lr)
    have = {k: run.get(k) for k in want}
    if have != want:
        raise ConfigError(f"{path} was made with {have}, this compare asks for {want}; use another --out")


def run_one(data_dir, feats, preset, scale, run_dir, seed=0, lr=None, curve=True, keep_checkpoints=False) -> dict:
    """Train, test and score one (preset, seed); cached in ``run_dir/run.json``.

    Once the record is written the resumable checkpoints (``run_dir/checkpoints``: the weights and
    the optimizer state every ``checkpoint_every`` steps, 4.6 GB for a FashionVL full fine-tuning run of
    SmolLM2-135M) are removed unless ``keep_checkpoints``; the trained weights stay in ``final/``."""
    run_dir = Path(run_dir)
    done = run_dir / "run.json"
    if done.exists():
        run = _read_run(done, "; delete it to run this (preset, seed) again")
        if "item_recall_interval" not in (run.get("caption_check") or {}) and (run_dir / "predictions.json").exists():
            run = _refresh_caption_check(run, run_dir, data_dir)  # a record from before the check grew
        _check_budget(done, run, scale, lr)
        return run
    t0 = time.perf_counter()
    res = run_preset(data_dir, feats, preset, scale, run_dir, seed, lr, curve)
    run = {"preset": preset, "seed": seed, "steps": res["steps"], "trainable": res["trainable"],
           "total": res["total"], "percent": res["percent"], "lr": res["lr"], "bf16": bool(scale.get("bf16", False)),
           **score_run(res, run_dir, data_dir), "curve": res.get("curve", []),
           "curve_eval_s": res.get("curve_eval_s", 0.0), "init_digest": res.get("init_digest"),
           # + the time of the processes before a resume, which the trainer's checkpoint kept
           "wall_time_s": time.perf_counter() - t0 + res["wall_time_s"] - res["wall_time_s_this_process"]}
    atomic_write_json(done, run)
    if not keep_checkpoints:  # only a run that stopped part-way resumes from them
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return run


#: the small files of a finished run that --reuse copies (run.json, written last, marks it finished)
REUSED_FILES = ("results.json", "predictions.json", "curve.json", "train_log.csv", "run.json")


def reuse_runs(out: Path, sources, presets, seed_list, scale: dict, lr, sizes: dict) -> dict[str, str]:
    """Copy the finished (preset, seed) runs this compare asks for and ``out`` lacks from the compare
    folders ``sources`` (the first that has each), checked against this budget (steps, bf16, lr) and
    these test sizes: extending a compare with more seeds or presets reuses the runs it has. Only the
    small records travel (REUSED_FILES), never the checkpoints. Returns {"<preset> seed <k>": source}."""
    reused: dict[str, str] = {}
    srcs = [Path(d) for d in sources or []]
    for d in srcs:
        if not d.is_dir():
            raise DataError(f"--reuse {d}: no such compare folder")
        if d.resolve() == out.resolve():
            raise ConfigError(f"--reuse {d} is the --out folder itself")
    want = _budget(scale, lr)
    plan = []
    for p in presets:
        for s in seed_list:
            dst = out / p / f"seed{s}"
            if (dst / "run.json").exists():
                continue
            src = next((d / p / f"seed{s}" for d in srcs if (d / p / f"seed{s}" / "run.json").is_file()), None)
            if src is None:
                continue
            run = _read_run(src / "run.json")
            have = {k: run.get(k) for k in want}
            if have != want:
                raise ConfigError(f"--reuse: {src / 'run.json'} was made with {have}, this compare asks for {want}")
            test = {t: sizes.get(t) for t in TASKS}  # (sizes also counts the validation curve's examples)
            if {t: (run.get("test_sizes") or {}).get(t) for t in TASKS} != test:
                raise ConfigError(f"--reuse: {src / 'run.json'} was tested on {run.get('test_sizes')} examples per "
                                  f"task, this compare on {test}")
            plan.append((p, s, src, dst))
    for p, s, src, dst in plan:  # every record checked first: a mismatch copies nothing
        dst.mkdir(parents=True, exist_ok=True)
        for name in REUSED_FILES:  # each file whole or not at all; run.json last
            if (src / name).is_file():
                atomic_write_bytes(dst / name, (src / name).read_bytes())
        reused[f"{p} seed {s}"] = str(src.parent.parent)
        print(f"reused {p} seed {s} from {src.parent.parent}", flush=True)
    return reused


# ----------------------------------------------------------------------------- aggregation

def aggregate(runs: list[dict], n_resamples: int = 2000, seed: int = 0) -> dict:
    """One preset over its seeds: every seed's scores and intervals, the mean, the t-interval over
    seeds, and the bootstrap interval over examples of the seed-averaged per-example scores."""
    from adapterkit.stats import bootstrap_tasks, t_interval

    keys = TASKS + ["average"]
    for r in runs[1:]:
        for t in TASKS:
            if r["per_example"][t]["uids"] != runs[0]["per_example"][t]["uids"]:
                raise DataError(f"{r['preset']}: seeds {runs[0]['seed']} and {r['seed']} were tested on different "
                                f"{t} examples (another --eval-examples?); rerun them into one folder")
    mean_scores = {t: np.mean([r["per_example"][t]["scores"] for r in runs], axis=0) for t in TASKS}
    boot = bootstrap_tasks(mean_scores, n_resamples=n_resamples, seed=seed)
    over_seeds = {k: t_interval([r["scores"][k] for r in runs]) for k in keys}
    return {
        "percent": runs[0]["percent"], "trainable": runs[0]["trainable"], "total": runs[0]["total"],
        "lr": runs[0]["lr"], "steps": runs[0]["steps"],
        "seeds": [{"seed": r["seed"], "scores": r["scores"], "intervals": r["intervals"],
                   "caption_check": r.get("caption_check"), "wall_time_s": r["wall_time_s"]} for r in runs],
        "mean": {k: over_seeds[k].mean for k in keys},
        "seed_interval": {k: None if over_seeds[k].low is None else [over_seeds[k].low, over_seeds[k].high]
                          for k in keys},
        "example_interval": {k: [boot[k].low, boot[k].high] for k in keys},
        "test_sizes": runs[0]["test_sizes"],
        "test_avg": over_seeds["average"].mean,
        "caption_collapsed_seeds": [r["seed"] for r in runs if caption_collapsed(r.get("caption_check"))],
        "wall_time_s": float(np.mean([r["wall_time_s"] for r in runs])),
        "curve_tail": curve_tail(runs),
    }


CURVE_TAIL = 0.25  # the share of the steps at the end of training that curve_tail reads


def curve_tail(runs: list[dict], frac: float = CURVE_TAIL) -> dict | None:
    """How much the validation curve still moved over the last ``frac`` of the steps: per run, the
    score at its last point minus the score at its latest point at or before step (1 - frac) * last;
    over the runs that have a curve, the mean rise and its 95% t-interval, per task and for the
    average. ``reading``: "rising" (the average's interval lies above 0), "falling" (below 0), else
    "no change shown" (a flat curve and a noisy one read alike: see the interval's width). None
    when no run has a curve of two or more points."""
    from adapterkit.stats import t_interval

    if not 0.0 < frac < 1.0:
        raise ConfigError(f"the share of the curve's steps must be between 0 and 1, got {frac!r}")
    rises: list[dict] = []
    spans = set()
    for r in runs:
        pts = sorted(r.get("curve") or [], key=lambda c: c["step"])
        if len(pts) < 2:
            continue
        last = pts[-1]
        start = [c for c in pts[:-1] if c["step"] <= (1.0 - frac) * last["step"]]
        first = start[-1] if start else pts[0]
        spans.add((first["step"], last["step"]))
        rises.append({k: float(last[k]) - float(first[k]) for k in TASKS + ["average"] if k in last and k in first})
    if not rises:
        return None
    keys = [k for k in TASKS + ["average"] if all(k in x for x in rises)]
    ivs = {k: t_interval([x[k] for x in rises]) for k in keys}
    avg = ivs.get("average")
    reading = ("no change shown" if avg is None or avg.low is None else
               "rising" if avg.low > 0 else "falling" if avg.high < 0 else "no change shown")
    lo, hi = next(iter(spans)) if len(spans) == 1 else (None, None)  # runs of other lengths: no one span
    return {"frac": frac, "from_step": lo, "to_step": hi, "runs": len(rises), "reading": reading,
            "rise": {k: v.mean for k, v in ivs.items()},
            "seed_interval": {k: None if v.low is None else [v.low, v.high] for k, v in ivs.items()}}


def task_names(tasks: Sequence[str] | None = None) -> list[str]:
    """The tasks an average is taken over: all four by default, else distinct names among TASKS."""
    names = list(TASKS if tasks is None else tasks)
    if not names or len(set(names)) != len(names) or any(t not in TASKS for t in names):
        raise ConfigError(f"tasks to average over: {names!r}; choose distinct tasks among {', '.join(TASKS)}")
    return names


def task_average(run: dict, tasks: Sequence[str] | None = None) -> float:
    """A run's average score over `tasks` (all four: the average it recorded)."""
    names = task_names(tasks)
    if names == TASKS:
        return run["scores"]["average"]
    return float(np.mean([run["scores"][t] for t in names]))


def vs_reference(runs: list[dict], ref_runs: list[dict], n_resamples: int = 2000,
                 tasks: Sequence[str] | None = None) -> dict | None:
    """`paired_vs` on the seeds both sides have (a partial compare may have more of one); None when
    they share no seed."""
    common = {r["seed"] for r in runs} & {r["seed"] for r in ref_runs}
    if not common:
        return None
    return paired_vs([r for r in runs if r["seed"] in common], [r for r in ref_runs if r["seed"] in common],
                     n_resamples, tasks=tasks)


def paired_vs(runs: list[dict], ref_runs: list[dict], n_resamples: int = 2000, seed: int = 0,
              margin: float = MARGIN, tasks: Sequence[str] | None = None) -> dict:
    """average(preset) - average(reference): paired bootstrap over the same test examples (seed-averaged
    scores) and, with two or more seeds, the t-interval of the per-seed differences (seeds paired by
    their number: the same data order). ``margin`` reads the average's interval against +-margin points
    (over seeds where there are two or more, else over test examples only; see `stats.margin_verdict`),
    with the seeds an interval of this spread would need to fit inside it. ``tasks``: the tasks the
    average is taken over (default all four; e.g. the three answer tasks without captioning)."""
    from adapterkit.stats import bootstrap_difference, margin_verdict, seeds_for_margin, t_interval

    names = task_names(tasks)

    def mean_scores(rs):
        return {t: np.mean([r["per_example"][t]["scores"] for r in rs], axis=0) for t in names}

    def score(r, k):  # a run's score on task k, or its average over the chosen tasks
        return task_average(r, names) if k == "average" else r["scores"][k]

    for t in names:
        if runs[0]["per_example"][t]["uids"] != ref_runs[0]["per_example"][t]["uids"]:
            raise DataError(f"{t}: the two presets were tested on different examples; cannot pair them")
    a, b = mean_scores(runs), mean_scores(ref_runs)
    d = bootstrap_difference(a, b, n_resamples=n_resamples, seed=seed)
    ref_by_seed = {r["seed"]: r for r in ref_runs}
    paired = [r for r in runs if r["seed"] in ref_by_seed]

    def diffs(k):
        return [score(r, k) - score(ref_by_seed[r["seed"]], k) for r in paired]

    def over_seeds(k):
        iv = t_interval(diffs(k)) if paired else None
        return None if iv is None or iv.low is None else [iv.low, iv.high]

    def read_margin(k, seed_iv, example_iv):
        verdict = margin_verdict(*(seed_iv or example_iv), margin)
        verdict["over"] = "seeds" if seed_iv else "test examples only (one seed: the seed-to-seed spread is unknown)"
        if seed_iv:
            sd = float(np.std(diffs(k), ddof=1))
            verdict["seed_sd"] = sd
            verdict["seeds_needed_if_equal"] = seeds_for_margin(sd, margin)
        return verdict

    per_task = {}
    for t in names:  # each task alone: where a difference of the average comes from
        dt = bootstrap_difference({t: a[t]}, {t: b[t]}, n_resamples=n_resamples, seed=seed)
        t_iv = over_seeds(t)
        per_task[t] = {"difference": dt.mean, "example_interval": [dt.low, dt.high], "seed_interval": t_iv,
                    "margin": read_margin(t, t_iv, [dt.low, dt.high])}
    seed_iv = over_seeds("average")
    return {"difference": d.mean, "example_interval": [d.low, d.high], "seed_interval": seed_iv,
            "seeds_paired": len(paired), "tasks": per_task, "margin": read_margin("average", seed_iv, [d.low, d.high])}


def load_runs(folder: str | Path) -> dict[str, list[dict]]:
    """Every finished run of a compare folder: {preset: [run.json, ... by seed]}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such compare folder")
    runs: dict[str, list[dict]] = {}
    for f in sorted(folder.glob("*/seed*/run.json")):
        r = _read_run(f)
        missing = [k for k in ("preset", "seed", "scores", "per_example", "test_sizes") if k not in r]
        if missing:
            raise DataError(f"{f}: not a run record of adapterkit compare (no {', '.join(missing)})")
        runs.setdefault(r["preset"], []).append(r)
    for rs in runs.values():
        rs.sort(key=lambda r: r["seed"])
    return runs


def paired_folders(a: str | Path, b: str | Path, n_resamples: int = 2000, seed: int = 0,
                   as_preset: dict[str, str] | None = None) -> dict:
    """Two compare folders that differ in one setting (bf16 against fp32, another learning rate):
    per preset and seed both have, a - b per task and for the average with the paired bootstrap
    interval over the same test examples, and over the seeds both have (seeds paired by number).
    ``as_preset`` {a's preset: b's preset} pairs presets of other names (only those)."""
    ra, rb = load_runs(a), load_runs(b)
    if as_preset:
        ra = {as_preset[p]: r for p, r in ra.items() if p in as_preset}
        rb = {p: r for p, r in rb.items() if p in as_preset.values()}
    out = {"a": str(a), "b": str(b), "presets": {}, **({"as_preset": dict(as_preset)} if as_preset else {})}
    for p in sorted(set(ra) & set(rb)):
        b_by_seed = {r["seed"]: r for r in rb[p]}
        pairs = [(r, b_by_seed[r["seed"]]) for r in ra[p] if r["seed"] in b_by_seed]
        if not pairs:
            continue
        per_seed = []
        for x, y in pairs:
            for t in TASKS:
                if x["per_example"][t]["uids"] != y["per_example"][t]["uids"]:
                    raise DataError(f"{p} seed {x['seed']}: {t} was tested on different examples in {a} and {b}")
            d = paired_vs([x], [y], n_resamples, seed)  # the average and each task, paired over the examples
            tasks = {t: {"difference": v["difference"], "interval": v["example_interval"]} for t, v in d["tasks"].items()}
            tasks["average"] = {"difference": d["difference"], "interval": d["example_interval"]}
            da, db = x.get("init_digest"), y.get("init_digest")
            per_seed.append({"seed": x["seed"], "a": x["scores"], "b": y["scores"], "tasks": tasks,
                             # False: the two runs started from other weights (independent runs, not a pair)
                             "same_start": None if da is None or db is None else da == db})
        pooled = paired_vs([x for x, _ in pairs], [y for _, y in pairs], n_resamples, seed)
        out["presets"][p] = {"seeds": per_seed, "pooled": pooled,
                             "test_sizes": pairs[0][0]["test_sizes"]}
    if not out["presets"]:
        raise DataError(f"{a} and {b} have no (preset, seed) run in common")
    return out


def paired_table(res: dict) -> str:
    """Markdown for `paired_folders`: a - b per preset, seed and task [95% paired bootstrap interval]."""
    cols = TASKS + ["average"]
    lines = [f"a = `{res['a']}`, b = `{res['b']}`", "",
             "| preset | seed | " + " | ".join(f"{c} a - b" for c in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for p, r in res["presets"].items():
        for row in r["seeds"]:
            mark = " (other start)" if row.get("same_start") is False else ""
            lines.append(f"| {p} | {row['seed']}{mark} | " + " | ".join(
                f"{row['tasks'][c]['difference']:+.2f}{_iv(row['tasks'][c]['interval'])}" for c in cols) + " |")
        pooled = r["pooled"]
        if len(r["seeds"]) > 1:
            lines.append(f"| {p} | all {pooled['seeds_paired']} | | | | | {pooled['difference']:+.2f}"
                         f"{_iv(pooled['example_interval'])}"
                         + ("" if pooled["seed_interval"] is None else f"; seeds{_iv(pooled['seed_interval'])}")
                         + " |")
    sizes = next(iter(res["presets"].values()))["test_sizes"]
    lines += ["", "Differences in points (CIDEr-D for caption); [95% paired bootstrap over the same test examples]; "
              "test examples per task: " + ", ".join(f"{t} {sizes[t]}" for t in TASKS) + "."]
    if any(row.get("same_start") is False for r in res["presets"].values() for row in r["seeds"]):
        lines.append("(other start): the two runs' initial trainable weights differ (`init_digest`), so the row "
                     "compares two independent runs, not one run with one setting changed.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- tables

def _baseline_percent(b: dict) -> float:
    return 100.0 * b["score"]


def _iv(iv) -> str:
    return "" if iv is None else f" [{iv[0]:.1f}, {iv[1]:.1f}]"


def table(res: dict, baseline: dict, intervals: dict | None = None) -> str:
    """The demo's table: score, its 95% bootstrap interval over test examples, the majority answer."""
    intervals = intervals or {}
    rows = [f"{'task':<9}{'metric':<10}{'score':>8}  {'95% interval':<16}{'majority':>9}{'n':>7}"]
    n = res.get("test_sizes", {})
    for t in TASKS:
        m = res["test"][t]
        key = _main_key(m)
        rows.append(f"{t:<9}{key:<10}{m[key]:>8.1f}  {_iv(intervals.get(t)).strip():<16}"
                    f"{_baseline_percent(baseline[t]):>9.1f}{n.get(t, ''):>7}")
    rows.append(f"{'average':<19}{res['test_avg']:>8.1f}  {_iv(intervals.get('average')).strip():<16}"
                f"{sum(_baseline_percent(baseline[t]) for t in TASKS) / len(TASKS):>9.1f}")
    rows.append(f"trainable {res['trainable']:,} of {res['total']:,} parameters ({res['percent']:.2f}%), "
                f"{res['steps']} steps, wall time {res['wall_time_s']:.0f} s; intervals: 95% percentile "
                "bootstrap over test examples")
    return "\n".join(rows)


def caption_collapsed(check: dict | None) -> bool | None:
    """Has the captioner collapsed onto its template? True when the captions name no more of the
    grids' items than the single most common caption would if given for every image (the lower
    end of the 95% interval of the captions' item recall reaches that one caption's recall), so
    the caption score measures the template, not the pictures. None without the item labels."""
    if not check or "item_recall_interval" not in check:
        return None
    return bool(check["item_recall_interval"][0] <= check["most_common_item_recall"])


def caption_line(check: dict) -> str:
    """One line saying whether the captions vary with the picture."""
    line = (f"caption check: {check['distinct']} distinct captions for {check['examples']} test images; the most "
            f"common ({100 * check['most_common_share']:.0f}%: \"{check['most_common']}\") given for every "
            f"image would score {check['most_common_alone_cider_d']:.1f} CIDEr-D")
    if "item_recall" in check:
        line += (f"; the captions name {check['item_recall']:.1f}%{_iv(check.get('item_recall_interval'))} of "
                 "the grids' items "
                 f"(that one caption: {check['most_common_item_recall']:.1f}%)")
    if caption_collapsed(check):
        line += ("; COLLAPSED: the captions name no more items than that one caption, so the caption score "
                 "is the template's")
    return line


def _check_cell(s: dict) -> str:
    checks = [x.get("caption_check") for x in s["seeds"]]
    return "; ".join("-" if c is None else f"{c['distinct']} / {100 * c['most_common_share']:.0f}% / "
                     f"{c['most_common_alone_cider_d']:.1f}"
                     + (f" / items {c['item_recall']:.0f}% vs {c['most_common_item_recall']:.0f}%"
                        if "item_recall" in c else "") + (" COLLAPSED" if caption_collapsed(c) else "")
                     for c in checks)


def _margin_cell(vs: dict) -> str:
    """'; ±2 within / outside / undetermined (no worse) (n≈12)' for a vs-reference cell ('' before margins)."""
    m = vs.get("margin")
    if m is None:
        return ""
    need = m.get("seeds_needed_if_equal")
    return (f"; ±{m['margin']:g} {m['equivalence']}" + (" (no worse)" if m["non_inferiority"] == "shown" else "")
            + ("" if m["over"] == "seeds" else " (examples only)")
            + ("" if "seed_sd" not in m else f" (n≈{need})" if need else " (n>10000)"))


def compare_table(summary: dict) -> str:
    """Markdown: per preset and task, mean over seeds +- the t-interval's half-width over seeds, then
    the 95% bootstrap interval over test examples of the seed-averaged scores."""
    base = summary["majority_baseline"]
    n_seeds = len(summary["protocol"]["seeds"])
    cols = TASKS + ["average"]
    lines = [f"| preset | seeds | trainable % | {' | '.join(cols)} | vs {REFERENCE} | caption check | wall s/run |",
             "|---" * (len(cols) + 6) + "|"]

    def cell(s, k):
        si = s["seed_interval"][k]
        pm = f" ±{(si[1] - si[0]) / 2:.1f}" if si is not None else ""
        return f"{s['mean'][k]:.1f}{pm}{_iv(s['example_interval'][k])}"

    for p, s in summary["presets"].items():
        vs = s.get("vs_reference")
        vs_txt = "-" if vs is None else (f"{vs['difference']:+.1f}{_iv(vs['example_interval'])}"
                                          + ("" if vs["seed_interval"] is None else
                                             f"; seeds{_iv(vs['seed_interval'])}") + _margin_cell(vs))
        lines.append(f"| {p} | {len(s['seeds'])} | {s['percent']:.2f} | " + " | ".join(cell(s, k) for k in cols)
                     + f" | {vs_txt} | {_check_cell(s)} | {s['wall_time_s']:.0f} |")
    lines.append("| majority answer | - | - | " + " | ".join(f"{_baseline_percent(base[t]):.1f}" for t in TASKS)
                 + f" | {sum(_baseline_percent(base[t]) for t in TASKS) / len(TASKS):.1f} | - | - | - |")
    sizes = next(iter(summary["presets"].values()))["test_sizes"]
    lines.append("")
    lines.append(f"Mean over the seeds (of {n_seeds} asked)" + (" ± half-width of the 95% t-interval over seeds"
                                                                 if n_seeds > 1 else "") +
                 "; [95% percentile bootstrap interval over test examples]; test examples per task: "
                 + ", ".join(f"{t} {sizes[t]}" for t in TASKS) + ".")
    if REFERENCE in summary["presets"] and len(summary["presets"]) > 1:
        lines.append(f"vs {REFERENCE}: paired difference of averages on the seeds both have [95% bootstrap over "
                     "test examples of the seed-averaged scores]; seeds [95% t-interval of the per-seed "
                     "differences].")
        m = next((s["vs_reference"]["margin"] for s in summary["presets"].values()
                  if s.get("vs_reference") and "margin" in s["vs_reference"]), None)
        if m is not None:
            lines.append(f"±{m['margin']:g}: the interval over seeds (over test examples with one seed) read against "
                         f"±{m['margin']:g} points: *within* (it lies inside: matches {REFERENCE} to that margin), "
                         "*outside* (it lies beyond), *undetermined* (it straddles a bound); *no worse* when its low "
                         f"end is above -{m['margin']:g}; n≈: the seeds an interval of this spread needs to fit "
                         "inside were the difference zero.")
    per_task = [(p, s["vs_reference"]) for p, s in summary["presets"].items() if s.get("vs_reference")]
    if per_task:
        lines += ["", f"Per task, preset - {REFERENCE} on the seeds both have [95% paired bootstrap over test examples]; "
                  "seeds [95% t-interval of the per-seed differences]; ±" f"{MARGIN:g} read as for the average:", "",
                  "| preset | " + " | ".join(TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
        for p, vs in per_task:
            lines.append(f"| {p} | " + " | ".join(
                f"{vs['tasks'][t]['difference']:+.1f}{_iv(vs['tasks'][t]['example_interval'])}"
                + ("" if vs["tasks"][t]["seed_interval"] is None else f"; seeds{_iv(vs['tasks'][t]['seed_interval'])}")
                + _margin_cell(vs["tasks"][t]) for t in TASKS) + " |")
        lines.append("")
    tails = [(p, s["curve_tail"]) for p, s in summary["presets"].items() if s.get("curve_tail")]
    if tails:
        spans = {(c["from_step"], c["to_step"]) for _, c in tails}
        a, b = next(iter(spans)) if len(spans) == 1 else (None, None)  # presets of other lengths: no one span
        span = "" if a is None else f" (step {a} -> {b})"
        keys = ["average"] + TASKS
        lines += ["", f"Validation curve over the last {100 * tails[0][1]['frac']:.0f}% of the steps{span}: the rise "
                  "of the score, mean over the seeds with a curve [95% t-interval over them]; *rising* / *falling*: "
                  "the average's interval lies above / below 0, else *no change shown*:", "",
                  "| preset | seeds | " + " | ".join(keys) + " | reading |", "|---" * (len(keys) + 3) + "|"]
        for p, c in tails:
            lines.append(f"| {p} | {c['runs']} | " + " | ".join(
                "-" if k not in c["rise"] else f"{c['rise'][k]:+.1f}{_iv(c['seed_interval'][k])}" for k in keys)
                + f" | {c['reading']} |")
        lines.append("")
    lines.append("Caption check, per seed: distinct test captions / the most common one's share / the CIDEr-D that "
                 "caption alone scores given for every image (a caption score near it is the template's, not the "
                 "picture's) / the share of the grids' items the captions name vs that one caption's; COLLAPSED: the "
                 "captions' item-recall interval reaches that one caption's (the template, not the picture).")
    missing = summary.get("missing_runs")
    if missing:
        lines.append("Partial: not run yet: " + ", ".join(f"{m['preset']} seed {m['seed']}" for m in missing) + ".")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- cost estimate

class _Clocks:
    """Wall seconds and this process's CPU seconds of a piece of work. With one torch thread the CPU
    seconds are what the work costs on a free core; on a shared CPU the wall seconds also count the
    neighbours (a load of 10 on 2 cores made them 5x the CPU seconds)."""

    def __enter__(self):
        self.t, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t, time.process_time() - self.c


def first_batches(tr, seed: int, n: int) -> list[tuple[str, int, dict]]:
    """The first ``n`` training batches of epoch 0 as a run of ``seed`` takes them: (task, task
    index, the domain's batch), for probes that look at a fresh model (scripts/bf16_drift.py,
    scripts/fashionvl_init_loss.py)."""
    from adapterkit.vl.data import _seed, task_schedule

    orders = {t: tr.domain.epoch_order(t, seed, 0) for t in tr.tasks}
    out = []
    for task, b in task_schedule(tr.num_batches, seed, 0)[:n]:
        bs = tr.batch_sizes[task]
        out.append((task, tr.tasks.index(task),
                    tr.domain.train_batch(task, orders[task][b * bs:(b + 1) * bs], _seed(seed, 0, task, b), 0, 1)))
    return out


def _train_step(tr, orders: dict, seed: int, task: str, b: int) -> float:
    """Batch ``b`` of ``task`` in epoch 0's order: the step a measurement times (measure_costs,
    measure_contention), the same one the run takes; its loss."""
    from adapterkit.vl.data import _seed

    bs = tr.batch_sizes[task]
    return tr.train_step(task, orders[task][b * bs:(b + 1) * bs], _seed(seed, 0, task, b))


@contextlib.contextmanager
def scratch_trainer(data_dir, preset: str, seed: int = 0, scale_name: str = "default", bf16: bool = False):
    """A fresh trainer of ``preset`` on FashionVL at ``scale_name`` (the run a compare of ``seed``
    builds, without the curve), in a temporary folder removed afterwards: for probes that look at
    a new model (scripts/bf16_drift.py, scripts/fashionvl_init_loss.py, scripts/repeatability.py)."""
    import tempfile

    scale = {**SCALES[scale_name], "bf16": bf16}
    work = Path(tempfile.mkdtemp(prefix=f"probe-{preset}-"))
    try:
        yield make_trainer(data_dir, feature_dir(data_dir, scale["resolution"]), preset, scale, work / "run", seed,
                           curve=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_costs(data_dir, feats, preset: str, scale: dict, work_dir: Path, seed: int = 0) -> dict:
    """Seconds of one preset's pieces on this machine, now: building the model, one training step
    of each task (after a warm-up step), one checkpoint, and one evaluation batch of each task.
    The wall seconds at the top level; the same pieces in this process's CPU seconds under ``cpu``
    (the cost on a free core when the run has one thread; a checkpoint's disk wait is not in it)."""
    from adapterkit.engine.checkpoint import ADAPTER_FILE
    from adapterkit.vl.data import task_schedule

    work = Path(work_dir) / preset
    with _Clocks() as build:
        tr = make_trainer(data_dir, feats, preset, scale, work, seed, curve=False)
    sched = task_schedule(tr.num_batches, seed, 0)
    orders = {t: d.epoch_order(seed, 0) for t, d in tr.train_data.items()}
    step_s: dict[str, float] = {}
    step_cpu: dict[str, float] = {}
    for i, (task, b) in enumerate(sched):
        if len(step_s) == len(TASKS):
            break
        if i > 0 and task in step_s:
            continue
        with _Clocks() as c:
            _train_step(tr, orders, seed, task, b)
        if i > 0:  # the first step warms up (allocations, kernels)
            step_s[task], step_cpu[task] = c.wall, c.cpu
    tr.state["step"] = 1
    with _Clocks() as ckpt:
        tr._save_checkpoint()
    files = [f for f in (work / "checkpoints").rglob("*") if f.is_file()]
    ckpt_bytes = sum(f.stat().st_size for f in files)  # the weights and the optimizer state (Adam's moments)
    weights_bytes = sum(f.stat().st_size for f in files if f.name == ADAPTER_FILE)  # what final/ keeps
    tr.curve_examples = tr.cfg.eval.batch_size  # one eval batch of each task, from the validation split
    eval_s, eval_cpu = {}, {}
    for task in TASKS:
        with _Clocks() as c:
            n = len(tr.predict(task, tr.CURVE))
        eval_s[task], eval_cpu[task] = c.wall / n, c.cpu / n
    weights = {t: n / sum(tr.num_batches.values()) for t, n in tr.num_batches.items()}
    del tr
    shutil.rmtree(work, ignore_errors=True)

    def pieces(b, steps, ck, ev):
        return {"build_s": b, "step_s": steps, "mean_step_s": sum(weights[t] * steps[t] for t in TASKS),
                "checkpoint_s": ck, "eval_s_per_example": ev}

    return {**pieces(build.wall, step_s, ckpt.wall, eval_s), "load_average": os.getloadavg()[0],
            "checkpoint_bytes": ckpt_bytes, "weights_bytes": weights_bytes,
            "cpu": pieces(build.cpu, step_cpu, ckpt.cpu, eval_cpu)}


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


#: checkpoints a run holds at once: the trainer keeps 3 and writes the next before removing the oldest
CHECKPOINTS_AT_ONCE = 4


def disk_need(estimates: dict, order: list, jobs: int, keep_checkpoints: bool = False) -> dict:
    """Bytes a compare writes, from the measured checkpoint of each preset (``measure_costs``): every
    run's ``final/`` weights stay (and, with ``keep_checkpoints``, its last 3 checkpoints), and the
    ``jobs`` runs in flight hold up to CHECKPOINTS_AT_ONCE checkpoints each (the heaviest preset's,
    an upper bound)."""
    kept = sum(estimates[p]["weights_bytes"] + (3 * estimates[p]["checkpoint_bytes"] if keep_checkpoints else 0)
               for p, _ in order)
    in_flight = min(jobs, len(order)) * CHECKPOINTS_AT_ONCE * max(
        (estimates[p]["checkpoint_bytes"] for p, _ in order), default=0)
    return {"kept_bytes": kept, "in_flight_bytes": in_flight, "needed_bytes": kept + in_flight}


def _contention_worker(rank, barrier, results, data_dir, feats, preset, scale, work_dir, threads, steps, seed):
    """One of ``measure_contention``'s processes: the same training steps alone (rank 0 only, the
    others waiting) and then with every process stepping at once. An error goes to the parent as
    one line, and the others stop waiting."""
    import threading

    import torch

    from adapterkit.vl.data import task_schedule

    torch.set_num_threads(threads)
    try:
        tr = make_trainer(data_dir, feats, preset, scale, Path(work_dir) / f"rank{rank}", seed, curve=False)
        sched = task_schedule(tr.num_batches, seed, 0)[: steps + 1]
        orders = {t: d.epoch_order(seed, 0) for t, d in tr.train_data.items()}

        def run(items):
            t0 = time.perf_counter()
            for task, b in items:
                _train_step(tr, orders, seed, task, b)
            return (time.perf_counter() - t0) / len(items)

        run(sched)  # warm-up over every timed step: a batch shape's first step is slower (kernels picked,
        # memory allocated), and the alone pass must not pay it where the together pass does not
        barrier.wait(timeout=900)
        alone = run(sched[1:]) if rank == 0 else None
        barrier.wait(timeout=900)
        results.put((rank, alone, run(sched[1:])))
    except threading.BrokenBarrierError:
        results.put((rank, None, "another measuring process stopped"))
    except Exception as e:
        barrier.abort()
        results.put((rank, None, f"{type(e).__name__}: {e}"))


def measure_contention(data_dir, feats, preset: str, scale: dict, work_dir: Path, jobs: int, threads: int = 1,
                       steps: int = 3, seed: int = 0) -> dict | None:
    """How much slower a training step is when ``jobs`` runs of ``preset`` step at once, as the
    compare's ``--jobs`` pool runs them (memory bandwidth and caches are shared even when each run
    has its own cores): ``jobs`` processes time the same ``steps`` steps, first one process alone,
    then all together. ``slowdown`` = together / alone. None when a process failed (told why)."""
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(jobs), ctx.Queue()
    procs = [ctx.Process(target=_contention_worker, daemon=True,
                         args=(r, barrier, results, str(data_dir), str(feats), preset, scale, str(work_dir),
                               threads, steps, seed)) for r in range(jobs)]
    for p in procs:
        p.start()
    got, errors = {}, []
    try:
        while len(got) + len(errors) < jobs:  # every process answers once (a result or an error)
            try:
                rank, alone, together = results.get(timeout=5)
                if isinstance(together, str):
                    errors.append(together)
                else:
                    got[rank] = (alone, together)
            except queue_mod.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):  # died without answering
                    break
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
        shutil.rmtree(work_dir, ignore_errors=True)
    if len(got) < jobs:
        first = sorted(errors, key=lambda e: e.startswith("another"))  # the cause before its echoes
        why = first[0] if first else f"process exit codes {[p.exitcode for p in procs]}"
        print(f"  could not measure how parallel jobs slow each other ({why}); assuming they do not", flush=True)
        return None
    alone = got[0][0]
    together = float(np.mean([t for _, t in got.values()]))
    return {"preset": preset, "jobs": jobs, "threads": threads, "steps": steps, "step_s_alone": alone,
            "step_s_together": together, "slowdown": together / alone}


def estimate_run_s(cost: dict, scale: dict, test_sizes: dict[str, int], curve: bool = True) -> float:
    """Seconds of one run from measured costs: build + steps + checkpoints + test + curve points."""
    steps = scale["steps"]
    n_ckpt = steps // scale.get("checkpoint_every", 100) + 2  # every K steps, the end of the loop, the final weights
    test = sum(test_sizes[t] * cost["eval_s_per_example"][t] for t in TASKS)
    points = (math.ceil(steps / scale["curve_every"]) + 1) if curve and scale.get("curve_every") else 0
    curve_s = points * sum(min(scale["curve_examples"], test_sizes.get("val_" + t, scale["curve_examples"]))
                           * cost["eval_s_per_example"][t] for t in TASKS)
    return cost["build_s"] + steps * cost["mean_step_s"] + n_ckpt * cost["checkpoint_s"] + test + curve_s


def bf16_hint(scale: dict) -> str | None:
    """One line for an fp32 compare on a CPU that computes bf16 natively (AMX / AVX-512 BF16)."""
    import torch

    from adapterkit.engine.engine import cpu_has_native_bf16

    if scale.get("bf16") or torch.cuda.is_available() or not cpu_has_native_bf16():
        return None
    return ("note: this CPU computes bf16 natively (AVX-512 BF16 / AMX): --bf16 runs the FashionVL compare about 1.8x "
            "faster on such a CPU, but it changes the scores (a run from the same initial weights moved 4.7 and 7.6 "
            "points; over 24 FashionVL runs no systematic shift shown): docs/results/fashionvl_bf16")


def _fmt_s(s: float) -> str:
    h, rem = divmod(int(round(s)), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def _test_sizes(data_dir, eval_examples) -> dict[str, int]:
    from adapterkit.vl.datasets.fashionvl import fashionvl_stats

    st = fashionvl_stats(data_dir)["tasks"]
    sizes = {t: st[t]["test"]["examples"] for t in TASKS}
    if eval_examples:
        sizes = {t: min(n, eval_examples) for t, n in sizes.items()}
    sizes.update({"val_" + t: st[t]["val"]["examples"] for t in TASKS})
    return sizes


# ----------------------------------------------------------------------------- demo and compare

def _extracted_with(feats) -> list[dict] | None:
    """The feature store's record of the torch version / threads / CPU that computed it (its last
    bits, and so a run's scores, depend on them); None where there is no readable store (a
    ``--summarize`` of runs whose features are gone: the runs still summarize)."""
    from adapterkit.vl.features import FeatureStore

    if feats is None:  # a --summarize builds no features
        return None
    try:
        return FeatureStore.open(feats).extracted_with
    except DataError:
        return None


def demo(out_dir="runs/demo", data_dir="data_cache/fashionvl", scale_name="default", preset="single_adapter",
         steps=None, seed=0, eval_examples: int | None = -1) -> dict:
    """One preset, one seed; ``eval_examples`` test examples per task (-1: the demo's default, None: all)."""
    from adapterkit.vl.datasets.fashionvl import fashionvl_stats, majority_baseline

    t0 = time.time()
    scale = dict(SCALES[scale_name])
    if steps:
        scale["steps"] = steps
    if eval_examples == -1:
        eval_examples = DEMO_EVAL_EXAMPLES if scale_name == "default" else scale["eval_examples"]
    scale["eval_examples"] = eval_examples
    data_dir, feats = prepare(data_dir, scale["fashionvl_tiny"], scale["resolution"])
    stats = fashionvl_stats(data_dir)
    base = majority_baseline(data_dir)
    out = Path(out_dir)
    print("[3/4] train " + f"{preset} on {', '.join(TASKS)} with {scale['backbone']} ({scale['steps']} steps, "
          f"seed {seed})")
    res = run_preset(data_dir, feats, preset, scale, out / preset, seed)
    scored = score_run(res, out / preset, data_dir)
    res["intervals"] = scored["intervals"]
    res["test_sizes"] = scored["test_sizes"]
    res["caption_check"] = scored["caption_check"]
    res["majority_baseline"] = base
    res["fashionvl_stats"] = stats
    res["features_extracted_with"] = _extracted_with(feats)
    res["total_wall_time_s"] = time.time() - t0
    atomic_write_json(out / "results.json", res)
    from adapterkit.vl.plots import plot_demo

    plot_demo(res, base, out / "demo.png", res["intervals"])
    print("[4/4] test results (FashionVL test split: photos never seen in training)")
    print(table(res, base, res["intervals"]))
    print(caption_line(res["caption_check"]))
    print(f"results: {out / 'results.json'}  plot: {out / 'demo.png'}  total {res['total_wall_time_s']:.0f} s")
    return res


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """A ``compare --jobs`` worker's initializer: end the worker when the compare that started it
    is gone. A killed parent (SIGTERM, SIGKILL) runs no cleanup, and its spawned workers would
    otherwise train to the end of their run on cores nobody owns any more."""
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:  # re-parented: the compare process has exited
                os._exit(1)

    threading.Thread(target=watch, name="adapterkit-exit-with-parent", daemon=True).start()


def makespan(durations: list[float], workers: int) -> float:
    """Wall time of runs taken in this order by ``workers`` parallel workers, each run going to the
    first worker that is free (as the compare's process pool hands them out): not the total / workers,
    which two unequal runs on two workers underestimate."""
    import heapq

    free = [0.0] * max(1, min(workers, len(durations) or 1))
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def _run_job(job: dict) -> dict:
    """One (preset, seed) in a worker process (``compare --jobs``)."""
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    os.environ["ADAPTERKIT_NO_PROGRESS"] = "1"
    from adapterkit.engine.engine import quiet_hf_progress

    quiet_hf_progress()
    return run_one(job["data_dir"], job["feats"], job["preset"], job["scale"], job["run_dir"], job["seed"],
                   job["lr"], job["curve"], job["keep_checkpoints"])


def compare(presets: list[str], out_dir="runs/compare", data_dir="data_cache/fashionvl", scale_name="default",
            steps=None, seed=0, seeds: int = 1, eval_examples: int | None = -1, curve_every: int | None = None,
            curve_examples: int | None = None, curve_seeds: int | None = None, estimate: bool = True,
            estimate_only: bool = False, jobs: int = 1, lr: float | None = None, command: str | None = None,
            n_resamples: int = 2000, threads: int | None = None, bf16: bool | None = None,
            summarize_only: bool = False, eval_batch_size: int | None = None,
            checkpoint_every: int | None = None, reuse=None, keep_checkpoints: bool = False) -> dict:
    """Every preset x ``seeds`` seeds (seed, seed+1, ...) on one budget; see the module doc.

    ``summarize_only``: run nothing; rewrite the summary (compare.json / .md / plots) from the
    finished runs in ``out_dir`` of these presets and seeds (e.g. runs added by several compares
    with other preset lists), listing the missing ones.

    ``reuse``: compare folders whose finished runs of these presets and seeds (same budget and test
    sizes) are copied in before anything runs (`reuse_runs`; recorded in ``reused.json``).

    ``eval_examples``: test examples per task (-1: the scale's setting, None: the whole split);
    ``curve_every`` / ``curve_examples``: the validation curve (0 turns it off); ``curve_seeds``: how
    many of the seeds record a curve (default: all); ``jobs``: runs in parallel worker processes,
    each with ``threads`` (default cpu_count // jobs) threads (on a GPU, several small runs share the
    device); ``threads``: torch threads (on a CPU shared with other jobs, 1 is much faster than 2:
    OpenMP threads that wait for a descheduled sibling stall every matmul); ``eval_batch_size``: examples
    per generation batch; ``checkpoint_every``: steps between resumable checkpoints (on a GPU, a full
    fine-tuning checkpoint every 100 steps costs more than the steps); ``keep_checkpoints``: keep each
    finished run's resumable checkpoints (by default they are removed once its record is written).

    A run that fails is reported when it fails and the others go on; the compare then writes the
    summary of the finished runs and raises one error naming the failed ones (rerun the same
    command to retry them: finished runs are kept, an interrupted one resumes)."""
    from adapterkit.vl.datasets.fashionvl import majority_baseline
    from adapterkit.vl.presets import get_preset

    if not presets:
        raise ConfigError("compare needs at least one preset")
    for p in presets:
        get_preset(p)  # an unknown name fails here, before any work
    for name, val, optional, lo in (("--seeds", seeds, False, 1), ("--jobs", jobs, False, 1),
                                    ("--threads", threads, True, 1), ("--eval-batch-size", eval_batch_size, True, 1),
                                    ("--checkpoint-every", checkpoint_every, True, 1), ("--steps", steps, True, 1),
                                    ("--curve-examples", curve_examples, True, 1), ("--seed", seed, False, 0),
                                    ("--curve-every", curve_every, True, 0), ("--curve-seeds", curve_seeds, True, 0)):
        if (val is not None or not optional) and (isinstance(val, bool) or not isinstance(val, int) or val < lo):
            raise ConfigError(f"{name} must be a {'positive' if lo else 'non-negative'} integer, got {val!r}")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
                           or lr <= 0):
        raise ConfigError(f"--lr must be a positive, finite learning rate, got {lr!r}")
    if jobs > 1 and not threads:
        threads = max(1, (os.cpu_count() or 1) // jobs)
    if threads:  # the parent measures the costs with the threads a run will have
        import torch

        torch.set_num_threads(threads)
    scale = dict(SCALES[scale_name])
    if steps:
        scale["steps"] = steps
    if eval_examples != -1:
        scale["eval_examples"] = eval_examples
    if curve_every is not None:
        scale["curve_every"] = curve_every
    if curve_examples is not None:
        scale["curve_examples"] = curve_examples
    if bf16 is not None:
        scale["bf16"] = bool(bf16)
    if eval_batch_size is not None:
        scale["eval_batch_size"] = eval_batch_size
    if checkpoint_every is not None:
        scale["checkpoint_every"] = checkpoint_every
    seed_list = [seed + k for k in range(seeds)]
    curve_seed_set = set(seed_list[: seeds if curve_seeds is None else curve_seeds])
    if summarize_only:  # the finished runs' records need the examples, not the features (e.g. runs of a GPU)
        from adapterkit.vl.datasets.fashionvl import build_fashionvl

        data_dir, feats = Path(data_dir), None
        build_fashionvl(data_dir, tiny=scale["fashionvl_tiny"])
    else:
        data_dir, feats = prepare(data_dir, scale["fashionvl_tiny"], scale["resolution"])
    base = majority_baseline(data_dir)
    sizes = _test_sizes(data_dir, scale["eval_examples"])
    out = Path(out_dir)
    reused = (read_json_file(out / "reused.json", error=DataError) if (out / "reused.json").is_file() else {})
    if reuse:
        new = reuse_runs(out, reuse, presets, seed_list, scale, lr, sizes)
        if new:
            reused.update(new)
            atomic_write_json(out / "reused.json", reused)
    todo = [(p, s) for p in presets for s in seed_list if not (out / p / f"seed{s}" / "run.json").exists()]
    estimates: dict[str, dict] = {}
    wall = None
    if summarize_only:
        estimate = estimate_only = False
    if (estimate or estimate_only) and todo:
        t0 = time.perf_counter()
        print(f"measuring the cost of each preset on this machine ({torch_threads()} threads, load average "
              f"{os.getloadavg()[0]:.1f})", flush=True)
        for p in dict.fromkeys(p for p, _ in todo):
            cost = measure_costs(data_dir, feats, p, scale, out / ".measure", seed)
            run_s, plain_s = estimate_run_s(cost, scale, sizes, True), estimate_run_s(cost, scale, sizes, False)
            cpu_s, cpu_plain = (estimate_run_s(cost["cpu"], scale, sizes, True),
                                estimate_run_s(cost["cpu"], scale, sizes, False))
            estimates[p] = {**cost, "run_s": run_s, "run_s_without_curve": plain_s, "cpu_run_s": cpu_s,
                            "cpu_run_s_without_curve": cpu_plain}
            c = cost["cpu"]
            print(f"  {p}: step {cost['mean_step_s']:.2f} s, eval "
                  f"{100 * np.mean(list(cost['eval_s_per_example'].values())):.1f} s / 100 examples, build "
                  f"{cost['build_s']:.0f} s -> {_fmt_s(run_s)} per run at this load; CPU time: step "
                  f"{c['mean_step_s']:.2f} s, eval {100 * np.mean(list(c['eval_s_per_example'].values())):.1f} s"
                  f" / 100 -> {_fmt_s(cpu_s)} per run on a free core", flush=True)
        shutil.rmtree(out / ".measure", ignore_errors=True)
        contention = None
        if jobs > 1 and len(todo) > 1:  # the heaviest preset, as many copies as the pool runs at once
            heavy = max(estimates, key=lambda p: estimates[p]["mean_step_s"])
            contention = measure_contention(data_dir, feats, heavy, scale, out / ".measure", min(jobs, len(todo)),
                                            threads or torch_threads(), seed=seed)
            if contention:
                print(f"  {contention['jobs']} {heavy} runs stepping at once: "
                      f"{contention['step_s_together']:.2f} s a step against {contention['step_s_alone']:.2f} s "
                      f"alone (x{contention['slowdown']:.2f})", flush=True)
        slowdown = contention["slowdown"] if contention else 1.0
        # the runs in the order the pool takes them (seed-major), each on the first free worker
        pending = set(todo)
        order = [(p, s) for s in seed_list for p in presets if (p, s) in pending]

        def durations(prefix):  # "" (at this load) or "cpu_" (CPU time), with or without the curve
            return [estimates[p][f"{prefix}run_s" + ("" if s in curve_seed_set else "_without_curve")]
                    for p, s in order]

        wall = makespan(durations(""), jobs) * slowdown
        cores = os.cpu_count() or 1
        cpu_one = sum(durations("cpu_")) if (threads or torch_threads()) == 1 else None
        cpu_all = None if cpu_one is None else makespan(durations("cpu_"), cores)
        print(f"estimated duration: {_fmt_s(wall)} for {len(todo)} run(s) at this load"
              + (f" on {jobs} parallel jobs" + (f", each x{slowdown:.2f} slower beside the others (measured)"
                                                   if contention else " (assuming they do not slow each other)")
                 if jobs > 1 else "")
              + f"; measuring took {_fmt_s(time.perf_counter() - t0)}")
        if cpu_one is not None:
            print(f"from the CPU time (one thread per run): {_fmt_s(cpu_one)} on one free core, "
                  f"{_fmt_s(cpu_all)} on all {cores} free cores (--jobs {cores} --threads 1)")
        hint = bf16_hint(scale)
        if hint:
            print(hint)
        disk = {**disk_need(estimates, order, jobs, keep_checkpoints), "free_bytes": _free_bytes(out)}
        gb = 1e9
        print(f"disk: about {disk['needed_bytes'] / gb:.1f} GB ({disk['kept_bytes'] / gb:.1f} GB of the runs' "
              f"weights{' and checkpoints' if keep_checkpoints else ''} kept, up to {disk['in_flight_bytes'] / gb:.1f}"
              f" GB of checkpoints at once); {disk['free_bytes'] / gb:.1f} GB free in {out}", flush=True)
        atomic_write_json(out / "estimate.json", {"presets": estimates, "runs": len(todo), "estimated_s": wall,
                                                  "parallel_contention": contention,
                                                  "cpu_one_core_s": cpu_one,
                                                  "cpu_all_cores_s": cpu_all, "cores": cores,
                                                  "jobs": jobs, "scale": scale, "test_sizes": sizes,
                                                  "load_average": os.getloadavg()[0], "disk": disk})
        if estimate_only:
            return {"estimate": estimates, "estimated_s": wall, "disk": disk}
        if disk["needed_bytes"] > disk["free_bytes"]:
            raise DataError(f"{out}: this compare needs about {disk['needed_bytes'] / gb:.1f} GB of disk and "
                            f"{disk['free_bytes'] / gb:.1f} GB are free: free some, use another --out, or run "
                            "fewer seeds or jobs at once" + ("" if not keep_checkpoints else
                                                             " (or drop --keep-checkpoints)"))
    elif estimate_only:
        print("nothing to run: every (preset, seed) has a run.json")
        return {"estimate": {}, "estimated_s": 0.0}

    t_start = time.perf_counter()
    # seed-major order (every preset's seed 0, then every preset's seed 1, ...): a compare stopped
    # part-way leaves paired seeds of every preset, not all seeds of the first presets only
    jobs_list = [dict(data_dir=str(data_dir), feats=str(feats), preset=p, scale=scale, seed=s, lr=lr,
                      run_dir=str(out / p / f"seed{s}"), curve=s in curve_seed_set, keep_checkpoints=keep_checkpoints)
                 for s in seed_list for p in presets]
    protocol = {
        "seeds": seed_list, "steps": scale["steps"], "batch_size": scale["batch_size"],
        "test_examples_per_task": scale["eval_examples"] or "all", "bf16": scale.get("bf16", False),
        "threads": torch_threads(), "jobs": jobs,
        "bootstrap": {"resamples": n_resamples, "level": 0.95, "seed": 0, "kind": "percentile, over test "
                      "examples, resampled within each task; the average resamples every task"},
        "seed_interval": "mean over seeds +- t_{0.975, N-1} s / sqrt(N)",
        "curve": {"every": scale.get("curve_every", 0), "val_examples_per_task": scale.get("curve_examples"),
                  "seeds": sorted(curve_seed_set)},
        "command": command,
        "margin_points": MARGIN,  # vs_reference.margin reads each difference against +-this
        "reused_from": reused or None,  # --reuse: "<preset> seed <k>" -> the compare folder it came from
        "features_extracted_with": _extracted_with(feats),
    }
    done: dict[tuple[str, int], dict] = {}
    if summarize_only:
        for j in jobs_list:
            if (Path(j["run_dir"]) / "run.json").exists():  # checked against this budget, as when reused
                done[(j["preset"], j["seed"])] = run_one(j["data_dir"], j["feats"], j["preset"], scale, j["run_dir"],
                                                         j["seed"], lr, j["curve"])
        if not done:
            raise DataError(f"{out}: no finished run of {', '.join(presets)} (seeds {seed_list}) to summarize")
        protocol["summarized_from"] = sorted(f"{p} seed {s}" for p, s in done)
        return write_summary(out, presets, seed_list, done, protocol, scale, base, None, None, n_resamples)

    def finished(j, r, note):
        done[(j["preset"], j["seed"])] = r
        print(f"{j['preset']} seed {j['seed']}: average {r['scores']['average']:.2f} "
              f"{_iv(r['intervals']['average']).strip()} ({note})", flush=True)
        if len(done) < len(jobs_list):  # the summary so far: a stopped compare leaves a usable one
            write_summary(out, presets, seed_list, done, protocol, scale, base, wall, t_start, n_resamples,
                          quiet=True)

    for j in jobs_list:  # a finished run of another budget: refused before any run starts
        rec = Path(j["run_dir"]) / "run.json"
        if rec.is_file():
            _check_budget(rec, _read_run(rec, "; delete it to run this (preset, seed) again"), scale, lr)
    failed: dict[tuple[str, int], str] = {}

    def failed_run(j, e):  # said at once; the other runs go on (a ConfigError is this compare's: it stops it)
        if isinstance(e, ConfigError):
            raise e
        failed[(j["preset"], j["seed"])] = f"{type(e).__name__}: {e}"
        if not isinstance(e, AdapterKitError):  # a bug: its traceback (a worker's comes as the cause)
            traceback.print_exception(e, file=sys.stderr)
        print(f"{j['preset']} seed {j['seed']}: FAILED ({type(e).__name__}: {e}); the other runs go on",
              file=sys.stderr, flush=True)

    if jobs > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        pool = cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_exit_with_parent)
        try:
            futs = {pool.submit(_run_job, {**j, "threads": threads}): j for j in jobs_list}
            for f in cf.as_completed(futs):
                try:
                    r = f.result()
                except Exception as e:  # noqa: BLE001 - every failure is reported, then raised below
                    failed_run(futs[f], e)
                    continue
                finished(futs[f], r, f"{r['wall_time_s']:.0f} s, {_fmt_s(time.perf_counter() - t_start)} so far")
        except BaseException:  # Ctrl-C or a failing summary: the queued runs must not start
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    else:
        for k, j in enumerate(jobs_list):
            cached = (Path(j["run_dir"]) / "run.json").exists()
            if not cached:
                print(f"== {j['preset']} seed {j['seed']} ({k + 1}/{len(jobs_list)})", flush=True)
            try:
                r = run_one(j["data_dir"], j["feats"], j["preset"], scale, j["run_dir"], j["seed"], lr, j["curve"],
                            j["keep_checkpoints"])
            except Exception as e:  # noqa: BLE001 - every failure is reported, then raised below
                failed_run(j, e)
                continue
            finished(j, r, "cached" if cached else f"{r['wall_time_s']:.0f} s, "
                     f"{_fmt_s(time.perf_counter() - t_start)} so far")
    if failed:
        if done:
            write_summary(out, presets, seed_list, done, protocol, scale, base, wall, t_start, n_resamples,
                          quiet=True)
        by_error: dict[str, list[str]] = {}  # in the compare's order; runs failing alike named together
        for j in jobs_list:
            if (j["preset"], j["seed"]) in failed:
                by_error.setdefault(failed[(j["preset"], j["seed"])], []).append(f"{j['preset']} seed {j['seed']}")
        raise AdapterKitError(f"{len(failed)} of {len(jobs_list)} run(s) failed: "
                              + "; ".join(f"{', '.join(names)}: {m}" for m, names in by_error.items())
                              + (f". The {len(done)} finished are kept (summary in {out})" if done else
                                 ". None finished") + "; run the same command again to retry the failed ones")
    return write_summary(out, presets, seed_list, done, protocol, scale, base, wall, t_start, n_resamples)


def write_summary(out: Path, presets, seed_list, done: dict, protocol: dict, scale: dict, base: dict, wall,
                  t_start: float | None, n_resamples: int = 2000, quiet: bool = False) -> dict:
    """compare.json / .md / .png / curves.png from the finished (preset, seed) runs in ``done``.
    Written after every run: a partial summary lists the runs still missing (``missing_runs``),
    and only presets with at least one finished seed appear."""
    runs = {p: [done[(p, s)] for s in seed_list if (p, s) in done] for p in presets}
    runs = {p: rs for p, rs in runs.items() if rs}
    missing = [{"preset": p, "seed": s} for s in seed_list for p in presets if (p, s) not in done]
    summary = {
        "protocol": protocol,
        "complete": not missing, "missing_runs": missing,
        "scale": scale, "majority_baseline": base,
        "presets": {p: aggregate(rs, n_resamples) for p, rs in runs.items()},
        "estimated_s": wall,  # what was printed before the runs (None: not measured)
        "wall_time_s": None if t_start is None else time.perf_counter() - t_start,  # None: a --summarize
    }
    if REFERENCE in runs:
        for p, rs in runs.items():
            if p == REFERENCE:
                continue
            vs = vs_reference(rs, runs[REFERENCE], n_resamples)
            if vs is not None:
                summary["presets"][p]["vs_reference"] = vs
    atomic_write_json(out / "compare.json", summary)
    md = compare_table(summary)
    atomic_write_text(out / "compare.md", md + "\n")
    from adapterkit.vl.plots import plot_compare, plot_curves, plot_differences

    plot_compare(summary, out / "compare.png")
    has_diff = plot_differences(summary, out / "differences.png")
    curves = {p: [r["curve"] for r in rs if r.get("curve")] for p, rs in runs.items()}
    if any(curves.values()):
        plot_curves(curves, out / "curves.png")
    if not quiet:
        print(md)
        print(f"results: {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}"
              + (f", {out / 'differences.png'}" if has_diff else "")
              + (f", {out / 'curves.png'}" if any(curves.values()) else ""))
    return summary


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
