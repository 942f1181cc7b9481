"""Parity with HF PEFT: the same LoRA / prompt-tuning weights give the same logits."""

import pytest
import torch

import adapterkit
from adapterkit.testing.tiny import main_output, tiny_inputs, tiny_model

peft = pytest.importorskip("peft")


def _randomise(model, scale=0.1):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("adapterkit."):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("family", ["llama", "bart", "gpt2"])
def test_lora_export_loads_in_peft(tmp_path, family):
    ours = tiny_model(family)
    adapterkit.add_adapters(ours, {"method": "lora", "r": 4, "alpha": 8})
    _randomise(ours)
    inputs = tiny_inputs(family)
    with torch.no_grad():
        ref = main_output(ours(**inputs))
    adapterkit.export_peft(ours, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path / "peft")
    theirs.eval()
    with torch.no_grad():
        got = main_output(theirs(**inputs))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_peft_lora_imports(tmp_path, family):
    base = tiny_model(family)
    targets = ["q_proj", "v_proj"]
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    pm.eval()
    inputs = tiny_inputs(family)
    with torch.no_grad():
        ref = main_output(pm(**inputs))
    pm.save_pretrained(tmp_path / "peft")
    ours = tiny_model(family)
    adapterkit.import_peft(ours, tmp_path / "peft")
    with torch.no_grad():
        got = main_output(ours(**inputs))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert adapterkit.trainable_report(ours)["trainable"] == sum(
        p.numel() for n, p in pm.named_parameters() if "lora_" in n)


def test_prompt_tuning_round_trip_with_peft(tmp_path):
    ours = tiny_model("llama")
    adapterkit.add_adapters(ours, {"method": "prompt", "num_tokens": 4, "reparam_dim": 16})
    _randomise(ours, 0.5)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        ref = main_output(ours(**inputs))
    assert ref.shape[1] == 4 + inputs["input_ids"].shape[1]
    adapterkit.export_peft(ours, tmp_path / "p")
    theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "p")
    theirs.eval()
    with torch.no_grad():
        got = main_output(theirs(**inputs))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # and back: PEFT's file imported into a fresh model
    back = tiny_model("llama")
    adapterkit.import_peft(back, tmp_path / "p")
    with torch.no_grad():
        again = main_output(back(**inputs))
    torch.testing.assert_close(again, ref, atol=1e-5, rtol=1e-5)


def test_per_task_lora_exports_one_peft_adapter_per_task(tmp_path):
    ours = tiny_model("llama")
    adapterkit.add_adapters(ours, {"method": "lora", "r": 4, "tasks": ["a", "b"], "sharing": "per_task"})
    _randomise(ours)
    inputs = tiny_inputs("llama")
    dirs = adapterkit.export_peft(ours, tmp_path / "multi")
    assert [d.name for d in dirs] == ["a", "b"]
    for t in ("a", "b"):
        with torch.no_grad(), adapterkit.route(t):
            ref = main_output(ours(**inputs))
        theirs = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "multi" / t)
        theirs.eval()
        with torch.no_grad():
            torch.testing.assert_close(main_output(theirs(**inputs)), ref, atol=1e-5, rtol=1e-5)


def test_import_peft_rejects_unsupported(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "adapter_config.json").write_text('{"peft_type": "LOHA"}')
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, tmp_path / "x" / "adapter_model.safetensors")
    with pytest.raises(adapterkit.CheckpointError, match="LOHA"):
        adapterkit.import_peft(tiny_model("llama"), tmp_path / "x")
