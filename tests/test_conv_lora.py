"""Conv LoRA (merge/unmerge exactness, per-task routing) and ResAdapter on a tiny diffusers UNet."""

import pytest
import torch
from torch import nn

import adapterkit
from adapterkit.core.base import merge_adapters, unmerge_adapters
from adapterkit.core.io import load_adapters, save_adapters
from adapterkit.errors import CheckpointError, ConfigError


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(8, 8, 5, padding=2, dilation=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.down(x))
        x = self.mid(x)
        return self.head(x.mean((2, 3)))


def _cnn(cfg, seed=0):
    torch.manual_seed(seed)
    m = TinyCNN()
    adapterkit.add_adapters(m, cfg)
    s = next(iter(m.adapterkit.sets.values()))
    with torch.no_grad():
        for layer in s.layers.values():
            layer.lora_up.normal_(0, 0.3)
    return m, s


def test_merge_equals_unmerged_and_unmerge_restores():
    m, s = _cnn({"method": "conv_lora", "r": 4, "alpha": 8.0, "target_modules": ["down", "mid"]})
    assert s.paths == ["down", "mid"]
    x = torch.randn(2, 3, 9, 9)
    w0 = {n: c.weight.detach().clone() for n, c in (("down", m.down), ("mid", m.mid))}
    with torch.no_grad():
        y = m(x)
        merge_adapters(m)
        y_merged = m(x)
        assert not torch.equal(m.down.weight, w0["down"])
        unmerge_adapters(m)
        y_after = m(x)
    assert (y_merged - y).abs().max() < 1e-5
    torch.testing.assert_close(y_after, y, atol=1e-6, rtol=0)
    for n, c in (("down", m.down), ("mid", m.mid)):
        torch.testing.assert_close(c.weight, w0[n], atol=1e-6, rtol=0)


def test_composed_kernel_is_exact_and_starts_at_zero():
    torch.manual_seed(0)
    m = adapterkit.add_adapters(TinyCNN(), {"method": "conv_lora", "r": 3, "alpha": 6.0, "target_modules": ["down"]})
    layer = m.adapterkit.sets["conv_lora"].layers["down"]
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, None), torch.zeros(2, 8, 4, 4))  # zero-init up
        layer.lora_up.normal_()
        seq = nn.functional.conv2d(nn.functional.conv2d(x, layer.lora_down[0], stride=2, padding=1),
                                   layer.lora_up[0]) * 2.0
        comp = nn.functional.conv2d(x, layer.delta(None), stride=2, padding=1)
    torch.testing.assert_close(layer(x, None), seq)
    torch.testing.assert_close(comp, seq, atol=1e-5, rtol=1e-5)
    assert layer.lora_down.shape == (1, 3, 6, 3, 3) and layer.lora_up.shape == (1, 8, 3, 1, 1)


def test_per_task_mixed_batch_and_merge_task():
    cfg = {"method": "conv_lora", "r": 2, "tasks": ["a", "b"], "sharing": "per_task", "target_modules": ["down", "mid"]}
    m, s = _cnn(cfg)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        with adapterkit.route(["a", "b", "a"]):
            y = m(x)
        with adapterkit.route("a"):
            ya = m(x)
        with adapterkit.route("b"):
            yb = m(x)
        torch.testing.assert_close(y[[0, 2]], ya[[0, 2]], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(y[1], yb[1], atol=1e-5, rtol=1e-4)
        with pytest.raises(ConfigError, match="must name the task"):
            merge_adapters(m)
        merge_adapters(m, task="b")
        with adapterkit.route("b"):
            assert (m(x) - yb).abs().max() < 1e-5
        unmerge_adapters(m)


def test_conv_lora_errors():
    with pytest.raises(ConfigError, match="target_modules"):
        adapterkit.add_adapters(TinyCNN(), {"method": "conv_lora"})
    with pytest.raises(ConfigError, match="nn.Conv2d"):
        adapterkit.add_adapters(TinyCNN(), {"method": "conv_lora", "target_modules": ["head"]})
    g = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ConfigError, match="groups=2"):
        adapterkit.add_adapters(g, {"method": "conv_lora", "target_modules": ["0"]})


# ----------------------------------------------------------------------------- ResAdapter on a diffusers UNet

# only these tests need diffusers (a `test` extra): each skips alone when it is missing


@pytest.fixture
def diffusers():
    return pytest.importorskip("diffusers")


def _unet(diffusers, seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


def _run(unet, x, t):
    with torch.no_grad():
        return unet(x, t).sample


def _randomise(unet):
    s = unet.adapterkit.sets["resadapter"]
    with torch.no_grad():
        for layer in s.layers.values():
            layer.lora_up.normal_(0, 0.2)
        for n, p in unet.named_parameters():
            if ".norm1." in n or ".norm2." in n:
                p.add_(torch.randn_like(p) * 0.1)


def test_resadapter_param_count_and_freeze(diffusers):
    from adapterkit.diffusion.resadapter import add_resadapter, resadapter_param_count

    unet = _unet(diffusers)
    expected = resadapter_param_count(unet)
    # by hand: one downsampler conv (8 ch) + one upsampler conv (16 ch), each 3x3: 16*C*9 + C*16 = 160*C
    assert expected["convs"] == 2 and expected["lora"] == 160 * 8 + 160 * 16
    # ResNet blocks: down (8->8), (8->16); mid 2x(16->16); up (32->16),(24->16),(24->8),(16->8): norm1 on the
    # input width, norm2 on the output width, weight + bias each
    widths = [(8, 8), (8, 16), (16, 16), (16, 16), (32, 16), (24, 16), (24, 8), (16, 8)]
    assert expected["norm"] == sum(2 * (a + b) for a, b in widths) and expected["norm_tensors"] == 4 * len(widths)
    add_resadapter(unet)
    s = unet.adapterkit.sets["resadapter"]
    assert s.config.r == 16 and s.config.alpha == 8.0 and next(iter(s.layers.values())).scaling == 0.5
    assert adapterkit.trainable_report(unet)["trainable"] == expected["total"]
    trainable_base = set(unet.adapterkit.base_trainable)
    assert trainable_base and all((".norm1." in n or ".norm2." in n) and ".resnets." in n for n in trainable_base)
    assert len(trainable_base) == expected["norm_tensors"]


@pytest.mark.parametrize("lora_format", ["kohya", "peft"])
def test_resadapter_released_layout_round_trip(tmp_path, lora_format, diffusers):
    from adapterkit.diffusion.resadapter import add_resadapter, load_resadapter, save_resadapter

    unet = add_resadapter(_unet(diffusers))
    _randomise(unet)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 7])
    y = _run(unet, x, t)
    save_resadapter(unet, tmp_path / "ra", lora_format=lora_format)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ra" / "resolution_lora.safetensors"), "pt") as f:
        keys = set(f.keys())
    if lora_format == "kohya":
        assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight" in keys
        assert "lora_unet_up_blocks_0_upsamplers_0_conv.alpha" in keys
    else:
        assert "unet.down_blocks.0.downsamplers.0.conv.lora_A.weight" in keys
    fresh = _unet(diffusers)
    assert (_run(fresh, x, t) - y).abs().max() > 1e-6
    load_resadapter(fresh, tmp_path / "ra")  # attaches r/alpha from the files
    torch.testing.assert_close(_run(fresh, x, t), y)
    # merging the resolution LoRA keeps outputs
    merge_adapters(fresh)
    assert (_run(fresh, x, t) - y).abs().max() < 1e-5
    unmerge_adapters(fresh)


def test_resadapter_adapterkit_format_and_errors(tmp_path, diffusers):
    from adapterkit.diffusion.resadapter import add_resadapter, load_resadapter, save_resadapter

    unet = add_resadapter(_unet(diffusers))
    _randomise(unet)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([5])
    y = _run(unet, x, t)
    save_adapters(unet, tmp_path / "ak")
    fresh = load_adapters(_unet(diffusers), tmp_path / "ak")
    torch.testing.assert_close(_run(fresh, x, t), y)
    # a LoRA file that lacks one of the convs is rejected with the conv named
    from safetensors.torch import load_file, save_file

    save_resadapter(unet, tmp_path / "ra")
    sd = load_file(str(tmp_path / "ra" / "resolution_lora.safetensors"))
    bad = {k: v for k, v in sd.items() if "upsamplers" not in k}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="up_blocks.0.upsamplers.0.conv"):
        load_resadapter(_unet(diffusers), tmp_path / "bad.safetensors")
    sd["lora_unet_mid_block_conv.lora_down.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="names no down/up-sampler conv"):
        load_resadapter(_unet(diffusers), tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_resadapter(_unet(diffusers), tmp_path / "missing")
