"""Losses: symmetric softmax contrastive (CLIP), focal sigmoid contrastive (RO-ViT /
MaMMUT), captioning cross-entropy, and the cross-rank feature gather.

Across ranks each rank scores its local rows against the gathered columns of every rank,
with labels offset by ``rank * local_batch``; averaged over ranks (as DDP averages
gradients) this equals the loss and gradients of one process holding the whole batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "gather_with_grad",
    "softmax_contrastive_loss",
    "focal_contrastive_loss",
    "caption_loss",
    "LogitScale",
    "ContrastiveLoss",
]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums every rank's gradient for the local rows
    (all-reduce then slice, which also works on gloo, that has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, world = _world()
        ctx.rank, ctx.batch = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.batch:(ctx.rank + 1) * ctx.batch]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` ``(b, ...)`` (same ``b`` on every rank) along dim 0, keeping the
    autograd graph: gradients flow back to the rank that produced each row. Identity on
    one process."""
    _, world = _world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


def _local_labels(local_batch: int, device: torch.device) -> torch.Tensor:
    rank, _ = _world()
    return torch.arange(local_batch, device=device) + rank * local_batch


def softmax_contrastive_loss(
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Symmetric InfoNCE over L2-normalised ``(b, d)`` embeddings, gathered across ranks.

    ``0.5 * (CE(image->text) + CE(text->image))``, the mean over the batch.
    """
    all_text = gather_with_grad(text_embeds)
    all_image = gather_with_grad(image_embeds)
    labels = _local_labels(text_embeds.shape[0], text_embeds.device)
    logits_t2i = logit_scale * text_embeds @ all_image.t()
    logits_i2t = logit_scale * image_embeds @ all_text.t()
    return 0.5 * (F.cross_entropy(logits_t2i, labels) + F.cross_entropy(logits_i2t, labels))


def _focal_sigmoid_sum(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    # per-entry sigmoid cross-entropy, modulated by (1 - p_t)^gamma computed in log space
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    # 1 - p_t = sigmoid(-x) for positives and sigmoid(x) for negatives: stable in log space
    log_one_minus_pt = F.logsigmoid(-logits * (2 * targets - 1))
    modulator = torch.exp(gamma * log_one_minus_pt)
    weight = targets * (2 * alpha) + (1 - targets) * (2 * (1 - alpha))
    return (weight * modulator * ce).sum()


def focal_contrastive_loss(
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    alpha: float = 0.5,
    gamma: float = 1.0,
    logit_bias: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Focal sigmoid contrastive loss (RO-ViT): sigmoid cross-entropy over the ``B x B``
    logit matrix with one-hot diagonal targets, each entry weighted ``2*alpha`` (positive) or
    ``2*(1-alpha)`` (negative) and modulated by ``(1 - p_t)^gamma``; summed over entries,
    applied in both directions and averaged, normalised by the batch size ``B``.
    """
    all_text = gather_with_grad(text_embeds)
    all_image = gather_with_grad(image_embeds)
    b = text_embeds.shape[0]
    labels = _local_labels(b, text_embeds.device)
    targets = F.one_hot(labels, all_text.shape[0]).to(text_embeds.dtype)
    logits_t2i = logit_scale * text_embeds @ all_image.t() + logit_bias
    logits_i2t = logit_scale * image_embeds @ all_text.t() + logit_bias
    total = _focal_sigmoid_sum(logits_t2i, targets, alpha, gamma) + _focal_sigmoid_sum(logits_i2t, targets, alpha, gamma)
    return 0.5 * total / b


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, *, pad_id: int | None = 0) -> torch.Tensor:
    """Next-token cross-entropy, mean over non-pad label tokens. logits ``(b, n, v)``,
    labels ``(b, n)``."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"labels: expected shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    ignore = -100 if pad_id is None else pad_id
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=ignore)


class LogitScale(nn.Module):
    """Learnable temperature: ``exp(log_scale)`` initialised at ``init`` (CLIP: 1/0.07),
    clamped at ``max_scale``."""

    def __init__(self, init: float = 1 / 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)))
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)


class ContrastiveLoss(nn.Module):
    """A contrastive objective with its own learnable temperature.

    ``kind="softmax"`` (CLIP/CoCa) or ``"focal"`` (focal sigmoid, RO-ViT/MaMMUT).
    forward(text_embeds ``(b, d)``, image_embeds ``(b, d)``), both L2-normalised -> scalar.
    """

    def __init__(self, kind: str = "softmax", *, alpha: float = 0.5, gamma: float = 1.0, init_scale: float = 1 / 0.07) -> None:
        super().__init__()
        if kind not in ("softmax", "focal"):
            raise ValueError(f"contrastive_loss: expected 'softmax' or 'focal', got {kind!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"focal_alpha: expected a value in [0, 1], got {alpha}")
        if gamma < 0:
            raise ValueError(f"focal_gamma: expected >= 0, got {gamma}")
        self.kind, self.alpha, self.gamma = kind, alpha, gamma
        self.logit_scale = LogitScale(init_scale)

    def forward(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        scale = self.logit_scale()
        if self.kind == "softmax":
            return softmax_contrastive_loss(text_embeds, image_embeds, scale)
        return focal_contrastive_loss(text_embeds, image_embeds, scale, alpha=self.alpha, gamma=self.gamma)
