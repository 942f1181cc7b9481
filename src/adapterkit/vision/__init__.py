"""Image classification with adapters: AdaptFormer, VPT, linear probing (see :mod:`.pipeline`)."""

from adapterkit.vision.data import load_fashion_mnist, load_image_folder, read_idx, select_classes
from adapterkit.vision.models import ADAPTFORMER, ADAPTFORMER_SEQUENTIAL, ImageClassifier, LinearProbeHead
from adapterkit.vision.pipeline import run_vision

__all__ = ["ADAPTFORMER", "ADAPTFORMER_SEQUENTIAL", "ImageClassifier", "LinearProbeHead", "load_fashion_mnist",
           "load_image_folder", "read_idx", "run_vision", "select_classes"]
