from .config import ImageEncoderConfig, ModelConfig, TextEncoderConfig
from .factory import create_model, from_open_clip, get_model_config, list_models
from .image_encoder import ImageEncoder, ImageFeatures, tokens_to_map
from .vilseg import ViLSeg

__all__ = ["ImageEncoder", "ImageEncoderConfig", "ImageFeatures", "ModelConfig", "TextEncoderConfig", "ViLSeg",
           "create_model", "from_open_clip", "get_model_config", "list_models", "tokens_to_map"]
