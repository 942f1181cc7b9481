"""Composable sparse fine-tuning (LT-SFT): lottery-ticket training of a K-entry
parameter difference, sparse storage, and apply / remove / compose; language SFTs
(masked-LM LT-SFT) that compose with task SFTs."""

from adapterkit.sft.diff import SparseDiff, apply_sft, compose, remove_sft, top_k_masks
from adapterkit.sft.language import language_sft, load_mlm_model, mask_tokens, mlm_loss
from adapterkit.sft.lottery import LotteryTicketSFT, lt_sft

__all__ = ["LotteryTicketSFT", "SparseDiff", "apply_sft", "compose", "language_sft", "load_mlm_model", "lt_sft",
           "mask_tokens", "mlm_loss", "remove_sft", "top_k_masks"]
