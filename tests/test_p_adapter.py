"""p-Adapter against the reference code (wuhy68/p-Adapter, eff_blip/eff_modeling_blip.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adapterkit
from adapterkit.errors import ConfigError
from adapterkit.methods.p_adapter import PAdapterConfig, PAdapterLayer, _pool_tokens
from adapterkit.testing.tiny import tiny_inputs, tiny_model


def _heads(x, h):
    b, n, d = x.shape
    return x.view(b, n, h, d // h).permute(0, 2, 1, 3)


def _reference(layer, mixed_q, mixed_k, mixed_v, mask_add, cross, sample_len, p, mu0, mu_param):
    """The reference's BertSelfAttention (adapter part) + BertSelfOutput graph code, transcribed
    line by line (dense (n, n, f) tensors; no KV cache, as in its training forward)."""
    h = layer.heads
    dense, w_i = layer.dense[0], layer.w_i
    q_length = mixed_q.shape[1]
    q, k = _heads(mixed_q, h), _heads(mixed_k, h)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask_add
    attention_probs = torch.softmax(scores, -1)
    if cross:
        k_length = sample_len
        mixed_value_layer = F.adaptive_avg_pool2d(mixed_v, (sample_len, None))
        attention_probs = F.adaptive_avg_pool2d(attention_probs, (None, sample_len))
        mixed_value_layer = torch.cat([mixed_q, mixed_value_layer], -2)
        zq = torch.zeros(attention_probs.shape[:2] + (q_length, q_length), dtype=mixed_q.dtype)
        zk = torch.zeros(attention_probs.shape[:2] + (k_length, k_length), dtype=mixed_q.dtype)
        attention_probs = torch.cat([torch.cat([zq, attention_probs], -1),
                                     torch.cat([attention_probs.transpose(-1, -2), zk], -1)], -2)
    else:
        mixed_value_layer = mixed_v
    # BertSelfOutput
    e = 1e-8
    mu = 2 * mu0 + mu0 * torch.tanh(mu_param)
    bs, n, _ = mixed_value_layer.shape
    node = F.linear(F.linear(mixed_value_layer, dense.weight, dense.bias), w_i.weight[0], w_i.bias[0])
    Fn = node.view(bs, n, h, -1).permute(0, 2, 1, 3)
    A = attention_probs
    X = Fn.repeat(1, 1, n, 1).view(bs, h, n, n, -1)
    Y = X.transpose(2, 3)
    graph_grad = torch.pow(A + e, 0.5).unsqueeze(-1) * (X - Y)
    graph_grad = torch.pow(torch.norm(graph_grad + e, dim=-1), p - 2)
    A = A * graph_grad
    alpha = 1 / (torch.sum(A, dim=-1) + 2 * mu / p)
    alpha = torch.diag_embed(alpha)
    beta = alpha * (2 * mu / p)
    A = torch.matmul(alpha, A)
    if n != q_length:
        A = A[:, :, :q_length, q_length:]
        beta = beta[:, :, :q_length, q_length:]
        out = A @ Fn[:, :, q_length:] + beta @ Fn[:, :, q_length:]
    else:
        out = A @ Fn + beta @ Fn
    return out.permute(0, 2, 1, 3).reshape(bs, q_length, -1)


def _layer(cross, seed=0, **cfg):
    torch.manual_seed(seed)
    dense = nn.Linear(32, 32).double()
    layer = PAdapterLayer(dense, 2, cross, PAdapterConfig(**cfg)).double()
    with torch.no_grad():
        layer.p.fill_(1.4)
        layer.m.fill_(0.3)
    return layer


@pytest.mark.parametrize("cross", [False, True])
def test_graph_matches_reference_code(cross):
    """Default config, BLIP-like shapes: self-attention is the values graph with its self term,
    cross-attention the [q; pooled v] graph (16 pooled tokens) whose self term is zero."""
    layer = _layer(cross)
    g = torch.Generator().manual_seed(1)
    b, nq = 2, 5
    nk = 40 if cross else nq
    mixed_q = torch.randn(b, nq, 32, generator=g, dtype=torch.float64)
    mixed_k = torch.randn(b, nk, 32, generator=g, dtype=torch.float64)
    mixed_v = torch.randn(b, nk, 32, generator=g, dtype=torch.float64)
    if not cross:
        mixed_v[:, 3] = mixed_v[:, 1]  # two tokens with the same value: a zero distance in the graph
    if cross:
        mask_add = torch.zeros(b, 1, 1, nk, dtype=torch.float64)
        mask = None
    else:
        causal = torch.ones(nq, nq).tril().bool()
        mask_add = torch.zeros(1, 1, nq, nq, dtype=torch.float64).masked_fill(~causal, -10000.0)
        mask = causal.view(1, 1, nq, nq)
    ref = _reference(layer, mixed_q, mixed_k, mixed_v, mask_add, cross, 16, layer.p[0], 0.1, layer.m[0])
    got = layer.graph_features(_heads(mixed_q, 2), _heads(mixed_k, 2), _heads(mixed_v, 2), mask,
                               {"scaling": 16 ** -0.5}, None)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8)
    # gradients too (p, m, W_i), the reference's dense form against the closed form
    gp = torch.autograd.grad(got.pow(2).sum(), [layer.p, layer.m, layer.w_i.weight])
    gr = torch.autograd.grad(ref.pow(2).sum(), [layer.p, layer.m, layer.w_i.weight])
    for a, r in zip(gp, gr):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-8)


def test_bipartite_self_attention_drops_the_self_term():
    """self_attn_graph=bipartite: nodes [q; v] as the reference's cached-decoder branch, F'_q = diag(α)Ã_qv F_v."""
    layer = _layer(False, self_attn_graph="bipartite")
    g = torch.Generator().manual_seed(2)
    mixed_q, mixed_k, mixed_v = (torch.randn(2, 4, 32, generator=g, dtype=torch.float64) for _ in range(3))
    mask_add = torch.zeros(2, 1, 1, 4, dtype=torch.float64)
    # the reference's bipartite graph is its cross-attention branch without pooling (pool 4 -> 4 is the identity)
    ref = _reference(layer, mixed_q, mixed_k, mixed_v, mask_add, True, 4, layer.p[0], 0.1, layer.m[0])
    got = layer.graph_features(_heads(mixed_q, 2), _heads(mixed_k, 2), _heads(mixed_v, 2), None,
                               {"scaling": 16 ** -0.5}, None)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8)


def test_reference_initialisation():
    layer = PAdapterLayer(nn.Linear(256, 256), 2, False, PAdapterConfig())
    for lin in (layer.w_i, layer.w_g, layer.w_o):  # N(0, 0.02) weights, zero biases (BertLMHeadModel.init_weights)
        assert abs(float(lin.weight.detach().std()) - 0.02) < 0.002 and float(lin.weight.detach().mean().abs()) < 0.002
        assert not lin.bias.any()
    assert PAdapterConfig().image_sample_len == 16 and PAdapterConfig().eps == 1e-8
    lin_init = PAdapterLayer(nn.Linear(256, 256), 2, False, PAdapterConfig(init="linear"))
    bound = 1 / math.sqrt(256)
    assert float(lin_init.w_i.weight.detach().abs().max()) <= bound
    assert float(lin_init.w_i.bias.detach().abs().max()) > bound / 2
    zero = PAdapterLayer(nn.Linear(256, 256), 2, False, PAdapterConfig(zero_init_out=True))
    assert not zero.w_o.weight.any()


def test_cross_attention_pooling_averages_attention_and_ignores_padding():
    layer = _layer(True, image_sample_len=3)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 4, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 7, 16, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[:, :, :, 5:] = False
    v2 = v.clone()
    v2[:, :, 5:] = 1e3  # padded keys: masked out of the attention, left out of the pooled values
    k2 = k.clone()
    k2[:, :, 5:] = -3.0
    a = layer.graph_features(q, k, v, mask, {}, None)
    b = layer.graph_features(q, k2, v2, mask, {}, None)
    torch.testing.assert_close(a, b)
    t = torch.randn(2, 7, 4, generator=g)
    ref = F.adaptive_avg_pool1d(t.transpose(1, 2), 3).transpose(1, 2)
    torch.testing.assert_close(_pool_tokens(t, None, 3), ref)
    torch.testing.assert_close(_pool_tokens(t, torch.ones(2, 7, dtype=torch.bool), 3), ref)


def _run(family, cfg, impl="sdpa", seed=0):
    m = tiny_model(family)
    m.set_attn_implementation(impl)
    torch.manual_seed(seed)
    adapterkit.add_adapters(m, cfg)
    return m


@pytest.mark.parametrize("family", ["bart", "llama"])
def test_forward_backward_on_decoders(family):
    x = tiny_inputs(family)
    with torch.no_grad():
        y0 = tiny_model(family)(**x).logits
    m = _run(family, {"method": "p_adapter"})
    s = m.adapterkit.sets["p_adapter"]
    n_attn = 4 if family == "bart" else 2  # bart: decoder self + cross; llama: causal self-attention
    assert len(s.paths) == n_attn and all("encoder." not in p for p in s.paths)
    y = m(**x).logits
    # the same model without adapters reproduces y0 bit for bit, so any difference is the branch's; at init
    # it adds ~1e-7 to the attention output, which bart's post-LN decoder shrinks below 1e-7 on the logits
    assert torch.isfinite(y).all() and (y - y0).abs().max() > 0
    y.pow(2).mean().backward()
    for layer in s.layers.values():
        assert layer.p.grad is not None and torch.isfinite(layer.p.grad).all()
        assert layer.w_i.weight.grad.abs().sum() > 0 and layer.w_o.weight.grad.abs().sum() > 0
    torch.testing.assert_close(layer.mu(), torch.tensor([0.2]))  # μ = 2μ0 + μ0·tanh(0)


@pytest.mark.parametrize("family", ["bart", "llama"])
def test_zero_init_out_is_identity_and_backends_agree(family):
    x = tiny_inputs(family)
    x["attention_mask"][1, -2:] = 0
    with torch.no_grad():
        y0 = tiny_model(family)(**x).logits
        y = _run(family, {"method": "p_adapter", "zero_init_out": True})(**x).logits
        torch.testing.assert_close(y, y0, atol=1e-6, rtol=0)
        cfg = {"method": "p_adapter"}
        ye, ys = _run(family, cfg, "eager")(**x).logits, _run(family, cfg, "sdpa")(**x).logits
    torch.testing.assert_close(ye, ys, atol=1e-5, rtol=1e-4)


def test_values_graph_is_the_same_with_a_kv_cache():
    """With a cache the query rows' own value nodes are the last keys: incremental decoding
    gives the full forward's outputs."""
    m = _run("llama", {"method": "p_adapter"}).eval()
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = m(input_ids=ids).logits
        out = m(input_ids=ids[:, :4], use_cache=True)
        step = m(input_ids=ids[:, 4:], past_key_values=out.past_key_values).logits
    torch.testing.assert_close(step, full[:, 4:], atol=1e-5, rtol=1e-4)


def test_per_task_mixed_batch():
    cfg = {"method": "p_adapter", "tasks": ["a", "b"], "sharing": "per_task"}
    m = _run("llama", cfg)
    s = m.adapterkit.sets["p_adapter"]
    with torch.no_grad():
        for layer in s.layers.values():
            layer.p[1] = 1.6
            layer.w_o.weight[1].normal_()
    x = tiny_inputs("llama")
    with torch.no_grad():
        with adapterkit.route(["a", "b", "a"]):
            y = m(**x).logits
        with adapterkit.route("a"):
            ya = m(**x).logits
        with adapterkit.route("b"):
            yb = m(**x).logits
    torch.testing.assert_close(y[[0, 2]], ya[[0, 2]], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(y[1], yb[1], atol=1e-5, rtol=1e-4)
    assert (ya[1] - yb[1]).abs().max() > 1e-5


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown position"):
        adapterkit.add_adapters(tiny_model("bart"), {"method": "p_adapter", "positions": ["ffn"]})
    with pytest.raises(ConfigError, match="not divisible by 2 heads"):
        adapterkit.add_adapters(tiny_model("bart"), {"method": "p_adapter", "reduction_factor": 32})
    with pytest.raises(ConfigError):
        adapterkit.add_adapters(tiny_model("bart"), {"method": "p_adapter", "self_attn_graph": "dense"})
