"""Many adapters served at once: per-row generation (a different task's adapter in each row,
KV cache on) equals generating each task's rows on their own, and PEFT's mixed batch built by
the benchmark computes the same function as ours."""

from __future__ import annotations

import pytest
import torch

import adapterkit
from adapterkit.bench.serving import (
    METHODS,
    ServeSettings,
    _peft_mixed,
    build_lm,
    generate_per_row,
    generate_sequential,
    randomize_adapters,
    row_tasks,
    serve_bench,
    task_names,
    to_markdown,
)
from adapterkit.errors import ConfigError

S = ServeSettings(hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, vocab=96, batch=6, prompt=5, new_tokens=6,
                  tasks=[1, 3], repeats=1)


def _model(method: str, n: int):
    m = build_lm(S)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    adapterkit.add_adapters(m, {**METHODS[method], "tasks": task_names(n), "sharing": "per_task"})
    randomize_adapters(m, 3, std=0.3)  # large enough that the tasks generate different tokens
    return m.eval(), base


@pytest.mark.parametrize("method", ["lora", "houlsby"])
def test_per_row_generation_equals_one_task_at_a_time(method):
    m, _ = _model(method, 3)
    ids = torch.randint(1, S.vocab, (S.batch, S.prompt), generator=torch.Generator().manual_seed(0))
    tasks = row_tasks(S.batch, 3)
    with torch.no_grad():
        mixed = generate_per_row(m, ids, tasks, S.new_tokens)
        seq = generate_sequential(m, ids, tasks, S.new_tokens)
        single = generate_per_row(m, ids, ["task0"] * S.batch, S.new_tokens)
    assert torch.equal(mixed, seq)
    assert not torch.equal(mixed, single)  # the rows really used different adapters


def test_peft_mixed_batch_is_the_same_function():
    pytest.importorskip("peft")
    m, base = _model("lora", 3)
    pm = _peft_mixed(base, S, 3, m)
    ids = torch.randint(1, S.vocab, (S.batch, S.prompt), generator=torch.Generator().manual_seed(1))
    tasks = row_tasks(S.batch, 3)
    with torch.no_grad(), adapterkit.route(tasks):
        ours = m(input_ids=ids).logits
    with torch.no_grad():
        theirs = pm(input_ids=ids, adapter_names=tasks).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_serve_bench_report_and_validation():
    rep = serve_bench(ServeSettings(**{**S.__dict__, "methods": ["lora"], "tasks": [2], "peft": False}), log=lambda *_: None)
    cases = {(r["case"], r["tasks"]) for r in rep["results"]}
    assert {("base", 0), ("single", 1), ("mixed", 2), ("sequential", 2)} <= cases
    assert all(r["tokens_per_s"] > 0 for r in rep["results"])
    assert "| lora | mixed | 2 |" in to_markdown(rep)
    with pytest.raises(ConfigError, match="batch of 6"):
        ServeSettings(**{**S.__dict__, "tasks": [64]}).validate()
    with pytest.raises(ConfigError, match="unknown method"):
        ServeSettings(**{**S.__dict__, "methods": ["lorra"]}).validate()


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_serve_cli_rejects_non_positive_threads(threads, capsys):
    from adapterkit.bench.cli import main

    before = torch.get_num_threads()
    with pytest.raises(SystemExit) as e:  # argparse's one line, before anything runs
        main(["--serve", "--threads", threads, "--serve-tasks", "1", "--repeats", "1"])
    assert e.value.code == 2
    assert f"argument --threads: must be a positive integer, got {threads}" in capsys.readouterr().err
    assert torch.get_num_threads() == before  # nothing was changed before the error
