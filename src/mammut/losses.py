"""Losses: symmetric softmax contrastive (CLIP), focal sigmoid contrastive (RO-ViT /
MaMMUT), captioning cross-entropy, and the cross-rank feature gather.

Caption labels are ids in ``[0, vocab)`` or ``IGNORE_INDEX`` (-100, Hugging Face's ignore
index): a ``-100`` position counts exactly as a pad one, for nothing (no loss, no gradient,
not in the token mean); any other label is a ``ValueError`` naming it, before any compute.

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

from .constants import IGNORE_INDEX  # a label with no target (-100): ignored as pad

__all__ = [
    "IGNORE_INDEX",
    "check_labels",
    "gather_with_grad",
    "softmax_contrastive_loss",
    "focal_contrastive_loss",
    "FOCAL_DIRECTIONS",
    "caption_loss",
    "linear_caption_loss",
    "LogitScale",
    "ContrastiveLoss",
]


def check_labels(labels: object, num_tokens: int, *, shape: tuple[int, ...] | None = None, name: str = "labels") -> None:
    """``labels`` must be an integer tensor (of ``shape`` when given) of target ids in
    ``[0, num_tokens)`` or ``IGNORE_INDEX`` (-100: no target there, exactly as pad). One host
    sync; the bad values are gathered only on the error path."""
    if not torch.is_tensor(labels) or labels.dtype.is_floating_point or labels.is_complex() or labels.dtype == torch.bool:
        got = f"{type(labels).__name__} {getattr(labels, 'dtype', '')}"
        raise TypeError(f"{name}: expected an integer tensor of target ids, got {got}")
    if shape is not None and tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(labels.shape)}")
    bad = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= num_tokens)
    if bool(bad.any()):
        values = labels[bad].unique()
        shown = values[:8].tolist()
        more = f" (and {values.numel() - 8} more)" if values.numel() > 8 else ""
        raise ValueError(
            f"{name}: expected target ids in [0, {num_tokens}) (num_tokens) or {IGNORE_INDEX} (ignored, as pad), "
            f"got {int(bad.sum())} bad value(s): {shown}{more}"
        )


def _targets(labels: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """``labels`` as int64 with every position that has no target (``pad_id``, ``IGNORE_INDEX``)
    set to ``IGNORE_INDEX``."""
    y = labels.long()
    if pad_id is not None and pad_id != IGNORE_INDEX:
        y = y.masked_fill(y == pad_id, IGNORE_INDEX)
    return y


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


FOCAL_DIRECTIONS = ("mean", "sum")


def _check_directions(directions: object) -> None:
    if not isinstance(directions, str) or directions not in FOCAL_DIRECTIONS:
        raise ValueError(f"directions: expected 'mean' or 'sum', got {directions!r}")


def focal_contrastive_loss(
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    alpha: float = 0.5,
    gamma: float = 1.0,
    logit_bias: torch.Tensor | float = 0.0,
    directions: str = "mean",
) -> torch.Tensor:
    """Focal sigmoid contrastive loss (RO-ViT, arXiv 2305.07011) over L2-normalised ``(b, d)``
    embeddings, gathered across ranks.

    Each direction (text->image logits ``s * T @ I.T + bias``, image->text ``s * I @ T.T +
    bias``) is a sigmoid cross-entropy over its ``B x B`` matrix with one-hot diagonal
    targets, each entry weighted ``2*alpha`` (positive) or ``2*(1-alpha)`` (negative; both 1
    at ``alpha=0.5``) and modulated by ``(1 - p_t)^gamma``, summed over entries and divided
    by the batch size ``B``. ``directions`` says how the two are combined:

    - ``"mean"`` (default): their average, on the scale of one direction (as the softmax
      CLIP loss averages its two);
    - ``"sum"``: their sum, RO-ViT's ``L_I2T + L_T2I`` (which MaMMUT's paper uses); exactly
      twice ``"mean"``, so it is the same objective at twice the learning signal.
    """
    _check_directions(directions)
    all_text = gather_with_grad(text_embeds)
    all_image = gather_with_grad(image_embeds)
    b = text_embeds.shape[0]
    labels = _local_labels(b, text_embeds.device)
    targets = F.one_hot(labels, all_text.shape[0]).to(text_embeds.dtype)
    logits_t2i = logit_scale * text_embeds @ all_image.t() + logit_bias
    logits_i2t = logit_scale * image_embeds @ all_text.t() + logit_bias
    total = _focal_sigmoid_sum(logits_t2i, targets, alpha, gamma) + _focal_sigmoid_sum(logits_i2t, targets, alpha, gamma)
    return (0.5 if directions == "mean" else 1.0) * total / b


def caption_loss(logits: torch.Tensor, labels: torch.Tensor, *, pad_id: int | None = 0) -> torch.Tensor:
    """Next-token cross-entropy, mean over the label tokens that have a target. logits
    ``(b, n, v)``, labels ``(b, n)`` ids in ``[0, v)`` or ``-100`` (``IGNORE_INDEX``); positions
    labelled ``pad_id`` or ``-100`` count for nothing (no loss, no gradient, not in the mean).
    ``pad_id=None``: only ``-100`` is ignored. Other labels are a ``ValueError``, before any
    compute."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"labels: expected shape {tuple(logits.shape[:2])}, got {tuple(labels.shape)}")
    check_labels(labels, logits.shape[-1])
    return _caption_loss(logits, labels, pad_id)


def _caption_loss(logits: torch.Tensor, labels: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """``caption_loss`` without the label checks (the caller made them)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), _targets(labels, pad_id).flatten(), ignore_index=IGNORE_INDEX)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` over rows whose label is not ``ignore``
    (the only negative label it may get: the gather reads ignored rows at id 0, weighted 0),
    a few rows at a time: the ``(rows, vocab)`` logits never exist whole. The gradients are
    formed chunk by chunk in the forward (softmax minus one-hot needs only that chunk's
    logits) and scaled by the incoming gradient in the backward. Same matmuls, hence the same
    FLOPs, as logits + ``F.cross_entropy``; the memory is ``O(chunk * vocab)`` instead of
    ``O(rows * vocab)``."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore: int, chunk: int):  # type: ignore[override]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        keep = labels != ignore
        count = keep.sum().clamp(min=1).to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        for start in range(0, hidden.shape[0], chunk):
            h, y, k = hidden[start:start + chunk], labels[start:start + chunk], keep[start:start + chunk]
            # logits transposed, (v, c): weights on the left, the layout BLAS runs fastest here
            # (figures: README, "Where the time goes")
            logits = (weight @ h.t()).float()  # v c
            # log-sum-exp by hand: ATen's fused (log_)softmax / logsumexp run several times
            # slower than these in-place passes on CPU at a real vocabulary (README, "Where the time goes")
            target = logits.gather(0, y.clamp(min=0).unsqueeze(0)).squeeze(0)
            top = logits.amax(dim=0, keepdim=True)
            sums = logits.sub_(top).exp_().sum(dim=0, keepdim=True)  # logits now hold exp(z - max)
            lse = top.squeeze(0) + sums.squeeze(0).log()
            total += torch.where(k, lse - target, 0.0).sum()
            if want_h or want_w:
                w = k.to(logits.dtype).unsqueeze(0) / count
                g = logits.mul_(w / sums)  # softmax, weighted
                g.scatter_add_(0, y.clamp(min=0).unsqueeze(0), -w)  # minus one-hot
                g = g.to(hidden.dtype)  # v c
                if want_h:
                    torch.mm(g.t(), weight, out=grad_h[start:start + chunk])
                if want_w and g.dtype == torch.float32:  # accumulate in place, no temporary
                    torch.addmm(grad_w, g, h, beta=1.0 if start else 0.0, out=grad_w)
                elif want_w and start:
                    grad_w.add_(g @ h)
                elif want_w:
                    grad_w.copy_(g @ h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype, ctx.done = weight.dtype, False
        return total / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        # the gradients were formed in the forward: scale them in place (the backward runs once)
        if ctx.done:
            raise RuntimeError("linear_caption_loss: backward ran twice through the same graph (retain_graph)")
        ctx.done = True
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h.mul_(grad_out.to(grad_h.dtype)) if grad_h is not None else None
        gw = grad_w.mul_(grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_caption_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    pad_id: int | None = 0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``caption_loss(hidden @ weight.T, labels)`` without materialising the logits.

    hidden ``(b, n, d)`` (the decoder's final, normed states), weight ``(v, d)`` (the output
    projection, often tied to the token embedding), labels ``(b, n)`` (ids in ``[0, v)``, or
    ``-100``: ignored as ``pad_id`` is). ``chunk_size`` rows go through at a time (default:
    about 2M logits, 8 MB in float32). Exactly the mean next-token cross-entropy over the
    labels that have a target, as ``caption_loss``; it saves the ``(b*n, v)`` logits, their
    log-softmax and their gradient, the largest tensors of a training step at a real
    vocabulary.
    """
    if hidden.ndim != 3 or hidden.shape[:2] != labels.shape:
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:2])} (hidden's (b, n)), got {tuple(labels.shape)}")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape (vocab, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    check_labels(labels, weight.shape[0])
    return _linear_caption_loss(hidden, weight, labels, pad_id, chunk_size)


def _linear_caption_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, pad_id: int | None, chunk_size: int | None = None
) -> torch.Tensor:
    """``linear_caption_loss`` without the checks (the caller made them)."""
    if chunk_size is None:
        chunk_size = max(16, (1 << 21) // weight.shape[0])
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else None
    h = hidden.flatten(0, 1)
    if dtype is not None and h.dtype != dtype:  # what autocast would run the output matmul in
        h = h.to(dtype)
    w = weight if weight.dtype == h.dtype else weight.to(h.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, w, _targets(labels, pad_id).flatten(), IGNORE_INDEX, chunk_size)


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
    ``alpha``, ``gamma`` and ``directions`` (``"mean"`` or ``"sum"`` of the two directions,
    see ``focal_contrastive_loss``) are the focal loss's; the softmax loss ignores ``alpha``
    and ``gamma`` and always averages its two directions (CLIP's convention), so
    ``directions="sum"`` with ``kind="softmax"`` is a ``ValueError`` rather than silently
    ignored.
    """

    def __init__(
        self,
        kind: str = "softmax",
        *,
        alpha: float = 0.5,
        gamma: float = 1.0,
        init_scale: float = 1 / 0.07,
        directions: str = "mean",
    ) -> None:
        super().__init__()
        if kind not in ("softmax", "focal"):
            raise ValueError(f"contrastive_loss: expected 'softmax' or 'focal', got {kind!r}")
        _check_directions(directions)
        if kind == "softmax" and directions != "mean":
            raise ValueError(
                f"directions: expected 'mean' with kind='softmax' (the CLIP loss averages its two directions; "
                f"'sum' is the focal loss's RO-ViT option), got {directions!r}"
            )
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"focal_alpha: expected a value in [0, 1], got {alpha}")
        if gamma < 0:
            raise ValueError(f"focal_gamma: expected >= 0, got {gamma}")
        self.kind, self.alpha, self.gamma, self.directions = kind, alpha, gamma, directions
        self.logit_scale = LogitScale(init_scale)

    def forward(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        scale = self.logit_scale()
        if self.kind == "softmax":
            return softmax_contrastive_loss(text_embeds, image_embeds, scale)
        return focal_contrastive_loss(
            text_embeds, image_embeds, scale, alpha=self.alpha, gamma=self.gamma, directions=self.directions
        )
