"""Merged per-task adapters and routing: a route to a task other than the merged one is
answered right (LoRA) or refused (other methods), also inside generate(); merging a second
task re-merges; route() with a task count that does not fit the batch is one error unless
the batch is the beam expansion of the routed examples."""

import pytest
import torch

import adapterkit
from adapterkit.testing.tiny import main_output, tiny_inputs, tiny_model

TASKS = ["a", "b", "c"]


def _randomise(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("adapterkit."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _lora(family="llama", sharing="per_task"):
    model = tiny_model(family).eval()
    adapterkit.add_adapters(model, {"method": "lora", "r": 4, "tasks": TASKS, "sharing": sharing,
                                    "targets": ["q", "v"]})
    _randomise(model)
    return model


def _out(model, inputs, route):
    with torch.no_grad(), adapterkit.route(route):
        return main_output(model(**inputs)).clone()


ROUTES = ["a", "b", "c", ["b", "a", "c"], ["c", "c", "b"]]


@pytest.mark.parametrize("family", ["llama", "gpt2", "bart"])
@pytest.mark.parametrize("sharing", ["per_task", "half_shared_up"])
def test_merged_per_task_lora_answers_every_route(family, sharing):
    model = _lora(family, sharing)
    inputs = tiny_inputs(family)
    want = {str(r): _out(model, inputs, r) for r in ROUTES}
    assert not torch.allclose(want["a"], want["b"], atol=1e-4)  # tasks really differ
    adapterkit.merge_adapters(model, task="a")
    for r in ROUTES:
        torch.testing.assert_close(_out(model, inputs, r), want[str(r)], atol=1e-5, rtol=0, msg=str(r))
    with torch.no_grad():  # unrouted: the merged task
        torch.testing.assert_close(main_output(model(**inputs)), want["a"], atol=1e-5, rtol=0)


def test_rows_of_the_merged_task_are_the_merged_output_exactly():
    model = _lora()
    inputs = tiny_inputs("llama")
    adapterkit.merge_adapters(model, task="b")
    merged_b = _out(model, inputs, "b")
    mixed = _out(model, inputs, ["b", "a", "b"])
    assert torch.equal(mixed[0], merged_b[0]) and torch.equal(mixed[2], merged_b[2])


def test_merging_a_second_task_remerges():
    model = _lora()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("adapterkit.")}
    inputs = tiny_inputs("llama")
    want_c = _out(model, inputs, "c")
    adapterkit.merge_adapters(model, task="a")
    adapterkit.merge_adapters(model, task="c")
    assert model.adapterkit.sets["lora"]._merged_task == 2
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**inputs)), want_c, atol=1e-5, rtol=0)
    adapterkit.merge_adapters(model, task="c")  # the same task again: nothing changes
    adapterkit.unmerge_adapters(model)
    for n, p in model.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n], atol=1e-6, rtol=0, msg=n)
    with pytest.raises(adapterkit.ConfigError, match='unknown task "d"'):
        adapterkit.merge_adapters(model, task="d")


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_after_merging_follows_the_route(num_beams):
    model = _lora("llama")
    ids = tiny_inputs("llama", batch=2)["input_ids"]
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=num_beams, pad_token_id=1)

    def gen(route):
        with torch.no_grad(), adapterkit.route(route):
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)

    want = {str(r): gen(r) for r in ("b", ["a", "c"])}
    adapterkit.merge_adapters(model, task="a")
    for r in ("b", ["a", "c"]):
        assert torch.equal(gen(r), want[str(r)]), r


def test_other_merged_per_task_methods_refuse_another_route():
    model = tiny_model("llama").eval()
    adapterkit.add_adapters(model, {"method": "ia3", "tasks": TASKS, "sharing": "per_task"})
    _randomise(model)
    inputs = tiny_inputs("llama")
    want = _out(model, inputs, "b")
    adapterkit.merge_adapters(model, task="b")
    torch.testing.assert_close(_out(model, inputs, "b"), want, atol=1e-5, rtol=0)
    with torch.no_grad():
        model(**inputs)  # unrouted: the merged task
    for r in ("a", ["b", "a", "b"]):
        with pytest.raises(adapterkit.ConfigError, match='task "b" merged'):
            _out(model, inputs, r)
    adapterkit.merge_adapters(model, task="a")  # re-merge works for them too
    adapterkit.unmerge_adapters(model)
    torch.testing.assert_close(_out(model, inputs, "b"), want, atol=1e-5, rtol=0)


def test_shared_lora_merged_serves_every_task():
    model = _lora(sharing="shared")
    inputs = tiny_inputs("llama")
    want = _out(model, inputs, "a")
    adapterkit.merge_adapters(model)
    adapterkit.merge_adapters(model)  # merged already: no-op, not a double merge
    for r in ("a", "c", ["a", "b", "c"]):
        torch.testing.assert_close(_out(model, inputs, r), want, atol=1e-5, rtol=0)


def test_route_with_a_task_count_that_does_not_fit_the_batch_is_an_error():
    model = _lora()
    inputs = tiny_inputs("llama", batch=3)
    for r in (["a", "b"], ["a", "a"], ["a", "b", "c", "a"], torch.tensor([0, 1])):
        with pytest.raises(adapterkit.ConfigError, match="per-example tasks but the batch has 3 rows"):
            _out(model, inputs, r)
    # one task for the whole batch, or one per row
    _out(model, inputs, "a")
    _out(model, inputs, ["a"])
    _out(model, inputs, ["a", "b", "c"])


def test_route_over_a_repeated_batch_is_the_beam_expansion():
    model = _lora()
    inputs = tiny_inputs("llama", batch=2)
    doubled = {k: v.repeat_interleave(2, 0) for k, v in inputs.items()}
    got = _out(model, doubled, ["a", "c"])
    torch.testing.assert_close(got, _out(model, doubled, ["a", "a", "c", "c"]), atol=0, rtol=0)


def test_merge_and_unload_of_a_per_task_lora_folds_the_named_task():
    model = _lora()
    inputs = tiny_inputs("llama")
    want = _out(model, inputs, "b")
    with pytest.raises(adapterkit.ConfigError, match="must name the task"):
        adapterkit.merge_and_unload(model)
    plain = adapterkit.merge_and_unload(model, task="b")
    assert not hasattr(plain, "adapterkit")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(main_output(plain(**inputs)), want, atol=1e-5, rtol=0)


def test_route_of_a_non_task_is_one_clear_error():
    import numpy as np

    from adapterkit.core.routing import Route

    for bad in (None, 1.5, object()):
        with pytest.raises(adapterkit.ConfigError, match="route\\(\\) takes a task name"):
            adapterkit.route(bad)
    assert Route(np.int64(1)).rows is None and Route(np.array([0, 1, 0])).rows == 3
