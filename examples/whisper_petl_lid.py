"""PETL-AST methods on the real Whisper encoder: spoken-language identification (en, es, fr,
it, ru) from the Asterisk telephone prompts, with intervals over seeds and test clips.

Rows: the majority class and the linear probe (the frozen baselines; zero-shot does not apply
to a new classification head), full fine-tuning, the PETL-AST adapters (Pfeiffer / Houlsby x
sequential / parallel bottleneck with the reference's defaults: all-zero init, residual off,
RR 64; the Conformer adapter, Pfeiffer parallel, RR 96), LoRA, prompt and prefix tuning.
Every row runs ``adapterkit.audio.pipeline.run_audio`` (``data.source: asterisk_lid``) once
per seed on one fixed split (the seed changes the head/adapter init and the batch order);
per seed the accuracy gets a percentile bootstrap over test clips, and the row a Student-t
interval over seeds.

    python examples/whisper_petl_lid.py --profile           # one epoch of one run per Whisper model
    python examples/whisper_petl_lid.py                     # the grid (writes as it goes; reruns skip done runs)
    python examples/whisper_petl_lid.py --report-only       # markdown + plot from the JSON

    python examples/whisper_petl_lid.py --task wordclass    # the second task: spoken-word category

``--task wordclass``: number / ordinal / weekday-month / letter / spelling-alphabet word from the
same prompts (``data.source: asterisk_wordclass``): the split is by prompt name across languages,
so a test word is never heard in training in any language; extra row ``duration`` (a Gaussian
classifier on the recording's length alone) shows how much the length gives away.

Outputs: docs/results/audio/whisper_lid.{json,md,png} (--task wordclass: whisper_wordclass.*; run
folders under --runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results" / "audio"

PETL_LR, FULL_LR, PROMPT_LR = 5e-3, 5e-5, 1e-2  # the reference's learning rates
# name -> (method, adapter overrides, lr, what it is)
ROWS: dict[str, tuple] = {
    "majority": (None, None, None, "the most frequent training label (no model)"),
    "duration": (None, None, None, "Gaussian classifier on the recording's log duration alone (no model)"),
    "linear_probe": ("linear_probe", None, PETL_LR, "frozen encoder, mean-pooled tokens, trained head"),
    "full_ft": ("full", None, FULL_LR, "every encoder weight + head"),
    "pfeiffer_par_bn": ("petl_adapter", {"adapter_type": "pfeiffer", "placement": "parallel", "block": "bottleneck"},
                        PETL_LR, "bottleneck next to the FFN, reference init (all zeros), RR 64"),
    "pfeiffer_seq_bn": ("petl_adapter", {"adapter_type": "pfeiffer", "placement": "sequential", "block": "bottleneck"},
                        PETL_LR, "bottleneck after the FFN, no residual (A(FFN) replaces FFN), all zeros, RR 64"),
    "houlsby_par_bn": ("petl_adapter", {"adapter_type": "houlsby", "placement": "parallel", "block": "bottleneck"},
                       PETL_LR, "bottlenecks next to FFN and attention, all zeros, RR 64"),
    "houlsby_seq_bn": ("petl_adapter", {"adapter_type": "houlsby", "placement": "sequential", "block": "bottleneck"},
                       PETL_LR, "bottlenecks after FFN and attention, no residual, all zeros, RR 64"),
    "conformer_par": ("petl_adapter", {"adapter_type": "pfeiffer", "placement": "parallel", "block": "conformer"},
                      PETL_LR, "Conformer adapter next to the FFN (the reference's default), RR 96"),
    "lora": ("lora", None, PETL_LR, "LoRA on W_q, W_v, rank d/64, scale 8/64"),
    "prompt": ("prompt", None, PROMPT_LR, "deep prompt tuning, 25 tokens"),
    "prefix": ("prefix", None, PETL_LR, "prefix tuning, 12 key + 12 value tokens per layer"),
    # beyond the reference's defaults: a bottleneck whose projections both learn
    "pfeiffer_par_bn_bert": ("petl_adapter", {"adapter_type": "pfeiffer", "placement": "parallel",
                                              "block": "bottleneck", "init": "bert"},
                             PETL_LR, "as pfeiffer_par_bn with N(0, 0.02) projections (not the reference)"),
    "pfeiffer_seq_bn_res_bert": ("petl_adapter", {"adapter_type": "pfeiffer", "placement": "sequential",
                                                  "block": "bottleneck", "init": "bert", "residual": True},
                                 PETL_LR, "sequential with the residual, N(0, 0.02) projections (not the reference)"),
}
DEFAULT_ROWS = [k for k in ROWS if not k.endswith("_bert") and k != "duration"]
WORDCLASS_ROWS = ["majority", "duration", "linear_probe", "full_ft", "conformer_par", "pfeiffer_par_bn", "lora"]
STEMS = {"lid": "whisper_lid", "wordclass": "whisper_wordclass"}

NOTES = [
    "Model choice: {profile}. The 3-seed grid on Whisper base would not fit the ~45 CPU-minute budget of this "
    "shared 2-core machine, so the grid runs on whisper-tiny.en (4 encoder layers, d = 384). tiny.en was trained "
    "on English speech only: the other four languages are outside its training data (Whisper base, multilingual, "
    "would likely separate them better; not measured here beyond the one-epoch profile).",
    "The reference's all-zero bottleneck (adapter.init: zeros) is what the bottleneck rows run: with GELU(0) = 0 "
    "only the up-projection bias ever gets gradient, so each bottleneck adapter is a learned bias vector (plus the "
    "trained LayerNorms). In sequential placement without the residual (the reference's default) A(FFN(LN h)) "
    "replaces FFN(LN h), so the pretrained FFN sub-layers (and for Houlsby also the attention) drop out of the "
    "encoder: the sequential rows measure that, not a learning adapter. Rows *_bert (when run) use N(0, 0.02) "
    "projections that both learn.",
    "The parallel rows read LN2(h), the FFN's normalised input (fc1's input; for Houlsby also LN1(x), q_proj's "
    "input), as the reference does (parallel_input: normalized, the ffn_in / attn_in places), not the residual "
    "stream: they did not depend on the Whisper profile's ffn_stream, which was fc1 when these ran and is "
    "final_layer_norm's input now (profiles/whisper.json).",
    "The Conformer adapter follows the reference's forward, which computes a LayerNorm of its input and discards "
    "it (adapter.input_layernorm: false).",
    "LoRA, prompt and prefix also train the final LayerNorm (the reference's prompt / prefix models do); every "
    "PETL row trains a new linear head on the mean-pooled tokens.",
    "The linear probe trains the head on the frozen encoder's pooled tokens, computed once (equal to running the "
    "frozen encoder every step, in eval mode), with the same epochs and lr as the adapters.",
    "Full fine-tuning uses the reference's lr 5e-5; with few steps it may be under-trained relative to the "
    "reference's schedule.",
    "Prompts longer than the window are cut (median prompt length 1.0-1.6 s per language; about 10% are over "
    "3.4 s), shorter ones zero-padded.",
]


WORDCLASS_NOTES = [n for n in NOTES if not n.startswith("Prompts longer")] + [
    "The words are short (median recording 0.5-1.2 s per class and language), so the 2 s window cuts almost none; "
    "shorter ones are zero-padded.",
    "Classes are uneven (es and it have more number prompts), so the majority class is above 20%.",
]


def base_config(a, model: str) -> dict:
    if getattr(a, "task", "lid") == "wordclass":
        data = {"source": "asterisk_wordclass", "languages": a.languages, "test_fraction": a.test_fraction,
                "clip_seconds": a.clip_seconds, "seed": a.split_seed}
    else:
        data = {"source": "asterisk_lid", "languages": a.languages, "train_per_language": a.train_per_language,
                "test_per_language": a.test_per_language, "clip_seconds": a.clip_seconds, "seed": a.split_seed}
    return {"domain": "audio", "data": data,
            "model": {"backbone": "hf", "name_or_path": model, "window_seconds": a.clip_seconds},
            "train": {"epochs": a.epochs, "batch_size": a.batch_size, "optimizer": "adamw", "betas": [0.9, 0.98],
                      "weight_decay": 0.1, "schedule": "cosine", "eval_batch_size": 64, "eval_each_epoch": False}}


def bootstrap(correct: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile bootstrap of the accuracy over test clips (vectorised)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(correct), size=(n_boot, len(correct)))
    accs = correct[idx].mean(1) * 100
    return float(np.percentile(accs, 2.5)), float(np.percentile(accs, 97.5))


def t_interval(values: list[float]) -> tuple[float, float, float]:
    from scipy import stats

    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    h = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, m - h, m + h


def run_one(a, row: str, seed: int, model: str, runs: Path, log) -> dict:
    from adapterkit.audio.pipeline import DATA_DEFAULTS, build_waveforms, run_audio
    from adapterkit.vision.common import section

    method, adapter, lr, _ = ROWS[row]
    cfg = base_config(a, model)
    if method is None:  # majority: the most frequent training label, predicted for every test clip
        d = section(cfg["data"], DATA_DEFAULTS, "data")
        _, ytr, _, yte, _ = build_waveforms(d)
        if row == "duration":
            pred = duration_predictions(d, ytr)
        else:
            maj = int(np.bincount(ytr).argmax())
            pred = np.full(len(yte), maj)
        return {"row": row, "seed": seed, "predictions": pred.tolist(), "labels": yte.tolist(), "trainable_params": 0,
                "trainable_percent": 0.0, "train_seconds": 0.0, "wall_seconds": 0.0, "n_train": len(ytr)}
    out = runs / row / f"seed{seed}"
    cfg.update({"method": method, "adapter": adapter, "output_dir": str(out)})
    cfg["train"].update({"lr": lr, "seed": seed})
    cfg["model"]["init_seed"] = seed
    res = run_audio(cfg, log=log)
    preds = json.loads((out / "predictions.json").read_text())
    p = next(iter(preds.values()))
    pred = [int(p[str(i)]) for i in range(len(p))]
    return {"row": row, "seed": seed, "predictions": pred, "labels": res["test_labels"],
            "trainable_params": res["trainable_params"], "total_params": res["total_params"],
            "trainable_percent": res["trainable_percent"], "train_seconds": res["train_seconds"],
            "wall_seconds": res["wall_seconds"], "n_train": res["n_train"], "steps": res["steps"],
            "final_train_loss": res["history"][-1]["train_loss"] if res["history"] else None,
            "engine_test_acc": res["test_acc"]}


def duration_predictions(d: dict, ytr: np.ndarray) -> np.ndarray:
    """Test predictions of a Gaussian classifier on log(recording length in s) fitted on the training
    recordings (class prior x normal density per class): what the length alone tells."""
    from adapterkit.audio.pipeline import _items

    train, test, _, _ = _items(d)

    def logdur(items):
        out = []
        for path, _ in items:
            import wave

            with wave.open(str(path), "rb") as w:
                out.append(np.log(w.getnframes() / w.getframerate()))
        return np.asarray(out)

    xtr, xte = logdur(train), logdur(test)
    ytr = np.asarray([lab for _, lab in train])
    k = int(ytr.max()) + 1
    mu = np.array([xtr[ytr == c].mean() for c in range(k)])
    sd = np.array([max(xtr[ytr == c].std(), 1e-3) for c in range(k)])
    prior = np.log(np.bincount(ytr, minlength=k) / len(ytr))
    ll = prior - np.log(sd) - 0.5 * ((xte[:, None] - mu) / sd) ** 2
    return ll.argmax(1)


def summarize(runs: list[dict], n_boot: int, languages: list[str], task: str = "lid") -> dict:
    """Per row: mean accuracy over seeds with a t interval, per-seed bootstrap intervals, the
    accuracy on the en + es test clips (one speaker reads both) and the confusion matrix."""
    rows: dict[str, dict] = {}
    same_voice_labels = {languages.index(x) for x in ("en", "es") if x in languages} if task == "lid" else set()
    if len(same_voice_labels) < 2:
        same_voice_labels = set()
    for r in runs:
        y, p = np.asarray(r["labels"]), np.asarray(r["predictions"])
        correct = (y == p).astype(float)
        r["accuracy"] = float(correct.mean() * 100)
        r["bootstrap_ci"] = bootstrap(correct, n_boot, 1000 + r["seed"])
        r["n_test"] = len(y)
    for name in ROWS:
        rs = sorted((r for r in runs if r["row"] == name), key=lambda r: r["seed"])
        if not rs:
            continue
        m, lo, hi = t_interval([r["accuracy"] for r in rs])
        same_voice = []  # en and es are read by the same speaker (Allison): language without a voice cue
        for r in rs:
            y, p = np.asarray(r["labels"]), np.asarray(r["predictions"])
            keep = np.isin(y, list(same_voice_labels))
            same_voice.append(float((y[keep] == p[keep]).mean() * 100) if keep.any() else float("nan"))
        k = len(np.unique(rs[0]["labels"]))
        conf = np.zeros((k, k), dtype=int)
        for r in rs:
            np.add.at(conf, (np.asarray(r["labels"]), np.asarray(r["predictions"])), 1)
        rows[name] = {"same_voice_en_es_accuracy": float(np.mean(same_voice)) if same_voice_labels else None,
                      "confusion_summed_over_seeds": conf.tolist(),"what": ROWS[name][3], "seeds": [r["seed"] for r in rs], "n_test": rs[0]["n_test"],
                      "n_train": rs[0]["n_train"], "mean_accuracy": m, "t_ci95": [lo, hi],
                      "per_seed": [{"seed": r["seed"], "accuracy": r["accuracy"], "bootstrap_ci95": r["bootstrap_ci"]}
                                   for r in rs],
                      "trainable_params": rs[0]["trainable_params"], "trainable_percent": rs[0]["trainable_percent"],
                      "train_seconds_mean": float(np.mean([r["train_seconds"] for r in rs]))}
    return rows


def paired_vs(runs: list[dict], a: str, b: str) -> dict | None:
    """Mean over seeds of acc(a) - acc(b) (same seed, same test clips) with a t interval."""
    ra = {r["seed"]: r["accuracy"] for r in runs if r["row"] == a}
    rb = {r["seed"]: r["accuracy"] for r in runs if r["row"] == b}
    seeds = sorted(set(ra) & set(rb))
    if len(seeds) < 2:
        return None
    m, lo, hi = t_interval([ra[s] - rb[s] for s in seeds])
    # the test-clip uncertainty alone: per clip the seed-averaged difference of correctness, bootstrapped over clips
    ca = {r["seed"]: np.asarray(r["labels"]) == np.asarray(r["predictions"]) for r in runs if r["row"] == a}
    cb = {r["seed"]: np.asarray(r["labels"]) == np.asarray(r["predictions"]) for r in runs if r["row"] == b}
    per_clip = np.mean([ca[s].astype(float) - cb[s].astype(float) for s in seeds], axis=0) * 100
    idx = np.random.default_rng(7).integers(0, len(per_clip), size=(2000, len(per_clip)))
    boots = per_clip[idx].mean(1)
    return {"a": a, "b": b, "seeds": seeds, "mean_diff": m, "t_ci95": [lo, hi],
            "clip_bootstrap_ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]}


def claims(summary: dict, runs: list[dict]) -> list[dict]:
    """The PETL-AST paper's claims, each checked against the numbers here (verdict from the
    paired-difference interval over seeds: holds / does not hold / not separable here)."""

    def verdict(p, want_ge: bool, margin: float = 0.0):
        if p is None:
            return "not run"
        lo, hi = p["t_ci95"]
        if want_ge:  # a >= b - margin
            return "holds" if lo >= -margin else ("does not hold" if hi < -margin else "not separable here")
        return "holds" if hi <= 0 else ("does not hold" if lo > 0 else "not separable here")

    out = []
    if "duration" in summary:  # (wordclass) does the encoder say more than the recording's length?
        for row in ("linear_probe", "conformer_par", "full_ft"):
            if row in summary:
                p = paired_vs(runs, row, "duration")
                out.append({"claim": f"{row} beats the length-only classifier (the encoder carries the word class "
                                     "beyond duration)", "evidence": p,
                            "verdict": "holds" if p and p["t_ci95"][0] > 0 else
                            ("does not hold" if p and p["t_ci95"][1] <= 0 else "not separable here")})
    adapters = [k for k in ("conformer_par", "pfeiffer_par_bn", "pfeiffer_seq_bn", "houlsby_par_bn", "houlsby_seq_bn")
                if k in summary]
    if "full_ft" in summary and adapters:
        best = max(adapters, key=lambda k: summary[k]["mean_accuracy"])
        p = paired_vs(runs, best, "full_ft")
        out.append({"claim": "adapters match full fine-tuning (within 1 point) at a few % of the parameters",
                    "evidence": p, "best_adapter": best, "trainable_percent": summary[best]["trainable_percent"],
                    "verdict": verdict(p, True, 1.0)})
    if "conformer_par" in summary and "pfeiffer_par_bn" in summary:
        p = paired_vs(runs, "conformer_par", "pfeiffer_par_bn")
        out.append({"claim": "the Conformer adapter beats the bottleneck adapter (same Pfeiffer parallel placement)",
                    "evidence": p, "verdict": "holds" if p and p["t_ci95"][0] > 0 else verdict(p, True)})
    for typ in ("pfeiffer", "houlsby"):
        a, b = f"{typ}_par_bn", f"{typ}_seq_bn"
        if a in summary and b in summary:
            p = paired_vs(runs, a, b)
            out.append({"claim": f"parallel beats sequential ({typ.capitalize()} bottleneck, both without residual)",
                        "evidence": p, "verdict": "holds" if p and p["t_ci95"][0] > 0 else verdict(p, True)})
    if "pfeiffer_par_bn" in summary and "houlsby_par_bn" in summary:
        p = paired_vs(runs, "houlsby_par_bn", "pfeiffer_par_bn")
        out.append({"claim": "Houlsby (FFN + attention adapters) is not better than Pfeiffer (FFN only) for its extra "
                             "parameters", "evidence": p,
                    "verdict": "holds" if p and p["t_ci95"][0] <= 0 else "does not hold" if p else "not run"})
    if "conformer_par" in summary:
        for base in ("lora", "prompt", "prefix"):
            if base in summary:
                p = paired_vs(runs, base, "conformer_par")
                out.append({"claim": f"{base} is weaker than the Conformer adapter", "evidence": p,
                            "verdict": "holds" if p and p["t_ci95"][1] < 0 else
                            ("does not hold" if p and p["t_ci95"][0] >= 0 else "not separable here")})
    return out


def _intro_lid(data: dict) -> list[str]:
    return [f"Model **{data['settings']['model']}** (real weights from the offline CTranslate2 package), "
            f"input window cut to {data['settings']['clip_seconds']} s "
            f"({int(data['settings']['clip_seconds'] * 50)} encoder tokens). Task: which of "
            f"{', '.join(data['settings']['languages'])} a prompt is spoken in "
            "(Asterisk telephone prompts, 8 kHz resampled to 16 kHz, cut or zero-padded). "
            f"Split (seed {data['settings']['split_seed']}): per language a seeded permutation of the prompt names, "
            f"{data['settings']['test_per_language']} test and {data['settings']['train_per_language']} training "
            "recordings: no recording is in two splits. "
            f"Training: {data['settings']['epochs']} epochs, batch {data['settings']['batch_size']}, AdamW "
            "(0.9, 0.98), weight decay 0.1, cosine; lr 5e-3 (adapters, LoRA, prefix, probe), 1e-2 (prompt), "
            "5e-5 (full fine-tuning), the reference's; the last epoch's weights are tested (no validation split).",
            "",
            "**Caveat: one voice per language.** The Asterisk prompts of each language are read by one speaker "
            "(en, es: Allison; fr: June; it: Carlo; ru: an IVR voice), so the label also names the speaker and "
            "the channel: this measures language *or voice* identification, not speaker-independent LID.", "",
            f"Intervals: the row's mean over {len(data['settings']['seeds'])} seeds with a 95% Student-t interval "
            "(the seed changes the head / adapter init and the batch order; the split is fixed); per seed a 95% "
            "percentile bootstrap over the test clips (2000 resamples). Chance (and the majority class) is "
            f"{100 / len(data['settings']['languages']):.0f}%.", "",
            "Column *en+es*: accuracy on the en and es test clips alone (mean over seeds; any other label counts "
            "as wrong). One speaker (Allison) reads both languages, so a classifier that recognises only the voice "
            "gets at most 50% here (it cannot tell en from es); above 50% is language identification without a "
            "voice cue.", ""]


def _intro_wordclass(data: dict) -> list[str]:
    st = data["settings"]
    first = next(iter(data["summary"].values()))
    counts = np.bincount(np.asarray(next(r for r in data["runs"] if r["row"] == "majority")["labels"])) \
        if any(r["row"] == "majority" for r in data["runs"]) else None
    return [f"Model **{st['model']}** (real weights from the offline CTranslate2 package), input window cut to "
            f"{st['clip_seconds']} s ({int(st['clip_seconds'] * 50)} encoder tokens). Task: the category of a "
            "spoken word, one of number (digits/0 ... digits/90: \"seven\", \"sette\", \"семь\"), ordinal "
            "(digits/h-N), weekday or month name (digits/day-N, digits/mon-N), letter (letters/a ... z) or "
            "spelling-alphabet word (phonetic/a_p ...: \"alpha\", \"a come ancona\"), over the Asterisk prompts "
            f"of {', '.join(st['languages'])} (8 kHz resampled to 16 kHz, cut or zero-padded).", "",
            f"Split (seed {st['split_seed']}): by prompt **name** across languages: per class a seeded permutation "
            f"of the names puts {st['test_fraction']:.0%} of them in test, and a test name is test in every "
            "language, so no test word is heard in training in any language (nor any recording in two splits). "
            f"{first['n_train']} training and {first['n_test']} test recordings"
            + (f" (test per class: {', '.join(f'{c} {n}' for c, n in zip(WORDCLASS_NAMES, counts))})"
               if counts is not None else "") + ". Every class is read by all five voices, so the voice does not "
            "give the class away; the recording's length may, which the *duration* row measures (a Gaussian "
            "classifier on log duration alone, fitted on the training recordings). Training as the language-ID "
            f"grid: {st['epochs']} epochs, batch {st['batch_size']}, AdamW (0.9, 0.98), weight decay 0.1, cosine; "
            "lr 5e-3 (adapters, LoRA, probe), 5e-5 (full fine-tuning); the last epoch's weights are tested.", "",
            f"Intervals: the row's mean over {len(st['seeds'])} seeds with a 95% Student-t interval (the seed "
            "changes the head / adapter init and the batch order; the split is fixed); per seed a 95% percentile "
            "bootstrap over the test clips (2000 resamples). The majority class is the most frequent training "
            "label.", ""]


WORDCLASS_NAMES = ["number", "ordinal", "calendar", "letter", "phonetic"]


def write_report(data: dict, out: Path) -> None:
    s = data["summary"]
    task = data["settings"].get("task", "lid")
    title = ("# PETL-AST methods on the Whisper encoder: spoken-language identification" if task == "lid" else
             "# PETL-AST methods on the Whisper encoder: spoken-word category across five languages")
    lines = [title, "",
             "Commands (the grid ran in these invocations; each skips the runs already in the JSON, and one "
             "invocation with all the rows gives the same runs):", "",
             *[f"    {c}" for c in data.get("commands", [data.get("command", "")])], "",
             *(_intro_lid(data) if task == "lid" else _intro_wordclass(data)),
             "| row | what | n test | seeds | trainable | trainable % | accuracy % (mean, 95% t CI over seeds) | "
             "per seed (95% bootstrap CI over clips) |" + (" en+es |" if task == "lid" else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if task == "lid" else "")]
    for name, r in s.items():
        lo, hi = r["t_ci95"]
        ci = f"{r['mean_accuracy']:.1f} [{lo:.1f}, {hi:.1f}]" if np.isfinite(lo) else f"{r['mean_accuracy']:.1f}"
        per = "; ".join(f"{p['accuracy']:.1f} [{p['bootstrap_ci95'][0]:.1f}, {p['bootstrap_ci95'][1]:.1f}]"
                        for p in r["per_seed"])
        sv = r.get("same_voice_en_es_accuracy")
        lines.append(f"| {name} | {r['what']} | {r['n_test']} | {len(r['seeds'])} | {r['trainable_params']:,} | "
                     f"{r['trainable_percent']:.2f} | {ci} | {per} |"
                     + (f" {'' if sv is None else f'{sv:.1f}'} |" if task == "lid" else ""))
    missing = [k for k in data["settings"]["rows"] if k not in s]
    few = [k for k in s if len(s[k]["seeds"]) < len(data["settings"]["seeds"]) and k not in ("majority", "duration")]
    left = [k for k in (DEFAULT_ROWS if task == "lid" else WORDCLASS_ROWS) if k not in s and k not in missing]
    if few:
        lines += ["", f"Fewer seeds than {len(data['settings']['seeds'])} (the run stopped at the time budget): "
                      f"{', '.join(few)}; their intervals over seeds are wider or absent."]
    if missing:
        lines += ["", f"In the grid but not run (time budget): {', '.join(missing)}."]
    if left:
        lines += ["", f"Left out of this grid (time budget; the rows exist in the script): {', '.join(left)}."]
    lines += ["", "## The paper's claims here", "",
              "Verdicts from the paired difference over seeds (same seed, same test clips) and its 95% t interval "
              "(with 2-3 seeds a wide one); the interval over test clips alone shows the test-set part of the "
              "uncertainty (it ignores the seed-to-seed spread).", ""]
    for c in data["claims"]:
        e = c.get("evidence")
        ev = (f"{e['a']} - {e['b']}: {e['mean_diff']:+.1f} points, 95% t CI over {len(e['seeds'])} seeds "
              f"[{e['t_ci95'][0]:+.1f}, {e['t_ci95'][1]:+.1f}]; over test clips alone (bootstrap of the "
              f"seed-averaged per-clip difference) [{e['clip_bootstrap_ci95'][0]:+.1f}, {e['clip_bootstrap_ci95'][1]:+.1f}]"
              if e else "no data")
        extra = f" (best adapter {c['best_adapter']}, {c['trainable_percent']:.2f}% trainable)" \
            if "best_adapter" in c else ""
        lines.append(f"- **{c['claim']}**: {c['verdict']}. {ev}{extra}.")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in data.get("notes", [])]
    if data.get("profile"):
        lines += ["", "## Profile: one run of the Conformer row with 1 epoch, per model (this shared 2-core machine)", "",
                  f"Command: `{data.get('profile_command', '')}`", "",
                  "| model | engine s (1 epoch + test) | load + features s | encoder + head params |",
                  "|---|---|---|---|"]
        for k, v in data["profile"].items():
            lines.append(f"| {k} | {v['engine_seconds']:.1f} | {v['load_and_features_seconds']:.1f} | "
                         f"{v['total_params']:,} |")
    (out / f"{STEMS[task]}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = data["summary"]
    names = list(s)
    m = np.array([s[k]["mean_accuracy"] for k in names])
    lo = np.array([s[k]["t_ci95"][0] for k in names])
    hi = np.array([s[k]["t_ci95"][1] for k in names])
    err = np.nan_to_num(np.stack([m - lo, hi - m]))
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(range(len(names)), m, yerr=err, capsize=3, color="tab:blue")
    for i, k in enumerate(names):
        ax.text(i, 2, f"{s[k]['trainable_percent']:.3g}%", ha="center", fontsize=7, color="white", rotation=90)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy % (mean, 95% t CI)")
    task = data["settings"].get("task", "lid")
    what = "Language ID" if task == "lid" else "Spoken-word category"
    ax.set_title(f"{what} on {data['settings']['model']} ({s[names[0]]['n_test']} test clips; bar text: "
                 "trainable %)", fontsize=9)
    ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(out / f"{STEMS[task]}.png", dpi=120)
    plt.close(fig)


def profile(a, runs: Path, log) -> dict:
    res = {}
    for model in ("whisper-tiny.en", "whisper-base"):
        b = argparse.Namespace(**{**vars(a), "epochs": 1})
        t0 = time.time()
        r = run_one(b, "conformer_par", 0, model, runs / f"profile-{model}", log)
        res[model] = {"engine_seconds": r["train_seconds"], "wall_seconds": time.time() - t0,
                      "load_and_features_seconds": max(0.0, r["wall_seconds"] - r["train_seconds"]),
                      "total_params": r["total_params"], "accuracy_after_1_epoch": r["engine_test_acc"]}
        log(f"profile {model}: {res[model]}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="whisper-tiny.en")
    ap.add_argument("--task", choices=list(STEMS), default="lid", help="lid: spoken-language identification; "
                    "wordclass: spoken-word category (split by prompt name across languages)")
    ap.add_argument("--rows", nargs="+", default=None, choices=list(ROWS),
                    help=f"default: lid {' '.join(DEFAULT_ROWS)}; wordclass {' '.join(WORDCLASS_ROWS)}")
    ap.add_argument("--test-fraction", type=float, default=0.4, help="wordclass: share of each class's names in test")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--languages", nargs="+", default=["en", "es", "fr", "it", "ru"])
    ap.add_argument("--train-per-language", type=int, default=16)
    ap.add_argument("--test-per-language", type=int, default=50)
    ap.add_argument("--clip-seconds", type=float, default=2.0)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", default="/tmp/adapterkit-whisper-lid-runs", help="run folders (weights, logs)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--profile", action="store_true", help="time one epoch per Whisper model and stop")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args(argv)
    if a.rows is None:
        a.rows = DEFAULT_ROWS if a.task == "lid" else WORDCLASS_ROWS
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(a.threads)
    out, runs = Path(a.out), Path(a.runs)
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"{STEMS[a.task]}.json"
    log = lambda s: print(s, flush=True)  # noqa: E731
    data = json.loads(js.read_text()) if js.is_file() else {}
    if a.profile:
        data["profile"] = profile(a, runs, log)
        data["profile_command"] = "python " + " ".join(shlex.quote(x) for x in [sys.argv[0]] + sys.argv[1:])
        js.write_text(json.dumps(data, indent=1))
        return
    settings = {"model": a.model, "rows": a.rows, "seeds": a.seeds, "languages": a.languages,
                "train_per_language": a.train_per_language, "test_per_language": a.test_per_language,
                "clip_seconds": a.clip_seconds, "epochs": a.epochs, "batch_size": a.batch_size,
                "split_seed": a.split_seed, "bootstrap": a.bootstrap}
    if a.task != "lid":  # (the language-ID settings keep their keys: its JSON's runs stay valid)
        settings = {k: v for k, v in settings.items() if not k.endswith("_per_language")}
        settings.update(task=a.task, test_fraction=a.test_fraction)
    if not a.report_only:
        if data.get("settings") and {k: v for k, v in data["settings"].items() if k != "rows"} != \
                {k: v for k, v in settings.items() if k != "rows"}:
            data["runs"] = []  # other settings: start over
        data["settings"] = settings
        data["command"] = "python " + " ".join(shlex.quote(x) for x in ["examples/whisper_petl_lid.py"] + sys.argv[1:])
        data.setdefault("commands", [])
        if data["command"] not in data["commands"]:
            data["commands"].append(data["command"])
        data.setdefault("runs", [])
        done = {(r["row"], r["seed"]) for r in data["runs"]}
        for seed in a.seeds:  # seed-major: every row gets a first seed before any gets a third
            for row in a.rows:
                if (row, seed) in done:
                    continue
                t0 = time.time()
                r = run_one(a, row, seed, a.model, runs, log)
                log(f"== {row} seed {seed}: acc {np.mean(np.array(r['labels']) == np.array(r['predictions'])) * 100:.1f}"
                    f" in {time.time() - t0:.0f}s")
                data["runs"].append(r)
                data["summary"] = summarize(data["runs"], a.bootstrap, a.languages, a.task)
                data["claims"] = claims(data["summary"], data["runs"])
                js.write_text(json.dumps(data, indent=1))
    task = data["settings"].get("task", "lid")
    data["summary"] = summarize(data["runs"], data["settings"]["bootstrap"], data["settings"]["languages"], task)
    data["claims"] = claims(data["summary"], data["runs"])
    prof = data.get("profile") or {}
    if task != "lid" and (out / f"{STEMS['lid']}.json").is_file():  # the profile is the language-ID grid's
        prof = json.loads((out / f"{STEMS['lid']}.json").read_text()).get("profile") or {}
    if {"whisper-tiny.en", "whisper-base"} <= set(prof):
        t, b = prof["whisper-tiny.en"], prof["whisper-base"]
        ptxt = (f"one run of the Conformer row with 1 epoch took {b['engine_seconds']:.0f} s (train + test) on "
                f"whisper-base ({b['total_params'] / 1e6:.1f} M parameters) and {t['engine_seconds']:.0f} s on "
                f"whisper-tiny.en ({t['total_params'] / 1e6:.1f} M), {b['engine_seconds'] / t['engine_seconds']:.1f}x")
    else:
        ptxt = "not profiled"
    notes = NOTES if task == "lid" else WORDCLASS_NOTES
    data["notes"] = [n.replace("{profile}", ptxt) for n in notes] + data.get("extra_notes", [])
    js.write_text(json.dumps(data, indent=1))
    write_report(data, out)
    plot(data, out)


if __name__ == "__main__":
    main()
