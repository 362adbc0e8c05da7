"""Evaluation without mmcv: dataset readers for the 8 standard benchmarks and the synthetic world (``datasets``),
the two protocol lineages (``protocols``: presets A and B), their geometry (``geometry``), mmseg-exact mIoU
(``metrics``), dense predictors (``predictors``: a vilseg model's Segmenter read-out, or open_clip with MaskCLIP's),
the evaluator (``runner``), PAMR, and probes of what an encoder's patch features hold (``probes``: MMC's two
evaluations, linear probes)."""
from .datasets import DATASETS, Dataset, DatasetError, convert_coco_object, load_dataset, load_split
from .geometry import rescale_size, resize_image, sliding_windows
from .metrics import IGNORE_INDEX, IoUAccumulator, markdown_table
from .pamr import pamr
from .predictors import SegmenterScores
from .probes import (EncoderFeatures, TimmFeatures, instance_masks, intra_inter_similarity, linear_probe, object_features,
                     patch_naming_accuracy, probe_synthetic, prompt_patch_segmentation)
from .protocols import Protocol, apply_overrides, preset
from .runner import (PredictionsError, calibrate_threshold, chance_accumulator, class_score_maps, coverage, evaluate,
                     score_predictions, score_thresholds, write_overlays, write_report)

__all__ = ["DATASETS", "Dataset", "DatasetError", "EncoderFeatures", "IGNORE_INDEX", "IoUAccumulator",
           "PredictionsError", "Protocol", "SegmenterScores", "TimmFeatures", "apply_overrides",
           "calibrate_threshold", "chance_accumulator", "class_score_maps", "convert_coco_object", "coverage",
           "evaluate", "instance_masks", "intra_inter_similarity", "linear_probe", "load_dataset", "load_split",
           "markdown_table", "object_features", "pamr", "patch_naming_accuracy", "preset", "probe_synthetic",
           "prompt_patch_segmentation", "rescale_size", "resize_image", "score_predictions", "score_thresholds",
           "sliding_windows", "write_overlays", "write_report"]
