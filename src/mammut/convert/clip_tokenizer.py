"""open_clip's CLIP BPE tokenizer, which lives in the library: :mod:`mammut.clip_tokenizer`
(a converted open_clip checkpoint is saved and loaded with it). Re-exported here beside the
converters that use it."""

from __future__ import annotations

from ..clip_tokenizer import CLIPTokenizer

__all__ = ["CLIPTokenizer"]
