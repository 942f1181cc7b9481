"""GenerativeAdapter (Chen et al.): a LoRA generated on the fly from a context, and the
training objectives of its generator: completion (:func:`completion_loss`), reconstruction
(:func:`reconstruction_loss`), both with one generated adapter (:func:`pretraining_loss`),
the reference's windowed form (:func:`windowed_loss`), and per-example scores
(:func:`sequence_nll`, :func:`evaluate_completion`).

For each target linear W (d_in -> d_out) in layer l, with context hidden states H (the
layer's input residual stream, width d, captured with a pre-hook):

    Ĥ = RMSNorm(H);  K = Ĥ A2ᵀ (L x r1);  V = Ĥ A3ᵀ (L x r2);  S = Σ_segments Σ_tokens Kᵀ V (r1 x r2)
    S̃ = U Vᵀ from torch.svd_lowrank(S, q, niter)    ("svd": orthogonalisation; or
          "frobenius": S/||S||_F, "spectral": S/σ_max, "none")
    ΔW x = (α/r1) B S̃ᵀ A1 x       (lora_A = S̃ᵀ A1, lora_B = B)

Learned (static) parameters: A1 (r1 x d_in), A2 (r1 x d), A3 (r2 x d) Kaiming-normal,
B (d_out x r2) zero, and the RMSNorm weight. Contexts are absorbed in segments; each
segment runs with the adapter generated from the previous segments (as in the
reference's training), and padding tokens (``attention_mask`` 0) are left out of S.
S is kept per example (batch of contexts): a later forward either broadcasts one
context to every row or pairs context b with row b. For inference the generated
update is merged into the frozen weights (one context) and unmerged after.

[reference quirk] while training, an example whose singular values of S are nearly
degenerate (unstable SVD gradients) gets a zero adapter, as the reference does.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from adapterkit.core.base import AdapterSet, get_container, linear_targets, places_for
from adapterkit.core.config import AdapterConfig, bounded, choice, register_method
from adapterkit.errors import ConfigError

NORMS = ("svd", "frobenius", "spectral", "none")


class _ContextCaptured(Exception):
    """Raised by the last capture hook to stop a context forward early (later layers are not needed)."""


@dataclass
class GenerativeAdapterConfig(AdapterConfig):
    """GenerativeAdapter options. ``targets`` are profile places (default ``o``, i.e.
    o_proj); ``target_modules`` overrides them with names/regexes."""

    method: str = "generative_adapter"
    sharing: str = choice("shared", default="shared", help="shared only (one generator for every task)")
    r1: int = bounded(64, lo=1, help="rank of A1 / A2 (the keys K of the context state S)")
    r2: int = bounded(64, lo=1, help="rank of A3 / B (the values V of the context state S)")
    max_rank: int = bounded(16, lo=1, help="rank q of the low-rank SVD of S (norm svd; at most r1, r2)")
    alpha: float = bounded(16.0, lo=0.0, lo_open=True, help="the generated update is scaled by alpha / r1")
    norm: str = choice(*NORMS, default="svd", help="how S is normalised: svd (U V^T of its low-rank SVD), "
                                                  "frobenius (S / ||S||_F), spectral (S / sigma_max), none")
    svd_niter: int = bounded(1, lo=0, help="subspace iterations of torch.svd_lowrank")
    segment_len: int = bounded(1024, lo=1, help="a context is absorbed in segments of this many tokens")
    rms_eps: float = bounded(1e-6, lo=0.0, lo_open=True, help="epsilon of the RMSNorm on the context states")
    degenerate_tol: float = bounded(1e-6, lo=0.0, help="in training, an example whose singular values of S "
                                                      "are closer than this (relative) gets a zero adapter")
    targets: list[str] = field(default_factory=lambda: ["o"])
    target_modules: list[str] | None = None

    @property
    def scaling(self) -> float:
        return self.alpha / self.r1

    @property
    def rank(self) -> int:
        return min(self.max_rank, self.r1, self.r2)


class GenLoraLayer(nn.Module):
    """Static parameters of one generated LoRA (A1, A2, A3, B, RMSNorm weight)."""

    def __init__(self, d_in: int, d_out: int, d_ctx: int, cfg: GenerativeAdapterConfig):
        super().__init__()
        self.A1 = nn.Parameter(torch.empty(cfg.r1, d_in))
        self.A2 = nn.Parameter(torch.empty(cfg.r1, d_ctx))
        self.A3 = nn.Parameter(torch.empty(cfg.r2, d_ctx))
        self.B = nn.Parameter(torch.zeros(d_out, cfg.r2))
        self.norm_weight = nn.Parameter(torch.ones(d_ctx))
        for a in (self.A1, self.A2, self.A3):
            nn.init.kaiming_normal_(a, a=math.sqrt(5))
        self.eps = cfg.rms_eps
        self.scaling = cfg.scaling
        self.target: list[nn.Linear] = []

    def kv(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Σ_tokens Kᵀ V for context states h (B, L, d): (B, r1, r2)."""
        hf = h.float()
        hn = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight.float()
        k = hn @ self.A2.float().T
        v = hn @ self.A3.float().T
        if mask is not None:
            v = v * mask.to(v.dtype).unsqueeze(-1)
        return k.transpose(1, 2) @ v

    def delta_weight(self, s_tilde: torch.Tensor) -> torch.Tensor:
        """(α/r1) B S̃ᵀ A1 for one context (s_tilde (r1, r2)): (d_out, d_in)."""
        return (self.B @ s_tilde.to(self.B.dtype).T @ self.A1) * self.scaling

    def lora_forward(self, x: torch.Tensor, s_tilde: torch.Tensor) -> torch.Tensor:
        """ΔW x for x (B, ..., d_in) and S̃ (1 or B, r1, r2)."""
        b = x.shape[0]
        z = (x.reshape(b, -1, x.shape[-1]) @ self.A1.T.to(x.dtype))              # (B, N, r1)
        st = s_tilde.to(x.dtype)
        if st.shape[0] == 1:
            z = z @ st[0]
        elif st.shape[0] == b:
            z = torch.bmm(z, st)
        else:
            raise ConfigError(f"the absorbed context has {st.shape[0]} examples but the batch has {b} rows")
        y = z @ self.B.T.to(x.dtype) * self.scaling
        return y.reshape(*x.shape[:-1], y.shape[-1])


def normalize_state(S: torch.Tensor, norm: str, q: int, niter: int, training: bool = False,
                    tol: float = 0.0) -> torch.Tensor:
    """S̃ for S (B, r1, r2) under the chosen normalisation."""
    if norm == "none":
        return S
    if norm == "frobenius":
        return S / S.flatten(1).norm(dim=-1).clamp_min(1e-12).view(-1, 1, 1)
    if norm == "spectral":
        return S / torch.linalg.matrix_norm(S, ord=2).clamp_min(1e-12).view(-1, 1, 1)
    U, sv, V = torch.svd_lowrank(S, q=q, niter=niter)
    out = U @ V.transpose(-1, -2)
    if training and tol > 0 and sv.shape[-1] > 1:
        gaps = (sv[..., :-1] - sv[..., 1:]).abs().min(-1).values / sv[..., :1].squeeze(-1).clamp_min(1e-12)
        ok = (gaps > tol).to(out.dtype).view(-1, 1, 1)
        out = out * ok
    return out


class GenerativeAdapterSet(AdapterSet):
    can_merge = True

    def __init__(self, cfg: GenerativeAdapterConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleDict()
        self.by_layer: dict[int, list[str]] = {}
        self.paths: list[str] = []
        self.state: dict[str, torch.Tensor] = {}      # accumulated S per target
        self.generated: dict[str, torch.Tensor] = {}  # S̃ per target (the active adapter)
        self._capturing = False
        self._grad = False
        self._ctx_mask: torch.Tensor | None = None
        self._merged_delta: dict[str, torch.Tensor] = {}

    # -- construction ------------------------------------------------------------
    def attach(self, model, profile):
        cfg: GenerativeAdapterConfig = self.config
        found = linear_targets(model, profile, cfg, kind="generative")
        streams = {p.layer: p for p in places_for(model, profile, "attn_stream", cfg)} if profile and \
            "attn_stream" in profile["places"] else {}
        d_ctx = _model_width(model)
        for p in found:
            if not isinstance(p.module, nn.Linear):
                raise ConfigError(f"GenerativeAdapter targets nn.Linear layers; {p.path} is a {type(p.module).__name__}")
            if p.layer < 0:
                raise ConfigError(f"cannot tell the layer index of {p.path}")
            layer = GenLoraLayer(p.module.in_features, p.module.out_features, d_ctx, cfg)
            layer.target.append(p.module)
            self.layers[p.key] = layer
            self.by_layer.setdefault(p.layer, []).append(p.key)
            self.add_forward_hook(p.module, self._target_hook(p.key))
            self.paths.append(p.path)
        last = max(self.by_layer)
        for li, keys in self.by_layer.items():
            stream = streams.get(li)
            mod = stream.module if stream is not None else _layer_module(model, found, li)
            self.add_pre_hook(mod, self._capture_hook(keys, stop=li == last), with_kwargs=True)

    # -- hooks ------------------------------------------------------------------
    def _capture_hook(self, keys: list[str], stop: bool):
        def hook(module, args, kwargs):
            if not self._capturing:
                return None
            h = args[0] if args else kwargs.get("hidden_states")
            mask = self._ctx_mask
            if mask is not None and mask.shape[:2] != h.shape[:2]:
                raise ConfigError(f"context attention_mask {tuple(mask.shape)} does not match the hidden states "
                                  f"{tuple(h.shape[:2])}")
            for k in keys:
                with torch.enable_grad() if self._grad else contextlib.nullcontext():
                    s = self.layers[k].kv(h, mask)
                self.state[k] = s if k not in self.state else self.state[k] + s
            if stop:
                raise _ContextCaptured
            return None
        return hook

    def _target_hook(self, key: str):
        def hook(module, args, out):
            st = self.generated.get(key)
            if st is None or self.merged:
                return out
            return out + self.layers[key].lora_forward(args[0], st).to(out.dtype)
        return hook

    # -- context handling -------------------------------------------------------
    def reset(self) -> None:
        """Forget the absorbed context (the model behaves as the base model again)."""
        if self.merged:
            self.unmerge()
        self.state.clear()
        self.generated.clear()

    def refresh(self) -> None:
        """Recompute every S̃ from the accumulated S."""
        cfg: GenerativeAdapterConfig = self.config
        self.generated = {k: normalize_state(S, cfg.norm, cfg.rank, cfg.svd_niter, self.training,
                                             cfg.degenerate_tol) for k, S in self.state.items()}

    def absorb(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               reset: bool = True) -> None:
        """Run the context through ``model`` in ``segment_len`` windows and generate the adapter.

        Each window runs with the adapter generated from the windows before it; the forward
        runs the base transformer (no LM head) and stops after the last target layer.
        Gradients flow when called with grad enabled (training)."""
        if reset:
            self.reset()
        elif self.merged:
            raise ConfigError("unmerge the generated adapter before absorbing more context")
        if input_ids.dim() != 2:
            raise ConfigError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        seg = self.config.segment_len
        body = getattr(model, "base_model", model)
        for start in range(0, input_ids.shape[1], seg):
            ids = input_ids[:, start:start + seg]
            m = attention_mask[:, start:start + seg] if attention_mask is not None else None
            self._ctx_mask, self._capturing = m, True
            self._grad = torch.is_grad_enabled()
            # before any adapter is generated the context states do not depend on trained
            # parameters: run the frozen body without autograd (the capture re-enables it)
            body_grad = self._grad and bool(self.generated)
            try:
                with torch.set_grad_enabled(body_grad):
                    body(input_ids=ids, attention_mask=m, use_cache=False)
            except _ContextCaptured:
                pass
            finally:
                self._capturing, self._ctx_mask = False, None
            self.refresh()

    def lora_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per target path: (lora_A = S̃ᵀ A1 (B, r2, d_in), lora_B = B (d_out, r2)) of the generated adapter."""
        out = {}
        for path, (k, layer) in zip(self.paths, self.layers.items()):
            st = self.generated.get(k)
            if st is not None:
                out[path] = (st.transpose(-1, -2).to(layer.A1.dtype) @ layer.A1, layer.B)
        return out

    # -- merging -------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, task=None) -> None:
        if self.merged:
            raise ConfigError("the generated adapter is already merged; unmerge first")
        if not self.generated:
            raise ConfigError("no context has been absorbed: call absorb(...) before merging")
        for k, st in self.generated.items():
            if st.shape[0] != 1:
                raise ConfigError(f"cannot merge adapters generated from {st.shape[0]} contexts into one weight; "
                                  "absorb a single context to merge")
            layer = self.layers[k]
            w = layer.target[0].weight
            d = layer.delta_weight(st[0]).to(w.dtype)
            w += d
            self._merged_delta[k] = d
        self.merged = True
        self.suspend_hooks()  # absorb(reset=True) unmerges first, which brings the capture hooks back

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for k, d in self._merged_delta.items():
            self.layers[k].target[0].weight -= d
        self._merged_delta.clear()
        self.merged = False
        self.resume_hooks()


def _model_width(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    for n in ("hidden_size", "d_model", "n_embd"):
        v = getattr(cfg, n, None)
        if isinstance(v, int):
            return v
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        return emb.weight.shape[1]
    raise ConfigError(f"cannot tell the hidden width of {type(model).__name__}")


def _layer_module(model: nn.Module, found, layer: int) -> nn.Module:
    """The transformer block holding layer ``layer`` (its input is the residual stream)."""
    path = next(p.path for p in found if p.layer == layer)
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] == str(layer):
            return model.get_submodule(".".join(parts[: i + 1]))
    raise ConfigError(f"cannot find the block of layer {layer} above {path}")


def generative_set(model: nn.Module, name: str | None = None) -> GenerativeAdapterSet:
    """The attached GenerativeAdapter set (the only one, or the one named)."""
    c = get_container(model)
    sets = [(n, s) for n, s in (c.sets.items() if c is not None else []) if isinstance(s, GenerativeAdapterSet)]
    if name is not None:
        sets = [(n, s) for n, s in sets if n == name]
    if len(sets) != 1:
        raise ConfigError("the model has " + ("no" if not sets else "several") + " GenerativeAdapter sets"
                          + (f' named "{name}"' if name else "; pass name="))
    return sets[0][1]


def absorb_context(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   name: str | None = None, reset: bool = True) -> GenerativeAdapterSet:
    """Generate the adapter of ``model`` from a context (see :meth:`GenerativeAdapterSet.absorb`)."""
    s = generative_set(model, name)
    s.absorb(model, input_ids, attention_mask, reset=reset)
    return s


@contextlib.contextmanager
def merged_context(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   name: str | None = None):
    """``with merged_context(model, ctx_ids): model.generate(...)`` — absorb, merge, then unmerge and reset."""
    s = generative_set(model, name)
    with torch.no_grad():
        s.absorb(model, input_ids, attention_mask)
    s.merge()
    try:
        yield s
    finally:
        s.unmerge()
        s.reset()


register_method("generative_adapter", GenerativeAdapterConfig, GenerativeAdapterSet)


# -- training objectives: completion and reconstruction ----------------------
# A document is split into a context and a continuation. The adapter generated from the
# context must help the model, *without* the context in the prompt, to predict the
# continuation (completion) and to reproduce the context itself (reconstruction, the
# autoencoding task of the paper's pre-training): next-token cross-entropy on those tokens,
# computed with the generated adapter active. Only the generator parameters (A1, A2, A3,
# B, RMSNorm weight) are trained; the base model stays frozen.
def continuation_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token loss over the (non-padding) tokens of ``ids`` (labels = ids, padding -100)."""
    labels = ids.clone()
    if mask is not None:
        labels = labels.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def completion_loss(model: nn.Module, context_ids: torch.Tensor, target_ids: torch.Tensor,
                    context_mask: torch.Tensor | None = None, target_mask: torch.Tensor | None = None,
                    name: str | None = None) -> torch.Tensor:
    """Loss on ``target_ids`` with the adapter generated from ``context_ids`` (context not in the prompt)."""
    s: GenerativeAdapterSet = generative_set(model, name)
    s.absorb(model, context_ids, context_mask)
    try:
        return continuation_loss(model, target_ids, target_mask)
    finally:
        s.reset()


def sequence_nll(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example mean next-token negative log-likelihood (nats/token) of ``ids`` (B, L): shape (B,).

    Token t is scored from tokens < t; padding (``mask`` 0) is neither scored nor, as the
    first token, predicted from. An example with fewer than two real tokens scores nan."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    tgt = ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")   # (B, L-1)
    w = torch.ones_like(nll) if mask is None else mask[:, 1:].to(nll.dtype)
    return (nll * w).sum(1) / w.sum(1)


def reconstruction_loss(model: nn.Module, context_ids: torch.Tensor, context_mask: torch.Tensor | None = None,
                        name: str | None = None) -> torch.Tensor:
    """The reconstruction (autoencoding) objective: the model, with the adapter generated
    from the context C and *without* C in the prompt, must reproduce C itself:

        L_rec = - (1/N) Σ_b Σ_{t≥2, mask} log p_{Θ + Δ(C_b)}(c_{b,t} | c_{b,<t})

    (N real predicted tokens of the batch; the first token of each context has no prefix to be
    predicted from). This is what the reference's "doubled sequence" [C; C] trains when C fits in
    one window: the second copy is predicted with the adapter generated from the first (see
    :func:`windowed_loss` with ``double=True`` for the windowed form)."""
    s: GenerativeAdapterSet = generative_set(model, name)
    s.absorb(model, context_ids, context_mask)
    try:
        return continuation_loss(model, context_ids, context_mask)
    finally:
        s.reset()


def pretraining_loss(model: nn.Module, context_ids: torch.Tensor, target_ids: torch.Tensor,
                     context_mask: torch.Tensor | None = None, target_mask: torch.Tensor | None = None,
                     reconstruction_weight: float = 1.0, completion_weight: float = 1.0,
                     name: str | None = None) -> dict[str, torch.Tensor]:
    """The pre-training objective of the generator: ``w_rec·L_rec + w_comp·L_comp`` with one adapter
    generated from the context (absorbed once) and used for both terms: reconstruction of the
    context and completion (the continuation ``target_ids``). Returns ``{"loss", "reconstruction",
    "completion"}``; a term with weight 0 is not computed (its entry is absent)."""
    if reconstruction_weight < 0 or completion_weight < 0 or reconstruction_weight + completion_weight <= 0:
        raise ConfigError(f"the objective weights must be >= 0 and not both 0, got reconstruction "
                          f"{reconstruction_weight}, completion {completion_weight}")
    s: GenerativeAdapterSet = generative_set(model, name)
    s.absorb(model, context_ids, context_mask)
    out: dict[str, torch.Tensor] = {}
    try:
        total = 0.0
        if reconstruction_weight > 0:
            out["reconstruction"] = continuation_loss(model, context_ids, context_mask)
            total = total + reconstruction_weight * out["reconstruction"]
        if completion_weight > 0:
            out["completion"] = continuation_loss(model, target_ids, target_mask)
            total = total + completion_weight * out["completion"]
        out["loss"] = total
        return out
    finally:
        s.reset()


def windowed_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None, double: bool = False,
                  name: str | None = None) -> torch.Tensor:
    """The reference's windowed objective: ``ids`` is cut into ``segment_len`` windows and window
    t ≥ 2 is scored (next-token loss, token-weighted over the batch) with the adapter generated from
    windows 1..t-1; the first window has no adapter and is not scored. With ``double=True`` the
    sequence is first concatenated with itself ([x; x]): the second copy is then reconstructed from
    the adapter of the first (reconstruction), while windows of the first copy are completions."""
    s: GenerativeAdapterSet = generative_set(model, name)
    if double:
        ids = torch.cat([ids, ids], dim=1)
        mask = torch.cat([mask, mask], dim=1) if mask is not None else None
    seg = s.config.segment_len
    if ids.shape[1] <= seg:
        raise ConfigError(f"windowed_loss needs more than one window: {ids.shape[1]} tokens, segment_len {seg}")
    s.reset()
    total, count = 0.0, 0.0
    try:
        for start in range(seg, ids.shape[1], seg):
            s.absorb(model, ids[:, start - seg:start], None if mask is None else mask[:, start - seg:start],
                     reset=start == seg)
            w_ids = ids[:, start:start + seg]
            w_mask = None if mask is None else mask[:, start:start + seg]
            n = float(w_ids[:, 1:].numel() if w_mask is None else w_mask[:, 1:].sum())
            if n > 0:
                total = total + continuation_loss(model, w_ids, w_mask) * n
                count += n
    finally:
        s.reset()
    if count == 0:
        raise ConfigError("windowed_loss: no window after the first has a token to score")
    return total / count


@torch.no_grad()
def evaluate_completion(model: nn.Module, context_ids: torch.Tensor, target_ids: torch.Tensor,
                        context_mask: torch.Tensor | None = None, target_mask: torch.Tensor | None = None,
                        name: str | None = None) -> dict[str, float]:
    """``{"base": loss without adapter, "adapted": loss with the generated adapter}`` on the continuation."""
    s = generative_set(model, name)
    s.reset()
    base = float(continuation_loss(model, target_ids, target_mask))
    adapted = float(completion_loss(model, context_ids, target_ids, context_mask, target_mask, name))
    return {"base": base, "adapted": adapted}


def split_documents(token_lists: list[list[int]], context_len: int, target_len: int,
                    pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(context_ids, context_mask, target_ids, target_mask): the first ``context_len`` tokens of each
    document as context, the next up to ``target_len`` as continuation (right-padded)."""
    b = len(token_lists)
    ctx = torch.full((b, context_len), pad_id, dtype=torch.long)
    tgt = torch.full((b, target_len), pad_id, dtype=torch.long)
    cm = torch.zeros(b, context_len, dtype=torch.long)
    tm = torch.zeros(b, target_len, dtype=torch.long)
    for i, toks in enumerate(token_lists):
        c, t = toks[:context_len], toks[context_len:context_len + target_len]
        ctx[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        cm[i, : len(c)] = 1
        tgt[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        tm[i, : len(t)] = 1
    return ctx, cm, tgt, tm
