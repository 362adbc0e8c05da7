"""vilseg: open-vocabulary semantic segmentation learned from image-caption pairs alone.

``import vilseg`` needs neither webdataset nor accelerate: those are imported by the training code only.
"""
from .models import ViLSeg, create_model, list_models

__version__ = "0.1.0"


def __getattr__(name):
    if name == "Segmenter":  # lazy: faiss is imported only when segmenting
        from .segment import Segmenter

        return Segmenter
    raise AttributeError(name)


__all__ = ["Segmenter", "ViLSeg", "create_model", "list_models", "__version__"]
