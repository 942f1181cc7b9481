"""``adapterkit bench --efficiency`` on a tiny random-init encoder: time to target (curves,
targets, unreached targets as None), latency (every case at every point, ratios with
intervals), serving N tasks (parameters stored, routed rows equal to the single-task model),
and the CLI writing its outputs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from adapterkit.bench import efficiency as E
from adapterkit.errors import ConfigError
from adapterkit.testing.fixtures import make_text_fixture


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eff")
    make_text_fixture(root)
    return root


def tiny(**kw) -> E.EfficiencySettings:
    s = E.EfficiencySettings(model="tiny-bert", task="topic", seeds=2, train_examples=40, val_examples=16,
                             max_length=12, batch=4, steps=6, eval_every=3, warmup_steps=1,
                             lat_batches=[1, 2], lat_seqs=[4, 8], lat_rounds=3, serve_tasks=[1, 2],
                             serve_batch=4, serve_seq=6, serve_rounds=2, num_labels=3)
    return replace(s, **kw)


def test_time_to_target_first_hit_and_none_when_unreached():
    curve = [{"step": 5, "train_s": 1.0, "acc": 40.0}, {"step": 10, "train_s": 2.0, "acc": 70.0},
             {"step": 15, "train_s": 3.0, "acc": 65.0}, {"step": 20, "train_s": 4.0, "acc": 90.0}]
    assert E.time_to_target(curve, 60.0) == {"step": 10, "train_s": 2.0, "acc": 70.0}
    assert E.time_to_target(curve, 90.0)["step"] == 20
    assert E.time_to_target(curve, 90.1) is None
    assert E.time_to_target([], 1.0) is None


def test_train_part_curves_targets_and_unreached(data):
    s = tiny(parts=["train"], rel_targets=[0.5, 1.0], abs_targets=[101.0])
    rep = E.run_efficiency(s, str(data), log=lambda x: None)
    tr = rep["train"]
    assert len(tr["seeds"]) == 2
    for sd in tr["seeds"]:
        assert set(sd["runs"]) == {"full_ft", "houlsby", "lora"}
        for r in sd["runs"].values():
            assert len(r["step_s"]) == 6 and all(t > 0 for t in r["step_s"])
            assert [p["step"] for p in r["curve"]] == [3, 6]
            assert r["curve"][-1]["train_s"] == pytest.approx(sum(r["step_s"]))
    sm = tr["summary"]
    assert [t["name"] for t in sm["targets"]] == ["0.5 x full FT best", "1 x full FT best", "101% accuracy"]
    full = sm["methods"]["full_ft"]
    assert full["trainable_pct"] == pytest.approx(100.0)
    assert sm["methods"]["lora"]["trainable"] < full["trainable"]
    assert full["step_vs_full_ft"]["mean"] == pytest.approx(1.0)
    # full FT's best is the mean over seeds of its best: 1 x reaches it in at least one seed
    assert full["to_target"][1]["reached"] >= 1
    for m, r in sm["methods"].items():
        unreached = r["to_target"][2]  # 101% is never reached: None per seed, no mean, never the budget
        assert unreached["reached"] == 0 and unreached["per_seed"] == [None, None], m
        assert unreached["train_s"]["mean"] is None and unreached["steps"]["mean"] is None
        assert unreached["time_vs_full_ft"]["mean"] is None
        assert r["to_target"][0]["reached"] == 2  # half of full FT's best: every seed reaches it
    md = E.to_markdown(rep)
    assert "Time to target" in md and "0/2" in md and "| n/a |" in md


def test_summary_interval_over_reached_seeds_only():
    def run(accs, step_s=0.5):
        return {"trainable": 1, "total": 10, "lr": 1e-3, "step_s": [step_s] * len(accs), "median_step_s": step_s,
                "best_acc": max(accs),
                "curve": [{"step": i + 1, "train_s": step_s * (i + 1), "acc": a} for i, a in enumerate(accs)]}
    seeds = [{"runs": {"full_ft": run([50, 80, 90], 1.0), "lora": run([10, 20, 85])}},
             {"runs": {"full_ft": run([60, 90, 90], 1.0), "lora": run([10, 20, 30])}},
             {"runs": {"full_ft": run([90, 90, 90], 1.0), "lora": run([10, 90, 90])}}]
    s = E.EfficiencySettings(rel_targets=[], abs_targets=[85.0])
    sm = E.summarize_train(seeds, s)
    row = sm["methods"]["lora"]["to_target"][0]
    assert row["reached"] == 2 and row["per_seed"][1] is None
    assert row["steps"]["mean"] == pytest.approx(2.5) and row["steps"]["n"] == 2
    assert row["train_s"]["mean"] == pytest.approx(1.25)
    # paired with full FT where both reached it: seed 0 (1.5 / 3.0), seed 2 (1.0 / 1.0)
    assert row["time_vs_full_ft"]["mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert sm["methods"]["lora"]["step_vs_full_ft"]["mean"] == pytest.approx(0.5)


def test_latency_every_case_every_point_with_ratios():
    s = tiny(parts=["latency"])
    base, _ = E.load_encoder("tiny-bert", 0)
    lat = E.run_latency(s, base.eval(), log=lambda x: None)
    assert lat["cases"] == list(E.LATENCY_CASES)
    assert len(lat["records"]) == 4 * 2 * 2
    for r in lat["records"]:
        assert len(r["ms"]) == 3 and r["median_ms"] > 0
        if r["case"] == "base":
            assert "vs_base" not in r
        else:
            v = r["vs_base"]
            assert v["low"] <= v["mean"] <= v["high"] and v["n"] == 3


def test_latency_models_compute_what_they_claim():
    base, _ = E.load_encoder("tiny-bert", 0)
    base.eval()
    x = E._ids(base.config.vocab_size, 2, 5, 0)
    with torch.no_grad():
        ref = base(**x).last_hidden_state
        merged = E._latency_model(base, "lora_merged")(**x).last_hidden_state
        unmerged = E._latency_model(base, "lora_unmerged")(**x).last_hidden_state
    assert torch.allclose(merged, unmerged, atol=1e-5)  # same (non-zero) LoRA, merged or not
    assert not torch.allclose(ref, unmerged, atol=1e-4)  # and it does change the output


def test_serve_params_memory_throughput_and_routing():
    s = tiny(parts=["serve"], serve_tasks=[1, 2, 4], serve_batch=8)
    base, _ = E.load_encoder("tiny-bert", 0)
    sv = E.run_serve(s, base.eval(), log=lambda x: None)
    p0 = sv["base_params"]
    by = {(r["tasks"], r["case"]): r for r in sv["records"]}
    assert len(by) == 3 * len(E.SERVE_CASES)
    for n in (1, 2, 4):
        copies, multi = by[(n, "full_ft_copies")], by[(n, "multi_task")]
        heads = multi["params_stored"] - p0
        assert copies["params_stored"] == n * p0 + heads  # N whole models
        assert by[(n, "lora_adapters")]["params_stored"] > multi["params_stored"]
        assert by[(n, "lora_adapters")]["params_stored"] < p0 * 1.5
        for c in E.SERVE_CASES:
            r = by[(n, c)]
            assert r["rows_per_s"] > 0 and len(r["ms"]) == 2
            assert ("time_vs_multi_task" in r) == (c != "multi_task")
    assert by[(4, "lora_adapters")]["params_stored"] > by[(2, "lora_adapters")]["params_stored"]
    md = "\n".join(E._serve_md(sv, E.asdict(s)))
    assert "full_ft_copies" in md


def test_serve_mixed_batch_rows_equal_their_task_alone():
    base, _ = E.load_encoder("tiny-bert", 0)
    base.eval()
    srv = E._Server("houlsby_adapters", base, 2, 3, 0)
    x = E._ids(base.config.vocab_size, 4, 6, 0)
    rows = [0, 1, 0, 1]
    with torch.no_grad():
        mixed = srv(x, rows)
        for t in (0, 1):
            sel = [i for i, r in enumerate(rows) if r == t]
            alone = srv({k: v[sel] for k, v in x.items()}, [t] * len(sel))
            assert torch.allclose(mixed[sel], alone, atol=1e-5)
        other = srv(x, [1, 0, 1, 0])
    assert not torch.allclose(mixed, other, atol=1e-4)  # the tasks' adapters and heads differ


def test_settings_validation_and_cli_parsing():
    with pytest.raises(ConfigError, match="unknown part"):
        E.EfficiencySettings(parts=["nope"]).validate()
    with pytest.raises(ConfigError, match="unknown method"):
        E.EfficiencySettings(methods=["full_ft", "x"]).validate()
    with pytest.raises(ConfigError, match="full_ft"):
        E.EfficiencySettings(methods=["lora"]).validate()
    with pytest.raises(ConfigError, match="cannot each have a row"):
        E.EfficiencySettings(serve_tasks=[64], serve_batch=8).validate()
    import argparse

    from adapterkit.bench.cli import _configure

    p = _configure(argparse.ArgumentParser())
    a = p.parse_args(["--efficiency", "--efficiency-parts", "latency,serve", "--efficiency-set", "seeds=2",
                      "--efficiency-set", "lat_batches=1,4", "--efficiency-set", "rel_targets=0.8"])
    s = E.settings_from_args(a)
    assert s.parts == ["latency", "serve"] and s.seeds == 2 and s.lat_batches == [1, 4] and s.rel_targets == [0.8]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        E.settings_from_args(p.parse_args(["--efficiency", "--efficiency-set", "bogus=1"]))


def test_cli_writes_json_markdown_and_plots(data, tmp_path, capsys):
    from adapterkit.bench.cli import main

    out = tmp_path / "eff"
    sets = ["model=tiny-bert", "task=topic", "seeds=2", "train_examples=24", "val_examples=8", "max_length=8",
            "batch=4", "steps=4", "eval_every=2", "lat_batches=1", "lat_seqs=4", "lat_rounds=2",
            "serve_tasks=1,2", "serve_batch=4", "serve_seq=4", "serve_rounds=2", "num_labels=3"]
    argv = ["--efficiency", "--efficiency-dir", str(out), "--efficiency-data", str(data), "--threads", "1"]
    for x in sets:
        argv += ["--efficiency-set", x]
    assert main(argv) == 0
    rep = json.loads((out / "efficiency.json").read_text())
    assert {"train", "latency", "serve", "meta", "settings", "command"} <= set(rep)
    assert "partial" not in rep
    md = (out / "efficiency.md").read_text()
    assert "## Time to target" in md and "## Inference latency" in md and "## Serving N tasks" in md
    assert (out / "efficiency_train.png").is_file() and (out / "efficiency_latency.png").is_file()
    assert main(["--efficiency", "--efficiency-data", str(tmp_path / "none"), "--efficiency-dir", str(out)]) == 2
