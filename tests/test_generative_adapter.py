"""GenerativeAdapter on tiny Llama: generated LoRA vs the formula, merge, training step."""

import pytest
import torch

import adapterkit
from adapterkit.errors import ConfigError
from adapterkit.methods.generative import (
    absorb_context,
    completion_loss,
    generative_set,
    merged_context,
    normalize_state,
    split_documents,
)
from adapterkit.testing.tiny import tiny_inputs, tiny_model

CFG = {"method": "generative_adapter", "r1": 6, "r2": 5, "max_rank": 5, "alpha": 3.0}


def _model(cfg=CFG, seed=0):
    m = adapterkit.add_adapters(tiny_model("llama", seed=seed), cfg)
    s = generative_set(m)
    with torch.no_grad():
        for layer in s.layers.values():
            layer.B.normal_(0, 0.5)
            layer.norm_weight.uniform_(0.5, 1.5)
    return m, s


def _rms(h, w, eps=1e-6):
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w


def test_generated_lora_matches_formula():
    m, s = _model()
    assert s.paths == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    ctx = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ctx)
    mask[0, -3:] = 0  # padding is left out of S
    with torch.no_grad():
        hs = m(input_ids=ctx, attention_mask=mask, output_hidden_states=True).hidden_states  # base model
        absorb_context(m, ctx, mask)
    x = tiny_inputs("llama")
    for li, (path, key) in enumerate(zip(s.paths, s.layers)):
        layer = s.layers[key]
        hn = _rms(hs[li], layer.norm_weight)                      # input residual stream of layer li
        K, V = hn @ layer.A2.T, hn @ layer.A3.T
        S = (K * mask[..., None]).transpose(1, 2) @ (V * mask[..., None])
        torch.testing.assert_close(s.state[key], S, atol=1e-5, rtol=1e-4)
        U, _, Vh = torch.linalg.svd(S[0], full_matrices=False)
        S_t = U @ Vh                                              # orthogonalisation (full rank here)
        torch.testing.assert_close(s.generated[key][0], S_t, atol=1e-4, rtol=1e-3)
        lora_A, lora_B = s.lora_weights()[path]
        torch.testing.assert_close(lora_A[0], S_t.T @ layer.A1, atol=1e-4, rtol=1e-3)
        dW = 3.0 / 6 * layer.B @ S_t.T @ layer.A1                  # (α/r) B S̃ᵀ A1
        torch.testing.assert_close(layer.delta_weight(s.generated[key][0]), dW, atol=1e-5, rtol=1e-4)
        # the hooked target adds ΔW x to the frozen output
        o_proj = m.get_submodule(path)
        xin = torch.randn(2, 4, o_proj.in_features)
        with torch.no_grad():
            torch.testing.assert_close(o_proj(xin), xin @ (o_proj.weight + dW).T, atol=1e-5, rtol=1e-4)
    del x


def test_merge_equals_unmerged_and_unmerge_restores():
    m, s = _model()
    x = tiny_inputs("llama")
    ctx = torch.randint(3, 100, (1, 8), generator=torch.Generator().manual_seed(1))
    w0 = [layer.target[0].weight.detach().clone() for layer in s.layers.values()]
    with torch.no_grad():
        y_base = m(**x).logits
        absorb_context(m, ctx)
        y = m(**x).logits
        adapterkit.merge_adapters(m)
        y_merged = m(**x).logits
        adapterkit.unmerge_adapters(m)
        torch.testing.assert_close(m(**x).logits, y)
        with merged_context(m, ctx):
            torch.testing.assert_close(m(**x).logits, y_merged)
        torch.testing.assert_close(m(**x).logits, y_base)  # context forgotten after the block
    assert (y - y_base).abs().max() > 1e-4
    torch.testing.assert_close(y_merged, y, atol=1e-5, rtol=1e-4)
    for layer, w in zip(s.layers.values(), w0):
        torch.testing.assert_close(layer.target[0].weight, w, atol=1e-6, rtol=0)
    absorb_context(m, ctx.expand(2, -1))
    with pytest.raises(ConfigError, match="2 contexts"):
        s.merge()


def test_segments_accumulate_and_batch_pairs_contexts():
    m, s = _model({**CFG, "segment_len": 4})
    with torch.no_grad():
        for layer in s.layers.values():
            layer.B.zero_()  # generated adapters are zero: each segment sees the base model
        ctx = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(2))
        absorb_context(m, ctx)
        S_full = {k: v.clone() for k, v in s.state.items()}
        absorb_context(m, ctx[:, :4])
        S1 = {k: v.clone() for k, v in s.state.items()}
        absorb_context(m, ctx[:, 4:])
        for k in S_full:
            torch.testing.assert_close(S_full[k], S1[k] + s.state[k], atol=1e-5, rtol=1e-4)
    # a batch of contexts: row b uses context b
    m, s = _model()
    x = tiny_inputs("llama", batch=2)
    ctx = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        absorb_context(m, ctx)
        y = m(**x).logits
        absorb_context(m, ctx[1:])
        y1 = m(**x).logits
    torch.testing.assert_close(y[1], y1[1], atol=1e-5, rtol=1e-4)
    assert (y[0] - y1[0]).abs().max() > 1e-5


def test_norm_options():
    S = torch.randn(2, 4, 3)
    torch.testing.assert_close(normalize_state(S, "frobenius", 3, 1).flatten(1).norm(dim=-1), torch.ones(2))
    spec = normalize_state(S, "spectral", 3, 1)
    torch.testing.assert_close(torch.linalg.matrix_norm(spec, ord=2), torch.ones(2))
    orth = normalize_state(S, "svd", 3, 1)
    torch.testing.assert_close(torch.linalg.svdvals(orth), torch.ones(2, 3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(normalize_state(S, "none", 3, 1), S)


def test_training_step_reaches_generator():
    m = adapterkit.add_adapters(tiny_model("llama"), CFG)
    s = generative_set(m)
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    assert all(n.startswith("adapterkit.") for n, p in m.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(params, lr=0.5)
    ctx, cm, tgt, tm = split_documents([list(range(3, 20)), list(range(30, 44))], 8, 6, pad_id=1)
    assert cm.sum() == 16 and tm[1].sum() == 6
    grads = {}
    for _ in range(2):  # B starts at zero: A1/A2/A3 get gradients once B has moved
        opt.zero_grad()
        loss = completion_loss(m, ctx, tgt, cm, tm)
        assert torch.isfinite(loss)
        loss.backward()
        grads = {n.rsplit(".", 1)[1]: p.grad for n, p in m.named_parameters() if p.requires_grad}
        opt.step()
    for name in ("A1", "A2", "A3", "B", "norm_weight"):
        assert grads[name] is not None and torch.isfinite(grads[name]).all() and grads[name].abs().sum() > 0, name
    assert not s.generated and not s.state  # completion_loss forgets the context afterwards
