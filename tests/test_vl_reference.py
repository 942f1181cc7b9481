"""VL-Adapter as its reference code (ylsung/VL_adapter) sets it up: freeze policies and the
parameter table, decoder scoring positions, task prefixes, visual inputs, lengths."""

import pytest
import torch

from adapterkit.vl.build import build_vl_model, count_params

# % trainable of VL-BART (image setting) per preset: the paper's Table 1; multiple_lora as the
# reference code counts it (30,020,352 / 169,468,416 = 17.714%, the paper prints 17.72)
PAPER_IMAGE = {"full_finetune": 100.0, "multiple_adapters": 12.22, "half_shared_adapters": 8.36,
               "single_adapter": 4.18, "hyperformer": 5.79, "multiple_compacters": 7.05, "single_compacter": 2.70,
               "multiple_lora": 17.71, "single_lora": 5.93, "multiple_prompts": 4.53, "single_prompt": 2.00}


@pytest.mark.parametrize("preset", sorted(PAPER_IMAGE))
def test_parameter_table_matches_the_paper(preset):
    r = count_params("vl-bart", preset)
    assert round(r["percent"], 2) == PAPER_IMAGE[preset]


def test_video_single_adapter_matches_the_paper():
    assert round(count_params("vl-bart", "single_adapter", "video")["percent"], 2) == 3.39


def test_params_cli_prints_the_paper_column(capsys):
    from adapterkit.cli import main

    assert main(["params", "--model", "vl-bart", "--setting", "video", "--preset", "single_adapter"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("single_adapter"))
    assert row.split()[-2:] == ["3.39", "3.39"]  # ours, then the paper's


def _trainable_base(model):
    return {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("lm.")}


@pytest.mark.parametrize("preset", ["single_lora", "multiple_lora"])
def test_lora_presets_train_every_bias_and_no_layernorm_weight(preset):
    m, _ = build_vl_model({"backbone": "tiny-bart", "feat_dim": 8, "corpus": ["a b"]}, preset, ["vqa", "gqa"])
    on = _trainable_base(m)
    biases = {n for n, _ in m.lm.named_parameters() if n.endswith(".bias")}
    assert biases and {f"lm.{n}" for n in biases} == on  # LayerNorm biases are biases too (as the reference)
    ln_weights = [n for n, mod in m.lm.named_modules() if isinstance(mod, torch.nn.LayerNorm)]
    assert ln_weights and not any(f"lm.{n}.weight" in on for n in ln_weights)


@pytest.mark.parametrize("preset", ["single_prompt", "multiple_prompts"])
def test_prompt_presets_train_no_layernorm(preset):
    m, _ = build_vl_model({"backbone": "tiny-bart", "feat_dim": 8, "corpus": ["a b"]}, preset, ["vqa", "gqa"])
    assert _trainable_base(m) == set()
    assert all(p.requires_grad for p in m.visual.parameters())
