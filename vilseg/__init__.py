"""vilseg: open-vocabulary semantic segmentation learned from image-caption pairs alone.

``import vilseg`` needs neither webdataset nor accelerate: those are imported by the training code only.
"""
from .models import ViLSeg, create_model, list_models

__version__ = "0.1.0"


def __getattr__(name):
    if name in ("Segmenter", "VocabularyIndex", "ReadOut"):  # lazy: faiss is imported only when segmenting
        from . import inference

        return getattr(inference, name)
    raise AttributeError(name)


__all__ = ["ReadOut", "Segmenter", "ViLSeg", "VocabularyIndex", "create_model", "list_models", "__version__"]
