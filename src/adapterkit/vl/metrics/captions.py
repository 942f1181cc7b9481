"""Caption metrics in pure Python/numpy, on pycocoevalcap's scale.

* `ptb_tokenize`: an approximation of the Stanford PTB tokenisation that
  pycocoevalcap runs through Java (lower-cased, clitics split, punctuation
  tokens from its removal list dropped).
* `bleu`: corpus BLEU-1..n exactly as pycocoevalcap's BleuScorer computes it
  ("closest" reference length, the same 1e-15 / 1e-9 smoothing constants).
* `cider_d`: pycocoevalcap's CIDEr (the CIDEr-D variant: n = 4, sigma = 6,
  document frequencies over the references of the evaluated corpus, clipped
  tf-idf, Gaussian length penalty, x10).

Both scorers take already-tokenised, space-separated strings (as pycocoevalcap
does); `caption_scores` tokenises and returns all of them. All n-gram
statistics are held in sparse matrices so the scoring itself is vectorised.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from adapterkit.errors import DataError

__all__ = ["ptb_tokenize", "tokenize_corpus", "bleu", "cider_d", "caption_scores", "PTB_PUNCTUATIONS"]

# Tokens pycocoevalcap drops after PTB tokenisation.
PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_ALWAYS_SPLIT = re.compile(r"\.\.\.|…|--|[\"`()\[\]{};!?]")
_COMMA = re.compile(r",(?!\d)|(?<!\d),")
_COLON = re.compile(r":(?!\d)|(?<!\d):")
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_LETTER_ABBREV = re.compile(r"^(?:[a-z]\.)+$")
_ABBREVIATIONS = frozenset(
    "mr. mrs. ms. dr. st. jr. sr. vs. etc. prof. mt. ft. inc. ltd. co. corp. no. jan. feb. aug. sept. oct. nov. dec.".split()
)


def _split_token(tok: str) -> list[str]:
    out: list[str] = []
    while tok[:1] in ("$", "#"):
        out.append(tok[0])
        tok = tok[1:]
    tail: list[str] = []
    # sentence-final periods (not decimals, not known abbreviations)
    while tok.endswith(".") and not (_LETTER_ABBREV.match(tok) or tok in _ABBREVIATIONS):
        tok = tok[:-1]
    if tok.endswith("%") and len(tok) > 1:
        tail.append("%")
        tok = tok[:-1]
    tok = tok.strip("'")
    m = _CLITIC.match(tok) if tok else None
    if m is not None and m.group(1).strip("'"):
        out.extend([m.group(1).strip("'"), m.group(2)])
    elif tok:
        out.append(tok)
    out.extend(tail)
    return [t for t in out if t and t not in PTB_PUNCTUATIONS and set(t) != {"-"}]


def ptb_tokenize(text: str) -> str:
    """Tokenise one caption like pycocoevalcap's PTBTokenizer (approximation).

    >>> ptb_tokenize("A man's dog, running (fast)!")
    "a man 's dog running fast"
    """
    text = str(text).replace("\n", " ").replace("\u2019", "'").replace("\u2018", "'").lower()
    text = text.replace("\u201c", " ").replace("\u201d", " ")
    text = _ALWAYS_SPLIT.sub(" ", text)
    text = _COMMA.sub(" ", text)
    text = _COLON.sub(" ", text)
    tokens: list[str] = []
    for tok in text.split():
        tokens.extend(_split_token(tok))
    return " ".join(tokens)


def tokenize_corpus(captions: Mapping[Hashable, Sequence[str] | str]) -> dict:
    """Tokenise every caption of an id -> caption(s) mapping, keeping its shape."""
    return {
        k: ptb_tokenize(v) if isinstance(v, str) else [ptb_tokenize(c) for c in v]
        for k, v in captions.items()
    }


# ----------------------------------------------------------------------------- n-gram statistics


class _NgramStats:
    """Sparse n-gram count matrices of candidates (one row per id) and
    references (one row per reference, `owner` = row of its candidate)."""

    def __init__(self, refs: Mapping[Hashable, Sequence[str]], cands: Mapping[Hashable, str], n: int):
        if n < 1:
            raise DataError(f"n-gram order must be >= 1, got {n}")
        if not cands:
            raise DataError("caption metrics: no candidates to score")
        if set(refs) != set(cands):
            only = next(iter(set(refs) ^ set(cands)))
            side = "references" if only in refs else "candidates"
            raise DataError(
                f"caption metrics: id {only!r} is only in the {side}; refs and cands need the same ids"
            )
        self.ids = list(cands)
        self.n = n
        vocab: dict[tuple[str, ...], int] = {}
        orders: list[int] = []

        def encode(sentence: str, row: int, rows: list, cols: list, vals: list) -> int:
            if not isinstance(sentence, str):
                raise DataError(f"caption metrics: captions must be strings, got {sentence!r}")
            words = sentence.split()
            counts = Counter(
                tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1)
            )
            for gram, c in counts.items():
                idx = vocab.get(gram)
                if idx is None:
                    idx = vocab[gram] = len(orders)
                    orders.append(len(gram) - 1)
                rows.append(row)
                cols.append(idx)
                vals.append(c)
            return len(words)

        c_rows: list[int] = []
        c_cols: list[int] = []
        c_vals: list[int] = []
        r_rows: list[int] = []
        r_cols: list[int] = []
        r_vals: list[int] = []
        cand_len = []
        ref_len = []
        owner = []
        for i, key in enumerate(self.ids):
            cand_len.append(encode(cands[key], i, c_rows, c_cols, c_vals))
            ref_list = refs[key]
            if isinstance(ref_list, str) or len(ref_list) == 0:
                raise DataError(f"caption metrics: id {key!r} needs a non-empty list of references")
            for ref in ref_list:
                ref_len.append(encode(ref, len(owner), r_rows, r_cols, r_vals))
                owner.append(i)
        v = max(len(orders), 1)
        self.cand = sp.csr_matrix((np.asarray(c_vals, float), (c_rows, c_cols)), shape=(len(self.ids), v))
        self.ref = sp.csr_matrix((np.asarray(r_vals, float), (r_rows, r_cols)), shape=(len(owner), v))
        self.order = np.asarray(orders, dtype=np.int64)
        self.order_onehot = sp.csr_matrix(
            (np.ones(len(orders)), (np.arange(len(orders)), self.order)), shape=(v, n)
        )
        self.cand_len = np.asarray(cand_len, dtype=np.int64)
        self.ref_len = np.asarray(ref_len, dtype=np.int64)
        self.owner = np.asarray(owner, dtype=np.int64)
        self.n_refs = np.bincount(self.owner, minlength=len(self.ids))
        self.starts = np.concatenate([[0], np.cumsum(self.n_refs)[:-1]])


def _group_max(matrix: sp.csr_matrix, owner: np.ndarray, n_groups: int) -> sp.csr_matrix:
    """Row-group-wise elementwise maximum of a non-negative sparse matrix."""
    coo = matrix.tocoo()
    g = owner[coo.row]
    order = np.lexsort((coo.col, g))
    g, cols, vals = g[order], coo.col[order], coo.data[order]
    if len(vals) == 0:
        return sp.csr_matrix((n_groups, matrix.shape[1]))
    new = np.ones(len(vals), dtype=bool)
    new[1:] = (g[1:] != g[:-1]) | (cols[1:] != cols[:-1])
    starts = np.flatnonzero(new)
    return sp.csr_matrix(
        (np.maximum.reduceat(vals, starts), (g[starts], cols[starts])), shape=(n_groups, matrix.shape[1])
    )


# ----------------------------------------------------------------------------- BLEU


def bleu(refs: Mapping[Hashable, Sequence[str]], cands: Mapping[Hashable, str], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n as pycocoevalcap's Bleu scorer ("closest" ref length).

    Inputs are tokenised, space-separated strings; returns [BLEU-1, ..., BLEU-n]
    in [0, 1].
    """
    st = _NgramStats(refs, cands, n)
    tiny, small = 1e-15, 1e-9
    # clipped matches: min(candidate count, max count over the image's refs)
    max_ref = _group_max(st.ref, st.owner, len(st.ids))
    clipped = st.cand.minimum(max_ref)
    correct = np.asarray((clipped @ st.order_onehot).sum(axis=0)).ravel()
    guess = np.maximum(st.cand_len[:, None] - np.arange(n)[None, :], 0).sum(axis=0).astype(np.float64)
    # "closest" reference length per candidate: min (|ref - cand|, ref), ties to the shorter
    diff = np.abs(st.ref_len - st.cand_len[st.owner])
    key = diff * (int(st.ref_len.max(initial=0)) + 1) + st.ref_len
    best = np.minimum.reduceat(key, st.starts)
    closest = best % (int(st.ref_len.max(initial=0)) + 1)
    testlen, reflen = float(st.cand_len.sum()), float(closest.sum())
    scores = []
    for k in range(1, n + 1):
        prod = float(np.prod((correct[:k] + tiny) / (guess[:k] + small)))
        score = prod ** (1.0 / k)
        ratio = (testlen + tiny) / (reflen + small)
        if ratio < 1:
            score *= float(np.exp(1 - 1 / ratio))
        scores.append(score)
    return scores


# ----------------------------------------------------------------------------- CIDEr-D


def cider_d(
    refs: Mapping[Hashable, Sequence[str]],
    cands: Mapping[Hashable, str],
    n: int = 4,
    sigma: float = 6.0,
    return_per_item: bool = False,
):
    """CIDEr-D as pycocoevalcap's Cider scorer computes it (corpus mean).

    Document frequencies come from the references of the ids being scored, so
    the score depends on the evaluated corpus (a one-image corpus scores 0).
    With `return_per_item`, returns (mean, {id: score}).
    """
    st = _NgramStats(refs, cands, n)
    n_images = len(st.ids)
    log_n = np.log(float(n_images))
    # document frequency: number of images whose references contain the n-gram
    present = _group_max(st.ref, st.owner, n_images)
    present.data = np.ones_like(present.data)
    df = np.asarray(present.sum(axis=0)).ravel()
    idf = log_n - np.log(np.maximum(1.0, df))
    cand = sp.csr_matrix(st.cand.multiply(idf[None, :]))
    ref = sp.csr_matrix(st.ref.multiply(idf[None, :]))

    def norms(m: sp.csr_matrix) -> np.ndarray:
        return np.sqrt(np.asarray((m.multiply(m) @ st.order_onehot).todense()))

    cand_norm, ref_norm = norms(cand), norms(ref)
    # candidate row repeated for each of its references
    cand_rep = cand[st.owner]
    overlap = np.asarray((cand_rep.minimum(ref).multiply(ref) @ st.order_onehot).todense())
    denom = cand_norm[st.owner] * ref_norm
    sims = np.divide(overlap, denom, out=np.zeros_like(overlap), where=denom != 0)
    # length = number of bigrams (pycocoevalcap counts the n-grams of order index 1)
    cand_bigrams = np.maximum(st.cand_len - 1, 0) if n > 1 else np.zeros_like(st.cand_len)
    ref_bigrams = np.maximum(st.ref_len - 1, 0) if n > 1 else np.zeros_like(st.ref_len)
    delta = (cand_bigrams[st.owner] - ref_bigrams).astype(np.float64)
    sims *= np.exp(-(delta**2) / (2.0 * sigma**2))[:, None]
    per_ref = sims.mean(axis=1)
    per_item = np.bincount(st.owner, weights=per_ref, minlength=n_images) / st.n_refs * 10.0
    mean = float(per_item.mean())
    if return_per_item:
        return mean, {k: float(s) for k, s in zip(st.ids, per_item)}
    return mean


# ----------------------------------------------------------------------------- all together


def caption_scores(
    refs: Mapping[Hashable, Sequence[str]], cands: Mapping[Hashable, str], tokenize: bool = True
) -> dict[str, float]:
    """BLEU-1..4 and CIDEr (CIDEr-D) on pycocoevalcap's scale (not x100).

    Raw captions are PTB-tokenised first unless `tokenize=False`.
    """
    if tokenize:
        refs = tokenize_corpus(refs)
        cands = tokenize_corpus(cands)
    b = bleu(refs, cands, n=4)
    out = {f"BLEU-{k + 1}": s for k, s in enumerate(b)}
    out["CIDEr"] = cider_d(refs, cands)
    return out
