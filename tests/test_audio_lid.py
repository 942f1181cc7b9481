"""Spoken-language identification from Asterisk prompts (data.source asterisk_lid), the
PETL-AST reference defaults (all-zero bottleneck, sequential without residual, reduction
rates per block), Whisper window cut, the cached linear probe, and config errors."""

from __future__ import annotations

import gzip
import json
import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import adapterkit
from adapterkit.audio.data import asterisk_lid, split_names
from adapterkit.audio.models import REDUCTION_RATES, petl_config
from adapterkit.audio.pipeline import run_audio
from adapterkit.core.base import get_container
from adapterkit.errors import ConfigError, DataError
from adapterkit.testing.tiny import tiny_inputs, tiny_model

LANGS = {"xx": ("xx_XX_f_Anna", 220.0), "yy": ("yy_YY_m_Bert", 660.0), "zz": ("zz_ZZ_f_Cleo", 1320.0)}
NAMES = [f"p{i:02d}" for i in range(8)] + ["digits/1", "digits/2"]
TINY_WHISPER = {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                "num_mel_bins": 16, "max_source_positions": 1500, "vocab_size": 64, "pad_token_id": 1,
                "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 0}


def _write_wav(path: Path, x: np.ndarray, sr: int = 8000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(x, -1, 1) * 32000).astype("<i2").tobytes())


@pytest.fixture()
def sounds(tmp_path):
    """The Debian asterisk-core-sounds layout: one voice folder per language, a gzipped
    ``name: transcript`` list per language; each language a tone of its own pitch."""
    rng = np.random.default_rng(0)
    for lang, (voice, f0) in LANGS.items():
        lines = ["; comment", "beep: [beep tone]"]
        for i, name in enumerate(NAMES):
            n = int(8000 * (0.3 + 0.05 * i))
            t = np.arange(n) / 8000
            _write_wav(tmp_path / "sounds" / voice / f"{name}.wav",
                       0.3 * np.sin(2 * np.pi * f0 * (1 + 0.01 * i) * t) + 0.01 * rng.standard_normal(n))
            lines.append(f"{name}: word {i}")
        doc = tmp_path / "doc" / f"asterisk-core-sounds-{lang}"
        doc.mkdir(parents=True)
        (doc / f"core-sounds-{lang}.txt.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    return tmp_path / "sounds", tmp_path / "doc"


# ----------------------------------------------------------------------------- splits


def test_split_names_disjoint_seeded_and_sized():
    names = [f"n{i}" for i in range(20)]
    a = split_names(names, {"test": 5, "val": 3, "train": None}, seed=1)
    assert [len(a[k]) for k in ("test", "val", "train")] == [5, 3, 12]
    assert sorted(sum(a.values(), [])) == sorted(names)  # every name once: disjoint and complete
    assert a == split_names(list(reversed(names)), {"test": 5, "val": 3, "train": None}, seed=1)  # order-free
    assert a != split_names(names, {"test": 5, "val": 3, "train": None}, seed=2)
    assert len(split_names(names, {"test": 5, "train": 4}, seed=1)["train"]) == 4
    with pytest.raises(DataError, match="20 available"):
        split_names(names, {"test": 15, "train": 6}, seed=0)
    with pytest.raises(DataError, match="duplicate"):
        split_names(["a", "a"], {"test": 1}, seed=0)


def test_asterisk_lid_splits_by_recording(sounds):
    root, doc = sounds
    parts, langs = asterisk_lid(["xx", "yy", "zz"], {"test": 3, "train": 4}, 7, root, doc)
    assert langs == ["xx", "yy", "zz"]
    assert len(parts["test"]) == 9 and len(parts["train"]) == 12
    assert {lab for _, lab in parts["test"]} == {0, 1, 2}
    test_files, train_files = {str(p) for p, _ in parts["test"]}, {str(p) for p, _ in parts["train"]}
    assert not test_files & train_files  # no recording in two splits
    assert all(LANGS[langs[lab]][0] in Path(p).parts for p, lab in parts["test"])
    # seeded; a language's split does not depend on which other languages are listed
    again, _ = asterisk_lid(["xx", "yy", "zz"], {"test": 3, "train": 4}, 7, root, doc)
    assert again == parts
    alone, _ = asterisk_lid(["zz", "yy"], {"test": 3, "train": 4}, 7, root, doc)
    assert {str(p) for p, _ in alone["test"]} == {str(p) for p, lab in parts["test"] if lab > 0}
    other, _ = asterisk_lid(["xx", "yy", "zz"], {"test": 3, "train": 4}, 8, root, doc)
    assert {str(p) for p, _ in other["test"]} != test_files
    # subfolder prompts (digits/1) are recordings like any other
    everything, _ = asterisk_lid(["xx", "yy"], {"test": 2, "train": None}, 0, root, doc)
    assert len(everything["test"]) + len(everything["train"]) == 2 * len(NAMES)
    with pytest.raises(DataError, match="available"):
        asterisk_lid(["xx", "yy"], {"test": 8, "train": 4}, 0, root, doc)
    with pytest.raises(DataError, match="asterisk-core-sounds-qq"):
        asterisk_lid(["xx", "qq"], {"test": 1}, 0, root, doc)


# ----------------------------------------------------------------------------- reference defaults


def _ffn_out(model, layer=0):
    return model.layers[layer].mlp.fc2


def test_reference_defaults_and_widths():
    seq = petl_config({"block": "bottleneck", "placement": "sequential"}, "whisper", d=384)
    assert seq["method"] == "pfeiffer" and seq["residual"] is False and seq["init"] == "zeros"
    assert seq["bottleneck_dim"] == round(384 / REDUCTION_RATES["bottleneck"]) == 6
    par = petl_config({"block": "bottleneck", "adapter_type": "houlsby"}, "whisper", d=512)
    assert par["method"] == "parallel" and par["residual"] is None and par["bottleneck_dim"] == 8
    assert par["positions"] == ["ffn", "attn"]
    conf = petl_config({}, "whisper", d=512)  # the reference's default: Pfeiffer parallel conformer, RR 96
    assert conf["method"] == "conformer" and conf["bottleneck_dim"] == round(512 / 96) == 5
    assert conf["placement"] == "parallel" and conf["residual"] is False
    with_res = petl_config({"block": "bottleneck", "placement": "sequential", "residual": True}, "whisper", d=64)
    assert with_res["residual"] is None  # the bottleneck's own residual: h + A(h)
    assert petl_config({"block": "bottleneck", "residual": True}, "whisper", d=64)["residual"] is True


def test_sequential_without_residual_equals_its_formula():
    """out of the FFN = A(FFN(LN2 h)) (the reference's sequential, apply_residual False), where
    with the residual it is FFN(LN2 h) + A(FFN(LN2 h))."""
    outs = {}
    for residual in (False, True):
        torch.manual_seed(0)
        model = tiny_model("ast")
        raw, final = {}, {}
        _ffn_out(model).register_forward_hook(lambda m, a, o, raw=raw: raw.__setitem__("y", o.detach().clone()))
        adapterkit.add_adapters(model, petl_config({"block": "bottleneck", "placement": "sequential",
                                                    "reduction_rate": 8, "init": "bert", "residual": residual},
                                                   "audio-spectrogram-transformer"))
        _ffn_out(model).register_forward_hook(lambda m, a, o, final=final: final.__setitem__("z", o.detach().clone()))
        model.eval()
        model(**tiny_inputs("ast"))
        ad = get_container(model).sets["pfeiffer"].adapters["layers__0__mlp__fc2"]
        y = raw["y"]
        a = F.gelu(y @ ad.down.weight[0].T + ad.down.bias[0]) @ ad.up.weight[0].T + ad.up.bias[0]
        torch.testing.assert_close(final["z"], (y + a) if residual else a)
        assert a.abs().sum() > 0
        outs[residual] = final["z"]
    assert not torch.allclose(outs[False], outs[True])


def test_parallel_residual_adds_the_ffn_input():
    torch.manual_seed(0)
    model = tiny_model("ast")
    raw, final, inp = {}, {}, {}
    _ffn_out(model).register_forward_hook(lambda m, a, o, raw=raw: raw.__setitem__("y", o.detach().clone()))
    model.layers[0].mlp.register_forward_pre_hook(lambda m, a, k: inp.__setitem__(
        "x", (a[0] if a else k["hidden_states"]).detach().clone()), with_kwargs=True)
    adapterkit.add_adapters(model, petl_config({"block": "bottleneck", "reduction_rate": 8, "init": "bert",
                                                "residual": True}, "audio-spectrogram-transformer"))
    _ffn_out(model).register_forward_hook(lambda m, a, o, final=final: final.__setitem__("z", o.detach().clone()))
    model.eval()
    model(**tiny_inputs("ast"))
    ad = get_container(model).sets["parallel"].adapters["layers__0__mlp__fc2"]
    x = inp["x"]
    a = F.gelu(x @ ad.down.weight[0].T + ad.down.bias[0]) @ ad.up.weight[0].T + ad.up.bias[0]
    torch.testing.assert_close(final["z"], raw["y"] + a + x)


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
def test_all_zero_init_learns_only_the_up_bias(placement):
    """The reference's all-zero bottleneck: zero output at the start, and with GELU(0) = 0 only
    the up-projection bias receives gradient."""
    torch.manual_seed(0)
    model = tiny_model("ast")
    adapterkit.add_adapters(model, petl_config({"block": "bottleneck", "placement": placement, "reduction_rate": 8},
                                               "audio-spectrogram-transformer"))
    model.train()
    model(**tiny_inputs("ast")).last_hidden_state.pow(2).mean().backward()
    for s in get_container(model).sets.values():
        for b in s.adapters.values():
            assert b.down.weight.abs().sum() == 0 and b.up.bias.abs().sum() == 0
            assert b.up.bias.grad.abs().sum() > 0
            for g in (b.down.weight.grad, b.down.bias.grad, b.up.weight.grad):
                assert g is None or g.abs().sum() == 0


def test_bottleneck_method_residual_option_keeps_default_and_errors():
    from adapterkit.methods.bottleneck import BottleneckConfig

    assert BottleneckConfig(method="pfeiffer").residual is None
    with pytest.raises(ConfigError, match="residual"):
        BottleneckConfig(method="pfeiffer", residual="no").validate()
    model = tiny_model("bert")
    adapterkit.add_adapters(model, {"method": "pfeiffer", "reduction_factor": 4, "residual": False, "tasks": ["a", "b"],
                                    "sharing": "per_task"})
    with pytest.raises(ConfigError, match="residual"):
        adapterkit.compose(model, adapterkit.Stack("a", "b"))


def test_petl_config_errors():
    with pytest.raises(ConfigError, match="residual"):
        petl_config({"residual": "yes"}, "whisper")
    with pytest.raises(ConfigError, match="init"):
        petl_config({"block": "conformer", "init": "zeros"}, "whisper")
    with pytest.raises(ConfigError, match="zeros"):
        petl_config({"block": "bottleneck", "init": "zero"}, "whisper")
    with pytest.raises(ConfigError, match="no adapter width"):
        petl_config({"block": "bottleneck", "reduction_rate": 1000}, "whisper", d=384)


# ----------------------------------------------------------------------------- pipeline


def _cfg(sounds, tmp_path, method, adapter=None, **data):
    root, doc = sounds
    return {"data": {"source": "asterisk_lid", "root": str(root), "doc_root": str(doc), "languages": ["xx", "yy", "zz"],
                     "train_per_language": 5, "test_per_language": 3, "clip_seconds": 0.3, **data},
            "model": {"backbone": "whisper", "whisper": TINY_WHISPER, "window_seconds": 0.3},
            "method": method, "adapter": adapter, "train": {"epochs": 2, "batch_size": 5, "seed": 0},
            "output_dir": str(tmp_path / f"run-{method}")}


@pytest.mark.parametrize("method,adapter", [
    ("petl_adapter", {"block": "bottleneck", "placement": "sequential", "reduction_rate": 8}),
    ("petl_adapter", {"block": "conformer", "adapter_type": "houlsby", "reduction_rate": 8, "kernel_size": 3}),
    ("prefix", None),
    ("prompt", {"num_tokens": 2}),
])
def test_lid_end_to_end_tiny_whisper(sounds, tmp_path, method, adapter):
    res = run_audio(_cfg(sounds, tmp_path, method, adapter), log=lambda s: None)
    assert res["n_train"] == 15 and res["n_test"] == 9 and res["classes"] == ["xx", "yy", "zz"]
    assert sorted(set(res["test_labels"])) == [0, 1, 2] and math.isfinite(res["history"][-1]["train_loss"])
    assert 0 < res["trainable_percent"] < 100
    preds = json.loads((tmp_path / f"run-{method}" / "predictions.json").read_text())
    assert len(next(iter(preds.values()))) == 9


def test_linear_probe_trains_the_head_on_cached_pooled_tokens(sounds, tmp_path):
    from adapterkit.audio.models import AudioClassifier, build_audio_backbone
    from adapterkit.audio.pipeline import pooled_tokens

    cfg = _cfg(sounds, tmp_path, "linear_probe")
    res = run_audio(cfg, log=lambda s: None)
    head = 32 * 3 + 3
    assert res["trainable_params"] == head and res["total_params"] > head
    assert math.isclose(res["trainable_percent"], 100 * head / res["total_params"])
    backbone, fam = build_audio_backbone({"backbone": "whisper", "whisper": TINY_WHISPER, "window_seconds": 0.3})
    model = AudioClassifier(backbone, fam, 3)
    x = torch.randn(3, 16, 30)
    torch.testing.assert_close(pooled_tokens(model, x, batch=2), backbone(input_features=x).last_hidden_state.mean(1))


def test_window_seconds_cuts_the_position_table():
    from adapterkit.audio.models import build_audio_backbone

    net, _ = build_audio_backbone({"backbone": "whisper", "whisper": TINY_WHISPER, "window_seconds": 1.5})
    assert net.encoder.embed_positions.weight.shape[0] == 75 and net.config.max_source_positions == 75
    assert net(input_features=torch.randn(1, 16, 150)).last_hidden_state.shape == (1, 75, 32)
    with pytest.raises(ConfigError, match="window_seconds"):
        build_audio_backbone({"backbone": "whisper", "whisper": TINY_WHISPER, "window_seconds": 31})
    with pytest.raises(ConfigError, match="window_seconds"):
        build_audio_backbone({"backbone": "ast", "ast": None, "window_seconds": 1})


def test_lid_config_errors(sounds, tmp_path):
    with pytest.raises(ConfigError, match="at least two languages"):
        run_audio(_cfg(sounds, tmp_path, "full", languages=["xx"]), log=lambda s: None)
    with pytest.raises(ConfigError, match="test_per_language"):
        run_audio(_cfg(sounds, tmp_path, "full", test_per_language=None), log=lambda s: None)
    with pytest.raises(ConfigError, match="train_per_language"):
        run_audio(_cfg(sounds, tmp_path, "full", train_per_language=0), log=lambda s: None)
    with pytest.raises(DataError, match="available"):
        run_audio(_cfg(sounds, tmp_path, "full", train_per_language=9), log=lambda s: None)
    with pytest.raises(ConfigError, match="asterisk_lid"):
        run_audio(_cfg(sounds, tmp_path, "full", source="asterisk_lidd"), log=lambda s: None)


@pytest.mark.slow
def test_installed_asterisk_lid_five_languages():
    try:
        parts, langs = asterisk_lid(sizes={"test": 50, "train": 40}, seed=0)
    except DataError as e:
        pytest.skip(f"asterisk sounds not installed: {e}")
    assert langs == ["en", "es", "fr", "it", "ru"]
    assert len(parts["test"]) == 250 and len(parts["train"]) == 200
    assert not {str(p) for p, _ in parts["test"]} & {str(p) for p, _ in parts["train"]}
