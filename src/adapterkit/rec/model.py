"""Adapter4Rec / TransRec-style model: a text item encoder and a SASRec user encoder.

- Item encoder: a pretrained text model over item titles, pooled ([CLS] or mean over
  tokens) -> Linear(H -> d) -> GELU.
- User encoder: SASRec-style post-LN transformer (2 blocks, 2 heads, d = 64, max length
  20, learned positions, causal attention) over the item embeddings.
- Loss: BCE of <u_t, e_pos> against <u_t, e_neg> with one sampled negative per position
  (negatives are items outside the user's input sequence).

Adapters go into the item text model with :func:`adapterkit.add_adapters` (its own
profile) and into the user encoder with explicit module paths (``SASREC_PLACES``, a
profile-like mapping), see :func:`attach_rec_method`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapterkit.core.base import add_adapters, get_container
from adapterkit.core.config import registered_methods
from adapterkit.core.task_linear import init_weight
from adapterkit.errors import ConfigError, did_you_mean

# place kind -> module path regexes of SASRec (a profile for a custom module)
SASREC_PLACES = {
    "attn_out": [r"blocks\.(?P<layer>\d+)\.attention\.out$"],
    "o": [r"blocks\.(?P<layer>\d+)\.attention\.out$"],
    "q": [r"blocks\.(?P<layer>\d+)\.attention\.query$"],
    "k": [r"blocks\.(?P<layer>\d+)\.attention\.key$"],
    "v": [r"blocks\.(?P<layer>\d+)\.attention\.value$"],
    "attn_in": [r"blocks\.(?P<layer>\d+)\.attention$"],
    "attn_stream": [r"blocks\.(?P<layer>\d+)\.attention$"],  # the residual stream entering the block
    "ffn_in": [r"blocks\.(?P<layer>\d+)\.ffn\.fc1$"],
    "ffn_stream": [r"blocks\.(?P<layer>\d+)\.ffn\.fc1$"],
    "ffn_out": [r"blocks\.(?P<layer>\d+)\.ffn\.fc2$"],
    "layer": [r"blocks\.(?P<layer>\d+)$"],
}
SASREC_LAYERNORMS = [r"(^|\.)(attn_norm|ffn_norm|emb_norm)\."]


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float, bias: bool = False):
        super().__init__()
        if d % heads:
            raise ConfigError(f"user encoder: heads {heads} must divide d {d}")
        self.heads, self.p = heads, dropout
        self.query, self.key, self.value, self.out = (nn.Linear(d, d, bias=bias) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape

        def split(t):
            return t.view(b, length, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                           attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        return self.out(a.transpose(1, 2).reshape(b, length, d))


FFN_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class FeedForward(nn.Module):
    def __init__(self, d: int, inner: int, activation: str = "relu"):
        super().__init__()
        if activation not in FFN_ACTIVATIONS:
            raise ConfigError(f'user encoder: ffn_activation must be one of {sorted(FFN_ACTIVATIONS)}, got "{activation}"')
        self.fc1, self.fc2 = nn.Linear(d, inner), nn.Linear(inner, d)
        self.act = FFN_ACTIVATIONS[activation]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Post-LN block: x = LN(x + drop(Attn(x))); x = LN(x + drop(FFN(x)))."""

    def __init__(self, d: int, heads: int, dropout: float, ffn_activation: str = "relu", attn_bias: bool = False,
                 ln_eps: float = 1e-6):
        super().__init__()
        self.attention = SelfAttention(d, heads, dropout, attn_bias)
        self.attn_norm = nn.LayerNorm(d, eps=ln_eps)
        self.ffn = FeedForward(d, 4 * d, ffn_activation)
        self.ffn_norm = nn.LayerNorm(d, eps=ln_eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask):
        x = self.attn_norm(x + self.drop(self.attention(x, mask)))
        return self.ffn_norm(x + self.drop(self.ffn(x)))


class SASRecEncoder(nn.Module):
    """User encoder over left-padded item-embedding sequences (B, L, d), L <= max_len.

    Defaults as Adapter4Rec's SASRec (``model/modules.py``, ``encoders.py``): ReLU FFN,
    bias-free q/k/v/out projections, LayerNorm eps 1e-6, Xavier-normal init."""

    def __init__(self, d: int = 64, heads: int = 2, blocks: int = 2, max_len: int = 20, dropout: float = 0.1,
                 ffn_activation: str = "relu", attn_bias: bool = False, ln_eps: float = 1e-6):
        super().__init__()
        self.max_len = max_len
        self.position = nn.Embedding(max_len, d)
        self.emb_norm = nn.LayerNorm(d, eps=ln_eps)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, heads, dropout, ffn_activation, attn_bias, ln_eps) for _ in range(blocks))
        for m in self.modules():  # the reference's User_Encoder._init_weights
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.xavier_normal_(m.weight)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, item_emb: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, length, _ = item_emb.shape
        if length > self.max_len:
            raise ConfigError(f"user encoder: sequence length {length} exceeds max_len {self.max_len}")
        pos = self.position(torch.arange(self.max_len - length, self.max_len, device=item_emb.device))
        x = self.drop(self.emb_norm(item_emb + pos))
        valid = attention_mask.bool()
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        mask = causal & valid[:, None, :]
        mask = (mask | torch.eye(length, dtype=torch.bool, device=x.device)).unsqueeze(1)  # padding sees itself
        for blk in self.blocks:
            x = blk(x, mask)
        return x


class ItemEncoder(nn.Module):
    """Title tokens -> text model -> pooled ([CLS] or masked mean) -> Linear(H -> d) -> GELU."""

    def __init__(self, text_model: nn.Module, d: int = 64, pool: str = "cls"):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ConfigError(f'item pooling must be "cls" or "mean", got "{pool}"')
        self.text, self.pool = text_model, pool
        h = int(text_model.config.hidden_size)
        self.proj = nn.Linear(h, d)
        self._cache: torch.Tensor | None = None

    def pooled(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.text(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.pool == "cls":
            return h[:, 0]
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def text_frozen(self) -> bool:
        return get_container(self.text) is None and not any(p.requires_grad for p in self.text.parameters())

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of the items whose tokens are ``ids``/``mask``; ``rows`` = their item indices
        (used to serve a cache of pooled text features while the text model is frozen)."""
        if rows is not None and self._cache is not None:
            return F.gelu(self.proj(self._cache[rows]))
        return F.gelu(self.proj(self.pooled(ids, mask)))

    @torch.no_grad()
    def build_cache(self, ids: torch.Tensor, mask: torch.Tensor, batch: int = 256) -> None:
        """Cache pooled features of all items (only valid while the text model is frozen and unadapted)."""
        was = self.text.training
        self.text.eval()
        self._cache = torch.cat([self.pooled(ids[i:i + batch], mask[i:i + batch]) for i in range(0, len(ids), batch)])
        self.text.train(was)

    def clear_cache(self) -> None:
        self._cache = None


class Adapter4Rec(nn.Module):
    """Item encoder + user encoder over a fixed item catalogue (tokenised titles, row 0 = padding)."""

    def __init__(self, item_encoder: ItemEncoder, user_encoder: SASRecEncoder, tokens: torch.Tensor,
                 token_mask: torch.Tensor):
        super().__init__()
        self.item_encoder, self.user_encoder = item_encoder, user_encoder
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("token_mask", token_mask, persistent=False)

    def embed_items(self, items: torch.Tensor) -> torch.Tensor:
        """(..., ) item indices -> (..., d); each distinct item is encoded once."""
        uniq, inv = torch.unique(items, return_inverse=True)
        e = self.item_encoder(self.tokens[uniq], self.token_mask[uniq], rows=uniq)
        return e[inv]

    def all_items(self, batch: int = 256) -> torch.Tensor:
        n = len(self.tokens)
        rows = torch.arange(n, device=self.tokens.device)
        return torch.cat([self.item_encoder(self.tokens[i:i + batch], self.token_mask[i:i + batch], rows=rows[i:i + batch])
                          for i in range(0, n, batch)])

    def user_states(self, seq_emb: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        return self.user_encoder(seq_emb, attention_mask=seq > 0)

    def loss(self, seq: torch.Tensor, generator: torch.Generator | None = None, negatives: torch.Tensor | None = None,
             normalizer: torch.Tensor | float | None = None) -> torch.Tensor:
        """BCE next-item loss on left-padded sequences (B, L+1), one sampled negative per position.

        ``negatives`` (B, L+1): the negatives to use (else sampled with ``generator``, see
        :func:`sample_negatives`). ``normalizer``: the loss is the sum of the BCE terms over it
        (default: their number, i.e. the mean); a shard of a larger batch passes the whole
        batch's term count over the number of shards, so the shards' mean is the batch's loss."""
        inp, pos = seq[:, :-1], seq[:, 1:]
        valid = (inp > 0) & (pos > 0)
        if negatives is None:
            negatives = sample_negatives(seq, len(self.tokens) - 1, generator)
        neg = negatives[:, 1:]
        emb = self.embed_items(torch.cat([inp, pos, neg], dim=1))
        e_in, e_pos, e_neg = emb.split(inp.shape[1], dim=1)
        u = self.user_states(e_in, inp)
        lp, ln = (u * e_pos).sum(-1), (u * e_neg).sum(-1)
        logits = torch.cat([lp[valid], ln[valid]])
        labels = torch.cat([torch.ones_like(lp[valid]), torch.zeros_like(ln[valid])])
        if normalizer is None:
            return F.binary_cross_entropy_with_logits(logits, labels)
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="sum") / normalizer


def sample_negatives(seq: torch.Tensor, num_items: int, generator: torch.Generator | None = None,
                     tries: int = 5) -> torch.Tensor:
    """Uniform items 1..num_items not in the user's sequence (a few vectorised resampling rounds)."""
    neg = torch.randint(1, num_items + 1, seq.shape, generator=generator, device=seq.device)
    for _ in range(tries):
        clash = (neg.unsqueeze(-1) == seq.unsqueeze(1)).any(-1)
        if not clash.any():
            break
        fresh = torch.randint(1, num_items + 1, seq.shape, generator=generator, device=seq.device)
        neg = torch.where(clash, fresh, neg)
    return neg


# ----------------------------------------------------------------------------- methods

ITEM_DEFAULTS = {  # Adapter4Rec settings for the text (item) side
    "houlsby": {"method": "houlsby", "bottleneck_dim": 64, "activation": "relu", "positions": ["attn_out", "ffn_out"]},
    "pfeiffer": {"method": "houlsby", "bottleneck_dim": 64, "activation": "relu", "positions": ["attn_out"]},
    "parallel": {"method": "parallel", "bottleneck_dim": 64, "activation": "relu", "positions": ["attn", "ffn"],
                 "scale": 1.0},
    "lora": {"method": "lora", "r": 12, "alpha": 1.0, "targets": ["q", "v"]},  # loralib: lora_alpha 1 -> scale 1/r
    "k_adapter": {"method": "k_adapter", "adapter_dim": 192, "taps": [0, -1], "num_heads": 4},
    "prompt": {"method": "prompt", "num_tokens": 30, "init": "vocab"},
    "bitfit": {"method": "bitfit"},
}
USER_DEFAULTS = {  # ... and for the SASRec (user) side; None = no user-side modules
    "houlsby": {"method": "houlsby", "bottleneck_dim": 16, "activation": "relu", "positions": ["attn_out", "ffn_out"]},
    "pfeiffer": {"method": "houlsby", "bottleneck_dim": 16, "activation": "relu", "positions": ["attn_out"]},
    "parallel": {"method": "parallel", "bottleneck_dim": 16, "activation": "relu", "positions": ["attn", "ffn"],
                 "scale": 1.0},
    "lora": {"method": "lora", "r": 4, "alpha": 1.0, "targets": ["q", "v"]},
    "k_adapter": None,
    "prompt": None,
    "bitfit": {"method": "bitfit"},
}
REC_METHODS = ("full", "scratch", "frozen") + tuple(ITEM_DEFAULTS)
_BOTTLENECK_STD = 1e-2  # Adapter4Rec AdapterBlock: normal(0, 1e-2), zero bias


def _user_config(cfg: dict) -> dict:
    """Point a method config at SASRec's modules (it has no HF profile)."""
    cfg = dict(cfg)
    m = cfg["method"]
    if m in ("houlsby", "pfeiffer"):
        cfg.setdefault("places", {p: SASREC_PLACES[p] for p in cfg.get("positions", ["attn_out", "ffn_out"])})
    elif m == "parallel":
        pos = cfg.get("positions", ["ffn"])
        places = {}
        for p in pos:
            src = f"{p}_stream" if cfg.get("parallel_input", "stream") == "stream" else f"{p}_in"
            if src not in SASREC_PLACES:
                src = f"{p}_in"
            places[src], places[f"{p}_out"] = SASREC_PLACES[src], SASREC_PLACES[f"{p}_out"]
        cfg.setdefault("places", places)
        cfg.setdefault("parallel_input", "stream")
    elif m == "lora":
        targets = cfg.pop("targets", ["q", "v"])
        cfg.setdefault("target_modules", [rx for t in targets for rx in SASREC_PLACES[t]])
    elif m == "conformer":
        cfg.setdefault("places", {f"{p}_{s}": SASREC_PLACES[f"{p}_{s}"] for p in cfg.get("positions", ["ffn"])
                                  for s in ("in", "out")})
    elif m in ("k_adapter", "vpt", "prompt"):
        raise ConfigError(f'method "{m}" cannot go into the causal user encoder (it would see future items); '
                          "set adapter.user: null")
    return cfg


def _reinit_bottlenecks(model: nn.Module, name: str, std: float) -> None:
    from adapterkit.methods.bottleneck import Bottleneck

    for mod in get_container(model).sets[name].modules():
        if isinstance(mod, Bottleneck):
            init_weight(mod.down.weight, f"normal:{std}")
            init_weight(mod.up.weight, f"normal:{std}")


def attach_rec_method(model: Adapter4Rec, method: str, adapter: dict | None, train_layernorms: bool = True) -> bool:
    """Freeze/attach for target adaptation; returns True when everything trains.

    ``adapter = {"item": {...overrides} | None, "user": {...overrides} | None}``. The item
    projection (Linear H -> d) always trains; LayerNorms of both encoders train when
    ``train_layernorms``."""
    if method in ("full", "scratch"):
        model.requires_grad_(True)
        return True
    if method not in REC_METHODS:
        extra = [m for m in registered_methods() if m not in REC_METHODS]
        raise ConfigError(f'unknown rec method "{method}"{did_you_mean(method, REC_METHODS)}; known: '
                          f"{list(REC_METHODS)} (other adapterkit methods: pass adapter.item/user with a \"method\": {extra})")
    adapter = dict(adapter or {})
    for k in adapter:
        if k not in ("item", "user"):
            raise ConfigError(f'unknown key "adapter.{k}" for rec methods; allowed: ["item", "user"]')
    model.requires_grad_(False)
    if method != "frozen":
        item_cfg = _side(ITEM_DEFAULTS[method], adapter, "item")
        if item_cfg is not None:
            item_cfg.setdefault("train_layernorms", train_layernorms)
            add_adapters(model.item_encoder.text, item_cfg, name="item")
            if item_cfg["method"] in ("houlsby", "pfeiffer", "parallel"):
                _reinit_bottlenecks(model.item_encoder.text, "item", _BOTTLENECK_STD)
        user_cfg = _side(USER_DEFAULTS[method], adapter, "user")
        if user_cfg is not None:
            user_cfg = _user_config(user_cfg)
            user_cfg.setdefault("trainable_modules", SASREC_LAYERNORMS if train_layernorms else [])
            add_adapters(model.user_encoder, user_cfg, name="user")
            if user_cfg["method"] in ("houlsby", "pfeiffer", "parallel"):
                _reinit_bottlenecks(model.user_encoder, "user", _BOTTLENECK_STD)
    if train_layernorms and get_container(model.user_encoder) is None:
        for n, p in model.user_encoder.named_parameters():
            if "norm" in n:
                p.requires_grad_(True)
    model.item_encoder.proj.requires_grad_(True)
    return False


def _side(default: dict | None, adapter: dict, side: str) -> dict | None:
    if side in adapter:
        over = adapter[side]
        if over is None:
            return None
        if not isinstance(over, dict):
            raise ConfigError(f'"adapter.{side}" must be a mapping or null, got {over!r}')
        base = dict(default or {})
        if "method" in over and over["method"] != base.get("method"):
            base = {}
        return {**base, **over}
    return dict(default) if default is not None else None
