"""Spoken-word category from the Asterisk prompts (data.source asterisk_wordclass): the split
is by prompt name across languages (a test word is test in every language), labels follow the
name patterns, the split is seeded, and the pipeline runs it end to end on a tiny Whisper."""

from __future__ import annotations

import gzip
import math
import wave
from pathlib import Path

import numpy as np
import pytest

from adapterkit.audio.data import WORD_CLASSES, asterisk_word_classes
from adapterkit.audio.pipeline import run_audio
from adapterkit.errors import ConfigError, DataError

VOICES = {"xx": "xx_XX_f_Anna", "yy": "yy_YY_m_Bert"}
NAMES = ([f"digits/{i}" for i in range(6)] + [f"digits/h-{i}" for i in range(1, 5)]
         + [f"digits/day-{i}" for i in range(3)] + ["digits/mon-0"] + [f"letters/{c}" for c in "abcd"]
         + [f"phonetic/{c}_p" for c in "abcd"] + ["digits/hundred", "letters/dash", "hello", "phonetic/zz"])
ONLY_XX = {"digits/5", "letters/d"}  # a name one language lacks
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
    rng = np.random.default_rng(0)
    for li, (lang, voice) in enumerate(VOICES.items()):
        lines = ["; comment", "beep: [beep tone]"]
        for i, name in enumerate(NAMES):
            if lang != "xx" and name in ONLY_XX:
                continue
            n = int(8000 * (0.2 + 0.01 * i))
            t = np.arange(n) / 8000
            _write_wav(tmp_path / "sounds" / voice / f"{name}.wav",
                       0.3 * np.sin(2 * np.pi * (200 + 40 * i + 7 * li) * t) + 0.01 * rng.standard_normal(n))
            lines.append(f"{name}: word {i}")
        doc = tmp_path / "doc" / f"asterisk-core-sounds-{lang}"
        doc.mkdir(parents=True)
        (doc / f"core-sounds-{lang}.txt.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    return tmp_path / "sounds", tmp_path / "doc"


def _name(p: Path) -> str:
    return f"{p.parent.name}/{p.stem}" if p.parent.name in ("digits", "letters", "phonetic") else p.stem


def test_split_by_name_across_languages_and_labels(sounds):
    root, doc = sounds
    parts, classes = asterisk_word_classes(["xx", "yy"], 0.4, 3, root, doc)
    assert classes == [c for c, _ in WORD_CLASSES] == ["number", "ordinal", "calendar", "letter", "phonetic"]
    names = {s: {_name(p) for p, _ in parts[s]} for s in parts}
    assert not names["train"] & names["test"]                   # no word in both splits, in any language
    want_label = {"digits/0": 0, "digits/h-1": 1, "digits/day-0": 2, "digits/mon-0": 2, "letters/a": 3,
                  "phonetic/a_p": 4}
    every = {_name(p): lab for s in parts for p, lab in parts[s]}
    for n, lab in want_label.items():
        assert every[n] == lab
    # names outside the classes are left out; a name is there once per language that has it
    assert not {"digits/hundred", "letters/dash", "hello", "phonetic/zz"} & set(every)
    assert sum(len(v) for v in parts.values()) == 2 * 22 - len(ONLY_XX)
    for s in parts:
        for n in names[s] - ONLY_XX:
            assert {p.parent.parent.name if p.parent.name != "sounds" else "" for p, _ in parts[s] if _name(p) == n} \
                == set(VOICES.values())
    # per class round(0.4 n) test names (at least one in each split)
    per_class = {c: sorted({_name(p) for p, lab in parts["test"] if lab == i}) for i, c in enumerate(classes)}
    assert [len(per_class[c]) for c in classes] == [2, 2, 2, 2, 2]
    again, _ = asterisk_word_classes(["xx", "yy"], 0.4, 3, root, doc)
    assert again == parts
    others = [asterisk_word_classes(["xx", "yy"], 0.4, s, root, doc)[0] for s in (4, 5, 6)]
    assert any({_name(p) for p, _ in o["test"]} != names["test"] for o in others)
    with pytest.raises(DataError, match="test_fraction"):
        asterisk_word_classes(["xx"], 1.0, 0, root, doc)
    with pytest.raises(DataError, match="qq"):
        asterisk_word_classes(["xx", "qq"], 0.4, 0, root, doc)


def test_class_with_one_name_is_an_error(sounds, tmp_path):
    root, doc = sounds
    for p in (root / VOICES["xx"] / "digits").glob("mon-*.wav"):
        p.unlink()
    for p in (root / VOICES["xx"] / "digits").glob("day-*.wav"):
        if p.stem != "day-0":
            p.unlink()
    with pytest.raises(DataError, match="calendar"):
        asterisk_word_classes(["xx"], 0.4, 0, root, doc)


def _cfg(sounds, tmp_path, method, **data):
    root, doc = sounds
    return {"data": {"source": "asterisk_wordclass", "root": str(root), "doc_root": str(doc),
                     "languages": ["xx", "yy"], "clip_seconds": 0.3, **data},
            "model": {"backbone": "whisper", "whisper": TINY_WHISPER, "window_seconds": 0.3},
            "method": method, "train": {"epochs": 1, "batch_size": 8, "seed": 0},
            "output_dir": str(tmp_path / f"run-{method}")}


def test_wordclass_end_to_end_tiny_whisper(sounds, tmp_path):
    res = run_audio(_cfg(sounds, tmp_path, "linear_probe"), log=lambda s: None)
    assert res["classes"] == ["number", "ordinal", "calendar", "letter", "phonetic"]
    assert res["n_train"] + res["n_test"] == 2 * 22 - len(ONLY_XX)
    assert sorted(set(res["test_labels"])) == [0, 1, 2, 3, 4] and math.isfinite(res["history"][-1]["train_loss"])
    with pytest.raises(ConfigError, match="test_fraction"):
        run_audio(_cfg(sounds, tmp_path, "linear_probe", test_fraction=1.5), log=lambda s: None)
