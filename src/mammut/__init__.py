"""mammut: image-text foundation models (MaMMUT, CoCa, Flamingo, M2PT) in PyTorch.

The library core imports only torch and einops.
"""

from .encoders import VideoTubeConfig, VideoTubeViT, ViT, ViTConfig
from .layers import KVCache, StaticKVCache
from .losses import (
    ContrastiveLoss,
    caption_loss,
    focal_contrastive_loss,
    gather_with_grad,
    softmax_contrastive_loss,
)
from .models import create_model, get_model_class, list_models, register_model
from .generation import GenerationConfig, GenerationOutput, caption, generate
from .io.checkpoint import CheckpointError, load_pretrained, save_pretrained
from .loading import Loaded, MissingComponent, MissingComponentError, load
from .preprocess import CLIP_MEAN, CLIP_STD, ImagePreprocess
from .precision import Precision, resolve_precision
from .layers.perceiver import PerceiverResampler
from .transforms.m2pt import CrossModalReparameterization, MPTransformerBlock, add_pathways, merge_pathways, pathway_scales
from .models.coca import CoCa, CoCaConfig
from .models.flamingo import FlamingoConfig, FlamingoPaLM, GatedCrossAttentionBlock
from .models.mammut import LossOutput, MaMMUT, MaMMUTConfig

__version__ = "0.1.0"

__all__ = [
    "MaMMUT",
    "MaMMUTConfig",
    "LossOutput",
    "CoCa",
    "CoCaConfig",
    "FlamingoPaLM",
    "FlamingoConfig",
    "GatedCrossAttentionBlock",
    "PerceiverResampler",
    "CrossModalReparameterization",
    "MPTransformerBlock",
    "add_pathways",
    "merge_pathways",
    "pathway_scales",
    "generate",
    "caption",
    "GenerationConfig",
    "GenerationOutput",
    "save_pretrained",
    "load_pretrained",
    "CheckpointError",
    "load",
    "Loaded",
    "MissingComponent",
    "MissingComponentError",
    "ImagePreprocess",
    "CLIP_MEAN",
    "CLIP_STD",
    "Precision",
    "resolve_precision",
    "ViT",
    "ViTConfig",
    "VideoTubeConfig",
    "VideoTubeViT",
    "KVCache",
    "StaticKVCache",
    "ContrastiveLoss",
    "caption_loss",
    "focal_contrastive_loss",
    "softmax_contrastive_loss",
    "gather_with_grad",
    "create_model",
    "get_model_class",
    "list_models",
    "register_model",
]
