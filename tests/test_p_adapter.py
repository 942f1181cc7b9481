"""p-Adapter: p-Laplacian renormalisation on the bipartite query/value graph."""

import pytest
import torch
import torch.nn.functional as F

import adapterkit
from adapterkit.errors import ConfigError
from adapterkit.methods.p_adapter import _pool_tokens, p_laplacian_query_update
from adapterkit.testing.tiny import tiny_inputs, tiny_model


def _dense_reference(A, Fq, Fv, p, mu, eps):
    """Direct loop over the full (Nq+Nk)-node graph: Â = [[0, A], [Aᵀ, 0]], F = [Fq; Fv]."""
    B, H, nq, nk = A.shape
    n = nq + nk
    out = torch.zeros(B, H, n, Fq.shape[-1], dtype=torch.float64)
    alpha_all = torch.zeros(B, H, n, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            Ahat = torch.zeros(n, n, dtype=torch.float64)
            Ahat[:nq, nq:] = A[b, h]
            Ahat[nq:, :nq] = A[b, h].T
            Fn = torch.cat([Fq[b, h], Fv[b, h]]).double()
            At = torch.zeros(n, n, dtype=torch.float64)
            for i in range(n):
                for j in range(n):
                    diff = (Ahat[i, j] + eps).sqrt() * (Fn[i] - Fn[j])
                    norm = (diff.pow(2).sum() + eps).sqrt()
                    At[i, j] = Ahat[i, j] * norm ** (p - 2)
            for i in range(n):
                alpha = 1.0 / (At[i].sum() + 2 * mu / p)
                beta = alpha * 2 * mu / p
                out[b, h, i] = alpha * (At[i] @ Fn) + beta * Fn[i]
                alpha_all[b, h, i] = alpha
    return out, alpha_all


@pytest.mark.parametrize("nq,nk", [(3, 5), (4, 4)])
def test_renormalisation_matches_dense_loop(nq, nk):
    g = torch.Generator().manual_seed(0)
    A = torch.softmax(torch.randn(2, 2, nq, nk, generator=g, dtype=torch.float64), -1)
    Fq = torch.randn(2, 2, nq, 3, generator=g, dtype=torch.float64)
    Fv = torch.randn(2, 2, nk, 3, generator=g, dtype=torch.float64)
    p, mu, eps = 1.25, 0.2, 1e-6
    ref, ref_alpha = _dense_reference(A, Fq, Fv, p, mu, eps)
    out, alpha, beta = p_laplacian_query_update(A, Fq, Fv, torch.tensor(p, dtype=torch.float64),
                                                torch.tensor(mu, dtype=torch.float64), eps)
    torch.testing.assert_close(out, ref[:, :, :nq])
    torch.testing.assert_close(alpha, ref_alpha[:, :, :nq])
    # the self term is present for every query, also when Nq != Nk (cross-attention)
    assert (beta > 0).all()
    torch.testing.assert_close(beta, alpha * 2 * mu / p)


def test_self_term_nonzero_in_cross_attention():
    """With Nq != Nk, F'_q - diag(α)ÃF = diag(β)F_q is non-zero (the reference code zeroes it)."""
    g = torch.Generator().manual_seed(1)
    A = torch.softmax(torch.randn(1, 2, 2, 6, generator=g), -1)
    Fq, Fv = torch.randn(1, 2, 2, 4, generator=g), torch.randn(1, 2, 6, 4, generator=g)
    p, mu, eps = 1.25, 0.2, 1e-6
    out, alpha, beta = p_laplacian_query_update(A, Fq, Fv, torch.tensor(p), torch.tensor(mu), eps)
    G = ((A + eps) * torch.cdist(Fq, Fv).pow(2) + eps).pow((p - 2) / 2)
    At = A * G
    alpha_ref = 1 / (At.sum(-1) + 2 * mu / p)
    neighbour = alpha_ref.unsqueeze(-1) * (At @ Fv)   # all the reference code keeps when Nq != Nk
    torch.testing.assert_close(out - neighbour, beta.unsqueeze(-1) * Fq, atol=1e-5, rtol=1e-4)
    assert (out - neighbour).abs().max() > 1e-3


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
    m = _run(family, {"method": "p_adapter", "zero_init_out": False})
    s = m.adapterkit.sets["p_adapter"]
    n_attn = 4 if family == "bart" else 2  # bart: decoder self + cross; llama: causal self-attention
    assert len(s.paths) == n_attn and all("encoder." not in p for p in s.paths)
    y = m(**x).logits
    assert torch.isfinite(y).all() and (y - y0).abs().max() > 1e-7
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
        y = _run(family, {"method": "p_adapter"})(**x).logits
        torch.testing.assert_close(y, y0, atol=1e-6, rtol=0)
        cfg = {"method": "p_adapter", "zero_init_out": False}
        ye, ys = _run(family, cfg, "eager")(**x).logits, _run(family, cfg, "sdpa")(**x).logits
    torch.testing.assert_close(ye, ys, atol=1e-5, rtol=1e-4)


def test_cross_attention_pooling_and_only_cross():
    x = tiny_inputs("bart")
    m = _run("bart", {"method": "p_adapter", "positions": ["cross_attn"], "image_sample_len": 3,
                      "zero_init_out": False})
    s = m.adapterkit.sets["p_adapter"]
    assert all("encoder_attn" in p for p in s.paths)
    assert all(layer.sample_len == 3 for layer in s.layers.values())
    with torch.no_grad():
        y = m(**x).logits
    assert torch.isfinite(y).all()
    # padding-aware pooling: with all tokens valid it is the plain adaptive average pool
    t = torch.randn(2, 2, 7, 4)
    pooled, valid = _pool_tokens(t, torch.ones(2, 7, dtype=torch.bool), 3)
    ref = F.adaptive_avg_pool1d(t.permute(0, 1, 3, 2).reshape(2, 8, 7), 3).view(2, 2, 4, 3).permute(0, 1, 3, 2)
    torch.testing.assert_close(pooled, ref)
    assert valid.all()
    # padded tokens do not leak into the pooled values
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[:, 5:] = False
    t2 = t.clone()
    t2[:, :, 5:] = 1e6
    p1, _ = _pool_tokens(t, mask, 3)
    p2, _ = _pool_tokens(t2, mask, 3)
    torch.testing.assert_close(p1, p2)


def test_per_task_mixed_batch():
    cfg = {"method": "p_adapter", "tasks": ["a", "b"], "sharing": "per_task", "zero_init_out": False}
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
