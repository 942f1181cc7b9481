"""The LM head reads a contiguous input (core/hf.contiguous_lm_heads, installed by the
engine): HF causal LMs slice the last position before the head, and torch's CPU linear on
such a strided 3-D input copies the whole weight once per row."""

from __future__ import annotations

import torch
from reliability_helpers import tiny_config

from adapterkit.core.hf import contiguous_lm_heads
from adapterkit.testing.fixtures import make_vl_fixture
from adapterkit.testing.tiny import tiny_inputs, tiny_model
from adapterkit.train.config import load_config
from adapterkit.train.trainer import Trainer


def _probe(head):
    seen = []
    head.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    return seen


def test_head_input_is_contiguous_and_output_unchanged():
    model = tiny_model("llama")
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        ref = model(**inputs, logits_to_keep=1).logits
    before = _probe(model.get_output_embeddings())
    with torch.no_grad():
        model(**inputs, logits_to_keep=1)
    assert before == [False]  # without the hook the head sees the strided slice

    model = tiny_model("llama")
    assert contiguous_lm_heads(model) == 1
    assert contiguous_lm_heads(model) == 0  # hooked once only
    seen = _probe(model.get_output_embeddings())
    with torch.no_grad():
        out = model(**inputs, logits_to_keep=1).logits
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=1)
    assert seen and all(seen)
    torch.testing.assert_close(out, ref)
    ref_model = tiny_model("llama")
    with torch.no_grad():
        assert torch.equal(gen, ref_model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=1))


def test_models_without_a_linear_head_are_left_alone():
    assert contiguous_lm_heads(tiny_model("bert")) == 0


def test_the_engine_hooks_the_vl_models_head(tmp_path):
    data = make_vl_fixture(tmp_path / "data", n_images=20)
    tr = Trainer(load_config(tiny_config(data, max_steps=1)), tmp_path / "run")
    heads = [m for m in tr.model.modules() if getattr(m, "_adapterkit_contiguous_head", False)]
    assert len(heads) == 1 and heads[0] is tr.model.lm.get_output_embeddings()


def test_merge_and_unload_takes_the_head_hook_away_too():
    import adapterkit

    model = adapterkit.add_adapters(tiny_model("llama"), {"method": "lora", "r": 2, "targets": ["q", "v"]})
    assert contiguous_lm_heads(model) == 1
    plain = adapterkit.merge_and_unload(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in plain.modules())
    assert contiguous_lm_heads(plain) == 1  # and it can be hooked again
