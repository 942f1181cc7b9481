"""``layers`` picks which layers get adapters; negative indices count from the top layer, so one
preset ("the top 15 layers") means the same on models of any depth."""

import pytest
import torch
import transformers as tf

import adapterkit
from adapterkit.errors import ConfigError


def _llama(layers: int):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4)
    return tf.LlamaForCausalLM(cfg)


def _layers_with_adapters(model) -> set[int]:
    import re

    return {int(m.group(1)) for n, _ in model.named_parameters() if "adapterkit" in n
            for m in [re.search(r"layers__(\d+)__", n)] if m}


@pytest.mark.parametrize("layers, want", [
    ([4, 5], {4, 5}),
    ([-2, -1], {4, 5}),         # the top two of six
    ([0, -1], {0, 5}),
    ([-9, -1], {5}),            # below the bottom: no such layer (as an index past the top is)
    (None, {0, 1, 2, 3, 4, 5}),
])
def test_negative_layers_count_from_the_top(layers, want):
    model = adapterkit.add_adapters(_llama(6), {"method": "houlsby", "reduction_factor": 4, "layers": layers})
    assert _layers_with_adapters(model) == want


def test_upper_preset_layers_on_a_30_layer_stack_are_15_to_29():
    from adapterkit.vl.presets import get_preset

    layers = get_preset("single_adapter_upper")["adapters"][0]["layers"]
    assert sorted(i + 30 if i < 0 else i for i in layers) == list(range(15, 30))


def test_no_layer_left_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"in layers \[7, 8\]"):
        adapterkit.add_adapters(_llama(2), {"method": "houlsby", "layers": [7, 8]})
