"""Image encoders: our ViT and adapters for external encoders (timm, Hugging Face,
vit-pytorch; their packages are imported only when used)."""

from .adapters import as_image_tokens, encode_images
from .external import (
    EncoderAdapter,
    HFVisionEncoder,
    TimmEncoder,
    VitPytorchEncoder,
    build_encoder,
    encoder_spec,
    register_encoder,
    registered_encoders,
    wrap_encoder,
)
from .video import VideoTubeConfig, VideoTubeViT, sincos_3d
from .vit import ViT, ViTConfig

__all__ = [
    "ViT", "ViTConfig", "as_image_tokens", "encode_images", "EncoderAdapter", "HFVisionEncoder",
    "TimmEncoder", "VitPytorchEncoder", "build_encoder", "encoder_spec", "wrap_encoder",
    "register_encoder", "registered_encoders",
    "VideoTubeConfig", "VideoTubeViT", "sincos_3d",
]
