"""copy.deepcopy and pickle / torch.save of a model with adapters: the copy runs its own adapters."""

import contextlib
import copy
import io
import pickle

import pytest
import torch

import adapterkit
from adapterkit.testing.tiny import main_output, tiny_inputs, tiny_model

CASES = {
    "houlsby": {"method": "houlsby", "reduction_factor": 4},
    "parallel": {"method": "parallel", "reduction_factor": 4},
    "lora": {"method": "lora", "r": 4},
    "compacter": {"method": "compacter", "phm_dim": 2, "reduction_factor": 8},
    "hyperformer": {"method": "hyperformer", "task_embedding_dim": 8, "hidden_dim": 8, "projected_dim": 4,
                    "tasks": ["a", "b"]},
    "prompt": {"method": "prompt", "num_tokens": 3, "reparam_dim": 16},
    "bitfit": {"method": "bitfit"},
    "lora_per_task": {"method": "lora", "r": 4, "tasks": ["a", "b"], "sharing": "per_task"},
}
FAMILIES = ("bert", "llama")


def _perturbed(family, cfg):
    torch.manual_seed(0)
    m = tiny_model(family)
    adapterkit.add_adapters(m, dict(cfg))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def _out(model, family, tasks):
    x = tiny_inputs(family)
    with torch.no_grad(), (adapterkit.route(tasks) if tasks else contextlib.nullcontext()):
        return main_output(model(**x)).clone()


def _scale_trainable(model, k):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(k)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_deepcopy_runs_its_own_adapters(family, case):
    if (family, case) in {("llama", "bitfit")}:
        pytest.skip("BitFit needs biases")
    tasks = ["a", "b", "a"] if "tasks" in CASES[case] else None
    m = _perturbed(family, CASES[case])
    before = _out(m, family, tasks)
    c = copy.deepcopy(m)
    torch.testing.assert_close(_out(c, family, tasks), before, rtol=0, atol=0)
    assert [n for n, p in c.named_parameters() if p.requires_grad] == \
        [n for n, p in m.named_parameters() if p.requires_grad]
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(c.parameters(), m.parameters()))
    _scale_trainable(c, 3.0)
    after_c = _out(c, family, tasks)
    assert (after_c - before).abs().max() > 1e-4, "editing the copy's trainable weights changed nothing"
    torch.testing.assert_close(_out(m, family, tasks), before, rtol=0, atol=0)  # the original is untouched


@pytest.mark.parametrize("case", ["houlsby", "lora_per_task", "prompt"])
def test_torch_save_and_pickle_round_trip(case, tmp_path):
    tasks = ["a", "b", "a"] if "tasks" in CASES[case] else None
    m = _perturbed("bart", CASES[case])
    before = _out(m, "bart", tasks)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    torch.testing.assert_close(_out(back, "bart", tasks), before, rtol=0, atol=0)
    back2 = pickle.loads(pickle.dumps(m))
    _scale_trainable(back2, 2.0)
    assert (_out(back2, "bart", tasks) - before).abs().max() > 1e-4
    torch.testing.assert_close(_out(m, "bart", tasks), before, rtol=0, atol=0)
    # the copy is a normal adapted model: it saves, removes and copies again
    adapterkit.save_adapters(back, tmp_path / "a")
    fresh = adapterkit.load_adapters(tiny_model("bart").eval(), tmp_path / "a")
    torch.testing.assert_close(_out(fresh, "bart", tasks), before, rtol=0, atol=0)
    adapterkit.remove_adapters(back)
    assert not hasattr(back, "adapterkit") and "__deepcopy__" not in back.__dict__


def test_copy_keeps_mode_dtype_and_training_grads():
    m = _perturbed("bert", CASES["houlsby"])
    adapterkit.cast_frozen(m, torch.bfloat16)
    m.train()
    c = copy.deepcopy(m)
    assert c.training and all(mod.training for mod in c.modules())
    assert {n: p.dtype for n, p in c.named_parameters()} == {n: p.dtype for n, p in m.named_parameters()}
    x = tiny_inputs("bert")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # cast_frozen is for autocast training
        loss = main_output(c(**x)).float().pow(2).mean()
    loss.backward()
    grads = [n for n, p in c.named_parameters() if p.grad is not None]
    assert grads and all(n.startswith("adapterkit.") for n in grads)
    assert all(p.grad is None for p in m.parameters())  # the original's adapters got nothing


def test_merged_model_copy_is_one_clear_error():
    m = _perturbed("bert", CASES["lora"])
    adapterkit.merge_adapters(m)
    with pytest.raises(adapterkit.ConfigError, match="unmerge_adapters"):
        copy.deepcopy(m)
    with pytest.raises(adapterkit.ConfigError, match="merged"):
        pickle.dumps(m)
    adapterkit.unmerge_adapters(m)
    copy.deepcopy(m)
