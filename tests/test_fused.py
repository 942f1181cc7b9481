"""Fused adapter branches (adapterkit.core.fused): the hand-fused autograd functions (the
default) and the compiled branch give the plain ops' outputs and gradients, for shared,
per-task (one task routed) and mixed-task batches; they take fewer ops."""

from __future__ import annotations

import contextlib

import pytest
import torch

import adapterkit
from adapterkit.bench.profile import count_ops
from adapterkit.core.fused import bottleneck_add, lora_add
from adapterkit.testing.tiny import main_output, tiny_inputs, tiny_model

TASKS = ["a", "b", "c"]

CONFIGS = {
    "lora": {"method": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]},
    "lora_per_task": {"method": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"], "tasks": TASKS,
                      "sharing": "per_task"},
    "lora_gpt2": {"method": "lora", "r": 4, "alpha": 4},
    "houlsby": {"method": "houlsby", "reduction_factor": 4, "activation": "gelu_new"},
    "houlsby_per_task": {"method": "houlsby", "reduction_factor": 4, "tasks": TASKS, "sharing": "per_task"},
    "pfeiffer": {"method": "pfeiffer", "reduction_factor": 4},  # relu: down + bias + act in one op
    "pfeiffer_swish_scaled": {"method": "pfeiffer", "reduction_factor": 4, "activation": "swish", "scale": 0.5},
    "no_residual_tanh": {"method": "houlsby", "reduction_factor": 4, "activation": "tanh", "residual": False,
                         "positions": ["ffn_out"]},
    "parallel": {"method": "parallel", "reduction_factor": 4, "scale": 2.0},
    "normed_sum": {"method": "pfeiffer", "reduction_factor": 4, "adapter_input": "normed_sum"},
}


def _family(name):
    return "gpt2" if name.endswith("gpt2") else "bart"


def _model(name: str):
    torch.manual_seed(0)
    m = tiny_model(_family(name))
    adapterkit.add_adapters(m, CONFIGS[name])
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.startswith("adapterkit."):
                p.normal_(0.0, 0.2)  # non-zero up-projections / B: every adapter weight gets gradient
    return m.train()


def _run(m, name, route, amp=None):
    inputs = tiny_inputs(_family(name), batch=3)
    m.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks in every run
    amp_ctx = torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
    with amp_ctx, adapterkit.route(route) if route is not None else contextlib.nullcontext():
        out = main_output(m(**inputs)).float()
    (out.square().mean() + out.mean()).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad and p.grad is not None}
    return out.detach(), grads


def _routes(name):
    if "per_task" not in name:
        return [None]
    return ["b", torch.tensor([2, 0, 1])]  # one task routed (fused path); a mixed batch (masked GEMMs)


# the compiled branch (traced by dynamo, aot_eager backend: no C++ build) on three configs in
# the fast tier, on every config in the slow one
COMPILED_FAST = ("lora_per_task", "houlsby_per_task", "parallel")
CASES = [(n, "eager", "inductor") for n in sorted(CONFIGS)] + [
    (n, "compile", "aot_eager") if n in COMPILED_FAST else
    pytest.param(n, "compile", "aot_eager", marks=pytest.mark.slow) for n in sorted(CONFIGS)]


@pytest.mark.parametrize("name,mode,backend", CASES)
def test_fused_equals_plain_forward_and_grads(name, mode, backend):
    for route in _routes(name):
        m = adapterkit.fuse_branches(_model(name), "off")
        ref_out, ref_g = _run(m, name, route)
        adapterkit.fuse_branches(m, mode, backend=backend)
        out, g = _run(m, name, route)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        assert ref_g.keys() == g.keys() and any(k.startswith("adapterkit.") for k in g)
        for k in ref_g:
            torch.testing.assert_close(g[k], ref_g[k], atol=1e-5, rtol=1e-4, msg=k)
        adapterkit.fuse_branches(m, "off")  # and back: the plain ops again, the same numbers
        out2, _ = _run(m, name, route)
        torch.testing.assert_close(out2, ref_out, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["lora", "houlsby", "pfeiffer", "parallel"])
def test_fused_under_bf16_autocast_matches_plain(name):
    m = _model(name)
    adapterkit.fuse_branches(m, "off")
    ref_out, ref_g = _run(m, name, None, amp=torch.bfloat16)
    adapterkit.fuse_branches(m, "eager")
    out, g = _run(m, name, None, amp=torch.bfloat16)
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    for k in ref_g:
        assert g[k].dtype == ref_g[k].dtype, k
        torch.testing.assert_close(g[k], ref_g[k], atol=2e-2, rtol=5e-2, msg=k)


def test_fused_branches_take_fewer_ops_and_equal_the_plain_function():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    out = torch.randn(2, 5, 12, requires_grad=True)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(12, 4, requires_grad=True)
    wd, bd = torch.randn(4, 16, requires_grad=True), torch.randn(4, requires_grad=True)
    wu, bu = torch.randn(16, 4, requires_grad=True), torch.randn(16, requires_grad=True)
    leaves = (x, out, a, b, wd, bd, wu, bu)

    def step(mode, which):
        def go():
            if which == "lora":
                y = lora_add(out, x, a, b, 0.25, mode)
            else:
                y = bottleneck_add(x, x, wd, bd, wu, bu, "relu", 1.0, mode)
            y.sum().backward()
        return go

    for which in ("lora", "bottleneck"):
        counts, grads = {}, {}
        for mode in ("off", "eager"):
            for t in leaves:
                t.grad = None
            counts[mode] = count_ops(step(mode, which))
            grads[mode] = [None if t.grad is None else t.grad.clone() for t in leaves]
        assert counts["eager"] < counts["off"], (which, counts)
        for g0, g1 in zip(grads["off"], grads["eager"]):
            assert (g0 is None) == (g1 is None)
            if g0 is not None:
                torch.testing.assert_close(g1, g0, atol=1e-5, rtol=1e-5)


def test_fuse_errors():
    with pytest.raises(adapterkit.ConfigError, match="mode must be one of"):
        adapterkit.fuse_branches(_model("lora"), "fast")
    with pytest.raises(adapterkit.ConfigError, match="no LoRA or bottleneck adapters"):
        adapterkit.fuse_branches(tiny_model("bart"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "houlsby"])
def test_inductor_compiled_branch_equals_plain(name):
    """The real inductor backend (C++ codegen on CPU): slow, a compile per branch shape."""
    m = adapterkit.fuse_branches(_model(name), "off")
    ref_out, ref_g = _run(m, name, None)
    adapterkit.fuse_branches(m, "compile")
    out, g = _run(m, name, None)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for k in ref_g:
        torch.testing.assert_close(g[k], ref_g[k], atol=1e-5, rtol=1e-4, msg=k)
