"""SimAdapter (method sim_adapter) on a tiny random-init Whisper: the block output equals the
spec's formula computed by hand from the block's own modules; W_v starts at the identity;
the extra loss is 0.01 ||I - W_v||^2 + lambda_g CE(exp(mean alpha), target); only the fusion
layers train; pfeiffer language-adapter weights of the same form load into it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import adapterkit
from adapterkit.audio.asr import tiny_whisper
from adapterkit.core.base import get_container
from adapterkit.errors import ConfigError

LANGS = ["es", "fr", "it"]
# Whisper is pre-LN: the residual stream entering the FFN is final_layer_norm's input. The whisper
# profile's ffn_stream says so (tests/test_audio_whisper_profile.py); it is also named here, as the
# cross-lingual example names it (written when the profile still gave fc1, whose input is normalised)
PLACES = {"ffn_stream": [r"(?P<stack>encoder|decoder)\.layers\.(?P<layer>\d+)\.final_layer_norm$"]}
SIM = {"method": "sim_adapter", "bottleneck_dim": 8, "tasks": ["it"], "fusion": LANGS, "target": "it",
       "places": PLACES}


def _model(seed=0):
    model, _, _ = tiny_whisper({"max_source_positions": 8}, ["a b c"], seed)
    return model.eval()


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("adapterkit."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if n.endswith("ln_weight") else 0.0))


def _layer_io(model, layer):
    seen = {}
    layer.register_forward_pre_hook(lambda m, a, k: seen.update(x=(a[0] if a else k["hidden_states"]).clone()),
                                    with_kwargs=True)
    layer.register_forward_hook(lambda m, a, o: seen.update(y=(o[0] if isinstance(o, tuple) else o).clone()))
    return seen


def test_block_output_is_the_spec_formula():
    model = _model()
    adapterkit.add_adapters(model, dict(SIM), name="lang")
    _randomize(model)
    layer = model.model.encoder.layers[1]
    io = _layer_io(model, layer)
    feats = torch.randn(2, 80, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.model.encoder(feats)
    x_in, y_out = io["x"], io["y"]
    s = get_container(model).sets["lang"]
    key = next(k for k in s.adapters if "encoder__layers__1__" in k)
    ad, fus = s.adapters[key], s.fusions[key]
    # the block without the fusion: z (the plain block output) and x_norm (the FFN's input)
    s.suspend_hooks()
    grab = {}
    h = layer.fc1.register_forward_pre_hook(lambda m, a: grab.update(xn=a[0].clone()))
    with torch.no_grad():
        out = layer(x_in, attention_mask=None)
    h.remove()
    s.resume_hooks()
    z = out[0] if isinstance(out, tuple) else out
    a = []
    for n in range(len(LANGS)):
        y = F.layer_norm(z, z.shape[-1:]) * ad.ln_weight[n] + ad.ln_bias[n]
        a.append(z + F.linear(F.relu(F.linear(y, ad.down.weight[n], ad.down.bias[n])), ad.up.weight[n],
                              ad.up.bias[n]))
    a = torch.stack(a, -2)                                              # (B, T, N, d)
    q = z @ fus.query.weight.T + fus.query.bias
    k = a @ fus.key.weight.T + fus.key.bias
    v = a @ fus.value.weight.T
    alpha = torch.softmax((k * q.unsqueeze(-2)).sum(-1), -1)           # tau = 1: no sqrt(d)
    want = (alpha.unsqueeze(-1) * v).sum(-2) + grab["xn"]
    torch.testing.assert_close(y_out, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fus.last_alpha, alpha.reshape(-1, 3).mean(0), rtol=1e-5, atol=1e-6)


def test_value_init_loss_and_trainable():
    model = _model()
    adapterkit.add_adapters(model, dict(SIM, guide_weight=0.5), name="lang")
    s = get_container(model).sets["lang"]
    fus = next(iter(s.fusions.values()))
    w = fus.value.weight
    assert torch.equal(w.diagonal(), torch.ones(w.shape[0]))
    assert torch.equal(w - torch.diag(w.diagonal()), (1 - torch.eye(w.shape[0])) * 1e-6)
    assert fus.value.bias is None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".fusions." in n for n in trainable)
    _randomize(model)
    with torch.no_grad():
        model.model.encoder(torch.randn(2, 80, 16))
    fs = list(s.fusions.values())
    alphas = [f.last_alpha for f in fs if f.last_alpha is not None]
    assert len(alphas) == 2  # the encoder's two blocks ran; the decoder's did not
    reg = sum((torch.eye(f.value.weight.shape[0]) - f.value.weight).pow(2).sum() for f in fs)
    guide = sum(-torch.log_softmax(torch.exp(al), -1)[2] for al in alphas)
    torch.testing.assert_close(s.training_loss(), 0.01 * reg + 0.5 * guide)
    torch.testing.assert_close(s.training_loss(), 0.01 * reg)  # alpha consumed: no guide term without a forward


def test_pfeiffer_language_adapters_load_and_errors():
    src = _model()
    adapterkit.add_adapters(src, {"method": "pfeiffer", "bottleneck_dim": 8, "tasks": LANGS, "sharing": "per_task",
                                  "adapter_input": "normed_sum", "adapter_layernorm": "before", "places": PLACES}, name="lang")
    _randomize(src)
    state = {n: p for n, p in src.named_parameters() if n.startswith("adapterkit.")}
    dst = _model()
    adapterkit.add_adapters(dst, dict(SIM), name="lang")
    own = dict(dst.named_parameters())
    assert set(state) <= set(own)
    assert {n for n in own if n.startswith("adapterkit.") and n not in state} == {n for n in own if ".fusions." in n}
    with pytest.raises(ConfigError, match="fusion"):
        adapterkit.add_adapters(_model(), {"method": "sim_adapter", "fusion": ["es"], "bottleneck_dim": 8})
    with pytest.raises(ConfigError, match="target"):
        adapterkit.add_adapters(_model(), dict(SIM, target="ru"))
    with pytest.raises(ConfigError, match="always fuses"):
        adapterkit.compose(dst, adapterkit.Stack("it"))
