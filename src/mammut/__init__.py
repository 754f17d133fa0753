"""mammut: image-text foundation models (MaMMUT, CoCa, Flamingo, M2PT) in PyTorch.

The library core imports only torch and einops. The library (layers, encoders, losses, models,
generation, convert, io, loading) never imports the application (data, tasks, train, eval,
apps, cli); the layers are a contract in ``pyproject.toml`` (``[tool.importlinter]``).
"""

from collections.abc import Callable as _Callable
from typing import Any as _Any

from torch.nn import Module as _Module

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
from .io.checkpoint import CheckpointError
from .models.pretrained import load_pretrained, save_pretrained
from .loading import Loaded, MissingComponent, MissingComponentError, load
from .embedder import Embedder
from .preprocess import CLIP_MEAN, CLIP_STD, ImagePreprocess
from .precision import Precision, resolve_precision
from .layers.perceiver import PerceiverResampler
from .transforms.m2pt import CrossModalReparameterization, MPTransformerBlock, add_pathways, merge_pathways, pathway_scales
from .models.coca import CoCa, CoCaConfig
from .models.flamingo import FlamingoConfig, FlamingoPaLM, GatedCrossAttentionBlock
from .models.mammut import LossOutput, MaMMUT, MaMMUTConfig
from .models.detector import DetectorConfig, MaMMUTDetector

from ._version import __version__
from .models import set_open_clip_lookup as _set_open_clip_lookup


def _open_clip_converter(model_name: _Any) -> _Callable[..., _Module]:
    """``Model.from_open_clip``'s converter: ``mammut.convert`` (which imports the models, so
    the models cannot import it) is imported here on first use, never by ``import mammut``."""
    from .convert import open_clip_converter

    return open_clip_converter(model_name)


_set_open_clip_lookup(_open_clip_converter)

__all__ = [
    "MaMMUT",
    "MaMMUTConfig",
    "LossOutput",
    "MaMMUTDetector",
    "DetectorConfig",
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
    "Embedder",
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
