"""Merging saved adapters: plain and permutation-aligned averages (MerA-style: hidden units
matched by weights, or by activations on shared inputs, :mod:`adapterkit.merging.activations`,
with MerA's merge-then-few-shot pipeline) for bottleneck adapters and LoRA, and task
arithmetic / TIES / DARE for LoRA. The result is an
ordinary adapterkit adapter directory (loads with :func:`adapterkit.load_adapters`)."""

from adapterkit.merging.activations import activation_permutations, mera_few_shot, merge_by_activations
from adapterkit.merging.adapter_dir import AdapterDir, read_adapter_dir, write_adapter_dir
from adapterkit.merging.align import align_to, hungarian_permutation, permute_hidden
from adapterkit.merging.lora_merge import combine, svd_factor
from adapterkit.merging.merge import METHODS, merge_adapter_dirs

__all__ = ["AdapterDir", "METHODS", "activation_permutations", "align_to", "combine", "hungarian_permutation",
           "mera_few_shot", "merge_adapter_dirs", "merge_by_activations", "permute_hidden", "read_adapter_dir",
           "svd_factor", "write_adapter_dir"]
