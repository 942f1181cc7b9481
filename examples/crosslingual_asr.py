"""Cross-lingual low-resource ASR with adapters on Whisper base (Hou et al. 2021): zero-shot,
full fine-tuning, one new target adapter, MetaAdapter and SimAdapter on the asterisk prompts.

    python examples/crosslingual_asr.py --out runs/crosslingual --results docs/results/speech

Steps (each skipped when its results.json exists, so a rerun resumes):
1. zero-shot Whisper base on the target test set (and, with --window-check, 6 s vs 30 s on 30 utterances);
2. source language adapters (one run, per-language Pfeiffer adapters, seed 0);
3. MetaAdapter meta-training of one shared adapter over the sources (seed 0);
4. per seed: full fine-tuning, a new target adapter, MetaAdapter fine-tuning (init_from step 3),
   SimAdapter (fusion over the source adapters and this seed's target adapter, trained on the target);
5. the table: WER/CER per seed with the per-utterance bootstrap interval, the mean over seeds with
   a t interval, the paired (per seed) difference to full fine-tuning, trainable parameters.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ADAPTER = {"method": "pfeiffer", "bottleneck_dim": 64, "activation": "relu", "adapter_input": "normed_sum",
           "adapter_layernorm": "before",
           # Whisper is pre-LN: the stream entering the FFN is final_layer_norm's input. The whisper profile's
           # own ffn_stream is that module; the runs name it explicitly (they were made when the profile gave fc1,
           # whose input is already normalised), which changes nothing now
           "places": {"ffn_stream": [r"(?P<stack>encoder|decoder)\.layers\.(?P<layer>\d+)\.final_layer_norm$"]}}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


WINDOW_RUNS = ("window_6s", "window_30s")  # the 30-utterance zero-shot window check (--window-check-30)


def base_cfg(a, tasks, adapters, seed, epochs, lr, test=None, init_from=None, max_steps=None, seconds=None):
    return {"domain": "asr", "name": "run",
            "model": {"name_or_path": a.model, "audio_seconds": seconds or a.audio_seconds},
            "adapters": adapters,
            "data": {"source": "asterisk", "tasks": tasks, "train_per_task": a.train, "val_per_task": a.val,
                     "test_per_task": test or a.test, "seed": a.split_seed},
            "train": {"epochs": epochs, "max_steps": max_steps, "batch_size": a.batch_size, "lr": lr, "seed": seed,
                      "eval_every_epoch": False, "checkpoint_every": 10**6, "keep_last": 1},
            "eval": {"batch_size": 25, "max_new_tokens": a.max_new_tokens, "select_on": "last"},
            "init_from": init_from}


def engine_run(cfg, out):
    from adapterkit.audio.asr import build_engine, load_config

    out = Path(out)
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    t0 = time.time()
    # a resumed run may change its length (train.epochs / max_steps: the LR schedule follows)
    res = build_engine(load_config(cfg), out, allow_changes=("train.epochs", "train.max_steps")).fit()
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    log(f"{out.name}: {json.dumps({t: {k: round(v, 2) for k, v in m.items() if k in ('WER', 'CER')} for t, m in res['test'].items()})} ({time.time() - t0:.0f} s)")
    return res


def zero_shot(a, out, test, seconds=None):
    from adapterkit.audio.asr import ASRDomain, load_config

    out = Path(out)
    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    t0 = time.time()
    c = base_cfg(a, [a.target], [], 0, 1, None, test=test)
    if seconds is not None:
        c["model"]["audio_seconds"] = seconds
    dom = ASRDomain(load_config(c))
    dom.model.eval()
    preds = {}
    with torch.no_grad():
        for s in range(0, test, 25):
            preds.update(dom.predict_batch(a.target, "test", np.arange(s, min(s + 25, test))))
    res = {"test": {a.target: dom.score(a.target, "test", preds)}, "seconds": time.time() - t0,
           "audio_seconds": c["model"]["audio_seconds"],
           "test_fits_in_6s": score_within(dom, a.target, preds, 6.0)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.json").write_text(json.dumps({a.target: preds}, ensure_ascii=False, indent=0))
    (out / "results.json").write_text(json.dumps(res, indent=1))
    log(f"{out.name}: {res['test'][a.target]} ({res['seconds']:.0f} s)")
    return res


def score_within(dom, task, preds, seconds):
    """WER / CER (with the bootstrap interval) on the test utterances whose recording is at most
    ``seconds`` long: the ones a window of that length does not cut."""
    from adapterkit.audio.asr import SAMPLE_RATE, _length
    from adapterkit.audio.asr_metrics import corpus_rate_interval, error_counts

    us = [u for u in dom.utts[(task, "test")] if _length(u.audio) <= seconds * SAMPLE_RATE]
    out = {"seconds": seconds, "n": len(us), "n_all": len(dom.utts[(task, "test")])}
    for unit, name in (("word", "WER"), ("char", "CER")):
        e, n = error_counts([u.text for u in us], [preds[u.uid] for u in us], unit)
        iv = corpus_rate_interval(e, n)
        out[name] = float(e.sum() / max(int(n.sum()), 1)) * 100
        out[f"{name}_ci95"] = [float(iv.low) * 100, float(iv.high) * 100] if iv.low is not None else None
    return out


def window_subset(a, runs):
    """Per run folder here with predictions: WER / CER on the target test utterances whose recording
    fits in the 6 s window (a 6 s and a 30 s window see all of them) next to all utterances."""
    from adapterkit.audio.asr import SAMPLE_RATE, _length, asterisk_splits
    from adapterkit.audio.asr_metrics import corpus_rate_interval, error_counts

    test = asterisk_splits(a.target, {"train": a.train, "val": a.val, "test": a.test}, a.split_seed)["test"]
    fits = [u for u in test if _length(u.audio) <= 6.0 * SAMPLE_RATE]
    out = {"n_fit_in_6s": len(fits), "n_all": len(test), "runs": {}}
    for f in sorted(runs.glob("*/predictions.json")):
        preds = json.loads(f.read_text()).get(a.target, {})
        if not all(u.uid in preds for u in test):
            continue
        row = {}
        for part, us in (("all", test), ("fit_in_6s", fits)):
            for unit, name in (("word", "WER"), ("char", "CER")):
                e, n = error_counts([u.text for u in us], [preds[u.uid] for u in us], unit)
                iv = corpus_rate_interval(e, n)
                row[f"{name}_{part}"] = float(e.sum() / max(int(n.sum()), 1)) * 100
                row[f"{name}_{part}_ci95"] = [float(iv.low) * 100, float(iv.high) * 100] if iv.low is not None else None
        out["runs"][f.parent.name] = row
    return out


def read_run(folder):
    from safetensors.torch import load_file

    folder = Path(folder) / "final"
    out = dict(load_file(folder / "trainable.safetensors"))
    if (folder / "adapter_model.safetensors").exists():
        for k, v in load_file(folder / "adapter_model.safetensors").items():
            out.setdefault(k, v)
    return out


def sim_init(sources_run, target_run, sources, target, out):
    """The language adapters of the source run (stacked by source) and of the target adapter run,
    restacked in the SimAdapter set's task order and renamed to its parameters."""
    from safetensors.torch import save_file

    out = Path(out)  # rebuilt every time (cheap): it follows the runs it is made from
    src, tgt = read_run(sources_run), read_run(target_run)
    order = sorted(sources + [target])
    state = {}
    for k, v in src.items():
        if not k.startswith("adapterkit.sets.pfeiffer."):
            continue
        rows = [v[sources.index(t)] if t != target else tgt[k][0] for t in order]
        state[k.replace("adapterkit.sets.pfeiffer.", "adapterkit.sets.sim_adapter.", 1)] = \
            torch.stack(rows).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "trainable.safetensors"))
    return out


def trainable_count(run, method):
    st = read_run(run)
    if method.startswith("sim"):
        return sum(v.numel() for k, v in st.items() if ".fusions." in k)
    return sum(v.numel() for v in st.values())


def trainable_count_or_earlier(runs, prev, key, method, seeds):
    """Trainable parameters of row ``key``: counted from its first run folder here, else the results JSON's."""
    for s in seeds:
        if (runs / f"{key}_s{s}" / "final").exists():
            return trainable_count(runs / f"{key}_s{s}", method)
    n = prev.get("rows", {}).get(key, {}).get("trainable")
    if n is None:
        raise FileNotFoundError(f"no run folder of row {key} under {runs} and no trainable count in the results JSON")
    return n


def summarize(a, runs, results_dir):
    from adapterkit.stats import t_interval

    rows = {"zero_shot": "zero-shot Whisper base", "ft": "full fine-tuning (lr 1e-5)",
            "adapter": "new target adapter", "meta": "MetaAdapter", "sim": "SimAdapter (reference: + x_norm)",
            "simnone": "SimAdapter without the x_norm term",
            "simlow": "SimAdapter without x_norm, lr 1e-4",
            "zero_shot_30s": "zero-shot Whisper base, 30 s window", "adapter_30s": "new target adapter, 30 s window"}
    # runs made in an earlier session (their folder is not here) are read back from the results JSON
    # already written: its per-seed metrics and trainable counts; each row lists which seeds came from it
    prev_file = results_dir / "crosslingual.json"
    prev = json.loads(prev_file.read_text()) if prev_file.exists() else {"rows": {}}
    prev_ids = {key: {str(s): s for s in e.get("seeds", [])} for key, e in prev.get("rows", {}).items()}

    def earlier(key, s):
        """The test metrics of ``key`` seed ``s`` as recorded in the results JSON (None if absent)."""
        e = prev.get("rows", {}).get(key)
        if not e or str(s) not in prev_ids[key]:
            return None
        i = [str(x) for x in e["seeds"]].index(str(s))
        out = {"n": e["n_test"]}
        for m in ("WER", "CER"):
            out[m], out[f"{m}_ci95"] = e[m]["per_seed"][i], e[m]["per_seed_ci95"][i]
        return out

    def seed_result(key, s):
        """(metrics, from_json) of one run: its folder's results.json, else the earlier results JSON."""
        f = runs / (key if key.startswith("zero_shot") else f"{key}_s{s}") / "results.json"
        if f.exists():
            return json.loads(f.read_text())["test"][a.target], False
        r = earlier(key, s)
        return (r, True) if r is not None else (None, False)

    # every seed run here or recorded before (a run over some seeds keeps the others' rows)
    seeds = sorted(set(a.seeds) | {x for e in prev.get("rows", {}).values() for x in e.get("seeds", []) if x != "-"})
    table, js = [], {"config": vars(a), "rows": {}}
    ft = {}
    for s in seeds:
        r, _ = seed_result("ft", s)
        if r is not None:
            ft[s] = r
    total = trainable_count_or_earlier(runs, prev, "ft", "ft", seeds) if ft else None
    for key, label in rows.items():
        per, from_json = {}, []
        for s in (["-"] if key.startswith("zero_shot") else seeds):
            r, old = seed_result(key, s)
            if r is not None:
                per[s] = r
                if old:
                    from_json.append(s)
        if not per:
            continue
        entry = {"label": label, "n_test": next(iter(per.values()))["n"], "seeds": list(per),
                 "seeds_from_earlier_results_json": from_json}
        for m in ("WER", "CER"):
            vals = [p[m] for p in per.values()]
            iv = t_interval(vals)
            entry[m] = {"per_seed": vals, "per_seed_ci95": [p.get(f"{m}_ci95") for p in per.values()],
                        "mean": iv.mean, "ci95": [iv.low, iv.high]}
            # paired to full fine-tuning (6 s window): not for the zero-shot and 30 s window rows
            if not key.startswith(("zero_shot", "ft")) and not key.endswith("_30s") and all(s in ft for s in per):
                d = [per[s][m] - ft[s][m] for s in per]
                rel = [100 * (per[s][m] - ft[s][m]) / ft[s][m] for s in per]
                di, ri = t_interval(d), t_interval(rel)
                entry[m]["diff_vs_ft"] = {"per_seed": d, "mean": di.mean, "ci95": [di.low, di.high]}
                entry[m]["rel_diff_vs_ft_pct"] = {"per_seed": rel, "mean": ri.mean, "ci95": [ri.low, ri.high]}
        if not key.startswith("zero_shot"):
            n = trainable_count_or_earlier(runs, prev, key, key, entry["seeds"])
            entry["trainable"] = n
            entry["trainable_pct"] = 100 * n / total if total else None
        if key.startswith("zero_shot"):  # the same metric on the test utterances a 6 s window does not cut
            f = runs / key / "results.json"
            within = json.loads(f.read_text()).get("test_fits_in_6s") if f.exists() else \
                prev.get("rows", {}).get(key, {}).get("test_fits_in_6s")
            if within:
                entry["test_fits_in_6s"] = within
        js["rows"][key] = entry
        table.append(entry)
    if not table:
        raise SystemExit(f"no finished run under {runs} and no rows in {prev_file}")
    if any(runs.glob("*/predictions.json")):  # the window check: the utterances a 6 s window does not cut
        js["window_subset"] = window_subset(a, runs)
    elif "window_subset" in prev:
        js["window_subset"] = prev["window_subset"]
    for extra in WINDOW_RUNS:
        f = runs / extra / "results.json"
        if f.exists():
            js[extra] = json.loads(f.read_text())
        elif extra in prev:
            js[extra] = prev[extra]
    for extra in ("sources", "meta"):
        f = runs / extra / ("meta.json" if extra == "meta" else "results.json")
        if f.exists():
            js[extra] = json.loads(f.read_text())
        elif extra in prev:
            js[extra] = prev[extra]
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "crosslingual.json").write_text(json.dumps(js, indent=1))

    def fmt(e, m):
        x = e[m]
        lo, hi = x["ci95"]
        s = f"{x['mean']:.1f}" + (f" [{lo:.1f}, {hi:.1f}]" if lo is not None else "")
        return s

    def fdiff(e, m, k):
        x = e[m].get(k)
        if not x:
            return ""
        lo, hi = x["ci95"]
        return f"{x['mean']:+.1f} [{lo:+.1f}, {hi:+.1f}]" if lo is not None else f"{x['mean']:+.1f}"

    lines = ["| row | WER % (mean, 95% t-interval over seeds) | CER % | WER − FT (points) | WER rel. to FT (%) "
             "| CER − FT | trainable (% of Whisper base) | seeds | n test |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        tr = f"{e['trainable']:,}" + (f" ({e['trainable_pct']:.2f}%)" if e.get("trainable_pct") else "") \
            if "trainable" in e else "0"
        lines.append(f"| {e['label']} | {fmt(e, 'WER')} | {fmt(e, 'CER')} | {fdiff(e, 'WER', 'diff_vs_ft')} | "
                     f"{fdiff(e, 'WER', 'rel_diff_vs_ft_pct')} | {fdiff(e, 'CER', 'diff_vs_ft')} | {tr} | "
                     f"{len(e['seeds'])} | {e['n_test']} |")
    lines += ["", "Per seed (test WER / CER with the 95% bootstrap interval over the test utterances):", ""]
    for e in table:
        for s, w, wc, c, cc in zip(e["seeds"], e["WER"]["per_seed"], e["WER"]["per_seed_ci95"], e["CER"]["per_seed"],
                                   e["CER"]["per_seed_ci95"]):
            lines.append(f"- {e['label']}, seed {s}: WER {w:.1f} [{wc[0]:.1f}, {wc[1]:.1f}], "
                         f"CER {c:.1f} [{cc[0]:.1f}, {cc[1]:.1f}]")
    (results_dir / "crosslingual_table.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.2))
        for i, e in enumerate(table):
            ax.scatter([i] * len(e["WER"]["per_seed"]), e["WER"]["per_seed"], s=12, color="grey")
            lo, hi = e["WER"]["ci95"]
            ax.errorbar([i], [e["WER"]["mean"]], yerr=None if lo is None else
                        [[e["WER"]["mean"] - lo], [hi - e["WER"]["mean"]]], fmt="o", capsize=4)
        top = 55.0  # rows far above (diverged runs) are drawn at the top edge with their value
        for i, e in enumerate(table):
            if e["WER"]["mean"] > top:
                ax.annotate(f"{e['WER']['mean']:.0f} (off scale)", (i, top), ha="center", va="top", fontsize=7)
        ax.set_ylim(30, top)
        ax.set_xticks(range(len(table)), [e["label"].replace(" (lr 1e-5)", "") for e in table], rotation=15,
                      fontsize=8)
        ax.set_ylabel(f"test WER % ({a.target}, n={table[0]['n_test']})")
        fig.tight_layout()
        fig.savefig(results_dir / "crosslingual.png", dpi=120)
    except ImportError:
        pass
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/crosslingual")
    p.add_argument("--results", default="docs/results/speech")
    p.add_argument("--model", default="whisper-base")
    p.add_argument("--sources", nargs="+", default=["es", "fr", "ru"])
    p.add_argument("--target", default="it")
    p.add_argument("--train", type=int, default=50)
    p.add_argument("--val", type=int, default=20)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--source-test", type=int, default=20)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--audio-seconds", type=float, default=6.0)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=None, help="target runs: stop after this many steps")
    p.add_argument("--source-epochs", type=int, default=3)
    p.add_argument("--meta-epochs", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--rows", nargs="*", default=["sources", "meta_train", "adapter", "meta", "sim", "simnone", "ft"],
                   choices=["sources", "meta_train", "adapter", "meta", "sim", "simnone", "simlow", "ft", "adapter_30s"],
                   help="what to run: sources (the source language adapters) and meta_train (MetaAdapter "
                        "meta-training) once, then the trained rows per seed in this order; adapter_30s: the new "
                        "target adapter with Whisper's full 30 s window")
    p.add_argument("--sim-low-lr", type=float, default=1e-4)
    p.add_argument("--skip-zero-shot", action="store_true", help="do not run (or check for) the zero-shot row")
    p.add_argument("--window-check", action="store_true",
                   help="zero-shot with Whisper's full 30 s window on the whole target test set (row zero_shot_30s)")
    p.add_argument("--window-check-30", action="store_true", help="zero-shot 6 s vs 30 s window on 30 utterances")
    p.add_argument("--summary-only", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    runs, results = Path(a.out), Path(a.results)
    if a.summary_only:
        summarize(a, runs, results)
        return
    from adapterkit.audio.asr import load_config
    from adapterkit.audio.meta_adapter import MetaConfig, meta_train

    if not a.skip_zero_shot or a.window_check:
        zero_shot(a, runs / "zero_shot", a.test)
    sims = ("sim", "simnone", "simlow")
    if "sources" in a.rows or any(r in sims for r in a.rows):  # sim rows fuse the source adapters
        engine_run(base_cfg(a, a.sources, [dict(ADAPTER, sharing="per_task")], 0, a.source_epochs, 1e-3,
                            test=a.source_test), runs / "sources")
    if ("meta_train" in a.rows or "meta" in a.rows) and not (runs / "meta" / "meta.json").exists():
        t0 = time.time()
        meta_train(load_config(base_cfg(a, a.sources, [dict(ADAPTER, sharing="shared")], 0, 1, None,
                                        test=a.source_test)), runs / "meta",
                   MetaConfig(epochs=a.meta_epochs, batch_size=a.batch_size, seed=0))
        log(f"meta: {time.time() - t0:.0f} s")
    tgt = [a.target]
    langs = sorted(a.sources + tgt)
    for s in a.seeds:
        for row in a.rows:
            if row == "adapter":
                engine_run(base_cfg(a, tgt, [dict(ADAPTER, sharing="per_task")], s, a.epochs, 1e-3,
                                    max_steps=a.max_steps), runs / f"adapter_s{s}")
            elif row == "adapter_30s":
                engine_run(base_cfg(a, tgt, [dict(ADAPTER, sharing="per_task")], s, a.epochs, 1e-3,
                                    max_steps=a.max_steps, seconds=30.0), runs / f"adapter_30s_s{s}")
            elif row == "meta":
                engine_run(base_cfg(a, tgt, [dict(ADAPTER, sharing="shared")], s, a.epochs, 1e-3,
                                    init_from=str(runs / "meta"), max_steps=a.max_steps), runs / f"meta_s{s}")
            elif row in sims:  # sim: the reference's x_norm residual; simnone: without
                # it; simlow: without it and at --sim-low-lr (lr 1e-3 on the fusion diverges on Whisper base)
                engine_run(base_cfg(a, tgt, [dict(ADAPTER, sharing="per_task")], s, a.epochs, 1e-3,
                                    max_steps=a.max_steps), runs / f"adapter_s{s}")
                init = sim_init(runs / "sources", runs / f"adapter_s{s}", a.sources, a.target,
                                runs / f"sim_init_s{s}")
                sim = dict(ADAPTER, method="sim_adapter", fusion=langs, target=a.target,
                           fusion_residual="x_norm" if row == "sim" else "none")
                lr = a.sim_low_lr if row == "simlow" else 1e-3
                engine_run(base_cfg(a, tgt, [sim], s, a.epochs, lr, init_from=str(init), max_steps=a.max_steps),
                           runs / f"{row}_s{s}")
            elif row == "ft":
                engine_run(base_cfg(a, tgt, [], s, a.epochs, 1e-5, max_steps=a.max_steps), runs / f"ft_s{s}")
        summarize(a, runs, results)
    if a.window_check:
        zero_shot(a, runs / "zero_shot_30s", a.test, 30.0)
    if a.window_check_30:
        zero_shot(a, runs / "window_6s", 30, 6.0)
        zero_shot(a, runs / "window_30s", 30, 30.0)
    summarize(a, runs, results)


if __name__ == "__main__":
    sys.exit(main())
