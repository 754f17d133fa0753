"""Image encoders: our ViT and adapters for external encoders."""

from .adapters import as_image_tokens, encode_images
from .vit import ViT, ViTConfig

__all__ = ["ViT", "ViTConfig", "as_image_tokens", "encode_images"]
