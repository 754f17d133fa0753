"""AdamW with decoupled weight decay on matrices only, and a cosine schedule with warm-up.

Weight decay skips norms, biases and every 0/1-d parameter, embedding tables (token and
positional embeddings, learned queries and CLS tokens) and learnable temperatures.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig

__all__ = ["param_groups", "build_optimizer", "lr_at", "set_lr"]

# parameter leaf names that are embeddings, queries or scales rather than weight matrices
_NO_DECAY_LEAVES = {"pos_emb", "pos_embedding", "cls", "text_cls", "cls_emb", "cls_token", "queries", "latents",
                    "media_pos_emb", "logit_scale", "log_scale", "logit_bias", "bias"}


def _no_decay_ids(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            ids.add(id(module.weight))
    return ids


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``decay`` (weight matrices) and ``no_decay`` (the rest).

    Tied weights appear once (``named_parameters`` de-duplicates); an embedding table tied to
    an output projection counts as an embedding and is not decayed.
    """
    embeddings = _no_decay_ids(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        skip = p.ndim < 2 or id(p) in embeddings or leaf in _NO_DECAY_LEAVES
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`: the fused kernel for plain CPU/CUDA tensors (faster than
    the default loop; the README's benchmark section has the figure), torch's default otherwise
    (e.g. FSDP's sharded DTensors)."""
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    params = [p for g in groups for p in g["params"]]
    fused = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimiser step ``step`` (0-based): linear warm-up from ``lr/warmup``
    to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at the end."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / decay_steps, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
