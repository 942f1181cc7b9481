"""adapterkit: parameter-efficient transfer learning with adapters.

The core API::

    import adapterkit
    model = adapterkit.add_adapters(model, {"method": "houlsby", "reduction_factor": 8,
                                            "tasks": ["vqa", "gqa"], "sharing": "shared"})
    with adapterkit.route(["vqa", "gqa", "vqa"]):   # one task per example
        out = model(**batch)
    adapterkit.save_adapters(model, "out/")
"""

from adapterkit.core.adapterhub_interop import import_adapterhub
from adapterkit.core.base import (
    add_adapters,
    apply_freeze_policy,
    cast_frozen,
    merge_adapters,
    merge_and_unload,
    remove_adapters,
    trainable_report,
    unmerge_adapters,
)
from adapterkit.core.checkpointing import enable_activation_checkpointing
from adapterkit.core.composition import Average, Fuse, Parallel, Stack, compose
from adapterkit.core.config import config_from_dict, registered_methods
from adapterkit.core.fused import fuse_branches
from adapterkit.core.graphs import GraphedStep
from adapterkit.core.hf import from_pretrained, print_trainable_parameters
from adapterkit.core.io import load_adapters, save_adapters
from adapterkit.core.peft_interop import export_peft, import_peft
from adapterkit.core.quant import dequantize_frozen, quantize_frozen
from adapterkit.core.routing import route
from adapterkit.errors import AdapterKitError, CheckpointError, ConfigError, DataError

__version__ = "0.1.0"

__all__ = [
    "AdapterKitError", "CheckpointError", "ConfigError", "DataError", "GraphedStep",
    "Average", "Fuse", "Parallel", "Stack", "compose",
    "add_adapters", "apply_freeze_policy", "cast_frozen", "config_from_dict", "dequantize_frozen",
    "enable_activation_checkpointing",
    "export_peft", "from_pretrained", "fuse_branches", "import_adapterhub",
    "import_peft",
    "load_adapters", "merge_adapters", "merge_and_unload", "print_trainable_parameters", "registered_methods",
    "quantize_frozen", "remove_adapters", "route",
    "save_adapters", "trainable_report", "unmerge_adapters", "__version__",
]
