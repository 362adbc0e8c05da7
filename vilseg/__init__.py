"""vilseg: open-vocabulary semantic segmentation learned from image-caption pairs alone.

Everything is imported lazily (PEP 562): ``import vilseg`` and ``vilseg --help`` load neither torch nor faiss, and
``import vilseg`` needs neither webdataset nor accelerate (the training code imports those).
"""
__version__ = "0.1.0"

_LAZY = {"ViLSeg": "models", "create_model": "models", "list_models": "models", "Segmenter": "inference",
         "VocabularyIndex": "inference", "ReadOut": "inference"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'vilseg' has no attribute {name!r}")


__all__ = ["ReadOut", "Segmenter", "ViLSeg", "VocabularyIndex", "create_model", "list_models", "__version__"]
