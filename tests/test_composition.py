"""Composition blocks (Stack / Average / Fuse / Parallel) against dense reference formulas, their
errors, and bottleneck attachment details (keyword hidden states on Llama-family models).

AdapterHub output parity for the same blocks: tests/test_adapterhub_parity.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import BartConfig, BartModel, LlamaConfig, LlamaForCausalLM

import adapterkit
from adapterkit import ConfigError
from adapterkit.core.composition import (
    Average,
    Fuse,
    Parallel,
    Stack,
    compose,
    current,
    fusion_regularization,
)


def tiny_bart():
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return BartModel(cfg).eval()


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=32, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


BATCH = {"input_ids": torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]),
         "decoder_input_ids": torch.tensor([[2, 5, 6], [2, 7, 8]])}


def _randomize(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("adapterkit."):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _enc_layer(model, fn):
    """Replace the encoder's only FFN output by fn(h, x) and return the encoder output (reference)."""
    layer = model.encoder.layers[0]
    seen = {}
    h1 = layer.fc1.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    h2 = layer.fc2.register_forward_hook(lambda m, a, out: fn(out, seen["x"], layer.final_layer_norm))
    try:
        with torch.no_grad():
            return model(**BATCH).encoder_last_hidden_state
    finally:
        h1.remove()
        h2.remove()


def _adapter(s, key, t):
    ad = s.adapters[key]
    return lambda z: torch.relu(z @ ad.down.weight[t].T + ad.down.bias[t]) @ ad.up.weight[t].T + ad.up.bias[t]


def _setup(**extra):
    model = adapterkit.add_adapters(tiny_bart(), {"method": "pfeiffer", "reduction_factor": 4,
                                                  "adapter_input": "normed_sum", "tasks": ["a", "b", "c"],
                                                  "sharing": "per_task", **extra}, name="s")
    _randomize(model)
    s = model.adapterkit.sets["s"]
    key = "encoder__layers__0__fc2"
    return model, s, key


def _compare(model, block, ref):
    with compose(model, block):
        with torch.no_grad():
            got = model(**BATCH).encoder_last_hidden_state
    adapterkit.remove_adapters(model)
    want = _enc_layer(model, ref)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_stack_is_sequential_application_with_the_block_norm():
    model, s, key = _setup()
    A, B = _adapter(s, key, 0), _adapter(s, key, 1)

    def ref(h, x, ln):
        h1 = h + A(ln(h + x))
        return h1 + B(ln(h1 + x))
    _compare(model, Stack("a", "b"), ref)


def test_average_formula():
    model, s, key = _setup()
    A, C = _adapter(s, key, 0), _adapter(s, key, 2)

    def ref(h, x, ln):  # AdapterHub: mean_i(w_i * (A_i(LN(h+x)) + h)), weights normalised
        z = ln(h + x)
        return (0.25 * (A(z) + h) + 0.75 * (C(z) + h)) / 2
    _compare(model, Average("a", "c", weights=[1.0, 3.0]), ref)


def test_fuse_formula_and_regularization():
    model, s, key = _setup(fusion=["a", "b", "c"])
    ads = [_adapter(s, key, t) for t in range(3)]
    f = s.fusions[key]
    with torch.no_grad():
        f.value.weight.add_(0.1 * torch.randn_like(f.value.weight))
    reg = fusion_regularization(model)
    eye = torch.eye(16)
    torch.testing.assert_close(reg, sum(0.01 * ((eye - g.value.weight) ** 2).sum() for g in s.fusions.values()))
    Wq, bq, Wk, bk, Wv = (t.detach().clone() for t in (f.query.weight, f.query.bias, f.key.weight, f.key.bias,
                                                        f.value.weight))

    def ref(h, x, ln):
        z = ln(h + x)
        ups = [ad(z) for ad in ads]
        q = z @ Wq.T + bq
        scores = torch.stack([((u @ Wk.T + bk) * q).sum(-1) for u in ups], -1)
        p = torch.softmax(scores, -1)
        return sum(p[..., i:i + 1] * (ups[i] @ Wv.T) for i in range(3)) + h
    _compare(model, Fuse("c", "a", "b"), ref)


def test_parallel_equals_routing_each_copy():
    model, s, key = _setup()
    with torch.no_grad():
        with compose(model, Parallel("b", "c")):
            got = model(**BATCH).last_hidden_state
        with adapterkit.route("b"):
            want_b = model(**BATCH).last_hidden_state
        with adapterkit.route("c"):
            want_c = model(**BATCH).last_hidden_state
    torch.testing.assert_close(got, torch.cat([want_b, want_c]), atol=1e-6, rtol=0)
    compose(model, Parallel("a", "b"))
    adapterkit.remove_adapters(model)              # Parallel ends with the adapters
    with torch.no_grad():
        assert model(**BATCH).last_hidden_state.shape[0] == 2
    assert current(model) is None


def test_composition_errors():
    model, s, key = _setup()
    with pytest.raises(ConfigError, match="declares"):
        compose(model, Stack("a", "zz"))
    with pytest.raises(ConfigError, match="fusion"):
        compose(model, Fuse("a", "b"))          # no fusion layers in this set
    with pytest.raises(ConfigError, match="may hold"):
        Fuse("a", Parallel("b", "c"))
    with pytest.raises(ConfigError, match="twice"):
        compose(model, Stack("a", "a"))
    with pytest.raises(ConfigError, match="weights"):
        Average("a", "b", weights=[1.0])
    lora = adapterkit.add_adapters(tiny_bart(), {"method": "lora", "r": 2, "targets": ["q", "v"],
                                                 "tasks": ["a", "b"], "sharing": "per_task"})
    with pytest.raises(ConfigError, match="does not support"):
        compose(lora, Average("a", "b"))
    compose(lora, Parallel("a", "b"))             # Parallel serves any routed method
    assert isinstance(current(lora), Parallel)
    with torch.no_grad():
        assert lora(**BATCH).last_hidden_state.shape[0] == 4
    compose(lora, None)
    assert current(lora) is None
    with pytest.raises(ConfigError, match="per_task"):
        adapterkit.add_adapters(tiny_bart(), {"method": "pfeiffer", "tasks": ["a", "b"], "fusion": ["a", "b"]})


def test_fusion_trains_alone_and_gets_gradients():
    model, s, key = _setup(fusion=["a", "b", "c"], train_adapters=False)
    compose(model, Fuse("a", "b", "c"))
    model.train()
    out = model(**BATCH).last_hidden_state
    (out.pow(2).mean() + fusion_regularization(model)).backward()
    assert s.fusions[key].query.weight.grad is not None and s.fusions[key].query.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in s.adapters.parameters())


@pytest.mark.parametrize("parallel_input", ["normalized", "stream"])
def test_parallel_attention_adapter_on_llama_keyword_hidden_states(parallel_input):
    """Llama passes hidden_states to self_attn by keyword: the capture must not read args[0]."""
    model = adapterkit.add_adapters(tiny_llama(), {"method": "parallel", "positions": ["attn", "ffn"],
                                                   "parallel_input": parallel_input})
    _randomize(model)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        got = model(input_ids=ids).logits
    # reference: the attention output plus the adapter applied to what self_attn (or its LayerNorm) saw
    s = model.adapterkit.sets["parallel"]
    adapterkit.remove_adapters(model)
    hooks, seen = [], {}
    for i, layer in enumerate(model.model.layers):
        src = layer.self_attn if parallel_input == "normalized" else layer.input_layernorm
        ad = s.adapters[f"model__layers__{i}__self_attn__o_proj"]

        def cap(m, a, kw, i=i):
            seen[i] = a[0] if a else kw["hidden_states"]
        hooks.append(src.register_forward_pre_hook(cap, with_kwargs=True))
        hooks.append(layer.self_attn.o_proj.register_forward_hook(
            lambda m, a, out, i=i, ad=ad: out + ad(seen[i], None)))
        fsrc = layer.mlp if parallel_input == "normalized" else layer.post_attention_layernorm
        fad = s.adapters[f"model__layers__{i}__mlp__down_proj"]
        hooks.append(fsrc.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("f", i), a[0])))
        hooks.append(layer.mlp.down_proj.register_forward_hook(
            lambda m, a, out, i=i, ad=fad: out + ad(seen[("f", i)], None)))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
