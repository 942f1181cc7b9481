"""Ratios, speed-target checks, environment info and the markdown/JSON outputs."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

import torch

from adapterkit.errors import ConfigError
from adapterkit.safeio import atomic_write_json, atomic_write_text

# The speed targets (defined for the GPU run: BART-base shape, batch 64, 128/16 tokens, bf16).
FAST_METHODS = ("single_adapter", "single_lora", "single_compacter", "hyperformer", "single_prompt")
PEER_PAIRS = (  # (adapterkit case, peer case), configured alike: the adapterkit step must be faster
    ("lora_peer", "peft_lora"),
    ("lora_do0_peer", "peft_lora_do0"),
    ("prompt_peer", "peft_prompt"),
    ("houlsby_peer", "adapterhub_houlsby"),
    ("pfeiffer_peer", "adapterhub_pfeiffer"),
    ("compacter_peer", "adapterhub_compacter"),
)
MIXED_CASES = ("multiple_adapters_mixed", "multiple_lora_mixed")
MIXED_VS_PEFT = (("multiple_lora_mixed", "peft_multi_lora_mixed"),
                 ("infer_multiple_lora_mixed", "infer_peft_multi_lora_mixed"))


def set_threads(threads: int | None) -> None:
    """``--threads N`` of a bench command: torch's intra-op threads (None: leave them)."""
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def bench_command() -> str:
    """This process's ``adapterkit bench ...`` command line (with OMP_NUM_THREADS when set), for reports."""
    argv = sys.argv[1:]
    if argv[:1] == ["bench"]:
        argv = argv[1:]
    cmd = shlex.join(["adapterkit", "bench", *argv])
    if os.environ.get("OMP_NUM_THREADS"):
        cmd = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} {cmd}"
    return cmd


def _version(dist: str) -> str:
    """The installed version of a distribution (without importing it: peft takes seconds)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(device: str) -> dict:
    """Library versions and the machine, for the report header."""
    dev = torch.device(device)
    if dev.type == "cuda":
        machine = torch.cuda.get_device_name(dev)
    else:
        machine = f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"
    return {
        "device": str(dev), "machine": machine, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": _version("transformers"), "peft": _version("peft"), "adapters": _version("adapters"),
    }


def _ok(by: dict, name: str) -> dict | None:
    r = by.get(name)
    return r if r is not None and r.get("status") == "ok" else None


def add_ratios(results: list[dict], cases: dict) -> dict:
    """Add ``time_vs_ref``/``mem_vs_ref`` (and ``mixed_over_single``) to the records in place.

    A CUDA-graphed record (``case@graph``) is compared with the eager reference
    (``time_vs_ref``, what users of plain eager training get) and with the graphed
    reference (``time_vs_graph_ref``); its mixed-batch pair is the graphed single-task case.
    """
    by = {r["case"]: r for r in results}
    mixed = {}
    for r in results:
        if r.get("status") != "ok":
            continue
        case = cases[r.get("base", r["case"])]
        sfx = "" if r.get("variant", "eager") == "eager" else "@" + r["variant"]
        ref = _ok(by, case.ref)
        if ref is not None:
            r["time_vs_ref"] = r["median_ms"] / ref["median_ms"]
            if r.get("peak_gib") is not None and ref.get("peak_gib"):
                r["mem_vs_ref"] = r["peak_gib"] / ref["peak_gib"]
        gref = _ok(by, case.ref + sfx) if sfx else None
        if gref is not None:
            r["time_vs_graph_ref"] = r["median_ms"] / gref["median_ms"]
            if r.get("peak_gib") is not None and gref.get("peak_gib"):
                r["mem_vs_graph_ref"] = r["peak_gib"] / gref["peak_gib"]
        if case.pair:
            single = _ok(by, case.pair + sfx)
            if single is not None:
                r["mixed_over_single"] = r["median_ms"] / single["median_ms"]
                mixed[r["case"]] = {"single": case.pair + sfx, "ratio": r["mixed_over_single"]}
    return {"mixed_over_single": mixed}


def _target(tid: str, text: str, value: float | None, limit: float, op: str, why: str = "") -> dict:
    ok = None if value is None else (value <= limit if op == "<=" else value >= limit)
    return {"id": tid, "target": text, "value": value, "limit": limit, "op": op, "pass": ok,
            "why": why if value is None else ""}


# The views a target is evaluated in: (name, suffix of our cases, suffix of the baselines/peers).
VIEWS = (("eager", "", ""),                      # everything eager (the peer script's way)
         ("graph", "@graph", ""),                # adapterkit's graphed step vs eager baselines and peers
         ("graph_vs_graph", "@graph", "@graph"))  # every case graphed (the GPU-work ratio)


def check_targets(results: list[dict], meta: dict) -> list[dict]:
    """Evaluate the speed targets on this run, in every view the run has records for.

    Each target dict holds ``value``/``pass`` of the eager view and ``views`` with every
    view's value and pass (None where a case is missing or failed)."""
    by = {r["case"]: r for r in results}

    def ratio(a: str, b: str, key: str = "median_ms"):
        ra, rb = _ok(by, a), _ok(by, b)
        if ra is None or rb is None or ra.get(key) is None or not rb.get(key):
            missing = [n for n, r in ((a, ra), (b, rb)) if r is None or r.get(key) is None]
            return None, f"no {key} for {', '.join(missing)}" if missing else "reference is zero"
        return ra[key] / rb[key], ""

    specs = []  # (id, text, fn(mine_sfx, ref_sfx) -> (value, why), limit, op)
    for m in FAST_METHODS:
        specs.append((f"step:{m}", f"{m} training step <= 0.70x full FT",
                      lambda a, b, m=m: ratio(m + a, "full_ft" + b), 0.70, "<="))
    for m in FAST_METHODS:
        specs.append((f"mem:{m}", f"{m} peak memory <= 0.70x full FT",
                      lambda a, b, m=m: ratio(m + a, "full_ft" + b, "peak_gib"), 0.70, "<="))
    for mine, peer in PEER_PAIRS:
        specs.append((f"peer:{mine}", f"{mine} step faster than {peer}",
                      lambda a, b, mine=mine, peer=peer: ratio(mine + a, peer + b), 1.0, "<="))
    for m in MIXED_CASES:
        single = m.replace("_mixed", "_single")
        specs.append((f"mixed:{m}", f"{m} <= 1.15x {single}",
                      lambda a, b, m=m, single=single: ratio(m + a, single + a), 1.15, "<="))
    for mine, peer in MIXED_VS_PEFT:
        specs.append((f"mixedpeer:{mine}", f"{mine} >= 2x faster than {peer} (value: peer/ours)",
                      lambda a, b, mine=mine, peer=peer: ratio(peer + b, mine + a), 2.0, ">="))
    specs.append(("infer:merged_lora", "merged LoRA inference = base (<= 1.03x, noise)",
                  lambda a, b: ratio("infer_single_lora_merged" + a, "infer_base" + b), 1.03, "<="))
    specs.append(("infer:bottleneck", "unmerged single adapter inference <= 1.10x base",
                  lambda a, b: ratio("infer_single_adapter" + a, "infer_base" + b), 1.10, "<="))

    cpu = meta.get("device", "").startswith("cpu")
    out = []
    for tid, text, fn, limit, op in specs:
        views = {}
        for name, a, b in VIEWS:
            if tid.startswith("mem:") and a != b:  # eager peaks are allocated bytes, graphed ones reserved
                views[name] = _target(tid, text, None, limit, op, "memory is compared within one mode")
                continue
            v, why = fn(a, b)
            if v is None and cpu and tid.startswith("mem:"):
                why = "peak memory is measured on GPU only"
            views[name] = _target(tid, text, v, limit, op, why)
        t = dict(views["eager"])
        t["views"] = {k: {"value": x["value"], "pass": x["pass"], "why": x["why"]} for k, x in views.items()}
        out.append(t)
    return out


# --- formatting -------------------------------------------------------------------------

def _f(v, fmt: str = ".2f", none: str = "n/a") -> str:
    if v is None:
        return none
    return format(v, fmt)


def _pct(v) -> str:
    if v is None:
        return "n/a"
    if v == 0:
        return "0"
    return f"{v:.3g}"


def to_markdown(report: dict) -> str:
    """The results as markdown tables (training, inference, mixed batches, targets)."""
    meta, results = report["meta"], report["results"]
    s, st = meta["shape"], meta["settings"]
    on_gpu = meta["device"].startswith("cuda")
    mem_col = "peak GiB" if on_gpu else "RSS Δ MiB"
    if meta.get("mode") == "interleaved":
        mem_col = "memory"
    lines = [
        f"Shape `{s['name']}` ({s['family']}, d {s['d_model']}, {s['encoder_layers']}+{s['decoder_layers']} layers, "
        f"FFN {s['ffn_dim']}, {s['heads']} heads, vocab {s['vocab_size']}); batch {st['batch']}, "
        f"{st['src']}/{st['tgt']} tokens, {st['dtype']}{' autocast' if st['dtype'] != 'fp32' else ''}, "
        f"{st['warmup']} warm-up + {st['steps']} timed steps{', torch.compile' if st['compile'] else ''}"
        f"{', frozen weights stored in ' + st['frozen_dtype'] if st.get('frozen_dtype') else ''}"
        f"{', cases interleaved round-robin' if meta.get('mode') == 'interleaved' else ''}.",
        f"Machine: {meta['machine']} ({meta['torch_threads']} torch threads); torch {meta['torch']}, "
        f"transformers {meta['transformers']}, peft {meta['peft']}, adapters {meta['adapters']}.",
        "",
    ]
    for variant in dict.fromkeys(r.get("variant", "eager") for r in results):
        graph = variant != "eager"
        for kind, title, ref in (("train", "Training step (forward + backward + AdamW)", "full FT"),
                                 ("infer", "Inference (forward only, no grad, eval mode)", "base")):
            rows = [r for r in results if r["kind"] == kind and r.get("variant", "eager") == variant]
            if not rows:
                continue
            if graph:
                title += ", CUDA-graphed (`adapterkit.GraphedStep`)"
                head = (f"| case | what | median ms | mean ms | vs {ref} (eager) | vs {ref} (graphed) | reserved GiB | "
                        f"mem vs {ref} (graphed) | trainable % | note |")
            else:
                head = f"| case | what | median ms | mean ms | vs {ref} | {mem_col} | mem vs {ref} | trainable % | note |"
            ncol = head.count("|") - 1
            lines += [f"### {title}", "", head, "|" + "---|" * ncol]
            for r in rows:
                if r["status"] != "ok":
                    msg = r.get("error") or r.get("note") or ""
                    lines.append(f"| {r['case']} | {r['title']} | {r['status']} |" + " |" * (ncol - 4)
                                 + f" {_cell(msg)} |")
                    continue
                mem = r.get("peak_gib") if on_gpu else r.get("rss_delta_mib")
                tp = _pct(r.get("trainable_pct")) if kind == "train" else "-"
                cells = [r["case"], r["title"], _f(r["median_ms"]), _f(r["mean_ms"]), _f(r.get("time_vs_ref"))]
                if graph:
                    cells += [_f(r.get("time_vs_graph_ref")), _f(mem), _f(r.get("mem_vs_graph_ref"))]
                else:
                    cells += [_f(mem, ".2f" if on_gpu else ".1f"), _f(r.get("mem_vs_ref"))]
                cells += [tp, _cell(r.get("note", ""))]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    mixed = report.get("ratios", {}).get("mixed_over_single", {})
    if mixed:
        lines += ["### Mixed-task batches (4 tasks interleaved vs one task)", "",
                  "| mixed case | single-task case | mixed / single |", "|---|---|---|"]
        lines += [f"| {k} | {v['single']} | {v['ratio']:.2f} |" for k, v in mixed.items()]
        lines.append("")
    targets = report.get("targets", [])
    if targets:
        views = [v for v, _, _ in VIEWS
                 if any(t.get("views", {}).get(v, {}).get("value") is not None for t in targets)] or ["eager"]
        names = {"eager": "all eager", "graph": "adapterkit graphed, baselines/peers eager",
                 "graph_vs_graph": "all graphed"}
        lines += ["### Speed targets" + ("" if on_gpu else " (defined for the GPU run; indicative only here)"), ""]
        if len(views) > 1:
            lines += ["Columns: " + "; ".join(f"*{names[v]}*" for v in views) + ". Each cell: ratio, pass/FAIL.", ""]
        lines += ["| target | limit | " + " | ".join(names[v] for v in views) + " |",
                  "|---|---|" + "---|" * len(views)]
        for t in targets:
            cells = []
            for v in views:
                x = t.get("views", {}).get(v, {"value": t["value"], "pass": t["pass"], "why": t["why"]})
                if x["value"] is None:
                    cells.append(f"n/a ({x['why']})" if len(views) == 1 else "n/a")
                else:
                    cells.append(f"{_f(x['value'])} {'pass' if x['pass'] else 'FAIL'}")
            lines.append(f"| {t['target']} | {t['op']} {t['limit']:g} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def write_outputs(report: dict, json_path: str | None, md_path: str | None, markdown: str) -> list[Path]:
    """Write the JSON and markdown atomically; returns the paths written."""
    written = []
    if json_path:
        written.append(atomic_write_json(json_path, report))
    if md_path:
        written.append(atomic_write_text(md_path, markdown + "\n"))
    return written
