"""ResAdapter training (resolution LoRA on the resamplers + ResNet GroupNorms, the rest frozen) and
multi-resolution sampling on a tiny random-init diffusers UNet2DConditionModel."""

import pytest
import torch

import adapterkit
from adapterkit.errors import ConfigError, DataError

diffusers = pytest.importorskip("diffusers")

from adapterkit.diffusion.resadapter import add_resadapter, load_resadapter, save_resadapter  # noqa: E402
from adapterkit.diffusion.train import diffusion_loss, sample, train_resadapter  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """The UNet is tiny: one intra-op thread is fastest (and avoids spin-waits on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _unet(seed=0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=4)
    for p in unet.parameters():
        p.requires_grad_(False)
    return unet.eval()


def _batches():
    """A tiny fixed set at two resolutions (8x8 and 8x12): latents and text states."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 8, generator=g)),
            (torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 3, 8, generator=g))]


def _fixed_loss(unet, scheduler, batches):
    with torch.no_grad():
        return sum(float(diffusion_loss(unet, scheduler, x, c, torch.Generator().manual_seed(100 + i)))
                   for i, (x, c) in enumerate(batches)) / len(batches)


def test_training_lowers_the_loss_and_touches_only_lora_and_norms():
    unet = add_resadapter(_unet())
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100)
    batches = _batches()
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    l0 = _fixed_loss(unet, scheduler, batches)
    losses = train_resadapter(unet, batches, scheduler, steps=25, lr=5e-2, seed=0)
    l1 = _fixed_loss(unet, scheduler, batches)
    assert len(losses) == 25 and all(torch.isfinite(torch.tensor(losses)))
    assert l1 < 0.95 * l0, (l0, l1)
    assert not unet.training  # mode restored
    changed = {n for n, p in unet.named_parameters() if not torch.equal(p, before[n])}
    lora = {n for n in changed if n.startswith("adapterkit.")}
    norms = changed - lora
    assert lora and all("lora_" in n for n in lora)
    # the released ResENorm: norm1/norm2 of the ResNet blocks, nothing else of the UNet moves
    assert norms and all(".resnets." in n and (".norm1." in n or ".norm2." in n) for n in norms)


def test_sampling_at_several_resolutions_and_guidance():
    unet = add_resadapter(_unet())
    ddim = diffusers.DDIMScheduler(num_train_timesteps=100)
    cond = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2))
    for h, w in [(8, 8), (16, 16), (8, 20)]:
        y = sample(unet, ddim, 2, h, w, cond=cond, steps=4, generator=torch.Generator().manual_seed(0))
        assert y.shape == (2, 4, h, w) and torch.isfinite(y).all()
    a = sample(unet, ddim, 2, 8, 8, cond=cond, steps=4, generator=torch.Generator().manual_seed(0))
    b = sample(unet, ddim, 2, 8, 8, cond=cond, steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)  # seeded: reproducible
    g = sample(unet, ddim, 2, 8, 8, cond=cond, steps=4, generator=torch.Generator().manual_seed(0),
               guidance_scale=3.0, uncond=torch.zeros(1, 3, 8))
    assert g.shape == a.shape and not torch.equal(g, a)
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=100)
    assert sample(unet, ddpm, 1, 12, 8, cond=cond[:1], steps=3).shape == (1, 4, 12, 8)
    with pytest.raises(ConfigError, match="guidance"):
        sample(unet, ddim, 2, 8, 8, cond=cond, guidance_scale=2.0)


@pytest.mark.parametrize("lora_format", ["kohya", "peft"])
def test_trained_adapter_saves_in_the_released_layout_and_reloads_identically(tmp_path, lora_format):
    unet = add_resadapter(_unet())
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100)
    train_resadapter(unet, _batches(), scheduler, steps=6, lr=3e-2)
    save_resadapter(unet, tmp_path / "ra", lora_format=lora_format)
    fresh = load_resadapter(_unet(), tmp_path / "ra")
    x, c, t = torch.randn(2, 4, 8, 12), torch.randn(2, 3, 8), torch.tensor([5, 80])
    with torch.no_grad():
        assert torch.equal(fresh(x, t, encoder_hidden_states=c).sample, unet(x, t, encoder_hidden_states=c).sample)
        base = _unet()(x, t, encoder_hidden_states=c).sample
        assert (base - unet(x, t, encoder_hidden_states=c).sample).abs().max() > 1e-6  # training changed it
    ddim = diffusers.DDIMScheduler(num_train_timesteps=100)
    ya = sample(unet, ddim, 2, 16, 8, cond=c, steps=3, generator=torch.Generator().manual_seed(3))
    yb = sample(fresh, ddim, 2, 16, 8, cond=c, steps=3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ya, yb)


def test_training_errors():
    unet = _unet()
    with pytest.raises(ConfigError, match="no trainable parameters"):
        train_resadapter(unet, _batches(), steps=1)
    unet = add_resadapter(unet)
    with pytest.raises(DataError, match="channels"):
        train_resadapter(unet, [(torch.randn(1, 3, 8, 8), None)], steps=1)
    with pytest.raises(DataError, match="pair"):
        train_resadapter(unet, [torch.randn(1, 4, 8, 8)], steps=1)
    with pytest.raises(ConfigError, match="steps"):
        train_resadapter(unet, _batches(), steps=0)
    assert adapterkit.trainable_report(unet)["trainable"] > 0
