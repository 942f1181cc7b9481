"""HyperPELT: generated adapters + prefixes from one hypernetwork (tiny BART / T5)."""

import pytest
import torch

import adapterkit
from adapterkit.core.base import remove_adapters
from adapterkit.core.io import load_adapters, save_adapters
from adapterkit.errors import ConfigError
from adapterkit.methods.hyperpelt import set_visual_context, visual_context
from adapterkit.testing.tiny import tiny_inputs, tiny_model

SMALL = {"method": "hyperpelt", "tasks": ["a", "b"], "reduction_factor": 8, "task_embedding_dim": 8,
         "hidden_dim": 16, "projected_dim": 8, "prefix_length": 3}


def _out(model, x, task="a"):
    with adapterkit.route(task):
        return model(**x).logits


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_generated_shapes_for_every_place(family):
    m = adapterkit.add_adapters(tiny_model(family), SMALL)
    s = m.adapterkit.sets["hyperpelt"]
    shapes = s.generated("b")
    assert set(shapes) == set(s.paths["adapters"]) | set(s.paths["prefixes"])
    assert len(s.paths["adapters"]) == 4            # ffn of 2 encoder + 2 decoder layers
    assert len(s.paths["prefixes"]) == 6            # 4 self-attentions + 2 cross-attentions
    d, heads = 32, 2
    hd = 16
    for path in s.paths["adapters"]:
        assert shapes[path] == {"W_down": (4, d), "b_down": (4,), "W_up": (d, 4), "b_up": (d,)}
    for path in s.paths["prefixes"]:
        assert shapes[path] == {"P_k": (heads, 3, hd), "P_v": (heads, 3, hd)}
    # one shared hypernetwork: the layer/block embeddings distinguish places
    assert s.layer_emb.num_embeddings == 4 and s.block_emb.num_embeddings == 3


@pytest.mark.parametrize("family,impl", [("bart", "eager"), ("t5", "sdpa")])
def test_forward_backward_and_mixed_tasks(family, impl):
    m = tiny_model(family)
    m.set_attn_implementation(impl)
    m = adapterkit.add_adapters(m, SMALL)
    x = tiny_inputs(family)
    with adapterkit.route(["a", "b", "a"]):
        y = m(**x).logits
    y.pow(2).mean().backward()
    s = m.adapterkit.sets["hyperpelt"]
    for p in (s.task_embedding, s.layer_emb.weight, s.block_emb.weight, s.adapter_gen.up_w.weight,
              next(iter(s.prefix_gens.values())).kv.weight, s.proj[0].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(not p.requires_grad for n, p in m.named_parameters() if not n.startswith("adapterkit."))
    with torch.no_grad():  # a mixed batch equals each example routed alone
        ya, yb = _out(m, x, "a"), _out(m, x, "b")
    torch.testing.assert_close(y.detach()[[0, 2]], ya[[0, 2]], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(y.detach()[1], yb[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_eager_and_sdpa_agree_with_causal_masks(family):
    outs = []
    for impl in ("eager", "sdpa"):
        m = tiny_model(family)
        m.set_attn_implementation(impl)
        torch.manual_seed(3)
        adapterkit.add_adapters(m, SMALL)
        x = tiny_inputs(family)
        x["attention_mask"][0, -2:] = 0  # padding in the encoder
        with torch.no_grad():
            outs.append(_out(m, x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


def test_prefix_matches_manual_attention_and_changes_it():
    m = adapterkit.add_adapters(tiny_model("bart"), {**SMALL, "adapter_positions": []})
    s = m.adapterkit.sets["hyperpelt"]
    attn = m.model.encoder.layers[0].self_attn
    seen = {}
    h = attn.register_forward_hook(lambda mod, args, kwargs, out: seen.update(x=args[0] if args else kwargs["hidden_states"], y=out[0]),
                                   with_kwargs=True)
    x = tiny_inputs("bart")
    with torch.no_grad():
        _out(m, x, "b")
    h.remove()
    hs = seen["x"]
    B, L, _ = hs.shape
    pk, pv = s.prefixes("model.encoder.layers.0.self_attn", "b")
    with torch.no_grad():
        def heads(t):
            return t.view(B, L, 2, 16).transpose(1, 2)
        q, k, v = heads(attn.q_proj(hs)), heads(attn.k_proj(hs)), heads(attn.v_proj(hs))
        k2 = torch.cat([pk.expand(B, -1, -1, -1), k], 2)
        v2 = torch.cat([pv.expand(B, -1, -1, -1), v], 2)
        a = torch.softmax(q @ k2.transpose(-1, -2) * attn.scaling, -1)
        ref = attn.out_proj((a @ v2).transpose(1, 2).reshape(B, L, 32))
        plain = attn.out_proj((torch.softmax(q @ k.transpose(-1, -2) * attn.scaling, -1) @ v).transpose(1, 2)
                              .reshape(B, L, 32))
    torch.testing.assert_close(seen["y"], ref, atol=1e-5, rtol=1e-4)
    assert (seen["y"] - plain).abs().max() > 1e-4  # the prefix really changes the attention output


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_zero_up_without_prefix_is_identity(family):
    base = tiny_model(family)
    x = tiny_inputs(family)
    with torch.no_grad():
        y0 = base(**x).logits
    m = adapterkit.add_adapters(base, {**SMALL, "prefix_length": 0, "zero_init_up": True})
    with torch.no_grad():
        torch.testing.assert_close(_out(m, x, "b"), y0, atol=1e-6, rtol=0)
    # with prefixes on, the same zero-up adapter does change the outputs
    m2 = adapterkit.add_adapters(tiny_model(family), {**SMALL, "zero_init_up": True})
    with torch.no_grad():
        assert (_out(m2, x, "b") - y0).abs().max() > 1e-5


def test_generation_with_cache_matches_no_cache():
    m = adapterkit.add_adapters(tiny_model("bart"), SMALL)
    x = tiny_inputs("bart")
    with adapterkit.route("a"), torch.no_grad():
        g1 = m.generate(x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=5, do_sample=False,
                        use_cache=True)
        g2 = m.generate(x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=5, do_sample=False,
                        use_cache=False)
    assert torch.equal(g1, g2)


def test_visual_context_conditions_outputs():
    m = adapterkit.add_adapters(tiny_model("t5"), {**SMALL, "visual_dim": 5})
    x = tiny_inputs("t5")
    f1, f2 = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)), torch.zeros(3, 5)
    with torch.no_grad():
        with visual_context(m, f1):
            y1 = _out(m, x)
        with visual_context(m, f2):
            y2 = _out(m, x)
        set_visual_context(m, f1)
        y3 = _out(m, x)
        set_visual_context(m, None)
    assert (y1 - y2).abs().max() > 1e-6
    torch.testing.assert_close(y1, y3)
    with pytest.raises(ConfigError, match="visual features"):
        set_visual_context(m, torch.zeros(3, 4))
    plain = adapterkit.add_adapters(tiny_model("t5"), SMALL)
    with pytest.raises(ConfigError, match="visual_dim"):
        set_visual_context(plain, f1)


def test_save_load_and_remove(tmp_path):
    m = adapterkit.add_adapters(tiny_model("bart"), SMALL)
    x = tiny_inputs("bart")
    with torch.no_grad():
        y = _out(m, x, "b")
    save_adapters(m, tmp_path / "hp")
    m2 = load_adapters(tiny_model("bart"), tmp_path / "hp")
    with torch.no_grad():
        torch.testing.assert_close(_out(m2, x, "b"), y)
    attn = m2.model.decoder.layers[0].self_attn
    assert attn.config is not m2.config  # intercepting view while attached
    remove_adapters(m2)
    assert attn.config is m2.config
    with torch.no_grad():
        torch.testing.assert_close(m2(**x).logits, tiny_model("bart")(**x).logits)


def test_config_errors():
    with pytest.raises(ConfigError, match="adapter position"):
        adapterkit.add_adapters(tiny_model("bart"), {**SMALL, "adapter_positions": ["ffn"]})
    with pytest.raises(ConfigError, match="needs adapter_positions or prefixes"):
        adapterkit.add_adapters(tiny_model("bart"), {**SMALL, "adapter_positions": [], "prefix_length": 0})


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_other_families_find_their_attention_modules(family):
    m = tiny_model(family)
    x = tiny_inputs(family)
    with torch.no_grad():
        y0 = m(**x)[0]
    adapterkit.add_adapters(m, {**SMALL, "tasks": ["a"], "adapter_positions": [], "prefix_length": 2})
    s = m.adapterkit.sets["hyperpelt"]
    assert len(s.paths["prefixes"]) == 2  # BERT: attention.self (sibling of attention.output); GPT-2: fused attn
    with torch.no_grad():
        y = m(**x)[0]
    assert torch.isfinite(y).all() and (y - y0).abs().max() > 1e-5
