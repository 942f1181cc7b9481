"""Tiny random-init HF models of every profiled family, and matching inputs."""

from __future__ import annotations

import torch
import transformers as tf

H, FF, HEADS, V = 32, 64, 2, 101


def _cfg(family: str):
    if family == "bart":
        return tf.BartConfig(vocab_size=V, d_model=H, encoder_layers=2, decoder_layers=2, encoder_attention_heads=HEADS,
                             decoder_attention_heads=HEADS, encoder_ffn_dim=FF, decoder_ffn_dim=FF,
                             max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                             decoder_start_token_id=2, forced_eos_token_id=None), tf.BartForConditionalGeneration
    if family == "t5":
        return tf.T5Config(vocab_size=V, d_model=H, d_kv=16, d_ff=FF, num_layers=2, num_decoder_layers=2, num_heads=HEADS,
                           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1), tf.T5ForConditionalGeneration
    if family == "bert":
        return tf.BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS,
                             intermediate_size=FF, max_position_embeddings=64), tf.BertModel
    if family == "roberta":
        return tf.RobertaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS,
                                intermediate_size=FF, max_position_embeddings=70, pad_token_id=1), tf.RobertaModel
    if family == "vit":
        return tf.ViTConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=FF,
                            image_size=16, patch_size=8, num_channels=3), tf.ViTModel
    if family == "ast":
        return tf.ASTConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=FF,
                            num_mel_bins=16, max_length=16, patch_size=8, frequency_stride=8, time_stride=8), tf.ASTModel
    if family == "clip_vision":
        return tf.CLIPVisionConfig(hidden_size=H, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=HEADS,
                                   image_size=16, patch_size=8), tf.CLIPVisionModel
    if family == "clip_text":
        return tf.CLIPTextConfig(vocab_size=V, hidden_size=H, intermediate_size=FF, num_hidden_layers=2,
                                 num_attention_heads=HEADS, max_position_embeddings=32, bos_token_id=0, eos_token_id=2,
                                 pad_token_id=1), tf.CLIPTextModel
    if family == "whisper":
        return tf.WhisperConfig(vocab_size=V, d_model=H, encoder_layers=2, decoder_layers=2, encoder_attention_heads=HEADS,
                                decoder_attention_heads=HEADS, encoder_ffn_dim=FF, decoder_ffn_dim=FF, num_mel_bins=8,
                                max_source_positions=8, max_target_positions=16, pad_token_id=1, bos_token_id=0,
                                eos_token_id=2, decoder_start_token_id=0, suppress_tokens=[], begin_suppress_tokens=[]), \
            tf.WhisperModel
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=HEADS, n_positions=64, bos_token_id=0,
                             eos_token_id=2, pad_token_id=1), tf.GPT2LMHeadModel
    if family == "llama":
        return tf.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=FF, num_hidden_layers=2,
                              num_attention_heads=HEADS, num_key_value_heads=1, max_position_embeddings=64,
                              bos_token_id=0, eos_token_id=2, pad_token_id=1), tf.LlamaForCausalLM
    raise KeyError(family)


TINY_FAMILIES = ("bart", "t5", "bert", "roberta", "vit", "ast", "clip_vision", "clip_text", "whisper", "gpt2", "llama")


def tiny_model(family: str, seed: int = 0):
    cfg, cls = _cfg(family)
    torch.manual_seed(seed)
    model = cls(cfg)
    model.eval()
    return model


def tiny_inputs(family: str, batch: int = 3, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (batch, 7), generator=g)
    mask = torch.ones_like(ids)
    if family in ("bart", "t5"):
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(3, V, (batch, 5), generator=g)}
    if family in ("bert", "roberta", "clip_text", "gpt2", "llama"):
        return {"input_ids": ids, "attention_mask": mask}
    if family in ("vit", "clip_vision"):
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    if family == "ast":
        return {"input_values": torch.randn(batch, 16, 16, generator=g)}
    if family == "whisper":
        return {"input_features": torch.randn(batch, 8, 16, generator=g),
                "decoder_input_ids": torch.randint(3, V, (batch, 5), generator=g)}
    raise KeyError(family)


def main_output(out) -> torch.Tensor:
    for k in ("logits", "last_hidden_state"):
        v = getattr(out, k, None)
        if v is not None:
            return v
    return out[0]
