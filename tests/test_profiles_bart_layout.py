"""The BART-layout profiles name the right LayerNorm style: bart.json (post-LN) and mbart.json
(pre-LN) share module names, and which one a model type belongs to is checked here against the
order in which the real HF layers call their modules, for every model type either profile lists."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from adapterkit.core.profiles import find_places, get_profile, norm_style, profile_for_model

CLASSES = {"bart": "Bart", "marian": "Marian", "plbart": "PLBart", "blenderbot-small": "BlenderbotSmall",
           "mbart": "MBart", "pegasus": "Pegasus", "blenderbot": "Blenderbot", "m2m_100": "M2M100"}


def _tiny(model_type: str):
    name = CLASSES[model_type]
    cfg = getattr(tf, name + "Config")(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=1, decoder_start_token_id=2, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    return getattr(tf, name + "Model")(cfg).eval()


def _call_order(model, stack: str) -> list[str]:
    order: list[str] = []
    layer = getattr(model, stack).layers[0]
    hooks = [mod.register_forward_pre_hook(lambda m, a, n=n: order.append(n))
             for n, mod in layer.named_children()]
    with torch.no_grad():
        model(input_ids=torch.tensor([[0, 5, 6, 2]]), decoder_input_ids=torch.tensor([[2, 5, 6]]))
    for h in hooks:
        h.remove()
    return order


def test_every_bart_layout_type_is_in_exactly_one_profile():
    listed = get_profile("bart")["model_types"] + get_profile("mbart")["model_types"]
    assert sorted(listed) == sorted(CLASSES)


@pytest.mark.parametrize("model_type", sorted(CLASSES))
def test_profile_norm_style_matches_the_layers(model_type):
    model = _tiny(model_type)
    assert model.config.model_type == model_type
    profile = profile_for_model(model)
    style = norm_style(profile, model)
    for stack in ("encoder", "decoder"):
        order = _call_order(model, stack)
        ln_first = order.index("final_layer_norm") < order.index("fc1")
        assert ln_first == (style == "pre"), (model_type, stack, order, profile["name"])
        assert (order.index("self_attn_layer_norm") < order.index("self_attn")) == (style == "pre")
    # the stream place is the unnormalised residual entering the FFN: the LN's input when pre-LN,
    # fc1's input when post-LN (the previous sublayer's LN output)
    stream = find_places(model, profile, "ffn_stream")
    expect = "final_layer_norm" if style == "pre" else "fc1"
    assert stream and all(p.path.endswith(expect) for p in stream)
    assert profile["name"] == ("mbart" if style == "pre" else "bart")


def test_profile_extends_inherits_places_not_model_types():
    from adapterkit.core.profiles import get_profile, resolve_extends
    from adapterkit.errors import ConfigError

    m, w = get_profile("mbart"), get_profile("whisper")
    assert m["places"] == w["places"] and m["ia3"] == w["ia3"] and m["norm"] == "pre"
    assert "whisper" not in m["model_types"] and "mbart" not in w["model_types"]
    raw = {"a": {"name": "a", "model_types": ["a"], "places": {"q": ["x"], "k": ["y"]}, "norm": "post"},
           "b": {"name": "b", "extends": "a", "places": {"k": ["z"]}}}
    b = resolve_extends(raw)["b"]
    assert b["places"] == {"q": ["x"], "k": ["z"]} and b["norm"] == "post" and b["model_types"] == []
    with pytest.raises(ConfigError, match='extends unknown profile "c"'):
        resolve_extends({"b": {"name": "b", "extends": "c"}})
    with pytest.raises(ConfigError, match="cycle: a -> b -> a"):
        resolve_extends({"a": {"name": "a", "extends": "b"}, "b": {"name": "b", "extends": "a"}})
