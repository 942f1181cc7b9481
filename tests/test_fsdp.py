"""FSDP2 sharding of a frozen backbone with adapters trained (adapterkit.engine.fsdp).

The 2-process tests run tests/fsdp_worker.py under ``torch.distributed.run`` (gloo on CPU):
a few AdamW steps with the model FSDP2-sharded, each rank on half of a fixed global batch,
must give the trainable weights (and Adam's moments) of one process on the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import adapterkit
from adapterkit.core.optim import TaskAwareAdamW
from adapterkit.engine import fsdp
from adapterkit.errors import ConfigError

HERE = Path(__file__).parent
WORKER = HERE / "fsdp_worker.py"
ENV = {**os.environ, "ADAPTERKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
needs_fsdp = pytest.mark.skipif(fsdp.fsdp_unavailable() is not None, reason=str(fsdp.fsdp_unavailable()))

sys.path.insert(0, str(HERE))
import fsdp_worker  # noqa: E402
from reliability_helpers import torchrun  # noqa: E402


def _single(tmp_path, *args) -> dict:
    out = tmp_path / "single.pt"
    fsdp_worker.main(["--mode", "single", "--out", str(out), *args])
    return torch.load(out, weights_only=False)


def _two(tmp_path, *args) -> dict:
    out = tmp_path / "fsdp.pt"
    r = subprocess.run(torchrun(str(WORKER), "--mode", "fsdp", "--out", str(out), *args),
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=False)


def _max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _assert_same_run(one: dict, two: dict, kind: str = "llama", tol: float = 1e-5):
    # trained weights: equal to the 1-process run; and they did move from their initial values
    init = {n: p.detach() for n, p in fsdp_worker.build(kind).named_parameters() if p.requires_grad}
    assert _max_diff(one["state"], two["state"]) < tol
    moved = max(float((one["state"][n] - init[n]).abs().max()) for n in init if n in one["state"])
    assert moved > 100 * tol
    # Adam's moments: the gradients themselves agree
    s1, s2 = one["opt"]["state"], two["opt"]["state"]
    assert sorted(s1) == sorted(s2) and s1
    for k in s1:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(s1[k][name], s2[k][name], rtol=1e-4, atol=1e-9), (k, name)
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-5)


@needs_fsdp
def test_two_processes_sharded_match_one_and_resume(tmp_path):
    """LLaMA (blocks from ``_no_split_modules``), a shared LoRA: 4 steps; after 2 the full state
    is gathered, written by rank 0, read back by both ranks into a freshly sharded model."""
    one = _single(tmp_path)
    two = _two(tmp_path, "--resume-at", "2")
    f = two["facts"]
    assert f["sharded"] and f["world"] == 2 and not one["facts"]["sharded"]
    assert f["reload_exact"] and f["reload_opt_exact"]
    assert f["state_types"] == ["Tensor"]  # full tensors for the checkpoint, not DTensors
    _assert_same_run(one, two)
    # the memory saving: each rank stores half of the frozen weights (and of the adapters)
    n1, n2 = one["facts"]["numel"], f["numel"]
    assert n2["frozen_full"] == n1["frozen_full"] == n1["frozen_local"] > 0
    assert n2["frozen_local"] <= 0.5 * n2["frozen_full"] + 64
    assert n2["trainable_local"] <= 0.5 * n2["trainable_full"] + 64
    assert n2["trainable_full"] == n1["trainable_full"]
    # the adapter folder rank 0 wrote from the gathered state loads into a plain model: the 1-process outputs
    ids = torch.randint(0, fsdp_worker.VOCAB, (3, 7))
    outs = []
    for d in ("single.pt.adapters", "fsdp.pt.adapters"):
        m = fsdp_worker.build("llama", adapters=False)
        adapterkit.load_adapters(m, tmp_path / d)
        with torch.no_grad():
            outs.append(m(input_ids=ids).logits)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


@pytest.mark.slow
@needs_fsdp
def test_two_processes_sharded_bert_per_task_lora_and_head(tmp_path):
    """BERT (blocks: its embeddings and layers, from BertModel's _no_split_modules), a per-task LoRA routed to one task (the
    task-stacked tag of TaskAwareAdamW carried onto the sharded parameters, so the other task's
    rows stay untouched) and the new classification head trained in the root unit."""
    one = _single(tmp_path, "--model", "bert")
    two = _two(tmp_path, "--model", "bert")
    assert two["facts"]["tagged_after"] == two["facts"]["tagged_before"] != []
    _assert_same_run(one, two, "bert")
    init = {n: p.detach() for n, p in fsdp_worker.build("bert").named_parameters() if p.requires_grad}
    assert any(n.startswith("classifier.") for n in two["state"])
    for n in two["facts"]["tagged_after"]:  # task "b" (row 1) was never routed: unchanged
        assert torch.equal(two["state"][n][1], init[n][1])
    n2 = two["facts"]["numel"]
    assert n2["frozen_local"] <= 0.5 * n2["frozen_full"] + 64


@pytest.mark.slow
@needs_fsdp
def test_two_processes_bf16_mixed_precision(tmp_path):
    """MixedPrecisionPolicy(param_dtype=bf16): the blocks compute in bf16, the frozen weights are
    stored in bf16 (cast_frozen), the trainable shards stay fp32; the run follows the fp32 one."""
    one = _single(tmp_path)
    two = _two(tmp_path, "--bf16", "--cast-frozen")
    f = two["facts"]
    assert f["block_output_dtypes"] == ["torch.bfloat16"] and one["facts"]["block_output_dtypes"] == ["torch.float32"]
    assert f["stored_dtypes"] == ["frozen torch.bfloat16", "trainable torch.float32"]
    assert f["trainable_dtypes"] == ["torch.float32"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-3)
    assert two["losses"] != one["losses"]  # bf16 arithmetic did happen
    assert all(torch.isfinite(t).all() for t in two["state"].values())


@pytest.mark.slow
@needs_fsdp
def test_two_processes_sharded_generate(tmp_path):
    """generate() on a sharded encoder-decoder (its encoder runs before any forward of the root
    unit), the ranks with different row counts and output lengths (synced steps): the outputs
    of one process."""
    out = _two(tmp_path, "--model", "bart-generate")
    assert torch.equal(out["got"], out["ref"]) and out["ref"].shape[1] > 3


# --- one process (no process group): fast ------------------------------------------------------------------
def _tiny_llama():
    return fsdp_worker.build("llama")


def test_blocks_found_from_no_split_modules_and_module_lists():
    m = _tiny_llama()
    blocks = fsdp.block_modules(m)
    assert [p for p, _ in blocks] == ["model.layers.0", "model.layers.1"]
    assert all(type(b).__name__ == "LlamaDecoderLayer" for _, b in blocks)
    bert = fsdp_worker.build("bert")  # the head model has no _no_split_modules; its backbone BertModel has
    assert [p for p, _ in fsdp.block_modules(bert)] == ["bert.embeddings", "bert.encoder.layer.0",
                                                        "bert.encoder.layer.1"]
    # no _no_split_modules anywhere: the items of the outermost nn.ModuleLists that hold parameters
    net = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2)]))
    assert [p for p, _ in fsdp.block_modules(net)] == ["0.0", "0.2"]
    named = fsdp.block_modules(bert, layer_classes=[transformers.models.bert.modeling_bert.BertAttention])
    assert [p for p, _ in named] == ["bert.encoder.layer.0.attention", "bert.encoder.layer.1.attention"]
    # nothing inside the adapter container is ever a block
    assert [p for p, _ in fsdp.block_modules(m, layer_classes=["TaskLinear", "LlamaMLP"])] == [
        "model.layers.0.mlp", "model.layers.1.mlp"]


def test_unknown_layer_class_is_one_error():
    with pytest.raises(ConfigError, match="LlamaDecoderLayr.*module classes"):
        fsdp.block_modules(_tiny_llama(), layer_classes=["LlamaDecoderLayr"])
    with pytest.raises(ConfigError, match="layer_classes takes"):
        fsdp.block_modules(_tiny_llama(), layer_classes=[3])


def test_one_process_is_left_unsharded():
    assert not torch.distributed.is_initialized()
    m = _tiny_llama()
    assert fsdp.shard_model(m) is m and not fsdp.is_sharded(m)
    n = fsdp.local_numel(m)
    assert n["frozen_local"] == n["frozen_full"] > 0 and n["trainable_local"] == n["trainable_full"] > 0


def test_trainable_and_optimizer_state_round_trip_unsharded():
    m = _tiny_llama()
    opt = TaskAwareAdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, fsdp_worker.VOCAB, (2, 6))
    for _ in range(2):
        opt.zero_grad()
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    state = {k: v.clone() for k, v in fsdp.full_trainable_state(m).items()}
    ostate = fsdp.full_optimizer_state(opt)
    assert set(state) == {n for n, p in m.named_parameters() if p.requires_grad}
    other = _tiny_llama()
    opt2 = TaskAwareAdamW([p for p in other.parameters() if p.requires_grad], lr=1e-2)
    fsdp.load_trainable_state(other, state)
    fsdp.load_optimizer_state(opt2, ostate)
    assert all(torch.equal(a, state[n]) for n, a in fsdp.full_trainable_state(other).items())
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], ostate["state"][0]["exp_avg"])
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, m(input_ids=ids).logits)


def test_full_adapter_state_unsharded_is_what_save_adapters_writes():
    from adapterkit.core.io import adapter_state_dict

    m = _tiny_llama()
    a, b = fsdp.full_adapter_state(m), adapter_state_dict(m)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_load_trainable_state_refuses_a_state_that_does_not_fit():
    m = _tiny_llama()
    state = fsdp.full_trainable_state(m)
    name = next(iter(state))
    with pytest.raises(ConfigError, match="has no tensor for"):
        fsdp.load_trainable_state(m, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ConfigError, match="has shape"):
        fsdp.load_trainable_state(m, {**state, name: torch.zeros(3)})
    with pytest.raises(ConfigError, match="not a parameter or buffer"):
        fsdp.load_trainable_state(m, {**state, "lm_head.weigth": torch.zeros(2)})
    with pytest.raises(ConfigError, match="lm_head.weight' has shape"):
        fsdp.load_trainable_state(m, {**state, "lm_head.weight": torch.zeros(2)})
    # not strict: some of the trainable tensors, or a frozen one, load as given
    fsdp.load_trainable_state(m, {name: torch.ones_like(state[name])}, strict=False)
    assert torch.equal(dict(m.named_parameters())[name], torch.ones_like(state[name]))


def test_even_rows_give_every_rank_the_same_count_and_cover_every_row():
    for n, world in [(7, 2), (8, 2), (1, 3), (10, 4)]:
        parts = [fsdp.even_rows(n, r, world) for r in range(world)]
        assert len({len(p) for p in parts}) == 1 and len(parts[0]) == -(-n // world)
        assert sorted(set(int(i) for p in parts for i in p)) == list(range(n))
    assert fsdp.even_rows(7, 1, 2).tolist() == [1, 3, 5, 5]
    with pytest.raises(ConfigError, match="even_rows"):
        fsdp.even_rows(5, 2, 2)


def test_mixed_precision_policy():
    assert fsdp.mixed_precision(False) is None
    p = fsdp.mixed_precision(True)
    assert p.param_dtype == torch.bfloat16 and p.reduce_dtype == torch.float32


def test_lora_attached_model_has_container():
    # the adapters' parameters live in the container (the root unit), not inside the blocks
    m = _tiny_llama()
    block_params = {id(p) for _, b in fsdp.block_modules(m) for p in b.parameters()}
    lora = [p for p in adapterkit.core.base.get_container(m).parameters()]
    assert lora and not any(id(p) in block_params for p in lora)
