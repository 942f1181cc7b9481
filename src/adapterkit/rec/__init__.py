"""Adapter-based transferable sequential recommendation (Adapter4Rec / TransRec)."""

from adapterkit.rec.data import RecData, bbc_interactions, read_amazon, read_mind
from adapterkit.rec.domain import RecDomain, RecRun
from adapterkit.rec.metrics import history_mask, rank_metrics, target_ranks
from adapterkit.rec.model import SASREC_PLACES, Adapter4Rec, ItemEncoder, SASRecEncoder, attach_rec_method
from adapterkit.rec.pipeline import evaluate, run_rec

__all__ = ["SASREC_PLACES", "Adapter4Rec", "ItemEncoder", "RecData", "RecDomain", "RecRun", "SASRecEncoder",
           "attach_rec_method", "bbc_interactions", "evaluate", "history_mask", "rank_metrics", "read_amazon",
           "read_mind", "run_rec", "target_ranks"]
