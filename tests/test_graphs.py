"""GraphedStep: whole-step CUDA graphs with an eager fallback.

The CPU tests run everywhere (CI): the fallback must give exactly the eager results.
The CUDA tests run where a GPU is present (`pytest tests/test_graphs.py` on a GPU
machine): the replayed graph must train exactly like the eager loop.
"""

from __future__ import annotations

import pytest
import torch

import adapterkit
from adapterkit.core.optim import TaskAwareAdamW
from adapterkit.testing.tiny import tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TASKS = ["vqa", "gqa", "nlvr", "cap"]


def _no_dropout(model):
    """Graph and eager runs draw different dropout masks: compare them without dropout."""
    for mod in model.modules():
        for attr in ("dropout", "activation_dropout", "attention_dropout"):
            if isinstance(getattr(mod, attr, None), float):
                setattr(mod, attr, 0.0)
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0


def _model(device, cfg):
    torch.manual_seed(0)
    m = tiny_model("bart")
    _no_dropout(m)
    adapterkit.add_adapters(m, cfg)
    with torch.no_grad():  # non-zero up-projections so adapters change the output
        for n, p in m.named_parameters():
            if p.requires_grad and "adapterkit" in n:
                p.normal_(0, 0.05)
    return m.to(device).train()


def _batches(device, n=4, b=8, src=12, tgt=5, mixed=False):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        batch = {"input_ids": torch.randint(4, 100, (b, src), generator=g),
                 "labels": torch.randint(4, 100, (b, tgt), generator=g)}
        if mixed:
            batch["task"] = torch.randint(0, len(TASKS), (b,), generator=g)
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def _loss_fn(model):
    def fn(b):
        if "task" in b:
            with adapterkit.route(b["task"]):
                return model(input_ids=b["input_ids"], labels=b["labels"]).loss
        return model(input_ids=b["input_ids"], labels=b["labels"]).loss
    return fn


def _trained(device, cfg, graphed, opt_cls=torch.optim.AdamW, mixed=False, **kw):
    model = _model(device, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt_cls(params, lr=1e-2)
    fn = _loss_fn(model)
    step = adapterkit.GraphedStep(model, opt, fn, enabled=graphed, **kw)
    losses = [float(step(b)) for b in _batches(device, mixed=mixed)]
    return model, losses, step


CFG_LORA = {"method": "lora", "r": 4, "dropout": 0.0}
CFG_MIXED = {"method": "houlsby", "reduction_factor": 4, "tasks": TASKS, "sharing": "per_task"}


def test_cpu_falls_back_to_eager_with_identical_results():
    m1, l1, step = _trained("cpu", CFG_LORA, graphed=True)
    m2, l2, _ = _trained("cpu", CFG_LORA, graphed=False)
    assert step.mode == "eager" and "CUDA" in step.fallback_reason
    assert l1 == l2
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), n


def test_cpu_fallback_matches_a_hand_written_loop():
    model = _model("cpu", CFG_MIXED)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    fn = _loss_fn(model)
    ref_losses = []
    for b in _batches("cpu", mixed=True):
        loss = fn(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref_losses.append(loss.item())
    _, losses, _ = _trained("cpu", CFG_MIXED, graphed=True, mixed=True)
    assert losses == ref_losses


def test_training_fn_must_return_a_scalar_loss():
    model = _model("cpu", CFG_LORA)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    step = adapterkit.GraphedStep(model, opt, lambda b: model(**b).logits)
    with pytest.raises(adapterkit.ConfigError, match="loss"):
        step(_batches("cpu", n=1)[0])


@cuda
@pytest.mark.parametrize("cfg,mixed,opt_cls", [
    (CFG_LORA, False, torch.optim.AdamW),
    (CFG_MIXED, True, TaskAwareAdamW),
    ({"method": "compacter", "phm_dim": 2, "reduction_factor": 8}, False, torch.optim.AdamW),
])
def test_graph_trains_like_eager(cfg, mixed, opt_cls):
    m1, l1, step = _trained("cuda", cfg, graphed=True, opt_cls=opt_cls, mixed=mixed)
    m2, l2, _ = _trained("cuda", cfg, graphed=False, opt_cls=opt_cls, mixed=mixed)
    assert step.mode == "graph", step.fallback_reason
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l2), atol=1e-4, rtol=1e-4)
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=n)


@cuda
def test_graph_warmup_trains_nothing_and_bad_shapes_raise():
    model = _model("cuda", CFG_LORA)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = adapterkit.GraphedStep(model, opt, _loss_fn(model), warmup=3)
    b = _batches("cuda", n=1)[0]
    step(b)  # warm-up x3 (undone) + capture + one replay = exactly one optimizer step
    ref = _model("cuda", CFG_LORA)
    ropt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    _loss_fn(ref)(b).backward()
    ropt.step()
    for (n, a), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4, msg=n)
        if not a.requires_grad:
            assert torch.equal(a, before[n])
    with pytest.raises(adapterkit.ConfigError, match="shapes"):
        step(_batches("cuda", n=1, b=4)[0])


@cuda
def test_graph_keys_per_task_and_set_lr():
    model = _model("cuda", CFG_MIXED)
    opt = TaskAwareAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    current = [None]  # the task routed now (a Python-side branch: one graph per key)

    def fn(b):
        with adapterkit.route(current[0]):
            return model(input_ids=b["input_ids"], labels=b["labels"]).loss

    step = adapterkit.GraphedStep(model, opt, fn)
    b = _batches("cuda", n=1)[0]
    w = next(iter(model.adapterkit.sets.values())).adapters
    first = next(iter(w.values())).down.weight
    for t in ("vqa", "gqa"):
        current[0] = t
        old = first.detach().clone()
        step(b, key=t)
        changed = (first - old).reshape(len(TASKS), -1).abs().amax(1) > 0
        assert changed.tolist() == [x == TASKS.index(t) for x in range(len(TASKS))]
    assert len(step._graphs) == 2
    step.set_lr(0.0)
    old = first.detach().clone()
    current[0] = "vqa"
    step(b, key="vqa")
    torch.testing.assert_close(first, old, atol=0, rtol=0)


@cuda
def test_graphed_inference_matches_eager():
    model = _model("cuda", CFG_MIXED).eval()
    fn = lambda b: _route_logits(model, b)  # noqa: E731
    step = adapterkit.GraphedStep(model, None, fn, amp_dtype=torch.bfloat16)
    for b in _batches("cuda", n=3, mixed=True):
        got = step(b)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            ref = fn(b)
        torch.testing.assert_close(got, ref, atol=1e-2, rtol=1e-2)
    assert step.mode == "graph"


def _route_logits(model, b):
    with adapterkit.route(b["task"]):
        return model(input_ids=b["input_ids"], decoder_input_ids=b["labels"]).logits


@pytest.mark.parametrize("backbone,preset,bf16", [("tiny-bart", "multiple_adapters", False),
                                                  ("tiny-bart", "single_adapter", True),
                                                  ("tiny-llama", "single_lora", True)])
def test_trainer_cuda_graphs_option(tmp_path, backbone, preset, bf16):
    """train.cuda_graphs: fixed-shape batches, one graph per (task, batch size) on CUDA; eager elsewhere."""
    import numpy as np

    from adapterkit.testing.fixtures import make_vl_fixture
    from adapterkit.train.config import load_config
    from adapterkit.train.trainer import Trainer

    root = make_vl_fixture(tmp_path / "data", n_images=24)
    cfg = {"model": {"backbone": backbone, "feat_dim": 16}, "preset": preset,
           "data": {"root": str(root), "features": str(root / "features")},
           "train": {"epochs": 1, "max_steps": 8, "batch_size": 4, "checkpoint_every": 1000, "max_text_len": 12,
                     "max_target_len": 6, "lr": 1e-2, "cuda_graphs": True, "bf16": bf16,
                     "task_batch_scale": {"vqa": 1, "gqa": 1, "nlvr": 1, "caption": 1}},
           "eval": {"batch_size": 16, "max_new_tokens": 3, "caption_max_new_tokens": 4, "caption_beams": 2}}
    tr = Trainer(load_config(cfg), tmp_path / "run")
    b = tr.train_data["vqa"].train_batch(np.arange(4), 0)
    b2 = tr.train_data["vqa"].train_batch(np.arange(4, 8), 1)
    assert b["input_ids"].shape == b2["input_ids"].shape and b["labels"].shape == b2["labels"].shape
    res = tr.fit()
    assert set(res["test"]) == {"vqa", "gqa", "nlvr", "caption"}
    rows = (tmp_path / "run" / "train_log.csv").read_text().splitlines()[1:]
    assert len(rows) == 8 and all(np.isfinite(float(r.split(",")[3])) for r in rows)
    frozen = {p.dtype for p in tr.model.parameters() if not p.requires_grad}
    assert frozen == ({torch.bfloat16} if bf16 else {torch.float32})
    assert all(p.dtype == torch.float32 for p in tr.model.parameters() if p.requires_grad)
    if torch.cuda.is_available():
        assert tr.graph.mode == "graph", tr.graph.fallback_reason
        assert len(tr.graph._graphs) >= 2
    else:
        assert tr.graph.mode == "eager"


@cuda
def test_failed_capture_falls_back_and_leaves_cuda_usable():
    """A step that syncs with the host cannot be captured: it runs eagerly, and dropout
    and later captures still work (the RNG is not left in capture mode)."""
    model = _model("cuda", CFG_LORA)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def syncing(b):
        loss = model(input_ids=b["input_ids"], labels=b["labels"]).loss
        if loss.item() < 0:  # a host sync
            raise AssertionError
        return loss

    step = adapterkit.GraphedStep(model, opt, syncing)
    with pytest.warns(UserWarning, match="capture failed"):
        loss = step(_batches("cuda", n=1)[0])
    assert step.mode == "eager" and torch.isfinite(loss)
    torch.nn.functional.dropout(torch.ones(8, device="cuda"), 0.5, True)  # RNG usable again
    m2, losses, step2 = _trained("cuda", CFG_LORA, graphed=True)
    assert step2.mode == "graph", step2.fallback_reason


def test_resume_from_a_graphed_runs_checkpoint_without_graphs(tmp_path):
    """A checkpoint written by a CUDA-graphed run (capturable AdamW, tensor learning rate)
    resumes in an eager run (e.g. on a CPU machine)."""
    from adapterkit.testing.fixtures import make_vl_fixture
    from adapterkit.train.config import load_config
    from adapterkit.train.trainer import Trainer

    root = make_vl_fixture(tmp_path / "data", n_images=24)

    def cfg(steps):
        return load_config({
            "model": {"backbone": "tiny-bart", "feat_dim": 16}, "preset": "single_adapter",
            "data": {"root": str(root), "features": str(root / "features")},
            "train": {"epochs": 1, "max_steps": steps, "batch_size": 4, "checkpoint_every": 2, "max_text_len": 12,
                      "max_target_len": 6, "lr": 1e-2, "eval_every_epoch": False,
                      "task_batch_scale": {"vqa": 1, "gqa": 1, "nlvr": 1, "caption": 1}},
            "eval": {"batch_size": 16, "max_new_tokens": 3, "caption_max_new_tokens": 4, "caption_beams": 2,
                     "select_on": "last"}})

    tr = Trainer(cfg(2), tmp_path / "run")
    tr.fit()
    state, step = tr.ckpt.load_latest()
    for g in state["optimizer"]["param_groups"]:  # what a graphed run's optimizer holds
        g["capturable"] = True
        g["lr"] = torch.tensor(float(g["lr"]))
    tr.ckpt.save(step, state)
    again = Trainer(cfg(4), tmp_path / "run", allow_changes=["train.max_steps"])  # 2 -> 4 steps
    res = again.fit()
    assert again.state["step"] == 4 and set(res["test"]) == {"vqa", "gqa", "nlvr", "caption"}
    assert all(g["capturable"] is False and isinstance(g["lr"], float) for g in again.optimizer.param_groups)
