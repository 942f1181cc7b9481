"""Full-ranking metrics with history masking (Adapter4Rec ``data_utils/metrics.py`` semantics).

Every catalogue item is scored; the items of the user's input history are removed from
the ranking (score -inf) except the target itself; rank = 1 + number of remaining items
scoring strictly higher than the target. HR@K = [rank <= K], NDCG@K = [rank <= K] / log2(rank + 1).
"""

from __future__ import annotations

import torch


def history_mask(history: torch.Tensor, num_items: int) -> torch.Tensor:
    """(B, L) item indices (0 = padding) -> (B, num_items + 1) bool, True where the item was seen."""
    m = torch.zeros(history.shape[0], num_items + 1, dtype=torch.bool, device=history.device)
    m.scatter_(1, history, True)
    m[:, 0] = True  # the padding row never ranks
    return m


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """1-based rank of each target among all items. ``scores`` (B, N+1) over item rows 0..N (row 0 = padding);
    ``seen`` (B, N+1) bool items to exclude (the target itself is never excluded)."""
    s = scores.clone()
    if seen is not None:
        excl = seen.clone()
        excl.scatter_(1, targets.unsqueeze(1), False)
        s = s.masked_fill(excl, float("-inf"))
    else:
        s[:, 0] = float("-inf")
    t = s.gather(1, targets.unsqueeze(1))
    return (s > t).sum(1) + 1


def rank_metrics(ranks: torch.Tensor, k: int = 10) -> dict[str, float]:
    hit = (ranks <= k).float()
    ndcg = hit / torch.log2(ranks.float() + 1.0)
    return {f"HR@{k}": float(hit.mean()), f"NDCG@{k}": float(ndcg.mean())}
