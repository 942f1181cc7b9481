"""Save/load, merge/unmerge, mixed-task batches and config errors of the core engine."""

import json

import pytest
import torch

import adapterkit
from adapterkit.testing.tiny import main_output, tiny_inputs, tiny_model

TASKS = ["vqa", "gqa", "nlvr"]


def _randomise(model):
    """Give every adapter parameter non-trivial values (zero-init parts would hide bugs)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith("adapterkit."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("cfg", [
    {"method": "houlsby", "reduction_factor": 4, "tasks": TASKS, "sharing": "per_task", "train_layernorms": True},
    {"method": "lora", "r": 4, "tasks": TASKS, "sharing": "half_shared_up"},
    {"method": "compacter", "phm_dim": 2, "reduction_factor": 8, "tasks": TASKS, "sharing": "per_task"},
    {"method": "hyperformer", "task_embedding_dim": 8, "hidden_dim": 8, "projected_dim": 4, "tasks": TASKS},
    {"method": "prompt", "num_tokens": 3, "reparam_dim": 8, "tasks": TASKS, "sharing": "per_task"},
])
def test_save_load_round_trip(tmp_path, cfg):
    model = tiny_model("bart")
    adapterkit.add_adapters(model, cfg)
    _randomise(model)
    inputs = tiny_inputs("bart")
    with adapterkit.route(["vqa", "nlvr", "gqa"]), torch.no_grad():
        ref = main_output(model(**inputs))
    adapterkit.save_adapters(model, tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = tiny_model("bart")
    adapterkit.load_adapters(fresh, tmp_path / "ad")
    with adapterkit.route(["vqa", "nlvr", "gqa"]), torch.no_grad():
        got = main_output(fresh(**inputs))
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    assert adapterkit.trainable_report(fresh) == adapterkit.trainable_report(model)


def _saved(tmp_path):
    model = tiny_model("bert")
    adapterkit.add_adapters(model, {"method": "houlsby", "reduction_factor": 4})
    adapterkit.save_adapters(model, tmp_path / "ad")
    return tmp_path / "ad"


def test_load_missing_key_is_one_clear_error(tmp_path):
    d = _saved(tmp_path)
    from safetensors.torch import load_file, save_file
    t = load_file(d / "adapter_model.safetensors")
    t.pop(sorted(t)[0])
    save_file(t, d / "adapter_model.safetensors")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.pop("weights_sha256")
    cfg.pop("config_sha256")  # as an older file without checksums: the key checks still hold
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(adapterkit.CheckpointError, match="missing key"):
        adapterkit.load_adapters(tiny_model("bert"), d)


def test_load_wrong_shape_names_the_key(tmp_path):
    d = _saved(tmp_path)
    from safetensors.torch import load_file, save_file
    t = load_file(d / "adapter_model.safetensors")
    k = sorted(t)[0]
    t[k] = torch.zeros(*t[k].shape[:-1], t[k].shape[-1] + 1)
    save_file(t, d / "adapter_model.safetensors")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.pop("weights_sha256")
    cfg.pop("config_sha256")  # as an older file without checksums: the key checks still hold
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(adapterkit.CheckpointError, match="shape mismatch for .*" + k.split(".")[-1]):
        adapterkit.load_adapters(tiny_model("bert"), d)


def test_load_corrupt_bytes(tmp_path):
    d = _saved(tmp_path)
    f = d / "adapter_model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(adapterkit.CheckpointError, match="corrupt"):
        adapterkit.load_adapters(tiny_model("bert"), d)
    f.write_bytes(b"not a safetensors file at all")
    with pytest.raises(adapterkit.CheckpointError):
        adapterkit.load_adapters(tiny_model("bert"), d)


def test_load_wrong_architecture(tmp_path):
    d = _saved(tmp_path)
    with pytest.raises(adapterkit.CheckpointError):
        adapterkit.load_adapters(tiny_model("llama"), d)


@pytest.mark.parametrize("family", ["bart", "gpt2", "llama"])
def test_merge_unmerge(family):
    model = tiny_model(family)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapterkit.add_adapters(model, {"method": "lora", "r": 4, "alpha": 8})
    _randomise(model)
    inputs = tiny_inputs(family)
    with torch.no_grad():
        ref = main_output(model(**inputs)).clone()
        adapterkit.merge_adapters(model)
        merged = main_output(model(**inputs))
        torch.testing.assert_close(merged, ref, atol=1e-5, rtol=0)
        changed = [n for n, p in model.named_parameters() if n in base and not torch.equal(p, base[n])]
        assert changed, "merge did not touch the base weights"
        adapterkit.unmerge_adapters(model)
        for n, p in model.named_parameters():
            if n in base:
                torch.testing.assert_close(p, base[n], atol=1e-6, rtol=0)


def test_per_task_lora_merges_one_task():
    model = tiny_model("llama")
    adapterkit.add_adapters(model, {"method": "lora", "r": 4, "tasks": TASKS, "sharing": "per_task"})
    _randomise(model)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        with adapterkit.route("gqa"):
            ref = main_output(model(**inputs)).clone()
        with pytest.raises(adapterkit.ConfigError, match="task"):
            adapterkit.merge_adapters(model)
        adapterkit.merge_adapters(model, task="gqa")
        torch.testing.assert_close(main_output(model(**inputs)), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer", "compacter", "hyperformer", "prompt"])
def test_unmergeable_methods_say_so(method):
    model = tiny_model("bart")
    cfg = {"method": method}
    if method == "compacter":
        cfg.update(phm_dim=2, reduction_factor=8)
    adapterkit.add_adapters(model, cfg)
    with pytest.raises(adapterkit.ConfigError, match="cannot be merged"):
        adapterkit.merge_adapters(model)


@pytest.mark.parametrize("family", ["bart", "llama", "vit"])
@pytest.mark.parametrize("cfg", [
    {"method": "houlsby", "reduction_factor": 4, "sharing": "per_task"},
    {"method": "houlsby", "reduction_factor": 4, "sharing": "half_shared_up", "learned_scale": True,
     "adapter_layernorm": "before"},
    {"method": "houlsby", "reduction_factor": 4, "sharing": "half_shared_down"},
    {"method": "parallel", "reduction_factor": 4, "sharing": "per_task"},
    {"method": "lora", "r": 4, "sharing": "per_task"},
    {"method": "lora", "r": 4, "sharing": "half_shared_up"},
    {"method": "compacter", "phm_dim": 2, "reduction_factor": 8, "sharing": "per_task"},
    {"method": "hyperformer", "task_embedding_dim": 8, "hidden_dim": 8, "projected_dim": 4},
    {"method": "prompt", "num_tokens": 2, "reparam_dim": 8, "sharing": "per_task"},
])
def test_mixed_task_batch_equals_per_example(family, cfg):
    if family == "vit" and cfg["method"] == "prompt":
        pytest.skip("token prompts do not apply to ViT")
    model = tiny_model(family)
    adapterkit.add_adapters(model, dict(cfg, tasks=TASKS))
    _randomise(model)
    inputs = tiny_inputs(family, batch=3)
    order = ["gqa", "vqa", "nlvr"]
    with torch.no_grad():
        with adapterkit.route(order):
            mixed = main_output(model(**inputs))
        with adapterkit.route(torch.tensor([TASKS.index(t) for t in order])):
            mixed_ids = main_output(model(**inputs))
        for i, t in enumerate(order):
            single = {k: v[i:i + 1] for k, v in inputs.items()}
            with adapterkit.route(t):
                alone = main_output(model(**single))
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed_ids, mixed, atol=1e-6, rtol=0)
    # the tasks really differ
    with torch.no_grad(), adapterkit.route("vqa"):
        all_vqa = main_output(model(**inputs))
    assert (all_vqa[0] - mixed[0]).abs().max() > 1e-6


@pytest.mark.parametrize("cfg,match", [
    ({"method": "housby"}, 'did you mean "houlsby"'),
    ({"reduction_factor": 8}, 'missing "method"'),
    ({"method": "houlsby", "reduction_factr": 8}, 'did you mean "reduction_factor"'),
    ({"method": "houlsby", "reduction_factor": 7}, "does not divide"),
    ({"method": "houlsby", "reduction_factor": -1}, "reduction_factor"),
    ({"method": "houlsby", "sharing": "sometimes"}, "sharing"),
    ({"method": "lora", "r": 0}, '"r" must be >= 1'),
    ({"method": "lora", "r": "eight"}, "integer"),
    ({"method": "lora", "target_modules": ["no_such_module"]}, "no module"),
    ({"method": "houlsby", "places": {"ffn_out": ["nothing\\.here$"]}, "positions": ["ffn_out"]}, "no module"),
    ({"method": "houlsby", "tasks": []}, "at least one task"),
    ({"method": "houlsby", "positions": ["ffn_output"]}, "unknown position"),
])
def test_bad_configs_get_one_clear_error(cfg, match):
    with pytest.raises(adapterkit.ConfigError, match=match):
        adapterkit.add_adapters(tiny_model("bart"), cfg)


def test_undeclared_task_is_a_clear_error():
    model = tiny_model("bart")
    adapterkit.add_adapters(model, {"method": "houlsby", "tasks": ["vqa", "gqa"], "sharing": "per_task"})
    with pytest.raises(adapterkit.ConfigError, match='unknown task "vga".*did you mean "vqa"'):
        with adapterkit.route("vga"):
            model(**tiny_inputs("bart"))
    with pytest.raises(adapterkit.ConfigError, match="no task is routed"):
        model(**tiny_inputs("bart"))


def test_explicit_module_paths_on_plain_module():
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    adapterkit.add_adapters(net, {"method": "lora", "r": 2, "target_modules": ["0", "2"]})
    adapterkit.add_adapters(net, {"method": "houlsby", "reduction_factor": 4, "positions": ["ffn_out"],
                                  "places": {"ffn_out": ["^2$"]}})
    y = net(torch.randn(4, 8))
    y.sum().backward()
    assert net[0].weight.grad is None
    assert adapterkit.trainable_report(net)["trainable"] > 0


def test_task_aware_adamw_leaves_unrouted_tasks_untouched():
    from adapterkit.core.optim import TaskAwareAdamW

    model = tiny_model("bert")
    adapterkit.add_adapters(model, {"method": "houlsby", "reduction_factor": 4, "tasks": TASKS, "sharing": "per_task"})
    _randomise(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = TaskAwareAdamW(params, lr=1e-2, weight_decay=0.1)
    inputs = tiny_inputs("bert")
    for task in ("vqa", "gqa", "vqa"):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        with adapterkit.route(task):
            main_output(model(**inputs)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        t = TASKS.index(task)
        for n, p in model.named_parameters():
            if n in before and p.dim() >= 2 and ".down." in n:
                for i in range(len(TASKS)):
                    same = torch.equal(p[i], before[n][i])
                    assert same == (i != t), (n, i, task)


@pytest.mark.parametrize("cfg", [
    {"method": "houlsby", "reduction_factor": 4, "sharing": "per_task", "dropout": 0.0},
    {"method": "houlsby", "reduction_factor": 4, "sharing": "half_shared_down"},
    {"method": "houlsby", "reduction_factor": 4, "sharing": "half_shared_up"},
    {"method": "lora", "r": 4, "sharing": "per_task"},
])
def test_masked_and_gathered_mixed_paths_agree_with_gradients(cfg, monkeypatch):
    """The masked all-task GEMM path (few tasks) and the gathered-bmm path give the same
    outputs and the same gradients, and a task absent from the batch gets zero gradient."""
    import adapterkit.core.task_linear as tl

    results = []
    calls = []
    one_hot = tl.F.one_hot
    monkeypatch.setattr(tl.F, "one_hot", lambda *a, **k: calls.append(1) or one_hot(*a, **k))
    for limit in (tl.MASKED_MAX_TASKS, 0):
        monkeypatch.setattr(tl, "MASKED_MAX_TASKS", limit)
        calls.clear()
        torch.manual_seed(0)
        model = tiny_model("bart")
        adapterkit.add_adapters(model, dict(cfg, tasks=TASKS))
        _randomise(model)
        inputs = tiny_inputs("bart", batch=4)
        with adapterkit.route(torch.tensor([1, 0, 1, 0])):  # task 2 ("nlvr") absent
            out = main_output(model(**inputs))
        out.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "adapterkit" in n}
        assert bool(calls) == (limit > 0)  # the masked path ran, then the gathered one
        results.append((out.detach(), grads))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-5)
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-4, msg=n)
        if g1[n].dim() >= 2 and g1[n].shape[0] == len(TASKS):
            assert g1[n][2].abs().max() == 0, n


def test_merged_lora_removes_its_hooks_and_unmerge_restores_them():
    model = tiny_model("bart")
    adapterkit.add_adapters(model, {"method": "lora", "r": 4})
    _randomise(model)
    inputs = tiny_inputs("bart")
    n_hooks = sum(len(m._forward_hooks) for m in model.modules())
    assert n_hooks > 0
    with torch.no_grad():
        ref = main_output(model(**inputs)).clone()
        adapterkit.merge_adapters(model)
        assert sum(len(m._forward_hooks) for m in model.modules()) == 0
        torch.testing.assert_close(main_output(model(**inputs)), ref, atol=1e-5, rtol=0)
        adapterkit.unmerge_adapters(model)
        assert sum(len(m._forward_hooks) for m in model.modules()) == n_hooks
        torch.testing.assert_close(main_output(model(**inputs)), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bart", "llama"])
def test_cast_frozen_keeps_autocast_outputs_and_trainable_dtypes(family):
    model = tiny_model(family)
    adapterkit.add_adapters(model, {"method": "lora", "r": 4, "train_layernorms": True})
    _randomise(model)
    inputs = tiny_inputs(family)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = main_output(model(**inputs)).float()
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    adapterkit.cast_frozen(model, torch.bfloat16)
    after = sum(p.numel() * p.element_size() for p in model.parameters())
    assert after < 0.6 * before
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), n
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = main_output(model(**inputs)).float()
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
    with pytest.raises(adapterkit.ConfigError, match="floating-point"):
        adapterkit.cast_frozen(model, torch.int8)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in model.parameters() if p.requires_grad)


def test_cast_frozen_keeps_torch_norm_layers_in_fp32():
    """A frozen nn.LayerNorm stays fp32 (on the CPU, LayerNorm refuses fp32 input with bf16
    weights: BART's layernorm_embedding reads the fp32 embeddings); the linears go to bf16."""
    model = tiny_model("bart")
    adapterkit.add_adapters(model, {"method": "lora", "r": 4, "train_layernorms": False})
    adapterkit.cast_frozen(model, torch.bfloat16)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert m.weight.dtype == torch.float32 and not m.weight.requires_grad, name
    assert model.model.encoder.layers[0].fc1.weight.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = main_output(model(**tiny_inputs("bart"))).float()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_cast_frozen_keeps_the_residual_stream_fp32(family):
    """A frozen embedding cast to bf16 still returns fp32 rows (as under plain autocast), so the
    layers' hidden states stay fp32 and the adapters' small updates are not rounded to bf16."""
    model = tiny_model(family)
    adapterkit.add_adapters(model, {"method": "pfeiffer", "reduction_factor": 4})
    _randomise(model)
    inputs = tiny_inputs(family)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = main_output(model(**inputs)).float()
    adapterkit.cast_frozen(model, torch.bfloat16)
    adapterkit.cast_frozen(model, torch.bfloat16)  # twice: one hook per embedding
    emb = model.get_input_embeddings()
    assert emb.weight.dtype == torch.bfloat16 and len(emb._forward_hooks) == 1
    seen = []
    layers = model.model.layers if family == "llama" else model.model.encoder.layers
    layers[-1].register_forward_hook(lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = main_output(model(**inputs)).float()
    assert seen == [torch.float32]
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)


def test_compacter_batched_weights_match_per_place_and_never_go_stale():
    """Compacter builds every place's H in one einsum per stack call: same outputs and
    gradients as building each place's own H, and an in-place update is always seen."""
    model = tiny_model("bart")
    adapterkit.add_adapters(model, {"method": "compacter", "phm_dim": 2, "reduction_factor": 4,
                                    "shared_phm_rule": False})
    _randomise(model)
    inputs = tiny_inputs("bart")
    cset = next(iter(model.adapterkit.sets.values()))
    out = main_output(model(**inputs))
    out.float().pow(2).mean().backward()
    g1 = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    orig = cset._weights
    cset._weights = lambda stack, key: (None, None)  # each place builds its own H
    try:
        out2 = main_output(model(**inputs))
        out2.float().pow(2).mean().backward()
    finally:
        cset._weights = orig
    torch.testing.assert_close(out, out2, atol=1e-6, rtol=1e-6)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, g1[n], atol=1e-6, rtol=1e-5, msg=n)
    # a layer called on its own after an in-place update uses the updated factors
    key, ad = next(iter(cset.adapters.items()))
    module = model.get_submodule(key.replace("__", "."))  # the hooked sublayer, called on its own
    h = torch.randn(2, 5, model.config.d_model)
    with torch.no_grad():
        before = module(h).clone()
        (ad.down.W if ad.down.W is not None else ad.down.W_left).mul_(3.0)
        after = module(h)
        cset._weights = lambda stack, key: (None, None)
        try:
            fresh = module(h)
        finally:
            cset._weights = orig
    assert (after - before).abs().max() > 1e-5
    torch.testing.assert_close(after, fresh, atol=1e-6, rtol=1e-6)


def test_every_mergeable_method_drops_its_hooks_while_merged():
    """AdaMix (LoRA experts) uses the same merge mechanism as LoRA (AdapterSet.suspend_hooks): no hooks while merged."""
    from adapterkit.testing.tiny import tiny_model as tm

    model = tm("bart")
    adapterkit.add_adapters(model, {"method": "adamix", "expert_type": "lora", "r": 4})
    n = sum(len(m._forward_hooks) for m in model.modules())
    adapterkit.merge_adapters(model)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    adapterkit.unmerge_adapters(model)
    assert sum(len(m._forward_hooks) for m in model.modules()) == n
