"""Composable sparse fine-tuning (LT-SFT): lottery-ticket training of a K-entry
parameter difference, sparse storage, and apply / remove / compose."""

from adapterkit.sft.diff import SparseDiff, apply_sft, compose, remove_sft, top_k_masks
from adapterkit.sft.lottery import LotteryTicketSFT, lt_sft

__all__ = ["LotteryTicketSFT", "SparseDiff", "apply_sft", "compose", "lt_sft", "remove_sft", "top_k_masks"]
