"""The method x architecture matrix on tiny random-init models."""

import pytest
import torch

import adapterkit
from adapterkit.testing.tiny import TINY_FAMILIES, main_output, tiny_inputs, tiny_model

METHODS = {
    "houlsby": {"method": "houlsby", "reduction_factor": 4},
    "pfeiffer": {"method": "pfeiffer", "reduction_factor": 4},
    "parallel": {"method": "parallel", "reduction_factor": 4},
    "lora": {"method": "lora", "r": 4},
    "compacter": {"method": "compacter", "phm_dim": 2, "reduction_factor": 8},
    "compacter++": {"method": "compacter++", "phm_dim": 2, "reduction_factor": 8},
    "hyperformer": {"method": "hyperformer", "task_embedding_dim": 8, "hidden_dim": 8, "projected_dim": 4},
    "prompt": {"method": "prompt", "num_tokens": 3, "reparam_dim": 16},
    "bitfit": {"method": "bitfit"},
    "layernorm": {"method": "layernorm"},
}
# pairs that are refused by design, with a clear error
UNSUPPORTED = {("vit", "prompt"), ("ast", "prompt"), ("clip_vision", "prompt"), ("clip_text", "prompt"),
               ("whisper", "prompt"), ("t5", "bitfit"), ("llama", "bitfit")}
# configs whose adapters start as the identity (zero up-projection)
ZERO_INIT = {
    "houlsby": {"method": "houlsby", "reduction_factor": 4, "init": "zeros_up_bert"},
    "pfeiffer": {"method": "pfeiffer", "reduction_factor": 4, "init": "lora"},
    "parallel": {"method": "parallel", "reduction_factor": 4},
    "lora": {"method": "lora", "r": 4},
}


def _backward(model, family, inputs):
    out = main_output(model(**inputs))
    out.float().pow(2).mean().backward()


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_attach_forward_backward(family, method):
    model = tiny_model(family)
    model.train()
    cfg = dict(METHODS[method])
    if (family, method) in UNSUPPORTED:
        with pytest.raises(adapterkit.ConfigError):
            adapterkit.add_adapters(model, cfg)
        return
    adapterkit.add_adapters(model, cfg)
    inputs = tiny_inputs(family)
    _backward(model, family, inputs)
    container = model.adapterkit
    allowed = set(container.base_trainable)
    got_grad = set()
    for n, p in model.named_parameters():
        if n.startswith("adapterkit."):
            assert p.requires_grad, n
            if p.grad is not None:
                got_grad.add(n)
        else:
            assert p.requires_grad == (n in allowed), n
            if n not in allowed:
                assert p.grad is None, f"frozen base parameter {n} got a gradient"
    if method in ("bitfit", "layernorm"):
        assert allowed, "the policy unfroze nothing"
        if method == "bitfit":
            assert all(n.endswith("bias") for n in allowed)
    else:
        assert got_grad, "no adapter parameter received a gradient"
    rep = adapterkit.trainable_report(model)
    assert 0 < rep["trainable"] < rep["total"] and rep["percent"] == pytest.approx(100 * rep["trainable"] / rep["total"])


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("method", list(ZERO_INIT))
def test_zero_init_leaves_outputs_unchanged(family, method):
    model = tiny_model(family)
    inputs = tiny_inputs(family)
    with torch.no_grad():
        before = main_output(model(**inputs)).clone()
        adapterkit.add_adapters(model, dict(ZERO_INIT[method]))
        after = main_output(model(**inputs))
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_nonzero_adapter_changes_outputs():
    model = tiny_model("bart")
    inputs = tiny_inputs("bart")
    with torch.no_grad():
        before = main_output(model(**inputs)).clone()
        adapterkit.add_adapters(model, {"method": "houlsby", "reduction_factor": 4})
        after = main_output(model(**inputs))
    assert (after - before).abs().max() > 1e-6


def test_houlsby_places_on_bart():
    model = tiny_model("bart")
    adapterkit.add_adapters(model, {"method": "houlsby", "reduction_factor": 4})
    keys = list(model.adapterkit.sets["houlsby"].adapters.keys())
    # encoder: attn + ffn per layer; decoder: attn + cross + ffn per layer; 2 layers each
    assert len(keys) == 2 * 2 + 2 * 3
    assert any("encoder_attn__out_proj" in k for k in keys)
    assert all(k.endswith(("out_proj", "fc2")) for k in keys)


def test_shared_module_counted_once_and_per_task_scales():
    shared = tiny_model("bert")
    adapterkit.add_adapters(shared, {"method": "houlsby", "reduction_factor": 4, "tasks": ["a", "b", "c"]})
    per = tiny_model("bert")
    adapterkit.add_adapters(per, {"method": "houlsby", "reduction_factor": 4, "tasks": ["a", "b", "c"],
                                  "sharing": "per_task"})
    half = tiny_model("bert")
    adapterkit.add_adapters(half, {"method": "houlsby", "reduction_factor": 4, "tasks": ["a", "b", "c"],
                                   "sharing": "half_shared_up"})
    s = adapterkit.trainable_report(shared)["trainable"]
    p = adapterkit.trainable_report(per)["trainable"]
    h = adapterkit.trainable_report(half)["trainable"]
    assert p == 3 * s
    assert s < h < p
