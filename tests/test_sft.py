"""LT-SFT: sparse differences, exact apply/remove, composition, storage, lottery-ticket training, CLI."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

from adapterkit.errors import CheckpointError, ConfigError
from adapterkit.sft import LotteryTicketSFT, SparseDiff, apply_sft, compose, lt_sft, remove_sft
from adapterkit.testing.tiny import tiny_inputs, tiny_model


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _random_diff(model, k, seed, names=None):
    g = torch.Generator().manual_seed(seed)
    base = _state(model)
    tuned = {n: t + torch.randn(t.shape, generator=g) * 1e-3 for n, t in base.items()}
    return SparseDiff.from_states(base, tuned, k=k, names=names)


def test_top_k_difference_has_exactly_k_entries_and_the_largest():
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(10, 7, generator=g), "b": torch.randn(33, generator=g)}
    tuned = {n: t + torch.randn(t.shape, generator=g) for n, t in base.items()}
    d = SparseDiff.from_states(base, tuned, k=17)
    assert d.nnz == 17
    mags = torch.cat([(tuned[n] - base[n]).abs().flatten() for n in base])
    kth = mags.topk(17).values.min()
    for n in d.indices:
        assert (d.values[n].abs() >= kth).all()
        assert torch.equal(d.values[n], (tuned[n] - base[n]).flatten()[d.indices[n]])
    assert SparseDiff.from_states(base, tuned, k=0).nnz == 0


def test_apply_then_remove_restores_base_bit_for_bit():
    model = tiny_model("bert")
    base = _state(model)
    d = _random_diff(model, 500, seed=1)
    assert d.nnz == 500
    apply_sft(model, d)
    changed = sum(int((p != base[n]).sum()) for n, p in model.named_parameters())
    assert changed > 0
    remove_sft(model, d)
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), n


def test_remove_without_record_subtracts():
    model = tiny_model("bert")
    base = _state(model)
    d = _random_diff(model, 300, seed=2)
    apply_sft(model, d)
    loaded = SparseDiff.from_states(base, _state(model))  # a different object: no apply record
    remove_sft(model, loaded)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, base[n], rtol=0, atol=1e-6)


def test_disjoint_differences_compose_exactly():
    model = tiny_model("bert")
    base = _state(model)
    names = list(base)
    d1 = _random_diff(model, 200, seed=3, names=names[: len(names) // 2])
    d2 = _random_diff(model, 300, seed=4, names=names[len(names) // 2:])
    both = compose([d1, d2])
    assert both.nnz == 500
    apply_sft(model, d1)
    apply_sft(model, d2)
    seq = _state(model)
    remove_sft(model, d2)
    remove_sft(model, d1)
    apply_sft(model, both)
    for n, p in model.named_parameters():
        assert torch.equal(p, seq[n]), n
    remove_sft(model, both)
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), n


def test_overlapping_differences_add():
    base = {"w": torch.zeros(6)}
    d1 = SparseDiff.from_states(base, {"w": torch.tensor([1.0, 0, 2, 0, 0, 0])})
    d2 = SparseDiff.from_states(base, {"w": torch.tensor([1.0, 0, 0, 3, 0, 0])})
    c = compose([d1, d2], scales=[1.0, 2.0])
    assert torch.equal(c.to_dense("w"), torch.tensor([3.0, 0, 2, 6, 0, 0]))


def test_save_load_roundtrip_and_corruption(tmp_path):
    model = tiny_model("bert")
    d = _random_diff(model, 123, seed=5)
    d.dense["pooler.dense.bias"] = torch.arange(32.0)
    d.shapes["pooler.dense.bias"] = (32,)
    d.save(tmp_path / "sft")
    cfg = json.loads((tmp_path / "sft" / "sft_config.json").read_text())
    assert cfg["nnz"] == 123
    e = SparseDiff.load(tmp_path / "sft")
    assert e.nnz == 123 and set(e.indices) == set(d.indices)
    for n in d.indices:
        assert torch.equal(e.indices[n], d.indices[n]) and torch.equal(e.values[n], d.values[n])
    assert torch.equal(e.dense["pooler.dense.bias"], torch.arange(32.0))
    w = tmp_path / "sft" / "sft_weights.safetensors"
    w.write_bytes(w.read_bytes()[:-7])
    with pytest.raises(CheckpointError):
        SparseDiff.load(tmp_path / "sft")
    with pytest.raises(CheckpointError, match="sft_config.json"):
        SparseDiff.load(tmp_path)


def test_apply_rejects_mismatched_model():
    d = SparseDiff.from_states({"nope.weight": torch.zeros(3)}, {"nope.weight": torch.ones(3)})
    with pytest.raises(ConfigError, match="nope.weight"):
        apply_sft(tiny_model("bert"), d)


class _Clf(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = tiny_model("bert")
        self.head = nn.Linear(32, 3)

    def forward(self, ids):
        return self.head(self.encoder(input_ids=ids).last_hidden_state.mean(1))


def _train_fn(calls):
    ids = tiny_inputs("bert", batch=8)["input_ids"]
    y = torch.arange(8) % 3

    def train(model, phase):
        calls.append(phase)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        for _ in range(3):
            loss = nn.functional.cross_entropy(model(ids), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    return train


@pytest.mark.parametrize("iterations", [1, 2])
def test_lottery_ticket_sft_trains_exactly_k_entries(iterations):
    torch.manual_seed(0)
    model = _Clf()
    base = _state(model)
    calls: list[str] = []
    k = 400
    diff = lt_sft(model, _train_fn(calls), k, dense=[r"^head\."], n_iterations=iterations)
    assert calls == ["full", "sparse"] * iterations
    assert diff.nnz == k
    assert set(diff.dense) == {"head.weight", "head.bias"}
    assert not any("LayerNorm" in n for n in diff.indices)
    # the model holds theta_0 + phi: every entry outside the ticket is untouched
    for n, p in model.named_parameters():
        if n.startswith("head."):
            continue
        expected = base[n].clone().reshape(-1)
        if n in diff.indices:
            expected[diff.indices[n]] += diff.values[n]
        assert torch.allclose(p.reshape(-1), expected, atol=1e-6), n
        if n not in diff.indices:
            assert torch.equal(p, base[n]), n


def test_lottery_ticket_restore_and_l1():
    torch.manual_seed(0)
    model = _Clf()
    base = _state(model)
    tuner = LotteryTicketSFT(model, 50, dense=[r"^head\."])
    assert tuner.l1_penalty().item() == 0.0
    diff = tuner.run(_train_fn([]), restore=True)
    assert diff.nnz == 50
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), n
    with pytest.raises(ConfigError, match="exceeds"):
        LotteryTicketSFT(model, 10**9)


def test_cli_apply_remove_diff(tmp_path):
    from adapterkit.sft.cli import add_parser, run

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    model = tiny_model("bert")
    model.save_pretrained(tmp_path / "base")
    base = _state(model)
    d = _random_diff(model, 64, seed=7)
    d.save(tmp_path / "sft")
    assert run(parser.parse_args(["sft", "apply", "--model", str(tmp_path / "base"), "--sft", str(tmp_path / "sft"),
                                  "--out", str(tmp_path / "patched")])) == 0
    from transformers import AutoModel

    patched = AutoModel.from_pretrained(tmp_path / "patched")
    moved = sum(int((p != base[n]).sum()) for n, p in patched.named_parameters())
    assert 0 < moved <= 64
    assert run(parser.parse_args(["sft", "diff", "--base", str(tmp_path / "base"), "--tuned",
                                  str(tmp_path / "patched"), "--k", "64", "--out", str(tmp_path / "d2")])) == 0
    assert SparseDiff.load(tmp_path / "d2").nnz == moved
    assert run(parser.parse_args(["sft", "remove", "--model", str(tmp_path / "patched"), "--sft",
                                  str(tmp_path / "sft"), "--out", str(tmp_path / "restored")])) == 0
    restored = AutoModel.from_pretrained(tmp_path / "restored")
    for n, p in restored.named_parameters():
        torch.testing.assert_close(p, base[n], rtol=0, atol=1e-6)


def test_cli_train(tmp_path):
    from adapterkit.sft.cli import add_parser, run

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="cmd"))
    tiny_model("bert").save_pretrained(tmp_path / "base")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)]
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})  # a vocab file alone maps every word to [UNK]
    assert tok.tokenize("w3 w10") == ["w3", "w10"]
    tok.save_pretrained(tmp_path / "base")
    rows = [{"text": f"w{i % 7} w{(i * 3) % 11}", "label": "pos" if i % 2 else "neg"} for i in range(24)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    rc = run(parser.parse_args(["sft", "train", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "d.jsonl"),
                                "--k", "100", "--batch-size", "8", "--max-length", "8", "--lr", "1e-2",
                                "--out", str(tmp_path / "sft")]))
    assert rc == 0
    d = SparseDiff.load(tmp_path / "sft")
    assert d.nnz == 100 and set(d.dense) == {"head.weight", "head.bias"}
    assert d.meta["labels"] == ["neg", "pos"]
    names = dict(tiny_model("bert").named_parameters())  # keyed like the bare encoder, so `sft apply` fits
    assert all(n in names for n in d.indices)


class _Vec(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(6))
        self.head = nn.Parameter(torch.zeros(2))


def test_every_iteration_ranks_the_change_from_the_original_weights():
    """Two iterations, one entry each. The full phases are scripted moves; the sparse
    phases are real AdamW steps with weight decay (which would move masked-out entries
    without the reset). Each pick is the largest |theta - theta_0| among unpicked entries,
    the model is reset to the iteration's start (head included) before the sparse phase,
    and unpicked entries hold theta_0 throughout."""
    model = _Vec()
    moves = [torch.tensor([5.0, 1.0, 0.0, 0.0, 0.0, 0.0]), torch.tensor([-9.0, 0.5, 2.0, -0.1, 0.0, 0.0])]
    seen = []

    def train(m, phase):
        it = tuner.iteration
        if phase == "full":
            seen.append(("start", m.w.detach().clone(), m.head.detach().clone()))
            with torch.no_grad():
                m.w.add_(moves[it])
                m.head.add_(1.0)
            return
        seen.append(("sparse-start", m.w.detach().clone(), m.head.detach().clone()))
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1, weight_decay=0.5)
        for _ in range(3):
            loss = ((m.w - 3.0) ** 2).sum() + (m.head ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()

    tuner = LotteryTicketSFT(model, 2, dense=[r"^head$"], n_iterations=2)
    diff = tuner.run(train)
    assert sorted(diff.indices["w"].tolist()) == [0, 2]  # iteration 1 picks 0 (|5|), iteration 2 picks 2 (|2|)
    (_, s0, _), (_, r0, _), (_, s1, h1), (_, r1, rh1) = seen
    assert torch.equal(s0, torch.zeros(6)) and torch.equal(r0, torch.zeros(6))
    assert s1[0] != 0 and torch.equal(s1[1:], torch.zeros(5))  # only the picked entry moved in iteration 1
    assert torch.equal(r1, s1) and torch.equal(rh1, h1)  # reset to the iteration's start, head too
    w = model.w.detach()
    assert torch.equal(w[[1, 3, 4, 5]], torch.zeros(4)) and (w[[0, 2]] != 0).all()


def test_select_measures_from_theta0_not_the_current_start():
    model = _Vec()
    tuner = LotteryTicketSFT(model, 1)
    with torch.no_grad():
        model.w.copy_(torch.tensor([0.0, 3.0, -4.0, 0.0, 0.0, 0.0]))
    none = {"w": torch.zeros(6, dtype=torch.bool), "head": torch.zeros(2, dtype=torch.bool)}
    assert tuner.select(none, 1)["w"].nonzero().flatten().tolist() == [2]
    picked = {"w": torch.tensor([False, False, True, False, False, False]), "head": torch.zeros(2, dtype=torch.bool)}
    assert tuner.select(picked, 1)["w"].nonzero().flatten().tolist() == [1]


def test_second_run_from_a_tuned_model_is_refused():
    """A second run would start from theta_0 + phi: ranking from that start and resetting to
    it would leave phi's old entries in the result (more than K). It must be refused."""
    torch.manual_seed(0)
    model = _Clf()
    tuner = LotteryTicketSFT(model, 30, dense=[r"^head\."])
    tuner.run(_train_fn([]))
    with pytest.raises(ConfigError, match="theta_0"):
        tuner.run(_train_fn([]))
    tuner2 = LotteryTicketSFT(model, 30, dense=[r"^head\."])
    tuner2.run(_train_fn([]), restore=True)
    assert tuner2.run(_train_fn([]), restore=True).nnz == 30  # back at theta_0: allowed
