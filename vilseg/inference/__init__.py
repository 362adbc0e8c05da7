"""Inference: the Segmenter (grouping + naming + decision + tiling strategies) and the faiss VocabularyIndex."""
from .segmenter import ReadOut, SegmentationResult, Segmenter, load_image
from .strategies import (BackgroundWordsDecision, ClusterGrouping, DenseGrouping, NoDecision, PooledNaming,
                         ReencodeGlobalNaming, SlidingWindow, ThresholdDecision, connected_components)
from .vocabulary import DEFAULT_TEMPLATES, VocabularyIndex

__all__ = ["BackgroundWordsDecision", "ClusterGrouping", "DEFAULT_TEMPLATES", "DenseGrouping", "NoDecision",
           "PooledNaming", "ReadOut", "ReencodeGlobalNaming", "SegmentationResult", "Segmenter", "SlidingWindow",
           "ThresholdDecision", "VocabularyIndex", "connected_components", "load_image"]
