"""Speech recognition on the training engine: Whisper (or any HF speech seq2seq model) with
adapters, one task per language (``domain: asr``).

```yaml
domain: asr
model: {name_or_path: whisper-base, audio_seconds: 10}   # whisper-tiny.en | whisper-base | a folder | tiny-whisper
adapters: [{method: houlsby, reduction_factor: 16, sharing: per_task}]   # language adapters
data: {source: asterisk, tasks: [es, fr], train_per_task: 80, val_per_task: 20, test_per_task: 100, seed: 0}
train: {epochs: 10, batch_size: 8, lr: 1.0e-3}
eval: {batch_size: 16, max_new_tokens: 48}
```

Data: ``source: asterisk`` reads the Debian telephone prompts of each task's language
(``asterisk-core-sounds-<lang>(-wav)``: recording + transcript), split by a seeded
permutation of the prompt names into disjoint test / val / train sets (no recording in two
splits; ``train_per_task`` sets the low-resource size); ``source: folder`` reads
``ROOT/<task>/<split>.jsonl`` with ``{"audio": "path.wav", "text": "..."}`` (paths relative
to the file). Each task's ``language`` (Whisper's language token) defaults to the task name;
an English-only model (``*.en``) takes none.

Training: teacher-forced cross-entropy on the transcript tokens after Whisper's decoder
prompt (``<|startoftranscript|><|lang|><|transcribe|><|notimestamps|>``); prediction is
greedy (or beam) decoding from that prompt. Metrics: corpus WER and CER (percent, with the
test size); selection maximises ``100 - WER``. ``model.audio_seconds`` below 30 shortens
Whisper's 30 s input window (the encoder's position table is cut to match): 3x cheaper at
10 s on short prompts, at some cost in accuracy against the full window (measure it:
``audio_seconds: 30`` is the model as trained).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import adapterkit
from adapterkit.core.config import bounded, check_name, choice
from adapterkit.engine.config import EvalConfig, TrainConfig
from adapterkit.engine.domain import Domain
from adapterkit.errors import ConfigError, DataError, did_you_mean

SAMPLE_RATE = 16000


@dataclass
class ASRModelConfig:
    name_or_path: str = "whisper-base"   # whisper-tiny.en | whisper-base | a CTranslate2 / HF folder | tiny-whisper
    audio_seconds: float = bounded(30.0, lo=1.0, hi=30.0)  # Whisper's input window (30: as trained)
    whisper: dict = field(default_factory=dict)  # WhisperConfig kwargs of a random-init tiny-whisper
    max_target_length: int = bounded(64, lo=1, hi=448)
    init_seed: int = bounded(0, lo=0, hi=2**63 - 1)


@dataclass
class ASRDataConfig:
    source: str = choice("asterisk", "folder", default="asterisk")
    root: str = ""                 # folder: ROOT/<task>/<split>.jsonl; asterisk: the sounds folder (default: Debian's)
    tasks: list[str] = field(default_factory=lambda: ["en"])
    language: dict = field(default_factory=dict)   # {task: Whisper language code}; default: the task name
    train_per_task: int | None = bounded(None, lo=1, hi=10**7)
    val_per_task: int = bounded(20, lo=1, hi=10**7)
    test_per_task: int = bounded(100, lo=1, hi=10**7)
    seed: int = bounded(0, lo=0, hi=2**32 - 1)      # the asterisk split's permutation

    def validate(self):
        if not self.tasks:
            raise ConfigError("data.tasks must list at least one task (a language)")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"data.tasks has duplicates: {self.tasks}")
        for t in self.tasks:
            check_name(t, "data.tasks: task")
        for t in self.language:
            if t not in self.tasks:
                raise ConfigError(f'data.language["{t}"]: not one of data.tasks {self.tasks}{did_you_mean(t, self.tasks)}')


@dataclass
class ASREvalConfig(EvalConfig):
    batch_size: int = bounded(16, lo=1, hi=65536)
    max_new_tokens: int = bounded(48, lo=1, hi=448)


@dataclass
class ASRRunConfig:
    domain: str = "asr"
    model: ASRModelConfig = field(default_factory=ASRModelConfig)
    preset: str | None = None
    adapters: list[dict] | None = None
    data: ASRDataConfig = field(default_factory=ASRDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: ASREvalConfig = field(default_factory=ASREvalConfig)
    name: str = "run"
    init_from: str | None = None   # a run folder (or its final/ or best/) whose trained weights to start from

    def validate(self):
        from adapterkit.text.config import TextRunConfig

        if self.domain != "asr":
            raise ConfigError(f'an ASR run config has domain "asr", got {self.domain!r}')
        check_name(self.name, "name: the run name")
        TextRunConfig.validate_adapters(self)

    def adapter_configs(self):
        from adapterkit.text.config import TextRunConfig

        return TextRunConfig.adapter_configs(self)


def load_config(src) -> ASRRunConfig:
    from adapterkit.core.config import dataclass_from_dict
    from adapterkit.text.config import read_config_dict

    return dataclass_from_dict(ASRRunConfig, read_config_dict(src) if not isinstance(src, dict) else src)


# ----------------------------------------------------------------------------- data

@dataclass
class Utterance:
    uid: str
    audio: str
    text: str


def asterisk_splits(lang: str, sizes: dict[str, int | None], seed: int, root: str | None = None) -> dict:
    """{split: [Utterance]}: the prompts of one language, split by a seeded permutation of
    their names (each recording in one split): test first, then val, then train (the rest,
    or ``sizes['train']`` of it)."""
    from adapterkit.audio.data import ASTERISK_SOUNDS, asterisk_prompts, asterisk_voice_dir

    items = asterisk_prompts(lang, root or ASTERISK_SOUNDS)
    voice = asterisk_voice_dir(lang, root or ASTERISK_SOUNDS)
    perm = np.random.default_rng(seed).permutation(len(items))
    n_test, n_val = sizes["test"], sizes["val"]
    if n_test + n_val >= len(items):
        raise DataError(f"language {lang!r} has {len(items)} prompts: test {n_test} + val {n_val} leave none to train on")
    parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    if sizes.get("train"):
        parts["train"] = parts["train"][: sizes["train"]]
    def uid(path: Path) -> str:  # the path under the voice folder: "digits/1" and "1" are two prompts
        rel = path.relative_to(voice) if path.is_relative_to(voice) else Path(path.name)
        return f"{lang}/{rel.with_suffix('').as_posix()}"

    return {s: [Utterance(uid(items[i][0]), str(items[i][0]), items[i][1]) for i in idx]
            for s, idx in parts.items()}


def folder_split(root, task: str, split: str) -> list[Utterance]:
    f = Path(root) / task / f"{split}.jsonl"
    if not f.is_file():
        raise DataError(f"missing dataset file {f}")
    out, seen = [], {}
    for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{f}:{i}: not a JSON object ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("audio"), str) or not isinstance(row.get("text"), str):
            raise DataError(f'{f}:{i}: a row needs "audio" (a path) and "text" (the transcript) strings')
        path = (f.parent / row["audio"]) if not os.path.isabs(row["audio"]) else Path(row["audio"])
        if not path.is_file():
            raise DataError(f"{f}:{i}: audio file not found: {path}")
        uid = str(row.get("id", f"{task}/{split}-{i}"))
        if uid in seen:
            raise DataError(f'{f}:{i}: duplicate id {uid!r} (first on line {seen[uid]}); ids must be unique')
        seen[uid] = i
        out.append(Utterance(uid, str(path), row["text"]))
    if not out:
        raise DataError(f"{f} holds no utterances")
    return out


# ----------------------------------------------------------------------------- the model

def tiny_whisper(options: dict, transcripts: list[str], seed: int = 0):
    """(model, tokenizer, feature extractor): a random-init Whisper over a word vocabulary of the
    transcripts with Whisper's special tokens (tests, smoke runs)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from adapterkit.vl.build import word_tokenizer

    tok = word_tokenizer(transcripts)
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|transcribe|>", "<|notimestamps|>", "<|en|>", "<|es|>",
                "<|fr|>", "<|it|>", "<|ru|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token = "<|endoftext|>"
    tok.pad_token = "<|endoftext|>"
    base = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
            "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_mel_bins": 80,
            "max_source_positions": 1500, "max_target_positions": 128, "dropout": 0.0}
    base.update(options or {})
    eot, sot = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|startoftranscript|>")
    cfg = WhisperConfig(vocab_size=len(tok), pad_token_id=eot, eos_token_id=eot, bos_token_id=eot,
                        decoder_start_token_id=sot, **base)
    torch.manual_seed(seed)
    return WhisperForConditionalGeneration(cfg), tok, WhisperFeatureExtractor(feature_size=cfg.num_mel_bins)


def shorten_window(model, fe, seconds: float) -> None:
    """Whisper's input window cut to ``seconds`` (frames = seconds * 100; the encoder's
    position table keeps its first frames / 2 rows)."""
    frames = int(round(seconds * 100))
    frames -= frames % 2
    enc = model.get_encoder()
    pos = frames // 2
    if pos < enc.embed_positions.weight.shape[0]:
        old = enc.embed_positions
        new = torch.nn.Embedding(pos, old.weight.shape[1])
        new.weight.data.copy_(old.weight.data[:pos])
        new.weight.requires_grad_(False)
        enc.embed_positions = new
        model.config.max_source_positions = pos
        enc.config.max_source_positions = pos
    fe.n_samples = frames * fe.hop_length
    fe.nb_max_frames = frames


class ASRDomain(Domain):
    name = "asr"

    def __init__(self, cfg: ASRRunConfig, model=None, tokenizer=None, feature_extractor=None):
        from adapterkit.audio.data import load_clip

        self.cfg = cfg
        d = cfg.data
        self.tasks = list(d.tasks)
        self.utts: dict[tuple[str, str], list[Utterance]] = {}
        for t in self.tasks:
            if d.source == "asterisk":
                lang = d.language.get(t, t)
                parts = asterisk_splits(lang, {"train": d.train_per_task, "val": d.val_per_task,
                                               "test": d.test_per_task}, d.seed, d.root or None)
            else:
                parts = {s: folder_split(d.root, t, s) for s in ("train", "val", "test")}
                if d.train_per_task:
                    parts["train"] = parts["train"][: d.train_per_task]
            for s, u in parts.items():
                self.utts[(t, s)] = u
        m = cfg.model
        if model is None:
            if m.name_or_path == "tiny-whisper":
                model, tokenizer, feature_extractor = tiny_whisper(
                    m.whisper, [u.text for us in self.utts.values() for u in us], m.init_seed)
            else:
                from adapterkit.audio.whisper import load_whisper

                model, tokenizer, feature_extractor = load_whisper(m.name_or_path)
        self.tok, self.fe = tokenizer, feature_extractor
        if m.audio_seconds < 30:
            shorten_window(model, self.fe, m.audio_seconds)
        self.multilingual = not m.name_or_path.endswith(".en") and \
            self.tok.convert_tokens_to_ids("<|en|>") not in (None, self.tok.unk_token_id)
        from adapterkit.audio.whisper import decoder_prompt

        self.prompts = {t: decoder_prompt(self.tok, d.language.get(t, t) if self.multilingual else None)
                        for t in self.tasks}
        self.eot = self.tok.convert_tokens_to_ids("<|endoftext|>")
        n = int(self.fe.n_samples)
        self.features: dict[tuple[str, str], torch.Tensor] = {}
        for key, us in self.utts.items():  # the frozen front end, once: log-mel features of every clip
            waves = [load_clip(u.audio, SAMPLE_RATE, min(n, _length(u.audio))) for u in us]
            feats = self.fe(waves, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"]
            self.features[key] = torch.from_numpy(np.ascontiguousarray(feats[..., : self.fe.nb_max_frames])).float()
        for a in cfg.adapter_configs():
            a = dict(a)
            a.setdefault("tasks", list(self.tasks))
            adapterkit.add_adapters(model, a, name=a.pop("name", None))
        self.model = model
        self.routed = adapterkit.core.base.get_container(model) is not None
        if cfg.init_from:
            load_trainable(model, cfg.init_from)

    # --- the engine's interface ----------------------------------------------------------------
    def num_train(self, task):
        return len(self.utts[(task, "train")])

    def _route(self, task_index):
        import contextlib

        return adapterkit.route(self.tasks[task_index]) if self.routed else contextlib.nullcontext()

    def train_batch(self, task, rows, seed, rank, world):
        rows = np.asarray(rows)[rank::world]
        us = [self.utts[(task, "train")][i] for i in rows]
        feats = self.features[(task, "train")][torch.from_numpy(rows.astype(np.int64))]
        prompt = self.prompts[task]
        ids = self.tok([" " + u.text.strip() for u in us], add_special_tokens=False, truncation=True,
                       max_length=self.cfg.model.max_target_length)["input_ids"]
        seqs = [prompt + x for x in ids]
        n = max(map(len, seqs))
        dec = torch.full((len(seqs), n), self.eot, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        labels = torch.full((len(seqs), n), -100, dtype=torch.long)
        for i, s in enumerate(seqs):  # position j predicts token j + 1; the last real position predicts <|endoftext|>
            dec[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
            labels[i, len(prompt) - 1:len(s) - 1] = torch.tensor(s[len(prompt):])
            labels[i, len(s) - 1] = self.eot
        return {"input_features": feats, "decoder_input_ids": dec, "decoder_attention_mask": mask, "labels": labels}

    def loss(self, batch, task_index):
        with self._route(task_index):
            loss = self.model(**batch).loss
        c = adapterkit.core.base.get_container(self.model)
        for s in (c.sets.values() if c is not None else ()):  # a method's own loss terms (sim_adapter)
            if hasattr(s, "training_loss"):
                loss = loss + s.training_loss()
        return loss

    def eval_size(self, task, split):
        return len(self.utts[(task, split)])

    def predict_batch(self, task, split, rows):
        from transformers.generation import GenerationMixin

        rows = np.asarray(rows, dtype=np.int64)
        dev = next(self.model.parameters()).device
        feats = self.features[(task, split)][torch.from_numpy(rows)].to(dev)
        prompt = self.prompts[task]
        dec = torch.tensor([prompt] * len(rows), device=dev)
        ev = self.cfg.eval
        with self._route(self.tasks.index(task)):
            # the plain greedy / beam search (Whisper's own generate() wants a hub generation config)
            out = GenerationMixin.generate(self.model, input_features=feats, decoder_input_ids=dec,
                                           decoder_attention_mask=torch.ones_like(dec), do_sample=False,
                                           num_beams=ev.num_beams, max_new_tokens=ev.max_new_tokens,
                                           eos_token_id=self.eot, pad_token_id=self.eot)
        texts = self.tok.batch_decode(out[:, len(prompt):], skip_special_tokens=True)
        us = self.utts[(task, split)]
        return {us[i].uid: t.strip() for i, t in zip(rows.tolist(), texts)}

    def score(self, task, split, predictions):
        from adapterkit.audio.asr_metrics import corpus_rate_interval, error_counts

        us = self.utts[(task, split)]
        refs, hyps = [u.text for u in us], [predictions[u.uid] for u in us]
        out = {"n": len(us)}
        for unit, name in (("word", "WER"), ("char", "CER")):
            e, n = error_counts(refs, hyps, unit)
            rate = float(e.sum() / max(int(n.sum()), 1)) * 100
            iv = corpus_rate_interval(e, n)
            out[name] = rate
            if iv.low is not None and iv.high is not None:
                out[f"{name}_ci95"] = [float(iv.low) * 100, float(iv.high) * 100]
        return out

    def main_score(self, metrics):
        return 100.0 - float(metrics["WER"])

    def identity(self):
        c = self.cfg
        return {"model": dataclasses.asdict(c.model), "preset": c.preset, "adapters": c.adapter_configs(),
                "data": dataclasses.asdict(c.data), "init_from": c.init_from}

    def results(self):
        return {"test_sizes": {t: len(self.utts[(t, "test")]) for t in self.tasks},
                "train_sizes": {t: len(self.utts[(t, "train")]) for t in self.tasks}}


def _length(path) -> int:
    """Samples of a clip at 16 kHz (to pad each clip only to its own length before the front end)."""
    from adapterkit.audio.data import read_wav

    x, sr = read_wav(path)
    return max(1, int(round(len(x) * SAMPLE_RATE / sr)))


def load_trainable(model, src) -> None:
    """Copy the trained weights of an engine run (its folder, or its final/ or best/) into
    ``model``: names must match (a subset is fine)."""
    from adapterkit.engine.engine import TRAINABLE_FILE, read_trained

    p = Path(src)
    for cand in (p, p / "final"):
        if (cand / TRAINABLE_FILE).is_file():
            p = cand
            break
    else:
        raise ConfigError(f"init_from {src}: no trained run there (a run folder, or its final/ or best/)")
    state = read_trained(p)
    own = dict(model.named_parameters())
    unknown = [k for k in state if k not in own]
    if unknown:
        raise ConfigError(f"init_from {p}: {len(unknown)} tensors have no parameter here (e.g. {unknown[0]!r})")
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise ConfigError(f"init_from {p}: {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}")
            own[k].copy_(v)


def build_engine(cfg: ASRRunConfig, output_dir, max_steps=None, allow_changes=(), model=None, tokenizer=None,
                 feature_extractor=None):
    from adapterkit.engine import Engine

    Engine.seed_all(cfg.train.seed)
    domain = ASRDomain(cfg, model, tokenizer, feature_extractor)
    lr = cfg.train.lr or (1e-5 if not cfg.adapter_configs() else 1e-3)
    return Engine(domain, cfg.train, cfg.eval, output_dir, name=cfg.name, config=cfg, max_steps=max_steps,
                  allow_changes=allow_changes, lr=lr)
