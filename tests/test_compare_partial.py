"""A compare stopped part-way leaves a usable summary: runs go seed-major (every preset's first
seed before any second seed) and compare.json / compare.md are rewritten after every finished
run, listing what is still missing."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from adapterkit.vl import benchmark as bm


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ["ADAPTERKIT_NO_PROGRESS"] = "1"
    yield
    torch.set_num_threads(before)


class Stopped(BaseException):
    """A compare stopped from outside (like Ctrl-C: not an Exception, so no run failure)."""


def _fake_run(preset, seed, n=5):
    """A finished run's record as run_one writes it (per-example scores that differ by preset and seed)."""
    rng = np.random.default_rng([seed, len(preset)])
    per = {t: {"uids": [f"{t}-{i}" for i in range(n)], "scores": (100.0 * rng.integers(0, 2, n)).tolist()}
           for t in bm.TASKS}
    scores = {t: float(np.mean(per[t]["scores"])) for t in bm.TASKS}
    scores["average"] = float(np.mean(list(scores.values())))
    return {"preset": preset, "seed": seed, "steps": 2, "trainable": 10, "total": 100, "percent": 10.0, "lr": 1e-3,
            "bf16": False, "scores": scores, "intervals": {k: [v - 1, v + 1] for k, v in scores.items()},
            "test_sizes": {t: n for t in bm.TASKS}, "per_example": per, "curve": [], "wall_time_s": 1.0}


def _fake_runs(monkeypatch, extra_files=False) -> list:
    """bm.run_one replaced by one that writes a _fake_run record (reused when it exists); returns the
    list of (preset, seed) it trained. ``extra_files``: also a train log and a checkpoints folder."""
    trained = []

    def run_one(data_dir, feats, preset, scale, run_dir, seed=0, lr=None, curve=True, keep_checkpoints=False):
        done = Path(run_dir) / "run.json"
        if done.exists():
            return json.loads(done.read_text())
        trained.append((preset, seed))
        run = _fake_run(preset, seed)
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(run))
        if extra_files:
            (done.parent / "train_log.csv").write_text("step,loss\n")
            (done.parent / "checkpoints").mkdir()  # large files stay where they are
        return run

    monkeypatch.setattr(bm, "run_one", run_one)
    return trained


def _fake_data(tmp_path, monkeypatch) -> Path:
    """compare without the real FashionVL: its data folder, test sizes and majority baseline faked."""
    data = tmp_path / "fvl"
    monkeypatch.setattr(bm, "prepare", lambda d, tiny, res: (data, data / "feats"))
    monkeypatch.setattr(bm, "_test_sizes", lambda d, n: {t: 5 for t in bm.TASKS})
    import adapterkit.vl.datasets.fashionvl as fvl

    monkeypatch.setattr(fvl, "majority_baseline", lambda d: {t: {"score": 0.5} for t in bm.TASKS})
    return data


def test_stopped_compare_leaves_a_partial_summary(tmp_path, monkeypatch):
    data = _fake_data(tmp_path, monkeypatch)
    order, stop_at = [], [3]

    def run_one(data_dir, feats, preset, scale, run_dir, seed=0, lr=None, curve=True, keep_checkpoints=False):
        done = Path(run_dir) / "run.json"
        if done.exists():
            return json.loads(done.read_text())
        if len(order) == stop_at[0]:
            raise Stopped  # the compare is stopped during its fourth run
        order.append((preset, seed))
        run = _fake_run(preset, seed)
        done.parent.mkdir(parents=True)
        done.write_text(json.dumps(run))
        return run

    monkeypatch.setattr(bm, "run_one", run_one)
    out = tmp_path / "cmp"
    kw = dict(out_dir=out, data_dir=data, scale_name="tiny", steps=2, seeds=2, curve_every=0, estimate=False,
              command="test")
    with pytest.raises(Stopped):
        bm.compare(["single_adapter", "full_finetune"], **kw)
    assert order == [("single_adapter", 0), ("full_finetune", 0), ("single_adapter", 1)]  # seed-major
    s = json.loads((out / "compare.json").read_text())
    assert s["complete"] is False and s["missing_runs"] == [{"preset": "full_finetune", "seed": 1}]
    assert [r["seed"] for r in s["presets"]["single_adapter"]["seeds"]] == [0, 1]
    assert [r["seed"] for r in s["presets"]["full_finetune"]["seeds"]] == [0]
    vs = s["presets"]["single_adapter"]["vs_reference"]
    assert vs["seeds_paired"] == 1  # paired on the seed both have, not seed 0 against seeds 0 and 1
    a, f = _fake_run("single_adapter", 0), _fake_run("full_finetune", 0)
    assert vs["difference"] == pytest.approx(a["scores"]["average"] - f["scores"]["average"])
    assert "Partial: not run yet: full_finetune seed 1" in (out / "compare.md").read_text()
    # the same command again runs only the missing run and writes the complete summary
    stop_at[0] = None
    done = bm.compare(["single_adapter", "full_finetune"], **kw)
    assert order[3:] == [("full_finetune", 1)]
    assert done["complete"] is True and done["missing_runs"] == []
    assert done["presets"]["single_adapter"]["vs_reference"]["seeds_paired"] == 2
    assert json.loads((out / "compare.json").read_text())["complete"] is True
    assert "Partial" not in (out / "compare.md").read_text()


def test_summarize_writes_one_summary_over_runs_of_several_compares_and_runs_nothing(tmp_path, monkeypatch):
    data = _fake_data(tmp_path, monkeypatch)
    trained = _fake_runs(monkeypatch)
    out = tmp_path / "cmp"
    kw = dict(out_dir=out, data_dir=data, scale_name="tiny", steps=2, curve_every=0, estimate=False, command="test")
    bm.compare(["full_finetune", "single_adapter"], seeds=1, **kw)  # one compare: seed 0 of both
    bm.compare(["single_lora"], seeds=2, **kw)  # another: two seeds of a third preset
    assert sorted(json.loads((out / "compare.json").read_text())["presets"]) == ["single_lora"]
    n = len(trained)
    import adapterkit.vl.datasets.fashionvl as fvl

    def no_features(*a, **k):
        raise AssertionError("a summary extracts no features")

    built = []
    monkeypatch.setattr(bm, "prepare", no_features)  # the runs' records need the examples only
    monkeypatch.setattr(fvl, "build_fashionvl", lambda d, tiny=False, **k: built.append((Path(d), tiny)))
    s = bm.compare(["full_finetune", "single_adapter", "single_lora"], seeds=2, summarize_only=True, **kw)
    assert built == [(data, True)]
    assert len(trained) == n  # nothing ran
    assert list(s["presets"]) == ["full_finetune", "single_adapter", "single_lora"]
    assert s["missing_runs"] == [{"preset": "full_finetune", "seed": 1}, {"preset": "single_adapter", "seed": 1}]
    assert s["presets"]["single_lora"]["vs_reference"]["seeds_paired"] == 1 and s["wall_time_s"] is None
    assert s["protocol"]["summarized_from"] == ["full_finetune seed 0", "single_adapter seed 0", "single_lora seed 0",
                                                "single_lora seed 1"]
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(s))
    with pytest.raises(bm.DataError, match="no finished run of single_prompt"):
        bm.compare(["single_prompt"], seeds=1, summarize_only=True, **kw)


def test_jobs_workers_exit_when_the_compare_is_killed(tmp_path):
    """`compare --jobs N` workers use _exit_with_parent: a SIGKILLed compare (no cleanup runs in
    it) does not leave its spawned workers training on."""
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    script = textwrap.dedent("""
        import concurrent.futures as cf, multiprocessing as mp, os, sys, time
        from adapterkit.vl.benchmark import _exit_with_parent
        if __name__ == "__main__":
            init = _exit_with_parent if sys.argv[1] == "watch" else None
            pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), initializer=init,
                                          initargs=(0.1,) if init else ())
            print(pool.submit(os.getpid).result(), flush=True)
            pool.submit(time.sleep, 60)
            time.sleep(60)
    """)
    (tmp_path / "parent.py").write_text(script)

    def running(pid):  # an exited worker nobody has reaped yet (a zombie) counts as gone
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False

    def worker_alive_after_parent_killed(mode, wait_s):
        p = subprocess.Popen([sys.executable, str(tmp_path / "parent.py"), mode], stdout=subprocess.PIPE, text=True)
        worker = int(p.stdout.readline())
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not running(worker):
                return False
            time.sleep(0.1)
        os.kill(worker, signal.SIGKILL)
        return True

    assert not worker_alive_after_parent_killed("watch", 10)
    assert worker_alive_after_parent_killed("plain", 2)  # the failure the initializer prevents


def test_a_corrupt_run_record_is_one_error_naming_it(tmp_path):
    rec = tmp_path / "single_adapter" / "seed0" / "run.json"
    rec.parent.mkdir(parents=True)
    rec.write_text('{"preset": "single_adapter", "scor')  # cut off mid-write by something else
    with pytest.raises(bm.DataError, match=r"seed0/run\.json: not a readable run record.*delete it"):
        bm.run_one(tmp_path, tmp_path, "single_adapter", {"steps": 2}, rec.parent)


@pytest.mark.parametrize("kw, msg", [
    ({"lr": -1.0}, "--lr must be a positive, finite learning rate, got -1.0"),
    ({"lr": float("nan")}, "--lr must be a positive, finite"),
    ({"steps": 0}, "--steps must be a positive integer, got 0"),
    ({"seed": -1}, "--seed must be a non-negative integer, got -1"),
    ({"curve_every": -5}, "--curve-every must be a non-negative integer, got -5"),
    ({"curve_examples": 0}, "--curve-examples must be a positive integer"),
    ({"curve_seeds": -1}, "--curve-seeds must be a non-negative integer"),
])
def test_bad_compare_arguments_fail_before_any_work(tmp_path, monkeypatch, kw, msg):
    from adapterkit.errors import ConfigError

    def no_work(*a, **k):
        raise AssertionError("compare built data before checking its arguments")

    monkeypatch.setattr(bm, "prepare", no_work)
    with pytest.raises(ConfigError, match=re.escape(msg)):
        bm.compare(["single_adapter"], out_dir=tmp_path / "out", data_dir=tmp_path / "fvl", **kw)
    assert not (tmp_path / "out").exists() and not (tmp_path / "fvl").exists()


def test_reuse_copies_the_finished_runs_of_another_compare_and_runs_the_rest(tmp_path, monkeypatch):
    data = _fake_data(tmp_path, monkeypatch)
    trained = _fake_runs(monkeypatch, extra_files=True)
    kw = dict(data_dir=data, scale_name="tiny", steps=2, curve_every=0, estimate=False, command="test")
    presets = ["full_finetune", "single_adapter"]
    bm.compare(presets, out_dir=tmp_path / "a", seeds=2, **kw)
    assert len(trained) == 4
    s = bm.compare(presets, out_dir=tmp_path / "b", seeds=3, reuse=[tmp_path / "a"], **kw)
    assert trained[4:] == [("full_finetune", 2), ("single_adapter", 2)]  # only the new seed ran
    for p in presets:
        for k in (0, 1):
            got = tmp_path / "b" / p / f"seed{k}"
            assert (got / "run.json").read_bytes() == (tmp_path / "a" / p / f"seed{k}" / "run.json").read_bytes()
            assert (got / "train_log.csv").is_file() and not (got / "checkpoints").exists()
            assert not list(got.glob(".*reuse-tmp"))
    assert [r["seed"] for r in s["presets"]["single_adapter"]["seeds"]] == [0, 1, 2]
    want = {f"{p} seed {k}": str(tmp_path / "a") for p in presets for k in (0, 1)}
    assert s["protocol"]["reused_from"] == want
    # the same command again: nothing to copy or run, the provenance stays
    s = bm.compare(presets, out_dir=tmp_path / "b", seeds=3, reuse=[tmp_path / "a"], **kw)
    assert len(trained) == 6 and s["protocol"]["reused_from"] == want
    # another budget, another test size, no folder, the --out itself: one clear error, nothing copied
    with pytest.raises(bm.ConfigError, match="was made with .*'steps': 2.*asks for .*'steps': 3"):
        bm.compare(presets, out_dir=tmp_path / "c", seeds=1, reuse=[tmp_path / "a"], **{**kw, "steps": 3})
    monkeypatch.setattr(bm, "_test_sizes", lambda d, n: {**{t: 5 for t in bm.TASKS}, "val_vqa": 9})
    bm.compare(presets, out_dir=tmp_path / "d", seeds=1, reuse=[tmp_path / "a"], **kw)  # val sizes do not count
    assert len(trained) == 6
    monkeypatch.setattr(bm, "_test_sizes", lambda d, n: {t: 7 for t in bm.TASKS})
    with pytest.raises(bm.ConfigError, match="was tested on .* examples per task"):
        bm.compare(presets, out_dir=tmp_path / "c", seeds=1, reuse=[tmp_path / "a"], **kw)
    assert not (tmp_path / "c").exists()
    bad = tmp_path / "a2"  # a folder whose second record has another budget: the first is not copied either
    for p in presets:
        (bad / p / "seed0").mkdir(parents=True)
        rec = json.loads((tmp_path / "a" / p / "seed0" / "run.json").read_text())
        (bad / p / "seed0" / "run.json").write_text(json.dumps({**rec, "steps": 9} if p == "single_adapter" else rec))
    monkeypatch.setattr(bm, "_test_sizes", lambda d, n: {t: 5 for t in bm.TASKS})
    with pytest.raises(bm.ConfigError, match="single_adapter/seed0/run.json was made with"):
        bm.compare(presets, out_dir=tmp_path / "c", seeds=1, reuse=[bad], **kw)
    assert not (tmp_path / "c").exists()
    with pytest.raises(bm.DataError, match="no such compare folder"):
        bm.compare(presets, out_dir=tmp_path / "c", seeds=1, reuse=[tmp_path / "nope"], **kw)
    with pytest.raises(bm.ConfigError, match="is the --out folder itself"):
        bm.compare(presets, out_dir=tmp_path / "b", seeds=1, reuse=[tmp_path / "b"], **kw)


def test_a_corrupt_reused_record_is_one_error_naming_it(tmp_path, monkeypatch):
    data = _fake_data(tmp_path, monkeypatch)
    _fake_runs(monkeypatch)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "reused.json").write_text("{trunc")
    with pytest.raises(bm.DataError, match="reused.json is not valid JSON"):
        bm.compare(["single_adapter"], out_dir=tmp_path / "out", data_dir=data, scale_name="tiny", steps=2,
                   curve_every=0, estimate=False, command="test")


def test_a_failed_run_is_reported_the_others_go_on_and_one_error_names_it(tmp_path, monkeypatch, capsys):
    from adapterkit.errors import AdapterKitError, CheckpointError

    data = _fake_data(tmp_path, monkeypatch)
    trained = _fake_runs(monkeypatch)
    fake = bm.run_one
    fail = {("full_finetune", 0)}

    def run_one(data_dir, feats, preset, scale, run_dir, seed=0, lr=None, curve=True, keep_checkpoints=False):
        if (preset, seed) in fail:
            raise CheckpointError("cannot write checkpoint: No space left on device")
        return fake(data_dir, feats, preset, scale, run_dir, seed, lr, curve)

    monkeypatch.setattr(bm, "run_one", run_one)
    out = tmp_path / "cmp"
    kw = dict(out_dir=out, data_dir=data, scale_name="tiny", steps=2, seeds=2, curve_every=0, estimate=False,
              command="test")
    with pytest.raises(AdapterKitError, match=r"1 of 4 run\(s\) failed: full_finetune seed 0: CheckpointError: "
                       "cannot write checkpoint: No space left on device. The 3 finished are kept"):
        bm.compare(["single_adapter", "full_finetune"], **kw)
    assert trained == [("single_adapter", 0), ("single_adapter", 1), ("full_finetune", 1)]  # the rest ran
    err = capsys.readouterr().err
    assert "full_finetune seed 0: FAILED (CheckpointError: cannot write checkpoint" in err
    assert "Traceback" not in err  # an adapterkit error is its message; a bug would print its traceback
    s = json.loads((out / "compare.json").read_text())
    assert s["missing_runs"] == [{"preset": "full_finetune", "seed": 0}]
    fail.clear()  # the same command again retries only the failed run
    done = bm.compare(["single_adapter", "full_finetune"], **kw)
    assert trained[3:] == [("full_finetune", 0)] and done["complete"] is True


def test_a_finished_run_drops_its_resumable_checkpoints_unless_kept(tmp_path, monkeypatch):
    calls = []

    def run_preset(data_dir, feats, preset, scale, run_dir, seed, lr, curve):
        ck = Path(run_dir) / "checkpoints" / "step-000002"
        ck.mkdir(parents=True)
        (ck / "optimizer.safetensors").write_bytes(b"x" * 10)
        (Path(run_dir) / "final").mkdir()
        calls.append(run_dir)
        return {"steps": 2, "trainable": 1, "total": 2, "percent": 50.0, "lr": 1e-3, "wall_time_s": 1.0,
                "wall_time_s_this_process": 1.0}

    monkeypatch.setattr(bm, "run_preset", run_preset)
    monkeypatch.setattr(bm, "score_run", lambda res, run_dir, data_dir: {"scores": {"average": 1.0}})
    for keep in (False, True):
        run_dir = tmp_path / f"keep{keep}"
        run = bm.run_one(tmp_path, tmp_path, "single_adapter", {"steps": 2}, run_dir, keep_checkpoints=keep)
        assert json.loads((run_dir / "run.json").read_text()) == run
        assert (run_dir / "final").is_dir()  # the trained weights stay
        assert (run_dir / "checkpoints").exists() is keep


def test_a_configuration_error_in_a_worker_stops_the_compare_at_once(tmp_path, monkeypatch):
    """--jobs: a run failing in a worker must not leave the compare waiting silently for the rest
    (it used to leave the pool's with-block, which runs every queued run before raising). A
    ConfigError (here: no FashionVL in the data folder) is the compare's own: it stops it."""
    from adapterkit.errors import ConfigError

    data = _fake_data(tmp_path, monkeypatch)  # the workers' real run_one finds no FashionVL there
    (data / "feats").mkdir(parents=True)
    kw = dict(out_dir=tmp_path / "cmp", data_dir=data, scale_name="tiny", steps=2, seeds=8, curve_every=0,
              estimate=False, command="test", jobs=2, threads=1)
    with pytest.raises(ConfigError, match="no data for task 'vqa'"):
        bm.compare(["single_adapter", "full_finetune"], **kw)
