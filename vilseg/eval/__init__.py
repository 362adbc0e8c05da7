"""Evaluation beyond mIoU: probes of what an image encoder's patch features hold (MMC's two evaluations, shape
naming, linear probes). Each probe works with any vilseg model; the encoder-only ones also with a bare encoder."""
from .probes import (EncoderFeatures, instance_masks, intra_inter_similarity, linear_probe, object_features,
                     patch_naming_accuracy, prompt_patch_segmentation)

__all__ = ["EncoderFeatures", "instance_masks", "intra_inter_similarity", "linear_probe", "object_features",
           "patch_naming_accuracy", "prompt_patch_segmentation"]
