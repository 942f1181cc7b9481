"""The Whisper architecture profile (profiles/whisper.json): Whisper has BART's module names but
is pre-LN, so the residual stream entering a sublayer is the input of the sublayer's LayerNorm
(final_layer_norm, self_attn_layer_norm, encoder_attn_layer_norm), while fc1 / q_proj see LN(x).
Checked on a tiny random-init Whisper against the layers' own computation, and on what a
parallel adapter reading the stream computes without an explicit ``places`` override."""

from __future__ import annotations

import torch

import adapterkit
from adapterkit.audio.asr import tiny_whisper
from adapterkit.core.profiles import find_places, norm_style, profile_for_model
from adapterkit.testing.tiny import tiny_model

L = r"(?P<stack>encoder|decoder)\.layers\.(?P<layer>\d+)\."
FEATS = torch.randn(2, 80, 16, generator=torch.Generator().manual_seed(0))
DEC = torch.tensor([[1, 2, 3], [3, 2, 1]])


def _whisper(seed=0):
    model, _, _ = tiny_whisper({"max_source_positions": 8}, ["a b c"], seed)
    return model.eval()


def _run(model):
    with torch.no_grad():
        return model(input_features=FEATS, decoder_input_ids=DEC).logits


def test_whisper_has_its_own_pre_ln_profile():
    w = _whisper()
    p = profile_for_model(w)
    assert p["name"] == "whisper" and norm_style(p, w) == "pre"
    bart = tiny_model("bart")
    pb = profile_for_model(bart)
    assert pb["name"] == "bart" and norm_style(pb, bart) == "post"
    assert "whisper" not in pb["model_types"]


def test_stream_places_see_the_unnormalised_residual_stream():
    """attn_stream's input is the layer's input; ffn_stream's input is the stream entering the FFN,
    i.e. the layer output minus the FFN output; fc1 (the old ffn_stream) sees LN of it."""
    model = _whisper()
    p = profile_for_model(model)
    seen: dict = {}

    def grab(tag):
        return lambda m, a, k: seen.__setitem__(tag, (a[0] if a else next(iter(k.values()))).clone())

    hooks = []
    n_layers = 0
    for stack in ("encoder", "decoder"):
        for i, layer in enumerate(getattr(model.model, stack).layers):
            n_layers += 1
            key = f"{stack}{i}"
            hooks += [layer.register_forward_pre_hook(grab(f"{key}.in"), with_kwargs=True),
                      layer.register_forward_hook(lambda m, a, o, key=key: seen.__setitem__(
                          f"{key}.out", (o[0] if isinstance(o, tuple) else o).clone())),
                      layer.fc1.register_forward_pre_hook(grab(f"{key}.fc1"), with_kwargs=True),
                      layer.fc2.register_forward_hook(lambda m, a, o, key=key: seen.__setitem__(f"{key}.fc2", o.clone()))]
    for kind in ("attn_stream", "ffn_stream", "cross_attn_stream"):
        for pl in find_places(model, p, kind):
            hooks.append(pl.module.register_forward_pre_hook(grab(f"{pl.stack}{pl.layer}.{kind}"), with_kwargs=True))
    _run(model)
    for h in hooks:
        h.remove()
    for stack in ("encoder", "decoder"):
        for i, layer in enumerate(getattr(model.model, stack).layers):
            k = f"{stack}{i}"
            torch.testing.assert_close(seen[f"{k}.attn_stream"], seen[f"{k}.in"])
            stream = seen[f"{k}.ffn_stream"]
            torch.testing.assert_close(stream + seen[f"{k}.fc2"], seen[f"{k}.out"])   # the FFN's residual
            torch.testing.assert_close(layer.final_layer_norm(stream), seen[f"{k}.fc1"])
            assert not torch.allclose(stream, seen[f"{k}.fc1"], atol=1e-3)
            if stack == "decoder":  # the stream entering cross-attention: after the self-attention block
                assert f"{k}.cross_attn_stream" in seen
                assert not torch.allclose(seen[f"{k}.cross_attn_stream"], seen[f"{k}.in"], atol=1e-3)
    assert n_layers == 4 and len([k for k in seen if k.endswith(".ffn_stream")]) == 4


def _parallel(places=None):
    model = _whisper()
    cfg = {"method": "parallel", "bottleneck_dim": 4, "positions": ["ffn"], "init": "bert", "scale": 1.0,
           "parallel_input": "stream"}
    if places is not None:
        cfg["places"] = places
    adapterkit.add_adapters(model, cfg, name="p")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if n.startswith("adapterkit."):
                prm.copy_(0.5 * torch.randn(prm.shape, generator=g))
    return _run(model)


def test_parallel_adapter_reads_x_without_a_places_override():
    """What the cross-lingual and SimAdapter runs named explicitly (final_layer_norm) is now the
    profile's own ffn_stream; the old profile's fc1 gives a different output."""
    default = _parallel()
    explicit = _parallel({"ffn_stream": [L + "final_layer_norm$"]})
    old = _parallel({"ffn_stream": [L + "fc1$"]})
    torch.testing.assert_close(default, explicit)
    assert (default - old).abs().max() > 1e-3
