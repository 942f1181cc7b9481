"""Speech recognition on the engine (domain: asr): a tiny random-init Whisper with per-language
adapters on a folder of wav files; the decoder prompt and loss alignment; exact resume after
SIGKILL; 2 processes = 1; the real Whisper tiny.en on the English telephone prompts (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from reliability_helpers import kill_after_checkpoints, torchrun

from adapterkit.audio.asr import ASRDomain, asterisk_splits, load_config
from adapterkit.errors import DataError

ENV = {**os.environ, "ADAPTERKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
WORDS = ["one", "two", "three", "four"]


def _folder(root, sr=8000):
    rng = np.random.default_rng(0)
    for task, base in (("en", 300.0), ("es", 900.0)):
        for split, n in (("train", 8), ("val", 4), ("test", 4)):
            d = root / task
            d.mkdir(parents=True, exist_ok=True)
            rows = []
            for i in range(n):
                k = int(rng.integers(len(WORDS)))
                t = np.arange(int(0.3 * sr)) / sr
                x = 0.4 * np.sin(2 * np.pi * base * (k + 1) * t) + 0.01 * rng.standard_normal(len(t))
                f = d / f"{split}-{i}.wav"
                with wave.open(str(f), "wb") as w:
                    w.setnchannels(1)
                    w.setsampwidth(2)
                    w.setframerate(sr)
                    w.writeframes((np.clip(x, -1, 1) * 32767).astype(np.int16).tobytes())
                rows.append(json.dumps({"audio": f.name, "text": f"{WORDS[k]} {task}"}))
            (d / f"{split}.jsonl").write_text("\n".join(rows) + "\n")


def _cfg(root, **train):
    t = {"epochs": 2, "batch_size": 4, "lr": 1e-2, "checkpoint_every": 2, "warmup_ratio": 0.0}
    t.update(train)
    return {"domain": "asr", "model": {"name_or_path": "tiny-whisper", "audio_seconds": 2},
            "adapters": [{"method": "lora", "r": 4, "sharing": "per_task"}],
            "data": {"source": "folder", "root": str(root), "tasks": ["en", "es"]}, "train": t,
            "eval": {"batch_size": 8, "max_new_tokens": 4, "select_on": "last"}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("asr")
    _folder(root)
    return root


def test_batch_aligns_labels_after_the_language_prompt(data):
    dom = ASRDomain(load_config(_cfg(data)))
    b = dom.train_batch("es", np.arange(4), 0, 0, 1)
    prompt = dom.prompts["es"]
    assert dom.tok.convert_tokens_to_ids("<|es|>") in prompt  # the language token of the task
    assert b["input_features"].shape == (4, 80, 200)  # a 2 s window
    dec, lab = b["decoder_input_ids"][0], b["labels"][0]
    n = int(b["decoder_attention_mask"][0].sum())
    assert dec[:len(prompt)].tolist() == prompt
    assert (lab[:len(prompt) - 1] == -100).all()  # no loss on predicting the prompt itself
    assert lab[len(prompt) - 1:n - 1].tolist() == dec[len(prompt):n].tolist()  # position j predicts token j + 1
    assert lab[n - 1] == dom.eot and (lab[n:] == -100).all()


def test_trains_and_reports_wer_cer(data, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_NO_PROGRESS", "1")
    from adapterkit.audio.asr import build_engine

    res = build_engine(load_config(_cfg(data, epochs=1)), tmp_path / "run").fit()
    for t in ("en", "es"):
        assert res["test"][t]["n"] == 4 and res["test"][t]["WER"] >= 0 and "CER" in res["test"][t]
    assert res["domain"] == "asr" and res["train_sizes"] == {"en": 8, "es": 8}


def test_missing_audio_is_named(tmp_path):
    (tmp_path / "en").mkdir()
    for s in ("train", "val", "test"):
        (tmp_path / "en" / f"{s}.jsonl").write_text('{"audio": "nope.wav", "text": "a"}\n')
    c = _cfg(tmp_path)
    c["data"]["tasks"] = ["en"]
    with pytest.raises(DataError, match="audio file not found: .*nope.wav"):
        ASRDomain(load_config(c))


def _cmd(p, out):
    return [sys.executable, "-m", "adapterkit.cli", "train", str(p), "--output", str(out)]


def test_sigkill_then_rerun_is_bit_identical(data, tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_cfg(data, epochs=3)))
    r = subprocess.run(_cmd(p, tmp_path / "clean"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    kill_after_checkpoints(_cmd(p, tmp_path / "crash"), tmp_path / "crash" / "checkpoints", ENV)
    done = subprocess.run(_cmd(p, tmp_path / "crash"), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0 and "resumed from step" in done.stdout, done.stderr[-2000:]
    from adapterkit.engine.engine import read_trained

    a = read_trained(tmp_path / "clean" / "final")
    b = read_trained(tmp_path / "crash" / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_processes_match_one(data, tmp_path):
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(yaml.safe_dump(_cfg(data, epochs=1, checkpoint_every=100)))
    two.write_text(yaml.safe_dump(_cfg(data, epochs=1, checkpoint_every=100, batch_size=2)))
    r = subprocess.run(_cmd(one, tmp_path / "o1"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(torchrun("-m", "adapterkit.cli", "train", str(two), "--output", str(tmp_path / "o2")),
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]

    def losses(d):
        return [float(x.split(",")[3]) for x in (d / "train_log.csv").read_text().splitlines()[1:]]

    l1, l2 = losses(tmp_path / "o1"), losses(tmp_path / "o2")
    assert len(l1) == len(l2) == 4
    for a, b in zip(l1, l2):
        assert abs(a - b) < 1e-4 * max(1.0, abs(a))


def test_asterisk_splits_are_disjoint_and_seeded():
    pytest.importorskip("adapterkit.audio.data")
    try:
        a = asterisk_splits("en", {"train": 30, "val": 10, "test": 40}, seed=0)
    except DataError as e:
        pytest.skip(f"needs the Debian packages asterisk-core-sounds-en(-wav): {e}")
    ids = {s: {u.uid for u in us} for s, us in a.items()}
    assert len(ids["train"]) == 30 and len(ids["val"]) == 10 and len(ids["test"]) == 40
    assert not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"]) and not (ids["train"] & ids["val"])
    b = asterisk_splits("en", {"train": 30, "val": 10, "test": 40}, seed=0)
    assert [u.uid for u in b["test"]] == [u.uid for u in a["test"]]
    c = asterisk_splits("en", {"train": 30, "val": 10, "test": 40}, seed=1)
    assert [u.uid for u in c["test"]] != [u.uid for u in a["test"]]


def test_asterisk_ids_are_unique_across_subfolders():
    """Prompts with one file name in two folders ("letters/at", "digits/at") are two utterances:
    predictions are keyed by id, so a shared id would score one recording's hypothesis twice."""
    try:
        a = asterisk_splits("en", {"val": 0, "test": 0}, seed=0)
    except DataError as e:
        pytest.skip(f"needs the Debian packages asterisk-core-sounds-en(-wav): {e}")
    us = a["train"]
    stems = [Path(u.audio).stem for u in us]
    assert len({u.uid for u in us}) == len(us) == len({u.audio for u in us})
    if len(set(stems)) == len(stems):
        pytest.skip("this installation has no repeated prompt file names (ids are unique, but trivially)")


def test_duplicate_ids_in_a_dataset_file_are_named(tmp_path):
    (tmp_path / "en").mkdir()
    wav = tmp_path / "en" / "a.wav"
    wav.write_bytes(b"")
    for s in ("train", "val", "test"):
        (tmp_path / "en" / f"{s}.jsonl").write_text('{"id": "u1", "audio": "a.wav", "text": "a"}\n' * 2)
    c = _cfg(tmp_path)
    c["data"]["tasks"] = ["en"]
    with pytest.raises(DataError, match="duplicate id 'u1'"):
        ASRDomain(load_config(c))
