"""AdaMix against microsoft/AdaMix: expert init, stochastic routing in training, averaged inference,
the reference's symmetric_KL_loss (value and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adapterkit
from adapterkit.errors import ConfigError
from adapterkit.methods.adamix import ExpertLinear, consistency_loss, symmetric_kl
from adapterkit.testing.tiny import main_output, tiny_inputs, tiny_model


def _randomise_experts(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.adapterkit.sets["adamix"].experts():
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.1)
            if m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def test_expert_init_as_the_reference_and_count_parameters():
    """Bottleneck experts: init_weights re-draws every expert nn.Linear (N(0, 0.02), zero bias);
    LoRA experts: deep copies of one A / B that nothing re-initialises."""
    model = adapterkit.add_adapters(tiny_model("bert"), {"method": "adamix", "num_experts": 4, "bottleneck_dim": 8,
                                                         "share_up": False})
    s = model.adapterkit.sets["adamix"]
    experts = s.experts()
    assert len(experts) == 2 * 2  # down + up at 2 layers
    for m in experts:
        assert m.n == 4 and not m.bias.any()
        for e in range(1, 4):
            assert not torch.equal(m.weight[e], m.weight[0])
    w = torch.cat([m.weight.detach().reshape(-1) for m in experts])
    assert abs(float(w.std()) - 0.02) < 0.003 and abs(float(w.mean())) < 0.003
    shared = adapterkit.add_adapters(tiny_model("bert"), {"method": "adamix", "bottleneck_dim": 8})
    ups = [a.up for a in shared.adapterkit.sets["adamix"].adapters.values()]
    assert all(u.n == 1 for u in ups)  # the reference shares the up-projection
    lora = adapterkit.add_adapters(tiny_model("bert"), {"method": "adamix", "expert_type": "lora", "num_experts": 3,
                                                        "share_up": False})
    for m in lora.adapterkit.sets["adamix"].experts():
        for e in range(1, m.n):
            assert torch.equal(m.weight[e], m.weight[0])


@pytest.mark.parametrize("share_up", [True, False])
def test_bottleneck_averaged_inference_equals_single_adapter_with_mean_weights(share_up):
    torch.manual_seed(0)
    mix = adapterkit.add_adapters(tiny_model("bert"), {"method": "adamix", "num_experts": 3, "bottleneck_dim": 8,
                                                       "share_up": share_up})
    _randomise_experts(mix)
    single = adapterkit.add_adapters(tiny_model("bert"), {"method": "pfeiffer", "bottleneck_dim": 8,
                                                          "activation": "gelu", "positions": ["ffn_out"]})
    sset = single.adapterkit.sets["pfeiffer"]
    with torch.no_grad():
        for key, ad in mix.adapterkit.sets["adamix"].adapters.items():
            tgt = sset.adapters[key]
            tgt.down.weight[0].copy_(ad.down.weight.mean(0))
            tgt.down.bias[0].copy_(ad.down.bias.mean(0))
            tgt.up.weight[0].copy_(ad.up.weight.mean(0))
            tgt.up.bias[0].copy_(ad.up.bias.mean(0))
    mix.eval()
    single.eval()
    x = tiny_inputs("bert")
    with torch.no_grad():
        a, b = main_output(mix(**x)), main_output(single(**x))
    assert (a - b).abs().max().item() < 1e-6


def test_lora_averaged_inference_equals_single_lora_and_merges():
    torch.manual_seed(0)
    mix = adapterkit.add_adapters(tiny_model("bert"), {"method": "adamix", "expert_type": "lora", "r": 4,
                                                       "num_experts": 3, "share_up": False})
    _randomise_experts(mix, seed=1)
    single = adapterkit.add_adapters(tiny_model("bert"), {"method": "lora", "r": 4})
    lset = single.adapterkit.sets["lora"]
    with torch.no_grad():
        for key, layer in mix.adapterkit.sets["adamix"].adapters.items():
            lset.layers[key].A.weight[0].copy_(layer.A.weight.mean(0))
            lset.layers[key].B.weight[0].copy_(layer.B.weight.mean(0))
    mix.eval()
    x = tiny_inputs("bert")
    with torch.no_grad():
        a, b = main_output(mix(**x)), main_output(single(**x))
        assert (a - b).abs().max().item() < 1e-6
        adapterkit.merge_adapters(mix)
        c = main_output(mix(**x))
        assert (a - c).abs().max().item() < 1e-5
        adapterkit.unmerge_adapters(mix)


def test_bottleneck_adamix_cannot_merge():
    mix = adapterkit.add_adapters(tiny_model("bert"), {"method": "adamix", "bottleneck_dim": 8})
    with pytest.raises(ConfigError, match="cannot be merged"):
        adapterkit.merge_adapters(mix)


def test_training_routes_one_random_expert_per_module_per_forward():
    lin = ExpertLinear(5, 3, n=4, init="bert")
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 3, 5))
    x = torch.randn(2, 5)
    per_expert = [torch.nn.functional.linear(x, lin.weight[e], lin.bias[e]) for e in range(4)]
    lin.train()
    seen = set()
    torch.manual_seed(0)
    for _ in range(40):
        y = lin(x)
        hits = [e for e in range(4) if torch.equal(y, per_expert[e])]
        assert len(hits) == 1
        seen.add(hits[0])
    assert seen == {0, 1, 2, 3}
    lin.eval()
    with torch.no_grad():
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight.mean(0), lin.bias.mean(0)))


def test_eval_mean_is_cached_and_refreshed_after_update():
    lin = ExpertLinear(4, 4, n=3, init="bert").eval()
    with torch.no_grad():
        w1, _ = lin.mean_weights()
        assert lin.mean_weights()[0] is w1  # cached: zero extra cost per forward
        lin.weight.add_(1.0)
        w2, _ = lin.mean_weights()
    torch.testing.assert_close(w2, w1 + 1.0)


def test_gradient_reaches_only_the_routed_expert():
    model = adapterkit.add_adapters(tiny_model("bert"), {"method": "adamix", "num_experts": 4, "bottleneck_dim": 8,
                                                         "init": "bert"})
    s = model.adapterkit.sets["adamix"]
    s.force_expert(2)
    model.train()
    main_output(model(**tiny_inputs("bert"))).sum().backward()
    down = next(iter(s.adapters.values())).down
    g = down.weight.grad
    assert g[2].abs().sum() > 0
    assert g[[0, 1, 3]].abs().sum() == 0
    s.force_expert(None)


def _reference_symmetric_kl(p, q, reduction="batchmean"):
    """microsoft/AdaMix symmetric_KL_loss (RoBERTa GLUE version), verbatim in substance."""
    p, q = p.float(), q.float()
    loss = F.kl_div(F.log_softmax(p, dim=-1, dtype=torch.float32),
                    F.softmax(q.detach(), dim=-1, dtype=torch.float32), reduction=reduction) + \
        F.kl_div(F.log_softmax(q, dim=-1, dtype=torch.float32),
                 F.softmax(p.detach(), dim=-1, dtype=torch.float32), reduction=reduction)
    return 0.5 * loss.sum()


def _reference_symmetric_kl_masked(p, q, attention_mask):
    """The NLG (GPT-2) version: token rows selected by the mask, then batchmean over them."""
    p, q, attention_mask = p.float(), q.float(), attention_mask.view(-1)
    dict_size = q.size(-1)
    attention_mask = attention_mask.eq(1.0)
    p = p.view(-1, dict_size)[attention_mask]
    q = q.view(-1, dict_size)[attention_mask]
    return _reference_symmetric_kl(p, q)


def test_consistency_loss_value_and_gradients_match_the_reference():
    torch.manual_seed(0)
    p = (3 * torch.randn(4, 5)).requires_grad_()
    q = (3 * torch.randn(4, 5)).requires_grad_()
    val = symmetric_kl(p, q)
    ref = _reference_symmetric_kl(p, q)
    torch.testing.assert_close(val, ref)
    gp, gq = torch.autograd.grad(val, [p, q])
    rp, rq = torch.autograd.grad(ref, [p, q])
    torch.testing.assert_close(gp, rp)
    torch.testing.assert_close(gq, rq)
    # d/dp = 0.5 (softmax(p) - softmax(q)) / rows: the other pass is a constant target
    torch.testing.assert_close(gp, 0.5 * (p.softmax(-1) - q.softmax(-1)).detach() / 4)
    assert symmetric_kl(p, p).item() == pytest.approx(0.0, abs=1e-7)

    # token-level logits with a mask (the NLG version)
    lp = (2 * torch.randn(2, 3, 7)).requires_grad_()
    lq = (2 * torch.randn(2, 3, 7)).requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    val = symmetric_kl(lp, lq, mask)
    ref = _reference_symmetric_kl_masked(lp, lq, mask)
    torch.testing.assert_close(val, ref)
    for a, r in zip(torch.autograd.grad(val, [lp, lq]), torch.autograd.grad(ref, [lp, lq])):
        torch.testing.assert_close(a, r)

    outs = iter([p, q])
    total, task, cons = consistency_loss(lambda: next(outs), lambda z: z.pow(2).mean(), weight=2.0)
    torch.testing.assert_close(total, p.pow(2).mean() + 2.0 * symmetric_kl(p, q))
    torch.testing.assert_close(cons, symmetric_kl(p, q))


def test_two_training_passes_differ_and_save_load(tmp_path):
    torch.manual_seed(0)
    model = adapterkit.add_adapters(tiny_model("bert"), {"method": "adamix", "num_experts": 4, "bottleneck_dim": 8,
                                                         "share_up": False})
    _randomise_experts(model)
    model.train()
    x = tiny_inputs("bert")
    outs = [main_output(model(**x)) for _ in range(6)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    adapterkit.save_adapters(model, tmp_path / "ad")
    other = adapterkit.load_adapters(tiny_model("bert"), tmp_path / "ad")
    model.eval()
    other.eval()
    with torch.no_grad():
        assert torch.equal(main_output(model(**x)), main_output(other(**x)))


def test_config_errors():
    with pytest.raises(ConfigError, match="sharing"):
        adapterkit.add_adapters(tiny_model("bert"), {"method": "adamix", "tasks": ["a", "b"], "sharing": "per_task"})
    with pytest.raises(ConfigError, match="expert_type"):
        adapterkit.add_adapters(tiny_model("bert"), {"method": "adamix", "expert_type": "prefix"})
