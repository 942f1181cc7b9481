"""Activation checkpointing with adapters: gradients equal the plain model's, also for a
mixed-task batch whose backward runs after the route block has exited."""

from __future__ import annotations

import pytest
import torch

import adapterkit
from adapterkit.core.checkpointing import enable_activation_checkpointing
from adapterkit.errors import ConfigError


def _bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                     dropout=0.1)
    return BartForConditionalGeneration(cfg)


def _adapted(cfg):
    m = _bart()
    adapterkit.add_adapters(m, cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # non-zero up-projections: every adapter weight gets grads
    return m.train()


def _grads(m, tasks, ckpt: bool):
    if ckpt:
        enable_activation_checkpointing(m)
    torch.manual_seed(1)
    ids = torch.randint(3, 64, (4, 7), generator=torch.Generator().manual_seed(2))
    labels = torch.randint(3, 64, (4, 5), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)  # the same dropout masks in both runs
    with adapterkit.route(tasks):
        loss = m(input_ids=ids, labels=labels).loss
    loss.backward()  # outside the route: the recomputation must still see the rows' tasks
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("cfg", [
    {"method": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"], "tasks": ["a", "b"], "sharing": "per_task"},
    {"method": "houlsby", "reduction_factor": 4, "tasks": ["a", "b"], "sharing": "per_task"},
])
def test_checkpointed_grads_equal_plain_grads_for_a_mixed_batch(cfg):
    tasks = ["a", "b", "b", "a"]
    ref = _grads(_adapted(cfg), tasks, ckpt=False)
    got = _grads(_adapted(cfg), tasks, ckpt=True)
    assert ref.keys() == got.keys() and ref
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)
        assert got[n].abs().sum() > 0, n


def test_plain_hf_checkpointing_loses_the_route():
    """What this module fixes: HF's own checkpointing recomputes without the route."""
    cfg = {"method": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"], "tasks": ["a", "b"], "sharing": "per_task"}
    m = _adapted(cfg)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(3, 64, (2, 6))
    with adapterkit.route(["a", "b"]):
        loss = m(input_ids=ids, labels=ids[:, :4].contiguous()).loss
    with pytest.raises(ConfigError, match="no task is routed"):
        loss.backward()


def test_named_modules_on_a_plain_module_and_errors():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    ref_net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    ref_net.load_state_dict(net.state_dict())
    for m in (net, ref_net):
        adapterkit.add_adapters(m, {"method": "lora", "r": 2, "alpha": 2, "target_modules": [r"^0$", r"^2$"]})
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.fill_(0.1)
    assert enable_activation_checkpointing(net, modules=[r"^0$"]) == ["0"]
    x = torch.randn(3, 8)
    net(x).sum().backward()
    ref_net(x).sum().backward()
    for (n, p), (_, q) in zip(net.named_parameters(), ref_net.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=n)
    with pytest.raises(ConfigError, match="no module path matches"):
        enable_activation_checkpointing(net, modules=["nothing"])
    with pytest.raises(ConfigError, match="name the blocks"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))
