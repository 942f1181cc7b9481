"""bf16 training on the CPU runs attention in fp32 (core/fp32_attention): the same attention,
computed at a higher precision, only while gradients are recorded."""

from __future__ import annotations

import torch
from reliability_helpers import tiny_config

import adapterkit.core.fp32_attention as fa
from adapterkit.testing.fixtures import make_vl_fixture
from adapterkit.testing.tiny import tiny_inputs, tiny_model
from adapterkit.train.config import load_config
from adapterkit.train.trainer import Trainer


def _loss_and_grads(model, inputs):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs).logits
    out.float().pow(2).mean().backward()
    return out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_switch_and_outputs_match_sdpa(monkeypatch):
    inputs = tiny_inputs("llama", batch=3)
    inputs["attention_mask"][0, :2] = 0  # a padded row: the mask reaches the function
    ref_model, model = tiny_model("llama"), tiny_model("llama")
    assert ref_model.config._attn_implementation == "sdpa"
    assert fa.use_fp32_attention(model) == 1
    assert model.config._attn_implementation == fa.NAME
    assert fa.use_fp32_attention(model) == 0  # already switched

    import transformers.integrations.sdpa_attention as sa

    dtypes = []  # what reaches transformers' sdpa through the fp32 function (it looks the name up per call;

    orig = sa.sdpa_attention_forward

    def spy(module, q, k, v, mask, **kw):
        dtypes.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return orig(module, q, k, v, mask, **kw)

    monkeypatch.setattr(sa, "sdpa_attention_forward", spy)  # the plain model's registry keeps the original)
    want, want_g = _loss_and_grads(ref_model, inputs)
    ref_dtypes, dtypes[:] = list(dtypes), []
    got, got_g = _loss_and_grads(model, inputs)
    assert ref_dtypes == []  # the plain model calls transformers' registered sdpa, not the spied name
    assert dtypes and all(d == (torch.float32, False) for d in dtypes)  # fp32, autocast off, every layer
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.05)  # bf16 autocast both sides
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], atol=0.05, rtol=0.1)

    dtypes[:] = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**inputs)
    assert dtypes and all(d[1] for d in dtypes)  # inference: left as it is (autocast still on)


def test_fp32_training_is_untouched(monkeypatch):
    model = tiny_model("llama")
    fa.use_fp32_attention(model)
    inputs = tiny_inputs("llama")
    ref = tiny_model("llama")
    out = model(**inputs).logits
    torch.testing.assert_close(out, ref(**inputs).logits, atol=0, rtol=0)  # fp32: the same call


def test_the_engine_switches_only_bf16_cpu_runs(tmp_path):
    data = make_vl_fixture(tmp_path / "data", n_images=20)
    bf = Trainer(load_config(tiny_config(data, max_steps=1, bf16=True)), tmp_path / "bf16")
    fp = Trainer(load_config(tiny_config(data, max_steps=1)), tmp_path / "fp32")
    assert bf.model.lm.config._attn_implementation == fa.NAME  # BART: self-, causal and cross-attention
    assert fp.model.lm.config._attn_implementation == "sdpa"
    res = bf.fit()
    assert res["test"] and bf.state["step"] == 1


def test_the_compare_suggests_bf16_only_for_fp32_on_a_native_bf16_cpu(monkeypatch):
    from adapterkit.engine import engine
    from adapterkit.vl import benchmark as bm

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    assert "--bf16" in bm.bf16_hint({"bf16": False})
    assert bm.bf16_hint({"bf16": True}) is None
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    assert bm.bf16_hint({"bf16": False}) is None
