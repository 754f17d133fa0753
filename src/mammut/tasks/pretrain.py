"""``pretrain``: image-text pretraining with the model's own two-sided objective.

Batches ``{"images": (b, c, h, w), "text": (b, n)}`` from emoji scenes, CSV/TSV or WebDataset
(``mammut.train.data.train_batches``); the objective is the model's ``compute_losses`` (MaMMUT:
contrastive + captioning passes over shared weights; CoCa: unimodal + multimodal), its
caption part weighted by the batch's token share. Evaluation: held-out retrieval, zero-shot
(emoji) and captions (``mammut.eval``); its report: ``mammut.eval.report.image_text_report``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..models.contract import Batch
from .base import Task, register_task

__all__ = ["Pretrain"]

log = logging.getLogger(__name__)


def trim_padding(text: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Drop trailing columns that are pad in every row: same losses, less compute."""
    if pad_id is None:
        return text
    used = (text != pad_id).any(dim=0).nonzero()
    return text[:, : int(used.max()) + 1] if used.numel() else text


def _recalls(retrieval: dict[str, Any]) -> dict[str, float]:
    out = {k: float(v) for k, v in retrieval.items() if k.startswith(("i2t", "t2i"))}
    out["R@1"] = (out["i2t_R@1"] + out["t2i_R@1"]) / 2
    return out


@register_task
class Pretrain(Task):
    name = "pretrain"
    data_kinds = ("emoji", "csv", "webdataset")

    def loss(self, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        text = trim_padding(batch["text"], model.config.pad_id)
        out = model.compute_losses(text, batch["images"], token_share=batch.get("token_share"))
        return {"loss": out.total, "caption": out.caption, "contrastive": out.contrastive}

    def train_batches(self, tokenizer: Any, *, rank: int, world_size: int, start_step: int) -> Iterator[list[Batch]]:
        from ..train.data import train_batches

        t = self.cfg.train
        for micro in train_batches(self.cfg.data, tokenizer, batch_size=t.batch_size, grad_accum=t.grad_accum,
                                   seed=t.seed, rank=rank, world_size=world_size, start_step=start_step, steps=t.steps):
            yield [{"images": images, "text": text} for images, text in micro]

    def evaluate(self, model: nn.Module, tokenizer: Any, *, data: str | None = None,
                 n: int | None = None) -> tuple[dict[str, Any], Any]:
        from ..eval.evaluate import evaluate_image_text

        return evaluate_image_text(model, tokenizer, self.cfg, data=data, n=n)

    def quick_eval(self, model: nn.Module, tokenizer: Any) -> dict[str, float] | None:
        """Held-out retrieval R@k both ways and ``R@1`` (their mean at 1, what ``train.keep_best``
        compares by default): the emoji held-out split, or the first ``eval.n`` images of
        ``data.val_path``; nothing without held-out data (never training rows)."""
        if not hasattr(self, "_quick"):
            self._quick = self._build_quick_eval()
        return self._quick(model, tokenizer) if self._quick is not None else None

    def _build_quick_eval(self):
        cfg = self.cfg
        if cfg.data.kind == "emoji" and cfg.data.val_path is None:
            from ..eval.evaluate import EmojiEval

            ev = EmojiEval(cfg.data, cfg.eval.n)

            def emoji_fn(model: nn.Module, tokenizer: Any) -> dict[str, float]:
                metrics, _ = ev(model, tokenizer, cfg.eval, quick=True)
                return _recalls(metrics["retrieval"])

            return emoji_fn
        if cfg.data.val_path is None:
            log.warning("train.eval_every: no data.val_path, so no held-out evaluation during training")
            return None
        from ..eval.evaluate import evaluate_pairs
        from ..data.sources import eval_pairs

        pairs = eval_pairs(cfg.data, cfg.data.val_path, cfg.eval.n)

        def pairs_fn(model: nn.Module, tokenizer: Any) -> dict[str, float]:
            metrics, _ = evaluate_pairs(model, tokenizer, pairs.images, pairs.captions, max_len=cfg.data.max_len,
                                        batch_size=cfg.eval.batch_size, with_captions=False, truncate=True,
                                        image_index=pairs.image_index)
            return _recalls(metrics["retrieval"])

        return pairs_fn
