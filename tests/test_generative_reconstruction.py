"""GenerativeAdapter reconstruction objective on tiny Llama: the loss against its formula,
the combined pre-training loss, the windowed (doubled-sequence) form, per-example scores."""

import pytest
import torch
import torch.nn.functional as F

import adapterkit
from adapterkit.errors import ConfigError
from adapterkit.methods.generative import (
    absorb_context,
    completion_loss,
    continuation_loss,
    generative_set,
    pretraining_loss,
    reconstruction_loss,
    sequence_nll,
    split_documents,
    windowed_loss,
)
from adapterkit.testing.tiny import tiny_model

CFG = {"method": "generative_adapter", "r1": 6, "r2": 5, "max_rank": 5, "alpha": 3.0}


def _model(cfg=CFG, seed=0):
    m = adapterkit.add_adapters(tiny_model("llama", seed=seed), cfg)
    s = generative_set(m)
    with torch.no_grad():
        for layer in s.layers.values():
            layer.B.normal_(0, 0.5)
            layer.norm_weight.uniform_(0.5, 1.5)
    return m, s


def _docs():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 100, (n,), generator=g).tolist() for n in (14, 9)]


def _formula(m, s, ctx, cm):
    """-(1/N) Σ log p_{W + ΔW(C_b)}(c_t | c_<t) with ΔW = (α/r1) B S̃ᵀ A1 written into the weights."""
    with torch.no_grad():
        absorb_context(m, ctx, cm)
        deltas = {k: torch.stack([layer.delta_weight(st) for st in s.generated[k]])
                  for k, layer in s.layers.items()}
        s.reset()
    nll, count = 0.0, 0
    for b in range(ctx.shape[0]):
        saved = []
        for k, layer in s.layers.items():
            w = layer.target[0].weight
            saved.append(w.detach().clone())
            with torch.no_grad():
                w += deltas[k][b]
        with torch.no_grad():
            logits = m(input_ids=ctx[b:b + 1], attention_mask=cm[b:b + 1]).logits[0]
        for (_k, layer), w0 in zip(s.layers.items(), saved):
            with torch.no_grad():
                layer.target[0].weight.copy_(w0)
        n = int(cm[b].sum())
        logp = F.log_softmax(logits[: n - 1].double(), -1)
        nll += -logp.gather(1, ctx[b, 1:n, None]).sum()
        count += n - 1
    return nll / count


def test_reconstruction_loss_matches_formula_and_differs_from_other_context():
    m, s = _model()
    ctx, cm, _, _ = split_documents(_docs(), 12, 4, pad_id=1)
    assert cm[1].sum() == 9  # the second context is padded
    with torch.no_grad():
        torch.manual_seed(0)  # torch.svd_lowrank draws a random start: the same draws in both
        got = reconstruction_loss(m, ctx, cm)
    torch.manual_seed(0)
    torch.testing.assert_close(got.double(), _formula(m, s, ctx, cm), atol=1e-5, rtol=1e-5)
    assert not s.generated and not s.state  # the context is forgotten afterwards
    with torch.no_grad():
        # the same tokens scored with the adapter of the other context: a different loss
        absorb_context(m, ctx.flip(0), cm.flip(0))
        swapped = continuation_loss(m, ctx, cm)
        s.reset()
        base = continuation_loss(m, ctx, cm)
    assert abs(float(swapped) - float(got)) > 1e-4 and abs(float(base) - float(got)) > 1e-4


def test_pretraining_loss_sums_its_terms_and_trains_the_generator():
    m, s = _model()
    ctx, cm, tgt, tm = split_documents(_docs(), 8, 6, pad_id=1)
    with torch.no_grad():
        rec = reconstruction_loss(m, ctx, cm)
        comp = completion_loss(m, ctx, tgt, cm, tm)
        out = pretraining_loss(m, ctx, tgt, cm, tm, reconstruction_weight=0.3, completion_weight=2.0)
    torch.testing.assert_close(out["reconstruction"], rec)
    torch.testing.assert_close(out["completion"], comp)
    torch.testing.assert_close(out["loss"], 0.3 * rec + 2.0 * comp)
    with torch.no_grad():
        only = pretraining_loss(m, ctx, tgt, cm, tm, completion_weight=0.0)
    assert set(only) == {"loss", "reconstruction"}
    with pytest.raises(ConfigError, match="weights"):
        pretraining_loss(m, ctx, tgt, cm, tm, reconstruction_weight=0.0, completion_weight=0.0)
    # the reconstruction term alone reaches every generator parameter (context path included)
    m.train()
    loss = pretraining_loss(m, ctx, tgt, cm, tm, completion_weight=0.0)["loss"]
    loss.backward()
    grads = {n.rsplit(".", 1)[1]: p.grad for n, p in m.named_parameters() if p.requires_grad}
    for name in ("A1", "A2", "A3", "B", "norm_weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_windowed_doubled_sequence_is_reconstruction_when_one_window():
    m, s = _model({**CFG, "segment_len": 10})
    g = torch.Generator().manual_seed(4)
    x = torch.randint(3, 100, (2, 10), generator=g)
    mask = torch.ones_like(x)
    mask[1, -2:] = 0
    with torch.no_grad():
        torch.manual_seed(0)  # torch.svd_lowrank draws a random start: the same draws in both
        doubled = windowed_loss(m, x, mask, double=True)
        # [x; x] is two windows of 10: the second copy is scored with the adapter of the first.
        # (mask[1] ends with padding, so its copy starts at position 10 with real tokens)
        torch.manual_seed(0)
        rec = reconstruction_loss(m, x, mask)
    torch.testing.assert_close(doubled, rec, atol=1e-6, rtol=1e-6)
    with pytest.raises(ConfigError, match="more than one window"):
        windowed_loss(m, x, mask)


def test_windowed_loss_uses_earlier_windows():
    m, s = _model({**CFG, "segment_len": 4})
    x = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.manual_seed(0)  # torch.svd_lowrank draws a random start: the same draws in both
        got = windowed_loss(m, x)
        torch.manual_seed(0)
        # by hand: window 2 with the adapter of window 1; window 3 with that of windows 1-2
        absorb_context(m, x[:, :4])
        l2 = continuation_loss(m, x[:, 4:8])
        absorb_context(m, x[:, 4:8], reset=False)
        l3 = continuation_loss(m, x[:, 8:12])
        s.reset()
    torch.testing.assert_close(got, (l2 + l3) / 2, atol=1e-6, rtol=1e-6)


def test_sequence_nll_per_example():
    m, s = _model()
    ctx, cm, _, _ = split_documents(_docs(), 12, 4, pad_id=1)
    with torch.no_grad():
        per = sequence_nll(m, ctx, cm)
        one = [float(sequence_nll(m, ctx[b:b + 1, : int(cm[b].sum())])) for b in range(2)]
    assert per.shape == (2,)
    torch.testing.assert_close(per, torch.tensor(one), atol=1e-5, rtol=1e-5)
