"""``python -m adapterkit.bench.memory`` on a tiny Llama shape: the checkpointed cases give the
adapters the same gradients as the plain ones, the int8 cases run torch's weight-only int8
GEMM, and a run writes its JSON and markdown with the ratios against PEFT."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adapterkit.bench import memory
from adapterkit.core.quant import Int8Linear

TINY = ["--hidden", "32", "--layers", "2", "--heads", "4", "--ffn", "64", "--vocab", "64", "--batch", "2",
        "--seq", "8", "--r", "4", "--alpha", "8"]


def _args(**kw):
    base = dict(hidden=32, layers=2, heads=4, ffn=64, vocab=64, batch=2, seq=8, r=4, alpha=8.0, seed=0, threads=1)
    base.update(kw)
    return argparse.Namespace(**base)


def _lora_grads(case: str) -> dict:
    model, amp = memory.prepare(case, _args())
    assert amp is None
    model.train()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero up-projections: every LoRA weight gets a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("plain,ckpt", [("ours_fp32", "ours_fp32_ckpt"), ("peft_fp32", "peft_fp32_ckpt"),
                                        ("ours_int8_frozen", "ours_int8_ckpt")])
def test_checkpointed_cases_give_the_plain_lora_gradients(plain, ckpt):
    if plain.startswith("peft"):
        pytest.importorskip("peft")
    ref, got = _lora_grads(plain), _lora_grads(ckpt)
    assert ref.keys() == got.keys() and len(ref) == 2 * 2 * 2  # 2 layers x q, v x A, B
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=0, msg=n)
        assert got[n].abs().sum() > 0, n


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["ours_int8_frozen", "ours_int8_ckpt"])
def test_int8_cases_store_int8_and_run_torchs_int8_gemm(case):
    model, _ = memory.prepare(case, _args())
    q = [m for m in model.modules() if isinstance(m, Int8Linear)]
    # q, k, v, o, gate, up, down of both layers and the LM head (untied): all frozen Linears
    assert len(q) == 2 * 7 + 1
    assert all(m.weight_int8.dtype == torch.int8 and "weight" not in m._parameters for m in q)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with _Ops() as ops:
        model(input_ids=ids, labels=ids).loss.backward()
    n = ops.names.count("_weight_int8pack_mm")
    assert n == len(q) * (2 if case.endswith("ckpt") else 1) - (1 if case.endswith("ckpt") else 0), n


def test_a_run_writes_json_and_markdown_with_the_peft_ratios(tmp_path):
    pytest.importorskip("peft")
    out, md = tmp_path / "m.json", tmp_path / "m.md"
    cases = "ours_fp32,peft_fp32,ours_int8_frozen,ours_fp32_ckpt,peft_fp32_ckpt,ours_int8_ckpt"
    assert memory.main([*TINY, "--cases", cases, "--out", str(out), "--markdown", str(md)]) == 0
    rep = json.loads(out.read_text())
    by = {r["case"]: r for r in rep["results"]}
    assert set(by) == set(cases.split(",")) and not [r for r in by.values() if "error" in r]
    assert rep["meta"]["command"].startswith("python -m adapterkit.bench.memory --hidden 32")
    # int8 stores the frozen Linears in about a quarter of their fp32 bytes (the embeddings stay fp32)
    assert by["ours_int8_frozen"]["frozen_weight_mib"] < by["ours_fp32"]["frozen_weight_mib"]
    for r in by.values():
        assert r["peak_mib"] == pytest.approx(r["resident_mib"] + r["rise_mib"])
    text = md.read_text()
    assert "peak vs PEFT alike" in text and "(peft_fp32_ckpt)" in text and "Command: `python -m" in text
    assert memory.main([*TINY, "--cases", "nope"]) == 2
