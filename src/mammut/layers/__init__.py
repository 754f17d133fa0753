"""Shared transformer layers: the only place attention, masks, feed-forward, norms and
poolers are written."""

from .attention import Attention, CrossAttention, attend
from .blocks import CrossAttentionBlock, ParallelBlock, TransformerBlock
from .dropout import Dropout, dropout_enabled, no_dropout, stochastic
from .feedforward import FeedForward
from .kv_cache import KVCache, StaticKVCache
from .linear import Linear, linear
from .masks import causal_mask, combine_masks, decoder_mask, is_right_padded, padding_mask, positions_from_mask
from .norms import LayerNorm, RMSNorm, make_norm
from .pooling import AttentionPooler, masked_mean
from .rotary import RotaryEmbedding, apply_rotary

__all__ = [
    "Attention", "CrossAttention", "attend", "CrossAttentionBlock", "ParallelBlock", "TransformerBlock",
    "Dropout", "dropout_enabled", "no_dropout", "stochastic",
    "FeedForward", "KVCache", "StaticKVCache", "Linear", "linear", "causal_mask", "combine_masks", "decoder_mask", "is_right_padded", "padding_mask",
    "positions_from_mask", "LayerNorm", "RMSNorm", "make_norm", "AttentionPooler", "masked_mean",
    "RotaryEmbedding", "apply_rotary",
]
