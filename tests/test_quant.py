"""Frozen weights stored int8 (adapterkit.quantize_frozen): outputs close to fp32, adapter
gradients exact for the quantised model, a quarter of the bytes; activation checkpointing
with adapters (on int8 frozen weights too) gives the plain gradients."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import adapterkit
from adapterkit.core.checkpointing import enable_activation_checkpointing
from adapterkit.core.quant import Int8Linear, frozen_weight_bytes, quantize_weight
from adapterkit.testing.tiny import main_output, tiny_inputs, tiny_model

LORA = {"method": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]}
LORA_TASKS = {**LORA, "tasks": ["a", "b"], "sharing": "per_task"}
HOULSBY = {"method": "houlsby", "reduction_factor": 4}


def _adapted(family, cfg, seed=0):
    m = tiny_model(family, seed=seed)
    adapterkit.add_adapters(m, cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.startswith("adapterkit."):
                p.normal_(0.0, 0.2)
    return m.train()


def _fake_quantised(m):
    """The reference: the same model with each frozen Linear weight replaced by its
    dequantised values (kept in fp32 nn.Linear)."""
    with torch.no_grad():
        for mod in m.modules():
            if type(mod) is nn.Linear and not mod.weight.requires_grad \
                    and mod.weight is not m.get_input_embeddings().weight:  # a tied LM head stays
                wq, s = quantize_weight(mod.weight)
                mod.weight.copy_(wq.float() * s[:, None])
    return m


def _loss_and_grads(m, family, route=None, amp=None):
    inputs = tiny_inputs(family, batch=3)
    m.zero_grad(set_to_none=True)
    torch.manual_seed(4)
    amp_ctx = torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
    with amp_ctx, adapterkit.route(route) if route is not None else contextlib.nullcontext():
        out = main_output(m(**inputs)).float()
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,cfg", [("llama", LORA), ("bart", HOULSBY)])
def test_int8_outputs_close_grads_exact_bytes_quarter(family, cfg):
    fp32 = _adapted(family, cfg)
    ref_out, _ = _loss_and_grads(fp32, family)
    q = _adapted(family, cfg)
    before = frozen_weight_bytes(q)
    tied = q.get_output_embeddings().weight is q.get_input_embeddings().weight
    paths = adapterkit.quantize_frozen(q)
    assert paths and all(isinstance(q.get_submodule(p), Int8Linear) for p in paths)
    left = [n for n, mod in q.named_modules() if type(mod) is nn.Linear]
    assert left == (["lm_head"] if tied else [])  # every frozen Linear but a tied LM head is int8
    linear_bytes = sum(q.get_submodule(p).weight_int8.numel() * 4 for p in paths)
    saved = before - frozen_weight_bytes(q)
    q_bytes = sum(q.get_submodule(p).weight_int8.numel() + 4 * q.get_submodule(p).weight_scale.numel() for p in paths)
    assert saved == pytest.approx(linear_bytes - q_bytes)
    assert q_bytes / linear_bytes < 0.30  # 1 byte a weight + one fp32 scale per row
    out, grads = _loss_and_grads(q, family)
    assert (out - ref_out).abs().max() / ref_out.abs().max() < 0.05  # close to fp32
    adapter = {n: g for n, g in grads.items() if n.startswith("adapterkit.")}
    assert adapter and all(g.abs().sum() > 0 for g in adapter.values())
    # exact for the quantised model: the same grads as fp32 Linears holding the dequantised weights
    fake_out, fake_grads = _loss_and_grads(_fake_quantised(_adapted(family, cfg)), family)
    torch.testing.assert_close(out, fake_out, atol=1e-5, rtol=1e-5)
    assert grads.keys() == fake_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], fake_grads[n], atol=1e-5, rtol=1e-4, msg=n)
    assert all(p.grad is None for n, p in q.named_parameters() if not n.startswith("adapterkit.")
               and not p.requires_grad)


def test_int8_under_bf16_autocast_and_weight_access():
    m = _adapted("llama", LORA)
    ref, _ = _loss_and_grads(m, "llama", amp=torch.bfloat16)
    paths = adapterkit.quantize_frozen(m)
    out, grads = _loss_and_grads(m, "llama", amp=torch.bfloat16)
    assert (out - ref).abs().max() / ref.abs().max() < 0.08
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for n, g in grads.items() if "adapterkit" in n)
    lin = m.get_submodule(paths[0])
    w = lin.weight  # the dequantised weight
    assert w.dtype == torch.float32 and w.shape == (lin.out_features, lin.in_features)
    torch.testing.assert_close(w, lin.weight_int8.float() * lin.weight_scale[:, None])


def test_merging_into_int8_is_refused_until_dequantised():
    m = _adapted("llama", LORA).eval()
    adapterkit.quantize_frozen(m)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        want = main_output(m(**inputs))
    with pytest.raises(adapterkit.ConfigError, match="stored int8.*dequantize_frozen"):
        adapterkit.merge_adapters(m)
    adapterkit.unmerge_adapters(m)
    paths = adapterkit.dequantize_frozen(m)
    assert paths and all(type(m.get_submodule(p)) is nn.Linear for p in paths)
    adapterkit.merge_adapters(m)
    with torch.no_grad():
        torch.testing.assert_close(main_output(m(**inputs)), want, atol=1e-4, rtol=1e-4)


def test_tied_and_trainable_linears_are_left_alone_and_errors():
    m = _adapted("llama", {**LORA, "trainable_modules": ["lm_head"]})
    paths = adapterkit.quantize_frozen(m)
    assert "lm_head" not in paths and type(m.lm_head) is nn.Linear and m.lm_head.weight.requires_grad
    assert any(p.endswith("q_proj") for p in paths)
    with pytest.raises(adapterkit.ConfigError, match="no frozen nn.Linear"):
        adapterkit.quantize_frozen(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(adapterkit.ConfigError, match="int8"):
        adapterkit.quantize_frozen(m, torch.float16)


@pytest.mark.parametrize("quant", [False, True])
def test_checkpointed_adapter_grads_equal_plain_on_llama(quant):
    """Activation checkpointing with adapters on a causal LM (frozen blocks recomputed in the
    backward, a mixed-task batch routed), with fp32 or int8 frozen weights: the adapters'
    gradients equal those without checkpointing."""
    tasks = ["a", "b", "b"]

    def grads(ckpt):
        m = _adapted("llama", LORA_TASKS)
        if quant:
            adapterkit.quantize_frozen(m)
        if ckpt:
            assert enable_activation_checkpointing(m) == ["<hf>"]
        _, g = _loss_and_grads(m, "llama", route=tasks)
        return g

    ref, got = grads(False), grads(True)
    assert ref.keys() == got.keys() and ref
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)
        assert got[n].abs().sum() > 0, n
