"""Prefix tuning, (IA)^3 and prompt placement against HF PEFT (live), plus their training,
merging, per-task and error behaviour. AdapterHub parity: tests/test_adapterhub_parity.py."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BartModel,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import adapterkit
from adapterkit import ConfigError

IDS = torch.tensor([[5, 6, 7, 8, 9], [9, 10, 11, 12, 1]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
DEC = torch.tensor([[2, 5, 6], [2, 7, 8]])


def bart(cls=BartModel, attn="eager"):
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=40, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    cfg._attn_implementation = attn
    return cls(cfg).eval()


def bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)).eval()


def llama(attn="eager"):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, max_position_embeddings=64)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def _peft_tensors(pm, marker: str) -> dict:
    """PEFT's adapter tensors (randomised in place), by their module path."""
    g = torch.Generator().manual_seed(5)
    out = {}
    with torch.no_grad():
        for k, p in pm.named_parameters():
            if marker in k:
                p.copy_((1.0 if "ia3" in marker else 0.0) + 0.4 * torch.randn(p.shape, generator=g))
                out[k] = p.detach().clone()
    assert out
    return out


# -- (IA)^3 --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bart", "bert", "llama"])
def test_ia3_peft_variant_matches_peft(family):
    make = {"bart": bart, "bert": bert, "llama": llama}[family]
    kw = {"input_ids": IDS, "attention_mask": MASK}
    if family == "bart":
        kw["decoder_input_ids"] = DEC
    pm = peft.get_peft_model(make(), peft.IA3Config())
    tensors = _peft_tensors(pm, "ia3_l")
    with torch.no_grad():
        want = pm(**kw)
    model = adapterkit.add_adapters(make(), {"method": "ia3"})  # variant "peft" is the default
    s = model.adapterkit.sets["ia3"]
    assert len(s.vectors) == len(tensors)
    with torch.no_grad():
        for k, v in tensors.items():
            path = k.removeprefix("base_model.model.").removesuffix(".ia3_l.default")
            side = s.paths[path.replace(".", "__")]
            assert side == ("input" if v.shape[0] == 1 else "output"), path
            s.vectors[path.replace(".", "__")][0].copy_(v.flatten())
    with torch.no_grad():
        got = model(**kw)
    field = "logits" if family == "llama" else "last_hidden_state"
    torch.testing.assert_close(getattr(got, field), getattr(want, field), atol=1e-5, rtol=0)
    # merged: the same function with no hooks; unmerged: the base weights come back
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("adapterkit")}
    adapterkit.merge_adapters(model)
    with torch.no_grad():
        torch.testing.assert_close(getattr(model(**kw), field), getattr(want, field), atol=1e-5, rtol=0)
    adapterkit.unmerge_adapters(model)
    for k, v in model.state_dict().items():
        if k in before:
            torch.testing.assert_close(v, before[k], atol=1e-6, rtol=1e-5)


def test_ia3_variants_differ_on_bart_and_train():
    peft_style = adapterkit.add_adapters(bart(), {"method": "ia3"})
    ah_style = adapterkit.add_adapters(bart(), {"method": "ia3", "variant": "adapterhub"})
    p = set(peft_style.adapterkit.sets["ia3"].paths.items())
    a = set(ah_style.adapterkit.sets["ia3"].paths.items())
    assert ("encoder__layers__0__self_attn__q_proj", "output") in p and ("encoder__layers__0__fc2", "input") in p
    assert ("encoder__layers__0__self_attn__k_proj", "output") in a and ("encoder__layers__0__fc1", "output") in a
    assert ("decoder__layers__0__encoder_attn__k_proj", "output") in a
    # starts as the identity, and trains
    with torch.no_grad():
        base = bart()(input_ids=IDS, decoder_input_ids=DEC).last_hidden_state
        torch.testing.assert_close(ah_style(input_ids=IDS, decoder_input_ids=DEC).last_hidden_state, base)
    ah_style.train()
    ah_style(input_ids=IDS, decoder_input_ids=DEC).last_hidden_state.pow(2).mean().backward()
    assert all(v.grad is not None for v in ah_style.adapterkit.sets["ia3"].vectors.values())


def test_ia3_per_task_mixed_batch_and_errors():
    model = adapterkit.add_adapters(bart(), {"method": "ia3", "tasks": ["a", "b"], "sharing": "per_task"})
    s = model.adapterkit.sets["ia3"]
    with torch.no_grad():
        for v in s.vectors.values():
            v[1].uniform_(0.5, 1.5)
        with adapterkit.route(["a", "b"]):
            mixed = model(input_ids=IDS, decoder_input_ids=DEC).last_hidden_state
        for i, t in enumerate("ab"):
            with adapterkit.route(t):
                one = model(input_ids=IDS[i:i + 1], decoder_input_ids=DEC[i:i + 1]).last_hidden_state
            torch.testing.assert_close(mixed[i:i + 1], one, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="name the task"):
        adapterkit.merge_adapters(model)
    with pytest.raises(ConfigError, match="not in target_modules"):
        adapterkit.add_adapters(bart(), {"method": "ia3", "target_modules": ["k_proj"], "feedforward_modules": ["fc2"]})
    m = adapterkit.add_adapters(bart(), {"method": "ia3", "target_modules": ["k_proj", "fc2"],
                                         "feedforward_modules": ["fc2"]})
    assert set(m.adapterkit.sets["ia3"].paths.values()) == {"input", "output"}


# -- prefix tuning ---------------------------------------------------------------------------

def _load_peft_prefix(model, tensors: dict) -> None:
    tab = model.adapterkit.sets["prefix"].tables["peft"]
    names = {"embedding.weight": tab.table if tab.table is not None else tab.embedding,
             "transform.0.weight": tab.mlp_in and tab.mlp_in.weight, "transform.0.bias": tab.mlp_in and tab.mlp_in.bias,
             "transform.2.weight": tab.mlp_out and tab.mlp_out.weight,
             "transform.2.bias": tab.mlp_out and tab.mlp_out.bias}
    with torch.no_grad():
        for k, v in tensors.items():
            leaf = k.split("prompt_encoder.default.")[1]
            names[leaf][0].copy_(v)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_prefix_peft_style_matches_peft_causal(projection, attn):
    pcfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection,
                                   encoder_hidden_size=12)
    pm = peft.get_peft_model(llama(attn), pcfg)
    tensors = _peft_tensors(pm, "prompt_encoder")
    with torch.no_grad():
        want = pm(input_ids=IDS, attention_mask=MASK).logits
    cfg = {"method": "prefix", "style": "peft", "num_tokens": 3, "reparam": projection, "bottleneck_size": 12}
    model = adapterkit.add_adapters(llama(attn), cfg)
    _load_peft_prefix(model, tensors)
    with torch.no_grad():
        got = model(input_ids=IDS, attention_mask=MASK).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if projection:
        return
    # the AdapterHub style keeps positions 0..L-1 and so is another function on Llama (RoPE)
    ah = adapterkit.add_adapters(llama(attn), {**cfg, "style": "adapterhub", "locations": ["self"]})
    with torch.no_grad():
        src, dst = model.adapterkit.sets["prefix"].tables["peft"], ah.adapterkit.sets["prefix"].tables["self"]
        for a, b in zip(src.parameters(), dst.parameters()):
            b.copy_(a)
        assert (ah(input_ids=IDS, attention_mask=MASK).logits - want).abs().max() > 1e-4


def test_prefix_peft_style_matches_peft_seq2seq():
    pm = peft.get_peft_model(bart(BartForConditionalGeneration),
                             peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    tensors = _peft_tensors(pm, "prompt_encoder")
    with torch.no_grad():
        want = pm(input_ids=IDS, attention_mask=MASK, decoder_input_ids=DEC).logits
    model = adapterkit.add_adapters(bart(BartForConditionalGeneration),
                                    {"method": "prefix", "style": "peft", "num_tokens": 3})
    _load_peft_prefix(model, tensors)
    with torch.no_grad():
        got = model(input_ids=IDS, attention_mask=MASK, decoder_input_ids=DEC).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_prefix_trains_generates_and_routes_tasks():
    model = adapterkit.add_adapters(llama(), {"method": "prefix", "num_tokens": 2, "bottleneck_size": 8,
                                              "tasks": ["a", "b"], "sharing": "per_task"})
    s = model.adapterkit.sets["prefix"]
    model.train()
    for _ in range(2):  # two forwards before a step (gradient accumulation) reuse no freed graph
        with adapterkit.route("a"):
            model(input_ids=IDS, labels=IDS).loss.backward()
    tab = s.tables["self"]
    assert tab.embedding.grad[0].abs().sum() > 0 and tab.embedding.grad[1].abs().sum() == 0
    model.eval()
    with torch.no_grad():
        with adapterkit.route(["a", "b"]):
            mixed = model(input_ids=IDS, attention_mask=MASK).logits
        for i, t in enumerate("ab"):
            with adapterkit.route(t):
                one = model(input_ids=IDS[i:i + 1], attention_mask=MASK[i:i + 1]).logits
            torch.testing.assert_close(mixed[i:i + 1], one, atol=1e-5, rtol=0)
        # generation with a KV cache: the prefix is seen at every step, never cached twice
        with adapterkit.route("b"):
            ids = IDS[:1]
            gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
            step = ids
            for _ in range(3):
                nxt = model(input_ids=step).logits[:, -1].argmax(-1, keepdim=True)
                step = torch.cat([step, nxt], dim=1)
        assert torch.equal(gen, step)
    with pytest.raises(ConfigError, match="locations"):
        adapterkit.add_adapters(llama(), {"method": "prefix", "locations": ["nowhere"]})
    adapterkit.remove_adapters(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, llama()(input_ids=IDS).logits)


def test_prefix_peft_style_generates_like_its_forward():
    model = adapterkit.add_adapters(llama(), {"method": "prefix", "style": "peft", "num_tokens": 2})
    with torch.no_grad():
        ids = IDS[:1]
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=0)
        step = ids
        for _ in range(3):
            nxt = model(input_ids=step, attention_mask=torch.ones_like(step)).logits[:, -1].argmax(-1, keepdim=True)
            step = torch.cat([step, nxt], dim=1)
    assert torch.equal(gen, step)


# -- prompt placement on BERT (PEFT's; AdapterHub's is checked against its fixture) ---------

def test_prompt_inputs_embeds_matches_peft_on_bert():
    """PEFT's sequence-classification prompt path: prompt rows get token type 0 (the feature-
    extraction path drops token_type_ids instead)."""
    from transformers import BertForSequenceClassification

    tt = torch.zeros_like(IDS)
    tt[:, 3:] = 1
    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)).eval()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    (k, v), = _peft_tensors(pm, "prompt_encoder").items()
    with torch.no_grad():
        want = pm(input_ids=IDS, attention_mask=MASK, token_type_ids=tt).logits
    model = adapterkit.add_adapters(copy.deepcopy(base), {"method": "prompt", "num_tokens": 3,
                                                          "placement": "inputs_embeds"})
    with torch.no_grad():
        model.adapterkit.sets["prompt"].embedding[0].copy_(v)
        got = model(input_ids=IDS, attention_mask=MASK, token_type_ids=tt).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="encoder-only"):
        adapterkit.add_adapters(bart(), {"method": "prompt", "placement": "after_embeddings"})


# -- across the tiny families ----------------------------------------------------------------

@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_ia3_peft_variant_matches_peft_t5_gpt2(family):
    from adapterkit.testing.tiny import main_output, tiny_inputs, tiny_model

    kw = tiny_inputs(family)
    pm = peft.get_peft_model(tiny_model(family).eval(), peft.IA3Config())
    tensors = _peft_tensors(pm, "ia3_l")
    with torch.no_grad():
        want = main_output(pm(**kw))
    model = adapterkit.add_adapters(tiny_model(family).eval(), {"method": "ia3"})
    s = model.adapterkit.sets["ia3"]
    assert len(s.vectors) == len(tensors)
    with torch.no_grad():
        for k, v in tensors.items():
            key = k.removeprefix("base_model.model.").removesuffix(".ia3_l.default").replace(".", "__")
            assert s.paths[key] == ("input" if v.shape[0] == 1 else "output"), key
            s.vectors[key][0].copy_(v.flatten())
        torch.testing.assert_close(main_output(model(**kw)), want, atol=1e-5, rtol=0)
        adapterkit.merge_adapters(model)  # GPT-2's Conv1D weights are stored (in, out)
        torch.testing.assert_close(main_output(model(**kw)), want, atol=1e-5, rtol=0)


def test_prefix_peft_style_matches_peft_t5():
    from adapterkit.testing.tiny import tiny_inputs, tiny_model

    kw = tiny_inputs("t5")
    pm = peft.get_peft_model(tiny_model("t5").eval(), peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                                               num_virtual_tokens=2))
    tensors = _peft_tensors(pm, "prompt_encoder")
    with torch.no_grad():
        want = pm(**kw).logits
    model = adapterkit.add_adapters(tiny_model("t5").eval(), {"method": "prefix", "style": "peft", "num_tokens": 2})
    _load_peft_prefix(model, tensors)
    with torch.no_grad():
        torch.testing.assert_close(model(**kw).logits, want, atol=1e-5, rtol=0)


MATRIX = {
    "ia3": {"method": "ia3"},
    "ia3_adapterhub": {"method": "ia3", "variant": "adapterhub"},
    "prefix": {"method": "prefix", "num_tokens": 2, "bottleneck_size": 8},
    "prefix_peft": {"method": "prefix", "style": "peft", "num_tokens": 2},
    "seq_bn": {"method": "pfeiffer", "reduction_factor": 4, "adapter_input": "normed_sum"},
    "houlsby_normed": {"method": "houlsby", "reduction_factor": 4, "adapter_input": "normed_sum"},
    "compacterpp_normed": {"method": "compacter++", "phm_dim": 2, "reduction_factor": 8,
                           "adapter_input": "normed_sum"},
}
REFUSED = {("ia3_adapterhub", "gpt2")} | {(m, f) for m in ("ia3", "ia3_adapterhub", "prefix_peft")
                                          for f in ("vit", "clip_text")}


@pytest.mark.parametrize("family", ["bart", "t5", "bert", "vit", "clip_text", "whisper", "gpt2", "llama"])
@pytest.mark.parametrize("method", list(MATRIX))
def test_new_methods_attach_train_and_save(family, method, tmp_path):
    from adapterkit.testing.tiny import main_output, tiny_inputs, tiny_model

    model = tiny_model(family).train()
    if (method, family) in REFUSED:
        with pytest.raises(ConfigError):
            adapterkit.add_adapters(model, MATRIX[method])
        return
    adapterkit.add_adapters(model, MATRIX[method])
    kw = tiny_inputs(family, batch=2)
    main_output(model(**kw)).float().pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("adapterkit.")]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert not any(p.grad is not None for n, p in model.named_parameters()
                   if not n.startswith("adapterkit.") and not p.requires_grad)
    model.eval()
    with torch.no_grad():
        want = main_output(model(**kw))
    adapterkit.save_adapters(model, tmp_path / "a")
    fresh = adapterkit.load_adapters(tiny_model(family).eval(), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(main_output(fresh(**kw)), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("style", ["adapterhub", "peft"])
def test_prefix_eject_keeps_outputs_and_saves_flat(style, tmp_path):
    model = adapterkit.add_adapters(llama(), {"method": "prefix", "style": style, "num_tokens": 2, "reparam": True,
                                              "bottleneck_size": 8, "tasks": ["a", "b"], "sharing": "per_task"})
    with torch.no_grad(), adapterkit.route(["a", "b"]):
        want = model(input_ids=IDS, attention_mask=MASK).logits
        n_before = adapterkit.trainable_report(model)["trainable"]
        model.adapterkit.sets["prefix"].eject()
        assert adapterkit.trainable_report(model)["trainable"] < n_before
        torch.testing.assert_close(model(input_ids=IDS, attention_mask=MASK).logits, want, atol=1e-5, rtol=0)
        adapterkit.save_adapters(model, tmp_path / "p")
        fresh = adapterkit.load_adapters(llama(), tmp_path / "p")
        assert fresh.adapterkit.sets["prefix"].config.reparam is False
        torch.testing.assert_close(fresh(input_ids=IDS, attention_mask=MASK).logits, want, atol=1e-5, rtol=0)
