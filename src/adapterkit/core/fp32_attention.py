"""bf16 training on the CPU with the attention kernel in fp32.

torch 2.13's CPU attention kernel (``scaled_dot_product_attention``, flash) is several times
slower *backward* in bf16 than in fp32: measured with one thread for one SmolLM2 layer of a
FashionVL training batch (16 x 9 heads x 33 tokens x 64), forward + backward 14.0 ms in
bf16 against 4.8 ms with the inputs cast to fp32 and the output cast back (26.6 against
4.3 ms under the causal kernel). Over 30 layers that is about a quarter of a bf16 training
step. Forward-only (evaluation, generation) bf16 is as fast or faster, so it is left alone.

:func:`use_fp32_attention` points the model's HF sub-models at the attention function
registered here (``transformers.AttentionInterface``, no forked modelling code): on the CPU,
while gradients are recorded and the inputs are bf16 (or bf16 autocast is on), query, key,
value (and a floating-point mask) are cast to fp32 and the model's sdpa runs with autocast
off; the output is cast back to the dtype attention would have returned. Anything else
(a GPU, inference, fp32) calls transformers' own sdpa function unchanged. The attention
math is the same, computed at a higher precision than bf16.
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "adapterkit_fp32_sdpa"
_registered = False


def _fp32_sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    amp = torch.is_autocast_enabled("cpu")
    if query.device.type != "cpu" or not torch.is_grad_enabled() or not (amp or query.dtype == torch.bfloat16):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out_dtype = torch.get_autocast_dtype("cpu") if amp else query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(out_dtype), weights


def register() -> str:
    """Register the function with transformers (once); returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, _fp32_sdpa)
        AttentionMaskInterface.register(NAME, sdpa_mask)  # the masks sdpa gets, built the same way
        _registered = True
    return NAME


def use_fp32_attention(model: nn.Module) -> int:
    """Every HF (sub-)model of ``model`` whose attention is ``sdpa`` switches to the fp32-backward
    function above; returns how many configs were switched (eager / flex / a custom attention
    are left as they are)."""
    name = register()
    seen, n = set(), 0
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is None or id(cfg) in seen or getattr(cfg, "_attn_implementation", None) != "sdpa":
            continue
        seen.add(id(cfg))
        cfg._attn_implementation = name
        n += 1
    return n
