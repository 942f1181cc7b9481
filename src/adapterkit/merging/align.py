"""Permutation alignment of adapter hidden units (MerA-style "model fusion", experimental).

The hidden units of a bottleneck adapter (rows of W_down and b_down, columns of W_up)
or of a LoRA (rows of A, columns of B) can be permuted without changing the function.
Before averaging adapters trained separately, each one's units are matched to a
reference adapter's units with the Hungarian algorithm on the down-projection rows
(plus bias), and the same permutation is applied to every tensor that indexes the
hidden dimension.
"""

from __future__ import annotations

import torch

from adapterkit.errors import ConfigError

# (in-module tensor name, hidden dimension) for each pair type
HIDDEN_DIMS = {
    "down.weight": 1, "down.bias": 1, "up.weight": 2,   # bottleneck: (n, m, d), (n, m), (n, d, m)
    "A.weight": 1, "B.weight": 2,                        # LoRA: (n, r, in), (n, out, r)
}
PAIRS = (("down", "up"), ("A", "B"))


def hidden_groups(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Module prefixes that hold a (down, up) or (A, B) pair: ``{prefix: (down_name, up_name)}``."""
    out = {}
    for k in tensors:
        for d, u in PAIRS:
            suffix = f".{d}.weight"
            if k.endswith(suffix):
                prefix = k[: -len(suffix)]
                if f"{prefix}.{u}.weight" in tensors:
                    out[prefix] = (d, u)
    return out


def match_features(tensors: dict[str, torch.Tensor], prefix: str, down: str, up: str,
                   match_on: str = "down") -> torch.Tensor:
    """One feature row per hidden unit: the down rows (all copies) and the down bias, plus
    the up columns when ``match_on == "both"``. Shape (m, f)."""
    w = tensors[f"{prefix}.{down}.weight"].detach().float()          # (n, m, d)
    feats = [w.permute(1, 0, 2).reshape(w.shape[1], -1)]
    b = tensors.get(f"{prefix}.{down}.bias")
    if b is not None:
        feats.append(b.detach().float().t())                          # (m, n)
    if match_on == "both":
        u = tensors[f"{prefix}.{up}.weight"].detach().float()         # (n, d, m)
        feats.append(u.permute(2, 0, 1).reshape(u.shape[2], -1))
    elif match_on != "down":
        raise ConfigError(f'match_on must be "down" or "both", got {match_on!r}')
    return torch.cat(feats, dim=1)


def hungarian_permutation(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``perm`` such that ``other[perm]`` best matches ``ref`` row by row (min total squared distance)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:  # pragma: no cover - scipy is a dependency of this feature
        raise ConfigError("aligned merging needs scipy (pip install scipy)") from e
    if ref.shape != other.shape:
        raise ConfigError(f"cannot align hidden units: feature shapes differ {tuple(ref.shape)} vs {tuple(other.shape)}")
    cost = torch.cdist(ref.double(), other.double()).pow(2)
    rows, cols = linear_sum_assignment(cost.numpy())
    perm = torch.empty(ref.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def permute_hidden(tensors: dict[str, torch.Tensor], prefix: str, perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """A copy of ``tensors`` with the hidden units of module ``prefix`` reordered by ``perm``."""
    out = dict(tensors)
    for name, dim in HIDDEN_DIMS.items():
        key = f"{prefix}.{name}"
        if key in out:
            out[key] = out[key].index_select(dim, perm.to(out[key].device))
    return out


def align_to(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
             match_on: str = "down") -> dict[str, torch.Tensor]:
    """``other`` with every adapter module's hidden units permuted to match ``reference``."""
    out = dict(other)
    other_groups = hidden_groups(other)
    for prefix, (d, u) in hidden_groups(reference).items():
        if prefix not in other_groups:
            raise ConfigError(f"cannot align: {prefix} is missing from one adapter")
        perm = hungarian_permutation(match_features(reference, prefix, d, u, match_on),
                                     match_features(out, prefix, d, u, match_on))
        out = permute_hidden(out, prefix, perm)
    return out


__all__ = ["align_to", "hidden_groups", "hungarian_permutation", "match_features", "permute_hidden"]
