"""Audio classification pipeline: waveform -> log-mel features -> AST / Whisper encoder ->
mean-pooled tokens -> head, with PETL-AST adapter configurations.

Config (YAML) sections::

    data:   {source: esc50|speech_commands|folder|asterisk|asterisk_lid|asterisk_wordclass, root, test_folds,
             words, subdir, clip_seconds, sample_rate, train_copies, test_copies, snr_db, speed, shift_ms,
             gain_db, max_per_class, seed, languages, train_per_language, test_per_language, test_fraction,
             doc_root}
    model:  {backbone: ast|whisper|hf, name_or_path, ast: {ASTConfig kwargs},
             whisper: {WhisperConfig kwargs}, init_seed, window_seconds}
    method: petl_adapter | lora | prompt | prefix | linear_probe | full | <any adapterkit method>
    adapter: {adapter_type: pfeiffer|houlsby, placement: parallel|sequential,
              block: bottleneck|conformer, reduction_rate, residual, init, ...} (petl_adapter)
    train:  {epochs, batch_size, optimizer: adamw, lr: 5e-3, betas: [0.9, 0.98], weight_decay: 0.1, ...}
    output_dir: the run folder: results.json, final/ and best/ (adapters + trainable.safetensors), checkpoints/

``asterisk`` / ``folder`` sources hold few recordings, so each clip is expanded into
``train_copies`` augmented training clips and ``test_copies`` differently augmented test
clips (speed, shift, gain, white noise): a smoke test, not a speaker-independent split.

``asterisk_lid`` is spoken-language identification over the Asterisk prompts of
``languages`` (default en, es, fr, it, ru; ``root``: the sounds folder): per language a seeded
permutation of the prompt names (transcripts under ``doc_root``, default /usr/share/doc) gives ``test_per_language`` test and ``train_per_language``
training recordings (None: the rest), so no recording is in two splits; validation
selection (``train.val_fraction``) holds out part of the training recordings. Clips are cut
or zero-padded to ``clip_seconds`` (default 2 s). Each language has one voice, so the
label also identifies the speaker.

``asterisk_wordclass`` is spoken-word category (number, ordinal, weekday/month, letter,
spelling-alphabet word) over the same prompts of ``languages``: the split is by prompt name
across languages (``test_fraction`` of each class's names, seeded), so a test word is never
heard in training in any language; every class is read by every voice. Clips as asterisk_lid.

``model.window_seconds`` cuts Whisper's 30 s input window (its position table) to the clip
length: the encoder then runs on clip_seconds x 50 tokens instead of 1500.

``linear_probe`` trains the head on the frozen encoder's mean-pooled tokens, computed once
(the encoder in eval mode is a fixed function, so this equals training the whole model).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from adapterkit.audio.data import (
    ASTERISK_DIR,
    ASTERISK_DOCS,
    ASTERISK_SOUNDS,
    DIGIT_WORDS,
    LID_LANGUAGES,
    asterisk_lid,
    asterisk_word_classes,
    asterisk_words,
    augment,
    load_clip,
    load_esc50,
    load_label_folders,
    load_speech_commands,
)
from adapterkit.audio.fbank import ast_features
from adapterkit.audio.models import AudioClassifier, attach_audio_method, build_audio_backbone
from adapterkit.errors import ConfigError, did_you_mean
from adapterkit.vision.common import (
    TRAIN_DEFAULTS,
    method_name,
    section,
    top_level,
    write_outputs,
)
from adapterkit.vision.domain import train_classifier

DATA_DEFAULTS = {"source": "asterisk", "root": None, "test_folds": [5], "words": None, "subdir": "digits",
                 "clip_seconds": None, "sample_rate": 16000, "train_copies": 0, "test_copies": 0,
                 "snr_db": [5.0, 30.0], "speed": [0.85, 1.15], "shift_ms": 150.0, "gain_db": [-6.0, 6.0],
                 "max_per_class": None, "seed": 0, "languages": None, "train_per_language": 40,
                 "test_per_language": 50, "test_fraction": 0.4, "doc_root": None}
MODEL_DEFAULTS = {"backbone": "ast", "name_or_path": None, "ast": None, "whisper": None, "init_seed": 0,
                  "window_seconds": None}
SOURCES = ("esc50", "speech_commands", "folder", "asterisk", "asterisk_lid", "asterisk_wordclass")
AUDIO_TRAIN_DEFAULTS = {**TRAIN_DEFAULTS, "optimizer": "adamw", "lr": 5e-3, "betas": [0.9, 0.98],
                        "weight_decay": 0.1, "warmup_epochs": 0.0}
TOP_KEYS = ("domain", "data", "model", "method", "adapter", "train", "output_dir", "name")


def _items(d: dict):
    src = d["source"]
    if src == "esc50":
        if not d["root"]:
            raise ConfigError('data.source "esc50" needs "data.root" (the folder with meta/ and audio/)')
        train, test, names = load_esc50(d["root"], d["test_folds"])
        return train, test, names, 5.0
    if src == "speech_commands":
        if not d["root"]:
            raise ConfigError('data.source "speech_commands" needs "data.root"')
        train, _val, test, names = load_speech_commands(d["root"], d["words"])
        return train, test, names, 1.0
    if src == "folder":
        if not d["root"]:
            raise ConfigError('data.source "folder" needs "data.root" (root/<label>/*.wav)')
        items, names = load_label_folders(d["root"], d["words"])
        return items, items, names, 1.0
    if src == "asterisk":
        items, names = asterisk_words(d["root"] or ASTERISK_DIR, d["words"] or list(DIGIT_WORDS), d["subdir"])
        return items, items, names, 1.0
    if src in ("asterisk_lid", "asterisk_wordclass"):
        langs = d["languages"] if d["languages"] is not None else list(LID_LANGUAGES)
        least = 2 if src == "asterisk_lid" else 1
        if not isinstance(langs, (list, tuple)) or len(langs) < least:
            raise ConfigError(f'"data.languages" must list at least {"two languages" if least == 2 else "one language"}'
                              f", got {langs!r}")
    if src == "asterisk_wordclass":
        tf = d["test_fraction"]
        if isinstance(tf, bool) or not isinstance(tf, (int, float)) or not 0 < tf < 1:
            raise ConfigError(f'"data.test_fraction" must be a number in (0, 1), got {tf!r}')
        parts, names = asterisk_word_classes(langs, float(tf), int(d["seed"]), d["root"] or ASTERISK_SOUNDS,
                                             d["doc_root"] or ASTERISK_DOCS)
        return parts["train"], parts["test"], names, 2.0
    if src == "asterisk_lid":
        sizes = {}
        for k in ("test_per_language", "train_per_language"):
            v = d[k]
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f'"data.{k}" must be a positive integer (or null: the rest), got {v!r}')
            sizes[k.split("_")[0]] = v
        if sizes["test"] is None:
            raise ConfigError('"data.test_per_language" must be set (the training split takes the rest)')
        parts, names = asterisk_lid(langs, sizes, int(d["seed"]), d["root"] or ASTERISK_SOUNDS,
                                    d["doc_root"] or ASTERISK_DOCS)
        return parts["train"], parts["test"], names, 2.0
    raise ConfigError(f'"data.source" must be one of {", ".join(SOURCES)}; got "{src}"{did_you_mean(str(src), SOURCES)}')


def _cap(items: list, per_class: int | None, rng: np.random.Generator) -> list:
    if per_class is None:
        return items
    order = rng.permutation(len(items))
    seen: dict[int, int] = {}
    out = []
    for i in order:
        lab = items[i][1]
        if seen.get(lab, 0) < per_class:
            seen[lab] = seen.get(lab, 0) + 1
            out.append(items[i])
    return out


def build_waveforms(d: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Fixed-length train/test waveforms (augmented copies where asked) and labels."""
    train, test, names, default_len = _items(d)
    sr = d["sample_rate"]
    n = int(round((d["clip_seconds"] or default_len) * sr))
    rng = np.random.default_rng(d["seed"])
    train, test = _cap(train, d["max_per_class"], rng), _cap(test, d["max_per_class"], rng)
    same = train is test or d["source"] in ("asterisk", "folder")
    if same and (d["train_copies"] < 1 or d["test_copies"] < 1):
        raise ConfigError(f'data.source "{d["source"]}" has one pool of recordings: set data.train_copies and '
                          "data.test_copies (augmented copies) >= 1")
    cache: dict = {}

    def clip(path):
        if path not in cache:
            cache[path] = load_clip(path, sr, n)
        return cache[path]

    def expand(items, copies, seed):
        r = np.random.default_rng(seed)
        if copies < 1:
            return np.stack([clip(p) for p, _ in items]), np.array([lab for _, lab in items])
        waves, labels = [], []
        shift = int(d["shift_ms"] * sr / 1000)
        for p, lab in items:
            for _ in range(copies):
                waves.append(augment(clip(p), r, n, _pair(d["snr_db"]), _pair(d["speed"]), shift, _pair(d["gain_db"])))
                labels.append(lab)
        return np.stack(waves), np.array(labels)

    xtr, ytr = expand(train, d["train_copies"], d["seed"] * 2 + 1)
    xte, yte = expand(test, d["test_copies"], d["seed"] * 2 + 2)
    return xtr, ytr, xte, yte, names


def _pair(v):
    return None if v is None else (float(v[0]), float(v[1]))


def featurize(waves: np.ndarray, family: str, backbone, sample_rate: int, batch: int = 64) -> torch.Tensor:
    """AST: Kaldi fbank (num_mel_bins of the config), padded to its max_length, normalised.
    Whisper: the transformers WhisperFeatureExtractor log-mel, padded to 2 x max_source_positions frames."""
    cfg = backbone.config
    if family == "ast":
        out = [ast_features(torch.from_numpy(waves[i:i + batch]), sample_rate, cfg.num_mel_bins, cfg.max_length)
               for i in range(0, len(waves), batch)]
        return torch.cat(out)
    from transformers import WhisperFeatureExtractor

    frames = 2 * cfg.max_source_positions
    fe = WhisperFeatureExtractor(feature_size=cfg.num_mel_bins, sampling_rate=sample_rate,
                                 chunk_length=max(1, frames // 100))
    fe.n_samples = frames * fe.hop_length
    fe.nb_max_frames = frames
    feats = fe(list(waves), sampling_rate=sample_rate, return_tensors="np")["input_features"]
    return torch.from_numpy(np.ascontiguousarray(feats[..., :frames])).float()


def run_audio(config: dict, log=print, max_steps: int | None = None, allow_changes=()) -> dict:
    top_level(config, TOP_KEYS, "audio")
    d = section(config.get("data"), DATA_DEFAULTS, "data")
    m = section(config.get("model"), MODEL_DEFAULTS, "model")
    t = section(config.get("train"), AUDIO_TRAIN_DEFAULTS, "train")
    method = method_name(config, "petl_adapter")
    t0 = time.time()
    backbone, family = build_audio_backbone(m)
    xtr, ytr, xte, yte, names = build_waveforms(d)
    ftr = featurize(xtr, family, backbone, d["sample_rate"])
    fte = featurize(xte, family, backbone, d["sample_rate"])
    feat_s = time.time() - t0
    full = attach_audio_method(backbone, family, method, config.get("adapter"))
    model = AudioClassifier(backbone, family, len(names))
    log(f"audio: {method} on {family}, {len(ftr)} train / {len(fte)} test clips, {len(names)} classes, "
        f"features {tuple(ftr.shape[1:])} in {feat_s:.1f}s")
    ident = {"data": d, "model": m, "method": method, "adapter": config.get("adapter")}
    kw = {"output_dir": config.get("output_dir"), "max_steps": max_steps, "allow_changes": allow_changes,
          "identity": ident}
    ytr_t, yte_t = torch.from_numpy(ytr).long(), torch.from_numpy(yte).long()
    if method == "linear_probe":  # the frozen encoder once; the head trains on its pooled tokens
        t1 = time.time()
        ptr, pte = pooled_tokens(model, ftr), pooled_tokens(model, fte)
        log(f"linear probe: pooled encoder tokens {tuple(ptr.shape)} in {time.time() - t1:.1f}s")
        probe = _Head(model.head)
        res = train_classifier(probe, probe, True, (ptr, ytr_t), (pte, yte_t), t, lambda x, training: x, log, **kw)
        total = sum(p.numel() for p in model.parameters())
        res.update({"total_params": total, "trainable_percent": 100.0 * res["trainable_params"] / total})
    else:
        res = train_classifier(model, backbone, full, (ftr, ytr_t), (fte, yte_t), t, lambda x, training: x, log, **kw)
    res.update({"method": method, "adapter": config.get("adapter"), "backbone": m["backbone"], "classes": names,
                "n_train": len(ftr), "n_test": len(fte), "test_labels": yte.tolist(), "feature_seconds": round(feat_s, 2),
                "wall_seconds": round(time.time() - t0, 2)})
    write_outputs(config.get("output_dir"), model, res, config, weights=False)  # the engine wrote final/
    return res


class _Head(torch.nn.Module):
    """The classifier's head alone (parameter names as in the full classifier: ``head.*``)."""

    def __init__(self, head: torch.nn.Module):
        super().__init__()
        self.head = head

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(pooled)


@torch.no_grad()
def pooled_tokens(model: AudioClassifier, feats: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """The frozen encoder's mean-pooled tokens (eval mode), batch by batch."""
    was = model.backbone.training
    model.backbone.eval()
    try:
        out = []
        for i in range(0, len(feats), batch):
            x = feats[i:i + batch]
            h = (model.backbone(input_features=x) if model.family == "whisper" else model.backbone(input_values=x))
            out.append(h.last_hidden_state.mean(1))
        return torch.cat(out) if out else feats.new_zeros(0, model.head.in_features)
    finally:
        model.backbone.train(was)


def run_training(config, output_dir, max_steps: int | None = None, allow_changes=()) -> dict:
    """``adapterkit train CONFIG --output DIR`` for ``domain: audio``: the run folder is DIR
    (a rerun resumes from its newest checkpoint)."""
    from adapterkit.text.config import read_config_dict

    cfg = dict(read_config_dict(config) if not isinstance(config, dict) else config)
    cfg["output_dir"] = str(output_dir)
    return run_audio(cfg, max_steps=max_steps, allow_changes=allow_changes)
