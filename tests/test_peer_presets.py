"""Named peer presets ("adapterhub:seq_bn", "peft:lora", ...) build the same function as the peer.

AdapterHub presets: against AdapterHub's own saved adapters and outputs (tests/fixtures/adapterhub_saved,
made with adapters 1.3.0; the fixtures use AdapterHub's defaults except where a tiny width forces a
smaller reduction factor or rank, passed here as overrides). PEFT presets: against live PEFT with
PEFT's default config.
"""

import json

import pytest
import torch
from test_adapterhub_saved import FIX, _io, _run, bart, bert

import adapterkit
from adapterkit.core.adapterhub_interop import adapterhub_config
from adapterkit.core.config import config_from_dict
from adapterkit.core.io import adapter_state_dict
from adapterkit.core.peer_presets import peer_presets, resolve_preset
from adapterkit.testing.tiny import main_output, tiny_inputs, tiny_model

peft = pytest.importorskip("peft")


# fixture -> (preset, overrides the tiny fixture needed)
AH = {
    "bart_seq_bn": ("adapterhub:seq_bn", {}),
    "bart_double_seq_bn": ("adapterhub:double_seq_bn", {}),
    "bart_par_bn": ("adapterhub:par_bn", {}),
    "bart_compacter": ("adapterhub:compacter", {"reduction_factor": 4}),
    "bart_compacter++": ("adapterhub:compacter++", {"reduction_factor": 4}),
    "bart_lora": ("adapterhub:lora", {"r": 4}),
    "bert_lora": ("adapterhub:lora", {"r": 4}),
    "bert_double_seq_bn": ("adapterhub:double_seq_bn", {"reduction_factor": 4}),
    "bert_compacter": ("adapterhub:compacter", {"reduction_factor": 4}),
    "bart_ia3": ("adapterhub:ia3", {}),
    "bert_prompt_tuning": ("adapterhub:prompt_tuning", {"num_tokens": 4}),
    "bart_prefix_tuning": ("adapterhub:prefix_tuning", {"num_tokens": 4, "bottleneck_size": 8}),
    "bart_prefix_tuning_flat": ("adapterhub:prefix_tuning_flat", {"num_tokens": 3}),
    "bart_scaled_par_bn": ("adapterhub:scaled_par_bn", {"reduction_factor": 4}),
}


@pytest.mark.parametrize("fixture", list(AH))
def test_adapterhub_preset_computes_adapterhubs_function(fixture):
    preset, over = AH[fixture]
    make = bart if fixture.startswith("bart") else bert
    inputs, want = _io(fixture)
    loaded = adapterkit.import_adapterhub(make(), FIX / fixture, name="x")   # AdapterHub's trained weights
    ours = adapterkit.add_adapters(make(), {"preset": preset, **over}, name="x")
    theirs = adapter_state_dict(loaded)
    mine = dict(ours.named_parameters())
    assert sorted(adapter_state_dict(ours)) == sorted(theirs)  # the same places, shapes and parameters
    with torch.no_grad():
        for k, v in theirs.items():
            mine[k].copy_(v)
    _run(ours, inputs, want)


@pytest.mark.parametrize("fixture", ["bart_seq_bn", "bart_double_seq_bn", "bart_par_bn", "bart_compacter++"])
def test_loader_maps_adapterhub_defaults_to_the_preset(fixture):
    """The loader's mapping of AdapterHub's (default) config and the preset are the same adapterkit config."""
    preset, over = AH[fixture]
    ah = json.loads((FIX / fixture / "adapter_config.json").read_text())["config"]
    assert config_from_dict(adapterhub_config(ah, bart())) == config_from_dict({"preset": preset, **over})


def _copy_peft_lora(pm, ours):
    s = ours.adapterkit.sets["lora"]
    with torch.no_grad():
        for key, layer in s.layers.items():
            mod = pm.base_model.model.get_submodule(key.replace("__", "."))
            layer.A.weight[0].copy_(mod.lora_A["default"].weight)
            layer.B.weight[0].copy_(mod.lora_B["default"].weight)
    return len(s.layers)


@pytest.mark.parametrize("family", ["bart", "bert", "gpt2", "llama", "t5"])
def test_peft_lora_preset_is_peft_default_lora(family):
    pm = peft.get_peft_model(tiny_model(family), peft.LoraConfig())  # PEFT's defaults for this model type
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.eval()
    ours = adapterkit.add_adapters(tiny_model(family), "peft:lora")
    peft_targets = {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
                    for n, _ in pm.named_parameters() if ".lora_A." in n}
    assert {k.replace("__", ".") for k in ours.adapterkit.sets["lora"].layers} == peft_targets
    assert ours.adapterkit.sets["lora"].config.scaling == pm.peft_config["default"].lora_alpha / 8
    assert _copy_peft_lora(pm, ours) == len(peft_targets)
    inputs = tiny_inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(main_output(ours(**inputs)), main_output(pm(**inputs)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bart", "bert", "llama"])
def test_peft_ia3_preset_is_peft_default_ia3(family):
    pm = peft.get_peft_model(tiny_model(family), peft.IA3Config())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.3)
    pm.eval()
    ours = adapterkit.add_adapters(tiny_model(family), "peft:ia3")
    s = ours.adapterkit.sets["ia3"]
    peft_mods = {n.removeprefix("base_model.model.").rsplit(".ia3_l", 1)[0]: p
                 for n, p in pm.named_parameters() if ".ia3_l." in n}
    assert {k.replace("__", ".") for k in s.vectors} == set(peft_mods)
    with torch.no_grad():
        for key, v in s.vectors.items():
            v[0].copy_(peft_mods[key.replace("__", ".")].reshape(-1))
    inputs = tiny_inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(main_output(ours(**inputs)), main_output(pm(**inputs)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,task", [("llama", "CAUSAL_LM"), ("bart", "SEQ_2_SEQ_LM")])
def test_peft_prompt_tuning_preset_is_peft_prompt_tuning(family, task):
    pm = peft.get_peft_model(tiny_model(family), peft.PromptTuningConfig(num_virtual_tokens=4, task_type=task))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    pm.eval()
    ours = adapterkit.add_adapters(tiny_model(family), {"preset": "peft:prompt_tuning", "num_tokens": 4})
    with torch.no_grad():
        ours.adapterkit.sets["prompt"].embedding[0].copy_(pm.prompt_encoder["default"].embedding.weight[:4])
    inputs = tiny_inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(main_output(ours(**inputs)), main_output(pm(**inputs)), atol=1e-5, rtol=1e-5)


def test_every_preset_builds_a_valid_config():
    for name, entry in peer_presets().items():
        need = {k: 4 for k in entry.get("required", [])}
        cfg = config_from_dict({"preset": name, **need})
        assert cfg.method == entry["config"]["method"]


def test_preset_errors():
    with pytest.raises(adapterkit.ConfigError, match="did you mean"):
        resolve_preset("adapterhub:seq_bm")
    with pytest.raises(adapterkit.ConfigError, match="num_tokens"):
        resolve_preset("peft:prompt_tuning")
    with pytest.raises(adapterkit.ConfigError, match="not \"lora\""):
        resolve_preset({"preset": "adapterhub:seq_bn", "method": "lora"})
    assert resolve_preset({"preset": "peft:lora", "r": 4})["r"] == 4
