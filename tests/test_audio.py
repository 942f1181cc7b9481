"""Audio pipeline: Kaldi fbank, WAV/dataset readers, PETL-AST placements, Conformer block, end-to-end."""

from __future__ import annotations

import math
import wave

import numpy as np
import pytest
import torch

import adapterkit
from adapterkit.audio.data import augment, load_esc50, load_speech_commands, read_wav
from adapterkit.audio.fbank import AST_MEAN, AST_STD, ast_features, kaldi_fbank
from adapterkit.audio.models import petl_config
from adapterkit.audio.pipeline import run_audio
from adapterkit.core.base import get_container
from adapterkit.errors import ConfigError, DataError
from adapterkit.methods.conformer_adapter import ConformerBlock, ConformerConfig
from adapterkit.testing.tiny import tiny_inputs, tiny_model


def _numpy_fbank(x: np.ndarray, sr: int = 16000, bins: int = 128) -> np.ndarray:
    """Direct per-frame computation of the Kaldi recipe (independent of the torch code)."""
    win, hop, nfft = 400, 160, 512
    n = 1 + (len(x) - win) // hop
    hz2mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = hz2mel(20.0), hz2mel(sr / 2)
    edges = lo + (hi - lo) / (bins + 1) * np.arange(bins + 2)
    fft_mel = hz2mel(np.arange(nfft // 2 + 1) * sr / nfft)
    fb = np.zeros((bins, nfft // 2 + 1))
    for b in range(bins):
        left, c, right = edges[b], edges[b + 1], edges[b + 2]
        for k in range(nfft // 2):  # the Nyquist bin stays 0, as in Kaldi
            m = fft_mel[k]
            if left < m < right:
                fb[b, k] = (m - left) / (c - left) if m <= c else (right - m) / (right - c)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / (win - 1))
    out = np.zeros((n, bins))
    for t in range(n):
        f = x[t * hop: t * hop + win].astype(np.float64)
        f = f - f.mean()
        f = np.concatenate([[f[0] - 0.97 * f[0]], f[1:] - 0.97 * f[:-1]])
        spec = np.abs(np.fft.rfft(f * hann, nfft)) ** 2
        out[t] = np.log(np.maximum(fb @ spec, np.finfo(np.float32).eps))
    return out


def test_fbank_matches_direct_numpy_and_shapes():
    rng = np.random.default_rng(0)
    t = np.arange(8000) / 16000
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    fb = kaldi_fbank(torch.from_numpy(x))
    assert fb.shape == (1 + (8000 - 400) // 160, 128)
    np.testing.assert_allclose(fb.numpy(), _numpy_fbank(x), rtol=1e-4, atol=1e-4)
    # the 440 Hz tone dominates the mel bin that contains it
    assert int(fb.mean(0).argmax()) == int(_numpy_fbank(x).mean(0).argmax())
    batch = kaldi_fbank(torch.from_numpy(np.stack([x, x[::-1].copy()])))
    torch.testing.assert_close(batch[0], fb)
    feats = ast_features(torch.from_numpy(x), max_length=64, subtract_mean=False)
    assert feats.shape == (64, 128)
    torch.testing.assert_close(feats[:fb.shape[0]], (fb - AST_MEAN) / (2 * AST_STD))
    assert torch.all(feats[fb.shape[0]:] == -AST_MEAN / (2 * AST_STD))  # zero-padded frames, normalised
    with pytest.raises(DataError, match="shorter"):
        kaldi_fbank(torch.zeros(100))


def test_fbank_matches_transformers_numpy_extractor():
    from transformers import ASTFeatureExtractor

    x = (np.random.default_rng(1).standard_normal(4000) * 0.1).astype(np.float32)
    ref = ASTFeatureExtractor(max_length=32)(x, sampling_rate=16000, return_tensors="np")["input_values"][0]
    mine = ast_features(torch.from_numpy(x), max_length=32, subtract_mean=False).numpy()
    np.testing.assert_allclose(mine, ref, atol=1e-4)


def _write_wav(path, x: np.ndarray, sr: int, width: int = 2, channels: int = 1):
    scale = {1: 127, 2: 32767, 3: (1 << 23) - 1}[width]
    q = np.round(np.clip(x, -1, 1) * scale).astype(np.int64)
    if width == 1:
        raw = (q + 128).astype(np.uint8).tobytes()
    elif width == 2:
        raw = q.astype("<i2").tobytes()
    else:
        raw = b"".join(int(v & 0xFFFFFF).to_bytes(3, "little") for v in q)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(sr)
        w.writeframes(raw)


@pytest.mark.parametrize("width,tol", [(1, 2 / 100), (2, 1e-4), (3, 1e-6)])
def test_read_wav_pcm_widths(tmp_path, width, tol):
    x = np.sin(np.linspace(0, 20, 300)) * 0.8
    _write_wav(tmp_path / "a.wav", x, 8000, width)
    y, sr = read_wav(tmp_path / "a.wav")
    assert sr == 8000 and y.dtype == np.float32 and len(y) == 300
    np.testing.assert_allclose(y, x, atol=tol)


def test_read_wav_stereo_and_missing(tmp_path):
    inter = np.stack([np.full(10, 0.5), np.full(10, -0.25)], 1).reshape(-1)
    _write_wav(tmp_path / "s.wav", inter, 16000, 2, channels=2)
    y, _ = read_wav(tmp_path / "s.wav")
    np.testing.assert_allclose(y, np.full(10, 0.125), atol=1e-4)
    with pytest.raises(DataError, match="not found"):
        read_wav(tmp_path / "nope.wav")


def test_augment_keeps_length_and_changes_signal():
    x = np.sin(np.linspace(0, 100, 4000)).astype(np.float32)
    y = augment(x, np.random.default_rng(0), 4000, (10, 10), (0.9, 1.1), 200, (-3, 3))
    assert y.shape == (4000,) and not np.allclose(y, x)


def test_esc50_and_speech_commands_readers(tmp_path):
    esc = tmp_path / "esc"
    (esc / "meta").mkdir(parents=True)
    (esc / "audio").mkdir()
    (esc / "meta/esc50.csv").write_text("filename,fold,target,category,esc10,src_file,take\n"
                                        "1-1-A-0.wav,1,0,dog,True,1,A\n2-1-A-1.wav,2,1,rooster,False,1,A\n"
                                        "5-1-A-0.wav,5,0,dog,True,1,A\n")
    train, test, names = load_esc50(esc, [5])
    assert names == ["dog", "rooster"] and len(train) == 2 and test == [(esc / "audio/5-1-A-0.wav", 0)]
    (esc / "meta/esc50.csv").write_text("filename,fold\n")
    with pytest.raises(DataError, match="columns"):
        load_esc50(esc)
    sc = tmp_path / "sc"
    for w in ("yes", "no", "_background_noise_"):
        (sc / w).mkdir(parents=True)
        for i in range(3):
            (sc / w / f"s{i}.wav").write_bytes(b"")
    (sc / "validation_list.txt").write_text("yes/s1.wav\n")
    (sc / "testing_list.txt").write_text("no/s2.wav\nyes/s2.wav\n")
    tr, va, te, words = load_speech_commands(sc)
    assert words == ["no", "yes"]
    assert len(tr) == 3 and [p.name for p, _ in va] == ["s1.wav"] and sorted(lab for _, lab in te) == [0, 1]


def _capture(module, store, key):
    module.register_forward_pre_hook(lambda m, a, k: store.__setitem__(key, (a[0] if a else k["hidden_states"]).clone()),
                                     with_kwargs=True)


def test_petl_parallel_reads_normalised_inputs_houlsby():
    model = tiny_model("ast")
    cfg = petl_config({"adapter_type": "houlsby", "placement": "parallel", "block": "bottleneck", "reduction_rate": 8},
                      "audio-spectrogram-transformer")
    adapterkit.add_adapters(model, cfg)
    model.eval()
    s = get_container(model).sets["parallel"]
    assert sorted(s.adapters) == ["layers__0__attention__o_proj", "layers__0__mlp__fc2",
                                  "layers__1__attention__o_proj", "layers__1__mlp__fc2"]
    seen = {}
    _capture(model.layers[0].mlp, seen, "mlp_in")
    _capture(model.layers[0].attention, seen, "attn_in")
    _capture(s.adapters["layers__0__mlp__fc2"], seen, "ffn_ad")
    _capture(s.adapters["layers__0__attention__o_proj"], seen, "attn_ad")
    model(**tiny_inputs("ast"))
    assert torch.equal(seen["ffn_ad"], seen["mlp_in"]) and torch.equal(seen["attn_ad"], seen["attn_in"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("adapterkit")}
    assert trainable == {f"layers.{i}.{ln}.{w}" for i in (0, 1) for ln in ("layernorm_before", "layernorm_after")
                         for w in ("weight", "bias")} | {"layernorm.weight", "layernorm.bias"}


def test_petl_sequential_pfeiffer_and_conformer_configs():
    seq = petl_config({"placement": "sequential", "block": "bottleneck"}, "audio-spectrogram-transformer")
    assert seq["method"] == "pfeiffer" and seq["positions"] == ["ffn_out"] and seq["activation"] == "gelu"
    conf = petl_config({"adapter_type": "houlsby", "placement": "sequential", "residual": False}, "whisper")
    assert conf["method"] == "conformer" and conf["positions"] == ["ffn", "attn"] and conf["residual"] is False
    assert r"self_attn_layer_norm\." in conf["trainable_modules"]
    # issue 15: the reference's apply_residual is now allowed for bottlenecks too; a non-bool is refused
    with pytest.raises(ConfigError, match="residual"):
        petl_config({"block": "bottleneck", "placement": "parallel", "residual": "yes"}, "audio-spectrogram-transformer")
    with pytest.raises(ConfigError, match="reduction_rat"):
        petl_config({"reduction_ratio": 4}, "audio-spectrogram-transformer")


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
def test_bottleneck_adapter_gets_gradients_in_both_projections(placement):
    # init "bert" (the default is now the reference's all-zero bottleneck, issue 15: see test_audio_lid.py)
    model = tiny_model("ast")
    adapterkit.add_adapters(model, petl_config({"block": "bottleneck", "placement": placement, "reduction_rate": 8,
                                                "init": "bert"}, "audio-spectrogram-transformer"))
    model.train()
    model(**tiny_inputs("ast")).last_hidden_state.pow(2).mean().backward()
    for ad in get_container(model).sets.values():
        for b in ad.adapters.values():
            for lin in (b.down, b.up):
                assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
                assert lin.bias.grad.abs().sum() > 0


def test_conformer_block_structure_layernorm_option_and_sequential_placement():
    cfg = ConformerConfig(reduction_factor=8, kernel_size=5)
    blk = ConformerBlock(32, 4, cfg)
    assert blk.pointwise_in.out_features == 8 and blk.depthwise_weight.shape == (1, 4, 5)
    x = torch.randn(2, 9, 32) * 3 + 1
    blk.eval()
    # reference computation with torch modules
    h = torch.nn.functional.glu(blk.pointwise_in(x), dim=-1).transpose(1, 2)
    h = torch.nn.functional.conv1d(h, blk.depthwise_weight[0].unsqueeze(1), blk.depthwise_bias[0], padding=2, groups=4)
    h = torch.nn.functional.batch_norm(h, blk.norm.running_mean[0], blk.norm.running_var[0], blk.norm.weight[0],
                                       blk.norm.bias[0], False)
    ref = blk.pointwise_out(torch.nn.functional.silu(h).transpose(1, 2))
    torch.testing.assert_close(blk(x, None), ref)
    ln = ConformerBlock(32, 4, ConformerConfig(reduction_factor=8, kernel_size=5, input_layernorm=True))
    ln.load_state_dict(blk.state_dict(), strict=False)
    ln.eval()
    torch.testing.assert_close(ln(x, None), blk(torch.nn.functional.layer_norm(x, (32,)), None))
    assert not torch.allclose(ln(x, None), blk(x, None))
    model = tiny_model("ast")
    adapterkit.add_adapters(model, {"method": "conformer", "bottleneck_dim": 4, "kernel_size": 3,
                                    "placement": "sequential", "residual": False})
    model.eval()
    s = get_container(model).sets["conformer"]
    seen = {}
    fc2 = model.layers[0].mlp.fc2
    fc2.register_forward_pre_hook(lambda m, a: seen.__setitem__("fc2_in", a[0]))
    fc2.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    model(**tiny_inputs("ast"))
    raw = torch.nn.functional.linear(seen["fc2_in"], fc2.weight, fc2.bias)
    with torch.no_grad():
        torch.testing.assert_close(seen["out"], s.adapters["layers__0__mlp__fc2"](raw, None))  # no residual
    assert {n for n, p in s.named_parameters() if not p.requires_grad} == {
        f"adapters.layers__{i}__mlp__fc2.norm.{k}" for i in (0, 1) for k in ("running_mean", "running_var")}


@pytest.mark.parametrize("training", [False, True])
def test_conformer_per_task_mixed_batch_equals_separate_batches(training):
    torch.manual_seed(0)
    cfg = ConformerConfig(bottleneck_dim=4, kernel_size=3, tasks=["a", "b"], sharing="per_task")
    blk = ConformerBlock(16, 4, cfg)
    with torch.no_grad():
        for p in blk.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
        blk.norm.running_mean.normal_(0, 0.3)
    blk.train(training)
    x = torch.randn(5, 7, 16)
    task = torch.tensor([0, 1, 1, 0, 1])
    mixed = blk(x, task)
    rm_mixed = blk.norm.running_mean.clone()
    with torch.no_grad():
        blk.norm.running_mean.copy_(rm_mixed)  # (eval: unchanged)
    for t in (0, 1):
        sel = task == t
        blk2 = ConformerBlock(16, 4, cfg)
        blk2.load_state_dict(blk.state_dict())
        blk2.train(training)
        torch.testing.assert_close(mixed[sel], blk2(x[sel], t), rtol=1e-4, atol=1e-5)


def _tone_folder(root, sr=16000):
    rng = np.random.default_rng(0)
    for lab, f0 in (("low", 300.0), ("high", 2500.0)):
        (root / lab).mkdir(parents=True)
        for i in range(2):
            t = np.arange(int(0.4 * sr)) / sr
            _write_wav(root / lab / f"{i}.wav", 0.5 * np.sin(2 * np.pi * f0 * t) + 0.01 * rng.standard_normal(len(t)), sr)


TINY_AST = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "num_mel_bins": 32, "max_length": 40, "patch_size": 16, "frequency_stride": 16, "time_stride": 16}


@pytest.mark.parametrize("method,adapter", [
    ("petl_adapter", {"block": "conformer", "reduction_rate": 8, "kernel_size": 5}),
    ("petl_adapter", {"block": "bottleneck", "adapter_type": "houlsby", "placement": "sequential", "reduction_rate": 8}),
    ("lora", {"reduction_rate": 8}),
    ("prompt", {"num_tokens": 3}),
])
def test_end_to_end_folder_tiny_ast(tmp_path, method, adapter):
    _tone_folder(tmp_path / "wav")
    cfg = {"data": {"source": "folder", "root": str(tmp_path / "wav"), "clip_seconds": 0.4, "train_copies": 3,
                    "test_copies": 2},
           "model": {"backbone": "ast", "ast": TINY_AST}, "method": method, "adapter": adapter,
           "train": {"epochs": 2, "batch_size": 4}, "output_dir": str(tmp_path / "out")}
    res = run_audio(cfg, log=lambda s: None)
    assert res["n_train"] == 12 and res["n_test"] == 8 and math.isfinite(res["history"][-1]["train_loss"])
    assert (tmp_path / "out/results.json").is_file() and 0 < res["trainable_percent"] < 100


def test_end_to_end_tiny_whisper_and_errors(tmp_path):
    _tone_folder(tmp_path / "wav")
    whisper = {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
               "num_mel_bins": 16, "max_source_positions": 20, "vocab_size": 64, "pad_token_id": 1,
               "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 0}
    cfg = {"data": {"source": "folder", "root": str(tmp_path / "wav"), "clip_seconds": 0.4, "train_copies": 2,
                    "test_copies": 1},
           "model": {"backbone": "whisper", "whisper": whisper}, "method": "petl_adapter",
           "adapter": {"block": "conformer", "adapter_type": "houlsby", "reduction_rate": 8, "kernel_size": 3},
           "train": {"epochs": 1, "batch_size": 4}}
    res = run_audio(cfg, log=lambda s: None)
    assert res["n_test"] == 4 and math.isfinite(res["history"][0]["train_loss"])
    with pytest.raises(ConfigError, match="train_copies"):
        run_audio({**cfg, "data": {**cfg["data"], "train_copies": 0}}, log=lambda s: None)
    with pytest.raises(ConfigError, match="unknown audio method"):
        run_audio({**cfg, "method": "petl"}, log=lambda s: None)
