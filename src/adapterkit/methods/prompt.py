"""Prompt tuning (Lester et al.), with the optional MLP reparameterisation VL-Adapter
uses: prompts = Linear(mid -> d)(tanh(Linear(d -> mid)(Emb(L_p, d)))).

The prompts are prepended to the input embeddings (the encoder's, for encoder-decoder
models) and the attention mask is extended with ones; for causal LMs the labels are
extended with -100 so the loss ignores the prompt positions (as HF PEFT does). With
``inject: "manual"`` nothing is hooked and a wrapper (e.g. the VL model) calls
``prompts(batch, task)`` itself.

``placement`` says where the prompt enters:

- ``inputs_embeds`` (default; HF PEFT): prepended to the token embeddings before the model's
  embedding layer, so positions, token types and the embedding LayerNorm apply to the prompt
  too and the real tokens move to positions L_p..;
- ``after_embeddings`` (AdapterHub ``PromptTuningConfig``, BERT-family encoders): prepended to
  the embedding layer's *output* (the profile's ``embeddings`` place), so positions, token
  types and LayerNorm apply to the real tokens only, which keep positions 0..L-1.

``init: uniform`` is AdapterHub's ``random_uniform`` (U(-0.5, 0.5)).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from adapterkit.core.base import AdapterSet, places_for
from adapterkit.core.config import AdapterConfig, bounded, choice, register_method
from adapterkit.core.optim import mark_task_stacked
from adapterkit.core.routing import expand_to_batch
from adapterkit.core.task_linear import TaskLinear
from adapterkit.errors import ConfigError


@dataclass
class PromptConfig(AdapterConfig):
    method: str = "prompt"
    num_tokens: int = bounded(20, lo=1)
    reparam_dim: int | None = bounded(None, lo=1)
    init: str = choice("normal", "vocab", "uniform", default="normal")
    inject: str = choice("input", "manual", default="input")
    placement: str = choice("inputs_embeds", "after_embeddings", default="inputs_embeds")


class PromptSet(AdapterSet):
    merge_note = "prompts are extra input tokens, not a weight update"

    def __init__(self, cfg: PromptConfig):
        super().__init__(cfg)
        self.per_task = cfg.copies("all") > 1
        self.embedding = None  # created at attach time (needs the width)
        self._copy_ids = None

    def attach(self, model, profile):
        cfg: PromptConfig = self.config
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not isinstance(emb, nn.Embedding):
            raise ConfigError(
                f"prompt tuning needs a token-embedding model ({type(model).__name__} has no nn.Embedding input "
                "embeddings); for vision/audio transformers use visual prompt tuning (method \"vpt\")"
            )
        if cfg.inject == "input" and cfg.placement == "inputs_embeds" and \
                "inputs_embeds" not in inspect.signature(model.forward).parameters:
            raise ConfigError(
                f"{type(model).__name__}.forward takes no inputs_embeds, so prompts cannot be prepended to its "
                "input; use inject: manual and call prompts() from a wrapper"
            )
        d = emb.weight.shape[1]
        n = cfg.copies("all")
        self.embedding = mark_task_stacked(nn.Parameter(torch.empty(n, cfg.num_tokens, d)))
        with torch.no_grad():
            if cfg.init == "vocab":  # the first L_p vocabulary rows (Adapter4Rec / Lester "vocab" init)
                self.embedding.copy_(emb.weight[: cfg.num_tokens].detach().unsqueeze(0).expand(n, -1, -1))
            elif cfg.init == "uniform":  # AdapterHub's random_uniform
                self.embedding.uniform_(-0.5, 0.5)
            else:
                self.embedding.normal_(0.0, 0.02)
        if cfg.reparam_dim:
            self.mlp_in = TaskLinear(d, cfg.reparam_dim, n)
            self.mlp_out = TaskLinear(cfg.reparam_dim, d, n)
        else:
            self.mlp_in = self.mlp_out = None
        self.is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self._embed = [emb]
        if cfg.inject == "input" and cfg.placement == "after_embeddings":
            if self.is_encoder_decoder:
                raise ConfigError('prompt placement "after_embeddings" is for encoder-only models (BERT family)')
            found = places_for(model, profile, "embeddings", cfg, required=False) \
                if profile is not None and "embeddings" in profile["places"] else []
            if len(found) != 1:
                raise ConfigError(f'prompt placement "after_embeddings" needs the model\'s embedding layer '
                                  f'(profile place "embeddings"); found {len(found)} in {type(model).__name__}')
            self.add_pre_hook(model, self._widen_mask, with_kwargs=True)
            self.add_forward_hook(found[0].module, self._after_embeddings)
        elif cfg.inject == "input":
            self.add_pre_hook(model, self._inject, with_kwargs=True)

    def table(self) -> torch.Tensor:
        """(n_copies, L_p, d): every task's prompt vectors (after the reparameterisation)."""
        x = self.embedding
        if self.mlp_in is not None:
            ids = self._copy_ids
            if ids is None or ids.device != x.device:
                ids = self._copy_ids = torch.arange(x.shape[0], device=x.device) if x.shape[0] > 1 else None
            x = self.mlp_out(torch.tanh(self.mlp_in(x, ids)), ids)
        return x

    def prompts(self, batch: int, task=None) -> torch.Tensor:
        """(batch, L_p, d) prompt vectors for the routed task(s)."""
        x = self.table()
        if not self.per_task:
            return x[0].expand(batch, -1, -1)
        if task is None:
            task = self.router.resolve(x.device)
        if isinstance(task, int):
            return x[task].expand(batch, -1, -1)
        return x.index_select(0, expand_to_batch(task, batch))

    def _inject(self, module, args, kwargs):
        if args:
            raise ConfigError("prompt tuning's input hook needs keyword arguments (input_ids=..., attention_mask=...)")
        if kwargs.get("encoder_outputs") is not None:
            return args, kwargs  # encoder already ran (generation): prompts are in its output
        past = kwargs.get("past_key_values", kwargs.get("cache"))
        if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
            return args, kwargs
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            ids = kwargs.pop("input_ids", None)
            if ids is None:
                return args, kwargs
            embeds = self._embed[0](ids)
        kwargs.pop("input_ids", None)
        b = embeds.shape[0]
        p = self.prompts(b).to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([p, embeds], dim=1)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(b, p.shape[1]), mask], dim=1)
        tt = kwargs.get("token_type_ids")
        if tt is not None:  # as PEFT: the prompt positions get token type 0
            kwargs["token_type_ids"] = torch.cat([tt.new_zeros(b, p.shape[1]), tt], dim=1)
        labels = kwargs.get("labels")
        if labels is not None and not self.is_encoder_decoder:
            kwargs["labels"] = torch.cat([labels.new_full((b, p.shape[1]), -100), labels], dim=1)
        return args, kwargs


    def _widen_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            raise ConfigError("prompt tuning needs attention_mask as a keyword argument")
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], self.config.num_tokens), mask], dim=1)
        return args, kwargs

    def _after_embeddings(self, module, args, out):
        p = self.prompts(out.shape[0]).to(out.dtype)
        return torch.cat([p, out], dim=1)


register_method("prompt", PromptConfig, PromptSet)
